"""The benchmark scripts run as documented and end with their JSON line (no timing is asserted here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_vscale_overhead_ends_with_one_json_object(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "vscale_overhead.py"), "--device", "cpu", "--preset", "smoke", "--steps", "2",
         "--warmup", "1", "--batch", "1", "--seq_len", "32", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last == json.loads(out.read_text())
    assert last["ratio"] > 0 and last["timed_steps_per_arm"] == 2
    assert set(last["median_step_s"]) == {"baseline", "vscale"}
    assert last["tokens_per_s"]["baseline"] == 32 / last["median_step_s"]["baseline"]
    assert last["ratios"] == {"eager": last["ratio"]}
    assert last["ratio"] == last["median_step_s"]["vscale"] / last["median_step_s"]["baseline"]


def test_launcher_vs_loop_trains_the_same_model_on_the_same_data_in_both(tmp_path):
    out = tmp_path / "result.json"
    env = {**__import__("os").environ, "VSP_CACHE": str(tmp_path / "cache")}
    env["PATH"] = str(Path(sys.executable).parent) + ":" + env.get("PATH", "")  # the deepspeed launcher
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "launcher_vs_loop.py"), "--device", "cpu", "--quick", "--steps", "4",
         "--seq_len", "32", "--work_dir", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last == json.loads(out.read_text())
    launcher, loop = last["launcher"], last["loop"]
    assert last["ratio"] == launcher["median_tokens_per_s"] / loop["median_tokens_per_s"]
    # Same seed, model, data, optimiser and schedule: the last training loss agrees (float32 on CPU).
    assert launcher["train_loss"] == pytest.approx(loop["train_loss"], rel=1e-4)
    assert launcher["steps_this_invocation"] == 4 and launcher["tokens_per_step"] == 32
    assert not list((tmp_path / "work" / "launcher").glob("step*"))  # --no_checkpoint


def test_engine_phases_times_each_phase_of_both_arms(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "engine_phases.py"), "--device", "cpu", "--preset", "smoke", "--batch", "1",
         "--seq_len", "32", "--steps", "2", "--warmup", "1", "--stage", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last == json.loads(out.read_text())
    for arm in ("plain", "deepspeed"):
        assert set(last["median_s"][arm]) == {"forward", "backward", "step"}
        assert last["total_s"][arm] == sum(last["median_s"][arm].values()) > 0
    assert last["ratio"] == last["total_s"]["deepspeed"] / last["total_s"]["plain"] and last["zero_stage"] == 2


def test_trainer_callback_reports_ratios_to_the_plain_trainer(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "trainer_callback.py"), "--steps", "5", "--every", "2", "--rounds", "1",
         "--hidden", "32", "--layers", "1", "--seq_len", "32", "--batch", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=BENCHMARKS,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last == json.loads(out.read_text())
    assert last["steps_per_arm"] == 5 and last["every"] == 2
    for key in ("idle_callback_ratio", "non_capture_step_ratio", "capture_step_ratio", "amortised_ratio"):
        assert last[key] > 0, key
