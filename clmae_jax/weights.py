"""The one reader of pretrained weights, for every setting that names them (config.model.init_from,
config.encoder.checkpoint) and for the exporter: one of our runs (a workdir at its newest committed step or at
`step`, or one of its step folders) or any PyTorch / Hugging Face file `clmae_jax.interop` reads."""
import dataclasses

from clmae_jax.evaluate.encoder import ENCODER_KEYS
from clmae_jax.interop import load_torch_weights
from clmae_jax.models.geometry import Geometry, check_same_encoder, config_geometry, params_geometry
from clmae_jax.models.vit import vit_size
from clmae_jax.runtime import checkpoint
from clmae_jax.runtime.errors import UserError


@dataclasses.dataclass(frozen=True)
class Weights:
    """Pretrained parameters (numpy, our layout), their geometry and where they came from."""

    name: str  # "WORKDIR@STEP" for a run, else the file's path.
    geometry: Geometry
    params: dict
    step: int = 0


def restore_encoder_params(step_folder: str) -> dict:
    """The MAE encoder leaves of a checkpoint as numpy (MAE: params/..., CL-MAE: params/mae/...), nothing else."""
    params = checkpoint.params_metadata(step_folder)
    mae = params["mae"] if "mae" in params else params
    missing = [k for k in ENCODER_KEYS if k not in mae]
    if missing:
        raise UserError(f"{step_folder} holds no ViT encoder (no params/{missing[0]}); point it at an MAE, CL-MAE "
                        "or ViT run.")
    wanted = {k: mae[k] for k in ENCODER_KEYS}
    restored = checkpoint.restore_params(step_folder, {"mae": wanted} if "mae" in params else wanted)
    return restored["mae"] if "mae" in params else restored


def run_geometry(config, params) -> Geometry:
    """The geometry of a run's `params`: sizes from their shapes, the rest from its training `config`."""
    known = dict(image_size=config.input.image_size, num_heads=vit_size(config.model.size)["num_heads"],
                 mean=config.input.mean, std=config.input.std)
    if config.model.get("name") == "vit":  # A supervised / fine-tuning run of the ViT classifier.
        return params_geometry(params, **known, pool=config.model.pool)
    return params_geometry(params, **known, decoder_heads=config.model.decoder_heads,
                           masker_heads=config.clmae.masker.num_heads if "clmae" in config else None,
                           mask_ratio=config.mae.mask_ratio, norm_pix_loss=config.mae.norm_pix_loss)


def read_weights(path: str, step: int = -1, encoder_only: bool = False) -> Weights:
    """The weights at `path`; of a run, only the encoder's leaves are read from disk with `encoder_only`."""
    if not checkpoint.is_run_folder(path):
        return Weights(path, *load_torch_weights(path))
    workdir, folder, step = checkpoint.resolve_step_folder(path, step)
    config = checkpoint.read_train_config(folder)
    if config.model.get("name", "vit") != "vit":
        raise UserError(f"{path} is a {config.model.name} run; pretrained weights come from an MAE, CL-MAE or ViT "
                        "run, or a PyTorch / Hugging Face file.")
    params = restore_encoder_params(folder) if encoder_only else checkpoint.restore_params(folder)
    geometry = run_geometry(config, params)
    check_same_encoder(geometry, f"checkpoint {folder}", config_geometry(config),
                       f"its training config (model.size {config.model.size!r})")
    return Weights(f"{workdir}@{step}", geometry, params, step)
