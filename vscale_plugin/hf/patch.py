"""One-call V-scale for Hugging Face decoders: ``apply_vscale``, ``remove_vscale``, ``is_vscaled``, ``from_pretrained``,
``set_vscale_kernel``.

Each attention layer gets a :class:`~vscale_plugin.ops.VScale` submodule named ``vscale`` and a forward hook on
``v_proj`` that passes the projection's output through it. Values are therefore scaled per KV head, before the
KV cache and whichever attention kernel the model uses (eager, sdpa, flash, flex): the attention code
itself is never replaced. Original state-dict keys are untouched; every mode adds ``...self_attn.vscale.theta`` (a
parameter in learned mode, a buffer frozen at 0 in fixed and backward mode). ``save_pretrained`` of a V-scaled instance
also writes the code that loads it V-scaled in plain transformers (``trust_remote_code=True``; see ``remote_code.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vscale_plugin.hf.registry import architecture_of, attention_layers, value_projection
from vscale_plugin.hf.remote_code import SaveWithRemoteCode
from vscale_plugin.hf.tensor_parallel import head_shard
from vscale_plugin.ops.vscale import DEFAULT_SIGMA, MODES, HeadShard, Kernel, Mode, VScale, check_kernel

CONFIG_KEY = "vscale"


class ValueHook:
    """Forward hook on ``v_proj``: returns V-scale of its output.

    A small object rather than a closure so that ``copy.deepcopy`` of the model re-binds it to the copied
    ``VScale`` (a closure would keep pointing at the original module).
    """

    def __init__(self, vscale: VScale, shard: HeadShard | None = None) -> None:
        self.vscale = vscale
        self.shard = shard  # a tensor-parallel rank's KV heads (hf/tensor_parallel.py); None: all of them

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.vscale(output, self.shard)


class ValueProjectionGuard:
    """Forward pre-hook on the attention module: keeps V-scale on ``v_proj`` when DeepSpeed AutoTP replaces that
    module after :func:`apply_vscale` (``deepspeed.initialize`` swaps in its column-parallel layer, without our
    hook). One identity check per forward while nothing changes."""

    def __init__(self, vscale: VScale, path: str, hooked: nn.Module) -> None:
        self.vscale = vscale
        self.path = path
        self.hooked = hooked

    def __call__(self, attention: nn.Module, args: tuple) -> None:
        v_proj = attention.get_submodule(self.path)
        if v_proj is self.hooked:
            return
        shard = head_shard(v_proj, self.vscale)
        if shard is not None and not any(isinstance(h, ValueHook) for h in v_proj._forward_hooks.values()):
            v_proj.register_forward_hook(ValueHook(self.vscale, shard))
        self.hooked = v_proj


def _refuse_deepspeed_engine(model: nn.Module, action: str) -> None:
    # deepspeed.initialize has already built the optimizer from the module's parameters: a theta added or removed
    # now would silently never be trained. The engine marks its module with a forward pre-hook of its own.
    engine_hooked = any(
        getattr(hook, "__qualname__", "").startswith("DeepSpeedEngine.") for hook in model._forward_pre_hooks.values()
    )
    if engine_hooked or type(model).__name__ == "DeepSpeedEngine":
        raise RuntimeError(
            f"cannot {action} V-scale on a model already wrapped by deepspeed.initialize: its optimizer would not see "
            "theta. Call vscale_plugin.apply_vscale(model) before deepspeed.initialize(model=model, ...)."
        )


def is_vscaled(model: nn.Module) -> bool:
    """True when V-scale is applied to ``model``."""
    return any(isinstance(getattr(m, CONFIG_KEY, None), VScale) for m in model.modules())


def apply_vscale(
    model: nn.Module, mode: Mode = "learned", sigma: float = DEFAULT_SIGMA, kernel: Kernel = "eager"
) -> nn.Module:
    """Apply V-scale to every attention layer of ``model`` in place and return it.

    ``mode``: "learned" (the paper's choice: lambda = exp(theta), theta trained), "fixed" (lambda = 1) or "backward"
    (the paper's backward-only ablation: the forward pass is the unpatched model's, bit for bit, and the backward pass
    has fixed mode's V-scale Jacobian; SPEC 1). ``config.vscale`` records ``{"mode": mode, "sigma": sigma}``.

    Idempotent for the same ``mode`` and ``sigma``; applying them again with another ``kernel`` only switches the
    kernel (see :func:`set_vscale_kernel`). Call it before ``deepspeed.initialize`` so that theta reaches the
    optimizer; under ``deepspeed.zero.Init`` the new theta is partitioned by ``deepspeed.initialize``.
    """
    if mode not in MODES:
        raise ValueError(f"V-scale mode {mode!r} is not one of {', '.join(MODES)}")
    check_kernel(kernel)
    _refuse_deepspeed_engine(model, "apply")
    architecture_of(model)
    config = model.config
    wanted = {"mode": mode, "sigma": float(sigma)}
    if is_vscaled(model):
        if getattr(config, CONFIG_KEY, None) == wanted:
            return set_vscale_kernel(model, kernel)
        raise ValueError(
            f"model already has V-scale {getattr(config, CONFIG_KEY, None)}; call vscale_plugin.remove_vscale(model) "
            f"before applying {wanted}"
        )
    if any(hasattr(attn, CONFIG_KEY) for attn in attention_layers(model)):
        raise ValueError(
            f"{type(model).__name__} already has V-scale of its own (loaded with trust_remote_code=True?); load the "
            "checkpoint with vscale_plugin.from_pretrained(path) to use it with vscale_plugin"
        )
    head_dim_default = config.hidden_size // config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    for attn in attention_layers(model):
        v_proj = value_projection(model, attn)
        weight = v_proj.weight
        vscale = VScale(
            num_kv_heads=num_kv_heads,
            head_dim=getattr(attn, "head_dim", None) or getattr(config, "head_dim", None) or head_dim_default,
            hidden_size=config.hidden_size,
            mode=mode,
            sigma=sigma,
            device=weight.device,
            dtype=weight.dtype,
            kernel=kernel,
        )
        attn.add_module(CONFIG_KEY, vscale)
        v_proj.register_forward_hook(ValueHook(vscale))
        attn.register_forward_pre_hook(ValueProjectionGuard(vscale, architecture_of(model).projections[2], v_proj))
    setattr(config, CONFIG_KEY, wanted)
    if hasattr(type(model), "save_pretrained"):
        # Its checkpoints then load V-scaled with plain transformers too (trust_remote_code=True; hf/remote_code.py).
        model.save_pretrained = SaveWithRemoteCode(model)
    return model


def set_vscale_kernel(model: nn.Module, kernel: Kernel) -> nn.Module:
    """Compute V-scale in ``model`` with ``kernel``: "eager" (the reference, default) or "compiled" (fused by
    ``torch.compile``; falls back to eager with one warning where it cannot compile). Returns ``model``.

    A runtime choice, never saved: the state dict and ``config.json`` stay the same and results agree up to float
    rounding. No parameter is added or removed, so it may be called at any time, also after ``deepspeed.initialize``.
    """
    check_kernel(kernel)
    modules = [m for m in model.modules() if isinstance(m, VScale)]
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no V-scale, so there is no kernel to set; "
            f"call vscale_plugin.apply_vscale(model, kernel={kernel!r}) instead"
        )
    for module in modules:
        module.kernel = kernel
    return model


def remove_vscale(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_vscale` in place: the model computes exactly what it computed before being patched."""
    _refuse_deepspeed_engine(model, "remove")
    if is_vscaled(model):
        for attn in attention_layers(model):
            v_proj = value_projection(model, attn)
            for key in [k for k, hook in v_proj._forward_hooks.items() if isinstance(hook, ValueHook)]:
                del v_proj._forward_hooks[key]
            for key in [k for k, hook in attn._forward_pre_hooks.items() if isinstance(hook, ValueProjectionGuard)]:
                del attn._forward_pre_hooks[key]
            del attn._modules[CONFIG_KEY]
        if isinstance(vars(model).get("save_pretrained"), SaveWithRemoteCode):
            del model.save_pretrained
    if hasattr(model, "config"):
        setattr(model.config, CONFIG_KEY, None)
    return model


def vscale_settings(config: Any) -> dict | None:
    """The ``{"mode", "sigma"}`` entry a V-scale checkpoint's config carries, validated; None when absent."""
    settings = getattr(config, CONFIG_KEY, None)
    if not settings:
        return None
    if not isinstance(settings, dict) or settings.get("mode") not in MODES:
        raise ValueError(
            f"config.vscale = {settings!r} is not a V-scale setting; "
            f"expected {{'mode': one of {MODES}, 'sigma': float}}"
        )
    return {"mode": settings["mode"], "sigma": float(settings.get("sigma", DEFAULT_SIGMA))}


def _with_vscale_at_init(base: type) -> type:
    """``base`` whose constructor applies V-scale from ``config.vscale``, so that theta exists (on the meta device,
    under ZeRO-3's ``zero.Init``, wherever transformers builds the model) before the checkpoint is loaded into it."""

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        apply_vscale(self, **vscale_settings(config))

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})


def from_pretrained(pretrained_model_name_or_path: str, *model_args: Any, **hf_kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` that restores V-scale (mode, sigma and theta) when the checkpoint's
    config has a ``vscale`` entry. Without it, this is exactly ``AutoModelForCausalLM.from_pretrained``.

    It returns the plain transformers class; ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``
    builds the same model as a ``VScale<Base>`` subclass without vscale_plugin, plain loading without it drops theta.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = hf_kwargs.pop("config", None)
    if config is None:
        config_kwargs = {
            k: hf_kwargs[k]
            for k in ("cache_dir", "revision", "token", "local_files_only", "trust_remote_code", "subfolder")
            if k in hf_kwargs
        }
        config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **config_kwargs)
    settings = vscale_settings(config)
    if settings is None:
        return AutoModelForCausalLM.from_pretrained(
            pretrained_model_name_or_path, *model_args, config=config, **hf_kwargs
        )

    base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    wants_info = hf_kwargs.pop("output_loading_info", False)
    model, info = _with_vscale_at_init(base).from_pretrained(
        pretrained_model_name_or_path, *model_args, config=config, output_loading_info=True, **hf_kwargs
    )
    model.__class__ = base  # a plain transformers model again, V-scale applied on the instance
    missing = [k for k in info.get("missing_keys", []) if f".{CONFIG_KEY}." in k]
    if missing:
        raise ValueError(
            f"{pretrained_model_name_or_path}: config.json declares V-scale {settings} but the weights lack "
            f"{len(missing)} V-scale tensors (e.g. {missing[0]}); the checkpoint is incomplete. Save it again with "
            "model.save_pretrained() from a V-scaled model."
        )
    return (model, info) if wants_info else model
