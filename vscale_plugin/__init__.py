"""vscale-plugin: V-scale and gradient-sink measurements for Hugging Face models trained with DeepSpeed.

import vscale_plugin as vsp
vsp.apply_vscale(model)          # arXiv 2603.17771, SPEC section 1
"""

from vscale_plugin.hf import (
    REGISTRY,
    apply_vscale,
    decay_parameter_groups,
    from_pretrained,
    is_vscaled,
    no_decay_parameter_names,
    patch_model_classes,
    remove_vscale,
    set_vscale_kernel,
    unpatch_model_classes,
)
from vscale_plugin.ops import VScale, phi, vscale_constant, vscale_values
from vscale_plugin.stats import StatsCollector, measure

__version__ = "0.1.0"

__all__ = [
    "REGISTRY",
    "StatsCollector",
    "VScale",
    "__version__",
    "apply_vscale",
    "decay_parameter_groups",
    "from_pretrained",
    "is_vscaled",
    "measure",
    "no_decay_parameter_names",
    "patch_model_classes",
    "phi",
    "remove_vscale",
    "set_vscale_kernel",
    "unpatch_model_classes",
    "vscale_constant",
    "vscale_values",
]
