"""benchmarks/gpu_suite.sh (and the suite.py it runs): the whole flow on CPU with tiny shapes, its table, its budget
and its refusal without dependencies. No timing is asserted: the numbers are checked against the result files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE_SH = REPO / "benchmarks" / "gpu_suite.sh"
STEPS = (
    "vscale_overhead",
    "launcher_vs_loop",
    "collector_overhead",
    "data_throughput",
    "engine_phases",
    "evaluate_throughput",
    "sp_statistics",
    "tp_statistics",
)
PARALLEL = ("sp_statistics", "tp_statistics")  # 2 GPUs: skipped on CPU, without failing the suite


def _run_suite(tmp_path: Path, *flags: str, python: str = sys.executable, timeout: int = 900):
    env = {**os.environ, "PYTHON": python, "VSP_SUITE_DEVICE": "cpu", "VSP_WHEELS": str(tmp_path / "no-wheels")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # deepspeed, ninja
    return subprocess.run(["bash", str(SUITE_SH), *flags], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _row(stdout: str) -> list[str]:
    lines = stdout.strip().splitlines()
    assert lines[-3].startswith("| preset |"), lines[-5:]  # the table is printed last
    return [cell.strip() for cell in lines[-1].strip("|").split("|")]


@pytest.mark.slow
@pytest.mark.e2e
def test_suite_runs_every_benchmark_and_prints_their_numbers_last(tmp_path):
    out = tmp_path / "results"
    proc = _run_suite(tmp_path, "--quick", "--kernels", "eager", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "suite.json").read_text())
    assert [s["name"] for s in summary["steps"]] == list(STEPS)
    assert all(s["status"] == "ok" for s in summary["steps"] if s["name"] not in PARALLEL), summary["steps"]
    for step in summary["steps"][-2:]:
        assert step["status"] == "skipped" and step["reason"] == "needs 2 GPUs, this host has 0", step
    results = {name: json.loads((out / f"{name}_smoke.json").read_text()) for name in STEPS if name not in PARALLEL}
    assert summary["environment"]["deepspeed"] and summary["environment"]["device"] == "cpu"

    launcher = results["launcher_vs_loop"]["launcher"]
    assert launcher["steps_this_invocation"] == 6 and launcher["zero_stage"] == 2
    # data_throughput compared its pipeline with what the launcher really consumed, not a rate of its own
    assert results["data_throughput"]["training"]["source"] == "--train_tokens_per_s"
    assert results["data_throughput"]["training_tokens_per_s"] == pytest.approx(launcher["median_tokens_per_s"])

    row = _row(proc.stdout)
    assert row[0] == "smoke"
    assert row[1] == f"{results['vscale_overhead']['ratios']['eager']:.3f}" and row[2] == "-"
    assert row[3] == f"{launcher['median_tokens_per_s']:,.0f}" and row[4] == "-"  # no MFU without a known GPU
    assert row[6] == f"{results['launcher_vs_loop']['ratio']:.3f}"
    assert row[7] == f"{results['collector_overhead']['ratio_idle']:.4f}"
    assert row[11] == f"{results['data_throughput']['headroom']:,.0f}"
    assert row[12] == f"{results['evaluate_throughput']['ppl_tokens_per_s']['none']:,.0f}"
    assert row[13] == f"{results['evaluate_throughput']['niah_samples_per_s']['none']:,.1f}"
    assert summary["table"].splitlines()[-1] == proc.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_suite_skips_what_needs_a_module_that_does_not_import_and_runs_the_rest(tmp_path):
    """An offline host whose datasets cannot import (no pyarrow, say) still gets the V-scale and collector figures."""
    shadow = tmp_path / "shadow" / "datasets"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'pyarrow'\")\n")
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(shadow.parent)}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "suite.py"), "--device", "cpu", "--quick",
                           "--kernels", "eager", "--out", str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "suite.json").read_text())
    status = {s["name"]: s for s in summary["steps"]}
    assert status["vscale_overhead"]["status"] == status["collector_overhead"]["status"] == "ok", summary["steps"]
    for name in ("launcher_vs_loop", "data_throughput", "engine_phases", "evaluate_throughput"):
        assert status[name]["status"] == "skipped", status[name]
        assert "datasets (ModuleNotFoundError: No module named 'pyarrow')" in status[name]["reason"], status[name]
    assert summary["environment"]["missing"] == {"datasets": "ModuleNotFoundError: No module named 'pyarrow'"}
    assert "[suite] datasets does not import here" in proc.stdout
    row = _row(proc.stdout)
    assert row[1] == f"{json.loads((out / 'vscale_overhead_smoke.json').read_text())['ratios']['eager']:.3f}"
    assert row[3] == "-" and row[11] == "-"


def test_suite_without_torch_exits_2_and_says_which_python_lacks_it(tmp_path):
    bare = tmp_path / "bare-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    proc = subprocess.run([str(bare / "bin" / "python"), str(REPO / "benchmarks" / "suite.py"), "--device", "cpu",
                           "--quick", "--out", str(tmp_path / "results")], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and str(bare / "bin" / "python") in line and "No module named 'torch'" in line
    assert "[suite]" not in proc.stdout  # nothing ran


def test_suite_skips_what_its_budget_cannot_fit_and_says_so(tmp_path):
    out = tmp_path / "results"
    proc = _run_suite(tmp_path, "--quick", "--budget_s", "1", "--out", str(out), timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "suite.json").read_text())
    assert {s["status"] for s in summary["steps"]} == {"skipped"}
    assert all("budget" in s["reason"] for s in summary["steps"] if s["name"] not in PARALLEL)
    assert "[suite] 0/8 steps ok" in proc.stdout and "not ok: vscale_overhead smoke: skipped" in proc.stdout
    assert _row(proc.stdout)[1:] == ["-"] * 13


def test_suite_without_dependencies_or_wheels_exits_2_and_names_the_wheel_script(tmp_path):
    bare = tmp_path / "bare-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    proc = _run_suite(tmp_path, "--quick", python=str(bare / "bin" / "python"), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "benchmarks/gpu_wheels.sh" in proc.stderr and "no-wheels" in proc.stderr
    assert "[suite]" not in proc.stdout  # nothing ran


def _suite_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("vsp_bench_suite", REPO / "benchmarks" / "suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("gpus", [0, 1])
def test_parallel_statistics_steps_are_skipped_below_2_gpus_with_the_count_and_do_not_fail(tmp_path, gpus):
    suite = _suite_module()
    args = suite.parse_args(["--device", "cuda", "--out", str(tmp_path)])
    steps = {s["name"]: s for s in suite.plan(args)}
    assert [s["name"] for s in suite.plan(args)][-2:] == list(PARALLEL)
    assert "--quick" not in steps["sp_statistics"]["argv"]
    assert steps["tp_statistics"]["argv"][:2] == ["--device", "cuda"]
    for name in PARALLEL:
        record = suite.run_step(steps[name], tmp_path, float("inf"), dict(os.environ), {}, gpus=gpus)
        assert record["status"] == "skipped" and record["not_applicable"], record
        assert record["reason"] == f"needs 2 GPUs, this host has {gpus}"
        assert not (tmp_path / record["log"]).exists()  # nothing was started
    table = suite.parallel_table(tmp_path, [{**record, "name": "sp_statistics"}])
    assert f"| sp_statistics | - | skipped: needs 2 GPUs, this host has {gpus} | - | - |" in table.splitlines()


def test_parallel_table_shows_each_length_of_a_result(tmp_path):
    suite = _suite_module()
    result = {"results": {"512": {"ratio": 1.5, "extra_mb": 2.0}, "1024": {"ratio": 1.25, "extra_mb": 4.2}},
              "extra_growth": {"1024": 2.1}}  # fmt: skip
    (tmp_path / "tp_statistics_tp2.json").write_text(json.dumps(result))
    table = suite.parallel_table(tmp_path, [{"name": "tp_statistics", "preset": "tp2", "status": "ok"}])
    assert table.splitlines()[2:] == ["| tp_statistics | 512 | 1.500 | +2.0 | - |",
                                      "| tp_statistics | 1024 | 1.250 | +4.2 | 2.10 |"]  # fmt: skip
