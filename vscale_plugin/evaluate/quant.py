"""Simulated post-training quantisation of a Hugging Face causal LM (SPEC section 7): the ``--quant`` schemes.

The paper's claim is that V-scale keeps a model quantisable (no massive activations to wreck a per-tensor INT8 scale),
so the schemes are fake-quant in PyTorch: weights are rounded in place, and each linear's input is rounded by a
forward pre-hook. Nothing is replaced: V-scale lives in a forward hook on ``v_proj``, which a swapped-in module would
silently drop. A pre-hook runs before the projection and V-scale's forward hook after it, so V-scale acts on the
output of the quantised ``v_proj``, as it would in a deployed W8A8 kernel followed by V-scale.

Every ``nn.Linear`` is quantised except ``lm_head`` (and any linear sharing its weight with the embeddings), unless a
scheme says otherwise. Arithmetic is float32 whatever the model's dtype; results are cast back to it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

SCHEMES: tuple[str, ...] = (
    "none",
    "w8a8_dynamic",
    "w8a8_static",
    "w8a8_static_down_proj",
    "w8a8_smoothquant",
    "w4a16",
)
# Real quantisation backends, offered where their library and hardware are present (see unavailable()).
EXTRA_SCHEMES: tuple[str, ...] = ("w4a16_bnb",)

_CALIBRATED = ("w8a8_static", "w8a8_static_down_proj", "w8a8_smoothquant")
SMOOTHQUANT_ALPHA = 0.5
W4_GROUP = 128
BNB_BLOCKSIZE = 64  # bitsandbytes' own default for Linear4bit
# SmoothQuant's floor for the weight maxima and the factors: a dead channel must not divide by zero.
_SMOOTH_FLOOR = 1e-5

_DESCRIPTIONS = {
    "none": "No quantisation: v_proj and V-scale run as trained.",
    "w8a8_dynamic": (
        "Every linear but lm_head, v_proj included, gets INT8 per-output-channel weights and INT8 per-token inputs; "
        "V-scale acts, unquantised, on the quantised v_proj's output."
    ),
    "w8a8_static": (
        "Every linear but lm_head, v_proj included, gets INT8 per-output-channel weights and INT8 per-tensor inputs "
        "with a fixed MinMax scale from the calibration sequences; V-scale acts, unquantised, on the quantised "
        "v_proj's output."
    ),
    "w8a8_static_down_proj": (
        "Only mlp.down_proj gets w8a8_static (INT8 per-output-channel weights, static per-tensor INT8 inputs); "
        "v_proj and V-scale run as trained."
    ),
    "w8a8_smoothquant": (
        "SmoothQuant (alpha 0.5) then w8a8_static on every linear but lm_head: v_proj shares q/k_proj's smoothing "
        "(foldable into input_layernorm) and V-scale acts, unquantised, on the quantised v_proj's output; o_proj's "
        "smoothing stays an explicit scale on its input, since folding it into v_proj would pass through V-scale's "
        "nonlinear phi."
    ),
    "w4a16": (
        "Every linear but lm_head, v_proj included, gets 4-bit round-to-nearest weights (asymmetric, group 128 along "
        "the input), inputs as trained; V-scale acts on the quantised v_proj's output."
    ),
    "w4a16_bnb": (
        "Every linear but lm_head, v_proj included, gets bitsandbytes NF4 weights (blocksize 64, dequantised in "
        "place), inputs as trained; V-scale acts on the quantised v_proj's output."
    ),
}


class QuantError(ValueError):
    """A quantisation scheme that cannot run as asked; the message names the problem and the fix."""


def check_scheme(name: str) -> str:
    """``name`` when it is a known scheme, else a QuantError listing them."""
    if name not in SCHEMES and name not in EXTRA_SCHEMES:
        raise QuantError(
            f"--quant {name!r} is not a quantisation scheme; choose one of {', '.join(SCHEMES + EXTRA_SCHEMES)}"
        )
    return name


def unavailable(name: str) -> str | None:
    """None when scheme ``name`` can run on this machine, else a one-line reason and what to install."""
    check_scheme(name)
    if name in SCHEMES:
        return None
    try:
        import bitsandbytes.functional  # noqa: F401
    except ImportError:
        return "bitsandbytes is not installed (pip install bitsandbytes); needs CUDA"
    if not torch.cuda.is_available():
        return "bitsandbytes 4-bit needs CUDA, and no CUDA device is visible; use w4a16 (simulated) instead"
    return None


def needs_calibration(name: str) -> bool:
    """True for the schemes whose static activation scales come from calibration sequences."""
    return check_scheme(name) in _CALIBRATED


def describe(name: str) -> str:
    """One sentence for the report: what the scheme does to v_proj and to V-scale."""
    return _DESCRIPTIONS[check_scheme(name)]


# ---- the formulas -------------------------------------------------------------------------------------------------


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _safe(scale: torch.Tensor) -> torch.Tensor:
    # A zero scale means an all-zero row/token/tensor: dividing by the smallest normal float rounds any x to the clamp
    # bound, and multiplying back by the zero scale gives 0, never 0/0 = NaN.
    return scale.clamp_min(torch.finfo(torch.float32).tiny)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric fake quantisation; ``scale`` broadcasts against ``x``. Float32 in, float32 out."""
    # q(x; s, b) = s * clamp(round(x / s), -2^(b-1), 2^(b-1) - 1)
    return scale * torch.clamp(torch.round(x / _safe(scale)), -_qmax(bits) - 1, _qmax(bits))


def absmax_scale(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """The symmetric scale for a range ``amax``."""
    # s = max|x| / (2^(b-1) - 1)
    return amax / _qmax(bits)


def weight_scales_per_channel(weight: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-output-channel scales of a ``(out, in)`` weight, shape ``(out, 1)``."""
    # s_i = max_j |W_ij| / (2^(b-1) - 1)
    return absmax_scale(weight.float().abs().amax(dim=1, keepdim=True), bits)


def token_scales(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-token scales of activations ``(..., features)``, shape ``(..., 1)``."""
    # s_t = max_j |x_tj| / (2^(b-1) - 1)
    return absmax_scale(x.float().abs().amax(dim=-1, keepdim=True), bits)


def w4_group_fake_quant(weight: torch.Tensor, group: int = W4_GROUP, bits: int = 4) -> torch.Tensor:
    """Asymmetric round-to-nearest of a ``(out, in)`` weight in groups of ``group`` input columns; a last group
    shorter than ``group`` where ``in`` is not a multiple. Float32 out.

    The range of each group is widened to include 0 (GPTQ's convention), so that 0 is exact and a constant group
    comes back exactly.
    """
    w = weight.float()
    levels = 2**bits - 1
    out = torch.empty_like(w)
    for start in range(0, w.shape[1], group):
        g = w[:, start : start + group]
        low = g.amin(dim=1, keepdim=True).clamp_max(0)
        high = g.amax(dim=1, keepdim=True).clamp_min(0)
        # s = (max - min) / (2^b - 1), z = round(-min / s), q = clamp(round(w / s) + z, 0, 2^b - 1), w' = s (q - z)
        scale = (high - low) / levels
        zero = torch.round(-low / _safe(scale))
        q = torch.clamp(torch.round(g / _safe(scale)) + zero, 0, levels)
        out[:, start : start + group] = scale * (q - zero)
    return out


def smoothing_factors(act_max: torch.Tensor, weight: torch.Tensor, alpha: float = SMOOTHQUANT_ALPHA) -> torch.Tensor:
    """SmoothQuant's per-input-channel migration factors for inputs with channel maxima ``act_max`` (shape ``in``)
    and a ``(out, in)`` weight (the rows of every linear sharing that input, concatenated)."""
    w_max = weight.float().abs().amax(dim=0).clamp_min(_SMOOTH_FLOOR)
    # s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha)
    return (act_max.float().pow(alpha) / w_max.pow(1 - alpha)).clamp_min(_SMOOTH_FLOOR)


# ---- the hooks ----------------------------------------------------------------------------------------------------


class ActivationQuant:
    """Forward pre-hook on a linear: fake-quantises its input to INT8, per token (``scale`` None) or with a fixed
    per-tensor ``scale``; ``smooth`` (SmoothQuant's s) divides the input per channel first.

    An object rather than a closure so that ``copy.deepcopy`` of the model copies it; its tensors follow the input's
    device, so the quantised model may still be moved.
    """

    def __init__(self, bits: int = 8, scale: torch.Tensor | None = None, smooth: torch.Tensor | None = None) -> None:
        self.bits = bits
        self.scale = scale
        self.smooth = smooth

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        xf = x.float()
        if self.smooth is not None:
            self.smooth = self.smooth.to(x.device)
            xf = xf / self.smooth  # x -> x / s: the half of the migration that would fold into the preceding layer
        if self.scale is None:
            scale = token_scales(xf, self.bits)
        else:
            self.scale = self.scale.to(x.device)
            scale = self.scale
        return (fake_quant(xf, scale, self.bits).to(x.dtype), *args[1:])


@dataclass
class _InputStats:
    """MinMax of one linear's input over the calibration sequences, per input channel."""

    channel_max: torch.Tensor | None = None
    group: int = -1  # linears of one parent fed the same tensor (q/k/v, gate/up) share a group and its smoothing

    def update(self, x: torch.Tensor) -> None:
        m = x.detach().float().abs().reshape(-1, x.shape[-1]).amax(dim=0)
        self.channel_max = m if self.channel_max is None else torch.maximum(self.channel_max, m)


def _targets(model: nn.Module, scheme: str) -> dict[str, nn.Linear]:
    """The linears a scheme quantises: all but lm_head and any sharing a weight with the embeddings (quantising
    those in place would change the tied embedding too); ``w8a8_static_down_proj`` only ``mlp.down_proj``."""
    protected = set()
    for get in ("get_output_embeddings", "get_input_embeddings"):
        embeddings = getattr(model, get, lambda: None)()
        if embeddings is not None:
            protected.add(id(embeddings))
            protected.add(id(embeddings.weight))
    targets = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and id(m) not in protected and id(m.weight) not in protected
    }
    if scheme == "w8a8_static_down_proj":
        targets = {name: m for name, m in targets.items() if name.endswith("mlp.down_proj")}
        if not targets:
            raise QuantError(
                f"--quant w8a8_static_down_proj: {type(model).__name__} has no mlp.down_proj linear; "
                "use w8a8_static for every linear"
            )
    return targets


def _calibrate(
    model: nn.Module, targets: dict[str, nn.Linear], calibration: Sequence[torch.Tensor]
) -> dict[str, _InputStats]:
    """Run the calibration sequences through ``model`` and record each target's input MinMax per channel; also
    which siblings receive the very same input tensor (one preceding norm, so one foldable smoothing)."""
    stats = {name: _InputStats() for name in targets}
    last_input: dict[str, tuple[torch.Tensor, int]] = {}  # parent name -> (its last linear input, that input's group)
    groups = 0
    first_batch = True

    def recorder(name: str):
        parent = name.rpartition(".")[0]

        def hook(module: nn.Module, args: tuple) -> None:
            nonlocal groups
            x = args[0]
            stats[name].update(x)
            if first_batch:
                previous = last_input.get(parent)
                if previous is not None and previous[0] is x:
                    stats[name].group = previous[1]
                else:
                    stats[name].group = groups
                    groups += 1
                last_input[parent] = (x, stats[name].group)

        return hook

    handles = [m.register_forward_pre_hook(recorder(name)) for name, m in targets.items()]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for ids in calibration:
                if ids.numel():
                    model(input_ids=ids.to(device), use_cache=False)
                    first_batch = False
                    last_input.clear()
    finally:
        for h in handles:
            h.remove()
    silent = [name for name, s in stats.items() if s.channel_max is None]
    if silent:
        raise QuantError(
            f"{len(silent)} linears (e.g. {silent[0]}) received no input from the calibration sequences, so they have "
            "no static scale; give more or longer --calib sequences"
        )
    return stats


def _set_weight(linear: nn.Linear, new: torch.Tensor) -> None:
    # In place on the copy: the module object (and every hook on it, V-scale's included) stays.
    linear.weight.data = new.to(linear.weight.dtype)


def _smooth_groups(targets: dict[str, nn.Linear], stats: dict[str, _InputStats]) -> dict[str, torch.Tensor]:
    """SmoothQuant's factors per target: one per group of linears sharing an input, from the group's stacked weights,
    so that q/k/v_proj (and gate/up_proj) get the factors a fold into their common RMSNorm would give."""
    members: dict[int, list[str]] = {}
    for name in targets:
        members.setdefault(stats[name].group, []).append(name)
    factors = {}
    for names in members.values():
        act_max = torch.stack([stats[n].channel_max for n in names]).amax(dim=0)
        weight = torch.cat([targets[n].weight.detach().float() for n in names], dim=0)
        s = smoothing_factors(act_max, weight)
        factors.update(dict.fromkeys(names, s))
    return factors


def _bnb_4bit(weight: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight.detach().cuda(), blocksize=BNB_BLOCKSIZE, quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state).to(weight.device)


def quantize(model: nn.Module, scheme: str, calibration: Sequence[torch.Tensor] = ()) -> nn.Module:
    """A fake-quantised deep copy of ``model`` under ``scheme``, in eval mode; ``model`` is left untouched.

    ``calibration``: ``input_ids`` tensors ``(batch, seq)`` of training text, needed by the static schemes
    (see :func:`needs_calibration`). Static scales are fixed afterwards: inputs beyond the calibrated range clamp.
    """
    check_scheme(scheme)
    reason = unavailable(scheme)
    if reason:
        raise QuantError(f"--quant {scheme} cannot run here: {reason}")
    if needs_calibration(scheme) and not any(ids.numel() for ids in calibration):
        raise QuantError(
            f"--quant {scheme} needs --calib N > 0 calibration sequences for its static activation scales; got none"
        )
    quantized = copy.deepcopy(model).eval()
    if scheme == "none":
        return quantized
    targets = _targets(quantized, scheme)
    # Calibrate the unquantised copy in one pass (MinMax on the float model, the usual PTQ practice).
    stats = _calibrate(quantized, targets, calibration) if needs_calibration(scheme) else {}
    smooth = _smooth_groups(targets, stats) if scheme == "w8a8_smoothquant" else {}
    with torch.no_grad():
        for name, linear in targets.items():
            weight = linear.weight.detach().float()
            if scheme == "w4a16":
                _set_weight(linear, w4_group_fake_quant(weight))
                continue
            if scheme == "w4a16_bnb":
                _set_weight(linear, _bnb_4bit(linear.weight))
                continue
            hook = ActivationQuant(bits=8)
            if scheme != "w8a8_dynamic":
                channel_max = stats[name].channel_max
                if name in smooth:
                    # W -> W * s per input channel; the input gets x / s in the hook. For q/k/v and gate/up this
                    # is a fold into the preceding RMSNorm's weight, for down_proj into up_proj's rows; o_proj's
                    # would go into v_proj's rows, but V-scale's nonlinear phi sits between, so it stays explicit.
                    hook.smooth = smooth[name]
                    weight = weight * smooth[name]
                    channel_max = channel_max / smooth[name]
                hook.scale = absmax_scale(channel_max.amax(), 8)  # static per-tensor MinMax of the (smoothed) input
            _set_weight(linear, fake_quant(weight, weight_scales_per_channel(weight, 8), 8))
            linear.register_forward_pre_hook(hook)
    return quantized
