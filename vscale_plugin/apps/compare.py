"""``launchers/compare.py``: baseline vs V-scale side by side, from MLflow runs of ``launchers/pretrain.py`` (issue 5).

One table (``report.md``) and the paper's figures (``figures/*.png``) in ``--out``, and the same files as artifacts of
a new MLflow run tagged ``comparison`` in the same experiment, so they show in the MLflow UI next to their sources.
Reads MLflow only: no model, no checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from vscale_plugin.launch.cli import ConfigError, OneLineParser, UsageError, fail
from vscale_plugin.tracking import default_tracking_uri

BASELINE = "off"
# Every stats step logs this summary (SPEC section 4), whatever the model; its absence means no --stats_every.
STATS_KEY = "as/sink_rate/mean"
# Metrics whose whole history is read; every other metric is read at its last logged step.
HISTORY_KEYS = (
    "train/loss",
    "eval/loss",
    "perf/tokens_per_s",
    "ma/h_out/tok0/max",
    "ma/mlp_out/tok0/max",
    "gs/ratio/median",
    STATS_KEY,
)
# Report columns: (header, what the number is). Statistics are the values at the run's last statistics step.
COLUMNS = (
    ("train loss", "last train/loss"),
    ("eval loss", "last eval/loss"),
    ("perplexity", "exp(eval loss)"),
    ("median R_GS", "gs/ratio/median: median over layers of R_GS"),
    ("mean sink rate", "as/sink_rate/mean: mean over layers of the sink rate"),
    ("max tok0 |h_out|", "ma/h_out/tok0/max: largest token-0 norm of the residual stream over layers"),
    ("max tok0 |mlp_out|", "ma/mlp_out/tok0/max: largest token-0 norm of the MLP outputs over layers"),
    ("tokens/s", "median of perf/tokens_per_s over the run"),
)
# MLflow's client defaults (7 retries, exponential backoff) would keep a user waiting minutes on a dead server;
# its download progress bars would bury the table in the terminal.
_MLFLOW_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
_MODE_COLORS = {"off": "#4d4d4d", "fixed": "#1f77b4", "learned": "#d62728"}
_OTHER_COLORS = ("#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
_PROFILE_FILE = re.compile(r"profiles_step(\d+)\.json$")
_LAYER_KEY = re.compile(r"^as/sink_rate/L(\d+)$")
_LAMBDA_KEY = re.compile(r"^vscale/lambda/L(\d+)/H(\d+)$")
_TAG_CHARS = re.compile(r"[^\w.\-/ :]")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="launchers/compare.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", required=True, help="MLflow experiment of the runs; the comparison run goes there")
    p.add_argument(
        "--runs",
        nargs="+",
        default=None,
        metavar="RUN_ID",
        help="compare exactly these runs (default: the newest finished run of each V-scale mode)",
    )
    p.add_argument(
        "--filter",
        default=None,
        metavar="SEARCH",
        help="MLflow search filter for the default selection, e.g. \"tags.preset = 'smoke'\"",
    )
    p.add_argument("--out", required=True, help="directory for report.md and figures/")
    p.add_argument("--run_name", default=None, help="name of the comparison run (default: compare-<modes>-<time>)")
    args = p.parse_args(argv)
    if args.runs is not None and args.filter is not None:
        raise UsageError("--filter selects among the experiment's runs and --runs names them; give one of the two")
    if args.runs is not None:
        args.runs = list(dict.fromkeys(args.runs))  # a run named twice is still one row
    return args


@dataclass
class RunData:
    """What the report and the figures need of one training run, read from MLflow once."""

    run_id: str
    name: str
    mode: str
    status: str
    latest: dict[str, float]  # every metric at its last logged step (statistics: the last statistics step)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # HISTORY_KEYS, sorted by step
    profiles: dict[str, Any] | None = None  # the last stats/profiles_stepXXXXXXXX.json, where the run logged one

    @property
    def has_stats(self) -> bool:
        return STATS_KEY in self.latest

    @property
    def stats_step(self) -> int | None:
        steps = [s for s, _ in self.history.get(STATS_KEY, [])]
        return max(steps) if steps else None

    @property
    def label(self) -> str:
        return f"{self.mode}: {self.name}"

    def per_layer(self, prefix: str, layers: int) -> list[float | None]:
        """`prefix/L00`, `prefix/L01`, ... at the last statistics step; None where not logged."""
        return [self.latest.get(f"{prefix}/L{i:02d}") for i in range(layers)]

    def lambdas(self) -> list[list[float]] | None:
        """lambda[layer][kv head] (`vscale/lambda/Lxx/Hh`), None for runs without learned/fixed V-scale metrics."""
        found = {}
        for key, value in self.latest.items():
            m = _LAMBDA_KEY.match(key)
            if m:
                found[int(m.group(1)), int(m.group(2))] = value
        if not found:
            return None
        layers, heads = max(k[0] for k in found) + 1, max(k[1] for k in found) + 1
        return [[found.get((layer, h), math.nan) for h in range(heads)] for layer in range(layers)]


# ---- MLflow: reaching the store, selecting and reading runs ----


def check_store(uri: str) -> None:
    """A local store must already exist: MLflow would otherwise create an empty one and report 'no experiment'."""
    path = None
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
    elif uri.startswith("file:"):
        path = Path(uri[len("file:") :].removeprefix("//"))
    elif "://" not in uri:
        path = Path(uri)
    if path is not None and not path.exists():
        raise UsageError(
            f"no MLflow store at {path} (tracking URI {uri}); run from the directory you trained in (pretrain.py "
            "logs to ./mlflow.db) or set MLFLOW_TRACKING_URI to the store of your runs"
        )


@contextlib.contextmanager
def reaching(uri: str) -> Iterator[None]:
    """Turns MLflow's 'could not connect' into a one-line error naming the URI and the fix."""
    try:
        yield
    except MlflowException as err:
        if err.get_http_status_code() < 500:
            raise
        raise UsageError(
            f"cannot reach the MLflow tracking store {uri} ({_reason(err)}); start the server (e.g. mlflow server "
            "--backend-store-uri sqlite:///mlflow.db) or set MLFLOW_TRACKING_URI to the store your runs were logged to"
        ) from err
    except requests.exceptions.ConnectionError as err:  # MLflow passes some through unwrapped (artifact downloads)
        raise UsageError(
            f"cannot reach the MLflow tracking store {uri} ({_reason(err)}); start the server or set "
            "MLFLOW_TRACKING_URI to the store your runs were logged to"
        ) from err


def _reason(err: BaseException) -> str:
    text = str(err)
    m = re.search(r"\[Errno -?\d+\] ([^\"')]+)", text)
    if m:
        return m.group(1).strip()
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return first if len(first) <= 160 else first[:157] + "..."


def find_experiment(client: MlflowClient, name: str) -> str:
    """The experiment id of `name`; an error listing some existing experiments when there is none."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage == "active":
        return experiment.experiment_id
    if experiment is not None:
        raise UsageError(
            f"--experiment {name}: the experiment is deleted; restore it (mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}) or choose another"
        )
    existing = [e.name for e in client.search_experiments(max_results=50, order_by=["last_update_time DESC"])]
    if not existing:
        raise UsageError(
            f"--experiment {name}: the store {client.tracking_uri} holds no experiments; train first "
            "(launchers/pretrain.py --experiment NAME) or set MLFLOW_TRACKING_URI to the store of your runs"
        )
    shown = ", ".join(existing[:8]) + (f" (and {len(existing) - 8} more)" if len(existing) > 8 else "")
    raise UsageError(f"--experiment {name}: no such experiment in {client.tracking_uri}; existing: {shown}")


def run_mode(run: Run) -> str | None:
    """The V-scale mode pretrain.py recorded (tag `vscale`, else param `vscale`); None for other kinds of runs."""
    return run.data.tags.get("vscale") or run.data.params.get("vscale")


def _excluded(run: Run) -> bool:
    return run.data.tags.get("comparison") == "true" or run.data.tags.get("analysis") == "true"


def _search_all(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=filter_string,
            max_results=1000,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        runs += page
        token = page.token
        if not token:
            return runs


def select_runs(
    client: MlflowClient, experiment: str, experiment_id: str, run_ids: list[str] | None, filter_string: str | None
) -> list[Run]:
    """Explicit `run_ids`, or the newest FINISHED training run of each V-scale mode that matches `filter_string`.

    Comparison and analysis runs are never picked by the default selection.
    """
    if run_ids is not None:
        runs = []
        for run_id in run_ids:
            try:
                runs.append(client.get_run(run_id))
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                raise UsageError(
                    f"--runs {run_id}: no such run in {client.tracking_uri}; the run ids are in the MLflow UI or "
                    f"come from a default selection (leave out --runs)"
                ) from None
        return runs
    try:
        matching = _search_all(client, experiment_id, filter_string or "")
    except MlflowException as err:
        if err.error_code != "INVALID_PARAMETER_VALUE":
            raise
        raise UsageError(
            f"--filter {filter_string!r}: not an MLflow search filter ({_reason(err)}); e.g. \"tags.preset = 'smoke'\""
        ) from None
    newest: dict[str, Run] = {}
    for run in matching:  # newest first
        mode = run_mode(run)
        if run.info.status == "FINISHED" and not _excluded(run) and mode is not None:
            newest.setdefault(mode, run)
    if not newest:
        where = f" matching --filter {filter_string!r}" if filter_string else ""
        if not matching:
            hint = "change the filter" if filter_string else "train first (launchers/pretrain.py --experiment ...)"
            raise UsageError(f"--experiment {experiment}: no runs{where}; {hint}")
        counts: dict[str, int] = {}
        for run in matching:
            kind = "comparison/analysis" if _excluded(run) else run.info.status
            counts[kind] = counts.get(kind, 0) + 1
        seen = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
        raise UsageError(
            f"--experiment {experiment}: no FINISHED training run{where} (found {seen}); let a run finish, change "
            "the filter or name runs with --runs"
        )
    return sorted(newest.values(), key=lambda r: _mode_order(run_mode(r)))


def _mode_order(mode: str | None) -> tuple[int, str]:
    order = {BASELINE: 0, "fixed": 1, "learned": 2}
    return order.get(mode or "", 3), mode or ""


def load_run(client: MlflowClient, run: Run) -> RunData:
    """Metrics, the histories in HISTORY_KEYS and the last gradient profile of one run."""
    data = RunData(
        run_id=run.info.run_id,
        name=run.info.run_name or run.info.run_id[:8],
        mode=run_mode(run) or "?",
        status=run.info.status,
        latest=dict(run.data.metrics),
    )
    for key in HISTORY_KEYS:
        if key in data.latest:
            data.history[key] = sorted((m.step, m.value) for m in client.get_metric_history(data.run_id, key))
    try:
        profiles = [
            (int(m.group(1)), f.path)
            for f in client.list_artifacts(data.run_id, "stats")
            if (m := _PROFILE_FILE.search(f.path))
        ]
        if profiles:
            _, path = max(profiles)
            with tempfile.TemporaryDirectory() as tmp:
                data.profiles = json.loads(Path(client.download_artifacts(data.run_id, path, tmp)).read_text())
    except (MlflowException, OSError, ValueError) as err:
        # The artifact store can fail apart from the tracking store (credentials, a deleted file); the profiles
        # feed one figure, which is no reason to lose the report.
        _warn(f"run {data.name} ({data.run_id}): gradient profiles not read ({_reason(err)}); left out of the figure")
    return data


# ---- the table ----


def summarize(run: RunData) -> dict[str, float | None]:
    """The report's numbers for one run (COLUMNS); None where the run did not log them."""
    eval_loss = run.latest.get("eval/loss")
    throughput = [v for _, v in run.history.get("perf/tokens_per_s", [])]
    return {
        "train loss": run.latest.get("train/loss"),
        "eval loss": eval_loss,
        "perplexity": (math.exp(eval_loss) if eval_loss < 700 else math.inf) if eval_loss is not None else None,
        "median R_GS": run.latest.get("gs/ratio/median"),
        "mean sink rate": run.latest.get(STATS_KEY),
        "max tok0 |h_out|": run.latest.get("ma/h_out/tok0/max"),
        "max tok0 |mlp_out|": run.latest.get("ma/mlp_out/tok0/max"),
        "tokens/s": statistics.median(throughput) if throughput else None,
    }


def ratios(run: dict[str, float | None], baseline: dict[str, float | None]) -> dict[str, float | None]:
    """V-scale / baseline per column; None where either is missing or the baseline is 0."""
    out: dict[str, float | None] = {}
    for column, _ in COLUMNS:
        a, b = run[column], baseline[column]
        out[column] = a / b if a is not None and b is not None and b != 0 else None
    return out


def fmt(value: float | None) -> str:
    """4 significant digits; '-' for a number the run did not log."""
    return "-" if value is None else f"{value:.4g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def format_table(runs: list[RunData], baseline: RunData | None) -> str:
    """One markdown table: a row per run, then a `<mode> / off` row of ratios per non-baseline run."""
    header = ["run", "id", "vscale", *[name for name, _ in COLUMNS]]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    numbers = {run.run_id: summarize(run) for run in runs}
    for run in runs:
        cells = [run.name, run.run_id, run.mode, *[fmt(numbers[run.run_id][c]) for c, _ in COLUMNS]]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if baseline is not None:
        for run in runs:
            if run is baseline:
                continue
            r = ratios(numbers[run.run_id], numbers[baseline.run_id])
            cells = [
                f"ratio to {baseline.name}",
                run.run_id,
                f"{run.mode} / {baseline.mode}",
                *[fmt(r[c]) for c, _ in COLUMNS],
            ]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def write_report(
    path: Path, experiment: str, uri: str, runs: list[RunData], baseline: RunData | None, figures: list[ReportFigure]
) -> str:
    """report.md: the table, what its columns mean, the runs, the figures. Returns the table."""
    table = format_table(runs, baseline)
    parts = [
        f"# V-scale vs baseline: experiment `{experiment}`",
        "",
        table,
        "",
        "Columns: " + "; ".join(f"**{name}** = {meaning}" for name, meaning in COLUMNS) + ". Statistics are taken at "
        "each run's last statistics step (`--stats_every`); '-' marks what a run did not log. "
        + (
            f"Rows `<mode> / {baseline.mode}` divide each number by the baseline's (`{baseline.name}`)."
            if baseline is not None
            else "No baseline (`--vscale off`) run was selected, so there are no ratio rows."
        ),
        "",
        f"Runs (tracking URI `{uri}`):",
        "",
    ]
    for run in runs:
        step = run.stats_step
        stats = f"statistics at step {step}" if step is not None else "no statistics (train with --stats_every N)"
        last = run.history.get("train/loss", [])
        steps = f"{last[-1][0]} steps" if last else "no train/loss"
        parts.append(f"- `{run.name}` (`{run.run_id}`): vscale={run.mode}, {run.status}, {steps}, {stats}")
    parts.append("")
    for figure in figures:
        parts += [f"## {figure.title}", "", f"![{figure.title}](figures/{figure.path.name})", "", figure.caption, ""]
    text = "\n".join(parts)
    path.write_text(text)
    return table


# ---- the figures ----


@dataclass
class ReportFigure:
    """One PNG written under figures/ and the words the report puts around it."""

    path: Path
    title: str
    caption: str


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


def _new_figure(ncols: int, nrows: int = 1, width: float = 4.6, height: float = 3.4):
    # The object-oriented Figure draws with the Agg canvas and touches no pyplot/global backend state.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained", dpi=110)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _plot_layers(
    ax, runs: list[RunData], colors: dict[str, str], prefix: str, layers: int, style: str = "o-", suffix: str = ""
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


def _scale_y(ax) -> None:
    """Log scale where the curves span more than a decade; within one, log ticks are hardly labelled."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y) and y > 0]
    if ys and max(ys) > 10 * min(ys):
        ax.set_yscale("log")


def _steps_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, path: Path) -> None:
    fig.savefig(path, format="png")


def plot_all(runs: list[RunData], figures_dir: Path) -> list[ReportFigure]:
    """The paper's figures for these runs; a figure needing data no run logged is left out."""
    figures_dir.mkdir(parents=True, exist_ok=True)
    colors = _colors(runs)
    layers = _layer_count(runs)
    stats_runs = [run for run in runs if run.has_stats]
    out: list[ReportFigure] = []

    def add(name: str, title: str, caption: str, fig) -> None:
        path = figures_dir / f"{name}.png"
        _save(fig, path)
        out.append(ReportFigure(path, title, caption))

    if stats_runs and layers:
        fig, (ax,) = _new_figure(1, width=6.0)
        _plot_layers(ax, stats_runs, colors, "as/sink_rate", layers)
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("sink rate (alpha > 0.3)")
        ax.set_title("Attention sink rate per layer")
        ax.legend(fontsize=7)
        add(
            "sink_rate",
            "Attention sink rate per layer",
            "`as/sink_rate/Lxx`: share of (sequence, head) pairs whose mean attention to token 0 over the first 64 "
            "queries exceeds 0.3, at the last statistics step.",
            fig,
        )

        fig, axes = _new_figure(3)
        for ax, point in zip(axes, ("h_out", "mlp_out", "attn_out"), strict=True):
            _plot_layers(ax, stats_runs, colors, f"ma/{point}/tok0", layers, "o-", " (token 0)")
            _plot_layers(ax, stats_runs, colors, f"ma/{point}/rest", layers, "x--", " (tokens 1-15)")
            _scale_y(ax)
            ax.set_ylabel("L2 norm")
            ax.set_title(f"{point}: token 0 vs rest")
        axes[0].legend(fontsize=6)
        add(
            "activation_norms",
            "Massive activations: token 0 vs the rest, per layer",
            "`ma/{h_out,mlp_out,attn_out}/{tok0,rest}/Lxx`: norm of token 0 (solid) and mean norm of tokens 1-15 "
            "(dashed) of the residual stream, the MLP outputs and the attention outputs.",
            fig,
        )

        fig, (ax,) = _new_figure(1, width=6.0)
        if _plot_layers(ax, stats_runs, colors, "gs/ratio", layers):
            ax.axhline(1.0, color="#999999", linewidth=0.8, linestyle=":")
            ax.set_ylabel("R_GS")
            ax.set_title("Gradient-sink ratio R_GS per layer")
            ax.legend(fontsize=7)
            add(
                "gradient_sink_ratio",
                "Gradient-sink ratio per layer",
                "`gs/ratio/Lxx`: gradient norm at token 0 after the input RMSNorm over the mean of tokens 1-31 "
                "(1 = no gradient sink).",
                fig,
            )

        fig, (ax,) = _new_figure(1, width=6.0)
        _plot_layers(ax, stats_runs, colors, "ma/v/tok0", layers, "o-", " (token 0)")
        _plot_layers(ax, stats_runs, colors, "ma/v/rest", layers, "x--", " (tokens 1-15)")
        _scale_y(ax)
        ax.set_ylabel("L2 norm of v (before V-scale)")
        ax.set_title("Value-state norms per layer")
        ax.legend(fontsize=6)
        add(
            "value_norms",
            "Value-state norms per layer",
            "`ma/v/{tok0,rest}/Lxx`: norm of the value vectors before V-scale, averaged over KV heads; token 0 "
            "solid, tokens 1-15 dashed.",
            fig,
        )

    if any(run.history.get("train/loss") for run in runs):
        fig, (ax,) = _new_figure(1, width=6.0)
        for run in runs:
            train = run.history.get("train/loss", [])
            evals = run.history.get("eval/loss", [])
            if train:
                ax.plot(
                    *zip(*train, strict=True), "-", color=colors[run.run_id], label=f"{run.label} train", linewidth=1.2
                )
            if evals:
                ax.plot(
                    *zip(*evals, strict=True), "o--", color=colors[run.run_id], label=f"{run.label} eval", markersize=3
                )
        _steps_axis(ax)
        ax.set_ylabel("loss")
        ax.set_title("Loss")
        ax.legend(fontsize=7)
        add("loss", "Loss curves", "`train/loss` (solid) and `eval/loss` (dashed) over optimiser steps.", fig)

    lambdas = [(run, lam) for run in runs if (lam := run.lambdas()) is not None]
    if lambdas:
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
                        ax.text(
                            h,
                            i,
                            f"{value:.4g}",
                            ha="center",
                            va="center",
                            fontsize=6,
                            color="black" if light else "white",
                        )
            fig.colorbar(image, ax=ax, label="lambda")
        add(
            "lambda",
            "Learned lambda per layer and KV head",
            "`vscale/lambda/Lxx/Hh` at the last statistics step: lambda = exp(theta), C = d_model d_head sigma^2 "
            "lambda.",
            fig,
        )

    evolution = (
        ("ma/h_out/tok0/max", "max token-0 |h_out|"),
        ("ma/mlp_out/tok0/max", "max token-0 |mlp_out|"),
        ("gs/ratio/median", "median R_GS"),
        (STATS_KEY, "mean sink rate"),
    )
    if any(len(run.history.get(STATS_KEY, [])) for run in runs):
        fig, axes = _new_figure(len(evolution), width=3.8)
        for ax, (key, title) in zip(axes, evolution, strict=True):
            for run in runs:
                points = run.history.get(key, [])
                if points:
                    ax.plot(*zip(*points, strict=True), "o-", color=colors[run.run_id], label=run.label, markersize=3)
            _steps_axis(ax)
            ax.set_title(title)
            _scale_y(ax)
        axes[0].legend(fontsize=6)
        add(
            "evolution",
            "Token-0 norms and R_GS over training",
            "The summaries over layers at every statistics step: `ma/h_out/tok0/max`, `ma/mlp_out/tok0/max`, "
            "`gs/ratio/median`, `as/sink_rate/mean`.",
            fig,
        )

    profiled = [run for run in runs if run.profiles and run.profiles.get("layers")]
    if profiled:
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
                        color=colors[run.run_id],
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
        add(
            "gradient_profiles",
            "Token-wise gradient norms per layer",
            "Norm of the gradient after the input RMSNorm at positions 0..63 (`stats/profiles_stepXXXXXXXX.json`, the "
            "last statistics step of each run): a gradient sink is the spike at position 0.",
            fig,
        )
    return out


# ---- the comparison run ----


def _tag_key(text: str) -> str:
    return _TAG_CHARS.sub("_", text)


def log_comparison(
    client: MlflowClient,
    experiment_id: str,
    runs: list[RunData],
    baseline: RunData | None,
    report: Path,
    figures: list[ReportFigure],
    table: str,
    run_name: str,
) -> str:
    """A new run tagged `comparison` with the report and figures as artifacts; returns its id."""
    by_mode: dict[str, list[str]] = {}
    for run in runs:
        by_mode.setdefault(run.mode, []).append(run.run_id)
    tags = {
        "comparison": "true",
        "sources": ",".join(run.run_id for run in runs),
        **{f"source.{_tag_key(mode)}": ",".join(ids) for mode, ids in by_mode.items()},
    }
    if baseline is not None:
        tags["baseline"] = baseline.run_id
    # The run's description in the MLflow UI; the figures are under its artifacts.
    note = f"{table}\n\nFigures and report.md: see the artifacts of this run."
    if len(note) <= MAX_TAG_VAL_LENGTH:
        tags["mlflow.note.content"] = note
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    try:
        client.log_artifact(run_id, str(report))
        for figure in figures:
            client.log_artifact(run_id, str(figure.path), "figures")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


# ---- the command ----


def check_out(out: Path) -> None:
    try:
        (out / "figures").mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"--out {out}: not writable ({err.strerror}); choose a directory you can write to") from err


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def compare(args: argparse.Namespace, uri: str) -> dict[str, Any]:
    """Select, read, write report.md and figures, log the comparison run. Returns what it did, for the caller."""
    out = Path(args.out)
    check_out(out)
    check_store(uri)
    client = MlflowClient(uri)
    with reaching(uri):
        experiment_id = find_experiment(client, args.experiment)
        runs = [
            load_run(client, run) for run in select_runs(client, args.experiment, experiment_id, args.runs, args.filter)
        ]
    without = [run for run in runs if not run.has_stats]
    if len(without) == len(runs):
        names = ", ".join(f"{run.name} ({run.run_id})" for run in runs)
        raise UsageError(
            f"none of the selected runs logged the gradient-sink statistics ({names}); train with --stats_every N "
            "(e.g. launchers/pretrain.py ... --stats_every 100)"
        )
    for run in without:
        _warn(f"run {run.name} ({run.run_id}) has no statistics (train with --stats_every N); its columns show '-'")
    baseline = next((run for run in runs if run.mode == BASELINE), None)
    if baseline is None:
        _warn(f"no baseline (vscale={BASELINE}) among the selected runs; report.md has no ratio rows")
    figures = plot_all(runs, out / "figures")
    report = out / "report.md"
    table = write_report(report, args.experiment, uri, runs, baseline, figures)
    run_name = args.run_name or f"compare-{'-vs-'.join(run.mode for run in runs)}-{time.strftime('%Y%m%d-%H%M%S')}"
    with reaching(uri):
        run_id = log_comparison(client, experiment_id, runs, baseline, report, figures, table, run_name)
    return {"table": table, "report": report, "figures": figures, "run_id": run_id, "run_name": run_name}


def run(argv: Sequence[str] | None = None) -> int:
    for name, value in _MLFLOW_DEFAULTS.items():
        os.environ.setdefault(name, value)
    uri = default_tracking_uri()
    try:
        args = parse_args(argv)
        done = compare(args, uri)
    except ConfigError as err:
        return fail(str(err))
    except MlflowException as err:  # refused requests (permissions, limits): still one line, not a traceback
        return fail(f"MLflow at {uri}: {_reason(err)}")
    print(done["table"])
    print(f"\nreport: {done['report']} ({len(done['figures'])} figures in {done['report'].parent / 'figures'})")
    print(f"MLflow: comparison run '{done['run_name']}' ({done['run_id']}) in experiment '{args.experiment}', {uri}")
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        print(f"  open it with: mlflow ui --backend-store-uri {uri}", flush=True)
    return 0


def main() -> None:
    sys.exit(run())
