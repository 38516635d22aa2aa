"""The paper's figures for the compared runs: one function per figure, each registered with its file name, title and
caption, and ``plot_all`` drawing them in that order. A figure needing data no run logged is left out."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vscale_plugin.apps.compare.runs import STATS_KEY, RunData

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_MODE_COLORS = {"off": "#4d4d4d", "fixed": "#1f77b4", "learned": "#d62728"}
_OTHER_COLORS = ("#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
_LAYER_KEY = re.compile(r"^as/sink_rate/L(\d+)$")


@dataclass
class ReportFigure:
    """One PNG written under figures/ and the words the report puts around it."""

    path: Path
    title: str
    caption: str


@dataclass
class _Runs:
    """The runs being drawn, with what every figure shares: a colour per run and the number of layers logged."""

    runs: list[RunData]
    colors: dict[str, str]
    layers: int

    @property
    def with_layers(self) -> list[RunData]:
        """The runs with per-layer statistics; none where no run logged a layer."""
        return [run for run in self.runs if run.has_stats] if self.layers else []


# (file name, title, caption, draw); draw returns None where no run logged what the figure shows.
_FIGURES: list[tuple[str, str, str, Callable[[_Runs], Figure | None]]] = []


def _figure(name: str, title: str, caption: str):
    def register(draw: Callable[[_Runs], Figure | None]) -> Callable[[_Runs], Figure | None]:
        _FIGURES.append((name, title, caption, draw))
        return draw

    return register


def plot_all(runs: list[RunData], figures_dir: Path) -> list[ReportFigure]:
    """The paper's figures for these runs; a figure needing data no run logged is left out."""
    figures_dir.mkdir(parents=True, exist_ok=True)
    drawn = _Runs(runs, _colors(runs), _layer_count(runs))
    out: list[ReportFigure] = []
    for name, title, caption, draw in _FIGURES:
        fig = draw(drawn)
        if fig is not None:
            path = figures_dir / f"{name}.png"
            fig.savefig(path, format="png")
            out.append(ReportFigure(path, title, caption))
    return out


# ---- what the figures share ----


def _colors(runs: list[RunData]) -> dict[str, str]:
    colors: dict[str, str] = {}
    used: set[str] = set()
    spare = iter(_OTHER_COLORS * (len(runs) // len(_OTHER_COLORS) + 1))
    for run in runs:
        color = _MODE_COLORS.get(run.mode)
        if color is None or color in used:
            color = next(spare)
        used.add(color)
        colors[run.run_id] = color
    return colors


def _layer_count(runs: list[RunData]) -> int:
    layers = [int(m.group(1)) + 1 for run in runs for key in run.latest if (m := _LAYER_KEY.match(key))]
    return max(layers, default=0)


def _new_figure(ncols: int, nrows: int = 1, width: float = 4.6, height: float = 3.4) -> tuple[Figure, list[Axes]]:
    # The object-oriented Figure draws with the Agg canvas and touches no pyplot/global backend state.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained", dpi=110)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _plot_layers(
    ax: Axes, runs: list[RunData], colors: dict[str, str], prefix: str, layers: int, style: str = "o-", suffix: str = ""
) -> bool:
    drew = False
    for run in runs:
        values = run.per_layer(prefix, layers)
        points = [(i, v) for i, v in enumerate(values) if v is not None]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, style, color=colors[run.run_id], label=run.label + suffix, markersize=4)
        drew = True
    ax.set_xlabel("layer")
    if layers <= 24:  # beyond that, matplotlib's own ticks stay readable
        ax.set_xticks(range(layers))
    return drew


def _scale_y(ax: Axes) -> None:
    """Log scale where the curves span more than a decade; within one, log ticks are hardly labelled."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y) and y > 0]
    if ys and max(ys) > 10 * min(ys):
        ax.set_yscale("log")


def _steps_axis(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# ---- the figures, in the report's order ----


@_figure(
    "sink_rate",
    "Attention sink rate per layer",
    "`as/sink_rate/Lxx`: share of (sequence, head) pairs whose mean attention to token 0 over the first 64 "
    "queries exceeds 0.3, at the last statistics step.",
)
def _sink_rate(p: _Runs) -> Figure | None:
    if not p.with_layers:
        return None
    fig, (ax,) = _new_figure(1, width=6.0)
    _plot_layers(ax, p.with_layers, p.colors, "as/sink_rate", p.layers)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("sink rate (alpha > 0.3)")
    ax.set_title("Attention sink rate per layer")
    ax.legend(fontsize=7)
    return fig


@_figure(
    "activation_norms",
    "Massive activations: token 0 vs the rest, per layer",
    "`ma/{h_out,mlp_out,attn_out}/{tok0,rest}/Lxx`: norm of token 0 (solid) and mean norm of tokens 1-15 "
    "(dashed) of the residual stream, the MLP outputs and the attention outputs.",
)
def _activation_norms(p: _Runs) -> Figure | None:
    if not p.with_layers:
        return None
    fig, axes = _new_figure(3)
    for ax, point in zip(axes, ("h_out", "mlp_out", "attn_out"), strict=True):
        _plot_layers(ax, p.with_layers, p.colors, f"ma/{point}/tok0", p.layers, "o-", " (token 0)")
        _plot_layers(ax, p.with_layers, p.colors, f"ma/{point}/rest", p.layers, "x--", " (tokens 1-15)")
        _scale_y(ax)
        ax.set_ylabel("L2 norm")
        ax.set_title(f"{point}: token 0 vs rest")
    axes[0].legend(fontsize=6)
    return fig


@_figure(
    "gradient_sink_ratio",
    "Gradient-sink ratio per layer",
    "`gs/ratio/Lxx`: gradient norm at token 0 after the input RMSNorm over the mean of tokens 1-31 "
    "(1 = no gradient sink).",
)
def _gradient_sink_ratio(p: _Runs) -> Figure | None:
    if not p.with_layers:
        return None
    fig, (ax,) = _new_figure(1, width=6.0)
    if not _plot_layers(ax, p.with_layers, p.colors, "gs/ratio", p.layers):
        return None
    ax.axhline(1.0, color="#999999", linewidth=0.8, linestyle=":")
    ax.set_ylabel("R_GS")
    ax.set_title("Gradient-sink ratio R_GS per layer")
    ax.legend(fontsize=7)
    return fig


@_figure(
    "value_norms",
    "Value-state norms per layer",
    "`ma/v/{tok0,rest}/Lxx`: norm of the value vectors before V-scale, averaged over KV heads; token 0 "
    "solid, tokens 1-15 dashed.",
)
def _value_norms(p: _Runs) -> Figure | None:
    if not p.with_layers:
        return None
    fig, (ax,) = _new_figure(1, width=6.0)
    _plot_layers(ax, p.with_layers, p.colors, "ma/v/tok0", p.layers, "o-", " (token 0)")
    _plot_layers(ax, p.with_layers, p.colors, "ma/v/rest", p.layers, "x--", " (tokens 1-15)")
    _scale_y(ax)
    ax.set_ylabel("L2 norm of v (before V-scale)")
    ax.set_title("Value-state norms per layer")
    ax.legend(fontsize=6)
    return fig


# Per-layer qr/ panels: (metric prefix, title). k_proj and v_proj read q_proj's input, up_proj gate_proj's, so their
# INT8 errors are the same curves and are not drawn again.
_QUANT_READINESS = (
    ("qr/kurtosis/h_out", "kurtosis of h_out"),
    ("qr/kurtosis/down_proj_in", "kurtosis of down_proj input"),
    ("qr/max_over_median/h_out", "max/median |h_out|"),
    ("qr/max_over_median/down_proj_in", "max/median |down_proj input|"),
    ("qr/int8_error/q_proj", "INT8 error, q/k/v_proj input"),
    ("qr/int8_error/o_proj", "INT8 error, o_proj input"),
    ("qr/int8_error/gate_proj", "INT8 error, gate/up_proj input"),
    ("qr/int8_error/down_proj", "INT8 error, down_proj input"),
)


@_figure(
    "quant_readiness",
    "Quantisation readiness per layer",
    "`qr/kurtosis/*/Lxx` (per-token kurtosis over the hidden dimension, 3 for Gaussian features), "
    "`qr/max_over_median/*/Lxx` (max |x| / median |x|) and `qr/int8_error/*/Lxx` (relative L2 error of per-tensor "
    "symmetric INT8 fake-quantisation of each linear's input), at the last statistics step. Outlier channels "
    "raise all three. A mixture-of-experts MLP has no MLP curves (no single down projection).",
)
def _quant_readiness(p: _Runs) -> Figure | None:
    panels = [(key, title) for key, title in _QUANT_READINESS
              if any(v is not None for run in p.with_layers for v in run.per_layer(key, p.layers))]  # fmt: skip
    if not panels:
        return None
    ncols = min(4, len(panels))
    fig, axes = _new_figure(ncols, math.ceil(len(panels) / ncols), width=3.6, height=2.8)
    for ax, (key, title) in zip(axes, panels, strict=False):
        _plot_layers(ax, p.with_layers, p.colors, key, p.layers)
        if "/kurtosis/" in key:
            ax.axhline(3.0, color="#999999", linewidth=0.8, linestyle=":")  # Gaussian features
        _scale_y(ax)
        ax.set_title(title, fontsize=9)
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    axes[0].legend(fontsize=6)
    return fig


@_figure("loss", "Loss curves", "`train/loss` (solid) and `eval/loss` (dashed) over optimiser steps.")
def _loss(p: _Runs) -> Figure | None:
    if not any(run.history.get("train/loss") for run in p.runs):
        return None
    fig, (ax,) = _new_figure(1, width=6.0)
    for run in p.runs:
        train = run.history.get("train/loss", [])
        evals = run.history.get("eval/loss", [])
        color = p.colors[run.run_id]
        if train:
            ax.plot(*zip(*train, strict=True), "-", color=color, label=f"{run.label} train", linewidth=1.2)
        if evals:
            ax.plot(*zip(*evals, strict=True), "o--", color=color, label=f"{run.label} eval", markersize=3)
    _steps_axis(ax)
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.legend(fontsize=7)
    return fig


@_figure(
    "lambda",
    "Learned lambda per layer and KV head",
    "`vscale/lambda/Lxx/Hh` at the last statistics step: lambda = exp(theta), C = d_model d_head sigma^2 lambda.",
)
def _lambda(p: _Runs) -> Figure | None:
    lambdas = [(run, lam) for run in p.runs if (lam := run.lambdas()) is not None]
    if not lambdas:
        return None
    fig, axes = _new_figure(len(lambdas), width=3.2, height=max(2.6, 0.35 * len(lambdas[0][1]) + 1.2))
    for ax, (run, lam) in zip(axes, lambdas, strict=True):
        image = ax.imshow(lam, aspect="auto", cmap="viridis", origin="upper")
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(len(lam[0])))
        ax.set_yticks(range(len(lam)))
        ax.set_title(run.label, fontsize=8)
        if len(lam) * len(lam[0]) <= 128:
            for i, row in enumerate(lam):
                for h, value in enumerate(row):
                    light = image.norm(value) > 0.6  # viridis turns yellow at the top: dark text there
                    color = "black" if light else "white"
                    ax.text(h, i, f"{value:.4g}", ha="center", va="center", fontsize=6, color=color)
        fig.colorbar(image, ax=ax, label="lambda")
    return fig


# The summaries over layers that every statistics step logs, and their panel titles.
_EVOLUTION = (
    ("ma/h_out/tok0/max", "max token-0 |h_out|"),
    ("ma/mlp_out/tok0/max", "max token-0 |mlp_out|"),
    ("gs/ratio/median", "median R_GS"),
    (STATS_KEY, "mean sink rate"),
)


@_figure(
    "evolution",
    "Token-0 norms and R_GS over training",
    "The summaries over layers at every statistics step: `ma/h_out/tok0/max`, `ma/mlp_out/tok0/max`, "
    "`gs/ratio/median`, `as/sink_rate/mean`.",
)
def _evolution(p: _Runs) -> Figure | None:
    if not any(len(run.history.get(STATS_KEY, [])) for run in p.runs):
        return None
    fig, axes = _new_figure(len(_EVOLUTION), width=3.8)
    for ax, (key, title) in zip(axes, _EVOLUTION, strict=True):
        for run in p.runs:
            points = run.history.get(key, [])
            if points:
                ax.plot(*zip(*points, strict=True), "o-", color=p.colors[run.run_id], label=run.label, markersize=3)
        _steps_axis(ax)
        ax.set_title(title)
        _scale_y(ax)
    axes[0].legend(fontsize=6)
    return fig


@_figure(
    "gradient_profiles",
    "Token-wise gradient norms per layer",
    "Norm of the gradient after the input RMSNorm at positions 0..63 (`stats/profiles_stepXXXXXXXX.json`, the "
    "last statistics step of each run): a gradient sink is the spike at position 0.",
)
def _gradient_profiles(p: _Runs) -> Figure | None:
    profiled = [run for run in p.runs if run.profiles and run.profiles.get("layers")]
    if not profiled:
        return None
    tags = sorted({tag for run in profiled for tag in run.profiles["layers"]})
    ncols = min(4, len(tags))
    nrows = math.ceil(len(tags) / ncols)
    fig, axes = _new_figure(ncols, nrows, width=3.4, height=2.6)
    for ax, tag in zip(axes, tags, strict=False):
        for run in profiled:
            layer = run.profiles["layers"].get(tag)
            if layer:
                positions = run.profiles.get("positions", range(len(layer["grad_in"])))
                ax.plot(
                    list(positions)[: len(layer["grad_in"])],
                    layer["grad_in"],
                    "-",
                    color=p.colors[run.run_id],
                    label=f"{run.label} (step {run.profiles.get('step', '?')})",
                    linewidth=1.0,
                )
        _scale_y(ax)
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("position")
    for ax in axes[len(tags) :]:
        ax.set_axis_off()
    axes[0].set_ylabel("|g(h~_t)|")
    axes[0].legend(fontsize=6)
    return fig
