"""An independent float64 reference for every gradient-sink statistic of SPEC sections 2 and 4.

It re-runs a Llama/Mistral decoder eagerly from the model's state dict (the building blocks of ``tests/reference.py``),
keeps the full attention matrix and every intermediate of each layer with ``retain_grad()``, back-propagates the
mean next-token cross-entropy (Hugging Face's causal-LM loss with ``labels=input_ids``) and computes the metrics
from the retained tensors. It shares no code with ``vscale_plugin``: from the model it reads only parameters,
config numbers, ``config.vscale`` and the theta tensors.

Gradients of one position are first summed over the sequences of the batch (what the optimiser's gradient combines)
and only then turned into norms.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tests.reference import Shapes, rms_norm, rope

T_EPS = 64  # sink score window
EPS_SINK = 0.3  # sink threshold
T_E = 31  # R_GS denominator: positions 1..31
REST = 15  # "rest": positions 1..15

ACTIVATIONS = ("h_in", "h_half", "h_out", "attn_out", "mlp_out", "v")
GRAD_PATHS = ("grad_in", "q", "k", "v")
RESHAPING = tuple(f"{m}_{b}" for m in ("bloat", "compress", "change") for b in ("attn", "mlp"))
PARAM_GROUPS = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp")


@dataclass
class LayerTrace:
    """Every intermediate of one decoder layer (float64, gradients retained after ``backward``)."""

    h_in: torch.Tensor  # (b, T, D)
    h_tilde: torch.Tensor  # input RMSNorm output
    q_lin: torch.Tensor  # q_proj output, pre-RoPE (b, T, H*d)
    k_lin: torch.Tensor  # k_proj output, pre-RoPE (b, T, KV*d)
    v_lin: torch.Tensor  # v_proj output, BEFORE V-scale (b, T, KV*d)
    v_hat: torch.Tensor  # values after V-scale, (b, KV, T, d)
    phi: torch.Tensor | None  # (b, KV, T), None without V-scale
    c: torch.Tensor | None  # C per KV head, (KV,)
    attn: torch.Tensor  # attention probabilities (b, H, T, T)
    y_heads: torch.Tensor  # attention output per query head before o_proj, (b, H, T, d)
    r_attn: torch.Tensor  # o_proj output
    h_half: torch.Tensor
    h_tilde_half: torch.Tensor  # post-attention RMSNorm output
    r_mlp: torch.Tensor
    h_out: torch.Tensor

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
class Trace:
    shapes: Shapes
    weights: dict[str, torch.Tensor]  # float64 leaves, ``.grad`` filled after backward
    logits: torch.Tensor
    loss: torch.Tensor
    layers: list[LayerTrace] = field(default_factory=list)
    vscale_mode: str | None = None
    lambdas: list[torch.Tensor] | None = None  # lambda per KV head per layer (V-scale models)


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


def run_reference(model, input_ids: torch.Tensor) -> Trace:
    """Forward + backward of the causal-LM loss in float64 with every intermediate retained."""
    shapes = Shapes.of(model.config)
    weights = {n: p.detach().double().requires_grad_() for n, p in model.named_parameters()}
    w = weights
    settings = _vscale_settings(model)
    lambdas = None
    if settings is not None:
        lambdas = []
        for i in range(shapes.layers):
            theta = weights.get(f"model.layers.{i}.self_attn.vscale.theta")  # a float64 leaf in learned mode
            if settings["mode"] == "fixed":
                lambdas.append(torch.ones(shapes.kv_heads, dtype=torch.float64))  # lambda = 1
            elif theta is not None:
                lambdas.append(theta.exp())
            else:  # learned mode with a frozen theta
                lambdas.append(_theta(model, i).exp())
    b, t = input_ids.shape
    hd, kv, heads = shapes.head_dim, shapes.kv_heads, shapes.heads
    group = heads // kv
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    trace = Trace(shapes, weights, logits=None, loss=None, vscale_mode=settings and settings["mode"])
    trace.lambdas = None if lambdas is None else [lam.detach() for lam in lambdas]

    h = w["model.embed_tokens.weight"][input_ids]
    for i in range(shapes.layers):
        p = f"model.layers.{i}."
        h_in = h
        x = rms_norm(h_in, w[p + "input_layernorm.weight"], shapes.eps)
        q_lin = _linear(x, w, p + "self_attn.q_proj")
        k_lin = _linear(x, w, p + "self_attn.k_proj")
        v_lin = _linear(x, w, p + "self_attn.v_proj")
        q = q_lin.view(b, t, heads, hd).transpose(1, 2)
        k = k_lin.view(b, t, kv, hd).transpose(1, 2)
        v = v_lin.view(b, t, kv, hd).transpose(1, 2)  # (b, KV, T, d)
        phi = c = None
        if settings is not None:
            # SPEC 1: C = d_model * d_head * sigma^2 * lambda, phi = r / (r + C), r = ||v||^2.
            c = shapes.hidden * hd * float(settings["sigma"]) ** 2 * lambdas[i]
            r = (v * v).sum(-1)
            phi = r / (r + c.view(1, kv, 1))
            v_hat = v * phi.unsqueeze(-1)
        else:
            v_hat = v * 1.0  # a distinct tensor so that its gradient can be retained
        q, k = rope(q, shapes.rope_base), rope(k, shapes.rope_base)
        k_rep = k.repeat_interleave(group, dim=1)
        v_rep = v_hat.repeat_interleave(group, dim=1)
        scores = (q @ k_rep.transpose(-1, -2)) / hd**0.5
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        y_heads = attn @ v_rep  # (b, H, T, d)
        y = y_heads.transpose(1, 2).reshape(b, t, heads * hd)
        r_attn = _linear(y, w, p + "self_attn.o_proj")
        h_half = h_in + r_attn
        x2 = rms_norm(h_half, w[p + "post_attention_layernorm.weight"], shapes.eps)
        gate = _linear(x2, w, p + "mlp.gate_proj")
        up = _linear(x2, w, p + "mlp.up_proj")
        r_mlp = _linear(F.silu(gate) * up, w, p + "mlp.down_proj")
        h_out = h_half + r_mlp
        layer = LayerTrace(
            h_in=h_in,
            h_tilde=x,
            q_lin=q_lin,
            k_lin=k_lin,
            v_lin=v_lin,
            v_hat=v_hat,
            phi=None if phi is None else phi.detach(),
            c=None if c is None else c.detach(),
            attn=attn,
            y_heads=y_heads,
            r_attn=r_attn,
            h_half=h_half,
            h_tilde_half=x2,
            r_mlp=r_mlp,
            h_out=h_out,
        )
        for tensor in layer.retained():
            tensor.retain_grad()
        trace.layers.append(layer)
        h = h_out
    h = rms_norm(h, w["model.norm.weight"], shapes.eps)
    lm_head = w.get("lm_head.weight", w["model.embed_tokens.weight"])  # tied embeddings
    logits = h @ lm_head.T
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
    loss.backward()
    trace.logits = logits.detach()
    trace.loss = loss.detach()
    return trace


# ---------------------------------------------------------------------------------------------------------------
# Per-layer building blocks (also used by the self-check tests)


def path_gradients(trace: Trace, i: int) -> dict[str, torch.Tensor]:
    """Per-sequence gradients at h̃ of layer i, (b, T, D): total and its query / key / value contributions."""
    layer, w, p = trace.layers[i], trace.weights, f"model.layers.{i}.self_attn."
    return {
        "grad_in": layer.h_tilde.grad,
        "q": layer.q_lin.grad @ w[p + "q_proj.weight"],  # W_Q^T g(q_t)
        "k": layer.k_lin.grad @ w[p + "k_proj.weight"],
        "v": layer.v_lin.grad @ w[p + "v_proj.weight"],  # g(v) before V-scale
    }


def value_gradient_from_attention(trace: Trace, i: int) -> torch.Tensor:
    """A^T G: the gradient at the (scaled) values of layer i, (b, KV, T, d), from the attention matrix A and the
    gradient G of the per-head attention output, summed over the query heads sharing each KV head."""
    layer, s = trace.layers[i], trace.shapes
    per_head = torch.einsum("bhts,bhtd->bhsd", layer.attn.detach(), layer.y_heads.grad)
    b, _, t, d = per_head.shape
    return per_head.view(b, s.kv_heads, s.heads // s.kv_heads, t, d).sum(2)


def value_gradient_through_vscale(trace: Trace, i: int) -> torch.Tensor:
    """g(v) from g(v̂) with the Jacobian of SPEC 1, phi*I + 2C/(r+C)^2 v v^T (symmetric), (b, KV, T, d)."""
    layer, s = trace.layers[i], trace.shapes
    b, t = layer.v_lin.shape[:2]
    v = layer.v_lin.detach().view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
    g_hat = layer.v_hat.grad
    if layer.phi is None:
        return g_hat
    r = (v * v).sum(-1, keepdim=True)
    c = layer.c.view(1, -1, 1, 1)
    return layer.phi.unsqueeze(-1) * g_hat + 2 * c / (r + c) ** 2 * v * (v * g_hat).sum(-1, keepdim=True)


def self_check(trace: Trace, tol: float = 1e-10) -> dict[str, float]:
    """The exact identities, checked in float64; returns the worst (scale-relative) error of each."""
    worst = {"path_sum": 0.0, "query_tok0": 0.0, "value_ATG": 0.0, "vscale_jacobian": 0.0, "theta_grad": 0.0}
    s = trace.shapes
    for i, layer in enumerate(trace.layers):
        g = path_gradients(trace, i)
        scale = max(g["grad_in"].abs().max().item(), 1e-300)
        worst["path_sum"] = max(worst["path_sum"], (g["q"] + g["k"] + g["v"] - g["grad_in"]).abs().max().item() / scale)
        # Causal masking: query 0 sees only key 0, a_00 = 1 whatever its score, so its score gets no gradient.
        worst["query_tok0"] = max(worst["query_tok0"], layer.q_lin.grad[:, 0].abs().max().item())
        atg = value_gradient_from_attention(trace, i)
        scale = max(layer.v_hat.grad.abs().max().item(), 1e-300)
        worst["value_ATG"] = max(worst["value_ATG"], (atg - layer.v_hat.grad).abs().max().item() / scale)
        b, t = layer.v_lin.shape[:2]
        g_v = layer.v_lin.grad.view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
        jac = value_gradient_through_vscale(trace, i)
        scale = max(g_v.abs().max().item(), 1e-300)
        worst["vscale_jacobian"] = max(worst["vscale_jacobian"], (jac - g_v).abs().max().item() / scale)
        theta = trace.weights.get(f"model.layers.{i}.self_attn.vscale.theta")
        if theta is not None and layer.c is not None:
            by_hand = theta_gradient(trace, i)
            scale = max(theta.grad.abs().max().item(), 1e-300)
            worst["theta_grad"] = max(worst["theta_grad"], (by_hand - theta.grad).abs().max().item() / scale)
    assert worst["path_sum"] <= tol, worst
    assert worst["query_tok0"] == 0.0, worst
    assert worst["value_ATG"] <= tol, worst
    assert worst["vscale_jacobian"] <= tol, worst
    assert worst["theta_grad"] <= tol, worst
    return worst


def sink_scores(trace: Trace, i: int) -> torch.Tensor:
    """alpha per (sequence, query head) of layer i: mean of a_t0 over t < min(T_eps, T)."""
    col = trace.layers[i].attn.detach()[..., 0]  # (b, H, T)
    return col[..., : min(T_EPS, col.shape[-1])].mean(-1)


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def _tok0_rest(per_position: torch.Tensor) -> tuple[float, float]:
    return per_position[0].item(), per_position[1 : REST + 1].mean().item()


def _summed_norms(g: torch.Tensor) -> torch.Tensor:
    """Per-position norm of the batch-summed gradient: (b, T, D) -> (T,)."""
    return g.sum(0).norm(dim=-1)


def _frobenius(grads: list[torch.Tensor | None]) -> float:
    total = sum(float((g * g).sum()) for g in grads if g is not None)
    return total**0.5


def _module_grads(trace: Trace, prefix: str) -> list[torch.Tensor | None]:
    return [w.grad for n, w in trace.weights.items() if n.startswith(prefix + ".")]


def metrics_from_trace(trace: Trace) -> dict[str, float]:
    s = trace.shapes
    t = trace.logits.shape[1]
    if t <= T_E:
        raise ValueError(f"sequences need more than {T_E} positions for R_GS; got {t}")
    out: dict[str, float] = {}
    for i, layer in enumerate(trace.layers):
        tag = f"L{i:02d}"
        # attention sinks (forward)
        col = layer.attn.detach()[..., 0]  # (b, H, T)
        alpha = sink_scores(trace, i)
        out[f"as/sink_rate/{tag}"] = (alpha > EPS_SINK).double().mean().item()
        out[f"as/mass/{tag}"] = col.sum(-1).mean().item()
        out[f"as/mass_sq/{tag}"] = (col * col).sum(-1).mean().item()

        # massive activations (forward): per-position norm, averaged over sequences (and KV heads for v)
        b = layer.h_in.shape[0]
        acts = {
            "h_in": layer.h_in,
            "h_half": layer.h_half,
            "h_out": layer.h_out,
            "attn_out": layer.r_attn,
            "mlp_out": layer.r_mlp,
            "v": layer.v_lin.view(b, t, s.kv_heads, s.head_dim),
        }
        for name, a in acts.items():
            norms = a.detach().norm(dim=-1)
            per_pos = norms.mean(0) if norms.dim() == 2 else norms.mean((0, 2))
            out[f"ma/{name}/tok0/{tag}"], out[f"ma/{name}/rest/{tag}"] = _tok0_rest(per_pos)

        # gradient sinks: batch-summed per-position gradients, then norms
        paths = {name: _summed_norms(g) for name, g in path_gradients(trace, i).items()}
        grad_in = paths["grad_in"]
        out[f"gs/ratio/{tag}"] = (grad_in[0] / grad_in[1 : T_E + 1].mean()).item()
        for name in GRAD_PATHS:
            out[f"gs/{name}/tok0/{tag}"], out[f"gs/{name}/rest/{tag}"] = _tok0_rest(paths[name])

        branches = {
            "attn": (layer.h_in, layer.h_tilde, layer.r_attn, layer.h_half),
            "mlp": (layer.h_half, layer.h_tilde_half, layer.r_mlp, layer.h_out),
        }
        for branch, (before, normed, residual, after) in branches.items():
            g_before, g_normed = before.grad.sum(0), normed.grad.sum(0)
            g_res, g_after = residual.grad.sum(0), after.grad.sum(0)
            ratios = {
                "bloat": g_normed.norm(dim=-1) / g_res.norm(dim=-1),
                "compress": (g_before - g_after).norm(dim=-1) / g_normed.norm(dim=-1),
                "change": g_before.norm(dim=-1) / g_after.norm(dim=-1),
            }
            for m, ratio in ratios.items():
                out[f"gs/{m}_{branch}/tok0/{tag}"], out[f"gs/{m}_{branch}/rest/{tag}"] = _tok0_rest(ratio)

        # parameter gradients
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"grad/{proj}/{tag}"] = _frobenius(_module_grads(trace, p + "self_attn." + proj))
        out[f"grad/mlp/{tag}"] = _frobenius(_module_grads(trace, p + "mlp"))

        # V-scale
        if trace.vscale_mode is not None:
            if trace.vscale_mode == "learned":
                out[f"grad/vscale/{tag}"] = _frobenius(_module_grads(trace, p + "self_attn.vscale"))
            phi = layer.phi.mean((0, 1))  # (T,)
            out[f"vscale/phi/tok0/{tag}"], out[f"vscale/phi/rest/{tag}"] = _tok0_rest(phi)
            for h, lam in enumerate(trace.lambdas[i].tolist()):
                out[f"vscale/lambda/{tag}/H{h}"] = lam

    layers = range(s.layers)
    out["gs/ratio/median"] = statistics.median(out[f"gs/ratio/L{i:02d}"] for i in layers)
    out["as/sink_rate/mean"] = statistics.fmean(out[f"as/sink_rate/L{i:02d}"] for i in layers)
    out["ma/h_out/tok0/max"] = max(out[f"ma/h_out/tok0/L{i:02d}"] for i in layers)
    out["ma/mlp_out/tok0/max"] = max(out[f"ma/mlp_out/tok0/L{i:02d}"] for i in layers)
    return out


def theta_gradient(trace: Trace, i: int) -> torch.Tensor:
    """d loss / d theta per KV head of layer i, by hand from g(v̂) (a check of autograd's theta gradient).

    v̂ = v r / (r + C): d v̂ / d C = -v r / (r + C)^2 = -v̂ / (r + C), and dC/dtheta = C.
    """
    layer, s = trace.layers[i], trace.shapes
    b, t = layer.v_lin.shape[:2]
    v = layer.v_lin.detach().view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
    r = (v * v).sum(-1, keepdim=True)
    c = layer.c.view(1, -1, 1, 1)
    dv_dc = -v * r / (r + c) ** 2
    return (layer.v_hat.grad * dv_dc).sum((0, 2, 3)) * layer.c


def reference_metrics(model, input_ids: torch.Tensor, check: bool = True) -> dict[str, float]:
    """Every metric ``vsp.measure`` must return (SPEC section 4), from scratch in float64."""
    trace = run_reference(model, input_ids)
    if check:
        self_check(trace)
    return metrics_from_trace(trace)


def expected_keys(num_layers: int, kv_heads: int, vscale_mode: str | None) -> set[str]:
    """The SPEC section 4 key set of ``measure`` for a model of this shape, written out independently."""
    keys = {"gs/ratio/median", "as/sink_rate/mean", "ma/h_out/tok0/max", "ma/mlp_out/tok0/max"}
    for i in range(num_layers):
        tag = f"L{i:02d}"
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
