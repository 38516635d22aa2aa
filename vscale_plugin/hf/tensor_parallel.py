"""V-scale under DeepSpeed AutoTP (``"tensor_parallel": {"autotp_size": N}``).

``deepspeed.initialize`` replaces ``v_proj`` with its column-parallel ``LinearLayer``: each tensor-parallel rank
computes the rows of its share of the KV heads, and the forward hook that V-scale had on the original module is gone.
:class:`~vscale_plugin.hf.patch.ValueProjectionGuard` notices the replacement at the next forward and hooks the new
module with the rank's :class:`~vscale_plugin.ops.vscale.HeadShard`, found here. Theta stays whole and replicated on
every rank (so checkpoints hold the full theta, as a run without tensor parallelism does); each rank uses the entries
of its heads, and their gradients are summed over the tensor-parallel group.

Only DeepSpeed's layer attributes are read (``mp_group``, ``tp_world_size``, ``tp_index``, ``_partition_sizes``), so
nothing here imports DeepSpeed.
"""

from __future__ import annotations

from torch import nn

from vscale_plugin.ops.vscale import HeadShard, VScale


def tensor_parallel_size(module: nn.Module) -> int:
    """How many tensor-parallel ranks share ``module`` (a DeepSpeed AutoTP layer); 1 for an ordinary module."""
    if getattr(module, "mp_group", None) is None:
        return 1
    return int(getattr(module, "tp_world_size", 1))


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
