"""launchers/study.py: baseline and V-scale through the real deepspeed launcher, then the comparison."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "launchers" / "study.py"


def _study(tmp_path, *flags):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "HF_HUB_OFFLINE": "1",
           "VSP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}  # fmt: skip
    return subprocess.run([sys.executable, str(STUDY), *map(str, flags)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip


@pytest.mark.e2e
@pytest.mark.distributed
def test_study_trains_baseline_and_vscale_with_the_same_recipe_then_compares(tmp_path):
    proc = _study(tmp_path, "--steps", 6, "--stats_every", 3, "--out", tmp_path / "study", "--experiment", "paired")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = (tmp_path / "study" / "report" / "report.md").read_text()
    assert "learned / off" in report
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("paired").experiment_id])
    trained = {r.data.tags["vscale"]: r for r in runs if "comparison" not in r.data.tags}
    assert set(trained) == {"off", "learned"}
    for key in ("recipe.lr", "recipe.global_batch", "seed", "dataset", "world_size", "recipe.max_steps"):
        assert trained["off"].data.params[key] == trained["learned"].data.params[key], key
    assert all(r.info.status == "FINISHED" and "gs/ratio/median" in r.data.metrics for r in trained.values())
    (comparison,) = [r for r in runs if r.data.tags.get("comparison") == "true"]
    assert set(comparison.data.tags["sources"].split(",")) == {r.info.run_id for r in trained.values()}


def test_study_without_a_baseline_is_a_one_line_error(tmp_path):
    proc = _study(tmp_path, "--modes", "learned,fixed")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --modes")
    assert not (tmp_path / "studies").exists()
