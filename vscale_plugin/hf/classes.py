"""The before-load door: ``patch_model_classes`` makes transformers' causal-LM classes build V-scaled models.

:func:`~vscale_plugin.hf.patch.apply_vscale` patches a live model; this patches the classes, as Liger-Kernel's
``apply_liger_kernel_to_llama()`` does, for code that builds the model itself (``AutoModelForCausalLM.from_config``
or ``from_pretrained``, ``LlamaForCausalLM(config)``, TRL's ``SFTTrainer(model="name")``). The ``*ForCausalLM``
class of each registry architecture gets an ``__init__`` that runs the original and then ``apply_vscale``, so
theta exists wherever transformers builds the model (the meta device, ``deepspeed.zero.Init`` under ZeRO-3's
``HfDeepSpeedConfig``) before any checkpoint is loaded into it. The family's ``*PreTrainedModel`` gets an
``_init_weights`` that sets theta to 0 where a checkpoint has none. Nothing else in transformers is touched, and
:func:`unpatch_model_classes` puts each class's own attributes back exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vscale_plugin.hf.patch import CONFIG_KEY, apply_vscale, vscale_settings
from vscale_plugin.hf.registry import REGISTRY
from vscale_plugin.ops.vscale import DEFAULT_SIGMA, MODES, Mode, VScale

_MISSING = object()
# A plain checkpoint has no theta: it is initialised (to 0), which transformers must not report as missing.
_THETA_PATTERN = rf"\.{CONFIG_KEY}\.theta$"


@dataclass(frozen=True)
class _Patch:
    mode: str
    sigma: float
    model_types: tuple[str, ...]
    originals: dict[type, dict[str, Any]]  # class -> its own __dict__ entry per patched attribute, or _MISSING


_active: _Patch | None = None


def causal_lm_class(model_type: str) -> type:
    """transformers' ``*ForCausalLM`` class of ``model_type`` (what ``AutoModelForCausalLM`` builds for it)."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[model_type]]


def _pretrained_base(cls: type) -> type:
    """The family's ``*PreTrainedModel`` class: transformers initialises each sub-model (the causal LM and its
    ``*Model``, where the attention layers and theta live) with its own ``_init_weights``, which both inherit."""
    from transformers import PreTrainedModel

    return [c for c in cls.__mro__ if issubclass(c, PreTrainedModel) and c is not PreTrainedModel][-1]


def _patched_init(original_init, mode: str, sigma: float):
    @functools.wraps(original_init)
    def __init__(self, config, *args, **kwargs):
        original_init(self, config, *args, **kwargs)
        # A V-scale checkpoint's own settings win: its theta was trained (or frozen) in that mode.
        settings = vscale_settings(config)
        apply_vscale(self, **(settings or {"mode": mode, "sigma": sigma}))
        if settings is None:
            self._keys_to_ignore_on_load_missing = {*(self._keys_to_ignore_on_load_missing or ()), _THETA_PATTERN}

    return __init__


def _patched_init_weights(original_init_weights):
    from transformers import initialization

    @functools.wraps(original_init_weights)
    def _init_weights(self, module):
        if isinstance(module, VScale):
            initialization.zeros_(module.theta)  # skips a theta the checkpoint loaded
        else:
            original_init_weights(self, module)

    return _init_weights


class ClassPatch:
    """What :func:`patch_model_classes` returns: ``with`` it to unpatch on leaving the block."""

    def __init__(self, patch: _Patch, owner: bool) -> None:
        self.mode, self.sigma, self.model_types = patch.mode, patch.sigma, patch.model_types
        self._owner = owner  # False for an idempotent repeat, which must not undo the first call's patch on exit

    def __enter__(self) -> ClassPatch:
        return self

    def __exit__(self, *exc) -> None:
        if self._owner:
            unpatch_model_classes()


def patch_model_classes(
    mode: Mode = "learned", sigma: float = DEFAULT_SIGMA, model_types: Iterable[str] | None = None
) -> ClassPatch:
    """Make every model built afterwards from the registry's architectures (all, or only ``model_types``) come out
    V-scaled, as :func:`~vscale_plugin.hf.patch.apply_vscale` ``(model, mode, sigma)`` would make it.

    Two ways to use it, with one undo::

        vsp.patch_model_classes(mode="learned")      # until vsp.unpatch_model_classes()
        with vsp.patch_model_classes(mode="learned"):
            model = AutoModelForCausalLM.from_pretrained(name)   # V-scaled; classes plain again after the block

    A plain checkpoint loads with theta = 0 (the paper's initialisation) and no missing-key report; a V-scale
    checkpoint (``config.vscale`` set) loads its own mode, sigma and theta, whatever ``mode`` says here. Under
    ZeRO-3 (``HfDeepSpeedConfig`` or ``deepspeed.zero.Init``) theta is created inside ``zero.Init`` and partitioned
    like every other parameter. Models built this way save, load (:func:`vscale_plugin.from_pretrained`) and
    ``remove_vscale`` like any other V-scaled model. Models built before the call stay as they are.

    Idempotent for the same settings; other settings while patched are a ``ValueError`` (call
    :func:`unpatch_model_classes` first).
    """
    global _active
    if mode not in MODES:
        raise ValueError(f"V-scale mode {mode!r} is not one of {', '.join(MODES)}")
    if not sigma > 0:
        raise ValueError(f"V-scale sigma must be > 0 (the init std, 0.02 by default); got {sigma!r}")
    types = tuple(sorted(REGISTRY if model_types is None else set(model_types)))
    unknown = [t for t in types if t not in REGISTRY]
    if unknown or not types:
        raise ValueError(
            f"patch_model_classes(model_types={model_types!r}): {', '.join(map(repr, unknown)) or 'none given'}; "
            f"V-scale supports {', '.join(sorted(REGISTRY))}"
        )
    if _active is not None:
        if (_active.mode, _active.sigma, _active.model_types) == (mode, float(sigma), types):
            return ClassPatch(_active, owner=False)
        raise ValueError(
            f"model classes are already patched with V-scale mode={_active.mode!r}, sigma={_active.sigma}, "
            f"model_types={list(_active.model_types)}; call vscale_plugin.unpatch_model_classes() before patching "
            f"them with mode={mode!r}, sigma={float(sigma)}, model_types={list(types)}"
        )
    originals: dict[type, dict[str, Any]] = {}
    for model_type in types:
        cls = causal_lm_class(model_type)
        family = _pretrained_base(cls)
        originals[cls] = {"__init__": cls.__dict__.get("__init__", _MISSING)}
        originals[family] = {"_init_weights": family.__dict__.get("_init_weights", _MISSING)}
        cls.__init__ = _patched_init(cls.__init__, mode, float(sigma))
        family._init_weights = _patched_init_weights(family._init_weights)
    _active = _Patch(mode, float(sigma), types, originals)
    return ClassPatch(_active, owner=True)


def unpatch_model_classes() -> None:
    """Undo :func:`patch_model_classes`: every class it patched has its own attributes back, the very objects it had
    before. Models built while patched stay V-scaled (``remove_vscale`` them). A no-op when nothing is patched."""
    global _active
    if _active is None:
        return
    for cls, attributes in _active.originals.items():
        for name, original in attributes.items():
            if original is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, original)
    _active = None


def patched_model_classes() -> dict[str, Any] | None:
    """The active class patch as ``{"mode", "sigma", "model_types"}``, None when the classes are plain."""
    if _active is None:
        return None
    return {"mode": _active.mode, "sigma": _active.sigma, "model_types": list(_active.model_types)}
