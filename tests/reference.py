"""An independent eager Llama/Mistral forward with V-scale, written from SPEC section 1 and the Llama paper, and the
building blocks (norms, rotary embeddings, masks) of the all-architecture reference in ``tests/stats_reference.py``.

It shares no code with ``vscale_plugin`` or transformers' modeling files: it reads only the state dict and a few
config numbers, so tests can compare the patched Hugging Face model against it in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Shapes:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rope_base: float

    @classmethod
    def of(cls, config) -> Shapes:
        rope = getattr(config, "rope_parameters", None) or {}
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            eps=getattr(config, "rms_norm_eps", None) or config.norm_epsilon,  # StarCoder2 names it norm_epsilon
            rope_base=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def rms_norm_1p(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: the gain is ``1 + weight`` (its weights start at 0)."""
    return (1.0 + weight) * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    centred = x - x.mean(-1, keepdim=True)
    return weight * centred / torch.sqrt((centred * centred).mean(-1, keepdim=True) + eps) + bias


def rope_angles(t: int, rotary_dim: int, base: float) -> torch.Tensor:
    """theta_{p,i} = p * base^(-2i / rotary_dim) for positions p < t and pairs i < rotary_dim / 2, float64."""
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    return torch.arange(t, dtype=torch.float64)[:, None] * inv_freq[None, :]


def rope_half_split(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on ``(..., T, d)``, Llama's convention: pair i is (x_i, x_{i + d/2}), all d dims rotate."""
    d = x.shape[-1]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def rope_interleaved(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on ``(..., T, d)``, GLM's convention: pair i is (x_{2i}, x_{2i+1}); only the first
    ``2 * angles.shape[-1]`` dims rotate (partial rotary), the rest pass unchanged."""
    rotary = 2 * angles.shape[-1]
    rot, rest = x[..., :rotary], x[..., rotary:]
    even, odd = rot[..., 0::2], rot[..., 1::2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], -1).flatten(-2)
    return torch.cat([rotated, rest], -1)


def causal_mask(t: int, window: int | None = None) -> torch.Tensor:
    """``(T, T)`` bool, True where query t may attend key s: s <= t, and t - s < window with a sliding window."""
    q = torch.arange(t)[:, None]
    k = torch.arange(t)[None, :]
    allowed = k <= q
    return allowed if window is None else allowed & (k > q - window)


def rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding, half-split convention, on ``(batch, heads, T, d)``."""
    t, d = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def forward(
    weights: dict[str, torch.Tensor],
    shapes: Shapes,
    input_ids: torch.Tensor,
    vscale_c: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits of a Llama-layout decoder. ``vscale_c[l]`` is C per KV head of layer l (None: no V-scale)."""
    w = weights
    b, t = input_ids.shape
    h = w["model.embed_tokens.weight"][input_ids]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(shapes.layers):
        p = f"model.layers.{i}."
        x = rms_norm(h, w[p + "input_layernorm.weight"], shapes.eps)
        q = (x @ w[p + "self_attn.q_proj.weight"].T).view(b, t, shapes.heads, shapes.head_dim).transpose(1, 2)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).view(b, t, shapes.kv_heads, shapes.head_dim).transpose(1, 2)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(b, t, shapes.kv_heads, shapes.head_dim).transpose(1, 2)
        if vscale_c is not None:
            r = (v * v).sum(-1, keepdim=True)  # ||v_j||^2 per KV head
            c = vscale_c[i].view(1, shapes.kv_heads, 1, 1)
            v = v * r / (r + c)  # v_hat = phi v, phi = r / (r + C)
        q, k = rope(q, shapes.rope_base), rope(k, shapes.rope_base)
        group = shapes.heads // shapes.kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)) / shapes.head_dim**0.5
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(b, t, shapes.heads * shapes.head_dim)
        h = h + y @ w[p + "self_attn.o_proj.weight"].T
        x = rms_norm(h, w[p + "post_attention_layernorm.weight"], shapes.eps)
        gate = x @ w[p + "mlp.gate_proj.weight"].T
        up = x @ w[p + "mlp.up_proj.weight"].T
        h = h + (F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    h = rms_norm(h, w["model.norm.weight"], shapes.eps)
    return h @ w["lm_head.weight"].T


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
