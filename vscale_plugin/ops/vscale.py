"""V-scale (arXiv 2603.17771; SPEC section 1): rescale every value vector by phi = r / (r + C), or, in the paper's
backward-only ablation (mode "backward"), keep the values and give only the gradient phi*v's Jacobian.

Pure PyTorch. The Hugging Face integration (``vscale_plugin.hf``) places :class:`VScale` right after
``v_proj``; nothing here knows about models, attention kernels or DeepSpeed (a tensor-parallel rank's share of the
heads is a :class:`HeadShard`, found by ``vscale_plugin.hf.tensor_parallel``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import nn

# "learned" (the paper's choice) and "fixed" scale the values; "backward" is the paper's backward-only ablation.
Mode = Literal["learned", "fixed", "backward"]
# How VScale computes: vscale_values as is, or fused by torch.compile (ops/fused.py).
Kernel = Literal["eager", "compiled"]
MODES: tuple[Mode, ...] = get_args(Mode)
KERNELS: tuple[Kernel, ...] = get_args(Kernel)
DEFAULT_SIGMA = 0.02

# ||v||^2 of a finite float32 vector can overflow to inf (||v|| > ~1.8e19). Clamping r keeps phi = 1 there
# (its true limit) and the clamp's zero gradient keeps the backward pass finite.
_R_MAX = 1e30
_C_MIN = torch.finfo(torch.float32).tiny


def check_kernel(kernel: str) -> str:
    """``kernel`` itself when it is one of :data:`KERNELS`; otherwise a ValueError naming them."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel {kernel!r} is not one of {', '.join(KERNELS)}")
    return kernel


def vscale_constant(d_model: int, d_head: int, sigma: float = DEFAULT_SIGMA, lam: float = 1.0) -> float:
    """C = d_model * d_head * sigma^2 * lambda  (SPEC 1): E||v||^2 at initialisation, times lambda."""
    return d_model * d_head * sigma**2 * lam


def phi(r: torch.Tensor, c: torch.Tensor | float) -> torch.Tensor:
    """phi = r / (r + C)  (SPEC 1). ``r + C`` is kept above zero so that r = 0 gives phi = 0, never NaN."""
    return r / (r + c).clamp_min(_C_MIN)


def vscale_values(v: torch.Tensor, c: torch.Tensor | float) -> torch.Tensor:
    """v_hat = phi(||v||^2, C) * v over the last dimension, computed in at least float32, returned in v's dtype.

    ``v`` has shape ``(..., heads, d_head)``; ``c`` is a float or a float32 tensor broadcastable to
    ``(..., heads, 1)`` (one C per head).
    """
    v32 = v.to(torch.promote_types(v.dtype, torch.float32))
    r = v32.square().sum(-1, keepdim=True).clamp(max=_R_MAX)
    return (v32 * phi(r, c)).to(v.dtype)


def backward_only_values(v: torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
    """v's own values, bit for bit, with the gradient of ``scaled`` = :func:`vscale_values` of v (mode "backward").

    The forward pass is the baseline's and the backward pass has V-scale's Jacobian ``phi*I + 2C/(r+C)^2 v v^T``,
    which is what the ablation isolates: the gradient valve without the rescaled values.
    """
    # v_hat = sg(v) + (phi*v - sg(phi*v))  (SPEC 1, backward-only ablation), written as a subtraction: phi*v is
    # finite for finite v, so the difference is exactly +0 and v - (+0) keeps every bit of v, -0.0 included.
    return v.detach() - (scaled.detach() - scaled)


@dataclass(frozen=True)
class HeadShard:
    """The KV heads ``start .. start + count - 1`` of a layer that one tensor-parallel rank computes, when its
    ``v_proj`` is split by whole heads. ``group`` is the tensor-parallel process group: each rank's theta gradient
    covers only its own heads, and is summed over the group so that every rank holds the full gradient."""

    start: int
    count: int
    group: Any = None


class _SumGradientOverGroup(torch.autograd.Function):
    """Identity forward; backward sums the gradient over ``group`` (Megatron's copy-to-tensor-parallel-region)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class VScale(nn.Module):
    """V-scale of one attention layer, acting on ``v_proj``'s output of shape ``(..., kv_heads * d_head)``.

    lambda = exp(theta), theta of shape ``(kv_heads,)`` initialised to 0. ``mode="learned"`` (the paper's choice)
    trains theta as a parameter; ``mode="fixed"`` keeps it a buffer at 0 (lambda = 1). ``mode="backward"`` (the
    paper's backward-only ablation) also keeps theta a buffer at 0 but returns v unchanged, bit for bit, while its
    gradient is that of fixed mode's phi*v (:func:`backward_only_values`).

    ``kernel`` ("eager" or "compiled", see :data:`KERNELS`) only chooses how the same values are computed; it is a
    runtime choice, in neither the state dict nor the model config.
    """

    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        hidden_size: int,
        mode: Mode = "learned",
        sigma: float = DEFAULT_SIGMA,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        kernel: Kernel = "eager",
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"V-scale mode {mode!r} is not one of {', '.join(MODES)}")
        if not sigma > 0:
            raise ValueError(f"V-scale sigma must be > 0 (the init std, 0.02 by default); got {sigma!r}")
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.hidden_size = hidden_size
        self.mode = mode
        self.sigma = float(sigma)
        self.kernel = kernel
        self.c_base = vscale_constant(hidden_size, head_dim, self.sigma)
        theta = torch.zeros(num_kv_heads, device=device, dtype=dtype)
        if mode == "learned":
            self.theta = nn.Parameter(theta)
        else:
            # A frozen theta = 0 keeps every mode's state dict alike, so loading a fixed- or backward-mode checkpoint
            # without the plugin is reported (an unexpected key) instead of silently dropping V-scale.
            self.register_buffer("theta", theta)

    @property
    def kernel(self) -> Kernel:
        return self._kernel

    @kernel.setter
    def kernel(self, kernel: Kernel) -> None:
        self._kernel = check_kernel(kernel)

    def reset_parameters(self) -> None:
        """theta = 0 (lambda = 1), the paper's initialisation; used after materialising a meta-device model."""
        with torch.no_grad():
            self.theta.zero_()

    def lam(self, shard: HeadShard | None = None) -> torch.Tensor:
        """lambda = exp(theta) per KV head, at least float32, shape ``(kv_heads,)`` (``(shard.count,)``: the
        heads of ``shard``, whose theta gradient is then summed over ``shard.group``)."""
        theta = self.theta
        if shard is not None:
            if shard.group is not None and theta.requires_grad:
                theta = _SumGradientOverGroup.apply(theta, shard.group)
            theta = theta[shard.start : shard.start + shard.count]
        return theta.to(torch.promote_types(theta.dtype, torch.float32)).exp()

    def constant(self, shard: HeadShard | None = None) -> torch.Tensor:
        """C = C_base * lambda per KV head, shape ``(kv_heads, 1)`` (``(shard.count, 1)`` with ``shard``)."""
        return (self.c_base * self.lam(shard)).unsqueeze(-1)

    def forward(self, v: torch.Tensor, shard: HeadShard | None = None) -> torch.Tensor:
        """V-scale of ``v`` of shape ``(..., kv_heads * d_head)``; with ``shard``, of its heads only,
        ``(..., shard.count * d_head)`` (a tensor-parallel rank's part of ``v_proj``'s output)."""
        heads = v.unflatten(-1, (self.num_kv_heads if shard is None else shard.count, self.head_dim))
        constant = self.constant(shard)
        if self._kernel == "compiled":
            from vscale_plugin.ops.fused import compiled_vscale_values  # fused.py imports this module

            scaled = compiled_vscale_values(heads, constant)
        else:
            scaled = vscale_values(heads, constant)
        if self.mode == "backward":
            # Either kernel's phi*v serves: only its gradient is used, so both kernels support this mode.
            scaled = backward_only_values(heads, scaled)
        return scaled.flatten(-2)

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"hidden_size={self.hidden_size}, sigma={self.sigma}, kernel={self._kernel}"
        )
