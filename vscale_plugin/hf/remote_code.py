"""V-scale checkpoints that plain transformers loads V-scaled: ``AutoModelForCausalLM.from_pretrained(d,
trust_remote_code=True)``, and so lm-eval's ``--model hf --model_args pretrained=d,trust_remote_code=True``, in a
process where vscale_plugin is not even installed.

``save_pretrained`` of a V-scaled model writes ``modeling_vscale.py`` beside its config.json and points the config's
``auto_map`` at it. The file imports only torch and transformers and defines ``VScale<Base>``
(``VScaleLlamaForCausalLM``, ...), the architecture's own causal-LM class whose constructor applies V-scale from
``config.vscale`` as :func:`~vscale_plugin.hf.patch.apply_vscale` does: the same ``vscale`` submodules, state-dict keys
and hook on the value projection. Its math is ops/vscale.py's functions, copied by source when the file is rendered, so
the two cannot drift.
``transformers`` itself copies the file again whenever such a model is saved.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from torch import nn

from vscale_plugin.hf.registry import architecture_of
from vscale_plugin.ops import vscale as ops

MODULE = "modeling_vscale"
AUTO_CLASS = "AutoModelForCausalLM"

_TEMPLATE = '''"""V-scale (arXiv 2603.17771) on {base}, written by vscale-plugin: needs only torch and transformers.

AutoModelForCausalLM.from_pretrained(this_directory, trust_remote_code=True) builds {cls}, a {base} with
V-scale applied from config.vscale; with vscale-plugin installed, vscale_plugin.from_pretrained(this_directory)
builds the same model as a plain {base}.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import {base}

MODES = {modes!r}
DEFAULT_SIGMA = {sigma!r}
_R_MAX = {r_max!r}
_C_MIN = {c_min!r}
LAYERS = {layers!r}  # the decoder layers, relative to model.base_model
ATTENTION = {attention!r}  # the attention, relative to a decoder layer
VALUE = {value!r}  # the value projection, relative to the attention


{math}

class VScale(nn.Module):
    """V-scale of one attention layer on the value projection's output (..., kv_heads * head_dim); theta per KV head,
    a parameter in mode "learned", a buffer at 0 in modes "fixed" and "backward"."""

    def __init__(self, num_kv_heads, head_dim, hidden_size, mode, sigma, device=None, dtype=None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"V-scale mode {{mode!r}} is not one of {{', '.join(MODES)}}")
        self.num_kv_heads, self.head_dim, self.hidden_size = num_kv_heads, head_dim, hidden_size
        self.mode, self.sigma = mode, float(sigma)
        self.c_base = vscale_constant(hidden_size, head_dim, self.sigma)
        theta = torch.zeros(num_kv_heads, device=device, dtype=dtype)
        if mode == "learned":
            self.theta = nn.Parameter(theta)
        else:
            self.register_buffer("theta", theta)

    def reset_parameters(self):
        with torch.no_grad():
            self.theta.zero_()

    def constant(self):
        lam = self.theta.to(torch.promote_types(self.theta.dtype, torch.float32)).exp()
        return (self.c_base * lam).unsqueeze(-1)

    def forward(self, v):
        heads = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        scaled = vscale_values(heads, self.constant())
        if self.mode == "backward":
            scaled = backward_only_values(heads, scaled)
        return scaled.flatten(-2)

    def extra_repr(self):
        return (
            f"mode={{self.mode}}, kv_heads={{self.num_kv_heads}}, head_dim={{self.head_dim}}, "
            f"hidden_size={{self.hidden_size}}, sigma={{self.sigma}}"
        )


class ValueHook:
    """Forward hook on the value projection: V-scale of its output (an object, so deepcopy re-binds it)."""

    def __init__(self, vscale):
        self.vscale = vscale

    def __call__(self, module, args, output):
        return self.vscale(output)


class ValueGuard:
    """Forward pre-hook on the attention: a value projection replaced after loading (DeepSpeed AutoTP swaps in its own
    layer) has lost V-scale's hook, and the model would run without V-scale; an error instead."""

    def __init__(self, hooked):
        self.hooked = hooked

    def __call__(self, attention, args):
        if attention.get_submodule(VALUE) is not self.hooked:
            raise RuntimeError(
                f"V-scale: {{type(attention).__name__}}.{{VALUE}} was replaced after loading (DeepSpeed AutoTP does "
                "this), and the V-scale of this self-contained file does not follow it; load the model with "
                "vscale_plugin.from_pretrained, whose V-scale follows AutoTP"
            )


def apply_vscale(model, settings):
    """V-scale on every attention layer of ``model``, from config.vscale = {{"mode": ..., "sigma": ...}}."""
    if not isinstance(settings, dict) or settings.get("mode") not in MODES:
        raise ValueError(f"config.vscale = {{settings!r}} is not a V-scale setting; expected {{{{'mode': one of "
                         f"{{MODES}}, 'sigma': float}}}}")
    config = model.config
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    for block in model.base_model.get_submodule(LAYERS):
        attn = block.get_submodule(ATTENTION)
        v_proj = attn.get_submodule(VALUE)
        head_dim = (getattr(attn, "head_dim", None) or getattr(config, "head_dim", None)
                    or config.hidden_size // config.num_attention_heads)
        vscale = VScale(num_kv_heads, head_dim, config.hidden_size, settings["mode"],
                        settings.get("sigma", DEFAULT_SIGMA), v_proj.weight.device, v_proj.weight.dtype)
        attn.add_module("vscale", vscale)
        v_proj.register_forward_hook(ValueHook(vscale))
        attn.register_forward_pre_hook(ValueGuard(v_proj))
    return model


class {cls}({base}):
    _auto_class = "{auto_class}"  # so that save_pretrained copies this file and keeps config.auto_map

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_vscale(self, config.vscale)
'''

# What the rendered file computes, taken verbatim from ops/vscale.py.
_MATH = (ops.vscale_constant, ops.phi, ops.vscale_values, ops.backward_only_values)


def transformers_base(model: nn.Module) -> type:
    """The transformers class ``model`` is (or derives from): what the rendered file subclasses."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers.models."):
            return cls
    raise TypeError(f"{type(model).__name__} is not a transformers model class; V-scale checkpoints need one")


def remote_class_name(model: nn.Module) -> str:
    """``VScale<Base>``, e.g. ``VScaleLlamaForCausalLM``."""
    return f"VScale{transformers_base(model).__name__}"


def render(model: nn.Module) -> str:
    """The source of ``modeling_vscale.py`` for ``model``'s architecture."""
    arch = architecture_of(model)
    return _TEMPLATE.format(
        base=transformers_base(model).__name__,
        cls=remote_class_name(model),
        auto_class=AUTO_CLASS,
        modes=tuple(ops.MODES),
        sigma=ops.DEFAULT_SIGMA,
        r_max=ops._R_MAX,
        c_min=ops._C_MIN,
        layers=arch.layers,
        attention=arch.attention,
        value=arch.projections[2],
        math="\n\n".join(inspect.getsource(f) for f in _MATH),
    )


class SaveWithRemoteCode:
    """``save_pretrained`` of a V-scaled instance (``apply_vscale`` sets it on the instance, ``remove_vscale`` deletes
    it): the class's own ``save_pretrained`` with ``config.auto_map`` pointing at ``modeling_vscale.py``, then that
    file. The config in memory is left as it was. An object holding its model, so that ``copy.deepcopy`` of the model
    re-binds it to the copy."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:
        model, config = self.model, self.model.config
        is_main_process = args[0] if args else kwargs.get("is_main_process", True)
        had_auto_map = "auto_map" in vars(config)
        previous = getattr(config, "auto_map", None)
        config.auto_map = {**(previous or {}), AUTO_CLASS: f"{MODULE}.{remote_class_name(model)}"}
        try:
            result = type(model).save_pretrained(model, save_directory, *args, **kwargs)
        finally:
            if had_auto_map:
                config.auto_map = previous
            else:
                del config.auto_map
        if is_main_process:
            (Path(save_directory) / f"{MODULE}.py").write_text(render(model))
        return result
