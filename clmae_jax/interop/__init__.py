"""PyTorch / Hugging Face weight interoperability for the MAE family and its ViT classifiers; torch only when used.

`load_pretrained(path)` reads facebookresearch/mae and official CL-MAE .pth files, bare state dicts, .safetensors
files and Hugging Face ViTMAE folders into (geometry, our params); `load_torch_weights(path)` also reads fine-tuned
classifiers (fb/mae, timm, Hugging Face ViTForImageClassification). `save_fbmae` / `save_hf` and
`save_classifier_fbmae` / `save_classifier_hf` write ours back; `python -m clmae_jax.interop` converts files.
"""
from clmae_jax.interop.classifier_torch import load_torch_weights, save_classifier_fbmae, save_classifier_hf
from clmae_jax.interop.mae_torch import load_pretrained, mae_for_geometry, save_fbmae, save_hf, to_fbmae_state_dict
from clmae_jax.models.geometry import params_geometry

__all__ = ["load_pretrained", "load_torch_weights", "mae_for_geometry", "params_geometry", "save_classifier_fbmae",
           "save_classifier_hf", "save_fbmae", "save_hf", "to_fbmae_state_dict"]
