"""``vsp.measure`` (SPEC sections 2-4) against the independent float64 reference of ``tests/stats_reference.py``.

The reference keeps the full attention matrix and every intermediate of each layer with ``retain_grad()``; its own
exact identities (path split, token-0 query path, value gradient = A^T G, V-scale Jacobian, theta gradient) are checked
first, and its logits and loss against the Hugging Face model, for every architecture it models, so that it provably
models the same network; on padded batches each row's logits against the model run on that row alone, and its loss
and every parameter gradient against the model's own masked loss on a right-padded batch. Then every key of
``measure`` is compared with it: on tiny models of every architecture, V-scale off / fixed / learned, random weights
and planted attention sinks, eager and sdpa, and on left- and right-padded batches.

Norm gains and biases are perturbed away from their initial 1 / 0, so that a statistic reading the wrong norm, or
dropping a bias, is visibly wrong. The per-architecture matrix is marked ``slow``; Llama (and one padded case) stays
in the fast suite.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import vscale_plugin as vsp
from tests import stats_reference as sr
from vscale_plugin.testing.models import SLIDING_WINDOW, randomise_theta, tiny_model

torch.backends.cuda.matmul.allow_tf32 = False

RTOL = 1e-3
BATCH = 3
SEQ = 48  # > T_E = 31, so R_GS and positions 1..15 are meaningful
SINK_SEQ = 80  # > T_eps = 64: the sink score's window and the column mass' full sum differ
VOCAB = 128
# real tokens per row of the padded batches: all > T_E, the longest > T_eps, two of one length (one run)
PAD_LENGTHS = (80, 41, 63, 57, 63)

ARCHITECTURES = (
    "llama",
    "mistral",
    "ministral",
    "mixtral",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "gemma",
    "gemma2",
    "granite",
    "glm",
    "glm4",
    "starcoder2",
    "smollm3",
    "helium",
)
# one per family of differences: MoE + global window, biases + per-layer window, NoPE, soft-capping + sandwich,
# interleaved partial RoPE + sandwich
PADDED_ARCHITECTURES = ("llama", "mixtral", "qwen2", "smollm3", "gemma2", "glm4")
NO_SDPA = {"gemma2"}  # transformers: "sdpa does not support softcapping"

# query heads whose attention is planted onto token 0, per layer (query heads 0..3); smollm3's layer 1 is NoPE
SINK_HEADS = ([0, 2], [1], [0, 1, 3])

slow = pytest.mark.slow


def _ids(batch=BATCH, t=SEQ, seed=1, bos=False):
    g = torch.Generator().manual_seed(seed)
    if not bos:
        return torch.randint(0, VOCAB, (batch, t), generator=g)
    ids = torch.randint(1, VOCAB, (batch, t), generator=g)
    ids[:, 0] = 0  # a fixed BOS-like first token, never seen again in the sequence
    return ids


def _padded(side: str, lengths=PAD_LENGTHS, seed=5):
    """Sequences of ``lengths`` real tokens, each starting with the sink token 0, batched with padding on ``side``;
    the same sequences whichever the side. Pads carry random tokens: they must enter nothing."""
    t = max(lengths)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), t), generator=g)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for j, n in enumerate(lengths):
        row = torch.randint(1, VOCAB, (n,), generator=g)
        row[0] = 0
        start = t - n if side == "left" else 0
        ids[j, start : start + n] = row
        mask[j, start : start + n] = 1
    return ids, mask


def _perturb_norms_and_biases(model, seed=3):
    """Norm gains (init 1, or 0 for Gemma's 1 + w) and biases (init 0) moved off their initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                p.add_(torch.empty(p.shape).uniform_(-0.3, 0.3, generator=g))
            elif name.endswith(".bias"):
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def _model(model_type="llama", kv_heads=2, mode="learned", sinks=False, layers=2, attn="eager"):
    overrides = {}
    if sinks and model_type == "gemma2":
        overrides["sliding_window"] = SLIDING_WINDOW  # its tiny window of 16 would cap alpha at 16/64 < 0.3
    model = tiny_model(
        model_type, attn_implementation=attn, num_key_value_heads=kv_heads, num_hidden_layers=layers, **overrides
    )
    _perturb_norms_and_biases(model)
    if sinks:
        sr.plant_sinks(model, SINK_HEADS)
    if mode != "off":
        vsp.apply_vscale(model, mode=mode)
        if mode == "learned":
            randomise_theta(model)
    return model


def _case_ids(sinks):
    return _ids(t=SINK_SEQ, bos=True) if sinks else _ids()


def _atol(key: str, ref: dict[str, float]) -> float:
    """Absolute floor: the token-0 query path is exactly zero, so it gets one relative to its layer's g(h̃_0)."""
    parts = key.split("/")
    if parts[:3] == ["gs", "q", "tok0"]:
        return 1e-4 * ref[f"gs/grad_in/tok0/{parts[3]}"] + 1e-12
    return 1e-12


def _assert_matches_reference(got: dict[str, float], ref: dict[str, float]):
    assert set(got) == set(ref), (
        f"missing from measure: {sorted(set(ref) - set(got))}; not in SPEC/reference: {sorted(set(got) - set(ref))}"
    )
    bad = []
    for key in sorted(ref):
        e, a = ref[key], float(got[key])
        if not (math.isfinite(a) and abs(a - e) <= RTOL * abs(e) + _atol(key, ref)):
            bad.append(f"{key}: measure={a!r} reference={e!r} rel={abs(a - e) / max(abs(e), 1e-300):.3g}")
    assert not bad, f"{len(bad)} of {len(ref)} keys disagree:\n" + "\n".join(bad)


def _params(model_type, kinds):
    """``kinds``: tuples of pytest params; Llama's stay in the fast suite, the rest are slow."""
    marks = () if model_type == "llama" else (slow,)
    return [pytest.param(model_type, *k, marks=marks, id="-".join([model_type, *map(str, k)])) for k in kinds]


CASES = [
    pytest.param(
        model_type,
        kv,
        mode,
        sinks,
        id=f"{model_type}-kv{kv}-{mode}-{'sinks' if sinks else 'random'}",
        marks=() if model_type == "llama" else (slow,),
    )
    for sinks in (False, True)
    for model_type in ("llama", "mistral")
    for kv in (2, 1)
    for mode in ("off", "fixed", "learned")
]

# every architecture, V-scale off / learned, random / planted sinks (Llama's GQA/MQA and fixed mode are in CASES)
ARCH_CASES = [
    pytest.param(t, mode, sinks, id=f"{t}-{mode}-{'sinks' if sinks else 'random'}", marks=(slow,))
    for t in ARCHITECTURES
    if t != "llama"
    for mode in ("off", "learned")
    for sinks in (False, True)
]

MEASURE_ARCH_CASES = [
    pytest.param(t, mode, sinks, attn, id=f"{t}-{mode}-{'sinks' if sinks else 'random'}-{attn}", marks=(slow,))
    for t in ARCHITECTURES
    for attn in ("eager", "sdpa")
    if not (attn == "sdpa" and t in NO_SDPA)
    for mode in ("off", "learned")
    for sinks in (False, True)
]

PADDED_CASES = [
    pytest.param(
        t,
        side,
        attn,
        id=f"{t}-{side}-{attn}",
        marks=() if (t, side, attn) == ("llama", "left", "eager") else (slow,),
    )
    for t in PADDED_ARCHITECTURES
    for side in ("left", "right")
    for attn in ("eager", "sdpa")
    if not (attn == "sdpa" and t in NO_SDPA)
]


def _build(model_type, kv, mode, sinks):
    return _model(model_type, kv, mode, sinks=sinks, layers=3 if sinks else 2), _case_ids(sinks)


# ---------------------------------------------------------------------------------------------------------------
# (a) the reference itself


def _assert_identities_and_logits(model, ids):
    trace = sr.run_reference(model, ids)
    worst = sr.self_check(trace, tol=1e-10)  # path sum, A^T G, V-scale Jacobian, theta gradient: 1e-10
    assert worst["query_tok0"] == 0.0
    for i, layer in enumerate(trace.layers):
        paths = sr.path_gradients(trace, i)
        assert torch.equal(paths["q"][:, 0], torch.zeros_like(paths["q"][:, 0]))
        # the value path and the key path of token 0 are not trivially zero: the checks above are not vacuous
        assert paths["v"][:, 0].abs().max() > 0 and paths["k"][:, 0].abs().max() > 0
        assert layer.q_lin.grad[:, 1:].abs().max() > 0
    with torch.no_grad():
        out = model(ids, labels=ids)
    scale = trace.logits.abs().max().item()
    torch.testing.assert_close(out.logits.double(), trace.logits, rtol=1e-5, atol=1e-5 * max(1.0, scale))
    assert abs(out.loss.item() - trace.loss.item()) <= 1e-5 * max(1.0, trace.loss.item())
    return trace


@pytest.mark.parametrize(("model_type", "kv", "mode", "sinks"), CASES)
def test_reference_identities_and_logits(model_type, kv, mode, sinks):
    model, ids = _build(model_type, kv, mode, sinks)
    _assert_identities_and_logits(model, ids)


@pytest.mark.parametrize(("model_type", "mode", "sinks"), ARCH_CASES)
def test_reference_identities_and_logits_every_architecture(model_type, mode, sinks):
    model, ids = _build(model_type, 2, mode, sinks)
    _assert_identities_and_logits(model, ids)


def test_reference_models_every_architecture_feature():
    # The tiny settings switch each family's peculiarity on, so that the logit checks above test its modelling.
    def settings(model_type, layers=3):
        return sr.Settings.of(tiny_model(model_type, num_hidden_layers=layers))

    assert settings("smollm3").rope_layers == (True, False, True)  # a NoPE layer between RoPE layers
    assert settings("gemma2").windows == (16, None, 16)  # alternating sliding / full
    assert settings("qwen2").windows == (None, SLIDING_WINDOW, SLIDING_WINDOW)
    for model_type in ("mistral", "mixtral", "starcoder2", "ministral"):
        assert settings(model_type).windows == (SLIDING_WINDOW,) * 3, model_type
    assert settings("glm").rotary_dim == settings("glm4").rotary_dim == 4  # of head_dim 8
    granite = settings("granite")
    assert (granite.embed_scale, granite.residual_multiplier, granite.logits_scaling) == (12.0, 0.22, 8.0)
    assert granite.scaling == 0.125 != 8**-0.5
    gemma2 = settings("gemma2")
    assert (gemma2.scaling, gemma2.attn_softcap, gemma2.final_softcap) == (0.25, 8.0, 1.0)
    assert sorted(sr.ARCHS) == sorted(ARCHITECTURES)
    with pytest.raises(NotImplementedError, match="does not model 'gpt2'"):
        sr.Settings.of(SimpleNamespace(config=SimpleNamespace(model_type="gpt2")))


def test_reference_keys_follow_spec():
    for mode, n_vscale in (("off", 0), ("fixed", 2 * (2 + 2)), ("learned", 2 * (3 + 2))):
        model, ids = _build("llama", 2, mode, False)
        ref = sr.reference_metrics(model, ids)
        assert set(ref) == sr.expected_keys(2, 2, None if mode == "off" else mode)
        qr = 2 + 2 + 7  # qr/{kurtosis,max_over_median}/{h_out,down_proj_in}, qr/int8_error of the 7 linears
        per_layer = 3 + 12 + 1 + 8 + 12 + 5 + qr
        assert len(ref) == 2 * per_layer + 4 + qr + n_vscale
        assert all(math.isfinite(v) for v in ref.values())
        if mode == "off":
            assert not any(k.startswith("vscale/") or k.startswith("grad/vscale") for k in ref)


def _assert_planted_sinks(trace, ref, n_layers=3):
    heads = trace.shapes.heads
    rates = [ref[f"as/sink_rate/L{i:02d}"] for i in range(n_layers)]
    # exactly the planted heads are sinks, in every sequence, and no score sits near the 0.3 threshold
    for i in range(n_layers):
        alpha = sr.sink_scores(trace, i)
        planted = torch.zeros(heads, dtype=torch.bool)
        planted[SINK_HEADS[i]] = True
        assert torch.equal(alpha > sr.EPS_SINK, planted.expand_as(alpha)), (i, alpha)
        assert ((alpha - sr.EPS_SINK).abs() > 0.1).all(), (i, alpha)
        assert rates[i] == pytest.approx(len(SINK_HEADS[i]) / heads)
    # the sink token has the small value norm of real sinks
    assert ref["ma/v/tok0/L00"] < 0.5 * ref["ma/v/rest/L00"]


@pytest.mark.parametrize("model_type", [pytest.param(t, marks=() if t == "llama" else (slow,)) for t in ARCHITECTURES])
def test_reference_sinks_are_real(model_type):
    model, ids = _build(model_type, 2, "learned", True)
    trace = sr.run_reference(model, ids)
    ref = sr.metrics_from_trace(trace)
    _assert_planted_sinks(trace, ref)
    for i, window in enumerate(sr.Settings.of(model).windows):
        col = trace.layers[i].attn.detach()[..., 0]  # (b, H, T)
        if window is None:  # the window (t < 64) and the full column differ at T = 80: M_0 is not T_eps * alpha
            assert not torch.allclose(col.sum(-1), col[..., :64].sum(-1))
        else:  # queries past the sliding window no longer see the sink
            assert window < SINK_SEQ and (col[..., window:] == 0).all() and (col[..., :window] > 0).all()
    if model_type == "smollm3":  # one planted sink sits on a NoPE layer
        assert not sr.Settings.of(model).rope_layers[1] and SINK_HEADS[1]


@pytest.mark.parametrize(
    "model_type", [pytest.param(t, marks=() if t == "llama" else (slow,)) for t in PADDED_ARCHITECTURES]
)
def test_reference_padded_sinks_sit_on_each_rows_first_real_token(model_type):
    model = _model(model_type, 2, "learned", sinks=True, layers=3)
    ids, mask = _padded("left")
    trace = sr.run_reference(model, ids, mask)
    assert sorted(len(run.rows) for run in trace.runs) == [1, 1, 1, 2]  # the two rows of 63 tokens run together
    _assert_planted_sinks(trace, sr.metrics_from_trace(trace))


def test_reference_random_model_has_no_sinks():
    model, ids = _build("llama", 2, "off", False)
    ref = sr.reference_metrics(model, ids)
    assert ref["as/sink_rate/mean"] == 0.0


def test_reference_gradients_are_batch_summed_before_norms():
    # The batch's metrics are not the mean of single-sequence metrics: sequences are combined before the norms.
    model, ids = _build("llama", 2, "learned", False)
    whole = sr.reference_metrics(model, ids)
    single = [sr.reference_metrics(model, ids[j : j + 1]) for j in range(BATCH)]
    key = "gs/grad_in/rest/L00"
    # each single-sequence loss weighs its sequence B times more: ||sum_j g_j / B|| <= mean_j ||g_j||, strictly here
    assert whole[key] < (1 - 1e-3) * sum(s[key] for s in single) / BATCH
    # and the batch-summed vector is the sum of the per-sequence ones
    trace_all = sr.run_reference(model, ids)
    parts = [sr.run_reference(model, ids[j : j + 1]) for j in range(BATCH)]
    g_all = trace_all.layers[0].h_tilde.grad.sum(0)
    g_sum = sum(p.layers[0].h_tilde.grad.sum(0) for p in parts) / BATCH  # mean loss: 1/B per sequence
    torch.testing.assert_close(g_all, g_sum, rtol=1e-10, atol=1e-15)


# padded batches: what the reference combines, checked against its single-sequence runs and against the HF model


@pytest.mark.parametrize(
    ("model_type", "side"),
    [
        pytest.param(t, side, marks=() if (t, side) == ("llama", "left") else (slow,), id=f"{t}-{side}")
        for t in ARCHITECTURES
        for side in ("left", "right")
    ],
)
def test_reference_padded_rows_match_the_model_on_each_row_alone(model_type, side):
    model = _model(model_type, 2, "learned", sinks=True, layers=3)
    ids, mask = _padded(side)
    trace = sr.run_reference(model, ids, mask)
    sr.self_check(trace, tol=1e-10)
    ce_sum = 0.0
    for j, n in enumerate(PAD_LENGTHS):
        row = ids[j][mask[j].bool()][None]
        assert row.shape[1] == n and row[0, 0] == 0
        with torch.no_grad():
            out = model(row, labels=row)
        expected = trace.row_logits(j)
        scale = expected.abs().max().item()
        torch.testing.assert_close(out.logits[0].double(), expected, rtol=1e-5, atol=1e-5 * max(1.0, scale))
        ce_sum += out.loss.item() * (n - 1)
    # the loss is the mean over every real target of every sequence, not the mean of the rows' means
    assert trace.loss.item() == pytest.approx(ce_sum / sum(n - 1 for n in PAD_LENGTHS), rel=1e-5)


@pytest.mark.parametrize(
    "model_type", [pytest.param(t, marks=() if t == "llama" else (slow,)) for t in PADDED_ARCHITECTURES]
)
def test_reference_loss_and_gradients_match_the_models_masked_loss_right_padded(model_type):
    # Right padding keeps HF's default positions right, so the model's own masked loss (labels -100 on pads) is the
    # reference's combined loss, and its parameter gradients are the ones behind every grad/ metric.
    model = _model(model_type, 2, "learned", sinks=True, layers=3)
    ids, mask = _padded("right")
    trace = sr.run_reference(model, ids, mask)
    labels = ids.masked_fill(mask == 0, -100)
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(trace.loss.item(), rel=1e-5)
    for name, p in model.named_parameters():
        got, expected = p.grad.double(), trace.weights[name].grad.clone()
        if name == "model.embed_tokens.weight":  # nn.Embedding(padding_idx=pad_token_id) never updates that row
            expected[model.config.pad_token_id] = 0.0
        scale = expected.abs().max().item()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * scale, msg=name)
    model.zero_grad(set_to_none=True)


def test_reference_padded_batch_combines_its_sequences():
    # SPEC 2: a padded batch reports what its sequences, unpadded, report together. Checked against single-row runs.
    model = _model("llama", 2, "learned", sinks=True, layers=3)
    ids, mask = _padded("left")
    trace = sr.run_reference(model, ids, mask)
    ref = sr.metrics_from_trace(trace)
    rows = [ids[j][mask[j].bool()][None] for j in range(len(PAD_LENGTHS))]
    singles = [sr.run_reference(model, row) for row in rows]
    n_targets = sum(n - 1 for n in PAD_LENGTHS)
    # per-position gradients: each row's single-sequence gradient weighs (T_j - 1) / all targets, summed over the
    # rows that have the position
    t_max = max(PAD_LENGTHS)
    g = torch.zeros(t_max, trace.shapes.hidden, dtype=torch.float64)
    for single, n in zip(singles, PAD_LENGTHS, strict=True):
        g[:n] += single.layers[1].h_tilde.grad[0] * (n - 1) / n_targets
    assert ref["gs/grad_in/tok0/L01"] == pytest.approx(g[0].norm().item(), rel=1e-10)
    norms = g.norm(dim=-1)
    assert ref["gs/ratio/L01"] == pytest.approx((norms[0] / norms[1:32].mean()).item(), rel=1e-10)
    # forward norms and sink statistics: means over the sequences (and their heads)
    single_metrics = [sr.metrics_from_trace(s) for s in singles]
    for key in ("ma/h_out/tok0/L02", "ma/mlp_out/rest/L00", "as/sink_rate/L00", "as/mass/L01", "as/mass_sq/L02"):
        assert ref[key] == pytest.approx(sum(m[key] for m in single_metrics) / len(rows), rel=1e-10), key
    # a row that pads nothing, and the same rows padded on the other side, report the same
    assert sr.reference_metrics(model, ids[:1], mask[:1]) == sr.reference_metrics(model, ids[:1])
    assert sr.reference_metrics(model, *_padded("right")) == pytest.approx(ref, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# (b) measure against the reference


@pytest.mark.parametrize(("model_type", "kv", "mode", "sinks"), CASES)
def test_measure_matches_reference(model_type, kv, mode, sinks):
    model, ids = _build(model_type, kv, mode, sinks)
    ref = sr.reference_metrics(model, ids)
    if sinks:
        assert ref["as/sink_rate/mean"] > 0  # the sink statistics are not compared at a trivial 0
    got = vsp.measure(model, ids)
    assert set(ref) == sr.expected_keys(3 if sinks else 2, kv, None if mode == "off" else mode, model_type)
    _assert_matches_reference(got, ref)


@pytest.mark.parametrize(("model_type", "mode", "sinks", "attn"), MEASURE_ARCH_CASES)
def test_measure_matches_reference_every_architecture(model_type, mode, sinks, attn):
    model = _model(model_type, 2, mode, sinks=sinks, layers=3 if sinks else 2, attn=attn)
    ids = _case_ids(sinks)
    ref = sr.reference_metrics(model, ids)
    assert set(ref) == sr.expected_keys(3 if sinks else 2, 2, None if mode == "off" else mode, model_type)
    if sinks:
        assert ref["as/sink_rate/mean"] > 0
    got = vsp.measure(model, ids)
    assert model.config._attn_implementation == attn
    _assert_matches_reference(got, ref)


@pytest.mark.parametrize(("model_type", "side", "attn"), PADDED_CASES)
def test_measure_padded_batch_matches_reference(model_type, side, attn):
    # Rows of 41..80 real tokens with a planted sink on each row's first real token; pads hold random tokens.
    model = _model(model_type, 2, "learned", sinks=True, layers=3, attn=attn)
    ids, mask = _padded(side)
    ref = sr.reference_metrics(model, ids, mask)
    assert set(ref) == sr.expected_keys(3, 2, "learned", model_type)
    assert ref["as/sink_rate/mean"] > 0
    got = vsp.measure(model, ids, attention_mask=mask)
    _assert_matches_reference(got, ref)


@pytest.mark.parametrize("mode", ["off", "learned"])
def test_measure_matches_reference_mha_and_sdpa(mode):
    # Full multi-head attention, and a model whose forward kernel is sdpa (measure must not need eager).
    for kv, attn in ((4, "eager"), (2, "sdpa")):
        model = _model("llama", kv, mode, sinks=True, layers=3, attn=attn)
        ids = _case_ids(True)
        _assert_matches_reference(vsp.measure(model, ids), sr.reference_metrics(model, ids))
        assert model.config._attn_implementation == attn


def test_measure_with_all_ones_attention_mask_matches_reference():
    model, ids = _build("mistral", 2, "learned", True)
    got = vsp.measure(model, ids, attention_mask=torch.ones_like(ids))
    _assert_matches_reference(got, sr.reference_metrics(model, ids))


def test_measure_key_sets():
    for mode in ("off", "fixed", "learned"):
        for kv in (1, 2):
            model, ids = _build("llama", kv, mode, False)
            got = vsp.measure(model, ids)
            assert set(got) == sr.expected_keys(2, kv, None if mode == "off" else mode)
            assert all(isinstance(v, float) for v in got.values())
            if mode == "off":
                assert not [k for k in got if k.startswith("vscale/") or "vscale" in k]


# ---------------------------------------------------------------------------------------------------------------
# (c) measure leaves the model's gradients and parameters alone


def test_measure_leaves_grad_none_when_none():
    model, ids = _build("llama", 2, "learned", True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    vsp.measure(model, ids)
    assert all(p.grad is None for p in model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n  # no optimiser step


def test_measure_keeps_existing_grads():
    model, ids = _build("mistral", 1, "learned", False)
    # some parameters carry a gradient from an earlier backward, others have none
    model(ids[:1], labels=ids[:1]).loss.backward()
    for n, p in model.named_parameters():
        if "mlp" in n:
            p.grad = None
    saved = {n: (None if p.grad is None else (p.grad, p.grad.clone())) for n, p in model.named_parameters()}
    assert any(v is None for v in saved.values()) and any(v is not None for v in saved.values())
    got = vsp.measure(model, ids)
    for n, p in model.named_parameters():
        if saved[n] is None:
            assert p.grad is None, n
        else:
            assert p.grad is not None and torch.equal(p.grad, saved[n][1]), n
    # and the metrics did not absorb the stale gradients
    _assert_matches_reference(got, sr.reference_metrics(model, ids))
