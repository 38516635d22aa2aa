"""benchmarks/sp_statistics.py and tp_statistics.py start themselves on 2 CPU ranks (gloo) with the smallest shapes
and end with their JSON line: every length's times, ratios and (fresh-launch peak RSS) memory cells, for both ranks.
No timing or memory figure is asserted, only that they are there and consistent with each other."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, tmp_path: Path, *flags: str) -> dict:
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # deepspeed, ninja
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--device", "cpu", "--quick", "--seq_lens", "32", "64",
         "--layers", "1", "--repeats", "1", "--warmup", "1", *flags, "--out", str(out)],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last == json.loads(out.read_text())
    assert last["ranks"] == 2 and last["seq_lens"] == [32, 64] and last["backend"] == "gloo"
    assert last["model"] == {"layers": 1, "hidden": 128, "attn_implementation": "sdpa", "batch": 1}
    assert len(last["per_rank"]) == 2 and set(last["results"]) == set(last["per_rank"][0]) == {"32", "64"}
    for row in last["results"].values():
        med = row["median_step_s"]
        assert set(med) == {"normal", "capture"} and min(med.values()) > 0
        assert row["ratio"] == pytest.approx(med["capture"] / med["normal"]) and row["paired"] > 0
    assert set(last["extra_growth"]) == {"64"}
    return last


@pytest.mark.slow
@pytest.mark.distributed
def test_sp_statistics_measures_both_arms_per_length_on_2_ranks(tmp_path):
    last = _run("sp_statistics.py", tmp_path)
    assert last["benchmark"] == "sp_statistics" and last["parallelism"] == {"ulysses_sp_size": 2}
    assert last["memory_method"] == "peak RSS, fresh 2-rank launch per (T, arm)"
    for t, row in last["results"].items():
        assert row["tokens_per_rank"] == int(t) // 2  # each rank holds half of the sequence
        assert row["extra_mb"] == pytest.approx(row["capture_mb"] - row["normal_mb"]) and row["normal_mb"] > 0
        # the reported cell is the rank with the larger extra memory
        assert row["extra_mb"] == max(r[t]["extra_mb"] for r in last["per_rank"])


@pytest.mark.distributed
def test_tp_statistics_measures_both_arms_per_length_on_2_ranks(tmp_path):
    last = _run("tp_statistics.py", tmp_path, "--no_memory")
    assert last["benchmark"] == "tp_statistics" and last["parallelism"] == {"autotp_size": 2}
    assert last["memory_method"] == "none (--no_memory)" and last["extra_growth"] == {"64": None}
    for t, row in last["results"].items():
        assert row["tokens_per_rank"] == int(t) and "extra_mb" not in row  # TP: every rank sees the whole sequence
