"""V-scale math: pure PyTorch, no Hugging Face, no DeepSpeed."""

from vscale_plugin.ops.fused import compiled_vscale_values
from vscale_plugin.ops.vscale import (
    KERNELS,
    MODES,
    Kernel,
    Mode,
    VScale,
    backward_only_values,
    phi,
    vscale_constant,
    vscale_values,
)

__all__ = [
    "KERNELS",
    "MODES",
    "Kernel",
    "Mode",
    "VScale",
    "backward_only_values",
    "compiled_vscale_values",
    "phi",
    "vscale_constant",
    "vscale_values",
]
