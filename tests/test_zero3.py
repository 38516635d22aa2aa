"""V-scale under DeepSpeed ZeRO-3 on 2 ranks (CPU, gloo), through the real deepspeed launcher.

One launch of ``tests/workers/zero3_vscale.py`` runs the whole scenario (partitioning, gradient, optimizer step,
checkpoint round trip, refusal after initialize) and writes what each rank saw to JSON; the tests below assert on it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vscale_plugin.testing.distributed import run_worker_ranks

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).parent / "workers" / "zero3_vscale.py"
WORLD = 2
NUM_LAYERS = 2
NUM_KV_HEADS = 2
LR = 1e-2  # the worker's AdamW learning rate


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("zero3")
    # 600 s leaves room for a first run that JIT-compiles DeepSpeed's CPU ops; a cached run takes ~25 s.
    results = run_worker_ranks(WORKER, out, num_gpus=WORLD, timeout=600)
    return results


def _flat(values: list[list[float]]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).flatten()


def _grads(res: dict) -> torch.Tensor:
    grads = [res["theta_grads"][name] for name in res["theta_names"]]
    assert all(g is not None for g in grads), "safe_get_full_grad returned None for a theta"
    return _flat(grads)


def test_theta_is_a_partitioned_zero3_parameter(ranks: list[dict]) -> None:
    for res in ranks:
        assert len(res["theta_names"]) == NUM_LAYERS
        assert all(".self_attn.vscale.theta" in n for n in res["theta_names"])
        for info in res["theta_info_after_initialize"] + res["theta_info_after_step"]:
            assert info["has_ds_id"]
            assert info["ds_shape"] == [NUM_KV_HEADS]
            assert info["ds_numel"] == NUM_KV_HEADS
            # Each rank holds its share only; the full tensor exists just while gathered.
            assert info["local_numel"] == math.ceil(NUM_KV_HEADS / WORLD)
            assert info["data_numel"] == 0
            assert info["ds_status"].endswith("NOT_AVAILABLE")


def test_gathered_theta_starts_at_zero(ranks: list[dict]) -> None:
    for res in ranks:
        assert res["theta_initial"] == [[0.0] * NUM_KV_HEADS] * NUM_LAYERS


def test_theta_gradient_is_nonzero_finite_and_equal_on_ranks(ranks: list[dict]) -> None:
    grads = [_grads(res) for res in ranks]
    for g in grads:
        assert g.numel() == NUM_LAYERS * NUM_KV_HEADS
        assert torch.isfinite(g).all()
        assert (g != 0).all(), g
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=0, atol=0)


def test_zero3_matches_single_process_reference(ranks: list[dict]) -> None:
    res = ranks[0]
    ref = res["reference"]
    assert sorted(ref["theta_grads"]) == sorted(res["theta_names"])
    ref_grads = _flat([ref["theta_grads"][n] for n in res["theta_names"]])
    # Same batch on both ranks, so the data-parallel mean gradient is the single-process gradient.
    scale = ref_grads.abs().max().item()
    torch.testing.assert_close(_grads(res), ref_grads, rtol=1e-5, atol=1e-5 * scale)
    for r in ranks:
        assert abs(r["loss"] - ref["loss"]) <= 1e-6, (r["loss"], ref["loss"])
    # Without V-scale the same weights give a different loss: the match above is V-scale's, not a coincidence.
    assert abs(ref["loss_without_vscale"] - ref["loss"]) > 1e-5


def test_optimizer_step_moves_theta(ranks: list[dict]) -> None:
    for res in ranks:
        assert res["all_finite"]
        after = _flat(res["theta_after_step"])
        grad = _grads(res)
        assert (after != 0).all(), after
        # Adam's first step is -lr * g / (|g| + eps) whatever the clipping: a move of just under lr against the
        # gradient, so theta was updated by the optimizer with its own (full) gradient.
        torch.testing.assert_close(torch.sign(after), -torch.sign(grad))
        assert (after.abs() <= LR * (1 + 1e-6)).all(), after
        assert (after.abs() >= 0.9 * LR).all(), after
    assert ranks[0]["theta_after_step"] == ranks[1]["theta_after_step"]


def test_checkpoint_round_trip_restores_theta_and_loss(ranks: list[dict]) -> None:
    for res in ranks:
        assert res["theta_names_fresh"] == res["theta_names"]
        assert res["theta_saved"] == res["theta_after_step"]
        # The fresh model starts elsewhere (theta 0, other weights), so agreement below comes from the load.
        assert res["theta_fresh"] == [[0.0] * NUM_KV_HEADS] * NUM_LAYERS
        assert abs(res["eval_loss_fresh"] - res["eval_loss_before_save"]) > 1e-4
        assert res["load_path"], "load_checkpoint found no checkpoint"
        assert res["theta_loaded"] == res["theta_saved"]
        assert res["eval_loss_loaded"] == pytest.approx(res["eval_loss_before_save"], rel=1e-6, abs=1e-7)


def test_checkpoint_restores_optimizer_state(ranks: list[dict]) -> None:
    # One more identical step on the saved and the restored engine lands on the same theta only if Adam's moments
    # came back: fresh moments would move every theta by about lr again.
    for res in ranks:
        assert res["train_loss_step2_loaded"] == pytest.approx(res["train_loss_step2"], rel=1e-6)
        step2 = _flat(res["theta_step2"])
        torch.testing.assert_close(_flat(res["theta_step2_loaded"]), step2, rtol=1e-6, atol=1e-9)
        assert not torch.equal(step2, _flat(res["theta_saved"]))


def test_apply_vscale_refuses_an_initialized_engine(ranks: list[dict]) -> None:
    for res in ranks:
        for target in ("engine.module", "engine"):
            message = res["refusals"][target]
            assert message is not None, f"apply_vscale({target}) did not raise RuntimeError"
            assert "deepspeed.initialize" in message
        # The refusal left the model as it was: still one value hook per layer.
        assert res["value_hooks_per_layer"] == [1] * NUM_LAYERS
