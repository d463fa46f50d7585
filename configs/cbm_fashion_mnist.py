"""CBM on Fashion-MNIST on a laptop CPU: a width-16 ResNet-18 with salience masking vs. the unmasked baseline.

    python main.py --config=configs/cbm_fashion_mnist.py --workdir=runs/cbm_fmnist
    python main.py --config=configs/cbm_fashion_mnist.py:baseline --workdir=runs/cbm_fmnist_baseline

28x28 grey images on the paper's 4x4 grid (7x7-pixel cells), mean/std 0.5 as the official code (masked cells are
mid-grey), the linear-repeat curriculum "40" (1, 2, 3, 4, 6 of 16 cells, restarting every 5 epochs), SGD with
momentum, 10 epochs with lr / 10 at epochs 6 and 9. Pictures of masked training images and their salience grids
land in DIR/images; results.json holds the best and final test accuracy. Variants, comma-separated: 'baseline'
(no masking), 'random' (uniform instead of salience), 'light' (1, 1, 2, 3, 4 cells: salience then hides about the
share of a garment that uniform cells hide at "40"), 'test' (a handful of steps).
"""
from configs import cbm_paper, common


def get_config(variant: str = ""):
    """Variants: '', 'baseline', 'random', 'light', 'test', 'smoke', or combinations such as 'baseline,test'."""
    parts = common.parse_variant(variant, {"baseline", "random", "light", "test"}, "cbm_fashion_mnist.py")
    config = cbm_paper.base_config()
    config.input = common.input_config("fashion_mnist", eval_transform="resize", shuffle_buffer=60_000,
                                       mean=(0.5,), std=(0.5,))
    config.model.width = 16
    config.cbm.salience_size = 0
    config.num_epochs = 10
    config.optimizer.update(lr=0.05, weight_decay=5e-4, decay_epochs=(6, 9))
    config.eval_batch_size = 500
    config.log_every_steps = 100
    config.image_every_steps = 937
    config.checkpoint_every_steps = 937
    if "baseline" in parts:
        config.cbm.schedule = "none"
    if "random" in parts:
        config.cbm.salience = "uniform"
    if "light" in parts:  # The "40" sawtooth's shape, ending at 4 of 16 cells instead of 6.
        config.cbm.update(preset="", r_min=0.07, r_max=0.25)
    if "test" in parts:
        config.batch_size = 16
        config.eval_batch_size = 2000
        config.total_steps = 4
        config.model.width = 4
        config.log_every_steps = config.image_every_steps = config.checkpoint_every_steps = 2
    return common.smoke(config) if "smoke" in parts else config
