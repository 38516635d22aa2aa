"""benchmarks/collector_overhead.py runs as documented and ends with its JSON line (no timing is asserted here)."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_collector_overhead_ends_with_one_json_object(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "collector_overhead.py"), "--device", "cpu", "--quick", "--steps", "2",
         "--warmup", "1", "--batch", "1", "--seq_len", "64", "--seq_lens", "128", "256", "--mem_layers", "1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last == json.loads(out.read_text())
    assert last["benchmark"] == "collector_overhead" and last["timed_steps_per_arm"] == 2
    assert set(last["median_step_s"]) == {"none", "idle", "capture", "capture_no_qr"}
    assert all(t > 0 for t in last["median_step_s"].values())
    assert last["ratio_idle"] > 0 and last["ratio_capture"] > 0
    assert set(last["amortised"]) == {"10", "100", "1000"} and all(r > 0 for r in last["amortised"].values())
    none = last["median_step_s"]["none"]
    assert 0 < last["idle_call_s"] < none
    assert last["ratio_idle_direct"] == (none + last["idle_call_s"]) / none
    assert set(last["paired_ratio"]) == {"idle", "capture", "capture_no_qr"}
    assert set(last["amortised_direct"]) == {"10", "100", "1000"}
    # the qr/ statistics' share of a capture step, measured side by side
    assert set(last["qr_ratio"]) == {"median", "paired"} and all(r > 0 for r in last["qr_ratio"].values())
    median = last["median_step_s"]
    assert last["qr_ratio"]["median"] == median["capture"] / median["capture_no_qr"]
    assert set(last["memory"]) == {"128", "256"}
    for cell in last["memory"].values():
        assert cell["normal_mb"] > 0 and cell["capture_mb"] > 0 and cell["ratio"] > 0
        assert cell["extra_mb"] == cell["capture_mb"] - cell["normal_mb"]
