"""Attention sinks, massive activations and gradient sinks, measured during training (SPEC sections 2 and 4).

A :class:`StatsCollector` hooks the model only inside ``capture(step)`` on due steps: module hooks record forward
statistics, and tensor hooks on the residual stream, the norm outputs and the three projection inputs record the
gradient of every position < 64, summed over the sequences of each micro-batch. Sums over micro-batches, then the
mean over data-parallel ranks, give exactly the optimiser's combination of the gradient; norms come last.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vscale_plugin.hf.registry import architecture_of
from vscale_plugin.ops.vscale import VScale, phi
from vscale_plugin.stats.sinks import sink_column, sink_sums

PROFILE = 64  # positions whose gradients are kept (the paper's token-wise plots show 0..63)
REST = 16  # "rest" averages tokens 1..15
T_E = 31  # R_GS divides by the mean over tokens 1..31

FORWARD_POINTS = ("h_in", "h_half", "h_out", "attn_out", "mlp_out", "v")
GRAD_POINTS = (
    "h_in",
    "h_tilde",
    "path_q",
    "path_k",
    "path_v",
    "attn_out",
    "h_half",
    "h_tilde_half",
    "mlp_out",
    "h_out",
)
PARAM_GROUPS = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp", "vscale")


@dataclass
class _Layer:
    block: nn.Module
    input_norm: nn.Module
    attn: nn.Module
    post_norm: nn.Module
    mlp: nn.Module

    @property
    def vscale(self) -> VScale | None:
        return getattr(self.attn, "vscale", None)

    def params(self, group: str) -> list[nn.Parameter]:
        if group == "mlp":
            return [p for p in self.mlp.parameters() if p.requires_grad]
        module = self.vscale if group == "vscale" else getattr(self.attn, group)
        return [p for p in module.parameters() if p.requires_grad] if module is not None else []


@dataclass
class _Sums:
    """What one layer accumulates during a capture; every entry is added over micro-batches and ranks."""

    forward: dict[str, torch.Tensor] = field(default_factory=dict)  # point -> (REST,) sum of norms over sequences
    sequences: float = 0.0
    sinks: torch.Tensor | None = None  # (4,) from sink_sums
    phi: torch.Tensor | None = None  # (REST,) sum over sequences of mean-over-heads phi
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # point -> (PROFILE, d) summed gradient vectors
    lam: torch.Tensor | None = None


def _unwrap(model_or_engine: Any) -> nn.Module:
    module = model_or_engine
    while isinstance(getattr(module, "module", None), nn.Module) and not hasattr(
        getattr(module, "config", None), "model_type"
    ):
        module = module.module  # DeepSpeedEngine, DistributedDataParallel
    return module


def _is_engine(obj: Any) -> bool:
    return hasattr(obj, "is_gradient_accumulation_boundary") and hasattr(obj, "backward") and hasattr(obj, "module")


def _layers(model: nn.Module) -> list[_Layer]:
    arch = architecture_of(model)
    layers = []
    for block in getattr(model.base_model, arch.layers):
        parts = [
            getattr(block, name, None) for name in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
        ]
        if any(p is None for p in parts) or hasattr(block, "pre_feedforward_layernorm"):
            raise NotImplementedError(
                f"gradient-sink statistics need the pre-norm layout h_half = h_in + attn(norm(h_in)), "
                f"h_out = h_half + mlp(norm(h_half)); {model.config.model_type} layers differ"
            )
        layers.append(_Layer(block, *parts))
    return layers


def _in_backward() -> bool:
    # Activation checkpointing re-runs forwards inside backward; their forward statistics must not count twice.
    return torch._C._current_graph_task_id() != -1


def _gets_grad(x: torch.Tensor) -> bool:
    # Without grad mode (the first forward of reentrant checkpointing) autograd never computes x's gradient.
    return x.requires_grad and torch.is_grad_enabled()


def _first_tensor(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


class StatsCollector:
    """Collects the SPEC section 4 metrics over one optimiser step every ``every`` steps.

    ``model_or_engine``: a Hugging Face decoder, the same wrapped in DistributedDataParallel, or a DeepSpeed engine.
    With an engine, parameter gradients are read through ``deepspeed.utils.safe_get_full_grad`` right after the
    boundary micro-batch's backward (before clipping and the optimiser step), identical under ZeRO 0-3.
    ``distributed=False`` keeps the statistics of this process only.
    """

    def __init__(self, model_or_engine: Any, every: int = 100, distributed: bool = True) -> None:
        if every < 1:
            raise ValueError(f"every={every}: the collector runs every N >= 1 optimiser steps")
        self.target = model_or_engine
        self.model = _unwrap(model_or_engine)
        self.layers = _layers(self.model)
        self.every = every
        self.distributed = distributed
        self._result: dict[str, float] = {}
        self._profiles: dict[str, Any] = {}
        self._warned = False
        self._sums: list[_Sums] = []
        self._capture_token = object()
        self._param_norms: dict[str, float] = {}
        self._scratch: list[dict[str, Any]] = []
        self._seq_len = 0
        self._key_mask: torch.Tensor | None = None

    def due(self, step: int) -> bool:
        return step % self.every == 0

    @contextlib.contextmanager
    def capture(self, step: int) -> Iterator[None]:
        """Wrap every micro-batch of optimiser step ``step``; does nothing (no hooks) unless the step is due."""
        self._result, self._profiles = {}, {}
        if not self.due(step):
            yield
            return
        self._sums = [_Sums() for _ in self.layers]
        self._capture_token = object()
        self._scratch = [{} for _ in self.layers]
        self._param_norms, self._seq_len, self._key_mask = {}, 0, None
        handles = self._install()
        restore_backward = self._wrap_engine_backward() if _is_engine(self.target) else None
        try:
            yield
            if restore_backward is None:
                self._read_param_grads()
            self._finish()
        finally:
            for handle in handles:
                handle.remove()
            if restore_backward is not None:
                restore_backward()
            self._scratch = []

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
        handles = [self.model.register_forward_pre_hook(self._model_inputs, with_kwargs=True, prepend=True)]
        for i, layer in enumerate(self.layers):
            attn = layer.attn
            handles += [
                layer.block.register_forward_pre_hook(partial(self._block_in, i), with_kwargs=True, prepend=True),
                layer.block.register_forward_hook(partial(self._point_out, i, "h_out")),
                layer.input_norm.register_forward_hook(partial(self._point_out, i, "h_tilde")),
                attn.q_proj.register_forward_pre_hook(partial(self._path_in, i, "path_q"), prepend=True),
                attn.k_proj.register_forward_pre_hook(partial(self._path_in, i, "path_k"), prepend=True),
                attn.v_proj.register_forward_pre_hook(partial(self._path_in, i, "path_v"), prepend=True),
                attn.q_proj.register_forward_hook(partial(self._keep, i, "q")),
                attn.k_proj.register_forward_hook(partial(self._keep, i, "k")),
                # prepend: V-scale's own hook on v_proj must not have scaled v yet (SPEC: v before V-scale)
                attn.v_proj.register_forward_hook(partial(self._value, i), prepend=True),
                attn.o_proj.register_forward_hook(partial(self._point_out, i, "attn_out")),
                attn.register_forward_hook(partial(self._attention, i), with_kwargs=True),
                layer.post_norm.register_forward_pre_hook(partial(self._point_in, i, "h_half"), prepend=True),
                layer.post_norm.register_forward_hook(partial(self._point_out, i, "h_tilde_half")),
                layer.mlp.register_forward_hook(partial(self._point_out, i, "mlp_out")),
            ]
            if layer.vscale is not None:
                handles.append(layer.vscale.register_forward_hook(partial(self._phi, i)))
        return handles

    def _model_inputs(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        self._key_mask = mask.detach() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _record(self, i: int, point: str, x: torch.Tensor) -> None:
        """Forward norm at positions 0..15 and, for a gradient point, a hook on x's gradient."""
        if point in FORWARD_POINTS and not _in_backward():
            norms = x.detach()[:, :REST].float().norm(dim=-1).double().sum(0)
            self._add(self._sums[i].forward, point, norms)
        if point in GRAD_POINTS and self._first_hook(x, i, point):
            x.register_hook(partial(self._on_grad, i, point))

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
        if not _in_backward():
            self._sums[i].sequences += h_in.shape[0]
            self._seq_len = h_in.shape[1] if self._seq_len == 0 else min(self._seq_len, h_in.shape[1])
        self._record(i, "h_in", h_in)

    def _point_in(self, i: int, point: str, module, args) -> None:
        self._record(i, point, args[0])

    def _point_out(self, i: int, point: str, module, args, output) -> None:
        self._record(i, point, _first_tensor(output))

    def _path_in(self, i: int, point: str, module, args):
        # A view of h̃ per projection: its gradient is that projection's contribution W^T g (SPEC: path split).
        x = args[0]
        if not _gets_grad(x):
            return None
        path = x.view_as(x)
        path.register_hook(partial(self._on_grad, i, point))
        return (path, *args[1:])

    def _keep(self, i: int, name: str, module, args, output) -> None:
        if not _in_backward():
            self._scratch[i][name] = output.detach()

    def _value(self, i: int, module, args, output) -> None:
        if _in_backward():
            return
        attn = self.layers[i].attn
        heads = output.detach().unflatten(-1, (-1, attn.head_dim))
        norms = heads[:, :REST].float().norm(dim=-1).mean(-1).double().sum(0)  # mean over KV heads
        self._add(self._sums[i].forward, "v", norms)

    def _phi(self, i: int, module: VScale, args, output) -> None:
        if _in_backward():
            return
        v = args[0].detach().unflatten(-1, (module.num_kv_heads, module.head_dim)).float()
        with torch.no_grad():
            p = phi(v.square().sum(-1), module.constant().squeeze(-1).to(v.device))
            self._add_one(i, "phi", p[:, :REST].mean(-1).double().sum(0))
            self._sums[i].lam = module.lam().detach().double().cpu()

    def _attention(self, i: int, module, args, kwargs, output) -> None:
        if _in_backward():
            return
        scratch = self._scratch[i]
        cos_sin = kwargs.get("position_embeddings")
        if cos_sin is None or "q" not in scratch:
            raise NotImplementedError("sink statistics need the attention's position_embeddings (RoPE cos, sin)")
        with torch.no_grad():
            q, k = _post_rope_qk(module, scratch.pop("q"), scratch.pop("k"), *cos_sin)
            window = getattr(module, "sliding_window", getattr(self.model.config, "sliding_window", None))
            mask = self._key_mask
            column = sink_column(q, k, module.scaling, key_mask=mask, sliding_window=window)
            self._add_one(i, "sinks", sink_sums(column, mask).cpu())

    def _on_grad(self, i: int, point: str, grad: torch.Tensor) -> None:
        g = grad.detach()[:, :PROFILE].double().sum(0)  # summed over sequences, as autograd sums parameter grads
        if g.shape[0] < PROFILE:
            g = torch.nn.functional.pad(g, (0, 0, 0, PROFILE - g.shape[0]))
        self._add(self._sums[i].grads, point, g)

    def _add(self, table: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
        table[key] = value if key not in table else table[key] + value

    def _add_one(self, i: int, name: str, value: torch.Tensor) -> None:
        current = getattr(self._sums[i], name)
        setattr(self._sums[i], name, value if current is None else current + value)

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
        for i, layer in enumerate(self.layers):
            for group in PARAM_GROUPS:
                params = layer.params(group)
                if not params:
                    continue
                total = 0.0
                for p in params:
                    grad = safe_get_full_grad(p) if engine is not None else p.grad
                    if grad is not None:
                        total += grad.detach().double().square().sum().item() / self._loss_scale() ** 2
                self._param_norms[f"grad/{group}/L{i:02d}"] = math.sqrt(total)

    def _loss_scale(self) -> float:
        engine = self.target
        if _is_engine(engine) and engine.fp16_enabled():
            return float(engine.optimizer.cur_scale)
        return 1.0

    # ---- aggregation ----

    def _finish(self) -> None:
        sums = self._sums
        hidden = self.model.config.hidden_size
        for s in sums:  # every rank packs the same layout, whatever it saw
            for point in GRAD_POINTS:
                s.grads.setdefault(point, torch.zeros(PROFILE, hidden, dtype=torch.float64))
            for point in FORWARD_POINTS:
                s.forward.setdefault(point, torch.zeros(REST, dtype=torch.float64))
        device = _reduce_device(self.model)
        parts: list[torch.Tensor] = []
        for s in sums:
            parts += [s.grads[p].flatten().to(device) for p in GRAD_POINTS]
            parts += [s.forward[p].to(device) for p in FORWARD_POINTS]
            parts.append(torch.tensor([s.sequences], dtype=torch.float64, device=device))
            parts.append((s.sinks if s.sinks is not None else torch.zeros(4, dtype=torch.float64)).to(device))
            parts.append((s.phi if s.phi is not None else torch.zeros(REST, dtype=torch.float64)).to(device))
        flat = torch.cat(parts)
        world = 1
        if self.distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            dist.all_reduce(flat)
        self._unpack(flat.cpu(), world, hidden)

    def _unpack(self, flat: torch.Tensor, world: int, hidden: int) -> None:
        out: dict[str, float] = {}
        profiles: dict[str, Any] = {"positions": list(range(PROFILE)), "layers": {}}
        offset = 0

        def take(n: int) -> torch.Tensor:
            nonlocal offset
            offset += n
            return flat[offset - n : offset]

        seq_len = self._seq_len
        for i, layer in enumerate(self.layers):
            tag = f"L{i:02d}"
            grads = {p: take(PROFILE * hidden).view(PROFILE, hidden) / world for p in GRAD_POINTS}
            forward = {p: take(REST) for p in FORWARD_POINTS}
            sequences = take(1).item()
            sinks = take(4)
            phi_sums = take(REST)
            self._forward_metrics(out, tag, forward, sequences, sinks)
            if grads["h_tilde"].abs().sum() > 0:
                self._gradient_metrics(out, tag, grads, seq_len, profiles, i)
            if layer.vscale is not None:
                kv_phi = phi_sums / max(sequences, 1.0)
                out[f"vscale/phi/tok0/{tag}"] = kv_phi[0].item()
                out[f"vscale/phi/rest/{tag}"] = kv_phi[1:REST].mean().item()
                lam = self._sums[i].lam
                for h, value in enumerate(lam.tolist() if lam is not None else []):
                    out[f"vscale/lambda/{tag}/H{h}"] = value
        out.update(self._param_norms)
        self._summaries(out)
        self._check_finite(out)
        self._result, self._profiles = out, profiles

    def _forward_metrics(self, out, tag, forward, sequences, sinks) -> None:
        n = max(sequences, 1.0)
        for point in FORWARD_POINTS:
            norms = forward[point] / n
            out[f"ma/{point}/tok0/{tag}"] = norms[0].item()
            out[f"ma/{point}/rest/{tag}"] = norms[1:REST].mean().item()
        pairs = max(sinks[3].item(), 1.0)
        out[f"as/sink_rate/{tag}"] = sinks[0].item() / pairs
        out[f"as/mass/{tag}"] = sinks[1].item() / pairs
        out[f"as/mass_sq/{tag}"] = sinks[2].item() / pairs

    def _gradient_metrics(self, out, tag, g, seq_len, profiles, i) -> None:
        t = min(PROFILE, seq_len)
        norm = {p: g[p][:t].norm(dim=-1) for p in GRAD_POINTS}
        t_e = min(T_E, t - 1)
        out[f"gs/ratio/{tag}"] = (norm["h_tilde"][0] / norm["h_tilde"][1 : t_e + 1].mean()).item()  # R_GS
        for name, point in (("grad_in", "h_tilde"), ("q", "path_q"), ("k", "path_k"), ("v", "path_v")):
            self._tok0_rest(out, f"gs/{name}", tag, norm[point])
        ratios = {
            # attention branch: reshaping of the gradient by RMSNorm and the attention block (SPEC section 2)
            "bloat_attn": norm["h_tilde"] / norm["attn_out"],
            "compress_attn": (g["h_in"][:t] - g["h_half"][:t]).norm(dim=-1) / norm["h_tilde"],
            "change_attn": norm["h_in"] / norm["h_half"],
            "bloat_mlp": norm["h_tilde_half"] / norm["mlp_out"],
            "compress_mlp": (g["h_half"][:t] - g["h_out"][:t]).norm(dim=-1) / norm["h_tilde_half"],
            "change_mlp": norm["h_half"] / norm["h_out"],
        }
        for name, per_token in ratios.items():
            self._tok0_rest(out, f"gs/{name}", tag, per_token)
        profiles["layers"][tag] = {
            "grad_in": norm["h_tilde"].tolist(),
            "q": norm["path_q"].tolist(),
            "k": norm["path_k"].tolist(),
            "v": norm["path_v"].tolist(),
        }

    @staticmethod
    def _tok0_rest(out: dict[str, float], prefix: str, tag: str, per_token: torch.Tensor) -> None:
        out[f"{prefix}/tok0/{tag}"] = per_token[0].item()
        out[f"{prefix}/rest/{tag}"] = per_token[1:REST].mean().item()

    def _summaries(self, out: dict[str, float]) -> None:
        def over_layers(prefix: str) -> list[float]:
            return [out[f"{prefix}/L{i:02d}"] for i in range(len(self.layers)) if f"{prefix}/L{i:02d}" in out]

        ratios = over_layers("gs/ratio")
        if ratios:
            out["gs/ratio/median"] = statistics.median(ratios)
        out["as/sink_rate/mean"] = statistics.fmean(over_layers("as/sink_rate"))
        out["ma/h_out/tok0/max"] = max(over_layers("ma/h_out/tok0"))
        out["ma/mlp_out/tok0/max"] = max(over_layers("ma/mlp_out/tok0"))

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


def _reduce_device(model: nn.Module) -> torch.device:
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _post_rope_qk(attn: nn.Module, q_raw: torch.Tensor, k_raw: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The queries and keys the attention kernel sees: projections, optional q/k norms, RoPE (the model's own)."""
    b, t, _ = q_raw.shape
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    q, k = q_raw, k_raw
    per_projection = q_norm is not None and _norm_width(q_norm) == q_raw.shape[-1]  # OLMo 2 normalises q, k whole
    if per_projection:
        q, k = q_norm(q), k_norm(k)
    q = q.view(b, t, -1, attn.head_dim)
    k = k.view(b, t, -1, attn.head_dim)
    if q_norm is not None and not per_projection:
        q, k = q_norm(q), k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    apply_rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    return apply_rope(q, k, cos, sin)


def _norm_width(norm: nn.Module) -> int:
    weight = getattr(norm, "weight", None)
    if weight is None:
        return -1
    shape = getattr(weight, "ds_shape", weight.shape)
    return int(shape[-1])


def measure(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, float]:
    """Every SPEC section 4 metric for one batch: one forward+backward of the causal-LM loss, no optimiser step.

    Parameters' ``.grad`` are left exactly as they were (the measurement's own gradients are discarded).
    """
    collector = StatsCollector(model, every=1, distributed=False)
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        with collector.capture(0):
            labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            loss.backward()
    finally:
        for p, grad in zip(params, saved, strict=True):
            p.grad = grad
    return collector.result()
