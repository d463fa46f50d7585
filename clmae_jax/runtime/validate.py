"""Every value a user sets, checked before anything is built or compiled: one line naming the field and the fix.

Checks that need the data (batch larger than the split) or the trainer's own tables (CBM schedules, CvT weights)
stay where those are known; everything else is here, so a bad value fails in a second, not after a compile. The
accepted names of a field come from the module that reads it: the runtime's and the models' below, an experiment's
own (CL-MAE's curriculum, CBM's salience) from its module's OPTIONS, which main.py passes in.
"""
import uuid

from clmae_jax.evaluate.encoder import RAW_PIXELS
from clmae_jax.models.vit import ATTENTION_IMPLEMENTATIONS, POOLS, POSITION_EMBEDDINGS, VIT_SIZES, vit_size
from clmae_jax.runtime import data, loop, mesh, optim, paths
from clmae_jax.runtime.errors import MissingInputError, UserError, check_choice, check_tiling

NAMES = {  # Field -> accepted values, as the module that reads the field defines them.
    "nonfinite": loop.NONFINITE_MODES,
    "input.source": data.SOURCES,
    "input.augment": data.AUGMENTATIONS,
    "input.eval_transform": data.EVAL_TRANSFORMS,
    "optimizer.name": optim.OPTIMIZERS,
    "optimizer.schedule": optim.LR_SCHEDULES,
    "optimizer.mu_dtype": optim.MU_DTYPES,
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.pos_embed": POSITION_EMBEDDINGS,
    "model.param_dtype": ("float32", "bfloat16"),
    "model.attention": ATTENTION_IMPLEMENTATIONS,
    "model.size": VIT_SIZES,
    "model.pool": POOLS,
}

# Field -> (lowest allowed, fix). Integers unless noted; absent fields are not checked.
AT_LEAST = {
    "batch_size": (1, "give the global batch over all devices"),
    "grad_accum_steps": (1, "use 1 for no accumulation"),
    "eval_batch_size": (1, "give the global evaluation batch"),
    "num_epochs": (0, "give a number of epochs, or total_steps > 0"),
    "total_steps": (0, "give a number of steps (0: use num_epochs)"),
    "stop_after_steps": (0, "use 0 to train to the end"),
    "log_every_steps": (0, "use 0 to log only at the end"),
    "image_every_steps": (0, "use 0 to draw only at the end"),
    "checkpoint_every_steps": (0, "use 0 to save only at the end"),
    "keep_checkpoints": (1, "keep at least the latest checkpoint"),
    "num_summary_images": (1, "draw at least one image"),
    "input.image_size": (1, "give the side in pixels"),
    "input.shuffle_buffer": (1, "use 1 for no shuffling"),
    "model.patch_size": (1, "give the patch side in pixels"),
    "clmae.loss_group_size": (2, "the diversity term compares images within a group; use at least 2"),
    "clmae.curriculum_stages": (0, "use 0 for one stage per epoch"),
    "clmae.masker.depth": (1, "give the number of masking-module blocks"),
    "clmae.masker.num_heads": (1, "give the number of attention heads"),
    "model.decoder_width": (1, "give the decoder's width"),
    "model.decoder_depth": (1, "give the number of decoder blocks"),
    "model.decoder_heads": (1, "give the number of attention heads"),
    "cbm.grid": (1, "give the cells per side (4 in the paper)"),
    "knn_chunk": (1, "give the bank rows per device a kNN query batch meets at once (4096)"),
}

NON_NEGATIVE = {  # Field -> fix.
    "optimizer.lr": "use 0 to take config.optimizer.base_lr x batch / 256",
    "optimizer.base_lr": "give the learning rate per 256 images (the MAE paper: 1.5e-4)",
    "optimizer.weight_decay": "use 0 for none",
    "optimizer.warmup_epochs": "use 0 for no warm-up",
    "optimizer.min_lr": "use 0 to decay to zero",
    "optimizer.grad_clip": "use 0 for no clipping",
    "clmae.masker.logit_bound": "use 0 for no bound",
}

POSITIVE = {  # Field -> fix, for numbers that divide.
    "clmae.masker.temperature": "use 1.0 for the official sigmoid, above 1 to soften it",
}


def get(config, field: str):
    """config's value at a dotted field, or None when absent."""
    node = config
    for key in field.split("."):
        if not hasattr(node, "get") or key not in node:
            return None
        node = node[key]
    return node


def fail(field: str, value, problem: str, fix: str):
    """Raises the one-line error for a bad field."""
    raise UserError(f"config.{field}={value!r} {problem}; {fix}.")


def check_names(config, options: dict):
    """Every enumerated field (NAMES and the experiment's `options`) holds one of its accepted values."""
    for field, allowed in {**NAMES, **options}.items():
        value = get(config, field)
        if value is not None:
            check_choice(field, value, allowed)


def check_ranges(config):
    """Counts and sizes are integers in range; rates are non-negative numbers."""
    for field, (lowest, fix) in AT_LEAST.items():
        value = get(config, field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < lowest):
            fail(field, value, f"must be an integer >= {lowest}", fix)
    for field, fix in NON_NEGATIVE.items():
        value = get(config, field)
        if value is not None and not (isinstance(value, (int, float)) and value >= 0):
            fail(field, value, "must be a number >= 0", fix)
    for field, fix in POSITIVE.items():
        value = get(config, field)
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            fail(field, value, "must be a number > 0", fix)
    for field in ("optimizer.b1", "optimizer.b2", "optimizer.momentum"):
        value = get(config, field)
        if value is not None and not 0 <= value < 1:
            fail(field, value, "must be in [0, 1)", "the usual values are 0.9 to 0.999")
    if get(config, "total_steps") == 0 and get(config, "num_epochs") == 0:
        fail("total_steps", 0, "and config.num_epochs=0 give no training", "set one of them above 0")
    if get(config, "optimizer.lr") == 0 and get(config, "optimizer.base_lr") == 0:
        fail("optimizer.lr", 0.0, "and config.optimizer.base_lr=0 give no learning", "set one of them above 0")


def check_batch(config):
    """The global batch splits over processes, devices, accumulation steps and CL-MAE loss groups."""
    batch = config.batch_size
    mesh.check_batch_split(batch, config.get("grad_accum_steps", 1))
    if config.get("eval_batch_size"):
        mesh.check_batch_split(config.eval_batch_size, field="eval_batch_size")
    group = get(config, "clmae.loss_group_size")
    if group and batch % group:
        fail("clmae.loss_group_size", group, f"does not divide config.batch_size={batch}",
             "choose a divisor of the batch (the official code: 256)")


def check_input(config):
    """Image size, channels, normalisation, crops and where the data is."""
    c = config.input
    if c.get("channels") not in (1, 3):
        fail("input.channels", c.get("channels"), "must be 1 (grey) or 3 (RGB)", "RGBA and grey images are "
             "converted to it")
    for field in ("mean", "std"):
        if len(c[field]) != c.channels:
            fail(f"input.{field}", tuple(c[field]), f"needs one value per channel ({c.channels})",
                 "give as many values as config.input.channels")
    if min(c.std) <= 0:
        fail("input.std", tuple(c.std), "must be positive", "use the data set's per-channel standard deviation")
    low, high = c.get("crop_scale", (0.5, 1.0))
    if not 0 < low <= high <= 1:
        fail("input.crop_scale", tuple(c.crop_scale), "must satisfy 0 < low <= high <= 1", "e.g. (0.2, 1.0)")
    if not 0 < c.get("eval_crop_ratio", 1.0) <= 1:
        fail("input.eval_crop_ratio", c.eval_crop_ratio, "must be in (0, 1]", "use 1.0 for no crop, 0.875 for "
             "ImageNet")
    if c.source == "image_folder" and not c.get("data_dir"):
        fail("input.data_dir", "", "is empty but config.input.source='image_folder' reads from it",
             "set it to the folder holding <split>/<class>/<image> files")
    if c.source != "tfds" and c.get("name") not in ("", data.SOURCE_NAMES.get(c.source)):
        fail("input.name", c.name, f"is not read by config.input.source={c.source!r}", "set config.input.source="
             "'tfds' to read a tfds dataset by name, or leave the name as the config file gives it")


def check_model(config):
    """Mask ratio and patch grid of MAE / CL-MAE models."""
    patch, size = get(config, "model.patch_size"), config.input.image_size
    if patch:
        check_tiling(size, size, patch, f"config.model.patch_size={patch} (config.input.image_size={size})",
                     "change one of them")
    ratio = get(config, "mae.mask_ratio")
    if ratio is None:
        return
    if not 0 < ratio < 1:
        fail("mae.mask_ratio", ratio, "must be strictly between 0 and 1", "the MAE paper uses 0.75")
    tokens = (size // patch) ** 2
    if int(tokens * (1 - ratio)) < 1:
        fail("mae.mask_ratio", ratio, f"leaves no visible token of {tokens}", "lower it")
    keep = get(config, "clmae.target_keep_ratio")
    if keep is not None and not 0 < keep <= 1:
        fail("clmae.target_keep_ratio", keep, "must be in (0, 1]", "the official code uses 0.25")


def check_heads(config):
    """Attention heads split their width evenly: the MAE decoder, and CL-MAE's masking module (encoder width)."""
    size = get(config, "model.size")
    if size is None or get(config, "model.name") not in (None, "vit"):
        return
    for field, width in (("model.decoder_heads", get(config, "model.decoder_width")),
                         ("clmae.masker.num_heads", vit_size(size)["width"])):
        heads = get(config, field)
        if heads is not None and width is not None and width % heads:
            divisors = [h for h in range(1, 17) if width % h == 0]
            fail(field, heads, f"does not divide the width {width} into equal heads",
                 f"use one of {', '.join(map(str, divisors))} (or change the width)")


WEIGHTS = {  # Field -> what else it may be set to.
    "model.init_from": "'' to start from scratch",
    "encoder.checkpoint": f"{RAW_PIXELS!r} for the pixel baseline",
}


def check_weights(config):
    """The weights a run starts from or evaluates exist: a run folder, a checkpoint step, a weights file."""
    for field, otherwise in WEIGHTS.items():
        path = get(config, field)
        if not path or path == RAW_PIXELS or paths.exists(path):
            continue
        where = ("download CvT-13-224x224-IN-1k.pth (microsoft/CvT model zoo) and point it there"
                 if get(config, "model.name") == "cvt13" else "point it at a run's workdir, one of its "
                 "checkpoints/<step> folders or a PyTorch / Hugging Face weights file")
        raise MissingInputError(f"config.{field}={path} does not exist; {where}, or set it to {otherwise}.")


def check_workdir(workdir: str):
    """The workdir is a local folder or a gs:// URL, exists or can be made, and takes files."""
    remote = paths.is_remote(workdir)
    if remote and (not workdir.startswith("gs://") or not workdir[len("gs://"):].strip("/")):
        raise UserError(f"--workdir={workdir} is neither a local folder nor a gs://BUCKET/PATH URL; remote workdirs "
                        "live on Google Cloud Storage.")
    if paths.exists(workdir) and not paths.isdir(workdir):
        raise UserError(f"--workdir={workdir} is a file, not a folder; choose a folder (it is made if missing).")
    probe = paths.join(workdir, f".write_probe.{uuid.uuid4().hex}")  # Each process of a run probes at once.
    try:
        paths.makedirs(workdir)
        paths.write_bytes(probe, b"")
        paths.remove(probe)
    except Exception as e:  # TensorFlow's GCS client raises its own error types, and says more than an errno.
        if remote:
            raise UserError(f"--workdir={workdir} cannot be written ({' '.join(str(e).split())[:200]}); check the "
                            "bucket's name and that this machine's credentials may write to it.") from e
        if not isinstance(e, OSError):
            raise
        raise UserError(f"--workdir={workdir} is not writable ({e.strerror}); choose a folder you can write to, "
                        "or fix its permissions.") from e


def check_config(config, workdir: str | None = None, options: dict | None = None):
    """Raises UserError for the first bad user-set value of `config` (and an unusable `workdir`); `options` are the
    experiment module's own {field: accepted values}."""
    check_ranges(config)
    check_names(config, options or {})
    check_batch(config)
    check_input(config)
    check_model(config)
    check_heads(config)
    if workdir is not None:  # A run's files: configs name weights that users download, so not before a run.
        check_weights(config)
        check_workdir(workdir)
