"""The statistics under DeepSpeed Ulysses sequence parallelism (issue 15, items 3 and 5): on 2 CPU ranks over gloo,
SP 2 gives the same per-step losses and every SPEC statistic (positions counted over the whole sequences, R_GS, the
sink statistics over the whole causal past) as the same model without SP on the same batches. Each rank holds half of
every sequence; the profiles are put together over the group, and the sink statistics come from an exchange to whole
sequences of each rank's heads, as Ulysses makes around its kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from vscale_plugin.testing.distributed import run_worker_ranks

WORKER = Path(__file__).resolve().parent / "workers" / "sp_statistics.py"


# llama at ZeRO-1 and 3 (3 averages gradients over the SP group before DeepSpeed 0.20.2, 1 sums them); at ZeRO-1 the
# families whose statistics differ most: q/k biases (qwen2), q/k norms (qwen3), multipliers (granite), NoPE layers
# (smollm3), partial interleaved rotary (glm).
CASES = [("llama", 1), ("llama", 3), ("qwen2", 1), ("qwen3", 1), ("granite", 1), ("smollm3", 1), ("glm", 1)]


@pytest.mark.distributed
@pytest.mark.parametrize(("arch", "stage"), CASES)
def test_ulysses_2_ranks_measure_like_one_without_sequence_parallelism(tmp_path, arch, stage):
    env = {"VSP_ZERO_STAGE": str(stage), "VSP_ARCH": arch}
    ranks = run_worker_ranks(WORKER, tmp_path, num_gpus=2, env=env)
    for result in ranks:
        plain, sp = result["plain"], result["sp"]
        assert sp["losses"] == pytest.approx(plain["losses"], rel=1e-5)
        for step, (got, want) in enumerate(zip(sp["stats"], plain["stats"], strict=True)):
            assert len(want) > 100, step
            assert sorted(got) == sorted(want), step
            assert got == pytest.approx(want, rel=1e-3, abs=1e-6), step
        assert "pass the engine deepspeed.initialize returned" in sp["bare_model_error"]
        assert "a padded batch under sequence parallelism" in sp["padded_error"]
    assert ranks[0]["sp"]["stats"] == ranks[1]["sp"]["stats"]  # every rank reports the same numbers
