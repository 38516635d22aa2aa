"""benchmarks/data_throughput.py runs as documented and ends with its JSON line (no timing is asserted here)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
C4_SAMPLE = REPO / "tests" / "data" / "c4-sample.jsonl"


def test_data_throughput_ends_with_one_json_object(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "data_throughput.py"), "--device", "cpu", "--preset", "smoke",
         "--seq_len", "32", "--micro_batch", "2", "--batches", "5", "--seconds", "1", "--train_steps", "1",
         "--warmup", "0", "--cache_dir", str(tmp_path / "cache"), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last == json.loads(out.read_text())
    for key in ("pipeline_tokens_per_s", "training_tokens_per_s", "headroom"):
        assert last[key] > 0, key
    assert last["seq_len"] == 32 and last["micro_batch"] == 2 and last["pipeline"]["batches"] >= 1
