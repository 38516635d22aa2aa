"""``launchers/compare.py``: baseline vs V-scale side by side, from MLflow runs of ``launchers/pretrain.py`` (issue 5).

One table (``report.md``) and the paper's figures (``figures/*.png``) in ``--out``, and the same files as artifacts of
a new MLflow run tagged ``comparison`` in the same experiment, so they show in the MLflow UI next to their sources.
Reads MLflow only: no model, no checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from vscale_plugin.apps.compare.figures import plot_all
from vscale_plugin.apps.compare.report import write_report
from vscale_plugin.apps.compare.runs import (
    BASELINE,
    check_store,
    downstream_records,
    find_experiment,
    load_run,
    log_comparison,
    reaching,
    reason,
    select_runs,
    warn,
)
from vscale_plugin.launch.cli import ConfigError, OneLineParser, UsageError, fail
from vscale_plugin.tracking import default_tracking_uri

# MLflow's client defaults (7 retries, exponential backoff) would keep a user waiting minutes on a dead server;
# its download progress bars would bury the table in the terminal.
_MLFLOW_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


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


def check_out(out: Path) -> None:
    try:
        (out / "figures").mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"--out {out}: not writable ({err.strerror}); choose a directory you can write to") from err


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
        downstream = downstream_records(client, runs)
    without = [run for run in runs if not run.has_stats]
    if len(without) == len(runs):
        names = ", ".join(f"{run.name} ({run.run_id})" for run in runs)
        raise UsageError(
            f"none of the selected runs logged the gradient-sink statistics ({names}); train with --stats_every N "
            "(e.g. launchers/pretrain.py ... --stats_every 100)"
        )
    for run in without:
        warn(f"run {run.name} ({run.run_id}) has no statistics (train with --stats_every N); its columns show '-'")
    baseline = next((run for run in runs if run.mode == BASELINE), None)
    if baseline is None:
        warn(f"no baseline (vscale={BASELINE}) among the selected runs; report.md has no ratio rows")
    figures = plot_all(runs, out / "figures")
    report = out / "report.md"
    table = write_report(report, args.experiment, uri, runs, baseline, figures, downstream)
    run_name = args.run_name or f"compare-{'-vs-'.join(run.mode for run in runs)}-{time.strftime('%Y%m%d-%H%M%S')}"
    with reaching(uri):
        paths = [figure.path for figure in figures]
        run_id = log_comparison(client, experiment_id, runs, baseline, report, paths, table, run_name)
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
        return fail(f"MLflow at {uri}: {reason(err)}")
    print(done["table"])
    print(f"\nreport: {done['report']} ({len(done['figures'])} figures in {done['report'].parent / 'figures'})")
    print(f"MLflow: comparison run '{done['run_name']}' ({done['run_id']}) in experiment '{args.experiment}', {uri}")
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        print(f"  open it with: mlflow ui --backend-store-uri {uri}", flush=True)
    return 0


def main() -> None:
    sys.exit(run())
