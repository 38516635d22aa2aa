"""An independent float64 reference for every gradient-sink statistic of SPEC sections 2 and 4.

It re-runs a Hugging Face decoder eagerly from the model's parameters (the building blocks of ``tests/reference.py``),
keeps the full attention matrix and every intermediate of each layer with ``retain_grad()``, back-propagates the
mean next-token cross-entropy (Hugging Face's causal-LM loss with ``labels=input_ids``) and computes the metrics
from the retained tensors. It shares no code with ``vscale_plugin``: from the model it reads only parameters,
config numbers, ``config.vscale`` and the theta tensors.

What each family computes is written out in :data:`ARCHS`, read from transformers 5.24's
``models/<type>/modeling_<type>.py``. Embeddings, every norm (input, post-attention, the sandwich norms of GLM-4 and
Gemma 2, q/k norms, the final norm), q/k/v/o projections with their biases, rotary embeddings (half-split,
interleaved, partial, none on NoPE layers), score scaling, soft-capping, causal and sliding-window masks, softmax,
V-scale, the residual arithmetic and the logits are this module's own code. The MLP alone (dense, GLM's fused
gate_up, StarCoder2's c_fc/c_proj, and the mixture-of-experts blocks with their routers) is a black box: a float64
copy of the model's own ``mlp`` submodule, called with this module's float64 parameter leaves. No statistic depends on
its inside: only its input h̃_half, its output and the gradient of all its parameters (``grad/mlp``) are used, and,
for the ``qr/`` statistics of a dense MLP, the input of its down projection, taken by this module's own hook on the
copy.

Quantisation readiness (``qr/``, SPEC section 4) is computed from the traced tensors in float64 (h_out, h̃, the
attention output before o_proj, h̃_half, the down projection's input), over the real tokens of the whole batch: one
batch is one forward call. :func:`quant_readiness_terms` gives the terms that several calls combine by
(:func:`combine_quant_readiness`): kurtosis per token, the other two per call.

Padding (SPEC section 2): the real tokens of each row form that row's own sequence, which runs alone, from position
0, with no padding anywhere in the reference (rows of equal length run together as one batch, a :class:`Run`). The
loss is the mean next-token cross-entropy over every real target of every sequence; per-position gradient vectors
are summed over the sequences that have that position, and only then turned into norms; forward per-position norms
are averaged over the sequences that have that position; sink scores are per (sequence, head), each over its own
window min(T_eps, T_j).
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.func import functional_call

from tests.reference import (
    Shapes,
    causal_mask,
    layer_norm,
    rms_norm,
    rms_norm_1p,
    rope_angles,
    rope_half_split,
    rope_interleaved,
)

T_EPS = 64  # sink score window
EPS_SINK = 0.3  # sink threshold
T_E = 31  # R_GS denominator: positions 1..31
REST = 15  # "rest": positions 1..15

ACTIVATIONS = ("h_in", "h_half", "h_out", "attn_out", "mlp_out", "v")
GRAD_PATHS = ("grad_in", "q", "k", "v")
RESHAPING = tuple(f"{m}_{b}" for m in ("bloat", "compress", "change") for b in ("attn", "mlp"))
PARAM_GROUPS = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp")


# ---------------------------------------------------------------------------------------------------------------
# What each architecture computes (transformers 5.24)


@dataclass(frozen=True)
class Arch:
    """The differences of one decoder family from Llama, each as its modeling file writes it."""

    norm: str = "rms"  # "rms": w * x / rms(x); "rms_1p": (1 + w) * x / rms(x) (Gemma); "layer": LayerNorm + bias
    rope: str = "half"  # "half": rotate_half on (x[:d/2], x[d/2:]); "interleaved": pairs (x[2i], x[2i+1])
    partial_rotary: bool = False  # only the first int(d * rope_parameters["partial_rotary_factor"]) dims rotate
    qk_norm: bool = False  # per-head RMSNorm (self_attn.q_norm / k_norm over head_dim) on q and k before RoPE
    nope: bool = False  # config.no_rope_layers[i] == 0: layer i has no RoPE
    sliding: str = "none"  # "global": config.sliding_window on every layer; "per_layer": where layer_types says so
    scaling: str = "head_dim"  # scores * head_dim**-0.5 | "attention_multiplier" | "query_pre_attn_scalar"**-0.5
    softcap: bool = False  # tanh(s / cap) * cap on scores (attn_logit_softcapping, before the mask) and logits
    embed_scale: str = "none"  # "sqrt_hidden": embeddings * sqrt(hidden) (Gemma); "embedding_multiplier" (Granite)
    granite: bool = False  # both branches * residual_multiplier before the residual add; logits / logits_scaling
    # Sandwich norms: (norm after attention, MLP input norm, norm after the MLP); None: Llama's
    # (-, post_attention_layernorm, -).
    sandwich: tuple[str, str, str] | None = None
    # The MLP's linears with a qr/int8_error key, and the name of its down projection inside the MLP: none in a
    # mixture of experts (no single down projection sees every token); StarCoder2's c_fc is an ungated up projection.
    mlp_linears: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    down_proj: str | None = "down_proj"


ARCHS: dict[str, Arch] = {
    "llama": Arch(),
    "mistral": Arch(sliding="global"),  # MistralModel: sliding-window mask whenever config.sliding_window is set
    "ministral": Arch(sliding="per_layer"),
    "mixtral": Arch(sliding="global", mlp_linears=(), down_proj=None),
    "qwen2": Arch(sliding="per_layer"),  # q/k/v biases: read from the state dict like every bias
    "qwen2_moe": Arch(sliding="per_layer", mlp_linears=(), down_proj=None),
    "qwen3": Arch(qk_norm=True, sliding="per_layer"),
    "qwen3_moe": Arch(qk_norm=True, sliding="global", mlp_linears=(), down_proj=None),
    "gemma": Arch(norm="rms_1p", embed_scale="sqrt_hidden"),
    "gemma2": Arch(
        norm="rms_1p",
        embed_scale="sqrt_hidden",
        scaling="query_pre_attn_scalar",
        softcap=True,
        sliding="per_layer",
        sandwich=("post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    ),
    "granite": Arch(scaling="attention_multiplier", embed_scale="embedding_multiplier", granite=True),
    "glm": Arch(rope="interleaved", partial_rotary=True),
    "glm4": Arch(
        rope="interleaved",
        partial_rotary=True,
        sandwich=("post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm"),
    ),
    "starcoder2": Arch(norm="layer", sliding="global", mlp_linears=("up_proj", "down_proj"), down_proj="c_proj"),
    "smollm3": Arch(nope=True, sliding="per_layer"),
    "helium": Arch(rope="interleaved"),
}


@dataclass(frozen=True)
class Settings:
    """The config numbers the forward pass needs, per layer where they vary."""

    arch: Arch
    shapes: Shapes
    eps: float
    rotary_dim: int
    rope_layers: tuple[bool, ...]  # RoPE on layer i
    windows: tuple[int | None, ...]  # sliding window of layer i (None: full causal)
    scaling: float
    attn_softcap: float | None
    final_softcap: float | None
    embed_scale: float
    residual_multiplier: float
    logits_scaling: float

    @classmethod
    def of(cls, model) -> Settings:
        config = model.config
        model_type = config.model_type
        if model_type not in ARCHS:
            raise NotImplementedError(
                f"the statistics reference does not model {model_type!r}; it models {', '.join(sorted(ARCHS))}"
            )
        arch = ARCHS[model_type]
        shapes = Shapes.of(config)
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise NotImplementedError(f"the reference models default RoPE only, not {rope['rope_type']!r}")
        hd, n = shapes.head_dim, shapes.layers
        rotary_dim = int(hd * rope.get("partial_rotary_factor", 1.0)) if arch.partial_rotary else hd
        rope_layers = tuple(bool(config.no_rope_layers[i]) for i in range(n)) if arch.nope else (True,) * n
        window = getattr(config, "sliding_window", None)
        if arch.sliding == "global":
            windows = (window,) * n
        elif arch.sliding == "per_layer":
            windows = tuple(window if config.layer_types[i] == "sliding_attention" else None for i in range(n))
        else:
            windows = (None,) * n
        scaling = {
            "head_dim": hd**-0.5,
            "attention_multiplier": float(getattr(config, "attention_multiplier", 1.0)),
            "query_pre_attn_scalar": float(getattr(config, "query_pre_attn_scalar", 1.0)) ** -0.5,
        }[arch.scaling]
        embed_scale = {
            "none": 1.0,
            "sqrt_hidden": shapes.hidden**0.5,
            "embedding_multiplier": float(getattr(config, "embedding_multiplier", 1.0)),
        }[arch.embed_scale]
        return cls(
            arch=arch,
            shapes=shapes,
            eps=shapes.eps,
            rotary_dim=rotary_dim,
            rope_layers=rope_layers,
            windows=windows,
            scaling=scaling,
            attn_softcap=getattr(config, "attn_logit_softcapping", None) if arch.softcap else None,
            final_softcap=getattr(config, "final_logit_softcapping", None) if arch.softcap else None,
            embed_scale=embed_scale,
            residual_multiplier=float(config.residual_multiplier) if arch.granite else 1.0,
            logits_scaling=float(config.logits_scaling) if arch.granite else 1.0,
        )


# ---------------------------------------------------------------------------------------------------------------
# Traces


@dataclass
class LayerTrace:
    """Every intermediate of one decoder layer for one run (float64, gradients retained after ``backward``)."""

    h_in: torch.Tensor  # (b, T, D)
    h_tilde: torch.Tensor  # input norm output h̃
    q_lin: torch.Tensor  # q_proj output, before q_norm and RoPE (b, T, H*d)
    k_lin: torch.Tensor  # k_proj output, before k_norm and RoPE (b, T, KV*d)
    v_lin: torch.Tensor  # v_proj output, BEFORE V-scale (b, T, KV*d)
    v_hat: torch.Tensor  # values after V-scale, (b, KV, T, d)
    phi: torch.Tensor | None  # (b, KV, T), None without V-scale
    c: torch.Tensor | None  # C per KV head, (KV,)
    attn: torch.Tensor  # attention probabilities (b, H, T, T)
    y_heads: torch.Tensor  # attention output per query head before o_proj, (b, H, T, d)
    r_attn: torch.Tensor  # what the attention branch adds to the residual stream
    h_half: torch.Tensor  # h_in + r_attn
    h_tilde_half: torch.Tensor  # MLP input norm output
    r_mlp: torch.Tensor  # what the MLP branch adds to the residual stream
    h_out: torch.Tensor  # h_half + r_mlp
    down_in: torch.Tensor | None = None  # the MLP's down projection input (its intermediate activation), dense MLPs

    def retained(self) -> list[torch.Tensor]:
        return [
            self.h_in,
            self.h_tilde,
            self.q_lin,
            self.k_lin,
            self.v_lin,
            self.v_hat,
            self.y_heads,
            self.r_attn,
            self.h_half,
            self.h_tilde_half,
            self.r_mlp,
            self.h_out,
        ]


@dataclass
class Run:
    """Sequences of one length T run together as one unpadded batch."""

    rows: list[int]  # their rows in the caller's batch
    input_ids: torch.Tensor  # (b, T)
    logits: torch.Tensor | None = None  # (b, T, V), detached
    layers: list[LayerTrace] = field(default_factory=list)


@dataclass
class Trace:
    shapes: Shapes
    settings: Settings
    weights: dict[str, torch.Tensor]  # float64 leaves, ``.grad`` filled after backward
    runs: list[Run]
    lengths: list[int]  # real tokens of each row of the caller's batch
    loss: torch.Tensor | None = None
    vscale_mode: str | None = None
    lambdas: list[torch.Tensor] | None = None  # lambda per KV head per layer (V-scale models)

    def _single(self) -> Run:
        if len(self.runs) != 1:
            raise ValueError(f"this trace has {len(self.runs)} runs (sequences of different lengths); use .runs")
        return self.runs[0]

    @property
    def layers(self) -> list[LayerTrace]:
        """The layers of a batch whose sequences all have one length (an unpadded batch)."""
        return self._single().layers

    @property
    def logits(self) -> torch.Tensor:
        return self._single().logits

    def row_logits(self, row: int) -> torch.Tensor:
        """Logits of the real tokens of one row of the caller's batch, (T_row, V)."""
        for run in self.runs:
            if row in run.rows:
                return run.logits[run.rows.index(row)]
        raise IndexError(row)


def _vscale_settings(model) -> dict | None:
    settings = getattr(model.config, "vscale", None)
    return dict(settings) if settings else None


def _theta(model, layer: int) -> torch.Tensor | None:
    name = f"model.layers.{layer}.self_attn.vscale.theta"
    state = model.state_dict()
    return state[name].detach().double() if name in state else None


def _linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    out = x @ w[name + ".weight"].T
    bias = w.get(name + ".bias")
    return out if bias is None else out + bias


def _norm(s: Settings, x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if s.arch.norm == "layer":
        return layer_norm(x, w[name + ".weight"], w[name + ".bias"], s.eps)
    if s.arch.norm == "rms_1p":
        return rms_norm_1p(x, w[name + ".weight"], s.eps)
    return rms_norm(x, w[name + ".weight"], s.eps)


def _rotate(s: Settings, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    return rope_interleaved(x, angles) if s.arch.rope == "interleaved" else rope_half_split(x, angles)


def _softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


def split_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """The real tokens of each row (SPEC 2: position 0 = the row's first real token; pads enter nothing)."""
    if attention_mask is None:
        return list(input_ids)
    rows = []
    for j, (ids, mask) in enumerate(zip(input_ids, attention_mask.bool(), strict=True)):
        real = mask.nonzero().flatten()
        if len(real) == 0 or real[-1] - real[0] + 1 != len(real):
            raise ValueError(f"row {j}: the reference models left or right padding (one block of real tokens)")
        rows.append(ids[real[0] : real[-1] + 1])
    return rows


def _mlp_black_boxes(model, weights: dict[str, torch.Tensor], layers: int, down: str | None) -> list[Callable]:
    """A float64 copy of each layer's own ``mlp`` module, called with the float64 parameter leaves; each call returns
    (output, the input of its submodule ``down``, None without one)."""
    boxes = []
    for i, layer in enumerate(model.model.layers[:layers]):
        module = copy.deepcopy(layer.mlp).double()
        for sub in module.modules():
            config = getattr(sub, "config", None)
            if config is not None and hasattr(config, "_experts_implementation"):
                config._experts_implementation = "eager"  # the grouped-mm kernel has no float64
        prefix = f"model.layers.{i}.mlp."
        params = {n[len(prefix) :]: p for n, p in weights.items() if n.startswith(prefix)}
        seen: list[torch.Tensor] = []
        if down is not None:
            module.get_submodule(down).register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0]))

        def box(x, module=module, params=params, seen=seen):
            seen.clear()
            return functional_call(module, params, (x,)), (seen[0].detach() if seen else None)

        boxes.append(box)
    return boxes


def _layer(
    s: Settings,
    w: dict[str, torch.Tensor],
    i: int,
    h_in: torch.Tensor,
    mlp: Callable,
    vscale_c: torch.Tensor | None,
) -> LayerTrace:
    sh = s.shapes
    b, t, _ = h_in.shape
    hd, kv, heads = sh.head_dim, sh.kv_heads, sh.heads
    p = f"model.layers.{i}."
    x = _norm(s, h_in, w, p + "input_layernorm")  # h̃
    q_lin = _linear(x, w, p + "self_attn.q_proj")
    k_lin = _linear(x, w, p + "self_attn.k_proj")
    v_lin = _linear(x, w, p + "self_attn.v_proj")
    q = q_lin.view(b, t, heads, hd)
    k = k_lin.view(b, t, kv, hd)
    if s.arch.qk_norm:  # Qwen3: RMSNorm over each head's d dims, before RoPE
        q = rms_norm(q, w[p + "self_attn.q_norm.weight"], s.eps)
        k = rms_norm(k, w[p + "self_attn.k_norm.weight"], s.eps)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = v_lin.view(b, t, kv, hd).transpose(1, 2)  # (b, KV, T, d)
    phi = None
    if vscale_c is not None:
        r = (v * v).sum(-1)  # SPEC 1: r_j = ||v_j||^2
        phi = r / (r + vscale_c.view(1, kv, 1))  # SPEC 1: phi = r / (r + C)
        v_hat = v * phi.unsqueeze(-1)  # SPEC 1: v̂_j = phi v_j
    else:
        v_hat = v * 1.0  # a distinct tensor so that its gradient can be retained
    if s.rope_layers[i]:
        angles = rope_angles(t, s.rotary_dim, s.shapes.rope_base)
        q, k = _rotate(s, q, angles), _rotate(s, k, angles)
    group = heads // kv
    k_rep = k.repeat_interleave(group, dim=1)
    v_rep = v_hat.repeat_interleave(group, dim=1)
    scores = _softcap((q @ k_rep.transpose(-1, -2)) * s.scaling, s.attn_softcap)  # Gemma 2 caps before masking
    allowed = causal_mask(t, s.windows[i])
    attn = scores.masked_fill(~allowed, float("-inf")).softmax(-1)  # a_ts
    y_heads = attn @ v_rep  # y_t = sum_s a_ts v̂_s, (b, H, T, d)
    o = _linear(y_heads.transpose(1, 2).reshape(b, t, heads * hd), w, p + "self_attn.o_proj")
    sandwich = s.arch.sandwich
    if sandwich is not None:
        o = _norm(s, o, w, p + sandwich[0])
    r_attn = o * s.residual_multiplier if s.arch.granite else o  # SPEC 2: what the branch adds
    h_half = h_in + r_attn  # SPEC 2: h_half = h_in + r_attn
    x2 = _norm(s, h_half, w, p + (sandwich[1] if sandwich else "post_attention_layernorm"))  # h̃_half
    m, down_in = mlp(x2)
    if sandwich is not None:
        m = _norm(s, m, w, p + sandwich[2])
    r_mlp = m * s.residual_multiplier if s.arch.granite else m * 1.0  # distinct from the black box's output
    h_out = h_half + r_mlp  # SPEC 2: h_out = h_half + r_mlp
    return LayerTrace(
        h_in=h_in,
        h_tilde=x,
        q_lin=q_lin,
        k_lin=k_lin,
        v_lin=v_lin,
        v_hat=v_hat,
        phi=None if phi is None else phi.detach(),
        c=None if vscale_c is None else vscale_c.detach(),
        attn=attn,
        y_heads=y_heads,
        r_attn=r_attn,
        h_half=h_half,
        h_tilde_half=x2,
        r_mlp=r_mlp,
        h_out=h_out,
        down_in=down_in,
    )


def _logits(s: Settings, w: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    h = _norm(s, h, w, "model.norm")
    lm_head = w.get("lm_head.weight", w["model.embed_tokens.weight"])  # tied embeddings
    logits = h @ lm_head.T
    if s.arch.granite:
        logits = logits / s.logits_scaling
    return _softcap(logits, s.final_softcap)


def run_reference(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Trace:
    """Forward + backward of the causal-LM loss in float64 with every intermediate retained.

    ``attention_mask`` (1 = real token, left or right padding) splits the batch into its sequences; None: every
    token is real.
    """
    settings = Settings.of(model)
    shapes = settings.shapes
    weights = {n: p.detach().double().requires_grad_() for n, p in model.named_parameters()}
    w = weights
    vs = _vscale_settings(model)
    lambdas = None
    if vs is not None:
        lambdas = []
        for i in range(shapes.layers):
            theta = weights.get(f"model.layers.{i}.self_attn.vscale.theta")  # a float64 leaf in learned mode
            if vs["mode"] == "fixed":
                lambdas.append(torch.ones(shapes.kv_heads, dtype=torch.float64))  # lambda = 1
            elif theta is not None:
                lambdas.append(theta.exp())  # SPEC 1: lambda = exp(theta)
            else:  # learned mode with a frozen theta
                lambdas.append(_theta(model, i).exp())
    # SPEC 1: C = d_model * d_head * sigma^2 * lambda
    cs = None if vs is None else [shapes.hidden * shapes.head_dim * float(vs["sigma"]) ** 2 * lam for lam in lambdas]

    sequences = split_rows(input_ids, attention_mask)
    by_length: dict[int, list[int]] = {}
    for j, seq in enumerate(sequences):
        by_length.setdefault(len(seq), []).append(j)
    runs = [Run(rows=rows, input_ids=torch.stack([sequences[j] for j in rows])) for rows in by_length.values()]
    trace = Trace(
        shapes,
        settings,
        weights,
        runs,
        lengths=[len(seq) for seq in sequences],
        vscale_mode=vs and vs["mode"],
        lambdas=None if lambdas is None else [lam.detach() for lam in lambdas],
    )
    mlps = _mlp_black_boxes(model, weights, shapes.layers, settings.arch.down_proj)
    ce_sum = torch.zeros((), dtype=torch.float64)
    for run in runs:
        ids = run.input_ids
        h = w["model.embed_tokens.weight"][ids] * settings.embed_scale
        for i in range(shapes.layers):
            layer = _layer(settings, w, i, h, mlps[i], None if cs is None else cs[i])
            for tensor in layer.retained():
                tensor.retain_grad()
            run.layers.append(layer)
            h = layer.h_out
        logits = _logits(settings, w, h)
        # next-token cross-entropy; each sequence's first token is no target
        ce_sum = ce_sum + F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        run.logits = logits.detach()
    loss = ce_sum / sum(n - 1 for n in trace.lengths)  # mean over all real targets of all sequences
    loss.backward()
    trace.loss = loss.detach()
    return trace


# ---------------------------------------------------------------------------------------------------------------
# Per-layer building blocks (also used by the self-check tests), per run


def path_gradients(trace: Trace, i: int, run: Run | None = None) -> dict[str, torch.Tensor]:
    """Per-sequence gradients at h̃ of layer i, (b, T, D): total and its query / key / value contributions."""
    run = run or trace._single()
    layer, w, p = run.layers[i], trace.weights, f"model.layers.{i}.self_attn."
    return {
        "grad_in": layer.h_tilde.grad,
        "q": layer.q_lin.grad @ w[p + "q_proj.weight"],  # W_Q^T g(q_t)
        "k": layer.k_lin.grad @ w[p + "k_proj.weight"],  # W_K^T g(k_t)
        "v": layer.v_lin.grad @ w[p + "v_proj.weight"],  # W_V^T g(v_t), g(v) before V-scale
    }


def value_gradient_from_attention(trace: Trace, i: int, run: Run | None = None) -> torch.Tensor:
    """A^T G: the gradient at the (scaled) values of layer i, (b, KV, T, d), from the attention matrix A and the
    gradient G of the per-head attention output, summed over the query heads sharing each KV head."""
    run = run or trace._single()
    layer, s = run.layers[i], trace.shapes
    per_head = torch.einsum("bhts,bhtd->bhsd", layer.attn.detach(), layer.y_heads.grad)
    b, _, t, d = per_head.shape
    return per_head.view(b, s.kv_heads, s.heads // s.kv_heads, t, d).sum(2)


def value_gradient_through_vscale(trace: Trace, i: int, run: Run | None = None) -> torch.Tensor:
    """g(v) from g(v̂) with the Jacobian of SPEC 1, phi*I + 2C/(r+C)^2 v v^T (symmetric), (b, KV, T, d)."""
    run = run or trace._single()
    layer, s = run.layers[i], trace.shapes
    b, t = layer.v_lin.shape[:2]
    v = layer.v_lin.detach().view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
    g_hat = layer.v_hat.grad
    if layer.phi is None:
        return g_hat
    r = (v * v).sum(-1, keepdim=True)
    c = layer.c.view(1, -1, 1, 1)
    return layer.phi.unsqueeze(-1) * g_hat + 2 * c / (r + c) ** 2 * v * (v * g_hat).sum(-1, keepdim=True)


def theta_gradient(trace: Trace, i: int) -> torch.Tensor:
    """d loss / d theta per KV head of layer i, by hand from g(v̂) of every run (a check of autograd's).

    v̂ = v r / (r + C): d v̂ / d C = -v r / (r + C)^2 = -v̂ / (r + C), and dC/dtheta = C.
    """
    s, total = trace.shapes, 0.0
    for run in trace.runs:
        layer = run.layers[i]
        b, t = layer.v_lin.shape[:2]
        v = layer.v_lin.detach().view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
        r = (v * v).sum(-1, keepdim=True)
        c = layer.c.view(1, -1, 1, 1)
        dv_dc = -v * r / (r + c) ** 2
        total = total + (layer.v_hat.grad * dv_dc).sum((0, 2, 3)) * layer.c
    return total


def self_check(trace: Trace, tol: float = 1e-10) -> dict[str, float]:
    """The exact identities, checked in float64; returns the worst (scale-relative) error of each."""
    worst = {"path_sum": 0.0, "query_tok0": 0.0, "value_ATG": 0.0, "vscale_jacobian": 0.0, "theta_grad": 0.0}
    s = trace.shapes
    for run in trace.runs:
        for i, layer in enumerate(run.layers):
            g = path_gradients(trace, i, run)
            scale = max(g["grad_in"].abs().max().item(), 1e-300)
            err = (g["q"] + g["k"] + g["v"] - g["grad_in"]).abs().max().item() / scale
            worst["path_sum"] = max(worst["path_sum"], err)
            # Causal masking: query 0 sees only key 0, a_00 = 1 whatever its score, so its score gets no gradient.
            worst["query_tok0"] = max(worst["query_tok0"], layer.q_lin.grad[:, 0].abs().max().item())
            atg = value_gradient_from_attention(trace, i, run)
            scale = max(layer.v_hat.grad.abs().max().item(), 1e-300)
            worst["value_ATG"] = max(worst["value_ATG"], (atg - layer.v_hat.grad).abs().max().item() / scale)
            b, t = layer.v_lin.shape[:2]
            g_v = layer.v_lin.grad.view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
            jac = value_gradient_through_vscale(trace, i, run)
            scale = max(g_v.abs().max().item(), 1e-300)
            worst["vscale_jacobian"] = max(worst["vscale_jacobian"], (jac - g_v).abs().max().item() / scale)
    for i in range(s.layers):
        theta = trace.weights.get(f"model.layers.{i}.self_attn.vscale.theta")
        if theta is not None and trace.runs[0].layers[i].c is not None:
            by_hand = theta_gradient(trace, i)
            scale = max(theta.grad.abs().max().item(), 1e-300)
            worst["theta_grad"] = max(worst["theta_grad"], (by_hand - theta.grad).abs().max().item() / scale)
    assert worst["path_sum"] <= tol, worst
    assert worst["query_tok0"] == 0.0, worst
    assert worst["value_ATG"] <= tol, worst
    assert worst["vscale_jacobian"] <= tol, worst
    assert worst["theta_grad"] <= tol, worst
    return worst


def _per_sequence(trace: Trace, per_run: Callable[[Run], torch.Tensor]) -> torch.Tensor:
    """``per_run(run)`` is (b, ...) per sequence of the run; returns (rows, ...) in the caller's row order."""
    out = [None] * len(trace.lengths)
    for run in trace.runs:
        for row, value in zip(run.rows, per_run(run), strict=True):
            out[row] = value
    return torch.stack(out)


def sink_scores(trace: Trace, i: int) -> torch.Tensor:
    """alpha per (sequence, query head) of layer i: mean of a_t0 over t < min(T_eps, T_j), (rows, H)."""

    def alpha(run: Run) -> torch.Tensor:
        col = run.layers[i].attn.detach()[..., 0]  # (b, H, T)
        return col[..., : min(T_EPS, col.shape[-1])].mean(-1)

    return _per_sequence(trace, alpha)


# ---------------------------------------------------------------------------------------------------------------
# Metrics: per-position profiles over sequences of different lengths


def _position_sum(trace: Trace, per_run: list[torch.Tensor]) -> torch.Tensor:
    """Sum over the sequences that have each position: ``per_run[r]`` is (b, T, ...) for ``trace.runs[r]``;
    returns (T_max, ...)."""
    t_max = max(trace.lengths)
    total = None
    for x in per_run:
        x = x.sum(0)
        x = torch.cat([x, x.new_zeros((t_max - x.shape[0], *x.shape[1:]))])
        total = x if total is None else total + x
    return total


def _position_mean(trace: Trace, per_run: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the sequences that have each position of a (b, T) quantity per run; returns (T_max,)."""
    counts = _position_sum(trace, [torch.ones(run.input_ids.shape, dtype=torch.float64) for run in trace.runs])
    return _position_sum(trace, per_run) / counts


def _activation_norms(layer: LayerTrace, s: Shapes) -> dict[str, torch.Tensor]:
    """Per-token norms (b, T) of the SPEC 2 activations; v's averaged over KV heads."""
    v = layer.v_lin.detach().unflatten(-1, (s.kv_heads, s.head_dim))
    return {
        "h_in": layer.h_in.detach().norm(dim=-1),
        "h_half": layer.h_half.detach().norm(dim=-1),
        "h_out": layer.h_out.detach().norm(dim=-1),
        "attn_out": layer.r_attn.detach().norm(dim=-1),
        "mlp_out": layer.r_mlp.detach().norm(dim=-1),
        "v": v.norm(dim=-1).mean(-1),
    }


def _tok0_rest(per_position: torch.Tensor) -> tuple[float, float]:
    return per_position[0].item(), per_position[1 : REST + 1].mean().item()


def _frobenius(grads: list[torch.Tensor | None]) -> float:
    total = sum(float((g * g).sum()) for g in grads if g is not None)
    return total**0.5


def _module_grads(trace: Trace, prefix: str) -> list[torch.Tensor | None]:
    return [w.grad for n, w in trace.weights.items() if n.startswith(prefix + ".")]


# ---------------------------------------------------------------------------------------------------------------
# Quantisation readiness (qr/)

QR_SHAPE = ("kurtosis", "max_over_median")
QR_POINTS = ("h_out", "down_proj_in")
QR_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def kurtosis_per_token(x: torch.Tensor) -> torch.Tensor:
    """Pearson kurtosis m4 / m2^2 over the last dimension, with the population central moments, of every token that
    has one (a constant token, m2 = 0, has none: an all-zero embedding row gives one)."""
    d = x - x.mean(-1, keepdim=True)
    m2 = (d**2).mean(-1)
    return ((d**4).mean(-1) / m2**2)[m2 > 0]


def max_over_median(x: torch.Tensor) -> float:
    """max |x| / median |x| of the whole tensor; the median of an even count is the lower of the two middle values."""
    a = x.abs().flatten().sort().values
    return (a[-1] / a[(a.numel() - 1) // 2]).item()


def int8_error(x: torch.Tensor) -> float:
    """||x - q(x)|| / ||x||, q(x) = s clamp(round(x / s), -128, 127), s = max |x| / 127."""
    s = x.abs().max() / 127
    q = s * torch.clamp(torch.round(x / s), -128, 127)
    return ((x - q).norm() / x.norm()).item()


def qr_inputs(trace: Trace, i: int) -> dict[str, torch.Tensor]:
    """Layer i's tensors the qr/ statistics read, (real tokens of the whole batch, features) float64: h_out, the
    inputs of each linear, the down projection's input (dense MLPs)."""

    def tokens(get: Callable[[LayerTrace], torch.Tensor]) -> torch.Tensor:
        return torch.cat([get(run.layers[i]).detach().flatten(0, 1) for run in trace.runs])

    h_tilde = tokens(lambda layer: layer.h_tilde)
    out = {
        "h_out": tokens(lambda layer: layer.h_out),
        **dict.fromkeys(("q_proj", "k_proj", "v_proj"), h_tilde),
        "o_proj": tokens(lambda layer: layer.y_heads.transpose(1, 2).flatten(2)),
    }
    arch = trace.settings.arch
    if arch.down_proj is not None:  # a dense MLP: gate / up read h̃_half, down its intermediate activation
        h_tilde_half = tokens(lambda layer: layer.h_tilde_half)
        out.update({linear: h_tilde_half for linear in arch.mlp_linears})
        out["down_proj"] = out["down_proj_in"] = tokens(lambda layer: layer.down_in)
    return out


def quant_readiness_terms(trace: Trace) -> dict[str, tuple[float, float]]:
    """Every qr/ key of one forward call (this trace's batch) as (sum, count): kurtosis summed over the real tokens,
    max_over_median and int8_error one term for the call."""
    terms: dict[str, tuple[float, float]] = {}
    for i in range(trace.shapes.layers):
        tag = f"L{i:02d}"
        x = qr_inputs(trace, i)
        for point in QR_POINTS:
            if point in x:
                k = kurtosis_per_token(x[point])
                terms[f"qr/kurtosis/{point}/{tag}"] = (k.sum().item(), float(k.numel()))
                terms[f"qr/max_over_median/{point}/{tag}"] = (max_over_median(x[point]), 1.0)
        for linear in (*QR_ATTENTION, *trace.settings.arch.mlp_linears):
            terms[f"qr/int8_error/{linear}/{tag}"] = (int8_error(x[linear]), 1.0)
    return terms


def combine_quant_readiness(calls: Sequence[dict[str, tuple[float, float]]]) -> dict[str, float]:
    """The qr/ metrics of several forward calls (micro-batches, ranks): each key's summed terms over its summed
    counts, and the max over layers of each family."""
    out = {key: sum(c[key][0] for c in calls) / sum(c[key][1] for c in calls) for key in calls[0]}
    for family in {key.rsplit("/", 1)[0] for key in list(out)}:
        out[f"{family}/max"] = max(v for key, v in out.items() if key.rsplit("/", 1)[0] == family)
    return out


def metrics_from_trace(trace: Trace) -> dict[str, float]:
    s = trace.shapes
    if min(trace.lengths) <= T_E:
        raise ValueError(f"every sequence needs more than {T_E} real tokens for R_GS; got {min(trace.lengths)}")
    out: dict[str, float] = {}
    for i in range(s.layers):
        tag = f"L{i:02d}"
        layers = [run.layers[i] for run in trace.runs]

        # attention sinks (forward), per (sequence, query head)
        alpha = sink_scores(trace, i)
        col = [layer.attn.detach()[..., 0] for layer in layers]  # (b, H, T) each
        out[f"as/sink_rate/{tag}"] = (alpha > EPS_SINK).double().mean().item()  # fraction with alpha > eps
        out[f"as/mass/{tag}"] = torch.cat([c.sum(-1).flatten() for c in col]).mean().item()  # M_0 = sum_t a_t0
        out[f"as/mass_sq/{tag}"] = torch.cat([(c * c).sum(-1).flatten() for c in col]).mean().item()  # S_0

        # massive activations (forward): per-position norm, averaged over sequences (and KV heads for v)
        norms = [_activation_norms(layer, s) for layer in layers]
        for name in ACTIVATIONS:
            profile = _position_mean(trace, [n[name] for n in norms])
            out[f"ma/{name}/tok0/{tag}"], out[f"ma/{name}/rest/{tag}"] = _tok0_rest(profile)

        # gradient sinks: per-position gradients summed over sequences, then norms
        per_run_paths = [path_gradients(trace, i, run) for run in trace.runs]
        paths = {name: _position_sum(trace, [g[name] for g in per_run_paths]).norm(dim=-1) for name in GRAD_PATHS}
        grad_in = paths["grad_in"]
        out[f"gs/ratio/{tag}"] = (grad_in[0] / grad_in[1 : T_E + 1].mean()).item()  # R_GS
        for name in GRAD_PATHS:
            out[f"gs/{name}/tok0/{tag}"], out[f"gs/{name}/rest/{tag}"] = _tok0_rest(paths[name])

        branches = {
            "attn": ("h_in", "h_tilde", "r_attn", "h_half"),
            "mlp": ("h_half", "h_tilde_half", "r_mlp", "h_out"),
        }
        for branch, names in branches.items():
            g_before, g_normed, g_res, g_after = (
                _position_sum(trace, [getattr(layer, n).grad for layer in layers]) for n in names
            )
            ratios = {
                "bloat": g_normed.norm(dim=-1) / g_res.norm(dim=-1),  # ||g(h̃)|| / ||g(r)||
                "compress": (g_before - g_after).norm(dim=-1) / g_normed.norm(dim=-1),  # ||g(h) - g(h')|| / ||g(h̃)||
                "change": g_before.norm(dim=-1) / g_after.norm(dim=-1),  # ||g(h)|| / ||g(h')||
            }
            for m, ratio in ratios.items():
                out[f"gs/{m}_{branch}/tok0/{tag}"], out[f"gs/{m}_{branch}/rest/{tag}"] = _tok0_rest(ratio)

        # parameter gradients: Frobenius norm of the whole gradient
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"grad/{proj}/{tag}"] = _frobenius(_module_grads(trace, p + "self_attn." + proj))
        out[f"grad/mlp/{tag}"] = _frobenius(_module_grads(trace, p + "mlp"))

        # V-scale
        if trace.vscale_mode is not None:
            if trace.vscale_mode == "learned":
                out[f"grad/vscale/{tag}"] = _frobenius(_module_grads(trace, p + "self_attn.vscale"))
            phi = _position_mean(trace, [layer.phi.mean(1) for layer in layers])  # over KV heads, then sequences
            out[f"vscale/phi/tok0/{tag}"], out[f"vscale/phi/rest/{tag}"] = _tok0_rest(phi)
            for h, lam in enumerate(trace.lambdas[i].tolist()):
                out[f"vscale/lambda/{tag}/H{h}"] = lam

    every_layer = range(s.layers)  # summaries over layers
    out["gs/ratio/median"] = statistics.median(out[f"gs/ratio/L{i:02d}"] for i in every_layer)
    out["as/sink_rate/mean"] = statistics.fmean(out[f"as/sink_rate/L{i:02d}"] for i in every_layer)
    out["ma/h_out/tok0/max"] = max(out[f"ma/h_out/tok0/L{i:02d}"] for i in every_layer)
    out["ma/mlp_out/tok0/max"] = max(out[f"ma/mlp_out/tok0/L{i:02d}"] for i in every_layer)
    out.update(combine_quant_readiness([quant_readiness_terms(trace)]))  # one batch: one forward call
    return out


def reference_metrics(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, check: bool = True
) -> dict[str, float]:
    """Every metric ``vsp.measure(model, input_ids, attention_mask)`` must return (SPEC section 4), from scratch in
    float64."""
    trace = run_reference(model, input_ids, attention_mask)
    if check:
        self_check(trace)
    return metrics_from_trace(trace)


def qr_keys(model_type: str, tag: str) -> set[str]:
    """The qr/ keys of one layer (``tag``: ``L03``, or ``max`` for the summaries) of an architecture."""
    linears = ARCHS[model_type].mlp_linears
    points = QR_POINTS if "down_proj" in linears else QR_POINTS[:1]
    keys = {f"qr/{stat}/{point}/{tag}" for stat in QR_SHAPE for point in points}
    return keys | {f"qr/int8_error/{linear}/{tag}" for linear in (*QR_ATTENTION, *linears)}


def expected_keys(num_layers: int, kv_heads: int, vscale_mode: str | None, model_type: str = "llama") -> set[str]:
    """The SPEC section 4 key set of ``measure`` for a model of this shape, written out independently."""
    keys = {"gs/ratio/median", "as/sink_rate/mean", "ma/h_out/tok0/max", "ma/mlp_out/tok0/max"}
    keys |= qr_keys(model_type, "max")
    for i in range(num_layers):
        tag = f"L{i:02d}"
        keys |= qr_keys(model_type, tag)
        keys |= {f"as/{m}/{tag}" for m in ("sink_rate", "mass", "mass_sq")}
        keys |= {f"ma/{a}/{w}/{tag}" for a in ACTIVATIONS for w in ("tok0", "rest")}
        keys.add(f"gs/ratio/{tag}")
        keys |= {f"gs/{g}/{w}/{tag}" for g in (*GRAD_PATHS, *RESHAPING) for w in ("tok0", "rest")}
        keys |= {f"grad/{g}/{tag}" for g in PARAM_GROUPS}
        if vscale_mode is not None:
            if vscale_mode == "learned":
                keys.add(f"grad/vscale/{tag}")
            keys |= {f"vscale/phi/{w}/{tag}" for w in ("tok0", "rest")}
            keys |= {f"vscale/lambda/{tag}/H{h}" for h in range(kv_heads)}
    return keys


# ---------------------------------------------------------------------------------------------------------------
# Planted attention sinks


def sink_dim(model) -> int:
    """The head dimension that carries a planted sink: one that RoPE turns the least (or not at all).

    Half-split RoPE: dim d/2 - 1, the first of the slowest pair (d/2 - 1, d - 1); interleaved: d - 2, the first of
    the slowest pair (d - 2, d - 1); partial rotary: d - 1, which does not rotate. :func:`plant_sinks` uses dim 0,
    RoPE's fastest (1 rad per position), on NoPE layers: a sink there that RoPE would scramble.
    """
    s = Settings.of(model)
    hd = s.shapes.head_dim
    if s.rotary_dim < hd:
        return hd - 1
    return hd - 2 if s.arch.rope == "interleaved" else hd // 2 - 1


def plant_sinks(model, heads: Sequence[Sequence[int]], bos_id: int = 0):
    """Real attention sinks on token ``bos_id`` at position 0, by construction, on query heads ``heads[i % len]``
    of layer i. Returns the model.

    Every token gets a constant positive "bias" channel (hidden dim 0); token ``bos_id`` alone carries a large "BOS"
    channel (hidden dim 1). In every layer the keys' :func:`sink_dim` (dim 0 on NoPE layers) reads the BOS channel
    and, for the planted query heads, the queries' same dim reads the bias channel: q_t . k_0 is large for every t,
    other keys see nothing there, and the other query heads have a zero query on that dim (so they neither sink nor
    avoid token 0). The strength is set against the architecture's score scaling; with q/k norms the norms' gain on
    that dim makes it dominate. v_proj ignores the BOS channel, so the sink's value is small, as in trained models.
    Sandwich norms (GLM-4, Gemma 2) would add unit-RMS branch outputs that drown both channels after layer 0: their
    gains are made small, and zero on the two channels.
    """
    s = Settings.of(model)
    hd, kv, n_heads = s.shapes.head_dim, s.shapes.kv_heads, s.shapes.heads
    slow_dim = sink_dim(model)
    gain = (hd**-0.5 / s.scaling) ** 0.5  # the same score as Llama's at unit gain
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 0.1
        emb[:, 1] = 0.0
        emb[bos_id, 1] = 1.0
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            planted = list(heads[i % len(heads)])
            d = slow_dim if s.rope_layers[i] else 0  # NoPE: the fastest RoPE dim, so that RoPE would undo the sink
            if s.arch.norm == "layer":  # keep the two channels unshifted by LayerNorm's bias
                layer.input_layernorm.bias[:2] = 0.0
            for h in range(kv):
                attn.k_proj.weight[h * hd + d, :] = 0.0
                attn.k_proj.weight[h * hd + d, 1] = gain
                if attn.k_proj.bias is not None:
                    attn.k_proj.bias[h * hd + d] = 0.0
            for h in range(n_heads):
                attn.q_proj.weight[h * hd + d, :] = 0.0
                if h in planted:
                    attn.q_proj.weight[h * hd + d, 0] = gain * (1.25 + 0.5 * planted.index(h))
                if attn.q_proj.bias is not None:
                    attn.q_proj.bias[h * hd + d] = 0.0
            if s.arch.qk_norm:
                # the normalised q and k have RMS 1 over the head; a gain on the sink dim keeps q_t . k_0 large
                attn.q_norm.weight[d] = 1.6
                attn.k_norm.weight[d] = 1.6
            attn.v_proj.weight[:, 1] = 0.0
            if s.arch.sandwich is not None:
                for name in (s.arch.sandwich[0], s.arch.sandwich[2]):
                    norm = getattr(layer, name)
                    if s.arch.norm == "rms_1p":  # gain 1 + w
                        norm.weight.copy_(0.02 * (1.0 + norm.weight) - 1.0)
                        norm.weight[:2] = -1.0
                    else:
                        norm.weight.mul_(0.02)
                        norm.weight[:2] = 0.0
    return model
