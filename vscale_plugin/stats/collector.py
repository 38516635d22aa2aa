"""Attention sinks, massive activations and gradient sinks, measured during training (SPEC sections 2 and 4).

A :class:`StatsCollector` hooks the model only inside ``capture(step)`` on due steps. Where to hook comes from the
architecture's record (:func:`vscale_plugin.hf.registry.layer_parts`); this module knows no attribute names. Module
hooks record forward statistics, and tensor hooks on the residual stream, the norm outputs and the three projection
inputs record the gradient of every position < 64, summed over the sequences of each micro-batch. Sums over
micro-batches, then the mean over data-parallel ranks, give exactly the optimiser's combination of the gradient; norms
come last (:mod:`vscale_plugin.stats.metrics`). Positions are counted from each sequence's first real token
(``attention_mask``), and pads enter nothing (:mod:`vscale_plugin.stats.positions`).

With ``quant_readiness`` (the default), forward hooks on h_out and on the inputs of the layer's linears also record the
``qr/`` statistics (:mod:`vscale_plugin.stats.quant_readiness`): kurtosis exact over every real token of the step,
max_over_median and int8_error per forward call (one micro-batch on one rank) and averaged over the step's calls.

Under DeepSpeed AutoTP the numbers are those of the run without tensor parallelism on the same global batch: what the
ranks of a tensor-parallel group hold alike (the residual stream, the norms' outputs, every per-position gradient)
counts once per rank, as do the sequences it is divided by; what they split is combined over the group - the heads
(sink statistics, value norms and phi, by their sums), the inputs of row-parallel linears (gathered before their qr/
statistics) and the split matrices (their shares' squared gradient norms added).

Under DeepSpeed Ulysses sequence parallelism (an engine with ``sequence_parallel_size`` > 1) each rank holds one
contiguous shard of every sequence: its positions go into the profiles at their place in the sequence, so the sums
over the group count each position once; the sink statistics come from an all-to-all to whole sequences of this
rank's share of the heads (what Ulysses does around its kernel: memory O(T) per rank, no T x T matrix); the qr/
whole-tensor statistics are computed over the shards of each call together; gradients are divided as the engine
divides them (it sums over the SP group, except ZeRO-3 before DeepSpeed 0.20.2, which averages).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vscale_plugin.hf.registry import LayerParts, layer_parts
from vscale_plugin.hf.tensor_parallel import (
    full_features,
    gather_features,
    row_parallel,
    sharded_parameter,
    tensor_parallel_group,
    tensor_parallel_size,
)
from vscale_plugin.ops.vscale import VScale, phi
from vscale_plugin.stats import metrics
from vscale_plugin.stats import quant_readiness as qr
from vscale_plugin.stats.metrics import FORWARD_POINTS, GRAD_POINTS, PROFILE, REST
from vscale_plugin.stats.positions import Rows
from vscale_plugin.stats.rotary import kernel_queries_keys
from vscale_plugin.stats.sinks import sink_column, sink_sums

PARAM_GROUPS = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp", "vscale")


def _params(parts: LayerParts, group: str) -> list[nn.Parameter]:
    module = getattr(parts.attention, "vscale", None) if group == "vscale" else getattr(parts, group)
    return [p for p in module.parameters() if p.requires_grad] if module is not None else []


def _unwrap(model_or_engine: Any) -> nn.Module:
    module = model_or_engine
    while isinstance(getattr(module, "module", None), nn.Module) and not hasattr(
        getattr(module, "config", None), "model_type"
    ):
        module = module.module  # DeepSpeedEngine, DistributedDataParallel
    return module


def _tensor_parallel(layers: list[LayerParts]) -> Any:
    """The tensor-parallel group the layers are split over (DeepSpeed AutoTP), None without one; a layout the
    statistics do not combine is refused.

    What AutoTP gives and the statistics rely on: q/k/v (and the MLP's input side) column-parallel, each rank
    computing whole heads of the whole input, whose gradient the layer all-reduces; o_proj (and the down projection)
    row-parallel, its output all-reduced. The residual stream, the norms' outputs and every per-position gradient are
    then the same on every rank of the group; only the heads, the row-parallel inputs and the split matrices differ.
    """
    groups = []
    for parts in layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            module = getattr(parts, name)
            if tensor_parallel_size(module) == 1:
                continue
            column = not row_parallel(module) and not getattr(module, "gather_output", False)
            if column == (name == "o_proj"):
                raise NotImplementedError(
                    f"StatsCollector: layer {parts.index}'s {name} is split over tensor-parallel ranks as a "
                    f"{'column' if column else 'row'}-parallel {type(module).__name__}, a layout whose statistics "
                    "are not combined (AutoTP makes q/k/v column- and o_proj row-parallel); measure a run with "
                    "tensor_parallel.autotp_size 1, or its checkpoint with launchers/analyze.py"
                )
            groups.append(tensor_parallel_group(module))
    if any(group is not groups[0] for group in groups):
        raise NotImplementedError("StatsCollector: the layers are split over different tensor-parallel groups")
    return groups[0] if groups else None


def _mean_over_heads(per_head: torch.Tensor, module: nn.Module, head_dim: int) -> torch.Tensor:
    """This rank's share of the mean over a layer's KV heads of per-head values (..., the heads ``module`` gives this
    rank): the sum over its heads / all heads * the tensor-parallel size. Added over the group's ranks, whose counts of
    sequences add up as well, it is the mean over all heads; without tensor parallelism, the mean."""
    heads = full_features(module, per_head.shape[-1] * head_dim) // head_dim
    return per_head.sum(-1) * (tensor_parallel_size(module) / heads)


@dataclass(frozen=True)
class _SequenceShards:
    """A DeepSpeed Ulysses sequence-parallel group: each of its ``size`` ranks holds positions ``rank * T / size ..
    (rank + 1) * T / size - 1`` of every sequence (DeepSpeed's ``UlyssesSPDataLoaderAdapter``)."""

    group: Any
    size: int
    rank: int


def _sequence_parallel(target: Any) -> _SequenceShards | None:
    """The engine's sequence-parallel group (``sequence_parallel_size`` > 1), None without one."""
    from vscale_plugin.hf.sequence_parallel import sequence_parallel_size

    size = sequence_parallel_size(target)
    if size == 1:
        return None
    if not _is_engine(target):
        raise NotImplementedError(
            f"StatsCollector: the model runs under Ulysses sequence parallelism ({size} ranks share each sequence) "
            "but was given without its DeepSpeed engine; pass the engine deepspeed.initialize returned, whose "
            "sequence-parallel group the statistics are combined over"
        )
    group = target.seq_parallel_group
    return _SequenceShards(group=group, size=size, rank=dist.get_rank(group))


def _whole_sequences_of_my_heads(x: torch.Tensor, shards: _SequenceShards) -> torch.Tensor:
    """(batch, heads, T / sp, d) of this rank's shard -> (batch, heads / sp, T, d): every position of this rank's share
    of the heads, the exchange Ulysses makes around the kernel (an all-to-all; memory O(T) per rank)."""
    parts = [chunk.contiguous() for chunk in x.chunk(shards.size, dim=1)]
    received = [torch.empty_like(parts[0]) for _ in parts]
    dist.all_to_all(received, parts, group=shards.group)
    return torch.cat(received, dim=2)


def _is_engine(obj: Any) -> bool:
    return hasattr(obj, "is_gradient_accumulation_boundary") and hasattr(obj, "backward") and hasattr(obj, "module")


def _in_backward() -> bool:
    # Activation checkpointing re-runs forwards inside backward; their forward statistics must not count twice.
    return torch._C._current_graph_task_id() != -1


def _gets_grad(x: torch.Tensor) -> bool:
    # Without grad mode (the first forward of reentrant checkpointing) autograd never computes x's gradient.
    return x.requires_grad and torch.is_grad_enabled()


def _first_tensor(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def _padded_to(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` with its first dimension zero-padded to n (a profile of sequences shorter than n)."""
    return x if x.shape[0] >= n else torch.nn.functional.pad(x, (*(0, 0) * (x.dim() - 1), 0, n - x.shape[0]))


class StatsCollector:
    """Collects the SPEC section 4 metrics over one optimiser step every ``every`` steps.

    ``model_or_engine``: a Hugging Face decoder, the same wrapped in DistributedDataParallel, a DeepSpeed engine (what
    ``accelerator.prepare`` returns under DeepSpeed) or Accelerate's ``DeepSpeedEngineWrapper`` around one.
    With an engine, parameter gradients are read through ``deepspeed.utils.safe_get_full_grad`` right after the
    boundary micro-batch's backward (before clipping and the optimiser step), identical under ZeRO 0-3.
    ``distributed=False`` keeps the statistics of this process's data only (under DeepSpeed AutoTP, combined over its
    tensor-parallel group, whose ranks together hold the model that saw it). ``quant_readiness=False`` leaves out the
    ``qr/`` statistics (and their hooks). Architectures without statistics (see the registry) are refused here, with
    the reason.
    """

    def __init__(
        self, model_or_engine: Any, every: int = 100, distributed: bool = True, quant_readiness: bool = True
    ) -> None:
        if every < 1:
            raise ValueError(f"every={every}: the collector runs every N >= 1 optimiser steps")
        if _is_engine(getattr(model_or_engine, "engine", None)):
            model_or_engine = model_or_engine.engine  # Accelerate's DeepSpeedEngineWrapper
        self.target = model_or_engine
        self.model = _unwrap(model_or_engine)
        self.every = every
        self.distributed = distributed
        self.quant_readiness = quant_readiness
        self._resolve()
        self._result: dict[str, float] = {}
        self._profiles: dict[str, Any] = {}
        self._warned = False
        self._sums: list[dict[str, torch.Tensor]] = []
        self._counts = torch.zeros(PROFILE + 1, dtype=torch.float64)
        self._capture_token = object()
        self._param_norms: dict[str, float] = {}
        self._scratch: list[dict[str, torch.Tensor]] = []
        self._mask: torch.Tensor | None = None
        self._rows: Rows | None = None
        self._step: int | None = None
        self._handles: list[Any] | None = None
        self._restore_backward = None
        self._grads_read = False

    def _resolve(self) -> None:
        # Where to hook, again at each captured step: deepspeed.initialize (AutoTP) may have replaced the projections
        # since the collector was made, and hooks on the old modules would see nothing.
        self.layers = layer_parts(self.model)
        self._tp_group = _tensor_parallel(self.layers)
        self._sp = _sequence_parallel(self.target)
        if self._sp is not None and self._tp_group is not None:
            raise NotImplementedError(
                "StatsCollector: tensor and sequence parallelism together are not combined yet; measure with one"
            )
        self._taps = [qr.taps(parts) if self.quant_readiness else [] for parts in self.layers]

    def due(self, step: int) -> bool:
        return step % self.every == 0

    @contextlib.contextmanager
    def capture(self, step: int) -> Iterator[None]:
        """Wrap every micro-batch of optimiser step ``step``; does nothing (no hooks) unless the step is due."""
        self.start(step)
        try:
            yield
        except BaseException:
            self._release()
            raise
        self.stop()

    def start(self, step: int) -> bool:
        """Begin optimiser step ``step`` (the form of :meth:`capture` for loops that are not a ``with`` block).

        Hooks are installed only when the step is due; returns whether it is. Every micro-batch's forward and backward
        until :meth:`stop` belongs to this step. With a DeepSpeed engine (or Accelerate's ``DeepSpeedEngineWrapper``
        around it, which runs backward and step in one call) the parameter gradients are read inside the boundary
        micro-batch's ``engine.backward``, before the engine's step.
        """
        if self.active:
            raise RuntimeError(
                f"StatsCollector.start({step}): step {self._step} is still being captured; call stop() first"
            )
        self._result, self._profiles = {}, {}
        if not self.due(step):
            return False
        self._step = step
        self._resolve()
        self._sums = [{} for _ in self.layers]
        self._counts = torch.zeros(PROFILE + 1, dtype=torch.float64)
        self._capture_token = object()
        self._scratch = [{} for _ in self.layers]
        self._param_norms, self._mask, self._rows = {}, None, None
        self._grads_read = False
        self._handles = self._install()
        self._restore_backward = self._wrap_engine_backward() if _is_engine(self.target) else None
        return True

    def stop(self) -> dict[str, float]:
        """End the step begun by :meth:`start` and return its metrics (``{}`` when it was not due).

        Data-parallel aggregation is a collective: every rank calls ``stop`` for a due step. Without an engine the
        parameter gradients are read here (or earlier, by :meth:`read_parameter_gradients`), so call it before the
        optimiser's ``zero_grad``.
        """
        if not self.active:
            return self.result()
        try:
            if not self._grads_read:
                self.read_parameter_gradients()
            self._finish()
        finally:
            self._release()
        return self.result()

    @property
    def active(self) -> bool:
        """Whether a due step is being captured (between :meth:`start` and :meth:`stop`)."""
        return self._handles is not None

    def read_parameter_gradients(self) -> None:
        """Record the parameter-gradient norms now: for loops that clip or zero gradients before :meth:`stop` (a
        DeepSpeed engine needs no call; the collector reads them inside its boundary backward)."""
        if self.active and self._restore_backward is None:
            self._read_param_grads()
            self._grads_read = True

    def _release(self) -> None:
        for handle in self._handles or []:
            handle.remove()
        if self._restore_backward is not None:
            self._restore_backward()
        self._handles, self._restore_backward = None, None
        self._scratch, self._rows = [], None

    def result(self) -> dict[str, float]:
        """The metrics of the last capture (every rank gets the same dict); ``{}`` when that step was not due."""
        return dict(self._result)

    def profiles(self) -> dict[str, Any]:
        """Per-position gradient norms of the last capture (positions 0..63), per layer, for plots and artifacts."""
        return dict(self._profiles)

    # ---- hooks ----

    def _install(self) -> list[Any]:
        # Pre-hooks go first (prepend): ZeRO-3's own pre-hooks swap module inputs for identity copies whose gradient
        # misses the residual path; ours must see (and for the q/k/v paths, replace) the tensors that really flow.
        # The batch's mask and shape from the backbone (model.base_model, which owns the layers), not the causal-LM
        # wrapper: a loop that computes a chunked loss itself runs model.model(...) and the head on its own, and a
        # hook on the wrapper would miss those calls and keep a previous micro-batch's rows.
        backbone = getattr(self.model, "base_model", self.model)
        handles = [backbone.register_forward_pre_hook(self._model_inputs, with_kwargs=True, prepend=True)]
        for i, parts in enumerate(self.layers):
            handles += [
                parts.block.register_forward_pre_hook(partial(self._block_in, i), with_kwargs=True, prepend=True),
                parts.block.register_forward_hook(partial(self._point_out, i, "h_out")),
                parts.input_norm.register_forward_hook(partial(self._point_out, i, "h_tilde")),
                parts.q_proj.register_forward_pre_hook(partial(self._path_in, i, "path_q"), prepend=True),
                parts.k_proj.register_forward_pre_hook(partial(self._path_in, i, "path_k"), prepend=True),
                parts.v_proj.register_forward_pre_hook(partial(self._path_in, i, "path_v"), prepend=True),
                parts.q_source.register_forward_hook(partial(self._keep, i, "q")),
                parts.k_source.register_forward_hook(partial(self._keep, i, "k")),
                # prepend: V-scale's own hook on v_proj must not have scaled v yet (SPEC: v before V-scale)
                parts.v_proj.register_forward_hook(partial(self._value, i), prepend=True),
                parts.attention.register_forward_hook(partial(self._attention, i), with_kwargs=True),
                parts.attn_increment.register_forward_hook(partial(self._increment, i, "attn_out")),
                parts.mlp_norm.register_forward_pre_hook(partial(self._point_in, i, "h_half"), prepend=True),
                parts.mlp_norm.register_forward_hook(partial(self._point_out, i, "h_tilde_half")),
                parts.mlp_increment.register_forward_hook(partial(self._increment, i, "mlp_out")),
            ]
            vscale = getattr(parts.attention, "vscale", None)
            if isinstance(vscale, VScale):
                handles.append(vscale.register_forward_hook(partial(self._phi, i)))
            for tap in self._taps[i]:
                if tap.output:
                    handles.append(tap.module.register_forward_hook(partial(self._tap_out, i, tap)))
                else:
                    handles.append(tap.module.register_forward_pre_hook(partial(self._tap_in, i, tap)))
        return handles

    def _model_inputs(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)  # forward(input_ids, attention_mask)
        self._mask = mask.detach() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._rows = None  # made by the first layer, which knows the batch's shape

    def _current_rows(self, h_in: torch.Tensor) -> Rows:
        if self._rows is None:
            batch, length = h_in.shape[:2]
            if self._sp is None:
                self._rows = Rows.of(self._mask, batch, length, h_in.device)
            else:
                if self._mask is not None and not bool(self._mask.all()):
                    raise ValueError(
                        "StatsCollector: a padded batch under sequence parallelism (Ulysses drops the attention mask, "
                        "so pads would be attended to); pack the sequences to the full length instead"
                    )
                self._rows = Rows.shard(batch, length * self._sp.size, self._sp.rank * length, length, h_in.device)
            self._counts += self._rows.counts(PROFILE + 1).cpu()  # see metrics.profile_lengths
        return self._rows

    def _record(self, i: int, point: str, x: torch.Tensor) -> None:
        """Forward norm at positions 0..15 and, for a gradient point, a hook on x's gradient."""
        rows = self._rows
        if point in FORWARD_POINTS and not _in_backward():
            self._add_norms(i, f"fwd/{point}", rows.align(x.detach(), REST).float().norm(dim=-1))
        if point in GRAD_POINTS and self._first_hook(x, i, point):
            x.register_hook(partial(self._on_grad, i, point, rows))

    def _add_norms(self, i: int, key: str, norms: torch.Tensor) -> None:
        """Adds (batch, <=REST) per-position norms, summed over sequences (pads are zero), to layer i's sums."""
        self._add(i, key, _padded_to(norms.double().sum(0), REST))

    def _first_hook(self, x: torch.Tensor, i: int, point: str) -> bool:
        """Whether x's gradient, which autograd will compute, has no hook for (i, point) in this capture yet; marks it.

        Checkpointing that wraps a layer's ``__call__`` (as transformers 5.17 does) runs the layer's hooks again when
        backward recomputes it. Non-reentrant, they see the first forward's input tensor again (hence the mark);
        reentrant, the first forward runs without grad mode and only the recomputation's tensors get gradients (hence
        no hook without grad mode). Either way each gradient is counted once.
        """
        if not _gets_grad(x):
            return False
        token, seen = getattr(x, "_vsp_grad_hooks", (None, None))
        if token is not self._capture_token:
            seen = set()
            x._vsp_grad_hooks = (self._capture_token, seen)
        if (i, point) in seen:
            return False
        seen.add((i, point))
        return True

    def _block_in(self, i: int, module, args, kwargs) -> None:
        h_in = args[0] if args else kwargs["hidden_states"]
        self._current_rows(h_in)
        self._record(i, "h_in", h_in)

    def _point_in(self, i: int, point: str, module, args) -> None:
        self._record(i, point, args[0])

    def _point_out(self, i: int, point: str, module, args, output) -> None:
        self._record(i, point, _first_tensor(output))

    def _increment(self, i: int, point: str, module, args, output) -> None:
        # What the branch adds to the residual stream (SPEC 2: h_half = h_in + r_attn): the branch's output times the
        # architecture's multiplier. Its gradient is g(h_half) / g(h_out), so only its forward norm is taken here.
        if not _in_backward():
            x = _first_tensor(output).detach()
            norms = self._rows.align(x, REST).float().norm(dim=-1) * self.layers[i].branch_multiplier
            self._add_norms(i, f"fwd/{point}", norms)

    def _path_in(self, i: int, point: str, module, args):
        # A view of h̃ per projection: its gradient is that projection's contribution W^T g (SPEC: path split).
        x = args[0]
        if not _gets_grad(x):
            return None
        path = x.view_as(x)
        path.register_hook(partial(self._on_grad, i, point, self._rows))
        return (path, *args[1:])

    def _keep(self, i: int, name: str, module, args, output) -> None:
        if not _in_backward():
            self._scratch[i][name] = _first_tensor(output).detach()

    def _value(self, i: int, module, args, output) -> None:
        if _in_backward():
            return
        head_dim = self.layers[i].head_dim
        norms = self._rows.align(output.detach().unflatten(-1, (-1, head_dim)), REST).float().norm(dim=-1)
        self._add_norms(i, "fwd/v", _mean_over_heads(norms, module, head_dim))  # mean over KV heads

    def _phi(self, i: int, module: VScale, args, output) -> None:
        if _in_backward():
            return
        shard = args[1] if len(args) > 1 else None  # a tensor-parallel rank's KV heads (ValueHook passes it)
        v = args[0].detach().unflatten(-1, (-1, module.head_dim)).float()
        with torch.no_grad():
            p = phi(v.square().sum(-1), module.constant(shard).squeeze(-1).to(v.device))  # (b, T, kv)
            self._add_norms(
                i, "phi", _mean_over_heads(self._rows.align(p, REST), self.layers[i].v_proj, module.head_dim)
            )
            self._sums[i]["lambda"] = module.lam().detach().double().cpu()

    def _attention(self, i: int, module, args, kwargs, output) -> None:
        if _in_backward():
            return
        parts, scratch = self.layers[i], self._scratch[i]
        if "q" not in scratch or "k" not in scratch:
            raise NotImplementedError(f"layer {i}: the attention ran without its query and key projections")
        with torch.no_grad():
            q, k = kernel_queries_keys(
                scratch.pop("q"), scratch.pop("k"), parts.head_dim, parts.rope, kwargs.get("position_embeddings")
            )
            rows = self._rows
            if self._sp is not None:  # this rank's share of the heads over the whole sequences
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # each query head's key head
                q, k = (_whole_sequences_of_my_heads(x, self._sp) for x in (q, k))
                rows = rows.whole()
            # Under tensor or sequence parallelism this rank's heads: the sums count (sequence, head) pairs, so adding
            # them over the group covers every head once.
            column = sink_column(q, k, parts.scaling, rows, parts.sliding_window, parts.softcap)
            self._add(i, "sinks", sink_sums(column, rows).cpu())

    def _tap_in(self, i: int, tap: qr.Tap, module, args) -> None:
        self._quant_readiness(i, tap, args[0])

    def _tap_out(self, i: int, tap: qr.Tap, module, args, output) -> None:
        self._quant_readiness(i, tap, _first_tensor(output))

    def _quant_readiness(self, i: int, tap: qr.Tap, x: torch.Tensor) -> None:
        if _in_backward():
            return
        if not tap.output and row_parallel(tap.module):
            x = gather_features(x, tap.module)  # whole-tensor statistics of the input a run without TP has
        with torch.no_grad():
            x = qr.real_tokens(x, self._rows.mask(x.shape[1]) if self._rows.padded else None)
            shards = self._sp.group if self._sp is not None else None  # one call's sequences, in shards
            if tap.point is not None:
                self._add(i, f"qr/kurtosis/{tap.point}", qr.kurtosis_sum(x))
                self._add(i, f"qr/max_over_median/{tap.point}", qr.max_over_median(x, shards))
            if tap.linears:
                error = qr.int8_error(x, shards)
                for linear in tap.linears:  # q, k and v (gate and up) read one tensor
                    self._add(i, f"qr/int8_error/{linear}", error)

    def _on_grad(self, i: int, point: str, rows: Rows, grad: torch.Tensor) -> None:
        g = rows.align(grad.detach(), PROFILE).double().sum(0)  # summed over sequences, as autograd sums parameters'
        self._add(i, f"grad/{point}", _padded_to(g, PROFILE))

    def _add(self, i: int, key: str, value: torch.Tensor) -> None:
        table = self._sums[i]
        table[key] = value if key not in table else table[key] + value

    # ---- parameter gradients ----

    def _wrap_engine_backward(self):
        engine = self.target
        original = engine.backward

        def backward(*args, **kwargs):
            out = original(*args, **kwargs)
            if engine.is_gradient_accumulation_boundary():
                self._read_param_grads()
            return out

        engine.backward = backward

        def restore() -> None:
            del engine.backward  # back to the class method

        return restore

    def _read_param_grads(self) -> None:
        engine = self.target if _is_engine(self.target) else None
        if engine is not None:
            from deepspeed.utils import safe_get_full_grad
        squares: dict[str, list[float]] = {}  # [replicated, this rank's shares of split matrices]
        for i, parts in enumerate(self.layers):
            for group in PARAM_GROUPS:
                params = _params(parts, group)
                if not params:
                    continue
                total = squares[f"grad/{group}/L{i:02d}"] = [0.0, 0.0]
                for p in params:
                    grad = safe_get_full_grad(p) if engine is not None else p.grad
                    if grad is not None:
                        total[sharded_parameter(p)] += grad.detach().double().square().sum().item()
        if self._tp_group is not None:  # the norm of the whole matrix: its shares' squares added over the group
            keys = sorted(squares)
            split = torch.tensor([squares[key][1] for key in keys], dtype=torch.float64, device=_reduce_device())
            dist.all_reduce(split, group=self._tp_group)
            for key, value in zip(keys, split.tolist(), strict=True):
                squares[key][1] = value
        scale = self._loss_scale()
        self._param_norms = {key: math.sqrt(sum(total)) / scale for key, total in squares.items()}

    def _loss_scale(self) -> float:
        engine = self.target
        if _is_engine(engine) and engine.fp16_enabled():
            return float(engine.optimizer.cur_scale)
        return 1.0

    # ---- aggregation ----

    def _finish(self) -> None:
        hidden = self.model.config.hidden_size
        state: dict[str, torch.Tensor] = {"counts": self._counts}
        for i, sums in enumerate(self._sums):  # every rank sends the same entries, whatever it saw
            for point in GRAD_POINTS:
                sums.setdefault(f"grad/{point}", torch.zeros(PROFILE, hidden, dtype=torch.float64))
            for point in FORWARD_POINTS:
                sums.setdefault(f"fwd/{point}", torch.zeros(REST, dtype=torch.float64))
            sums.setdefault("sinks", torch.zeros(4, dtype=torch.float64))
            for key in (key for tap in self._taps[i] for key in tap.entries()):
                sums.setdefault(key, torch.zeros(2, dtype=torch.float64))
            if isinstance(getattr(self.layers[i].attention, "vscale", None), VScale):
                sums.setdefault("phi", torch.zeros(REST, dtype=torch.float64))
            state.update({f"L{i:02d}/{key}": value for key, value in sums.items() if key != "lambda"})
        # Over every rank, or (distributed=False) over this rank's tensor- or sequence-parallel group, whose ranks
        # hold one model's parts or one batch's shards. Sums of what a TP group's ranks hold alike count it once per
        # rank, as do the counts of sequences they are divided by; an SP group's ranks hold each position once. The
        # gradients are divided by the ranks summed over, as the optimiser averages them, except an SP group's where
        # the engine sums over it (each rank back-propagates its share of the batch's loss).
        group = None if self.distributed else (self._tp_group or (self._sp.group if self._sp else None))
        world = 1
        if dist.is_available() and dist.is_initialized() and (self.distributed or group is not None):
            world = dist.get_world_size(group)
        if world > 1:
            state = _all_reduce_sum(state, _reduce_device(), group)
        self._result, self._profiles = self._metrics(state, world // self._sums_over_sequence_parallel())

    def _sums_over_sequence_parallel(self) -> int:
        """The SP size when the engine sums gradients over the SP group (ZeRO-1/2, ZeRO-3 from DeepSpeed 0.20.2), 1
        without SP or where it averages over it (ZeRO-3 before 0.20.2)."""
        if self._sp is None:
            return 1
        from vscale_plugin.hf.sequence_parallel import zero3_averages_over_sequence_parallel

        return 1 if zero3_averages_over_sequence_parallel(self.target.zero_optimization_stage()) else self._sp.size

    def _metrics(self, state: dict[str, torch.Tensor], world: int) -> tuple[dict[str, float], dict[str, Any]]:
        counts = state["counts"]
        out: dict[str, float] = {}
        profiles: dict[str, Any] = {"positions": list(range(metrics.profile_lengths(counts)[1])), "layers": {}}
        for i, sums in enumerate(self._sums):
            tag = f"L{i:02d}"
            layer = {key.split("/", 1)[1]: value for key, value in state.items() if key.startswith(f"{tag}/")}
            out.update(metrics.layer_metrics(tag, layer, counts, world))
            profile = metrics.gradient_profile(layer, counts, world)
            if profile is not None:
                profiles["layers"][tag] = profile
            for h, value in enumerate(sums["lambda"].tolist() if "lambda" in sums else []):
                out[f"vscale/lambda/{tag}/H{h}"] = value
        out.update(self._param_norms)
        out.update(metrics.summaries(out, len(self.layers)))
        self._check_finite(out)
        return out, profiles

    def _check_finite(self, out: dict[str, float]) -> None:
        bad = sorted(k for k, v in out.items() if not math.isfinite(v))
        if bad and not self._warned:
            self._warned = True
            warnings.warn(
                f"gradient-sink statistics: {len(bad)} non-finite values (e.g. {bad[0]} = {out[bad[0]]}); "
                "reported as they are",
                RuntimeWarning,
                stacklevel=3,
            )


def _reduce_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_sum(
    tensors: dict[str, torch.Tensor], device: torch.device, group: Any = None
) -> dict[str, torch.Tensor]:
    """The sum over the ranks of ``group`` (None: all) of every tensor, in one collective (every rank passes the same
    keys and shapes)."""
    keys = sorted(tensors)
    flat = torch.cat([tensors[k].to(device=device, dtype=torch.float64).flatten() for k in keys])
    dist.all_reduce(flat, group=group)
    out, offset = {}, 0
    for key in keys:
        n = tensors[key].numel()
        out[key] = flat[offset : offset + n].view(tensors[key].shape).cpu()
        offset += n
    return out


def causal_lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Labels that make the loss the one of the unpadded sequences together: pads are ignored, and so is each row's
    first real token (after a left pad it would be "predicted" from a pad position)."""
    if attention_mask is None:
        return input_ids
    rows = Rows.of(attention_mask, *input_ids.shape, input_ids.device)
    labels = input_ids.masked_fill(~rows.mask(input_ids.shape[1]), -100)
    return labels.scatter(1, rows.start[:, None], -100)


def measure(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, float]:
    """Every SPEC section 4 metric for one batch: one forward+backward of the causal-LM loss, no optimiser step.

    With ``attention_mask`` (left or right padding), each row is measured from its first real token and pads count
    for nothing: the result is that of the unpadded sequences together. Parameters' ``.grad`` are left exactly as they
    were (the measurement's own gradients are discarded). ``input_ids`` of shape (batch, T) or (T,) (one sequence),
    of any integer dtype; called under ``torch.no_grad()`` or ``torch.inference_mode()`` it still back-propagates
    (it needs the gradients it measures).
    """
    input_ids, attention_mask = _as_batch(input_ids, attention_mask)
    with torch.inference_mode(False), torch.enable_grad():
        return _measure(model, input_ids.clone(), None if attention_mask is None else attention_mask.clone())


def _as_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(batch, T) int64 ids and mask from what a user may pass: one sequence, int32 ids, a bool mask."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.is_complex():
        kind = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise TypeError(f"measure: input_ids must be a tensor of integer token ids, got {kind}; tokenise text first")
    if input_ids.dim() not in (1, 2) or input_ids.numel() == 0:
        raise ValueError(
            f"measure: input_ids has shape {tuple(input_ids.shape)}; give (batch, seq_len) token ids, or (seq_len,) "
            "for one sequence"
        )
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
    if attention_mask is not None:
        attention_mask = attention_mask.to(torch.long)
    return input_ids.to(torch.long), attention_mask


def _measure(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict[str, float]:
    collector = StatsCollector(model, every=1, distributed=False)
    labels = causal_lm_labels(input_ids, attention_mask)
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        with collector.capture(0):
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            loss.backward()
    finally:
        for p, grad in zip(params, saved, strict=True):
            p.grad = grad
    return collector.result()
