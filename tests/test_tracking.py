"""RunLogger against MLflow's embedded SQLite store, and against a real `mlflow server` that is killed and restarted."""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from vscale_plugin.testing.mlflow_server import MlflowServer
from vscale_plugin.tracking import RunLogger, default_tracking_uri, flatten_params
from vscale_plugin.tracking.spool import Spool

TRACKING_LOGGER = "vscale_plugin.tracking"


def _steps(client: MlflowClient, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name.startswith(TRACKING_LOGGER) and r.levelno >= logging.WARNING
    ]


@pytest.fixture(autouse=True)
def _restore_environment():
    """RunLogger sets MLflow's HTTP retry/timeout variables for its process; keep them from leaking into other tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow database with its schema created once: migrations take ~10 s, copying it takes nothing."""
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="module")
def store(migrated_db: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("local-store")
    shutil.copy(migrated_db, root / "mlflow.db")
    return {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "artifact_location": str(root / "artifacts")}


@pytest.fixture
def experiment(request: pytest.FixtureRequest) -> str:
    return request.node.name


# ---- embedded local store ----


def test_default_tracking_uri_is_an_absolute_sqlite_file_in_cwd_unless_env_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert default_tracking_uri() == "http://tracking.example:5000"


def test_flatten_params_uses_dotted_keys_and_strings():
    nested = {"model": {"hidden_size": 64, "rope": {"theta": 10000.0}}, "betas": (0.9, 0.95), "empty": {}, "x": None}
    assert flatten_params(nested) == {
        "model.hidden_size": "64",
        "model.rope.theta": "10000.0",
        "betas": "(0.9, 0.95)",
        "empty": "{}",
        "x": "None",
    }


def test_params_beyond_batch_and_length_limits_all_arrive(store, tmp_path, experiment):
    params = {"model": {f"p{i:03d}": i for i in range(250)}, "long": "x" * 7000, "bad key!": 1}
    with RunLogger(experiment, run_name="params", spool_dir=tmp_path / "spool", **store) as logger:
        logger.log_params(params)
    got = MlflowClient(store["tracking_uri"]).get_run(logger.run_id).data.params
    assert got["model.p000"] == "0"
    assert got["model.p249"] == "249"
    assert len(got["long"]) == 6000
    assert got["long"].endswith("...")
    assert got["bad key_"] == "1"
    assert len(got) == 252


def test_metrics_read_back_with_their_steps_including_nan_and_inf(store, tmp_path, experiment):
    client = MlflowClient(store["tracking_uri"])
    with RunLogger(experiment, spool_dir=tmp_path / "spool", flush_every_s=0.1, **store) as logger:
        for step in range(30):
            logger.log_metrics({"train/loss": 10.0 - step, "train/lr": 1e-3}, step=step)
        logger.log_metrics({f"as/sink_rate/L{i:04d}": i / 1500 for i in range(1500)}, step=30)
        logger.log_metrics({"gs/ratio/L00": math.nan, "gs/ratio/L01": math.inf}, step=31)
    assert _steps(client, logger.run_id) == list(range(30))
    assert [m.value for m in client.get_metric_history(logger.run_id, "train/loss")][:3] == [10.0, 9.0, 8.0]
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert len([k for k in run.data.metrics if k.startswith("as/sink_rate/")]) == 1500
    assert math.isnan(run.data.metrics["gs/ratio/L00"])
    assert run.data.metrics["gs/ratio/L01"] == pytest.approx(sys.float_info.max)  # MLflow clamps inf
    assert not logger.spool_file.exists() or logger.spool_file.stat().st_size == 0  # sent spools are emptied


def test_continuing_a_run_id_appends_to_the_same_run_and_knows_its_last_step(store, tmp_path, experiment):
    client = MlflowClient(store["tracking_uri"])
    first = RunLogger(experiment, run_name="resumable", spool_dir=tmp_path / "spool", **store)
    for step in range(10):
        first.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    first.close(status=None)
    assert client.get_run(first.run_id).info.status == "RUNNING"

    # A fresh spool directory: what the run holds is known from the server only.
    second = RunLogger(experiment, run_id=first.run_id, spool_dir=tmp_path / "other-spool", **store)
    assert second.last_logged_step() == 9
    assert second.last_logged_step("never/logged") is None
    for step in range(5, 20):  # resumed from a checkpoint at step 4: steps 5..9 come again and are not logged twice
        second.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    assert second.last_logged_step() == 19  # counts what is still queued
    second.close()
    assert _steps(client, first.run_id) == list(range(20))
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name(experiment).experiment_id])) == 1


def test_artifacts_are_uploaded_even_when_the_source_is_deleted_right_away(store, tmp_path, experiment):
    config = tmp_path / "ds_config.json"
    config.write_text('{"zero_optimization": {"stage": 2}}')
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "vocab.txt").write_text("a\nb\n")
    with RunLogger(experiment, spool_dir=tmp_path / "spool", **store) as logger:
        logger.log_artifact(config)
        logger.log_artifact(folder, artifact_path="assets")
        config.unlink()
        shutil.rmtree(folder)
    client = MlflowClient(store["tracking_uri"])
    assert [a.path for a in client.list_artifacts(logger.run_id)] == ["assets", "ds_config.json"]
    assert [a.path for a in client.list_artifacts(logger.run_id, "assets/tokenizer")] == ["assets/tokenizer/vocab.txt"]
    local = client.download_artifacts(logger.run_id, "ds_config.json", str(tmp_path))
    assert Path(local).read_text() == '{"zero_optimization": {"stage": 2}}'


def test_log_metrics_returns_at_once_while_the_store_is_slow(store, tmp_path, experiment, monkeypatch):
    logger = RunLogger(experiment, spool_dir=tmp_path / "spool", flush_every_s=0.05, **store)
    real_log_batch = logger._client.log_batch

    def slow_log_batch(*args, **kwargs):
        time.sleep(0.5)
        return real_log_batch(*args, **kwargs)

    monkeypatch.setattr(logger._client, "log_batch", slow_log_batch)
    worst = 0.0
    for step in range(40):
        start = time.perf_counter()
        logger.log_metrics({"train/loss": 1.0, "train/lr": 2.0, "perf/step_s": 0.01}, step=step)
        worst = max(worst, time.perf_counter() - start)
        time.sleep(0.01)
    assert worst < 0.1  # a send takes 0.5 s here
    logger.close()
    assert _steps(MlflowClient(store["tracking_uri"]), logger.run_id) == list(range(40))


def test_a_changed_param_is_dropped_with_a_warning_and_the_rest_of_its_batch_arrives(
    store, tmp_path, experiment, caplog
):
    with RunLogger(experiment, spool_dir=tmp_path / "spool", **store) as logger:
        logger.log_params({"lr": 1e-3, "seed": 1})
        assert logger.flush()
        logger.log_params({"lr": 5e-4, "resumed": True})
        logger.log_metrics({"train/loss": 2.0}, step=0)
    params = MlflowClient(store["tracking_uri"]).get_run(logger.run_id).data.params
    assert params == {"lr": "0.001", "seed": "1", "resumed": "True"}
    assert _steps(MlflowClient(store["tracking_uri"]), logger.run_id) == [0]
    assert any("rejected 1 record(s) (lr)" in w for w in _warnings(caplog))


def test_a_deleted_experiment_is_a_clear_error(store, tmp_path, experiment):
    client = MlflowClient(store["tracking_uri"])
    client.delete_experiment(client.create_experiment(experiment, store["artifact_location"]))
    with pytest.raises(MlflowException, match="is deleted; restore it"):
        RunLogger(experiment, spool_dir=tmp_path / "spool", **store)


def test_continuing_an_unknown_or_deleted_run_is_a_clear_error(store, tmp_path, experiment):
    client = MlflowClient(store["tracking_uri"])
    run_id = client.create_run(client.create_experiment(experiment, store["artifact_location"])).info.run_id
    client.delete_run(run_id)
    with pytest.raises(MlflowException, match="is deleted; restore it"):
        RunLogger(experiment, run_id=run_id, spool_dir=tmp_path / "spool", **store)
    with pytest.raises(MlflowException, match="cannot be continued"):
        RunLogger(experiment, run_id="0" * 32, spool_dir=tmp_path / "spool", **store)


def test_a_run_deleted_while_logging_keeps_its_records_on_disk_with_one_error(store, tmp_path, experiment, caplog):
    logger = RunLogger(experiment, spool_dir=tmp_path / "spool", flush_every_s=0.05, **store)
    assert logger.flush()
    MlflowClient(store["tracking_uri"]).delete_run(logger.run_id)
    for step in range(20):
        logger.log_metrics({"train/loss": 1.0}, step=step)
    assert not logger.flush(10)
    logger.close(timeout_s=1)
    errors = [r for r in caplog.records if r.name.startswith(TRACKING_LOGGER) and r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "was deleted" in errors[0].getMessage()
    kinds = [r["k"] for _, r in Spool(tmp_path / "spool", logger.run_id).unsent()]
    assert kinds == ["m"] * 20 + ["status"]


def test_spool_drops_a_partial_last_record_and_resends_only_what_is_past_the_cursor(tmp_path):
    spool = Spool(tmp_path, "run")
    assert spool.try_lock()
    spool.append([{"k": "m", "key": "a", "v": float(i), "s": i, "ts": i} for i in range(3)])
    first_end = next(spool.unsent())[0]
    spool.advance(first_end)
    spool.unlock()
    with open(spool.path, "ab") as f:
        f.write(b'{"k":"m","key":"a","v":3.0,')  # the process died in the middle of this append

    reopened = Spool(tmp_path, "run")
    assert reopened.try_lock()
    assert not Spool(tmp_path, "run").try_lock()  # one sender per spool
    assert [r["s"] for _, r in reopened.unsent()] == [1, 2]
    assert reopened.state["max_steps"] == {"a": 2}
    reopened.advance(reopened.size())
    reopened.compact()
    assert reopened.size() == 0
    reopened.unlock()


# ---- a real tracking server ----


@pytest.fixture(scope="module")
def server_process(migrated_db: Path, tmp_path_factory: pytest.TempPathFactory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    shutil.copy(migrated_db, server.root / "mlflow.db")
    server.start()
    yield server
    server.kill()


@pytest.fixture
def server(server_process: MlflowServer) -> MlflowServer:
    """The module's server, running; a test that kills it need not restart it."""
    if not server_process.running:
        server_process.start()
    return server_process


@pytest.mark.e2e
def test_server_receives_params_metrics_artifacts_and_end_status(server, tmp_path, experiment):
    (tmp_path / "config.json").write_text("{}")
    logger = RunLogger(
        experiment, run_name="baseline", tracking_uri=server.uri, tags={"vscale": "off"}, spool_dir=tmp_path / "spool"
    )
    logger.log_params({"model": {"num_hidden_layers": 2}, "vscale": "off"})
    for step in range(25):
        logger.log_metrics({"train/loss": 5.0 - 0.1 * step, "perf/tokens_per_s": 1000.0}, step=step)
    logger.log_metrics({"gs/ratio/L00": math.nan, "gs/ratio/L01": -math.inf}, step=25)
    logger.log_artifact(tmp_path / "config.json")
    logger.close()

    client = MlflowClient(server.uri)
    run = client.get_run(logger.run_id)
    assert (run.info.run_name, run.info.status, run.data.tags["vscale"]) == ("baseline", "FINISHED", "off")
    assert run.data.params == {"model.num_hidden_layers": "2", "vscale": "off"}
    assert _steps(client, logger.run_id) == list(range(25))
    assert math.isnan(run.data.metrics["gs/ratio/L00"])
    assert run.data.metrics["gs/ratio/L01"] == pytest.approx(-sys.float_info.max)
    assert [a.path for a in client.list_artifacts(logger.run_id)] == ["config.json"]


@pytest.mark.e2e
def test_server_killed_mid_run_spools_with_one_warning_and_everything_arrives_once(
    server, tmp_path, experiment, caplog
):
    caplog.set_level(logging.INFO, logger=TRACKING_LOGGER)
    logger = RunLogger(experiment, tracking_uri=server.uri, spool_dir=tmp_path / "spool", flush_every_s=0.2)
    for step in range(10):
        logger.log_metrics({"train/loss": float(step)}, step=step)
    assert logger.flush(20)

    server.kill()
    worst, sizes = 0.0, []
    for step in range(10, 40):
        start = time.perf_counter()
        logger.log_metrics({"train/loss": float(step), "train/lr": 1e-3}, step=step)
        worst = max(worst, time.perf_counter() - start)
        if step % 10 == 9:
            assert not logger.flush(1.0)  # the server is down: not sent, but written to the spool
            sizes.append(logger.spool_file.stat().st_size)
    assert worst < 0.1
    assert sizes[0] < sizes[1] < sizes[2]
    assert len(_warnings(caplog)) == 1
    assert "unreachable" in _warnings(caplog)[0]

    server.start()
    for step in range(40, 50):
        logger.log_metrics({"train/loss": float(step), "train/lr": 1e-3}, step=step)
    assert logger.flush(30)
    assert any("answers again" in r.getMessage() for r in caplog.records if r.name.startswith(TRACKING_LOGGER))
    logger.close()

    client = MlflowClient(server.uri)
    assert _steps(client, logger.run_id) == list(range(50))
    assert _steps(client, logger.run_id, "train/lr") == list(range(10, 50))
    assert len(_warnings(caplog)) == 1


@pytest.mark.e2e
def test_what_a_logger_could_not_send_is_sent_by_the_next_logger_of_that_run(server, tmp_path, experiment):
    spool_dir = tmp_path / "spool"
    first = RunLogger(experiment, tracking_uri=server.uri, spool_dir=spool_dir, flush_every_s=0.2)
    for step in range(5):
        first.log_metrics({"train/loss": float(step)}, step=step)
    assert first.flush(20)
    server.kill()
    for step in range(5, 10):
        first.log_metrics({"train/loss": float(step)}, step=step)
    assert not first.flush(1.0)
    start = time.perf_counter()
    first.close(status=None)  # the job ends during the outage: one more attempt, not a 30 s wait
    assert time.perf_counter() - start < 5
    assert first.spool_file.stat().st_size > 0

    server.start()
    second = RunLogger(experiment, run_id=first.run_id, tracking_uri=server.uri, spool_dir=spool_dir)
    assert second.last_logged_step() == 9  # includes the spooled steps the server has not seen yet
    for step in range(10, 15):
        second.log_metrics({"train/loss": float(step)}, step=step)
    second.close()

    client = MlflowClient(server.uri)
    history = client.get_metric_history(first.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(15))
    by_time = [m.step for m in sorted(history, key=lambda m: (m.timestamp, m.step))]
    assert by_time == list(range(15))
    assert client.get_run(first.run_id).info.status == "FINISHED"


@pytest.mark.e2e
def test_loggers_started_while_the_server_is_down_create_their_runs_when_it_is_back(
    server, tmp_path, experiment, caplog
):
    server.kill()
    spool_dir = tmp_path / "spool"
    crashed = RunLogger(experiment, run_name="crashed", tracking_uri=server.uri, spool_dir=spool_dir)
    for step in range(5):
        crashed.log_metrics({"train/loss": float(step)}, step=step)
    crashed.close(status=None)  # this job never saw the server; its spool waits in spool_dir

    start = time.perf_counter()
    logger = RunLogger(experiment, run_name="late", tracking_uri=server.uri, spool_dir=spool_dir)
    assert time.perf_counter() - start < 5
    assert logger.run_id is None
    logger.log_params({"preset": "smoke"})
    for step in range(10):
        logger.log_metrics({"train/loss": float(step)}, step=step)
    assert logger.last_logged_step() == 9
    assert len([w for w in _warnings(caplog) if "unreachable" in w]) == 2  # one per logger

    server.start()
    assert logger.flush(30)
    assert logger.run_id is not None
    logger.close()
    client = MlflowClient(server.uri)
    run = client.get_run(logger.run_id)
    assert (run.info.run_name, run.info.status, run.data.params) == ("late", "FINISHED", {"preset": "smoke"})
    assert _steps(client, logger.run_id) == list(range(10))
    runs = {r.info.run_name: r for r in client.search_runs([run.info.experiment_id])}
    assert sorted(runs) == ["crashed", "late"]
    assert runs["crashed"].info.status == "RUNNING"  # left open for a resume, as close(status=None) asked
    assert _steps(client, runs["crashed"].info.run_id) == list(range(5))
