"""One record per Hugging Face decoder family, keyed by ``config.model_type``: everything the patch and the statistics
need to know about an architecture, and nothing anywhere else.

V-scale acts on the output of ``v_proj`` before any reshaping, so an architecture qualifies for patching when its
attention computes values with a separate ``v_proj`` and hands them, untouched, to the KV cache and the attention
kernel (``phi3``'s fused ``qkv_proj`` and ``olmo``'s value clipping do not). The statistics (SPEC section 2) also need
the layer's layout: where the input norm, the MLP's norm and the two branches are, what each branch adds to the
residual stream, and how the attention kernel's queries, keys and scores are formed. Each entry is exercised by
``tests/test_hf_patch.py`` and, where it declares statistics, against the independent reference of
``tests/stats_reference.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

RopeStyle = Literal["half", "interleaved"]
WindowSource = Literal["layer_types", "config"]


@dataclass(frozen=True)
class Architecture:
    """Where one model family keeps its parts and how it combines them. Module paths are relative to a decoder layer
    (``model.base_model.<layers>[i]``) unless said otherwise."""

    model_type: str
    family: str
    note: str = ""
    layers: str = "layers"  # relative to model.base_model
    attention: str = "self_attn"
    projections: tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj", "o_proj")  # relative to the attention
    input_norm: str | None = "input_layernorm"  # its output is h̃, the attention's input
    mlp_norm: str | None = "post_attention_layernorm"  # its input is h_half, its output h̃_half (the MLP's input)
    mlp: str = "mlp"
    # The modules whose output each branch adds to the residual stream: the attention's o_proj, or a sandwich norm
    # after it (GLM-4, Gemma 2); the MLP, or a sandwich norm after it.
    attn_increment: str = "self_attn.o_proj"
    mlp_increment: str = "mlp"
    branch_multiplier: str | None = None  # config attribute scaling both increments before the add (Granite)
    # How the attention kernel's queries and keys come from the q_proj / k_proj outputs:
    qk_norm: bool = False  # queries and keys pass attention.q_norm / k_norm (per head or whole) before RoPE
    rope: RopeStyle = "half"  # rotate_half pairs (i, i + d/2), or interleaved pairs (2i, 2i + 1)
    rope_flag: str | None = None  # attention attribute that is false on layers without RoPE (SmolLM3's NoPE layers)
    # The attention scores: scale from the attention's `scaling`, optional tanh soft-capping, sliding windows.
    softcap: str | None = None  # config attribute: scores -> cap * tanh(scores / cap)
    window: WindowSource | None = None  # per layer from config.layer_types, or config.sliding_window on every layer
    no_statistics: str | None = None  # why the statistics are refused, None where they are supported

    @property
    def has_statistics(self) -> bool:
        return self.no_statistics is None


_ARCHITECTURES = [
    Architecture("llama", "Llama 2/3, TinyLlama, the paper's presets"),
    Architecture("mistral", "Mistral", "sliding window", window="config"),
    Architecture("ministral", "Ministral", "sliding window per layer", window="layer_types"),
    Architecture("mixtral", "Mixtral (MoE)", "sliding window", window="config"),
    Architecture("qwen2", "Qwen2, Qwen2.5", "q/k/v biases", window="layer_types"),
    Architecture("qwen2_moe", "Qwen2-MoE", "q/k/v biases", window="layer_types"),
    Architecture("qwen3", "Qwen3", "q/k norms", qk_norm=True, window="layer_types"),
    Architecture("qwen3_moe", "Qwen3-MoE", "q/k norms", qk_norm=True, window="config"),
    Architecture("gemma", "Gemma"),
    Architecture(
        "gemma2",
        "Gemma 2",
        "sandwich norms, soft-capping, sliding window",
        mlp_norm="pre_feedforward_layernorm",
        attn_increment="post_attention_layernorm",
        mlp_increment="post_feedforward_layernorm",
        softcap="attn_logit_softcapping",
        window="layer_types",
    ),
    Architecture("granite", "Granite", "residual multiplier", branch_multiplier="residual_multiplier"),
    Architecture("glm", "GLM", "partial interleaved rotary", rope="interleaved"),
    Architecture(
        "glm4",
        "GLM-4",
        "sandwich norms, partial interleaved rotary",
        attn_increment="post_self_attn_layernorm",
        mlp_increment="post_mlp_layernorm",
        rope="interleaved",
    ),
    Architecture(
        "olmo2",
        "OLMo 2",
        "q/k norms, norms after each branch",
        qk_norm=True,
        input_norm=None,
        mlp_norm=None,
        attn_increment="post_attention_layernorm",
        mlp_increment="post_feedforward_layernorm",
        no_statistics="it has no norm before its branches (it normalises their outputs), so SPEC's h̃ does not exist",
    ),
    Architecture("starcoder2", "StarCoder2", "biases, LayerNorm, sliding window", window="config"),
    Architecture("smollm3", "SmolLM3", "NoPE layers", rope_flag="use_rope", window="layer_types"),
    Architecture("helium", "Helium", "interleaved rotary", rope="interleaved"),
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


def _module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


@dataclass(frozen=True)
class LayerParts:
    """One decoder layer's parts, resolved from its :class:`Architecture` record, and its attention's settings."""

    index: int
    block: nn.Module
    attention: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    input_norm: nn.Module
    mlp_norm: nn.Module
    mlp: nn.Module
    attn_increment: nn.Module
    mlp_increment: nn.Module
    branch_multiplier: float  # 1.0 unless the architecture scales its increments
    head_dim: int
    q_source: nn.Module  # its output is the query before RoPE: q_proj, or the q norm after it
    k_source: nn.Module
    rope: RopeStyle | None  # None on a layer without RoPE
    scaling: float
    softcap: float | None
    sliding_window: int | None


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The attention module of every decoder layer, in order."""
    arch = architecture_of(model)
    return [_module(block, arch.attention) for block in _module(model.base_model, arch.layers)]


def value_projection(model: nn.Module, attention: nn.Module) -> nn.Module:
    """The ``v_proj`` of one of ``model``'s attention modules: V-scale hooks its output."""
    return _module(attention, architecture_of(model).projections[2])


def layer_parts(model: nn.Module) -> list[LayerParts]:
    """Every decoder layer's parts, for the statistics; an error naming the reason where they are not supported."""
    arch = architecture_of(model)
    if not arch.has_statistics:
        supported = ", ".join(sorted(t for t, a in REGISTRY.items() if a.has_statistics))
        raise NotImplementedError(
            f"gradient-sink statistics are not available for model_type {arch.model_type!r}: {arch.no_statistics}; "
            f"they are for {supported}"
        )
    config = model.config
    multiplier = float(getattr(config, arch.branch_multiplier)) if arch.branch_multiplier else 1.0
    softcap = getattr(config, arch.softcap, None) if arch.softcap else None
    parts = []
    for i, block in enumerate(_module(model.base_model, arch.layers)):
        attn = _module(block, arch.attention)
        q_proj, k_proj, v_proj, o_proj = (_module(attn, name) for name in arch.projections)
        uses_rope = arch.rope_flag is None or bool(getattr(attn, arch.rope_flag))
        parts.append(
            LayerParts(
                index=i,
                block=block,
                attention=attn,
                q_proj=q_proj,
                k_proj=k_proj,
                v_proj=v_proj,
                o_proj=o_proj,
                input_norm=_module(block, arch.input_norm),
                mlp_norm=_module(block, arch.mlp_norm),
                mlp=_module(block, arch.mlp),
                attn_increment=_module(block, arch.attn_increment),
                mlp_increment=_module(block, arch.mlp_increment),
                branch_multiplier=multiplier,
                head_dim=attn.head_dim,
                q_source=attn.q_norm if arch.qk_norm else q_proj,
                k_source=attn.k_norm if arch.qk_norm else k_proj,
                rope=arch.rope if uses_rope else None,
                scaling=float(attn.scaling),
                softcap=float(softcap) if softcap else None,
                sliding_window=_sliding_window(arch, config, i),
            )
        )
    return parts


def _sliding_window(arch: Architecture, config, layer: int) -> int | None:
    """The window of layer ``layer`` as the model builds its attention masks (transformers' masking_utils: query t
    sees key s when t - s < window)."""
    window = getattr(config, "sliding_window", None)
    if arch.window is None or window is None:
        return None
    if arch.window == "layer_types":
        layer_types = getattr(config, "layer_types", None)
        return window if layer_types is not None and layer_types[layer] == "sliding_attention" else None
    return int(window)
