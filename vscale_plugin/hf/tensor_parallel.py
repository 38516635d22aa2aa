"""V-scale under DeepSpeed AutoTP (``"tensor_parallel": {"autotp_size": N}``).

``deepspeed.initialize`` replaces ``v_proj`` with its column-parallel ``LinearLayer``: each tensor-parallel rank
computes the rows of its share of the KV heads, and the forward hook that V-scale had on the original module is gone.
:class:`~vscale_plugin.hf.patch.ValueProjectionGuard` notices the replacement at the next forward and hooks the new
module with the rank's :class:`~vscale_plugin.ops.vscale.HeadShard`, found here. Theta stays whole and replicated on
every rank (so checkpoints hold the full theta, as a run without tensor parallelism does); each rank uses the entries
of its heads, and their gradients are summed over the tensor-parallel group.

The statistics collector reads the same attributes to combine its numbers over the tensor-parallel group
(:func:`gather_features`, :func:`row_parallel`, :func:`sharded_parameter`).

Only DeepSpeed's layer attributes are read (``mp_group``, ``tp_world_size``, ``tp_index``, ``_partition_sizes``, the
class name ``LinearAllreduce`` and Megatron's ``tensor_model_parallel`` mark on split parameters), so nothing here
imports DeepSpeed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vscale_plugin.ops.vscale import HeadShard, VScale


def tensor_parallel_size(module: nn.Module) -> int:
    """How many tensor-parallel ranks share ``module`` (a DeepSpeed AutoTP layer); 1 for an ordinary module."""
    if getattr(module, "mp_group", None) is None:
        return 1
    return int(getattr(module, "tp_world_size", 1))


def tensor_parallel_group(module: nn.Module) -> Any:
    """The process group over which ``module`` is split; None for an ordinary module."""
    return module.mp_group if tensor_parallel_size(module) > 1 else None


def row_parallel(module: nn.Module) -> bool:
    """Whether ``module`` is an AutoTP row-parallel linear (``LinearAllreduce``): its input features are split over
    the group and its output is all-reduced. A column-parallel one (``LinearLayer``) takes the whole input and gives
    its rank's share of the output features."""
    return tensor_parallel_size(module) > 1 and any(cls.__name__ == "LinearAllreduce" for cls in type(module).__mro__)


def sharded_parameter(param: nn.Parameter) -> bool:
    """Whether ``param`` is one rank's share of a split matrix (AutoTP marks them as Megatron does); False for a
    replicated one (norms, a row-parallel layer's bias, V-scale's theta)."""
    return bool(getattr(param, "tensor_model_parallel", False))


def full_features(module: nn.Module, local: int) -> int:
    """How many features the split dimension of ``module`` has in all (its ranks' shares together), given this
    rank's ``local`` share; ``local`` itself for an unsplit module."""
    world = tensor_parallel_size(module)
    if world == 1:
        return local
    return sum(getattr(module, "_partition_sizes", ()) or ()) or local * world


@torch.no_grad()
def gather_features(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``x`` (..., this rank's share of ``module``'s split features) gathered over its group, in the ranks' order:
    (..., all features), the tensor a run without tensor parallelism has. A collective: every rank of the group calls
    it at the same point. Uneven shares (``_partition_sizes``) are padded for the exchange and cut afterwards."""
    world = tensor_parallel_size(module)
    sizes = list(getattr(module, "_partition_sizes", ()) or ()) or [x.shape[-1]] * world
    if world == 1 or x.shape[-1] == sum(sizes):  # unsplit, or a layer that takes the whole input and splits it itself
        return x
    width = max(sizes)
    padded = torch.nn.functional.pad(x.detach(), (0, width - x.shape[-1])).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=module.mp_group)
    return torch.cat([part[..., :size] for part, size in zip(parts, sizes, strict=True)], dim=-1)


def head_shard(v_proj: nn.Module, vscale: VScale) -> HeadShard | None:
    """The KV heads that this rank's part of an AutoTP column-parallel ``v_proj`` computes; None when it is whole.

    A ValueError when the split does not give each rank whole KV heads (V-scale's norm is per head)."""
    world = tensor_parallel_size(v_proj)
    if world == 1:
        return None
    heads, dim = vscale.num_kv_heads, vscale.head_dim
    sizes = tuple(getattr(v_proj, "_partition_sizes", ()) or (heads * dim // world,) * world)
    if heads % world or any(size != heads // world * dim for size in sizes):
        raise ValueError(
            f"DeepSpeed AutoTP split v_proj ({heads} KV heads of {dim}) into {world} parts of {list(sizes)} features; "
            f"V-scale needs whole KV heads on every rank: set tensor_parallel.autotp_size to a divisor of {heads}"
        )
    count = heads // world
    return HeadShard(start=int(v_proj.tp_index) * count, count=count, group=v_proj.mp_group)
