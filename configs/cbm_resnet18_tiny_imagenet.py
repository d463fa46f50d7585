"""CBM paper experiment: ResNet-18 on Tiny ImageNet (recipe in configs/cbm_paper.py).

    python main.py --config=configs/cbm_resnet18_tiny_imagenet.py[:baseline|:random] --workdir=DIR
"""
from configs import cbm_paper


def get_config(variant: str = ""):
    """CBM (''), conventional training ('baseline') or random masking ('random')."""
    return cbm_paper.paper_config("resnet18", "tiny_imagenet", variant)
