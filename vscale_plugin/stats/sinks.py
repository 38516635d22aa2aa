"""Attention-sink statistics of one layer from post-RoPE queries and keys, without a T x T attention matrix.

Only the attention column of the sink position s = 0 is needed: a_t0 = exp(q_t.k_0 * scale - LSE_t), with
LSE_t = logsumexp_{s visible to t} q_t.k_s * scale. LSE is computed over chunks of queries, so memory grows as
chunk x T per head: linear in T (SPEC section 2, issue 4).
"""

from __future__ import annotations

import torch

SINK_WINDOW = 64  # T_eps: the sink score averages a_t0 over the first 64 queries
SINK_THRESHOLD = 0.3  # eps: a (sequence, head) is a sink when its score exceeds it
_CHUNK_ELEMENTS = 1 << 24  # float32 scores per chunk (64 MiB) bound the extra memory of a capture step


def sink_column(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    key_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """a_t0 for every query: float32 of shape ``(batch, heads, T)``.

    ``q``: ``(batch, heads, T, d)``; ``k``: ``(batch, kv_heads, T, d)`` (grouped-query attention shares each KV
    head among ``heads // kv_heads`` query heads); ``key_mask``: ``(batch, T)``, False for padding.
    """
    b, heads, t, d = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    qg = q.float().view(b, kv_heads, group, t, d)
    kf = k.float().unsqueeze(2)  # (b, kv, 1, T, d)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, b * heads * t))
    positions = torch.arange(t, device=q.device)
    out = torch.empty(b, kv_heads, group, t, dtype=torch.float32, device=q.device)
    for start in range(0, t, chunk):
        stop = min(t, start + chunk)
        keys = kf[..., :stop, :]  # causal: queries < stop see keys < stop
        scores = torch.matmul(qg[..., start:stop, :], keys.transpose(-1, -2)) * scale  # (b, kv, g, c, stop)
        query_pos = positions[start:stop, None]
        visible = positions[None, :stop] <= query_pos
        if sliding_window is not None:
            visible = visible & (query_pos - positions[None, :stop] < sliding_window)
        mask = visible.view(1, 1, 1, stop - start, stop)
        if key_mask is not None:
            mask = mask & key_mask[:, None, None, None, :stop].bool()
        scores = scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        column = torch.exp(scores[..., 0] - lse)
        out[..., start:stop] = torch.nan_to_num(column, nan=0.0)  # a fully masked query row has no attention
    return out.view(b, heads, t)


def sink_sums(column: torch.Tensor, query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sums over (sequence, head) of [sink indicator, M_0, S_0, 1]: float64 of shape ``(4,)``, ready to be added
    over micro-batches and ranks and divided by the last entry."""
    b, heads, t = column.shape
    valid = torch.ones(b, t, dtype=torch.bool, device=column.device) if query_mask is None else query_mask.bool()
    valid = valid[:, None, :].expand(b, heads, t)
    col = column.double() * valid
    window = min(SINK_WINDOW, t)
    counted = valid[..., :window].sum(-1).clamp_min(1)
    alpha = col[..., :window].sum(-1) / counted  # sink score: mean_{t < T_eps} a_t0
    return torch.stack(
        [
            (alpha > SINK_THRESHOLD).double().sum(),  # sink rate numerator
            col.sum(-1).sum(),  # M_0 = sum_t a_t0
            col.square().sum(-1).sum(),  # S_0 = sum_t a_t0^2
            torch.tensor(float(b * heads), dtype=torch.float64, device=column.device),
        ]
    )
