"""V-scale under DeepSpeed Ulysses sequence parallelism (issue 15, item 3): with SP 2 on 2 CPU ranks (gloo) the
per-step losses, theta's gradient and theta itself equal a run without sequence parallelism on the same batches, under
ZeRO-1/2/3; V-scale's hook fires on each rank's sequence shard and gives the matching slice of the unsharded run's
values; what hooks, the attention module and the kernel inside Ulysses see; the residual stream's gradient on rank r
is that of global positions r*T/2 .. (r+1)*T/2-1. And the checks that refuse, before anything is built, what Ulysses
would refuse later or train on wrongly without an error."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vscale_plugin.hf.sequence_parallel import (
    MIN_DEEPSPEED,
    check_sequence_parallel,
    check_sequence_parallel_batch,
    sequence_parallel_size,
    zero3_averages_over_sequence_parallel,
)
from vscale_plugin.testing.distributed import run_worker_ranks
from vscale_plugin.testing.models import tiny_config, tiny_model

WORKER = Path(__file__).resolve().parent / "workers" / "sequence_parallel.py"
DS = "0.19.8"  # a version with Ulysses; the checks read the installed one unless told


def _config_only(model_type: str = "llama", attn: str | None = None, **overrides) -> SimpleNamespace:
    """A model as far as the checks read it (its config), for attention implementations this CPU cannot build."""
    config = tiny_config(model_type, **overrides)
    config._attn_implementation = attn
    return SimpleNamespace(config=config)


def test_a_tiny_llama_with_sdpa_passes_and_sp_size_1_checks_nothing():
    model = tiny_model("llama", attn_implementation="sdpa")
    check_sequence_parallel(model, 2, world_size=4, deepspeed_version=DS)
    check_sequence_parallel(model, 2, "sdpa", ds_config={"zero_optimization": {"stage": 3}}, deepspeed_version=DS)
    check_sequence_parallel(model, 4, deepspeed_version=DS)  # 2 KV heads repeated onto 4 ranks, as Ulysses does
    check_sequence_parallel(tiny_model("llama"), 1, deepspeed_version="0.1.0")  # eager, old DeepSpeed: no SP at all
    check_sequence_parallel(model, 2)  # the installed DeepSpeed
    with pytest.raises(ValueError, match="positive integer"):
        check_sequence_parallel(model, 0)
    assert sequence_parallel_size(model) == 1 and sequence_parallel_size(SimpleNamespace()) == 1


def test_eager_attention_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"attn_implementation 'eager' cannot run under Ulysses.*'sdpa'"):
        check_sequence_parallel(tiny_model("llama"), 2, deepspeed_version=DS)


def test_an_attention_implementation_other_than_the_models_is_refused():
    with pytest.raises(ValueError, match=r"built with attn_implementation='sdpa' but Ulysses would wrap 'flex_attent"):
        check_sequence_parallel(
            tiny_model("llama", attn_implementation="sdpa"), 2, "flex_attention", deepspeed_version=DS
        )


def test_heads_that_do_not_split_over_the_sp_ranks_are_refused():
    model = tiny_model("llama", attn_implementation="sdpa")  # 4 heads, 2 KV heads
    with pytest.raises(ValueError, match=r"4 attention heads cannot be split over 3 .* divides 4 \(2, 4\)"):
        check_sequence_parallel(model, 3, deepspeed_version=DS)
    six = _config_only("llama", "sdpa", num_attention_heads=6, num_key_value_heads=3, hidden_size=48)
    with pytest.raises(ValueError, match=r"3 KV heads neither split over 2 .* divides 3 or is a multiple of it"):
        check_sequence_parallel(six, 2, deepspeed_version=DS)
    check_sequence_parallel(six, 3, deepspeed_version=DS)
    check_sequence_parallel(six, 6, deepspeed_version=DS)  # 3 KV heads repeated twice


def test_sliding_windows_are_refused_under_sdpa_and_flex_but_not_flash_attention():
    mistral = tiny_model("mistral", attn_implementation="sdpa")  # every layer slides
    with pytest.raises(ValueError, match=r"layers \[0, 1\] use sliding_attention .*='flash_attention_2'"):
        check_sequence_parallel(mistral, 2, deepspeed_version=DS)
    qwen2 = tiny_model("qwen2", attn_implementation="sdpa")  # layer 1 slides (max_window_layers 1)
    with pytest.raises(ValueError, match=r"layers \[1\] use sliding_attention whose pattern 'sdpa'"):
        check_sequence_parallel(qwen2, 2, deepspeed_version=DS)
    check_sequence_parallel(tiny_model("qwen2", attn_implementation="sdpa", use_sliding_window=False), 2)
    with pytest.raises(ValueError, match="sliding_attention whose pattern 'flex_attention'"):
        check_sequence_parallel(_config_only("mistral", "flex_attention"), 2, deepspeed_version=DS)
    check_sequence_parallel(_config_only("mistral", "flash_attention_2"), 2, deepspeed_version=DS)


def test_recurrent_layers_are_refused():
    config = SimpleNamespace(
        model_type="hybrid",
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"],
        _attn_implementation="sdpa",
    )
    with pytest.raises(ValueError, match=r"layers \[0\] are recurrent"):
        check_sequence_parallel(SimpleNamespace(config=config), 2, deepspeed_version=DS)


def test_old_deepspeed_a_bad_world_size_and_several_problems_in_one_error():
    model = tiny_model("llama", attn_implementation="sdpa")
    with pytest.raises(
        ValueError, match=rf"DeepSpeed 0.16.9 is too old .* pip install -U 'deepspeed>={MIN_DEEPSPEED}'"
    ):
        check_sequence_parallel(model, 2, deepspeed_version="0.16.9")
    with pytest.raises(ValueError, match=r"3 ranks cannot be split into sequence-parallel groups of 2"):
        check_sequence_parallel(model, 2, world_size=3, deepspeed_version=DS)
    with pytest.raises(ValueError) as err:
        check_sequence_parallel(tiny_model("llama"), 3, deepspeed_version="0.17.1")
    message = str(err.value)
    assert message.startswith("Ulysses sequence parallelism (size 3) for LlamaForCausalLM: DeepSpeed 0.17.1 is too old")
    assert "'eager' cannot run" in message and "4 attention heads cannot be split over 3" in message


def test_zero3_without_reduce_scatter_is_refused_before_deepspeed_0_20_2():
    model = tiny_model("llama", attn_implementation="sdpa")
    config = {"zero_optimization": {"stage": 3, "reduce_scatter": False}}
    with pytest.raises(ValueError, match=r"ZeRO-3 with reduce_scatter false .* remove reduce_scatter: false"):
        check_sequence_parallel(model, 2, ds_config=config, deepspeed_version=DS)
    check_sequence_parallel(model, 2, ds_config=config, deepspeed_version="0.20.2")
    check_sequence_parallel(model, 2, ds_config={"zero_optimization": {"stage": 2, "reduce_scatter": False}})
    assert zero3_averages_over_sequence_parallel(3, DS) and not zero3_averages_over_sequence_parallel(3, "0.20.2")
    assert not zero3_averages_over_sequence_parallel(2, DS) and not zero3_averages_over_sequence_parallel(1, DS)


def test_batches_that_ulysses_would_train_on_wrongly_are_refused():
    ids = torch.ones(2, 16, dtype=torch.long)
    positions = torch.arange(16).expand(2, -1)
    check_sequence_parallel_batch({"input_ids": ids, "position_ids": positions, "attention_mask": ids}, 2)
    with pytest.raises(ValueError, match=r"no position_ids: .* add position_ids = torch.arange\(seq_len\)"):
        check_sequence_parallel_batch({"input_ids": ids}, 2)
    padded = torch.ones_like(ids)
    padded[0, :4] = 0
    with pytest.raises(ValueError, match=r"attention_mask pads tokens, but Ulysses drops the mask"):
        check_sequence_parallel_batch({"input_ids": ids, "position_ids": positions, "attention_mask": padded}, 2)
    with pytest.raises(ValueError, match=r"sequence length 16 is not divisible by the sequence parallel size 3"):
        check_sequence_parallel_batch({"input_ids": ids, "position_ids": positions}, 3)
    with pytest.raises(ValueError, match=r"position_ids have shape \(2, 8\) but input_ids \(2, 16\)"):
        check_sequence_parallel_batch({"input_ids": ids, "position_ids": positions[:, :8]}, 2)


def _batch(index: int) -> torch.Tensor:  # the worker's batches
    return torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(10 + index))


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_ulysses_sp_2_ranks_train_like_one_without_sequence_parallelism(tmp_path, stage):
    ranks = run_worker_ranks(WORKER, tmp_path, num_gpus=2, env={"VSP_ZERO_STAGE": str(stage)})
    for rank, result in enumerate(ranks):
        plain, sp = result["plain"], result["sp"]
        shard = slice(rank * 8, (rank + 1) * 8)
        assert (plain["sequence_parallel_size"], sp["sequence_parallel_size"], sp["seq_dp_world_size"]) == (1, 2, 2)
        assert (plain["read_sp_size"], sp["read_sp_size"]) == ([1, 1], [2, 2])  # engine and bare model
        # DeepSpeed's data loader adapter: rank 0's batch first, then rank 1's, each cut into the ranks' shards
        for step, micro in enumerate(sp["micro_batches"]):
            assert micro["input_ids"] == _batch(step % 2)[:, shard].tolist(), step
            assert micro["position_ids"] == [list(range(rank * 8, rank * 8 + 8))] * 2
            assert [row[-1] == -100 for row in micro["shift_labels"]] == [rank == 1] * 2  # the last token's
        assert sp["losses"] == pytest.approx(plain["losses"], rel=1e-5)
        assert plain["losses"][-1] < plain["losses"][0]
        for got, want in zip(sp["theta_grad"], plain["theta_grad"], strict=True):
            assert got == pytest.approx(want, rel=1e-4, abs=1e-9)
        for got, want in zip(sp["theta"], plain["theta"], strict=True):
            assert got == pytest.approx(want, rel=1e-5)

        seen, whole = sp["seen"], plain["seen"]
        # V-scale's hook on v_proj fires once per layer, on this rank's 8 positions, and gives the unsharded values
        assert seen["vscale_calls"] == whole["vscale_calls"] == 2
        assert (seen["vscale_input"], whole["vscale_input"]) == ([2, 8, 16], [2, 16, 16])
        v_whole = torch.tensor(whole["v_scaled"])
        torch.testing.assert_close(torch.tensor(seen["v_scaled"]), v_whole[:, shard], rtol=1e-5, atol=1e-6)
        # everything outside the kernel works on the shard: projections, attention module, decoder layer
        assert seen["q_proj"] == {"input": [2, 8, 32], "output": [2, 8, 32]}
        assert seen["k_proj"] == seen["v_proj"] == {"input": [2, 8, 32], "output": [2, 8, 16]}
        assert seen["layer"] == {"input": [2, 8, 32], "output": [2, 8, 32]}
        attention = seen["attention"]
        assert attention["hidden_states"] == [2, 8, 32] and attention["attention_mask"] is None
        assert attention["position_ids"] == [list(range(rank * 8, rank * 8 + 8))] * 2  # global positions
        assert attention["position_embeddings"] == [[2, 8, 8], [2, 8, 8]]  # RoPE cos/sin of the shard
        # the kernel inside the all-to-alls: the whole sequence, half the heads (2 of 4 query, 1 of 2 KV), no mask
        assert seen["kernel"] == {
            "query": [2, 2, 16, 8],
            "key": [2, 1, 16, 8],
            "value": [2, 1, 16, 8],
            "attention_mask": None,
            "position_ids": [list(range(16))] * 2,
        }
        # The residual stream's gradient on rank r is the unsharded run's at global positions 8r .. 8r+7 (ZeRO-3
        # before DeepSpeed 0.20.2 averages parameter gradients over the SP group, so the loss doubles each share).
        scale = 2.0 if stage == 3 else 1.0
        residual = torch.tensor(seen["residual_grad"])
        torch.testing.assert_close(
            residual, scale * torch.tensor(whole["residual_grad"])[:, shard], rtol=1e-4, atol=1e-8
        )
        # what check_sequence_parallel_batch refuses trains wrongly without an error: positions numbered from 0 on
        # every shard (right on rank 0 only), a padding mask ignored
        unchecked = sp["unchecked"]
        if rank == 0:
            assert unchecked["no_position_ids"] == 0.0
        else:
            assert unchecked["no_position_ids"] > 1e-5
        assert unchecked["padding_mask"] == 0.0
