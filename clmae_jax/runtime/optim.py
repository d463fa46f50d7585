"""Optimizer recipes: AdamW + warm-up cosine (MAE, CL-MAE), SGD with step decay (CBM CNNs), Adamax (CBM CvT)."""
import jax
import optax

from clmae_jax.runtime.errors import check_choice


def decay_mask(params, exempt=()):
    """Weight decay on matrices and kernels only: biases and norm scales (1-D) are exempt (timm's add_weight_decay),
    and so is every parameter under a top-level name in `exempt` (MAE fine-tuning: cls_token, pos_embed)."""
    return jax.tree_util.tree_map_with_path(lambda path, p: p.ndim > 1 and path[0].key not in exempt, params)


def learning_rate(config, global_batch_size: int) -> float:
    """Absolute lr: config.lr when set, else the MAE rule blr * global_batch / 256."""
    return config.lr if config.get("lr") else config.base_lr * global_batch_size / 256


OPTIMIZERS = ("adamw", "sgd", "adamax")
LR_SCHEDULES = ("cosine", "step", "constant")
MU_DTYPES = ("", "float32", "bfloat16")  # AdamW's first moment: "" keeps the parameters' dtype.


def schedule(config, peak_lr: float, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Per-step learning rate: 'cosine' (linear warm-up, half-cycle cosine to min_lr), 'step' or 'constant'."""
    check_choice("optimizer.schedule", config.schedule, LR_SCHEDULES)
    if config.schedule == "cosine":
        warmup = int(config.warmup_epochs * steps_per_epoch)
        return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup, max(total_steps, warmup + 1),
                                                  config.get("min_lr", 0.0))
    if config.schedule == "step":
        # Epochs are 1-based in the reference code: "decay at epoch 32" means from the 32nd epoch on.
        boundaries = {int((e - 1) * steps_per_epoch): config.decay_factor for e in config.decay_epochs}
        return optax.piecewise_constant_schedule(peak_lr, boundaries)
    return optax.constant_schedule(peak_lr)


def make_optimizer(config, lr_schedule: optax.Schedule) -> optax.GradientTransformation:
    """The optax transformation named by config.name ('adamw', 'sgd' or 'adamax')."""
    check_choice("optimizer.name", config.name, OPTIMIZERS)
    if config.name == "adamw":
        exempt = tuple(config.get("no_decay", ()))
        # mu_dtype "bfloat16" stores AdamW's first moment in bfloat16 (a fifth of the update's bytes; off by default:
        # it changes the numbers and the checkpoint's dtypes).
        tx = optax.adamw(lr_schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay,
                         mask=lambda params: decay_mask(params, exempt), mu_dtype=config.get("mu_dtype") or None)
    elif config.name == "sgd":
        # PyTorch SGD adds weight decay to the gradient (L2), before momentum.
        tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                         optax.sgd(lr_schedule, momentum=config.momentum))
    else:
        tx = optax.adamax(lr_schedule)
    if config.get("grad_clip"):
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
    return tx


def layer_id(path: tuple, depth: int) -> int:
    """BEiT / MAE layer index of a ViT parameter: 0 for the embeddings, i + 1 for block i, depth + 1 for the rest."""
    names = [str(getattr(k, "key", k)) for k in path]
    blocks = [n for n in names if n.startswith("block") and n[5:].isdigit()]
    if blocks:
        return int(blocks[0][5:]) + 1
    if names[0] in ("patch_embed", "cls_token", "pos_embed"):
        return 0
    return depth + 1


def layer_decay(params, depth: int, decay: float) -> optax.GradientTransformation:
    """Scales each ViT parameter's update by decay ** (depth + 1 - layer): the MAE fine-tuning layer-wise lr decay
    (weight decay included, as the reference scales the whole lr of a parameter group)."""
    scales = jax.tree_util.tree_map_with_path(lambda path, _: decay ** (depth + 1 - layer_id(path, depth)), params)
    return optax.GradientTransformation(
        lambda _: optax.EmptyState(),
        lambda updates, state, params=None: (jax.tree.map(lambda u, s: u * s, updates, scales), state))
