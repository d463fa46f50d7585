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

from clmae_jax.interop.classifier_torch import save_classifier_fbmae, save_classifier_hf
from clmae_jax.interop.mae_torch import save_fbmae, save_hf
from clmae_jax.models.geometry import Geometry
from clmae_jax.runtime import paths
from clmae_jax.runtime.errors import UserError
from clmae_jax.weights import read_weights

FORMATS = ("fbmae", "hf", "npz")


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
    weights = read_weights(source, step)
    geometry, params = weights.geometry, weights.params
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
