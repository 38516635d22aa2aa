"""Stopping a run from outside and continuing it, as schedulers and users do: signals to the real ``deepspeed``
launcher (2 CPU ranks) or to a one-process run stop every rank at one step boundary with a checkpoint and the MLflow
run KILLED; ``--resume`` continues with the losses of a run never stopped, and refuses a checkpoint made with other
settings, naming them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from vscale_plugin.testing import metric_history
from vscale_plugin.testing.distributed import deepspeed_executable, free_port, run_deepspeed, without_launcher_vars

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launchers" / "pretrain.py"
ZERO2 = REPO / "ds_configs" / "zero2.json"
# Long enough that a signal sent after the first checkpoint (step 2) always lands mid-run.
COMMON = ("--max_steps", "200", "--seed", "3", "--experiment", "stop", "--save_every", "2")

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vsp-cache")


@pytest.fixture
def env(tmp_path: Path, cache_dir: Path) -> dict[str, str]:
    env = without_launcher_vars(os.environ)
    env.update(
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        HF_HUB_OFFLINE="1",
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        VSP_CACHE=str(cache_dir),
        OMP_NUM_THREADS="1",
    )
    return env


def _default_sigint() -> None:
    # As in a terminal's foreground job. Started in the background of a non-interactive shell (CI often is), pytest
    # inherits SIGINT ignored, and so would DeepSpeed's runner: `kill -INT` would then end nothing.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(cmd: list[str | Path], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``cmd`` in a session of its own, its output to ``log`` (a pipe nobody reads would fill and block it)."""
    with open(log, "w") as out:
        return subprocess.Popen([str(c) for c in cmd], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_default_sigint)  # fmt: skip


def _deepspeed(save_dir: Path, *flags: str) -> list[str | Path]:
    return [deepspeed_executable(), "--num_gpus", "2", "--master_port", str(free_port()), LAUNCHER,
            "--ds_config", ZERO2, "--save_dir", save_dir, *COMMON, *flags]  # fmt: skip


def _wait_for_first_checkpoint(popen: subprocess.Popen, save_dir: Path, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (save_dir / "latest").is_file():
        if popen.poll() is not None:
            pytest.fail(f"the run ended before its first checkpoint (exit {popen.returncode})\n{_tail(log)}")
        if time.monotonic() > deadline:
            _kill(popen, [])
            pytest.fail(f"no checkpoint after {timeout} s\n{_tail(log)}")
        time.sleep(0.05)


def _ranks(popen: subprocess.Popen) -> list[psutil.Process]:
    ranks = [p for p in psutil.Process(popen.pid).children(recursive=True) if str(LAUNCHER) in " ".join(p.cmdline())]
    assert ranks, "no rank processes found under the launcher"
    return ranks


def _kill(popen: subprocess.Popen, ranks: list[psutil.Process]) -> None:
    for p in ranks:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, signal.SIGKILL)
    popen.wait()


def _wait_for_ranks(popen: subprocess.Popen, ranks: list[psutil.Process], log: Path, timeout: float = 180) -> None:
    _, alive = psutil.wait_procs(ranks, timeout=timeout)
    if alive:
        _kill(popen, alive)
        pytest.fail(f"{len(alive)} rank(s) still training {timeout} s after the signal\n{_tail(log)}")
    popen.wait(timeout=60)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-5000:]


def _latest_step(save_dir: Path) -> int:
    return int((save_dir / "latest").read_text().strip().removeprefix("step"))


def _run(client: MlflowClient, name: str):
    experiment = client.get_experiment_by_name("stop")
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    return run


def test_sigint_to_the_deepspeed_launcher_stops_every_rank_and_resume_continues_exactly(tmp_path, env):
    # `kill -INT <pid of deepspeed>`: the runner dies and forwards nothing. Before the fix both ranks trained on,
    # orphaned, to step 200.
    save_dir, log = tmp_path / "run", tmp_path / "stopped.log"
    popen = _start(_deepspeed(save_dir, "--run_name", "stopped"), env, log)
    _wait_for_first_checkpoint(popen, save_dir, log)
    ranks = _ranks(popen)
    os.kill(popen.pid, signal.SIGINT)
    _wait_for_ranks(popen, ranks, log)
    stopped = _latest_step(save_dir)
    assert 2 <= stopped < 200
    out = log.read_text(errors="replace")
    assert f"stopped at step {stopped}/200 on SIGTERM" in out, _tail(log)
    assert f"--resume --save_dir {save_dir}" in out
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = _run(client, "stopped")
    assert run.info.status == "KILLED"
    assert sorted(metric_history(client, run.info.run_id)) == list(range(1, stopped + 1))

    # Resumed with the same flags (its name and experiment from the checkpoint), then a run never stopped.
    run_deepspeed(LAUNCHER, "--ds_config", ZERO2, "--save_dir", save_dir, *COMMON, "--resume",
                  "--stop_after_steps", "3", env=env)  # fmt: skip
    run_deepspeed(LAUNCHER, "--ds_config", ZERO2, "--save_dir", tmp_path / "straight", *COMMON, "--run_name",
                  "straight", "--stop_after_steps", str(stopped + 3), env=env)  # fmt: skip
    resumed_run = _run(client, "stopped")
    resumed = metric_history(client, resumed_run.info.run_id)
    straight = metric_history(client, _run(client, "straight").info.run_id)
    assert sorted(resumed) == sorted(straight) == list(range(1, stopped + 4))
    for step in straight:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-4), step
    assert resumed_run.info.status == "RUNNING", "stopped by --stop_after_steps, it waits for the next --resume"


def test_sigterm_to_the_whole_job_checkpoints_and_exits_non_zero(tmp_path, env):
    # What a scheduler does at preemption or the end of the allocation: SIGTERM to every process of the job.
    save_dir, log = tmp_path / "run", tmp_path / "preempted.log"
    popen = _start(_deepspeed(save_dir, "--run_name", "preempted"), env, log)
    _wait_for_first_checkpoint(popen, save_dir, log)
    ranks = _ranks(popen)
    os.killpg(popen.pid, signal.SIGTERM)
    _wait_for_ranks(popen, ranks, log)
    assert popen.returncode != 0, _tail(log)
    stopped = _latest_step(save_dir)
    assert 2 <= stopped < 200
    assert f"stopped at step {stopped}/200 on SIGTERM" in log.read_text(errors="replace"), _tail(log)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = _run(client, "preempted")
    assert run.info.status == "KILLED"
    assert max(metric_history(client, run.info.run_id)) == stopped


def test_sigint_to_a_one_process_run_exits_130_with_a_checkpoint(tmp_path, env):
    save_dir, log = tmp_path / "run", tmp_path / "interrupted.log"
    cmd = [sys.executable, LAUNCHER, "--ds_config", ZERO2, "--save_dir", save_dir, *COMMON, "--run_name", "ctrl-c"]
    popen = _start(cmd, env, log)
    _wait_for_first_checkpoint(popen, save_dir, log)
    os.kill(popen.pid, signal.SIGINT)
    assert popen.wait(timeout=180) == 128 + signal.SIGINT, _tail(log)
    stopped = _latest_step(save_dir)
    assert f"stopped at step {stopped}/200 on SIGINT" in log.read_text(errors="replace"), _tail(log)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert _run(client, "ctrl-c").info.status == "KILLED"


# ---- --resume with other settings than the checkpoint's ----


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def checkpointed(tmp_path, env) -> Path:
    """A one-process run of 2 of its 20 steps, checkpointed and RUNNING in MLflow."""
    save_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(LAUNCHER), "--ds_config", str(ZERO2), "--save_dir", str(save_dir),
                           "--max_steps", "20", "--stop_after_steps", "2", "--experiment", "stop", "--run_name",
                           "first"], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return save_dir


def _assert_refused(proc: subprocess.CompletedProcess, save_dir: Path, before: dict, env, *names: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors, proc.stderr[-3000:]
    for name in names:
        assert name in errors[-1], (name, errors[-1])
    assert _snapshot(save_dir) == before, "the checkpoint changed"
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = _run(client, "first")
    assert run.info.status == "RUNNING" and max(metric_history(client, run.info.run_id)) == 2


def test_resume_with_another_seq_len_and_micro_batch_is_refused_naming_both(tmp_path, env, checkpointed):
    # Before the fix it trained on under the same run name with the new shapes.
    before = _snapshot(checkpointed)
    proc = subprocess.run([sys.executable, str(LAUNCHER), "--ds_config", str(ZERO2), "--save_dir", str(checkpointed),
                           "--max_steps", "20", "--resume", "--seq_len", "64", "--micro_batch", "2"], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    _assert_refused(proc, checkpointed, before, env, "--seq_len 128, not 64", "--micro_batch 4, not 2")


def test_resume_with_another_max_steps_is_refused(tmp_path, env, checkpointed):
    before = _snapshot(checkpointed)
    proc = subprocess.run([sys.executable, str(LAUNCHER), "--ds_config", str(ZERO2), "--save_dir", str(checkpointed),
                           "--resume"], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    _assert_refused(proc, checkpointed, before, env, "--max_steps 20, not 150")


def test_resume_on_another_number_of_ranks_is_refused(tmp_path, env, checkpointed):
    before = _snapshot(checkpointed)
    cmd = [deepspeed_executable(), "--num_gpus", "2", "--master_port", str(free_port()), LAUNCHER, "--ds_config",
           ZERO2, "--save_dir", checkpointed, "--max_steps", "20", "--resume"]  # fmt: skip
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=300,
                          start_new_session=True)  # fmt: skip
    _assert_refused(proc, checkpointed, before, env, "1 ranks, not 2", "--num_gpus 1")


# ---- a short sequence with statistics, end to end ----


def test_a_run_with_short_sequences_measures_every_step(tmp_path, env):
    proc = subprocess.run([sys.executable, str(LAUNCHER), "--ds_config", str(ZERO2), "--save_dir",
                           str(tmp_path / "run"), "--seq_len", "32", "--stats_every", "1", "--max_steps", "2",
                           "--experiment", "stop", "--run_name", "short"], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = _run(client, "short")
    history = client.get_metric_history(run.info.run_id, "gs/ratio/median")
    assert sorted(m.step for m in history) == [1, 2]
    assert all(m.value > 0 for m in history)
