"""YaRN (Peng et al. 2023) at evaluation time: contexts beyond a model's native length (SPEC section 7).

The paper evaluates needle in a haystack past the training context by switching the trained model's RoPE to YaRN
with ``factor`` F and ``original_max_position_embeddings`` = the native length, without fine-tuning. Hugging Face
computes the rotary frequencies (and YaRN's attention factor, 0.1 ln F + 1) once, when it builds the rotary-embedding
module, so changing the config of a live model is not enough: :func:`yarn` changes the config, rebuilds those
modules from it, and puts the original modules and config back on exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

_MISSING = object()


def max_context(model: nn.Module) -> int:
    """The model's native positions: ``config.max_position_embeddings``."""
    return int(model.config.max_position_embeddings)


def _rotary_slots(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every rotary-embedding module; a module shared by several parents once per
    parent, so that each reference is swapped."""
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent._modules.items()
        if child is not None and type(child).__name__.endswith("RotaryEmbedding")
    ]


def _yarn_fields(config: Any, factor: float, native: int) -> dict[str, Any]:
    """The config attributes that turn ``config``'s plain RoPE into YaRN, for the installed transformers."""
    rope = _MISSING
    if isinstance(getattr(config, "rope_parameters", None), dict):
        # transformers 5: one dict with rope_type and rope_theta (nested per layer type for some models).
        field, rope = "rope_parameters", config.rope_parameters
    elif hasattr(config, "rope_scaling"):
        # transformers 4: rope_scaling (None for plain RoPE) next to config.rope_theta.
        field, rope = "rope_scaling", config.rope_scaling or {"rope_type": "default"}
    if not isinstance(rope, dict) or ("rope_type" not in rope and "type" not in rope):
        raise ValueError(
            f"{type(config).__name__}: no single RoPE setting to extend with YaRN (rope parameters {rope!r}); "
            "YaRN applies to models with one global RoPE"
        )
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type != "default":
        raise ValueError(
            f"{type(config).__name__} already scales RoPE ({rope_type!r}); YaRN here extends plain RoPE only"
        )
    scaled = {**rope, "rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": int(native)}
    scaled.pop("type", None)
    # Positions up to F x native; transformers 4.x from about 4.50 also derives YaRN's factor as this / native.
    return {field: scaled, "max_position_embeddings": int(factor * native)}


def _rebuild(module: nn.Module, config: Any) -> nn.Module:
    """A new module of ``module``'s class from ``config``, on its device, with its buffers' dtypes."""
    new = type(module)(config)
    old_buffers = dict(module.named_buffers())
    fallback = next(iter(old_buffers.values()), None)
    for full, buffer in list(new.named_buffers()):
        owner_path, _, name = full.rpartition(".")
        like = old_buffers.get(full, fallback)
        if like is not None:
            dtype = like.dtype if buffer.is_floating_point() else buffer.dtype
            new.get_submodule(owner_path)._buffers[name] = buffer.to(device=like.device, dtype=dtype)
    return new.train(module.training)


@contextmanager
def yarn(model: nn.Module, factor: float, native: int) -> Iterator[nn.Module]:
    """Within the block, ``model`` uses YaRN with ``factor`` over ``native`` positions (for ``factor * native``).

    Sets ``rope_type`` "yarn", ``factor`` and ``original_max_position_embeddings = native`` in the config field the
    installed transformers reads (``rope_parameters`` in 5.x, ``rope_scaling`` in 4.x), raises
    ``max_position_embeddings`` to ``factor * native``, and rebuilds every module whose class name ends in
    "RotaryEmbedding" from that config (same device, buffer dtypes and mode). On exit the original modules and
    config attributes come back, so ``config.to_dict()`` and the outputs are those before. In transformers 4.x
    before about 4.50, YaRN's ramp is computed over ``max_position_embeddings`` rather than ``native``.

    Raises ValueError for ``factor <= 1``, ``native < 1``, a model without rotary-embedding modules, or one whose
    RoPE is already scaled.
    """
    if not factor > 1:
        raise ValueError(f"YaRN factor must be greater than 1, got {factor}; use the model as is for its native length")
    if native < 1:
        raise ValueError(f"YaRN native length must be positive, got {native}")
    slots = _rotary_slots(model)
    if not slots:
        raise ValueError(f"{type(model).__name__} has no RotaryEmbedding module; YaRN applies to RoPE models")
    configs = {id(c): c for c in (getattr(module, "config", model.config) for _, _, module in slots)}
    changes = {key: _yarn_fields(config, factor, native) for key, config in configs.items()}
    saved = {key: {f: vars(configs[key]).get(f, _MISSING) for f in fields} for key, fields in changes.items()}
    try:
        for key, fields in changes.items():
            for field, value in fields.items():
                setattr(configs[key], field, value)
        rebuilt: dict[int, nn.Module] = {}
        for parent, name, module in slots:
            if id(module) not in rebuilt:
                rebuilt[id(module)] = _rebuild(module, getattr(module, "config", model.config))
            setattr(parent, name, rebuilt[id(module)])
        yield model
    finally:
        for parent, name, module in slots:
            setattr(parent, name, module)
        for key, fields in saved.items():
            for field, value in fields.items():
                if value is _MISSING:
                    vars(configs[key]).pop(field, None)
                else:
                    setattr(configs[key], field, value)
