"""What an evaluation leaves behind: ``results.json`` (every record), the MLflow metrics of one model
(``eval/<task>/<quant>/<context>``, mean over seeds, and ``.../std``), and ``report.md`` with the paper's downstream
tables (rows: quantisation scheme; columns: task x context; the baseline and each V-scale model side by side with the
difference) and figures (NIAH accuracy against context per scheme, perplexity per scheme)."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vscale_plugin.evaluate import quant

BASELINE = "off"
# The tasks whose numbers are percentages in the tables (as the paper prints NIAH accuracy).
_PERCENT = {"accuracy", "acc", "acc_norm"}
_UNITS = {
    "ppl": "perplexity, lower is better",
    "bpb": "bits per byte, lower is better",
    "accuracy": "accuracy %, mean ± std over seeds",
    "acc": "lm-eval accuracy %",
}
# The metric each kind of task is reported by in the tables, first.
_ORDER = ("ppl", "bpb", "accuracy")


def metric_name(task: str, metric: str) -> str:
    """The name of one measurement in MLflow keys and table titles: the task itself for its main metric (``ppl``
    and NIAH ``accuracy``; lm-eval's ``acc``), ``bpb`` for bits per byte, ``<task>.<metric>`` for lm-eval's others."""
    if metric in ("ppl", "bpb"):
        return metric
    if metric in ("accuracy", "acc"):
        return task
    return f"{task}.{metric}"


def summarise(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, quant, measurement, context): mean and std over seeds (std 0 for a single value)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        key = (r["model"], r["vscale"], r["quant"], metric_name(r["task"], r["metric"]), r["metric"], r["context"])
        groups[key].append(r["value"])
    return [
        {"model": model, "vscale": vscale, "quant": scheme, "name": name, "metric": metric, "context": context,
         "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
         "n": len(values)}
        for (model, vscale, scheme, name, metric, context), values in groups.items()
    ]  # fmt: skip


def mlflow_metrics(records: Sequence[dict[str, Any]], model: str) -> dict[str, float]:
    """``eval/<name>/<quant>/<context>`` (mean over seeds) and ``.../std`` of ``model``'s records."""
    out: dict[str, float] = {}
    for row in summarise([r for r in records if r["model"] == model]):
        key = f"eval/{row['name']}/{row['quant']}/{row['context']}"
        out[key] = row["mean"]
        if row["n"] > 1:
            out[f"{key}/std"] = row["std"]
    return out


def write_results(records: Sequence[dict[str, Any]], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    path.write_text(json.dumps(list(records), indent=1))
    return path


def _columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(model, column title) in report order: the baseline first; the V-scale mode names a column where it is unique."""
    models: dict[str, str] = {}
    for row in rows:
        models.setdefault(row["model"], row["vscale"])
    modes = list(models.values())
    ordered = sorted(models, key=lambda m: (models[m] != BASELINE, list(models).index(m)))
    return [(m, models[m] if modes.count(models[m]) == 1 else f"{models[m]} ({m})") for m in ordered]


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    scale = 100 if row["metric"] in _PERCENT else 1
    mean = f"{row['mean'] * scale:.4g}" if scale == 1 else f"{row['mean'] * scale:.1f}"
    if row["n"] > 1:
        mean += f" ± {row['std'] * scale:.1f}" if scale != 1 else f" ± {row['std']:.2g}"
    return mean


def _delta(row: dict[str, Any] | None, base: dict[str, Any] | None) -> str:
    if row is None or base is None:
        return "-"
    scale = 100 if row["metric"] in _PERCENT else 1
    diff = (row["mean"] - base["mean"]) * scale
    return f"{diff:+.1f}" if scale != 1 else f"{diff:+.3g}"


def tables(records: Sequence[dict[str, Any]]) -> str:
    """The paper's downstream tables in markdown: one per measurement, rows quantisation schemes, columns
    context x model with the difference to the baseline."""
    rows = summarise(records)
    if not rows:
        return "No evaluation results.\n"
    columns = _columns(rows)
    base_model = columns[0][0] if rows and any(r["vscale"] == BASELINE for r in rows) else None
    index = {(r["model"], r["quant"], r["name"], r["context"]): r for r in rows}
    names = sorted({(r["name"], r["metric"]) for r in rows},
                   key=lambda nm: (_ORDER.index(nm[1]) if nm[1] in _ORDER else len(_ORDER), nm[0]))  # fmt: skip
    schemes = [s for s in (*quant.SCHEMES, *quant.EXTRA_SCHEMES) if any(r["quant"] == s for r in rows)]
    out = []
    for name, metric in names:
        contexts = sorted({r["context"] for r in rows if r["name"] == name})
        unit = _UNITS.get(metric, metric)
        header = ["quant"]
        for context in contexts:
            for model, title in columns:
                header.append(f"{context}: {title}")
                if base_model is not None and model != base_model:
                    header.append("Δ")
        lines = [f"### {name} ({unit})", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for scheme in schemes:
            cells = [scheme]
            for context in contexts:
                base = index.get((base_model, scheme, name, context)) if base_model else None
                for model, _ in columns:
                    row = index.get((model, scheme, name, context))
                    cells.append(_cell(row))
                    if base_model is not None and model != base_model:
                        cells.append(_delta(row, base))
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def write_report(
    records: Sequence[dict[str, Any]],
    skipped: Sequence[str],
    out_dir: Path,
    settings: dict[str, Any],
    sources: dict[str, str],
    schemes: Sequence[str],
) -> Path:
    """``report.md`` (and its figures) in ``out_dir``; ``sources``: model label -> where it came from; ``schemes``:
    the quantisation schemes asked for (described whether or not they ran)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = write_figures(records, out_dir)
    lines = ["# Downstream evaluation", ""]
    lines += [f"- **{label}**: {source}" for label, source in sources.items()]
    lines += ["", "Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()), ""]
    lines += ["## Tables", "", tables(records)]
    if figures:
        lines += ["## Figures", ""] + [f"![{path.stem}]({path.name})" for path in figures] + [""]
    lines += ["## Quantisation schemes: what happens to v_proj and V-scale", ""]
    lines += [f"- `{scheme}`: {quant.describe(scheme)}" for scheme in schemes]
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- {reason}" for reason in skipped]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_figures(records: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """niah.png (accuracy against context, one panel per scheme) and ppl.png (perplexity per scheme and model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarise(records)
    written = []
    niah = [r for r in rows if r["metric"] == "accuracy"]
    columns = _columns(rows) if rows else []
    if niah:
        schemes = [s for s in (*quant.SCHEMES, *quant.EXTRA_SCHEMES) if any(r["quant"] == s for r in niah)]
        fig, axes = plt.subplots(1, len(schemes), figsize=(4 * len(schemes), 3.4), squeeze=False, sharey=True)
        styles = ["-", "--", ":", "-."]
        for ax, scheme in zip(axes[0], schemes, strict=True):
            for (model, title), style in zip(columns, styles * len(columns), strict=False):
                for task in sorted({r["name"] for r in niah}):
                    points = sorted((r["context"], 100 * r["mean"]) for r in niah
                                    if r["quant"] == scheme and r["model"] == model and r["name"] == task)  # fmt: skip
                    if points:
                        ax.plot(*zip(*points, strict=True), style, marker="o", label=f"{title}: {task}")
            ax.set(title=scheme, xlabel="context (tokens)", xscale="log", ylim=(-3, 103))
        axes[0][0].set_ylabel("NIAH accuracy (%)")
        axes[0][-1].legend(fontsize=6)
        fig.tight_layout()
        written.append(out_dir / "niah.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    ppl = [r for r in rows if r["metric"] == "ppl"]
    if ppl:
        schemes = [s for s in (*quant.SCHEMES, *quant.EXTRA_SCHEMES) if any(r["quant"] == s for r in ppl)]
        contexts = sorted({r["context"] for r in ppl})
        fig, axes = plt.subplots(1, len(contexts), figsize=(max(5, 1.3 * len(schemes)) * len(contexts), 3.4),
                                 squeeze=False)  # fmt: skip
        width = 0.8 / max(1, len(columns))
        for ax, context in zip(axes[0], contexts, strict=True):
            for i, (model, title) in enumerate(columns):
                values = [next((r["mean"] for r in ppl if r["model"] == model and r["quant"] == s
                                and r["context"] == context), float("nan")) for s in schemes]  # fmt: skip
                ax.bar([x + i * width for x in range(len(schemes))], values, width, label=title)
            ax.set_xticks([x + width * (len(columns) - 1) / 2 for x in range(len(schemes))], schemes, rotation=30,
                          ha="right", fontsize=7)  # fmt: skip
            ax.set(title=f"perplexity at {context} tokens", yscale="log")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        written.append(out_dir / "ppl.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
