"""Hugging Face integration: patch decoders with V-scale (knows nothing of DeepSpeed or MLflow)."""

from vscale_plugin.hf.classes import patch_model_classes, unpatch_model_classes
from vscale_plugin.hf.decay import decay_parameter_groups, no_decay_parameter_names
from vscale_plugin.hf.patch import apply_vscale, from_pretrained, is_vscaled, remove_vscale, set_vscale_kernel
from vscale_plugin.hf.registry import REGISTRY, Architecture, attention_layers

__all__ = [
    "REGISTRY",
    "Architecture",
    "apply_vscale",
    "attention_layers",
    "decay_parameter_groups",
    "from_pretrained",
    "is_vscaled",
    "no_decay_parameter_names",
    "patch_model_classes",
    "remove_vscale",
    "set_vscale_kernel",
    "unpatch_model_classes",
]
