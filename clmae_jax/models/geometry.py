"""The geometry of a ViT model: one record for evaluation's checks, the importers, the exporters and their files."""
import dataclasses
from collections.abc import Mapping

import numpy as np

from clmae_jax.models.masker import CurriculumMasker
from clmae_jax.models.vit import vit_size
from clmae_jax.runtime.errors import UserError


@dataclasses.dataclass(frozen=True)
class Geometry(Mapping):
    """An encoder's sizes (width, depth, patch_size, channels: what its weights and the model running them share)
    and what a whole model or file adds; None where unknown.

    Also a read-only mapping (geometry["width"], dict(geometry)), as the file metadata and hints it is read from.
    """

    width: int
    depth: int
    patch_size: int
    channels: int
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    image_size: int | None = None
    decoder_width: int | None = None
    decoder_depth: int = 0
    decoder_heads: int | None = None
    masker_depth: int = 0
    masker_heads: int | None = None
    mean: tuple | None = None
    std: tuple | None = None
    mask_ratio: float | None = None
    norm_pix_loss: bool | None = None
    num_classes: int | None = None  # A ViT classifier's, with its pool and position table.
    pool: str | None = None
    pos_embed: str | None = None

    def __getitem__(self, name: str):
        if name not in FIELDS:
            raise KeyError(name)
        return getattr(self, name)

    def __iter__(self):
        return iter(FIELDS)

    def __len__(self) -> int:
        return len(FIELDS)

    def replace(self, **changes) -> "Geometry":
        """A copy with `changes`."""
        return dataclasses.replace(self, **changes)

    @property
    def encoder(self) -> tuple:
        """(width, depth, patch_size, channels)."""
        return self.width, self.depth, self.patch_size, self.channels

    def describe(self) -> str:
        """'width 128, depth 4, patch 4, 1 channel(s)'."""
        return f"width {self.width}, depth {self.depth}, patch {self.patch_size}, {self.channels} channel(s)"


FIELDS = tuple(f.name for f in dataclasses.fields(Geometry))


def params_geometry(params, **known) -> Geometry:
    """The geometry of one of our trees (MAE, CL-MAE, encoder alone or ViTClassifier): sizes read from its shapes,
    the rest from `known` (image_size, num_heads, mean, ...); a masking module's heads default to the official 4."""
    mae = params.get("mae", params)
    patch, _, channels, width = np.shape(mae["patch_embed"]["proj"]["kernel"])
    count = lambda tree: sum(1 for name in tree if name.startswith("block"))
    hidden = np.shape(mae["encoder"]["block0"]["mlp"]["fc1"]["kernel"])[1]
    found = dict(width=width, depth=count(mae["encoder"]), mlp_ratio=hidden / width, patch_size=patch,
                 channels=channels)
    if "decoder" in mae:
        found.update(decoder_width=np.shape(mae["mask_token"])[-1], decoder_depth=count(mae["decoder"]),
                     decoder_heads=known.get("decoder_heads"))
    if "masker" in params:
        found.update(masker_depth=count(params["masker"]["blocks"]),
                     masker_heads=known.get("masker_heads", CurriculumMasker.num_heads))
    if "head" in params:
        found.update(num_classes=np.shape(params["head"]["kernel"])[1],
                     pos_embed="learned" if "pos_embed" in params else "sincos")
    # Heads of a part the tree lacks are left out, so callers may pass a config's values whatever the tree holds.
    rest = {k: tuple(v) if k in ("mean", "std") else v for k, v in known.items()
            if k not in ("decoder_heads", "masker_heads")}
    return Geometry(**found, **rest)


def config_geometry(config) -> Geometry:
    """The encoder geometry a training config's model and input describe."""
    size = vit_size(config.model.size)
    return Geometry(size["width"], size["depth"], config.model.patch_size, config.input.channels)


def check_same_encoder(found: Geometry, found_name: str, wanted: Geometry, wanted_name: str):
    """One-line UserError naming both sides when two encoders' sizes differ."""
    if found.encoder != wanted.encoder:
        raise UserError(f"Encoder geometry mismatch: {found_name} has {found.describe()} but {wanted_name} has "
                        f"{wanted.describe()}; point config.encoder.checkpoint at a matching encoder or fix the "
                        "config.")
