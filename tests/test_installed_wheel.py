"""The package stands on its own (issue 11): a wheel built from this checkout, installed into a fresh virtual
environment, trains through its console script under the real ``deepspeed`` launcher (2 CPU ranks) and analyses the
checkpoint, from a directory that is not the checkout.

Only ``vscale_plugin`` comes from the wheel: a ``.pth`` file lets the new environment see the dependencies already
installed for the tests (torch, DeepSpeed, transformers, ...), as installing them afresh would take many minutes and
GBs. A plain path line in a ``.pth`` file does not run that environment's own ``.pth`` files, so its editable install
of this checkout stays out of reach.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from mlflow import MlflowClient

from vscale_plugin.testing.distributed import free_port, without_launcher_vars
from vscale_plugin.train.mlflow_run import git_commit

REPO = Path(__file__).resolve().parents[1]
# Variables of an enclosing launcher that would make a child join a process group that does not exist.

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.distributed]


def _run(cmd: list[str | Path], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``cmd`` to the end; on a timeout its whole session (the deepspeed launcher and its ranks) is stopped."""
    cmd = [str(c) for c in cmd]
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as popen:  # fmt: skip
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGTERM)  # the launcher then stops each rank
            out, err = popen.communicate()
            raise AssertionError(f"{' '.join(cmd)}: still running after {timeout} s\n{(out + err)[-4000:]}") from None
    assert popen.returncode == 0, f"{' '.join(cmd)} exited with {popen.returncode}\n{(out + err)[-6000:]}"
    return subprocess.CompletedProcess(cmd, popen.returncode, out, err)


def _build_wheel(root: Path) -> Path:
    """The wheel of this checkout's pyproject.toml and package, built from a copy (an in-tree build would leave
    build/ behind, whose stale files a later build packs), offline: setuptools from the test environment."""
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "vscale_plugin", src / "vscale_plugin", ignore=shutil.ignore_patterns("__pycache__"))
    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", dist,
          src], cwd=root, env=dict(os.environ))  # fmt: skip
    (wheel,) = dist.glob("vscale_plugin-*.whl")
    return wheel


def _fresh_venv(root: Path, wheel: Path) -> Path:
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root, env=dict(os.environ))
    python = venv / "bin" / "python"
    # This environment's pip installs into the new one (pip --python), so the new one needs no pip of its own.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index", wheel],
         cwd=root, env=dict(os.environ))  # fmt: skip
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root,
                     env=dict(os.environ)).stdout.strip())  # fmt: skip
    deps = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "test_dependencies.pth").write_text("".join(f"{path}\n" for path in deps))
    # What pip puts in bin/ when it installs DeepSpeed into this environment: its launcher, run by this interpreter.
    launcher = venv / "bin" / "deepspeed"
    launcher.write_text(f"#!{python}\nfrom deepspeed.launcher.runner import main\n\nmain()\n")
    launcher.chmod(0o755)
    return venv


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("installed")
    venv = _fresh_venv(root, _build_wheel(root))
    work = root / "work"  # not the checkout: nothing is found relative to it
    work.mkdir()
    env = without_launcher_vars(os.environ, "PYTHONPATH")
    # The new environment's commands first; then the test environment's tools (ninja for DeepSpeed's CPU ops).
    env["PATH"] = os.pathsep.join([str(venv / "bin"), str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(VIRTUAL_ENV=str(venv), MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
               VSP_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # fmt: skip
    return {"root": root, "venv": venv, "work": work, "env": env}


def test_the_new_environment_imports_vscale_plugin_from_the_wheel_only(installed):
    where = _run(["python", "-c", "import vscale_plugin; print(vscale_plugin.__file__)"], cwd=installed["work"],
                 env=installed["env"]).stdout.strip()  # fmt: skip
    assert Path(where).is_relative_to(installed["venv"]), where
    assert not Path(where).resolve().is_relative_to(REPO), where


def test_the_console_script_trains_under_deepspeed_and_vsp_analyze_reads_its_checkpoint(installed):
    work, env = installed["work"], installed["env"]
    # As a user types it: deepspeed $(which vsp-pretrain) --ds_config zero2 ..., the config found by its name.
    script = shutil.which("vsp-pretrain", path=env["PATH"])
    assert script is not None and Path(script).is_relative_to(installed["venv"]), script
    _run(
        [
            "deepspeed",
            "--num_gpus",
            "2",
            "--master_port",
            free_port(),
            script,
            "--ds_config",
            "zero2",
            "--max_steps",
            3,
            "--save_dir",
            "ckpt",
            "--experiment",
            "wheel",
            "--run_name",
            "wheel",
        ],
        cwd=work,
        env=env,
    )
    assert (work / "ckpt" / "train_summary.json").is_file() and (work / "ckpt" / "latest").is_file()
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("wheel").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
    # The ranks' own word on which copy they ran: the checkout's would have logged the checkout's commit.
    assert run.data.params["git_commit"] != git_commit()

    proc = _run(["vsp-analyze", "--model", "ckpt", "--batches", 1, "--batch_size", 2, "--seq_len", 64,
                 "--out", "analysis", "--run_name", "wheel-analysis"], cwd=work, env=env)  # fmt: skip
    assert "median R_GS" in proc.stdout
    assert (work / "analysis" / "metrics.json").is_file()
    analysis = client.search_runs([client.get_experiment_by_name("vscale-plugin-analysis").experiment_id])
    assert [r.info.run_name for r in analysis] == ["wheel-analysis"]
    assert any(key.startswith("gs/ratio") for key in analysis[0].data.metrics)
