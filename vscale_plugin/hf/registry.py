"""Which Hugging Face decoders V-scale can patch, keyed by ``config.model_type``.

V-scale acts on the output of ``v_proj`` before any reshaping, so an architecture qualifies when its
attention computes values with a separate ``v_proj`` and hands them, untouched, to the KV cache and the
attention kernel. Each entry below is exercised by ``tests/test_hf_patch.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Architecture:
    """Where the attention layers of one model family live, relative to ``model.base_model``."""

    model_type: str
    family: str
    note: str = ""
    layers: str = "layers"
    attention: str = "self_attn"
    value_proj: str = "v_proj"


_ARCHITECTURES = [
    Architecture("llama", "Llama 2/3, TinyLlama, the paper's presets"),
    Architecture("mistral", "Mistral"),
    Architecture("ministral", "Ministral"),
    Architecture("mixtral", "Mixtral (MoE)"),
    Architecture("qwen2", "Qwen2, Qwen2.5", "q/k/v biases"),
    Architecture("qwen2_moe", "Qwen2-MoE", "q/k/v biases"),
    Architecture("qwen3", "Qwen3", "q/k norms"),
    Architecture("qwen3_moe", "Qwen3-MoE", "q/k norms"),
    Architecture("gemma", "Gemma"),
    Architecture("gemma2", "Gemma 2", "soft-capping, sliding window"),
    Architecture("granite", "Granite"),
    Architecture("glm", "GLM"),
    Architecture("glm4", "GLM-4", "partial rotary"),
    Architecture("olmo2", "OLMo 2", "q/k norms"),
    Architecture("starcoder2", "StarCoder2", "biases"),
    Architecture("smollm3", "SmolLM3", "NoPE layers"),
    Architecture("helium", "Helium"),
]

REGISTRY: dict[str, Architecture] = {arch.model_type: arch for arch in _ARCHITECTURES}


def architecture_of(model: nn.Module) -> Architecture:
    """The registry entry for ``model.config.model_type``; a clear error for anything else."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise TypeError(
            f"V-scale patches Hugging Face decoder models (with a .config.model_type); got {type(model).__name__}"
        )
    if model_type not in REGISTRY:
        raise NotImplementedError(
            f"V-scale does not support model_type {model_type!r} yet; supported: {', '.join(sorted(REGISTRY))}. "
            "An architecture qualifies when its attention has a separate v_proj whose output goes straight "
            "to the KV cache (see vscale_plugin/hf/registry.py)."
        )
    return REGISTRY[model_type]


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The attention module of every decoder layer, in order."""
    arch = architecture_of(model)
    layers = getattr(model.base_model, arch.layers)
    return [getattr(layer, arch.attention) for layer in layers]
