"""CBM paper experiment: CvT-13 (ImageNet-1k weights) on Architectural Heritage Elements (configs/cbm_paper.py).

    python main.py --config=configs/cbm_cvt13_ahe.py[:baseline|:random] --workdir=DIR
"""
from configs import cbm_paper


def get_config(variant: str = ""):
    """CBM (''), conventional training ('baseline') or random masking ('random')."""
    return cbm_paper.paper_config("cvt13", "ahe", variant)
