"""MLflow run logging that never slows or stops training.

The training loop only enqueues (`log_metrics` returns at once). A background thread writes what was
enqueued to an on-disk spool (spool.py) and sends it from there in `MlflowClient.log_batch` calls, every
`flush_every_s`. When the tracking server is unreachable the spool grows, one warning says so, and it is sent
in order when the server answers again - by this logger, or by a later one that uses the same `spool_dir`
(after a crash, a resume with the same `run_id` continues the same spool).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import queue
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_BATCH_LOG_REQUEST_SIZE,
    MAX_ENTITIES_PER_BATCH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from vscale_plugin.tracking.spool import Spool

_log = logging.getLogger(__name__)

# MLflow's client defaults (7 retries with exponential backoff, 120 s timeout) would stall the sender for
# minutes per attempt while a server is down; the sender retries on its own schedule instead. Zero retries
# also keeps urllib3 from printing a "Retrying ..." warning per attempt.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_MAX_BACKOFF_S = 30.0
# Leave headroom under MLflow's 1 MB request limit for JSON framing around each entity.
_BATCH_BYTES = int(MAX_BATCH_LOG_REQUEST_SIZE * 0.8)
_BAD_NAME_CHARS = re.compile(r"[^/\w.\- :]")
_LOGGER_ID_TAG = "vscale_plugin.logger_id"
_END_STATUSES = ("FINISHED", "FAILED", "KILLED")
_MAX_DROP_WARNINGS = 10


def default_tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else MLflow's own default store made absolute: `sqlite:///<cwd>/mlflow.db`.

    This is the store MLflow 3 itself uses when nothing is configured (artifacts go to `<cwd>/mlruns`), so a plain
    `mlflow ui` started in the same directory, or any notebook there, sees the same runs; the absolute path keeps it
    valid if the process changes directory. No server is needed.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    return "sqlite:///" + (Path.cwd().resolve() / "mlflow.db").as_posix()


class TrackingStoreError(ValueError):
    """MLflow cannot open the configured tracking store at all (a bad URI or a backend this install lacks), as
    opposed to a server that is merely unreachable, which the logger rides out by spooling."""


def check_tracking_store(uri: str) -> None:
    """Open the store behind ``uri`` as MLflow will; raise :class:`TrackingStoreError` naming the fix if it cannot.

    Nothing is contacted for an http(s) URI (a server that is down is not an error here); a sqlite or file store is
    created if missing.
    """
    try:
        MlflowClient(uri)
    except Exception as err:  # MLflow raises many kinds here (MlflowException, ImportError, OSError, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrackingStoreError(
            f"MLflow cannot open the tracking store {uri} ({type(err).__name__}: {first[:300]}); set "
            "MLFLOW_TRACKING_URI to a store this MLflow supports, e.g. sqlite:///$PWD/mlflow.db (needs the full "
            "mlflow package), http://HOST:PORT of an mlflow server, or file:///DIR with MLFLOW_ALLOW_FILE_STORE=true"
        ) from err


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings become dotted keys (`model.hidden_size`); every value becomes its `str`."""
    flat: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            flat.update(flatten_params(v, key))
        else:
            flat[key] = str(v)
    return flat


def _clean_name(name: str) -> str:
    # MLflow rejects names outside [/\w.\- :]; a rejected key would be dropped later, far from its cause.
    return _BAD_NAME_CHARS.sub("_", str(name))


def _is_transient(e: BaseException) -> bool:
    """Worth retrying later (server down or overloaded, network, file system) rather than a rejected request."""
    if isinstance(e, MlflowException):
        status = e.get_http_status_code()  # MLflow reports a refused connection or a database error as 500
        return status >= 500 or status == 429
    return isinstance(e, OSError)  # requests' errors are OSErrors too


class _Transient(Exception):
    """Retry later: the store did not answer."""


class _Blocked(Exception):
    """This spool cannot be sent by this process (its run cannot be created); it stays on disk."""


class _Flush:
    def __init__(self, once: bool) -> None:
        self.once = once  # answer after one attempt instead of waiting for success
        self.done = threading.Event()
        self.sent = False


class RunLogger:
    """Logs one MLflow run from the training process (create it on rank 0 only).

    Args:
        experiment: experiment name, created if missing.
        run_name: name of a new run (ignored when continuing `run_id`).
        run_id: continue this run (resume) instead of starting a new one.
        tracking_uri: defaults to `default_tracking_uri()`.
        tags: run tags, e.g. `{"vscale": "learned", "preset": "0.1B"}`.
        spool_dir: where unsent records wait on disk; use a directory that survives the job (e.g.
            `<save_dir>/mlflow-spool`) so a resumed job sends what a crashed one could not.
        flush_every_s: how often the background thread sends.
        artifact_location: artifact root for the experiment if this logger creates it (MLflow's default otherwise).
        skip_logged_steps: drop a metric whose step is not above the highest step this run already holds for its
            key. A job resumed from a checkpoint older than its last logged step recomputes those steps; MLflow would
            keep both values and plot the step twice.

    Never raises because the tracking server is down: a run that cannot be created now is created when the server
    answers. A process that exits without close() flushes for up to 5 s and leaves the run RUNNING.
    Sets `MLFLOW_HTTP_REQUEST_MAX_RETRIES=0` and `MLFLOW_HTTP_REQUEST_TIMEOUT=10` in the process environment unless
    already set, so a dead server costs seconds, not minutes, per attempt.
    """

    def __init__(
        self,
        experiment: str,
        run_name: str | None = None,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        tags: Mapping[str, Any] | None = None,
        spool_dir: Path | str = "mlflow-spool",
        flush_every_s: float = 2.0,
        artifact_location: str | None = None,
        skip_logged_steps: bool = True,
    ) -> None:
        for name, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.experiment = experiment
        self.spool_dir = Path(spool_dir).resolve()
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self._client = MlflowClient(self.tracking_uri)
        self._flush_every_s = max(float(flush_every_s), 0.05)
        self._artifact_location = artifact_location
        self._logger_id = uuid.uuid4().hex[:12]
        self._queue: queue.SimpleQueue[dict[str, Any] | _Flush] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._state_lock = threading.Lock()
        self._reachable = True
        self._closed = False
        self._artifact_seq = itertools.count()
        self._blocked: set[str] = set()
        self._truncated_keys: set[str] = set()
        self._skip_logged_steps = skip_logged_steps
        self._skipped = 0
        self._dropped = 0
        tags = {_clean_name(k): str(v) for k, v in (tags or {}).items()}

        if run_id is None:
            run_id = self._create_run_now(run_name, tags)
            self._spool = self._new_spool(run_id or f"pending-{self._logger_id}", run_id)
            if run_id is None:
                self._spool.append([self._create_record(run_name, tags)])
        else:
            self._check_run(run_id)
            self._spool = self._adopt_spool(run_id) or self._new_spool(run_id, run_id)
            # Written behind whatever the previous process left unsent, so the run ends in the right state.
            self._spool.append([{"k": "status", "status": "RUNNING", "ts": _now_ms()}])
            if tags:
                self.set_tags(tags)
        self._run_id: str | None = self._spool.run_id

        # Highest step per metric key this run holds or will hold, including spooled records not yet sent;
        # the training thread owns this dict.
        self._max_step: dict[str, int] = {}
        for sp in self._spools_of_run(self._run_id):
            for key, step in sp.state["max_steps"].items():
                self._max_step[key] = max(step, self._max_step.get(key, -1))
        for _, record in self._spool.unsent():  # a crash can come between an append and its state update
            if record["k"] == "m" and record["s"] > self._max_step.get(record["key"], -1):
                self._max_step[record["key"]] = record["s"]
        self._orphans = [
            k
            for k in Spool.keys_in(self.spool_dir)
            if k != self._spool.key and Spool(self.spool_dir, k).tracking_uri == self.tracking_uri
        ]

        self._thread = threading.Thread(target=self._run_sender, name="vscale-mlflow-sender", daemon=True)
        self._thread.start()
        self._wake.set()
        atexit.register(self._at_exit)

    # ---- public API (training thread) ----

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, None while the run waits for an unreachable server to be created."""
        return self._run_id

    @property
    def spool_file(self) -> Path:
        return self._spool.path

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nested dicts are flattened to dotted keys; values longer than MLflow's limit are truncated."""
        for key, value in flatten_params(params).items():
            self._queue.put({"k": "p", "key": _clean_name(key), "v": self._fit(key, value, MAX_PARAM_VAL_LENGTH)})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self._queue.put({"k": "t", "key": _clean_name(key), "v": self._fit(key, str(value), MAX_TAG_VAL_LENGTH)})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Enqueue and return at once. NaN is stored as NaN; MLflow stores +-inf as +-1.7976931348623157e308.

        A value that is not a number is skipped with a warning; see `skip_logged_steps` for repeated steps.
        """
        ts = _now_ms()
        step = int(step)
        for key, value in metrics.items():
            try:
                v = float(value)
            except (TypeError, ValueError):
                _log.warning("metric %r at step %d is not a number (%r); not logged", key, step, value)
                continue
            key = _clean_name(key)
            last = self._max_step.get(key, -1)
            if step <= last and self._skip_logged_steps:
                if not self._skipped:
                    _log.info("MLflow: %r already has step %d in this run; not logging step %d again", key, last, step)
                self._skipped += 1
                continue
            self._queue.put({"k": "m", "key": key, "v": v, "s": step, "ts": ts})
            self._max_step[key] = max(step, last)

    def log_artifact(self, local_path: Path | str, artifact_path: str | None = None) -> None:
        """Copy the file or directory into the spool now (it may change or vanish afterwards), upload it later."""
        src = Path(local_path)
        if not src.exists():
            raise FileNotFoundError(f"log_artifact: {src} does not exist")
        dest = self._spool.files_dir / f"{self._logger_id}-{next(self._artifact_seq)}" / src.name
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dest)
            else:
                shutil.copy2(src, dest)
        except OSError as e:  # a full spool disk must not stop training
            _log.warning("MLflow: artifact %s not logged, copying it to %s failed: %s", src, dest.parent, e)
            shutil.rmtree(dest.parent, ignore_errors=True)
            return
        self._queue.put({"k": "a", "src": str(dest), "dst": artifact_path})

    def last_logged_step(self, key: str = "train/loss") -> int | None:
        """Highest step of `key` in this run, counting records still waiting in the spool; None if there is none.

        A resumed job skips logging steps up to this one, so a run never holds a step twice.
        """
        key = _clean_name(key)
        best = self._max_step.get(key)
        if self._run_id is not None:
            try:
                history = self._client.get_metric_history(self._run_id, key)
            except Exception as e:
                if not _is_transient(e):
                    raise
                self._went_down(e)
            else:
                self._came_back()
                steps = [m.step for m in history]
                if steps and (best is None or max(steps) > best):
                    best = max(steps)
                    self._max_step[key] = best
        return best

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything logged so far reached the tracking store; False if it did not within timeout_s."""
        return self._flush(timeout_s, once=False)

    def _flush(self, timeout_s: float, once: bool) -> bool:
        if not self._thread.is_alive():
            return False
        request = _Flush(once)
        self._queue.put(request)
        self._wake.set()
        return request.done.wait(timeout_s) and request.sent

    def close(self, timeout_s: float = 30.0, status: str | None = "FINISHED") -> None:
        """Send what can be sent within timeout_s (one attempt if the store is already unreachable) and stop the
        sender; what is left stays in the spool.

        status: FINISHED, FAILED or KILLED ends the run; None leaves it RUNNING (a job that will be resumed).
        """
        if self._closed:
            return
        if status is not None and status not in _END_STATUSES:
            raise ValueError(f"close(status={status!r}): use one of {', '.join(_END_STATUSES)} or None")
        self._closed = True
        atexit.unregister(self._at_exit)
        deadline = time.monotonic() + timeout_s
        if status is not None:
            self._queue.put({"k": "status", "status": status, "ts": _now_ms()})
        # During an outage one more attempt is enough: waiting out timeout_s would only delay the end of the job.
        sent = self._flush(timeout_s, once=not self._reachable)
        self._stop.set()
        self._wake.set()
        self._thread.join(max(deadline - time.monotonic(), 1.0))
        if self._thread.is_alive():
            return  # Still inside a network call; it owns the spool until the process exits.
        if not sent and self._spool.key in self._blocked:
            _log.warning("MLflow: %d records stay in %s", self._spool.unsent_count(), self._spool.path)
        elif not sent:
            _log.warning(
                "MLflow: %d records could not be sent to %s and stay in %s; a RunLogger with spool_dir=%s%s "
                "sends them when the server answers",
                self._spool.unsent_count(),
                self.tracking_uri,
                self._spool.path,
                self.spool_dir,
                f" and run_id={self._run_id}" if self._run_id else "",
            )
        self._spool.unlock()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.close(status="FINISHED" if exc_type is None else "FAILED")

    # ---- setup ----

    def _fit(self, key: str, value: str, limit: int) -> str:
        if len(value) <= limit:
            return value
        if key not in self._truncated_keys:
            self._truncated_keys.add(key)
            _log.info(
                "MLflow: value of %r has %d characters, truncated to MLflow's limit of %d", key, len(value), limit
            )
        return value[: limit - 3] + "..."

    def _create_record(self, run_name: str | None, tags: dict[str, str]) -> dict[str, Any]:
        return {
            "k": "create",
            "experiment": self.experiment,
            "artifact_location": self._artifact_location,
            "run_name": run_name,
            # Lets a retried creation find a run whose first creation succeeded but whose answer was lost.
            "tags": {**tags, _LOGGER_ID_TAG: self._logger_id},
            "start_time": _now_ms(),
        }

    def _create_run_now(self, run_name: str | None, tags: dict[str, str]) -> str | None:
        try:
            return self._create_run(self._create_record(run_name, tags), retried=False)
        except Exception as e:
            if not _is_transient(e):
                raise
            self._went_down(e)
            return None

    def _create_run(self, record: dict[str, Any], retried: bool) -> str:
        name = record["experiment"]
        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = self._client.create_experiment(name, artifact_location=record["artifact_location"])
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment_id = self._client.get_experiment_by_name(name).experiment_id  # another rank/job won
        elif experiment.lifecycle_stage == "deleted":
            raise MlflowException.invalid_parameter_value(
                f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore --experiment-id "
                f"{experiment.experiment_id}) or choose another --experiment"
            )
        else:
            experiment_id = experiment.experiment_id
        if retried:
            logger_id = record["tags"][_LOGGER_ID_TAG]
            found = self._client.search_runs(
                [experiment_id], filter_string=f"tags.`{_LOGGER_ID_TAG}` = '{logger_id}'", max_results=1
            )
            if found:
                return found[0].info.run_id
        run = self._client.create_run(
            experiment_id, start_time=record["start_time"], tags=record["tags"], run_name=record["run_name"]
        )
        return run.info.run_id

    def _check_run(self, run_id: str) -> None:
        """A run id that the store does not know is a user error worth stopping for; an unreachable store is not."""
        try:
            run = self._client.get_run(run_id)
        except Exception as e:
            if _is_transient(e):
                self._went_down(e)
                return
            raise MlflowException.invalid_parameter_value(
                f"MLflow run {run_id} cannot be continued: {_short(e)}; check the run id and MLFLOW_TRACKING_URI "
                f"({self.tracking_uri}), or start a new run"
            ) from e
        if run.info.lifecycle_stage == "deleted":
            raise MlflowException.invalid_parameter_value(
                f"MLflow run {run_id} is deleted; restore it (mlflow runs restore --run-id {run_id}) or start a new run"
            )

    def _new_spool(self, key: str, run_id: str | None) -> Spool:
        spool = Spool(self.spool_dir, key)
        if not spool.try_lock():
            spool = Spool(self.spool_dir, f"{key}-{self._logger_id}")  # the name is taken by a live logger
            spool.try_lock()
        spool.state.update(tracking_uri=self.tracking_uri, run_id=run_id)
        spool.save_state()
        return spool

    def _adopt_spool(self, run_id: str) -> Spool | None:
        """The spool a previous logger of this run left, so its unsent records go out before ours."""
        for sp in self._spools_of_run(run_id):
            if sp.try_lock():
                return sp
        return None

    def _spools_of_run(self, run_id: str | None) -> list[Spool]:
        if run_id is None:
            return [self._spool]
        spools = [Spool(self.spool_dir, k) for k in Spool.keys_in(self.spool_dir)]
        return [sp for sp in spools if sp.run_id == run_id and sp.tracking_uri == self.tracking_uri]

    # ---- reachability: one warning per outage ----

    def _went_down(self, e: BaseException) -> None:
        with self._state_lock:
            was_reachable, self._reachable = self._reachable, False
        if was_reachable:
            _log.warning(
                "MLflow tracking store %s is unreachable (%s); training continues, metrics are kept in %s and "
                "sent when it answers again",
                self.tracking_uri,
                _short(e),
                self.spool_dir,
            )

    def _came_back(self) -> None:
        with self._state_lock:
            was_reachable, self._reachable = self._reachable, True
        if not was_reachable:
            _log.info("MLflow tracking store %s answers again; sending the spooled records", self.tracking_uri)

    # ---- sender thread ----

    def _run_sender(self) -> None:
        wait = self._flush_every_s
        flushes: list[_Flush] = []
        records: list[dict[str, Any]] = []
        failing = False
        while True:
            self._wake.wait(wait)
            self._wake.clear()
            stopping = self._stop.is_set()
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Flush):
                    flushes.append(item)
                else:
                    records.append(item)
            sent = blocked = False
            try:
                self._spool.append(records)
                records = []  # kept in memory until they are on disk: a full disk must not lose them
                # When stopping, close() has just flushed; this pass only saves what came after.
                sent = not stopping and self._send(self._spool)
                failing = False
            except _Blocked:
                blocked = True
            except Exception:
                if not failing:  # once per streak, not every cycle
                    _log.exception("MLflow: the sender failed (spool in %s); it keeps retrying", self.spool_dir)
                failing = True
            if stopping:
                return
            for request in flushes:
                if sent or blocked or request.once:
                    request.sent = sent
                    request.done.set()
            flushes = [request for request in flushes if not request.done.is_set()]
            if sent and self._orphans:
                try:
                    self._send_orphans()
                except Exception as e:  # another run's leftovers must not stop this one's logging
                    _log.warning("MLflow: gave up sending spools left in %s by earlier jobs: %s", self.spool_dir, e)
                    self._orphans = []
            wait = self._flush_every_s if sent else min(max(wait * 2, self._flush_every_s), _MAX_BACKOFF_S)

    def _send_orphans(self) -> None:
        """Spools that crashed loggers of other runs left behind in the same directory."""
        for key in list(self._orphans):
            spool = Spool(self.spool_dir, key)
            if not spool.try_lock():
                continue
            try:
                done = not spool.has_unsent() or self._send(spool)
            except _Blocked:
                done = True  # reported once; a later process may manage to send it
            finally:
                spool.unlock()
            if not done:
                return
            self._orphans.remove(key)

    def _send(self, spool: Spool) -> bool:
        """Send the spool from its cursor; True when nothing is left unsent, False when the store did not answer."""
        if spool.key in self._blocked:
            raise _Blocked(spool.key)
        answered = False
        try:
            for end, batch in self._batches(spool):
                self._deliver(spool, batch)
                answered = True
                spool.advance(end)
        except _Transient as e:
            self._went_down(e.__cause__ or e)
            return False
        if answered:
            self._came_back()
        spool.compact()
        return True

    def _batches(self, spool: Spool) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        """Consecutive metric/param/tag records grouped within log_batch's limits; any other record alone."""
        batch: list[dict[str, Any]] = []
        counts = {"m": 0, "p": 0, "t": 0}
        keys: set[tuple[str, str]] = set()
        size = 0
        end = spool.state["offset"]
        for next_end, record in spool.unsent():
            kind = record["k"]
            if kind in counts:
                rec_size = len(record["key"]) + len(str(record["v"])) + 64
                full = (
                    len(batch) >= MAX_ENTITIES_PER_BATCH
                    or counts["m"] >= MAX_METRICS_PER_BATCH
                    or counts[kind] >= (MAX_METRICS_PER_BATCH if kind == "m" else MAX_PARAMS_TAGS_PER_BATCH)
                    or size + rec_size > _BATCH_BYTES
                    # MLflow rejects a batch naming one param twice; tags would overwrite out of order.
                    or (kind != "m" and (kind, record["key"]) in keys)
                )
                if batch and full:
                    yield end, batch
                    batch, counts, keys, size = [], {"m": 0, "p": 0, "t": 0}, set(), 0
                batch.append(record)
                counts[kind] += 1
                size += rec_size
                if kind != "m":
                    keys.add((kind, record["key"]))
            else:
                if batch:
                    yield end, batch
                    batch, counts, keys, size = [], {"m": 0, "p": 0, "t": 0}, set(), 0
                yield next_end, [record]
            end = next_end
        if batch:
            yield end, batch

    def _deliver(self, spool: Spool, batch: list[dict[str, Any]]) -> None:
        """Send one batch; raises _Transient to retry later, drops what the store rejects."""
        record = batch[0]
        try:
            if record["k"] == "create":
                if spool.run_id is None:
                    # An earlier attempt (this process at start-up, or a crashed one) may have created the run
                    # without hearing back: look for it before creating another.
                    spool.state["run_id"] = self._create_run(record, retried=True)
                    spool.save_state()
                    if spool is self._spool:
                        self._run_id = spool.run_id
                return
            if spool.run_id is None:
                self._block(spool, "its first record does not create a run")
            if record["k"] == "status":
                if record["status"] == "RUNNING":
                    self._client.update_run(spool.run_id, status="RUNNING")
                else:
                    self._client.set_terminated(spool.run_id, status=record["status"], end_time=record["ts"])
            elif record["k"] == "a":
                self._upload(spool.run_id, record)
            else:
                self._log_batch(spool.run_id, batch)
        except (_Transient, _Blocked):
            raise
        except Exception as e:
            if _is_transient(e):
                raise _Transient(str(e)) from e
            if record["k"] == "create":
                self._block(spool, _short(e))
            if not self._run_is_active(spool.run_id):
                self._block(spool, f"run {spool.run_id} does not exist in {self.tracking_uri} or was deleted")
            if len(batch) > 1:
                # Halve until the rejected entities (a changed param, a bad key) are alone; the rest is sent.
                half = len(batch) // 2
                self._deliver(spool, batch[:half])
                self._deliver(spool, batch[half:])
            else:
                self._drop(batch, e)

    def _run_is_active(self, run_id: str) -> bool:
        try:
            return self._client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception as e:
            if _is_transient(e):
                raise _Transient(str(e)) from e
            return False

    def _log_batch(self, run_id: str, batch: list[dict[str, Any]]) -> None:
        metrics = [Metric(r["key"], r["v"], r["ts"], r["s"]) for r in batch if r["k"] == "m"]
        params = [Param(r["key"], r["v"]) for r in batch if r["k"] == "p"]
        tags = [RunTag(r["key"], r["v"]) for r in batch if r["k"] == "t"]
        self._client.log_batch(run_id, metrics=metrics, params=params, tags=tags, synchronous=True)

    def _upload(self, run_id: str, record: dict[str, Any]) -> None:
        src = Path(record["src"])
        if not src.exists():
            return  # uploaded before a crash that came ahead of the cursor update
        if src.is_dir():
            dst = f"{record['dst']}/{src.name}" if record["dst"] else src.name
            self._client.log_artifacts(run_id, str(src), dst)
        else:
            self._client.log_artifact(run_id, str(src), record["dst"])
        shutil.rmtree(src.parent, ignore_errors=True)

    def _drop(self, batch: list[dict[str, Any]], e: BaseException) -> None:
        self._dropped += 1
        if self._dropped <= _MAX_DROP_WARNINGS:
            what = ", ".join(str(r.get("key", r.get("src", r["k"]))) for r in batch[:3])
            more = ", ..." * (len(batch) > 3)
            _log.warning("MLflow rejected %d record(s) (%s%s): %s", len(batch), what, more, _short(e))
        if self._dropped == _MAX_DROP_WARNINGS:
            _log.warning("MLflow: further rejected records are dropped without a message each")
        for record in batch:
            if record["k"] == "a":
                shutil.rmtree(Path(record["src"]).parent, ignore_errors=True)

    def _block(self, spool: Spool, reason: str) -> None:
        self._blocked.add(spool.key)
        _log.error("MLflow: cannot send %s (%s); it stays on disk", spool.path, reason)
        raise _Blocked(spool.key)

    def _at_exit(self) -> None:
        # A crash that skipped close(): save what the queue holds and leave the run open for a resume.
        with contextlib.suppress(Exception):
            self.close(timeout_s=5.0, status=None)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    # MLflow wraps a refused or timed-out connection in a long urllib3 message; its last clause is the news.
    errno = re.findall(r"\[Errno -?\d+\] [^'\")]+|timed out|Read timed out", text)
    if errno:
        return errno[-1]
    if not isinstance(e, MlflowException):
        text = f"{type(e).__name__}: {text}"
    return text[:300]
