"""The attention kernel's queries and keys, recomputed from the pre-RoPE ones as the architecture record says: rotary
embeddings in the half-split (Llama) or interleaved (GLM, Helium) convention, over the first ``cos.shape[-1]``
dimensions of each head (partial rotary), or none at all (SmolLM3's NoPE layers)."""

from __future__ import annotations

import torch

from vscale_plugin.hf.registry import RopeStyle


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: RopeStyle) -> torch.Tensor:
    """RoPE on ``x`` of shape (batch, heads, T, d) with the model's own ``cos``/``sin`` of shape (batch, T, r)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    if style == "interleaved":  # pairs (2i, 2i + 1) turn by angle i: cos/sin carry each angle once, in the first half
        cos = cos[..., : cos.shape[-1] // 2].repeat_interleave(2, dim=-1)
        sin = sin[..., : sin.shape[-1] // 2].repeat_interleave(2, dim=-1)
    width = cos.shape[-1]
    rot, rest = x[..., :width], x[..., width:]
    if style == "interleaved":
        turned = torch.stack((-rot[..., 1::2], rot[..., 0::2]), dim=-1).flatten(-2)
    else:  # pairs (i, i + width/2)
        turned = torch.cat((-rot[..., width // 2 :], rot[..., : width // 2]), dim=-1)
    return torch.cat((rot * cos + turned * sin, rest), dim=-1)


def kernel_queries_keys(
    q: torch.Tensor,
    k: torch.Tensor,
    head_dim: int,
    rope: RopeStyle | None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, heads, T, d) float32 queries and (batch, kv_heads, T, d) keys as the attention kernel sees them, from
    the pre-RoPE ones (q_proj / k_proj outputs, or their q/k norms' outputs), of shape (batch, T, heads * d) or
    (batch, T, heads, d)."""
    b, t = q.shape[:2]
    q = q.float().reshape(b, t, -1, head_dim).transpose(1, 2)
    k = k.float().reshape(b, t, -1, head_dim).transpose(1, 2)
    if rope is None:
        return q, k
    if position_embeddings is None:
        raise NotImplementedError("sink statistics need the attention's position_embeddings (RoPE cos, sin)")
    cos, sin = position_embeddings
    return rotary(q, cos, sin, rope), rotary(k, cos, sin, rope)
