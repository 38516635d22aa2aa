"""The benchmark scripts run as documented and end with their JSON line (no timing is asserted here)."""

import json
import subprocess
import sys
from pathlib import Path

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
