"""report.md: one markdown table of the runs' numbers and their ratios to the baseline, then the figures."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from vscale_plugin.apps.compare.figures import ReportFigure
from vscale_plugin.apps.compare.runs import STATS_KEY, RunData
from vscale_plugin.evaluate.report import tables as evaluation_tables

# Report columns: (header, what the number is). Statistics are the values at the run's last statistics step.
COLUMNS = (
    ("train loss", "last train/loss"),
    ("eval loss", "last eval/loss"),
    ("perplexity", "exp(eval loss)"),
    ("median R_GS", "gs/ratio/median: median over layers of R_GS"),
    ("mean sink rate", "as/sink_rate/mean: mean over layers of the sink rate"),
    ("max tok0 |h_out|", "ma/h_out/tok0/max: largest token-0 norm of the residual stream over layers"),
    ("max tok0 |mlp_out|", "ma/mlp_out/tok0/max: largest token-0 norm of the MLP outputs over layers"),
    ("max sink rate", "largest as/sink_rate/Lxx over layers (the sink layer: where it is largest)"),
    ("max tok0/rest |h_out|", "largest ma/h_out/tok0/Lxx / ma/h_out/rest/Lxx over layers: the token-0 peak"),
    ("tok0/rest |v|", "ma/v/tok0 / ma/v/rest at the sink layer: the value drain"),
    ("tokens/s", "median of perf/tokens_per_s over the run"),
)


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
        **_sink_layer_numbers(run),
    }


def _sink_layer_numbers(run: RunData) -> dict[str, float | None]:
    """The per-layer columns: the largest sink rate and token-0 peak over layers, the value drain at the sink layer."""
    layers = sorted(key.rsplit("/", 1)[1] for key in run.latest if key.startswith("as/sink_rate/L"))
    if not layers:
        return {"max sink rate": None, "max tok0/rest |h_out|": None, "tok0/rest |v|": None}

    def ratio(family: str, layer: str) -> float | None:
        tok0, rest = run.latest.get(f"ma/{family}/tok0/{layer}"), run.latest.get(f"ma/{family}/rest/{layer}")
        return tok0 / rest if tok0 is not None and rest else None

    sink_layer = max(layers, key=lambda layer: run.latest[f"as/sink_rate/{layer}"])
    peaks = [r for r in (ratio("h_out", layer) for layer in layers) if r is not None]
    return {
        "max sink rate": run.latest[f"as/sink_rate/{sink_layer}"],
        "max tok0/rest |h_out|": max(peaks) if peaks else None,
        "tok0/rest |v|": ratio("v", sink_layer),
    }


# The paper's directions (SPEC section 5), checked per V-scale run against the baseline: (what, column, the bound
# on the ratio to the baseline, whether the ratio must be at least or at most it).
DIRECTIONS = (
    ("sinks kept", "max sink rate", 0.9, "at least"),
    ("token-0 massive activations suppressed", "max tok0 |h_out|", 0.5, "at most"),
)


def directions(runs: list[RunData], baseline: RunData | None) -> list[str]:
    """One line per V-scale run and direction: the ratio to the baseline and whether the paper's direction holds."""
    if baseline is None:
        return []
    base = summarize(baseline)
    lines = []
    for run in runs:
        if run is baseline:
            continue
        r = ratios(summarize(run), base)
        for what, column, bound, side in DIRECTIONS:
            value = r[column]
            if value is None:
                verdict = "not measured"
            else:
                holds = value >= bound if side == "at least" else value <= bound
                verdict = "holds" if holds else "does not hold"
            lines.append(f"- {run.mode}: {what} ({column}, {side} {bound}x the baseline's): {fmt(value)}x, {verdict}")
    return lines


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
    path: Path,
    experiment: str,
    uri: str,
    runs: list[RunData],
    baseline: RunData | None,
    figures: list[ReportFigure],
    downstream: list[dict[str, Any]] | None = None,
) -> str:
    """report.md: the table, what its columns mean, the runs, the downstream evaluation (the records of
    ``launchers/evaluate.py`` runs of these runs, where they exist), the figures. Returns the table."""
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
        *(
            ["The paper's directions (V-scale / baseline at the last statistics step):", "", *found, ""]
            if (found := directions(runs, baseline))
            else []
        ),
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
    if downstream:
        parts += ["## Downstream evaluation", "",
                  "From the newest `launchers/evaluate.py` run of each training run (MLflow tag `source_run`):", "",
                  evaluation_tables(downstream), ""]  # fmt: skip
    for figure in figures:
        parts += [f"## {figure.title}", "", f"![{figure.title}](figures/{figure.path.name})", "", figure.caption, ""]
    text = "\n".join(parts)
    path.write_text(text)
    return table
