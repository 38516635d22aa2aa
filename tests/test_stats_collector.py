"""StatsCollector behaviour in one process: idle cost, micro-batch combination, kernels, checkpointing, sinks."""

import functools
import math
import warnings

import pytest
import torch
import torch.utils.checkpoint

import vscale_plugin as vsp
from vscale_plugin.stats import sinks
from vscale_plugin.stats.collector import StatsCollector
from vscale_plugin.stats.positions import Rows
from vscale_plugin.testing.models import tiny_model


def _ids(batch=4, t=48, seed=0):
    return torch.randint(3, 128, (batch, t), generator=torch.Generator().manual_seed(seed))


def _model(attn="eager", vscale="learned", **overrides):
    model = tiny_model("llama", attn_implementation=attn, **overrides)
    if vscale != "off":
        vsp.apply_vscale(model, mode=vscale)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "vscale" in name:
                    p.copy_(torch.linspace(-1, 1, p.numel()))
    return model


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _assert_same(actual, expected, rel=1e-5, abs_=1e-9):
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=rel, abs=abs_), key


def test_idle_collector_installs_nothing_and_returns_empty():
    model = _model()
    collector = StatsCollector(model, every=10)
    before = _hook_count(model)
    with collector.capture(3):
        assert _hook_count(model) == before
        model(input_ids=_ids(), labels=_ids()).loss.backward()
    assert collector.result() == {}
    assert _hook_count(model) == before


def test_capture_removes_its_hooks_afterwards():
    model = _model()
    before = _hook_count(model)
    collector = StatsCollector(model, every=5)
    with collector.capture(10):
        assert _hook_count(model) > before
        model(input_ids=_ids(), labels=_ids()).loss.backward()
    assert _hook_count(model) == before
    assert collector.result()["gs/ratio/L00"] > 0


# Whole-tensor statistics of one forward call (SPEC 4, qr/): a step's value is their mean over its micro-batches.
PER_CALL = ("qr/max_over_median/", "qr/int8_error/")


def test_two_scaled_micro_batches_equal_one_full_batch():
    ids = _ids()
    full = vsp.measure(_model(), ids)
    halves = [ids[:2], ids[2:]]
    model = _model()
    collector = StatsCollector(model, every=1)
    with collector.capture(0):
        for half in halves:
            (model(input_ids=half, labels=half).loss / 2).backward()  # gradient accumulation's 1/2
    got = collector.result()
    assert set(got) == set(full)
    exact = {k for k in full if not k.startswith(PER_CALL)}  # qr/kurtosis too: per token, exact over the step
    _assert_same({k: got[k] for k in exact}, {k: full[k] for k in exact})
    per_call = {k for k in full if k.startswith(PER_CALL) and not k.endswith("/max")}
    alone = [vsp.measure(_model(), half) for half in halves]
    _assert_same({k: got[k] for k in per_call}, {k: (alone[0][k] + alone[1][k]) / 2 for k in per_call})


def test_sdpa_and_eager_give_the_same_statistics():
    ids = _ids()
    _assert_same(vsp.measure(_model("sdpa"), ids), vsp.measure(_model("eager"), ids), rel=1e-4, abs_=1e-7)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_does_not_count_recomputed_forwards(reentrant):
    ids = _ids()
    expected = vsp.measure(_model().train(), ids)
    model = _model().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    _assert_same(vsp.measure(model, ids), expected, rel=1e-5, abs_=1e-8)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_around_the_layer_call_and_its_hooks_counts_each_gradient_once(reentrant):
    """Some transformers releases (5.17) checkpoint a decoder layer's ``__call__``, not its ``forward``: the layer's
    own hooks then run again in the recomputation, on the very input tensor of the first forward."""
    ids = _ids()
    expected = vsp.measure(_model().train(), ids)
    model = _model().train()
    for layer in model.model.layers:

        class CallCheckpointed(type(layer)):
            def __call__(self, *args, **kwargs):
                kwargs.update(use_cache=False, cache=None, past_key_values=None)  # as transformers does here
                call = functools.partial(super().__call__, **kwargs)
                return torch.utils.checkpoint.checkpoint(call, *args, use_reentrant=reentrant)

        layer.__class__ = CallCheckpointed
    _assert_same(vsp.measure(model, ids), expected, rel=1e-5, abs_=1e-8)


def test_measure_leaves_existing_gradients_alone():
    model = _model()
    model(input_ids=_ids(seed=5), labels=_ids(seed=5)).loss.backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    vsp.measure(model, _ids())
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())
    fresh = _model()
    vsp.measure(fresh, _ids())
    assert all(p.grad is None for p in fresh.parameters())


def test_baseline_has_no_vscale_keys_and_vscaled_has_lambda_per_kv_head():
    base = vsp.measure(_model(vscale="off"), _ids())
    assert not [k for k in base if k.startswith(("vscale/", "grad/vscale"))]
    scaled = vsp.measure(_model(), _ids())
    assert scaled["vscale/lambda/L00/H1"] == pytest.approx(torch.tensor(1.0).exp().item(), rel=1e-6)
    assert 0 < scaled["vscale/phi/tok0/L00"] < 1 and 0 < scaled["vscale/phi/rest/L00"] < 1
    assert "grad/vscale/L01" in scaled


def test_non_finite_values_are_reported_and_warned_once_without_crashing():
    model = _model()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    collector = StatsCollector(model, every=1)
    with pytest.warns(RuntimeWarning, match="non-finite") as record:
        for step in range(2):
            with collector.capture(step):
                model(input_ids=_ids(), labels=_ids()).loss.backward()
    assert len([w for w in record if "non-finite" in str(w.message)]) == 1
    assert collector.result()["ma/mlp_out/tok0/L01"] != collector.result()["ma/mlp_out/tok0/L01"]  # NaN


def _full_attention_column(q, k, scale, mask, window=None, softcap=None):
    """The attention column of each row's first real token, from the full float64 softmax (T x T)."""
    _, h, t, _ = q.shape
    k = k.repeat_interleave(h // k.shape[1], dim=1)
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    pos = torch.arange(t)
    visible = pos[None, :] <= pos[:, None]
    if window is not None:
        visible &= pos[:, None] - pos[None, :] < window
    real = mask.bool()
    attn = scores.masked_fill(~(visible[None, None] & real[:, None, None, :]), float("-inf")).softmax(-1)
    first = real.long().argmax(1)
    column = attn[torch.arange(q.shape[0]), :, :, first]  # (b, H, T): a_{t, first real token}
    return torch.nan_to_num(column, nan=0.0) * real[:, None, :]


def _padded_mask():
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, :6] = 0  # left padding
    mask[2, 31:] = 0  # right padding
    return mask


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (7, None), (None, 1.5)])
def test_chunked_sink_column_matches_the_full_softmax(monkeypatch, kv_heads, window, softcap):
    monkeypatch.setattr(sinks, "_CHUNK_ELEMENTS", 4 * 4 * 40 * 3)  # force several query chunks
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 40, 8, generator=g) * 2
    k = torch.randn(3, kv_heads, 40, 8, generator=g) * 2
    mask = _padded_mask()
    rows = Rows.of(mask, 3, 40, torch.device("cpu"))
    column = sinks.sink_column(q, k, 0.3, rows, sliding_window=window, softcap=softcap)
    expected = _full_attention_column(q, k, 0.3, mask, window, softcap)
    torch.testing.assert_close(column.double(), expected, rtol=1e-5, atol=1e-7)
    assert column[1, :, 6].min() > 0  # the left-padded row's first real token attends to itself alone: a = 1
    torch.testing.assert_close(column[1, :, 6], torch.ones(4))


def test_sink_sums_follow_the_definitions():
    column = torch.zeros(2, 2, 70)
    column[0, 0, :] = 0.5  # alpha = 0.5 > 0.3: a sink
    column[1, 1, :64] = 0.2  # alpha = 0.2: not a sink
    s = sinks.sink_sums(column, Rows.unpadded(2, 70, torch.device("cpu")))
    assert s.tolist() == pytest.approx([1.0, 0.5 * 70 + 0.2 * 64, 0.25 * 70 + 0.04 * 64, 4.0])


def test_sink_sums_count_each_row_from_its_first_real_token_over_its_own_length():
    mask = torch.ones(3, 70, dtype=torch.long)
    mask[0, :30] = 0  # 40 real tokens from position 30: its window is those 40
    mask[2, :] = 0  # no real token at all: counts for nothing
    rows = Rows.of(mask, 3, 70, torch.device("cpu"))
    column = torch.zeros(3, 1, 70)
    column[0, 0, 30:] = 0.35  # alpha = 0.35 over its own 40 queries: a sink
    column[1, 0, :64] = 0.25  # alpha = 0.25: not a sink
    s = sinks.sink_sums(column, rows)
    assert s.tolist() == pytest.approx([1.0, 0.35 * 40 + 0.25 * 64, 0.35**2 * 40 + 0.25**2 * 64, 2.0])


def test_rows_align_left_and_right_padding_and_refuse_holes():
    mask = _padded_mask()
    rows = Rows.of(mask, 3, 40, torch.device("cpu"))
    assert rows.start.tolist() == [0, 6, 0] and rows.length.tolist() == [40, 34, 31]
    x = torch.arange(3 * 40, dtype=torch.float64).view(3, 40, 1)
    aligned = rows.align(x, 36)
    assert aligned[1, :34, 0].tolist() == x[1, 6:, 0].tolist() and aligned[1, 34:].abs().sum() == 0
    assert aligned[2, :31, 0].tolist() == x[2, :31, 0].tolist() and aligned[2, 31:].abs().sum() == 0
    assert rows.counts(36).tolist() == [3.0] * 31 + [2.0] * 3 + [1.0] * 2
    assert not Rows.of(torch.ones(3, 40), 3, 40, torch.device("cpu")).padded
    mask[0, 10] = 0
    with pytest.raises(ValueError, match="row 0 has padding between real tokens"):
        Rows.of(mask, 3, 40, torch.device("cpu"))


def test_statistics_run_without_building_a_t_by_t_tensor(monkeypatch):
    # Any float32 tensor of batch x heads x T x T elements would exceed this cap; the chunked path never does.
    seen = []
    original = torch.matmul

    def spy(a, b, *args, **kwargs):
        out = original(a, b, *args, **kwargs)
        seen.append(out.numel())
        return out

    model = _model(attn="sdpa", vscale="off")
    t = 256
    monkeypatch.setattr(sinks, "_CHUNK_ELEMENTS", 2 * 4 * t * 16)
    monkeypatch.setattr(torch, "matmul", spy)
    result = vsp.measure(model, _ids(batch=2, t=t))
    assert seen and max(seen) <= 2 * 4 * 16 * t
    assert 0 <= result["as/sink_rate/L00"] <= 1


def test_bf16_autocast_statistics_are_finite_and_close_to_float32():
    ids = _ids()
    expected = vsp.measure(_model(attn="sdpa"), ids)
    model = _model(attn="sdpa")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = vsp.measure(model, ids)
    assert set(got) == set(expected)
    assert all(v == v and abs(v) != float("inf") for v in got.values())
    for key in ("ma/h_out/tok0/L01", "ma/v/rest/L00", "as/mass/L00", "gs/grad_in/rest/L00", "vscale/phi/tok0/L00"):
        assert got[key] == pytest.approx(expected[key], rel=0.05), key


@pytest.mark.parametrize("t", [3, 5, 12, 20])
def test_short_sequences_are_measured_over_the_positions_they_have(t):
    # Below 16 (and 64) tokens the profiles are shorter, not padded with zeros: "rest" is the mean over tokens
    # 1..t-1 of the forward norms, and over 1..t-2 of the gradients (the last token predicts nothing, so nothing
    # flows back to it). Checked against HF's own hidden states and a hand hook on the input norm's output.
    model = _model()
    ids = _ids(batch=3, t=t)
    kept = {}

    def keep(module, args, output):
        output.retain_grad()
        kept["h_tilde"] = output

    handle = model.model.layers[1].input_layernorm.register_forward_hook(keep)
    out = model(input_ids=ids, labels=ids, output_hidden_states=True)
    out.loss.backward()
    handle.remove()
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing non-finite to warn about
        got = vsp.measure(model, ids)
    h_in = out.hidden_states[1].detach().norm(dim=-1).mean(0)  # layer 1's input, per position
    assert got["ma/h_in/tok0/L01"] == pytest.approx(h_in[0].item(), rel=1e-5)
    assert got["ma/h_in/rest/L01"] == pytest.approx(h_in[1 : min(t, 16)].mean().item(), rel=1e-5)
    g = kept["h_tilde"].grad.sum(0).norm(dim=-1)
    assert g[t - 1] == 0
    assert got["gs/grad_in/rest/L01"] == pytest.approx(g[1 : min(t - 1, 16)].mean().item(), rel=1e-5)
    assert got["gs/ratio/L01"] == pytest.approx((g[0] / g[1 : min(t - 1, 32)].mean()).item(), rel=1e-5)
    assert set(got) == set(vsp.measure(model, _ids(batch=3, t=48)))


def test_two_token_sequences_leave_out_what_they_cannot_define():
    got = vsp.measure(_model(), _ids(batch=2, t=2))
    assert "gs/grad_in/tok0/L00" in got and "ma/h_in/rest/L00" in got
    assert "gs/ratio/L00" not in got and "gs/grad_in/rest/L00" not in got  # only token 0 has a gradient
    assert all(math.isfinite(v) for v in got.values())


def test_measure_takes_one_sequence_any_integer_ids_and_any_grad_mode():
    model = _model()
    ids = _ids(batch=1, t=24)
    expected = vsp.measure(model, ids)
    assert vsp.measure(model, ids[0]) == expected
    assert vsp.measure(model, ids.int()) == expected
    with torch.no_grad():
        assert vsp.measure(model, ids) == expected
    with torch.inference_mode():
        assert vsp.measure(model, ids) == expected
    assert all(p.grad is None for p in model.parameters())


def test_measure_refuses_what_are_not_token_ids_naming_the_fix():
    model = _model()
    with pytest.raises(TypeError, match=r"integer token ids, got torch\.float32; tokenise"):
        vsp.measure(model, torch.rand(2, 20))
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4\); give \(batch, seq_len\)"):
        vsp.measure(model, torch.zeros(2, 3, 4, dtype=torch.long))
