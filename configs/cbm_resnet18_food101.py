"""CBM paper experiment: ResNet-18 on Food-101 (recipe in configs/cbm_paper.py).

    python main.py --config=configs/cbm_resnet18_food101.py[:baseline|:random] --workdir=DIR
"""
from configs import cbm_paper


def get_config(variant: str = ""):
    """CBM (''), conventional training ('baseline') or random masking ('random')."""
    return cbm_paper.paper_config("resnet18", "food101", variant)
