"""PyTorch peers of the project's MAE step, built to the same model, batch, mask ratio and precision policy.

Each builder returns `step()`: one full training step (forward, backward, AdamW update), synchronised. The
timm-based facebookresearch/mae model and the official CL-MAE iteration need checkouts of those repositories
and timm; ../shared/bench/gpu_peers.py runs them.
"""
import torch

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
    opt = config.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(opt.b1, opt.b2), weight_decay=opt.weight_decay,
                                  fused=device() == "cuda")
    images = torch.randn(config.batch_size, config.input.channels, config.input.image_size, config.input.image_size,
                         device=device())

    def step():
        with autocast(config.model.dtype):
            loss = forward(pixel_values=images).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize()

    return step


def peak_memory_bytes() -> int | None:
    """Peak GPU memory torch allocated since the last reset (None on CPU); resets the counter."""
    if device() != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    return peak


BUILDERS = {"hf": lambda config: hf_mae(config), "hf_compile": lambda config: hf_mae(config, compile_model=True)}
