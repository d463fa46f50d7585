"""CBM paper experiment: WRN-52-2 (the paper's "Wide-ResNet-50") on CIFAR-100 (recipe in configs/cbm_paper.py).

    python main.py --config=configs/cbm_wrn_52_2_cifar100.py[:baseline|:random] --workdir=DIR
"""
from configs import cbm_paper


def get_config(variant: str = ""):
    """CBM (''), conventional training ('baseline') or random masking ('random')."""
    return cbm_paper.paper_config("wrn_52_2", "cifar100", variant)
