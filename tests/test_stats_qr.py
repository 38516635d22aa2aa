"""Quantisation readiness (``qr/``, SPEC section 4) in the StatsCollector: every key against the independent float64
reference of ``tests/stats_reference.py`` for every architecture, over padded micro-batches of gradient accumulation;
the formulas' ranges on known tensors; a planted massive activation; the switch; no double count under activation
checkpointing.

The reference recomputes each layer by hand and reads the tensors it traced (h_out, h̃, the attention output before
o_proj, h̃_half, and the down projection's input through its own hook on a float64 copy of the MLP). Llama stays in the
fast suite; the other architectures are marked ``slow`` as in ``tests/test_stats_reference.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

import vscale_plugin as vsp
from tests import stats_reference as sr
from tests.test_stats_reference import _model, _padded
from vscale_plugin.stats import quant_readiness as qr
from vscale_plugin.stats.collector import StatsCollector, causal_lm_labels
from vscale_plugin.testing.models import tiny_model

RTOL = 1e-5  # float32 against float64: the largest error seen is ~1e-6
# Two micro-batches of one step: left-padded rows of three lengths, then right-padded rows of two others.
MICRO_BATCHES = (("left", (48, 40, 33), 1), ("right", (36, 45), 2))


def _qr(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith("qr/")}


def _micro_batches():
    batches = [_padded(side, lengths, seed) for side, lengths, seed in MICRO_BATCHES]
    for ids, _ in batches:
        ids[ids == 0] = 1  # token 0 is the pad id, whose embedding row is zero (a gradient ratio there is 0 / 0)
    return batches


def _accumulated(model, batches, **collector_kwargs) -> dict[str, float]:
    model.zero_grad(set_to_none=True)
    collector = StatsCollector(model, every=1, distributed=False, **collector_kwargs)
    with collector.capture(0):
        for ids, mask in batches:
            loss = model(input_ids=ids, attention_mask=mask, labels=causal_lm_labels(ids, mask)).loss
            (loss / len(batches)).backward()  # gradient accumulation's 1/2
    return collector.result()


def _assert_close(got: dict[str, float], expected: dict[str, float], rtol: float = RTOL) -> None:
    assert set(got) == set(expected), (
        f"missing: {sorted(set(expected) - set(got))}, extra: {sorted(set(got) - set(expected))}"
    )
    bad = [f"{k}: {got[k]!r} vs {v!r}" for k, v in sorted(expected.items()) if not (math.isfinite(got[k]) and
           abs(got[k] - v) <= rtol * abs(v))]  # fmt: skip
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "model_type", [pytest.param(t, marks=() if t == "llama" else (pytest.mark.slow,)) for t in sorted(sr.ARCHS)]
)
def test_every_qr_key_matches_the_reference_over_padded_accumulated_micro_batches(model_type):
    model = _model(model_type, 2, "learned", layers=2)
    batches = _micro_batches()
    calls = [sr.quant_readiness_terms(sr.run_reference(model, ids, mask)) for ids, mask in batches]
    expected = sr.combine_quant_readiness(calls)
    assert set(expected) == {k for k in sr.expected_keys(2, 2, "learned", model_type) if k.startswith("qr/")}
    _assert_close(_qr(_accumulated(model, batches)), expected)
    # one micro-batch alone is exactly the formula on its tensor
    _assert_close(_qr(vsp.measure(model, *batches[0])), sr.combine_quant_readiness(calls[:1]))
    # the combination rule is visible: kurtosis weighs tokens, the whole-tensor statistics weigh calls
    key = "qr/int8_error/o_proj/L01"
    assert expected[key] == pytest.approx((calls[0][key][0] + calls[1][key][0]) / 2, rel=1e-12)


def test_moe_blocks_and_an_ungated_mlp_report_only_the_keys_whose_input_exists():
    keys = {name: set(_qr(vsp.measure(tiny_model(name), torch.randint(3, 128, (2, 24))))) for name in
            ("llama", "mixtral", "qwen2_moe", "starcoder2", "glm")}  # fmt: skip
    mlp_keys = {f"qr/int8_error/{linear}/L00" for linear in ("gate_proj", "up_proj", "down_proj")}
    down_in = {f"qr/{stat}/down_proj_in/L00" for stat in ("kurtosis", "max_over_median")}
    assert mlp_keys | down_in <= keys["llama"] and keys["glm"] == keys["llama"]  # a fused gate_up_proj gives both
    for moe in ("mixtral", "qwen2_moe"):  # no single down projection: no MLP key, not a plausible wrong one
        assert not (mlp_keys | down_in) & keys[moe] and "qr/int8_error/v_proj/L00" in keys[moe]
    assert keys["starcoder2"] == {k for k in keys["llama"] if "/gate_proj/" not in k}  # c_fc: an up projection


def test_formulas_on_known_tensors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 512, generator=g)
    total, tokens = qr.kurtosis_sum(x).tolist()
    assert tokens == 2048 and total / tokens == pytest.approx(3.0, abs=0.05)  # Gaussian features: kurtosis 3
    constant = torch.cat([x, torch.full((3, 512), 0.5)])  # tokens without variance have no kurtosis: left out
    assert qr.kurtosis_sum(constant).tolist() == pytest.approx([total, tokens], rel=1e-6)
    ratio, calls = qr.max_over_median(x).tolist()
    assert calls == 1 and 5 < ratio < 10  # max |x| ~ 4.9 sigma of 1M draws, median |x| = 0.674 sigma
    error, calls = qr.int8_error(x).tolist()
    assert calls == 1 and 0.005 < error < 0.02  # rounding noise s / sqrt(12), s = max / 127, against sigma
    spiked = x.clone()
    spiked[:, 7] *= 50.0  # one massive channel
    assert qr.kurtosis_sum(spiked)[0] / 2048 > 100
    assert qr.max_over_median(spiked)[0] > 10 * ratio and qr.int8_error(spiked)[0] > 10 * error
    # degenerate tensors give no NaN: a zero tensor quantises without error and has no kurtosis and no ratio
    zero = torch.zeros(4, 8)
    assert qr.kurtosis_sum(zero).tolist() == [0.0, 0.0]
    assert qr.max_over_median(zero).tolist() == [0.0, 0.0]
    assert qr.int8_error(zero).tolist() == [0.0, 1.0]
    # bf16 activations are measured in float32
    low = qr.real_tokens(x.to(torch.bfloat16)[None], None)
    assert low.dtype == torch.float32 and qr.int8_error(low)[0] == pytest.approx(error, rel=0.05)


def _planted(channel: int, intermediate: int):
    model = tiny_model("llama", num_hidden_layers=2)
    with torch.no_grad():
        mlp = model.model.layers[0].mlp
        mlp.down_proj.weight[channel] *= 100.0  # a massive hidden channel of layer 0's output, kept by the residual
        mlp.up_proj.weight[intermediate] *= 100.0  # and one of its MLP's intermediate activation
    return model


def test_a_planted_massive_activation_raises_kurtosis_max_over_median_and_int8_error():
    ids = torch.randint(3, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    base = _qr(vsp.measure(tiny_model("llama", num_hidden_layers=2), ids))
    planted = _qr(vsp.measure(_planted(5, 11), ids))
    raised = {
        "qr/kurtosis/h_out/L00": 5,
        "qr/max_over_median/h_out/L00": 50,
        "qr/kurtosis/h_out/L01": 5,
        "qr/kurtosis/down_proj_in/L00": 5,
        "qr/max_over_median/down_proj_in/L00": 20,
        "qr/int8_error/down_proj/L00": 3,
        "qr/int8_error/q_proj/L01": 1.5,
        "qr/int8_error/gate_proj/L01": 1.5,
    }
    for key, factor in raised.items():  # the residual carries the channel into layer 1's normalised inputs
        assert planted[key] > factor * base[key], (key, base[key], planted[key])
    assert planted["qr/kurtosis/h_out/max"] == max(planted["qr/kurtosis/h_out/L00"], planted["qr/kurtosis/h_out/L01"])
    assert 2 < base["qr/kurtosis/h_out/L00"] < 5 and all(0 < v < 0.05 for k, v in base.items() if "int8" in k)


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_quant_readiness_off_leaves_out_its_keys_and_hooks_and_nothing_else():
    model = _model("llama", 2, "learned", layers=2)
    batches = _micro_batches()
    on = _accumulated(model, batches)
    off = _accumulated(model, batches, quant_readiness=False)
    assert not _qr(off) and len(_qr(on)) == 2 * 11 + 11
    assert off == {k: v for k, v in on.items() if not k.startswith("qr/")}
    before, counts = _hooks(model), {}
    for enabled in (True, False):
        collector = StatsCollector(model, every=2, quant_readiness=enabled)
        with collector.capture(0):
            counts[enabled] = _hooks(model)
        with collector.capture(1):  # not due: no hook of any kind
            assert _hooks(model) == before
    assert counts[True] - counts[False] == 2 * 5  # h_out, q_proj, o_proj, gate_proj, down_proj per layer


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_does_not_count_recomputed_forwards_twice(reentrant):
    model = _model("llama", 2, "learned", layers=2).train()
    batches = _micro_batches()
    expected = _qr(_accumulated(model, batches))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    _assert_close(_qr(_accumulated(model, batches)), expected, rtol=1e-6)


def test_bf16_model_statistics_are_finite_and_close_to_float32():
    ids = torch.randint(3, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    model = tiny_model("llama", num_hidden_layers=2)
    expected = _qr(vsp.measure(model, ids))
    got = _qr(vsp.measure(model.to(torch.bfloat16), ids))
    assert set(got) == set(expected) and all(math.isfinite(v) for v in got.values())
    for key in ("qr/kurtosis/h_out/L01", "qr/kurtosis/down_proj_in/L00", "qr/max_over_median/h_out/L00"):
        assert got[key] == pytest.approx(expected[key], rel=0.1), key
