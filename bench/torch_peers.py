"""PyTorch peers of the project's MAE step, built to the same model, batch, mask ratio and precision policy.

Each builder returns `step()`: one full training step (forward, backward, AdamW update), synchronised. The
timm-based facebookresearch/mae model is imported from a checkout the user points at (nothing of it is copied
here) and needs timm; so is the official CL-MAE iteration, from a ristea/cl-mae checkout.
"""
import functools
import importlib
import sys

import numpy as np
import torch

try:  # torchvision (transformers and timm import it) segfaults on import once TensorFlow is loaded: load it first.
    import torchvision  # noqa: F401
except ImportError:
    pass

from clmae_jax.models.vit import vit_size


def device() -> str:
    """Where the peers run: the GPU when torch sees one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize():
    """Waits for queued GPU work (a no-op on CPU)."""
    if device() == "cuda":
        torch.cuda.synchronize()


def autocast(dtype: str):
    """The mixed-precision policy matching the JAX rows: bf16 compute with fp32 parameters, or plain fp32."""
    return torch.autocast(device(), dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def random_images(config):
    """A fixed random NCHW batch of the config's shape on the peers' device."""
    size = config.input.image_size
    return torch.randn(config.batch_size, config.input.channels, size, size, device=device())


def adamw_step(model, loss_fn, config):
    """`step()`: `loss_fn(images)` on a fixed random batch in the JAX rows' precision policy, backward, and AdamW
    with the MAE recipe's betas and weight decay."""
    opt = config.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(opt.b1, opt.b2), weight_decay=opt.weight_decay,
                                  fused=device() == "cuda")
    images = random_images(config)

    def step():
        with autocast(config.model.dtype):
            loss = loss_fn(images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize()

    return step


def hf_mae(config, compile_model: bool = False):
    """Hugging Face `ViTMAEForPreTraining` (SDPA attention) of config's size, AdamW as the MAE recipe."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining
    m, size = config.model, vit_size(config.model.size)
    hf_config = ViTMAEConfig(
        hidden_size=size["width"], num_hidden_layers=size["depth"], num_attention_heads=size["num_heads"],
        intermediate_size=4 * size["width"], decoder_hidden_size=m.decoder_width,
        decoder_num_hidden_layers=m.decoder_depth, decoder_num_attention_heads=m.decoder_heads,
        decoder_intermediate_size=4 * m.decoder_width, image_size=config.input.image_size, patch_size=m.patch_size,
        num_channels=config.input.channels, mask_ratio=config.mae.mask_ratio, norm_pix_loss=config.mae.norm_pix_loss,
        attn_implementation="sdpa")
    torch.manual_seed(0)
    model = ViTMAEForPreTraining(hf_config).to(device()).train()
    forward = torch.compile(model) if compile_model else model
    return adamw_step(model, lambda images: forward(pixel_values=images).loss, config)


CHECKOUT_MODULES = ("models_mae", "vit_local", "util", "util.pos_embed")  # Same names in both official repos.


def import_checkout(source: str):
    """`models_mae` of a facebookresearch/mae or ristea/cl-mae checkout, run on today's libraries: timm >= 0.9
    dropped the `qk_scale` argument the MAE code passes as None, and numpy 1.24 the `np.float` alias of its
    pos_embed. Both repositories name their modules alike, so each import starts from a clean slate."""
    import timm.models.vision_transformer as vision_transformer
    if "qk_scale" not in vision_transformer.Block.__init__.__code__.co_varnames:
        base = vision_transformer.Block

        class Block(base):
            def __init__(self, *args, qk_scale=None, **kwargs):
                del qk_scale
                super().__init__(*args, **kwargs)
        vision_transformer.Block = Block
    if not hasattr(np, "float"):
        np.float = float
    for name in CHECKOUT_MODULES:
        sys.modules.pop(name, None)
    sys.path.insert(0, source)
    try:
        return importlib.import_module("models_mae")
    finally:
        sys.path.remove(source)
        for name in CHECKOUT_MODULES:
            sys.modules.pop(name, None)


def fbmae_mae(config, source: str, compile_model: bool = False):
    """facebookresearch/mae's `MaskedAutoencoderViT` (timm Blocks, SDPA attention) of config's size, from the
    checkout at `source`, AdamW as the MAE recipe, in the JAX rows' precision policy."""
    m, size = config.model, vit_size(config.model.size)
    torch.manual_seed(0)
    model = import_checkout(source).MaskedAutoencoderViT(
        img_size=config.input.image_size, patch_size=m.patch_size, in_chans=config.input.channels,
        embed_dim=size["width"], depth=size["depth"], num_heads=size["num_heads"], decoder_embed_dim=m.decoder_width,
        decoder_depth=m.decoder_depth, decoder_num_heads=m.decoder_heads, norm_pix_loss=config.mae.norm_pix_loss)
    model = model.to(device()).train()
    forward = torch.compile(model) if compile_model else model
    return adamw_step(model, lambda images: forward(images, mask_ratio=config.mae.mask_ratio)[0], config)


def vectorised_diversity(outputs, scale: float):
    """The official DiversityLoss without its Python double loop over the batch: mean over pairs i < j of
    exp(-scale ||m_i - m_j||), one expression (the fair fast peer; same value)."""
    n = outputs.shape[0]
    pairs = torch.triu_indices(n, n, 1, device=outputs.device)
    distances = torch.cdist(outputs, outputs, p=2)[pairs[0], pairs[1]]
    return torch.exp(-distances * scale).sum() / (n * (n - 1) / 2)


def official_clmae(config, source: str, vectorised: bool = False):
    """The official CL-MAE iteration of the ristea/cl-mae checkout at `source` (engine_pretrain.py): the MAE step
    with the masking module frozen, then the module step with the backbone frozen, one AdamW over all parameters
    (frozen parameters have no gradient and do not move), in the JAX rows' precision policy. `vectorised` replaces
    the diversity loss's Python double loop over the batch with one expression."""
    m, size = config.model, vit_size(config.model.size)
    torch.manual_seed(0)
    model = import_checkout(source).MaskedAutoencoderViT(
        img_size=config.input.image_size, patch_size=m.patch_size, in_chans=config.input.channels,
        embed_dim=size["width"], depth=size["depth"], num_heads=size["num_heads"], decoder_embed_dim=m.decoder_width,
        decoder_depth=m.decoder_depth, decoder_num_heads=m.decoder_heads, norm_pix_loss=config.mae.norm_pix_loss,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
    model = model.to(device()).train()
    if vectorised:
        model.diversity_loss.forward = lambda outputs: vectorised_diversity(outputs, model.diversity_loss.scale_factor)
    opt = config.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(opt.b1, opt.b2), weight_decay=opt.weight_decay)
    images = random_images(config)
    ratio, lambda_cl = config.mae.mask_ratio, 1.0

    def update(loss):
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step():
        model.freeze_maskingnet()
        with autocast(config.model.dtype):
            loss = model(images, mask_ratio=ratio)
        loss.item()  # The official loop reads every loss back for its finiteness check.
        update(loss)
        model.unfreeze_maskingnet()
        model.freeze_backbone()
        with autocast(config.model.dtype):
            reconstruction, gaussian, kl, diversity = model(images, mask_ratio=ratio, train_mask=True)
            loss = lambda_cl * reconstruction + gaussian + kl + diversity
        loss.item()
        update(loss)
        model.unfreeze_backbone()
        synchronize()

    return step


def peak_memory_bytes() -> int | None:
    """Peak GPU memory torch allocated since the last reset (None on CPU); resets the counter."""
    if device() != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    return peak


MAE_PEERS = {"hf": lambda config, sources: hf_mae(config),
             "hf_compile": lambda config, sources: hf_mae(config, compile_model=True),
             "fbmae": lambda config, sources: fbmae_mae(config, sources["fbmae_src"]),
             "fbmae_compile": lambda config, sources: fbmae_mae(config, sources["fbmae_src"], compile_model=True)}
CLMAE_PEERS = {"official_clmae": lambda config, sources: official_clmae(config, sources["official_clmae"]),
               "official_clmae_vec": lambda config, sources: official_clmae(config, sources["official_clmae"], True)}
CHECKOUTS = {"fbmae": "fbmae_src", "fbmae_compile": "fbmae_src", "official_clmae": "official_clmae",
             "official_clmae_vec": "official_clmae"}  # Peers that run a checkout's code: the flag naming it.
