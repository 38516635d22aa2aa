"""``vsp.measure`` (SPEC sections 2-4) against the independent float64 reference of ``tests/stats_reference.py``.

The reference keeps the full attention matrix and every intermediate of each layer with ``retain_grad()``; its own
exact identities (path split, token-0 query path, value gradient = A^T G, V-scale Jacobian, theta gradient) are checked
first, and its logits against the Hugging Face model, so that it provably models the same network. Then every key
of ``measure`` is compared with it, on tiny Llama and Mistral models with GQA and MQA, V-scale off / fixed / learned,
with random weights and with planted attention sinks.
"""

from __future__ import annotations

import math

import pytest
import torch

import vscale_plugin as vsp
from tests import stats_reference as sr
from vscale_plugin.testing.models import randomise_theta, tiny_model

torch.backends.cuda.matmul.allow_tf32 = False

RTOL = 2e-3
BATCH = 3
SEQ = 48  # > T_E = 31, so R_GS and positions 1..15 are meaningful
SINK_SEQ = 80  # > T_eps = 64: the sink score's window and the column mass' full sum differ
VOCAB = 128

# query heads whose attention is planted onto token 0, per layer (query heads 0..3)
SINK_HEADS = ([0, 2], [1], [0, 1, 3])


def _ids(batch=BATCH, t=SEQ, seed=1, bos=False):
    g = torch.Generator().manual_seed(seed)
    if not bos:
        return torch.randint(0, VOCAB, (batch, t), generator=g)
    ids = torch.randint(1, VOCAB, (batch, t), generator=g)
    ids[:, 0] = 0  # a fixed BOS-like first token, never seen again in the sequence
    return ids


def _plant_sinks(model):
    """Real attention sinks on token id 0 at position 0, by construction.

    Every token gets a constant positive "bias" channel (hidden dim 0); token id 0 alone carries a large "BOS" channel
    (hidden dim 1). In every layer the keys' slowest RoPE dimension reads the BOS channel and, for the query heads
    of ``SINK_HEADS``, the queries' same dimension reads the bias channel: q_t . k_0 is large for every t (that RoPE
    pair rotates by only 1e-3 rad per position), while other keys see nothing. v_proj ignores the BOS channel, so
    the sink's value is small, as in trained models.
    """
    cfg = model.config
    hd, heads, kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    slow = hd // 2 - 1  # the lowest-frequency RoPE pair (slow, slow + hd/2)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 0.1
        emb[:, 1] = 0.0
        emb[0, 1] = 1.0
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            for h in range(kv):
                attn.k_proj.weight[h * hd + slow, :] = 0.0
                attn.k_proj.weight[h * hd + slow, 1] = 1.0
            for n, h in enumerate(SINK_HEADS[i % len(SINK_HEADS)]):
                if h < heads:
                    attn.q_proj.weight[h * hd + slow, :] = 0.0
                    attn.q_proj.weight[h * hd + slow, 0] = 1.0 + 0.5 * n
            attn.v_proj.weight[:, 1] = 0.0
    return model


def _model(model_type="llama", kv_heads=2, mode="learned", sinks=False, layers=2, attn="eager"):
    model = tiny_model(model_type, attn_implementation=attn, num_key_value_heads=kv_heads, num_hidden_layers=layers)
    if sinks:
        _plant_sinks(model)
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


CASES = [
    pytest.param(model_type, kv, mode, sinks, id=f"{model_type}-kv{kv}-{mode}-{'sinks' if sinks else 'random'}")
    for sinks in (False, True)
    for model_type in ("llama", "mistral")
    for kv in (2, 1)
    for mode in ("off", "fixed", "learned")
]


def _build(model_type, kv, mode, sinks):
    return _model(model_type, kv, mode, sinks=sinks, layers=3 if sinks else 2), _case_ids(sinks)


# ---------------------------------------------------------------------------------------------------------------
# (a) the reference itself


@pytest.mark.parametrize(("model_type", "kv", "mode", "sinks"), CASES)
def test_reference_identities_and_logits(model_type, kv, mode, sinks):
    model, ids = _build(model_type, kv, mode, sinks)
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


def test_reference_keys_follow_spec():
    for mode, n_vscale in (("off", 0), ("fixed", 2 * (2 + 2)), ("learned", 2 * (3 + 2))):
        model, ids = _build("llama", 2, mode, False)
        ref = sr.reference_metrics(model, ids)
        assert set(ref) == sr.expected_keys(2, 2, None if mode == "off" else mode)
        per_layer = 3 + 12 + 1 + 8 + 12 + 5
        assert len(ref) == 2 * per_layer + 4 + n_vscale
        assert all(math.isfinite(v) for v in ref.values())
        if mode == "off":
            assert not any(k.startswith("vscale/") or k.startswith("grad/vscale") for k in ref)


def test_reference_sinks_are_real():
    model, ids = _build("llama", 2, "learned", True)
    trace = sr.run_reference(model, ids)
    ref = sr.metrics_from_trace(trace)
    rates = [ref[f"as/sink_rate/L{i:02d}"] for i in range(3)]
    assert max(rates) > 0
    # exactly the planted heads are sinks, in every sequence, and no score sits near the 0.3 threshold
    for i in range(3):
        alpha = sr.sink_scores(trace, i)
        planted = torch.zeros(4, dtype=torch.bool)
        planted[SINK_HEADS[i]] = True
        assert torch.equal(alpha > sr.EPS_SINK, planted.expand_as(alpha)), alpha
        assert ((alpha - sr.EPS_SINK).abs() > 0.1).all(), alpha
        assert rates[i] == pytest.approx(len(SINK_HEADS[i]) / 4)
    # the window (t < 64) and the full column differ at T = 80: M_0 is not T_eps * alpha
    col = trace.layers[0].attn[..., 0]
    assert not torch.allclose(col.sum(-1), col[..., :64].sum(-1))
    # the sink token has the small value norm of real sinks
    assert ref["ma/v/tok0/L00"] < 0.5 * ref["ma/v/rest/L00"]


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


# ---------------------------------------------------------------------------------------------------------------
# (b) measure against the reference


@pytest.mark.parametrize(("model_type", "kv", "mode", "sinks"), CASES)
def test_measure_matches_reference(model_type, kv, mode, sinks):
    model, ids = _build(model_type, kv, mode, sinks)
    ref = sr.reference_metrics(model, ids)
    if sinks:
        assert ref["as/sink_rate/mean"] > 0  # the sink statistics are not compared at a trivial 0
    got = vsp.measure(model, ids)
    assert set(ref) == sr.expected_keys(3 if sinks else 2, kv, None if mode == "off" else mode)
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
