"""PyTorch / Hugging Face weight interoperability for the MAE family (MAE, CL-MAE); needs torch only when used.

`load_pretrained(path)` reads facebookresearch/mae and official CL-MAE .pth files, bare state dicts, .safetensors
files and Hugging Face ViTMAE folders into (geometry, our params); `save_fbmae` and `save_hf` write ours back.
`python -m clmae_jax.interop` converts files from the command line.
"""
from clmae_jax.interop.mae_torch import (build_mae, load_pretrained, params_geometry, save_fbmae, save_hf,
                                         to_fbmae_state_dict)

__all__ = ["build_mae", "load_pretrained", "params_geometry", "save_fbmae", "save_hf", "to_fbmae_state_dict"]
