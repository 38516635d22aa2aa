"""The SPEC section 2 formulas, as pure functions of what a capture accumulated (sums over sequences, micro-batches and
ranks), and the section 4 names they are reported under. No hooks, no model: :mod:`vscale_plugin.stats.collector`
gathers the sums, this module turns them into numbers.

Positions are counted from each sequence's first real token; ``counts[p]`` is how many sequences have position p
(p = 0 .. PROFILE, one more than the profile: a position has a gradient only where some sequence goes on after it,
since the last token of a sequence predicts nothing and nothing attends to it from later).
"""

from __future__ import annotations

import statistics

import torch

PROFILE = 64  # positions whose gradients are kept (the paper's token-wise plots show 0..63)
REST = 16  # "rest" averages tokens 1..15
T_E = 31  # R_GS divides by the mean over tokens 1..31

# Where gradients are taken: the residual stream around each branch, the two norm outputs, and the three views of h̃
# whose gradients are the query, key and value paths. g(r_attn) = g(h_half) and g(r_mlp) = g(h_out) exactly (each
# increment is added to the stream with unit Jacobian), so the increments need no gradient of their own.
GRAD_POINTS = ("h_in", "h_tilde", "path_q", "path_k", "path_v", "h_half", "h_tilde_half", "h_out")
# Forward norms: the residual stream, the two increments r_attn ("attn_out") and r_mlp ("mlp_out"), the values.
FORWARD_POINTS = ("h_in", "h_half", "h_out", "attn_out", "mlp_out", "v")
PATHS = (("grad_in", "h_tilde"), ("q", "path_q"), ("k", "path_k"), ("v", "path_v"))


def tok0_rest(per_position: torch.Tensor, positions: int) -> dict[str, float]:
    """{"tok0": value at token 0, "rest": mean over tokens 1..15} of a per-position profile, over fewer tokens when
    sequences are shorter; without a token 1 there is no "rest"."""
    rest = per_position[1 : min(REST, positions)]
    return {"tok0": per_position[0].item(), **({"rest": rest.mean().item()} if rest.numel() else {})}


def _put(out: dict[str, float], prefix: str, tag: str, values: dict[str, float]) -> None:
    out.update({f"{prefix}/{which}/{tag}": value for which, value in values.items()})


def gradient_sink_ratio(grad_in: torch.Tensor, positions: int) -> float | None:
    """R_GS = ||g(h̃_0)|| / mean_{t=1..T_e} ||g(h̃_t)||, T_e = 31 (or the last position of shorter sequences); None
    when no position after token 0 has a gradient."""
    t_e = min(T_E, positions - 1)
    return (grad_in[0] / grad_in[1 : t_e + 1].mean()).item() if t_e >= 1 else None


def bloat(g_normed: torch.Tensor, g_increment: torch.Tensor) -> torch.Tensor:
    """bloat = ||g(h̃_t)|| / ||g(r_t)|| per token: how much the branch (norm and sublayer) amplifies the gradient."""
    return g_normed.norm(dim=-1) / g_increment.norm(dim=-1)


def compress(g_before: torch.Tensor, g_after: torch.Tensor, g_normed: torch.Tensor) -> torch.Tensor:
    """compress = ||g(h_in,t) - g(h_half,t)|| / ||g(h̃_t)||: what of the branch's gradient survives the norm."""
    return (g_before - g_after).norm(dim=-1) / g_normed.norm(dim=-1)


def change(g_before: torch.Tensor, g_after: torch.Tensor) -> torch.Tensor:
    """change = ||g(h_in,t)|| / ||g(h_half,t)||: how much the whole block changes the residual gradient."""
    return g_before.norm(dim=-1) / g_after.norm(dim=-1)


def sink_metrics(sums: torch.Tensor) -> dict[str, float]:
    """Sink rate (fraction of (sequence, head) pairs with alpha > eps), M_0 and S_0, each averaged over the pairs,
    from the (4,) sums of :func:`vscale_plugin.stats.sinks.sink_sums`."""
    pairs = max(sums[3].item(), 1.0)
    return {"sink_rate": sums[0].item() / pairs, "mass": sums[1].item() / pairs, "mass_sq": sums[2].item() / pairs}


def profile_lengths(counts: torch.Tensor) -> tuple[int, int]:
    """(positions with a token in some sequence, positions with a gradient: a token and a next token), up to
    PROFILE; shorter sequences give shorter profiles, never a zero-gradient last position inside a mean."""
    return int((counts[:PROFILE] > 0).sum().item()), int((counts[1 : PROFILE + 1] > 0).sum().item())


def layer_metrics(tag: str, sums: dict[str, torch.Tensor], counts: torch.Tensor, world: int) -> dict[str, float]:
    """Every per-layer metric of SPEC section 4 for layer ``tag`` from its summed state (keys ``fwd/<point>``,
    ``grad/<point>``, ``sinks``, optionally ``phi``), ``counts`` of sequences per position and the number of
    data-parallel ranks (gradients are averaged over them, as the optimiser's are)."""
    out: dict[str, float] = {}
    positions, graded = profile_lengths(counts)
    seen = counts[:REST].clamp_min(1.0)
    for point in FORWARD_POINTS:  # massive activations: per-position norms averaged over sequences
        _put(out, f"ma/{point}", tag, tok0_rest(sums[f"fwd/{point}"] / seen, positions))
    for name, value in sink_metrics(sums["sinks"]).items():
        out[f"as/{name}/{tag}"] = value
    out.update(qr_metrics(tag, sums))
    if "phi" in sums:
        _put(out, "vscale/phi", tag, tok0_rest(sums["phi"] / seen, positions))
    g = {point: sums[f"grad/{point}"][:graded] / world for point in GRAD_POINTS}
    if g["h_tilde"].abs().sum() == 0:  # no backward was captured (a forward under no_grad, one-token sequences)
        return out
    norm = {point: g[point].norm(dim=-1) for point in GRAD_POINTS}
    ratio = gradient_sink_ratio(norm["h_tilde"], graded)
    if ratio is not None:
        out[f"gs/ratio/{tag}"] = ratio
    for name, point in PATHS:
        _put(out, f"gs/{name}", tag, tok0_rest(norm[point], graded))
    ratios = {
        "bloat_attn": bloat(g["h_tilde"], g["h_half"]),
        "compress_attn": compress(g["h_in"], g["h_half"], g["h_tilde"]),
        "change_attn": change(g["h_in"], g["h_half"]),
        "bloat_mlp": bloat(g["h_tilde_half"], g["h_out"]),
        "compress_mlp": compress(g["h_half"], g["h_out"], g["h_tilde_half"]),
        "change_mlp": change(g["h_half"], g["h_out"]),
    }
    for name, per_token in ratios.items():
        _put(out, f"gs/{name}", tag, tok0_rest(per_token, graded))
    return out


def qr_metrics(tag: str, sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """The ``qr/`` metrics of layer ``tag`` from their [sum, count] pairs (:mod:`vscale_plugin.stats.quant_readiness`).

    The combination over a step is in what was summed: for kurtosis one term per real token, so the mean is exact over
    the step's tokens on every rank; for max_over_median and int8_error one term per forward call (a micro-batch on a
    rank), so the mean is over the step's calls - a whole-tensor statistic of a bigger batch is not a function of its
    parts' values. A count of 0 (no defined value anywhere) gives no key."""
    return {f"{key}/{tag}": (s[0] / s[1]).item() for key, s in sums.items() if key.startswith("qr/") and s[1] > 0}


def gradient_profile(sums: dict[str, torch.Tensor], counts: torch.Tensor, world: int) -> dict[str, list[float]] | None:
    """Per-position norms of g(h̃) and its three paths (positions 0..63), for the token-wise plots; None without a
    captured backward."""
    _, graded = profile_lengths(counts)
    norms = {name: (sums[f"grad/{point}"][:graded] / world).norm(dim=-1) for name, point in PATHS}
    return None if norms["grad_in"].abs().sum() == 0 else {name: n.tolist() for name, n in norms.items()}


def summaries(out: dict[str, float], layers: int) -> dict[str, float]:
    """The summaries over layers: median R_GS, mean sink rate, max token-0 norms of h_out and mlp_out, the max of
    each qr/ family."""

    def over_layers(prefix: str) -> list[float]:
        return [out[f"{prefix}/L{i:02d}"] for i in range(layers) if f"{prefix}/L{i:02d}" in out]

    result = {
        "as/sink_rate/mean": statistics.fmean(over_layers("as/sink_rate")),
        "ma/h_out/tok0/max": max(over_layers("ma/h_out/tok0")),
        "ma/mlp_out/tok0/max": max(over_layers("ma/mlp_out/tok0")),
    }
    ratios = over_layers("gs/ratio")
    if ratios:
        result["gs/ratio/median"] = statistics.median(ratios)
    for family in sorted({key.rsplit("/", 1)[0] for key in out if key.startswith("qr/")}):
        result[f"{family}/max"] = max(over_layers(family))
    return result
