"""Converts MAE / CL-MAE / ViT-classifier weights between our runs and PyTorch.

    python -m clmae_jax.interop --from=PATH --to=PATH [--format=fbmae|hf|npz] [--step=N]

--from: one of our run workdirs (MAE, CL-MAE, or a supervised / fine-tuning run of the ViT; newest committed
        checkpoint, or --step) or step folders (WORKDIR/checkpoints/<step>), or a PyTorch file / Hugging Face
        folder (facebookresearch/mae, official CL-MAE, timm, ViTMAE, ViTForImageClassification).
--to / --format: "fbmae" writes a facebookresearch/mae (= timm) .pth ({"model": state dict}; CL-MAE runs keep
        their masking module as masking_net.*), "hf" a Hugging Face folder (ViTMAEForPreTraining, MAE part only;
        ViTForImageClassification for CLS-pooling classifiers), "npz" our parameter tree flattened to "a/b/c" keys
        with the geometry as JSON under "__geometry__". Without --format: .pth/.pt -> fbmae, .npz -> npz,
        anything else -> hf.
"""
import argparse
import io
import json

import jax
import numpy as np

from clmae_jax.interop.classifier_torch import load_torch_weights, save_classifier_fbmae, save_classifier_hf
from clmae_jax.interop.mae_torch import save_fbmae, save_hf
from clmae_jax.models.geometry import Geometry, params_geometry
from clmae_jax.models.vit import vit_size
from clmae_jax.runtime import paths
from clmae_jax.runtime.checkpoint import is_run_folder, read_run
from clmae_jax.runtime.errors import UserError

FORMATS = ("fbmae", "hf", "npz")


def load_run(path: str, step: int) -> tuple:
    """(geometry, params) of one of our runs (MAE, CL-MAE or ViT classifier), the geometry from its training config."""
    config, params, _ = read_run(path, step)
    known = dict(image_size=config.input.image_size, num_heads=vit_size(config.model.size)["num_heads"],
                 mean=config.input.mean, std=config.input.std)
    if config.model.get("name") == "vit":  # A supervised / fine-tuning run of the ViT classifier.
        return params_geometry(params, **known, pool=config.model.pool), params
    return params_geometry(params, **known, decoder_heads=config.model.decoder_heads,
                           masker_heads=config.clmae.masker.num_heads if "clmae" in config else None,
                           mask_ratio=config.mae.mask_ratio, norm_pix_loss=config.mae.norm_pix_loss), params


def save_npz(params, geometry: Geometry, path: str):
    """Our tree flattened to "a/b/c" keys, plus the geometry as JSON."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    arrays = {"/".join(k.key for k in keys): np.asarray(leaf) for keys, leaf in flat}
    content = io.BytesIO()
    np.savez(content, __geometry__=json.dumps(dict(geometry)), **arrays)
    paths.write_bytes(path, content.getvalue())


def output_format(path: str, given: str) -> str:
    """--format, or the one --to's name implies."""
    if given:
        if given not in FORMATS:
            raise UserError(f"Unknown --format={given!r}; use one of {', '.join(FORMATS)}.")
        return given
    return "fbmae" if path.endswith((".pth", ".pt")) else "npz" if path.endswith(".npz") else "hf"


def convert(source: str, target: str, fmt: str = "", step: int = -1):
    """Reads `source` (our run or a PyTorch file / folder) and writes `target` in `fmt`."""
    fmt = output_format(target, fmt)
    geometry, params = load_run(source, step) if is_run_folder(source) else load_torch_weights(source)
    classifier = geometry.num_classes is not None
    if fmt == "fbmae":
        (save_classifier_fbmae if classifier else save_fbmae)(params, geometry, target)
    elif fmt == "hf":
        (save_classifier_hf if classifier else save_hf)(params, geometry, target)
    else:
        save_npz(params, geometry, target)
    return fmt


def main(argv=None):
    """Command-line entry point; a UserError prints as one line."""
    parser = argparse.ArgumentParser(prog="python -m clmae_jax.interop", description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", required=True)
    parser.add_argument("--to", dest="target", required=True)
    parser.add_argument("--format", default="")
    parser.add_argument("--step", type=int, default=-1)
    args = parser.parse_args(argv)
    try:
        fmt = convert(args.source, args.target, args.format, args.step)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {args.target} ({fmt})")


if __name__ == "__main__":
    main()
