"""Few-shot evaluation of a pretrained MAE / CL-MAE encoder: n images per class, several seeds, kNN and linear.

    python main.py --config=configs/eval_fewshot.py --workdir=runs/fewshot --config.encoder.checkpoint=runs/clmae_fmnist
    python main.py --config=configs/eval_fewshot.py --config.evals.fewshot.shots=(1,5) --config.evals.fewshot.seeds=(0,1,2)

Inferred protocol (the CL-MAE code has no sampler): for each seed the first n images of each class of the seed's
permutation of the training split; the official kNN and the linear-probe recipe (cached features, batch
min(512, subset), `linear_steps` steps) on that subset; the whole test split; mean and standard deviation over
seeds. Variant words: a data set (as eval_knn.py), `smoke`.
"""
import ml_collections

from configs import eval_knn, eval_linear


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """1, 5 and 10 shots, 5 seeds, kNN and linear probe, on the variant's data set (default Fashion-MNIST)."""
    dataset, words = eval_knn.parse(variant, "eval_fewshot.py")
    config = eval_knn.base_config(dataset)
    config.evals.fewshot = ml_collections.ConfigDict(dict(
        type="fewshot", shots=(1, 5, 10), seeds=(0, 1, 2, 3, 4), methods=("knn", "linear"), num_train=0, num_test=0,
        linear_steps=1000, every_steps=0, knn=eval_knn.knn_entry(),
        linear=eval_linear.linear_entry(cache_features=True)))
    if "smoke" in words:
        config = eval_knn.shrink(config)
        config.evals.fewshot.update(shots=(1,), seeds=(0, 1), linear_steps=20)
    return config
