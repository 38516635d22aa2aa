"""V-scale math: pure PyTorch, no Hugging Face, no DeepSpeed."""

from vscale_plugin.ops.vscale import MODES, VScale, phi, vscale_constant, vscale_values

__all__ = ["MODES", "VScale", "phi", "vscale_constant", "vscale_values"]
