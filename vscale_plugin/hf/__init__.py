"""Hugging Face integration: patch decoders with V-scale (knows nothing of DeepSpeed or MLflow)."""

from vscale_plugin.hf.patch import apply_vscale, from_pretrained, is_vscaled, remove_vscale, set_vscale_kernel
from vscale_plugin.hf.registry import REGISTRY, Architecture, attention_layers

__all__ = [
    "REGISTRY",
    "Architecture",
    "apply_vscale",
    "attention_layers",
    "from_pretrained",
    "is_vscaled",
    "remove_vscale",
    "set_vscale_kernel",
]
