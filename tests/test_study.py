"""The paired study (vsp-study, launchers/study.py): baseline and V-scale through the real deepspeed launcher, then
the comparison."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from vscale_plugin.apps.study import parse_args, pretrain_command
from vscale_plugin.launch.ds_config import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "launchers" / "study.py"


def _study(tmp_path, *flags, timeout=900):
    """The study to its end; on a timeout its whole session (launcher and ranks) is stopped, not left training."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "HF_HUB_OFFLINE": "1",
           "VSP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}  # fmt: skip
    cmd = [sys.executable, str(STUDY), *map(str, flags)]
    with subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as popen:  # fmt: skip
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGTERM)  # the deepspeed launcher then stops its ranks
            out, err = popen.communicate()
            raise AssertionError(f"{' '.join(cmd)}: still running after {timeout} s\n{(out + err)[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, popen.returncode, out, err)


@pytest.mark.e2e
@pytest.mark.distributed
def test_study_trains_baseline_and_vscale_with_the_same_recipe_then_compares(tmp_path):
    evaluation = "--tasks ppl,niah_single_2 --quant none,w8a8_static --seeds 1 --samples 2 --calib 4 --ppl_windows 4"
    proc = _study(tmp_path, "--steps", 6, "--stats_every", 3, "--out", tmp_path / "study", "--experiment", "paired",
                  "--evaluate", "--eval_flags", evaluation)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = (tmp_path / "study" / "report" / "report.md").read_text()
    assert "learned / off" in report
    # --evaluate: both models downstream, at the native context and 4x it with YaRN, in the comparison's report
    downstream = report[report.index("## Downstream evaluation") :]
    assert "| quant | 128: off | 128: learned | Δ | 512: off | 512: learned | Δ |" in downstream
    assert "| w8a8_static |" in downstream and "### niah_single_2" in downstream
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("paired").experiment_id])
    trained = {r.data.tags["vscale"]: r for r in runs if not {"comparison", "evaluation"} & set(r.data.tags)}
    evaluations = {r.data.tags["source_run"] for r in runs if r.data.tags.get("evaluation") == "true"}
    assert evaluations == {r.info.run_id for r in trained.values()}
    assert set(trained) == {"off", "learned"}
    for key in ("recipe.lr", "recipe.global_batch", "seed", "dataset", "world_size", "recipe.max_steps"):
        assert trained["off"].data.params[key] == trained["learned"].data.params[key], key
    assert all(r.info.status == "FINISHED" and "gs/ratio/median" in r.data.metrics for r in trained.values())
    (comparison,) = [r for r in runs if r.data.tags.get("comparison") == "true"]
    assert set(comparison.data.tags["sources"].split(",")) == {r.info.run_id for r in trained.values()}


def test_study_without_a_baseline_is_a_one_line_error(tmp_path):
    proc = _study(tmp_path, "--modes", "learned,fixed", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --modes")
    assert not (tmp_path / "studies").exists()


def test_study_with_zero_steps_is_a_one_line_error_not_the_presets_steps(tmp_path):
    # Before the fix --steps 0 fell back to the preset's 150 steps and trained; the timeout stops that.
    proc = _study(tmp_path, "--steps", 0, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == ["error: --steps 0: must be >= 1, or leave it out for the preset's"]
    assert not (tmp_path / "studies").exists()


def test_study_with_a_config_that_does_not_exist_lists_the_shipped_ones(tmp_path):
    proc = _study(tmp_path, "--ds_config", "zero9", timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: --ds_config zero9: no such file; available: ds_configs/zero1.json"), line


def test_study_stats_every_zero_is_passed_on_as_no_statistics():
    args, extra = parse_args(["--stats_every", "0", "--steps", "10"])
    command = pretrain_command(args, "off", extra)
    assert command[command.index("--stats_every") + 1] == "0"
    assert command[command.index("--max_steps") + 1] == "10"


def test_study_trains_through_the_installed_modules_with_the_shipped_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, extra = parse_args([])
    command = pretrain_command(args, "learned", extra)
    # DeepSpeed's runner in this very interpreter, so the ranks import the vscale_plugin the study imports.
    assert command[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert command[command.index("--module") + 1] == "vscale_plugin.train"
    assert Path(command[command.index("--ds_config") + 1]) == CONFIG_DIR / "zero2.json"
    assert not [part for part in command if "launchers" in part]
    assert parse_args(["--ds_config", "zero3"])[0].ds_config == CONFIG_DIR / "zero3.json"
