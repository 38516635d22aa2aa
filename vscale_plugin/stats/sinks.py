"""Attention-sink statistics of one layer from the attention kernel's queries and keys, without a T x T matrix.

Only the attention column of the sink - each sequence's first real token s0 - is needed:
a_t,s0 = exp(score(q_t, k_s0) - LSE_t), with LSE_t = logsumexp over the keys visible to t of score(q_t, k_s). LSE is
computed over chunks of queries, so memory grows as chunk x T per head: linear in T (SPEC section 2, issue 4).
``score`` is the architecture's: q.k * scaling, optionally soft-capped, under the causal mask, the padding and the
layer's sliding window.
"""

from __future__ import annotations

import torch

from vscale_plugin.stats.positions import Rows

SINK_WINDOW = 64  # T_eps: the sink score averages a_t0 over the first 64 queries
SINK_THRESHOLD = 0.3  # eps: a (sequence, head) is a sink when its score exceeds it
_CHUNK_ELEMENTS = 1 << 24  # float32 scores per chunk (64 MiB) bound the extra memory of a capture step


def sink_column(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    rows: Rows,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """a_t,s0 for every query t: float32 of shape ``(batch, heads, T)``, 0 for queries that are padding.

    ``q``: ``(batch, heads, T, d)``; ``k``: ``(batch, kv_heads, T, d)`` (grouped-query attention shares each KV
    head among ``heads // kv_heads`` query heads).
    """
    b, heads, t, d = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    qg = q.float().view(b, kv_heads, group, t, d)
    kf = k.float().unsqueeze(2)  # (b, kv, 1, T, d)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, b * heads * t))
    positions = torch.arange(t, device=q.device)
    key_real = rows.mask(t)
    out = torch.zeros(b, kv_heads, group, t, dtype=torch.float32, device=q.device)
    for first in range(0, t, chunk):
        stop = min(t, first + chunk)
        scores = torch.matmul(qg[..., first:stop, :], kf[..., :stop, :].transpose(-1, -2)) * scale  # (b,kv,g,c,stop)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        query_pos = positions[first:stop, None]
        visible = positions[None, :stop] <= query_pos  # causal: queries < stop see keys < stop
        if sliding_window is not None:
            visible = visible & (query_pos - positions[None, :stop] < sliding_window)
        mask = visible.view(1, 1, 1, stop - first, stop) & key_real[:, None, None, None, :stop]
        scores = scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        sink = rows.start.clamp(max=stop - 1).view(b, 1, 1, 1, 1).expand(-1, kv_heads, group, stop - first, 1)
        column = torch.exp(scores.gather(-1, sink).squeeze(-1) - lse)
        out[..., first:stop] = torch.nan_to_num(column, nan=0.0)  # a query that sees no key has no attention
    out = out.view(b, heads, t)
    return out * key_real[:, None, :]  # pad queries attend to nothing that counts


def sink_sums(column: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Sums over (sequence, head) of [sink indicator, M_0, S_0, 1]: float64 of shape ``(4,)``, ready to be added
    over micro-batches and ranks and divided by the last entry. Rows without a real token count for nothing."""
    b, heads, t = column.shape
    col = rows.align(column.double().transpose(1, 2), t).transpose(1, 2)  # (b, H, T) from each row's first token
    window = rows.length.clamp(max=SINK_WINDOW).clamp_min(1).double()  # T_eps, or the sequence's length if shorter
    in_window = (torch.arange(t, device=col.device)[None, :] < window[:, None]).double()
    alpha = (col * in_window[:, None, :]).sum(-1) / window[:, None]  # sink score: mean_{t < T_eps} a_t0
    present = (rows.length > 0).double()[:, None].expand(b, heads)
    return torch.stack(
        [
            ((alpha > SINK_THRESHOLD).double() * present).sum(),  # sink rate numerator
            col.sum(-1).sum(),  # M_0 = sum_t a_t0
            col.square().sum(-1).sum(),  # S_0 = sum_t a_t0^2
            present.sum(),
        ]
    )
