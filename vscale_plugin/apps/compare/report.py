"""report.md: one markdown table of the runs' numbers and their ratios to the baseline, then the figures."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from vscale_plugin.apps.compare.figures import ReportFigure
from vscale_plugin.apps.compare.runs import STATS_KEY, RunData

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
