"""Quantisation readiness (SPEC section 4, ``qr/``): how well a layer's activations survive low-precision quantisation,
as pure functions of one captured tensor, and where a layer's linears take their inputs.

- ``qr/kurtosis/{h_out,down_proj_in}``: Pearson kurtosis over the hidden dimension of each token, mean over tokens
  (3 for Gaussian features; outlier channels raise it).
- ``qr/max_over_median/{h_out,down_proj_in}``: max |x| / median |x| over the whole tensor (Sun et al., "Massive
  activations in large language models").
- ``qr/int8_error/<linear>``: relative L2 error of static per-tensor symmetric INT8 fake-quantisation of that
  linear's input.

How they combine over a step (micro-batches and data-parallel ranks; :func:`vscale_plugin.stats.metrics.qr_metrics`):
kurtosis is exact over every real token of the step (sums of per-token kurtosis and token counts, summed over
micro-batches and ranks); max_over_median and int8_error are whole-tensor statistics, computed per forward call (one
micro-batch on one rank, its real tokens only, as a quantiser calibrating on that batch would see it) and averaged
over the step's calls. With one micro-batch on one rank each is exactly its formula on that tensor. Pads never enter.
Under sequence parallelism a call is one micro-batch's whole sequences, which the ranks of the SP group hold in shards:
with ``group`` the two whole-tensor statistics are computed over the shards together, exactly (a max and sums
all-reduced; the median by bisection over the float bit patterns, one all-reduced count per step), with no gather.

Everything is computed in float32 whatever the model's dtype. Degenerate inputs give no NaN: a zero tensor quantises
without error (0); a tensor whose median |x| is 0 has no max_over_median (the call is left out of the mean, and a
layer with no such call has no key); a token with zero variance has no kurtosis (it is left out of the mean).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vscale_plugin.hf.registry import LayerParts
from vscale_plugin.hf.tensor_parallel import tensor_parallel_size

INT8_MAX = 127

# The MLP's own linears by their transformers names (the registry locates the MLP, not its inside): the input side,
# whose input is h̃_half, with the qr/ keys it stands for (gate and up read the same tensor, so a fused gate_up_proj
# gives both; StarCoder2's c_fc is an ungated up projection), and the down projection, whose input is the MLP's
# intermediate activation. A mixture-of-experts block has neither (each expert sees only its routed tokens): it gets
# no MLP key rather than a plausible wrong one.
_MLP_INPUT_SIDE = (("gate_up_proj", ("gate_proj", "up_proj")), ("gate_proj", ("gate_proj", "up_proj")),
                   ("c_fc", ("up_proj",)))  # fmt: skip
_MLP_DOWN = ("down_proj", "c_proj")


def _linear(module: nn.Module, name: str) -> nn.Module | None:
    # A linear, or DeepSpeed AutoTP's split layer that replaced it (not an nn.Linear: the MLP keys would vanish)
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Linear) or tensor_parallel_size(child) > 1 else None


def down_projection(mlp: nn.Module) -> nn.Module | None:
    """The MLP's down projection (its input is ``down_proj_in``), None for a mixture-of-experts block."""
    return next((linear for name in _MLP_DOWN if (linear := _linear(mlp, name)) is not None), None)


def mlp_input_side(mlp: nn.Module) -> tuple[nn.Module, tuple[str, ...]] | None:
    """(the linear whose input is h̃_half, the qr/int8_error keys it stands for), None for an MLP without one."""
    if down_projection(mlp) is None:
        return None
    return next(((linear, keys) for name, keys in _MLP_INPUT_SIDE if (linear := _linear(mlp, name)) is not None), None)


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(tokens, features) float32: the rows of ``x`` (batch, T, features) where ``mask`` (batch, T) is true (None:
    every row)."""
    x = x.detach()
    return (x.reshape(-1, x.shape[-1]) if mask is None else x[mask]).float()


# Each statistic below returns its contribution to a (2,) float64 [sum, count] on the CPU, summed over calls and ranks.


def kurtosis_sum(x: torch.Tensor) -> torch.Tensor:
    """[sum of the per-token kurtosis, tokens that have one] of (tokens, features) float32."""
    d = x - x.mean(-1, keepdim=True)
    var = d.square().mean(-1, keepdim=True)
    # Pearson kurtosis E[(x - mu)^4] / sigma^4, standardised first (no overflow); in place: one temporary in all
    z4 = d.mul_(var.rsqrt()).square_().square_().mean(-1)
    defined = var.squeeze(-1) > 0
    return torch.stack([torch.where(defined, z4, 0.0).double().sum(), defined.double().sum()]).cpu()


def _all_reduce(x: torch.Tensor, op: Any, group: Any) -> torch.Tensor:
    dist.all_reduce(x, op=op, group=group)
    return x


def _lower_median(a: torch.Tensor, group: Any) -> torch.Tensor:
    """torch.median of the concatenation over ``group`` of the non-negative float32 values ``a``: the smallest value
    with at least (N + 1) // 2 values at or below it, found by bisection over the int32 bit patterns (non-negative
    floats order as their bits), one all-reduced count per step."""
    bits = a.contiguous().view(torch.int32)
    n = _all_reduce(torch.tensor(a.numel(), dtype=torch.int64, device=a.device), dist.ReduceOp.SUM, group).item()
    rank = (n - 1) // 2 + 1  # the lower middle value, 1-based
    lo, hi = 0, 0x7F800000  # 0.0 .. inf
    while lo < hi:
        mid = (lo + hi) // 2
        count = _all_reduce((bits <= mid).sum(), dist.ReduceOp.SUM, group).item()
        lo, hi = (lo, mid) if count >= rank else (mid + 1, hi)
    return torch.tensor(lo, dtype=torch.int32, device=a.device).view(torch.float32)


def max_over_median(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """[max |x| / median |x|, 1] over the whole tensor (over ``group``'s shards of it together), the median being the
    lower middle value for an even count (as torch.median); [0, 0] when the median is 0."""
    a = x.abs().flatten()
    if group is None:
        peak, median = a.max(), a.median()
    else:
        peak = _all_reduce(a.max(), dist.ReduceOp.MAX, group)
        median = _lower_median(a, group)
    defined = median > 0
    ratio = torch.where(defined, peak / torch.where(defined, median, 1.0), 0.0)
    return torch.stack([ratio.double(), defined.double()]).cpu()


def int8_error(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """[||x - q(x)|| / ||x||, 1] of static per-tensor symmetric INT8 fake-quantisation (of ``group``'s shards of one
    tensor together: one scale from their max); the error of a zero tensor is 0."""
    peak = x.abs().max()
    if group is not None:
        peak = _all_reduce(peak, dist.ReduceOp.MAX, group)
    scale = peak / INT8_MAX  # s = max|x| / 127
    safe = torch.where(scale > 0, scale, 1.0)
    q = torch.round(x / safe).clamp_(-INT8_MAX - 1, INT8_MAX).mul_(safe)  # q(x) = s clamp(round(x / s), -128, 127)
    if group is None:
        error = torch.where(scale > 0, q.sub_(x).norm() / x.norm(), 0.0)
    else:
        squares = _all_reduce(torch.stack([q.sub_(x).square().sum(), x.square().sum()]), dist.ReduceOp.SUM, group)
        error = torch.where(scale > 0, squares[0].sqrt() / squares[1].sqrt(), 0.0)
    return torch.stack([error.double(), torch.ones((), dtype=torch.float64, device=x.device)]).cpu()


@dataclass(frozen=True)
class Tap:
    """One tensor of a layer the qr/ statistics read: a module's output or input, the kurtosis / max_over_median point
    it is (None: not one), and the linears it is the input of (their int8_error keys)."""

    module: nn.Module
    output: bool
    point: str | None
    linears: tuple[str, ...]

    def entries(self) -> list[str]:
        """The [sum, count] entries of the layer's sums this tap adds to (its qr/ keys without the layer)."""
        shape = [f"qr/{stat}/{self.point}" for stat in ("kurtosis", "max_over_median")] if self.point else []
        return [*shape, *(f"qr/int8_error/{linear}" for linear in self.linears)]


def taps(parts: LayerParts) -> list[Tap]:
    """What layer ``parts`` is read at: h_out, h̃ (the input of q, k and v alike), the attention output before o_proj,
    h̃_half and the down projection's input, where the layer has them."""
    out = [
        Tap(parts.block, True, "h_out", ()),
        Tap(parts.q_proj, False, None, ("q_proj", "k_proj", "v_proj")),
        Tap(parts.o_proj, False, None, ("o_proj",)),
    ]
    input_side = mlp_input_side(parts.mlp)
    if input_side is not None:
        out.append(Tap(input_side[0], False, None, input_side[1]))
    down = down_projection(parts.mlp)
    if down is not None:
        out.append(Tap(down, False, "down_proj_in", ("down_proj",)))
    return out
