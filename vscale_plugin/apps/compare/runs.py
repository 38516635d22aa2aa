"""The MLflow side of the comparison: reaching the store, selecting and reading training runs, logging the comparison
run. Nothing here draws or formats."""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from vscale_plugin.launch.cli import UsageError

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
_PROFILE_FILE = re.compile(r"profiles_step(\d+)\.json$")
_LAMBDA_KEY = re.compile(r"^vscale/lambda/L(\d+)/H(\d+)$")
_TAG_CHARS = re.compile(r"[^\w.\-/ :]")


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
        """lambda[layer][kv head] (`vscale/lambda/Lxx/Hh`), None for runs without V-scale metrics (off)."""
        found = {}
        for key, value in self.latest.items():
            m = _LAMBDA_KEY.match(key)
            if m:
                found[int(m.group(1)), int(m.group(2))] = value
        if not found:
            return None
        layers, heads = max(k[0] for k in found) + 1, max(k[1] for k in found) + 1
        return [[found.get((layer, h), math.nan) for h in range(heads)] for layer in range(layers)]


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ---- reaching the store ----


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
            f"cannot reach the MLflow tracking store {uri} ({reason(err)}); start the server (e.g. mlflow server "
            "--backend-store-uri sqlite:///mlflow.db) or set MLFLOW_TRACKING_URI to the store your runs were logged to"
        ) from err
    except requests.exceptions.ConnectionError as err:  # MLflow passes some through unwrapped (artifact downloads)
        raise UsageError(
            f"cannot reach the MLflow tracking store {uri} ({reason(err)}); start the server or set "
            "MLFLOW_TRACKING_URI to the store your runs were logged to"
        ) from err


def reason(err: BaseException) -> str:
    """The part of an MLflow or connection error a user can act on, short enough for a one-line message."""
    text = str(err)
    m = re.search(r"\[Errno -?\d+\] ([^\"')]+)", text)
    if m:
        return m.group(1).strip()
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return first if len(first) <= 160 else first[:157] + "..."


# ---- selecting and reading runs ----


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
    return any(run.data.tags.get(kind) == "true" for kind in ("comparison", "analysis", "evaluation"))


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
            f"--filter {filter_string!r}: not an MLflow search filter ({reason(err)}); e.g. \"tags.preset = 'smoke'\""
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
    # The backward-only ablation after the V-scale it ablates; modes this table does not know come last, by name.
    order = {BASELINE: 0, "fixed": 1, "learned": 2, "backward": 3}
    return order.get(mode or "", 4), mode or ""


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
        warn(f"run {data.name} ({data.run_id}): gradient profiles not read ({reason(err)}); left out of the figure")
    return data


def downstream_records(client: MlflowClient, runs: list[RunData]) -> list[dict[str, Any]]:
    """The newest finished evaluation (``launchers/evaluate.py``, tagged ``source_run``) of each run, in any
    experiment: its records from results.json, labelled with the training run's name. [] where none exists."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    records: list[dict[str, Any]] = []
    for run in runs:
        found = client.search_runs(experiments, max_results=1, order_by=["attributes.start_time DESC"],
                                   filter_string=f"tags.evaluation = 'true' and tags.source_run = '{run.run_id}' "
                                   "and attributes.status = 'FINISHED'")  # fmt: skip
        if not found:
            continue
        evaluation = found[0]
        label = evaluation.data.params.get("label")
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = client.download_artifacts(evaluation.info.run_id, "evaluation/results.json", tmp)
                mine = [r for r in json.loads(Path(path).read_text()) if r["model"] == label]
        except (MlflowException, OSError, ValueError) as err:
            warn(f"run {run.name} ({run.run_id}): its evaluation {evaluation.info.run_id} not read ({reason(err)})")
            continue
        records += [{**r, "model": run.name} for r in mine]
    return records


# ---- the comparison run ----


def _tag_key(text: str) -> str:
    return _TAG_CHARS.sub("_", text)


def log_comparison(
    client: MlflowClient,
    experiment_id: str,
    runs: list[RunData],
    baseline: RunData | None,
    report: Path,
    figures: list[Path],
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
            client.log_artifact(run_id, str(figure), "figures")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
