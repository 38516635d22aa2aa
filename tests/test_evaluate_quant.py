"""Simulated quantisation (SPEC section 7) against independent float64 references written here, and its contract:
the original model untouched, lm_head and tied embeddings never quantised, V-scale still acting afterwards, and the
planted-outlier effect that motivates the paper (per-tensor static INT8 breaks, SmoothQuant repairs it)."""

import copy
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vscale_plugin as vsp
from vscale_plugin.evaluate.quant import (
    EXTRA_SCHEMES,
    SCHEMES,
    ActivationQuant,
    QuantError,
    check_scheme,
    describe,
    fake_quant,
    needs_calibration,
    quantize,
    smoothing_factors,
    unavailable,
    w4_group_fake_quant,
    weight_scales_per_channel,
)
from vscale_plugin.testing.models import randomise_theta, tiny_model

RUNNABLE = tuple(s for s in SCHEMES + EXTRA_SCHEMES if unavailable(s) is None)
BNB_REASON = unavailable("w4a16_bnb")


def _ids(batch=2, t=16, seed=1, vocab=128):
    return torch.randint(3, vocab, (batch, t), generator=torch.Generator().manual_seed(seed))


def _calib():
    return [_ids(seed=10), _ids(seed=11)]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


# ---- independent references (numpy float64, explicit loops) -------------------------------------------------------


def _ref_q(x, s, bits):
    qmax = 2 ** (bits - 1) - 1
    return 0.0 if s == 0 else s * min(max(np.round(x / s), -qmax - 1), qmax)


def _ref_fake_quant_rows(x, scales, bits):
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            out[i, j] = _ref_q(x[i, j], scales[i], bits)
    return out


def _ref_row_absmax_scales(x, bits):
    x = np.asarray(x, dtype=np.float64)
    return [max(abs(v) for v in row) / (2 ** (bits - 1) - 1) for row in x]


def _ref_w4(w, group, bits=4):
    w = np.asarray(w, dtype=np.float64)
    out = np.zeros_like(w)
    levels = 2**bits - 1
    for i in range(w.shape[0]):
        for start in range(0, w.shape[1], group):
            g = w[i, start : start + group]
            low, high = min(g.min(), 0.0), max(g.max(), 0.0)
            s = (high - low) / levels
            if s == 0:
                continue
            z = np.round(-low / s)
            for k, v in enumerate(g):
                out[i, start + k] = s * (min(max(np.round(v / s) + z, 0), levels) - z)
    return out


def test_fake_quant_matches_reference_per_tensor_and_per_row():
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * 3
    for bits in (8, 4):
        s = float(x.abs().max()) / (2 ** (bits - 1) - 1)
        ref = _ref_fake_quant_rows(x.numpy(), [s] * 6, bits)
        np.testing.assert_allclose(fake_quant(x, torch.tensor(s), bits).numpy(), ref, rtol=1e-6, atol=1e-6)
    scales = torch.tensor([0.01, 0.1, 0.5, 0.02, 1.0, 0.003]).unsqueeze(1)  # small ones clamp at -128 / 127
    ref = _ref_fake_quant_rows(x.numpy(), scales.squeeze(1).tolist(), 8)
    np.testing.assert_allclose(fake_quant(x, scales, 8).numpy(), ref, rtol=1e-6, atol=1e-7)
    assert fake_quant(torch.tensor([1000.0, -1000.0]), torch.tensor(0.5), 8).tolist() == [63.5, -64.0]


def test_weight_scales_per_channel_are_row_absmax_over_127():
    w = torch.randn(7, 33, generator=torch.Generator().manual_seed(1))
    ref = _ref_row_absmax_scales(w.numpy(), 8)
    np.testing.assert_allclose(weight_scales_per_channel(w).squeeze(1).numpy(), ref, rtol=1e-6)
    assert weight_scales_per_channel(w).shape == (7, 1)


@pytest.mark.parametrize("in_features", [256, 200, 64])
def test_w4_group_fake_quant_matches_loop_reference(in_features):
    # 200: a full group of 128 and a last one of 72; 64: one group smaller than 128 (the tiny models' hidden size)
    w = torch.randn(5, in_features, generator=torch.Generator().manual_seed(2))
    w[1] += 2.0  # an all-positive row: the zero point, not the symmetric range, carries it
    w[2] = 0.0
    w[3] = -0.7  # a constant row is exact under the widened-to-zero range
    got = w4_group_fake_quant(w, group=128)
    np.testing.assert_allclose(got.numpy(), _ref_w4(w.numpy(), 128), rtol=1e-5, atol=1e-6)
    assert torch.all(got[2] == 0) and torch.allclose(got[3], w[3])
    for start in range(0, in_features, 128):
        assert len(torch.unique(got[0, start : start + 128])) <= 16


def test_smoothing_factors_match_reference():
    act_max = torch.tensor([0.5, 40.0, 2.0, 0.0])
    w = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    got = smoothing_factors(act_max, w, alpha=0.5)
    for j in range(4):
        w_col_max = max(abs(float(w[i, j])) for i in range(6))
        ref = max(math.sqrt(float(act_max[j])) / math.sqrt(w_col_max), 1e-5)  # SmoothQuant's floor for dead channels
        assert got[j].item() == pytest.approx(ref, rel=1e-6)
    got = smoothing_factors(act_max, w, alpha=0.8)
    w_max = w.abs().amax(dim=0).double()
    np.testing.assert_allclose(got.numpy(), (act_max.double() ** 0.8 / w_max**0.2).clamp_min(1e-5).numpy(), rtol=1e-6)


def test_zero_rows_tokens_and_tensors_give_zero_not_nan():
    zeros = torch.zeros(3, 8)
    assert torch.equal(fake_quant(zeros, torch.tensor(0.0), 8), zeros)
    assert torch.equal(fake_quant(zeros, weight_scales_per_channel(zeros), 8), zeros)
    assert torch.equal(w4_group_fake_quant(zeros), zeros)
    # a token that is all zero under dynamic per-token INT8, next to a normal one
    linear = nn.Linear(8, 4)
    x = torch.stack([torch.zeros(8), torch.randn(8)])
    out = ActivationQuant(bits=8)(linear, (x,))[0]
    assert torch.isfinite(out).all() and torch.equal(out[0], torch.zeros(8))
    # a static scale of zero (a channel never active in calibration) still gives 0
    assert torch.equal(ActivationQuant(bits=8, scale=torch.tensor(0.0))(linear, (x,))[0], torch.zeros(2, 8))


def test_w8a8_dynamic_linear_matches_per_token_reference():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(24, 10))
    x = torch.randn(2, 5, 24) * torch.tensor([1.0] * 23 + [30.0])  # one loud channel moves every token's scale
    x[1, 2] = 0.0
    got = quantize(model, "w8a8_dynamic")(x)
    w = model[0].weight.detach().double().numpy()
    b = model[0].bias.detach().double().numpy()
    wq = _ref_fake_quant_rows(w, _ref_row_absmax_scales(w, 8), 8)
    tokens = x.reshape(-1, 24).double().numpy()
    xq = _ref_fake_quant_rows(tokens, _ref_row_absmax_scales(tokens, 8), 8)
    ref = (xq @ wq.T + b).reshape(2, 5, 10)
    np.testing.assert_allclose(got.detach().numpy(), ref, rtol=1e-4, atol=1e-5)


# ---- the model-level contract -------------------------------------------------------------------------------------


def test_scheme_names_errors_and_descriptions():
    assert SCHEMES == ("none", "w8a8_dynamic", "w8a8_static", "w8a8_static_down_proj", "w8a8_smoothquant", "w4a16")
    assert "w4a16_bnb" in EXTRA_SCHEMES
    for name in SCHEMES + EXTRA_SCHEMES:
        assert check_scheme(name) == name
        assert "v_proj" in describe(name) and "V-scale" in describe(name)
    with pytest.raises(QuantError, match="w8a8_bogus") as info:
        check_scheme("w8a8_bogus")
    assert all(name in str(info.value) for name in SCHEMES + EXTRA_SCHEMES)
    with pytest.raises(QuantError, match="w8a8_smoothquant"):
        quantize(tiny_model(), "int3")
    assert [s for s in SCHEMES if needs_calibration(s)] == ["w8a8_static", "w8a8_static_down_proj", "w8a8_smoothquant"]
    assert all(unavailable(s) is None for s in SCHEMES)
    assert "phi" in describe("w8a8_smoothquant")


@pytest.mark.parametrize("scheme", ["w8a8_static", "w8a8_static_down_proj", "w8a8_smoothquant"])
def test_static_schemes_without_calibration_say_calib(scheme):
    for calibration in ((), [torch.zeros(0, 0, dtype=torch.long)]):
        with pytest.raises(QuantError, match=r"needs --calib N > 0 calibration sequences"):
            quantize(tiny_model(), scheme, calibration)


@pytest.mark.skipif(BNB_REASON is None, reason="bitsandbytes and CUDA are present")
def test_unavailable_backend_gives_the_reason():
    assert "bitsandbytes" in BNB_REASON
    with pytest.raises(QuantError, match=re.escape("cannot run here: " + BNB_REASON)):
        quantize(tiny_model(), "w4a16_bnb")


@pytest.mark.parametrize("tied", [False, True])
def test_quantize_leaves_the_original_bitwise_untouched(tied):
    model = tiny_model(tie_word_embeddings=tied)
    ids = _ids()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logits = _logits(model, ids)
    for scheme in RUNNABLE:
        q = quantize(model, scheme, _calib())
        assert q is not model and not q.training
        if scheme != "none":
            assert not torch.equal(_logits(q, ids), logits), scheme
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(_logits(model, ids), logits)


def test_none_is_an_identical_copy():
    model = tiny_model()
    ids = _ids()
    q = quantize(model, "none")
    assert torch.equal(_logits(q, ids), _logits(model, ids))
    assert all(p.data_ptr() != r.data_ptr() for p, r in zip(q.parameters(), model.parameters(), strict=True))


@pytest.mark.parametrize("tied", [False, True])
def test_lm_head_and_embeddings_are_never_quantised(tied):
    model = tiny_model(tie_word_embeddings=tied)
    for scheme in RUNNABLE:
        q = quantize(model, scheme, _calib())
        assert torch.equal(q.lm_head.weight, model.lm_head.weight), scheme
        assert torch.equal(q.model.embed_tokens.weight, model.model.embed_tokens.weight), scheme
        assert not q.lm_head._forward_pre_hooks
        assert (q.lm_head.weight is q.model.embed_tokens.weight) == tied
        if scheme not in ("none", "w8a8_static_down_proj"):
            changed = [n for n, m in _linears(q).items() if not torch.equal(m.weight, model.get_submodule(n).weight)]
            assert len(changed) == len(_linears(q)) - 1, scheme  # every linear but lm_head


def test_static_down_proj_changes_only_down_proj():
    model = tiny_model()
    q = quantize(model, "w8a8_static_down_proj", _calib())
    for name, linear in _linears(q).items():
        same = torch.equal(linear.weight, model.get_submodule(name).weight)
        if name.endswith("mlp.down_proj"):
            assert not same and len(linear._forward_pre_hooks) == 1
        else:
            assert same and not linear._forward_pre_hooks, name
    assert not torch.equal(_logits(q, _ids()), _logits(model, _ids()))


def _recorded_inputs(model, names, calibration):
    """Every input each named linear sees over the calibration sequences, recorded independently of quant.py."""
    seen = {n: [] for n in names}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen[n].append(a[0].detach().double()))
        for n in names
    ]
    with torch.no_grad():
        for ids in calibration:
            model(input_ids=ids)
    for h in handles:
        h.remove()
    return {n: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]) for n, xs in seen.items()}


def _act_hook(linear) -> ActivationQuant:
    (hook,) = linear._forward_pre_hooks.values()
    return hook


def test_static_scales_are_calibration_minmax_and_stay_fixed():
    model = tiny_model()
    q = quantize(model, "w8a8_static", _calib())
    names = [n for n in _linears(model) if n != "lm_head"]
    inputs = _recorded_inputs(model, names, _calib())
    for name in names:
        hook = _act_hook(q.get_submodule(name))
        assert hook.scale.item() == pytest.approx(inputs[name].abs().max().item() / 127, rel=1e-6), name
        assert hook.smooth is None
    # beyond the calibrated range: clamped at 127 s (-128 s), not rescaled
    hook = _act_hook(q.model.layers[0].mlp.down_proj)
    s = hook.scale.item()
    x = torch.tensor([[1000 * s, -1000 * s, 3 * s, 0.0]])
    np.testing.assert_allclose(hook(None, (x,))[0].numpy(), [[127 * s, -128 * s, 3 * s, 0.0]], rtol=1e-6)


def test_smoothquant_shares_factors_where_they_fold_into_one_norm():
    model = tiny_model()
    q = quantize(model, "w8a8_smoothquant", _calib())
    layer, original = q.model.layers[1], model.model.layers[1]
    groups = {
        "qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        "gate_up": ["mlp.gate_proj", "mlp.up_proj"],
        "o": ["self_attn.o_proj"],
        "down": ["mlp.down_proj"],
    }
    prefix = "model.layers.1."
    inputs = _recorded_inputs(model, [prefix + n for ns in groups.values() for n in ns], _calib())
    for names in groups.values():
        act_max = inputs[prefix + names[0]].abs().amax(dim=0)
        w_max = torch.cat([original.get_submodule(n).weight.detach().double() for n in names]).abs().amax(dim=0)
        ref = (act_max.sqrt() / w_max.sqrt()).clamp_min(1e-5)
        for name in names:
            hook = _act_hook(layer.get_submodule(name))
            np.testing.assert_allclose(hook.smooth.double().numpy(), ref.numpy(), rtol=1e-5)
            assert hook.scale.item() == pytest.approx((act_max / ref).max().item() / 127, rel=1e-5)
            # W -> W * s per input channel, then INT8 per output channel
            w = original.get_submodule(name).weight.detach().double().numpy() * ref.numpy()
            ref_w = _ref_fake_quant_rows(w, _ref_row_absmax_scales(w, 8), 8)
            np.testing.assert_allclose(layer.get_submodule(name).weight.detach().numpy(), ref_w, rtol=1e-5, atol=1e-7)


def _vscaled(seed=0):
    return randomise_theta(vsp.apply_vscale(tiny_model(seed=seed), mode="learned"))


@pytest.mark.parametrize("scheme", ["w8a8_dynamic", "w8a8_static", "w8a8_smoothquant", "w4a16"])
def test_vscale_still_acts_after_quantisation(scheme):
    vscaled = _vscaled()
    plain = vsp.remove_vscale(copy.deepcopy(vscaled))
    ids = _ids()
    q_vscaled = quantize(vscaled, scheme, _calib())
    q_plain = quantize(plain, scheme, _calib())
    assert vsp.is_vscaled(q_vscaled)
    assert not torch.allclose(_logits(q_vscaled, ids), _logits(q_plain, ids), atol=1e-3)
    # The v_proj of the quantised copy, its output recomputed by hand: the quantised input (pre-hook) through the
    # quantised weight, then V-scale of the copy.
    v_proj = q_vscaled.model.layers[0].self_attn.v_proj
    x = torch.randn(2, 5, v_proj.in_features, generator=torch.Generator().manual_seed(5))
    hooks = list(v_proj._forward_pre_hooks.values())
    xq = hooks[0](v_proj, (x,))[0] if hooks else x
    manual = q_vscaled.model.layers[0].self_attn.vscale(F.linear(xq, v_proj.weight))
    with torch.no_grad():
        assert torch.allclose(v_proj(x), manual, atol=1e-6)
        assert not torch.allclose(F.linear(xq, v_proj.weight), manual, atol=1e-3)


def test_vscale_applied_by_hand_to_the_quantised_plain_model_gives_the_same_logits():
    vscaled = _vscaled()
    plain = vsp.remove_vscale(copy.deepcopy(vscaled))
    by_hand = vsp.apply_vscale(quantize(plain, "w8a8_dynamic"), mode="learned")
    theta = {k: v for k, v in vscaled.state_dict().items() if ".vscale." in k}
    assert theta and not by_hand.load_state_dict(theta, strict=False).unexpected_keys
    ids = _ids()
    torch.testing.assert_close(_logits(quantize(vscaled, "w8a8_dynamic"), ids), _logits(by_hand, ids))


def test_bf16_model_is_quantised_in_float32_and_stays_bf16():
    model = tiny_model().to(torch.bfloat16)
    ids = _ids()
    for scheme in RUNNABLE:
        q = quantize(model, scheme, _calib())
        assert all(p.dtype == torch.bfloat16 for p in q.parameters()), scheme
        logits = _logits(q, ids)
        assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all(), scheme
    # the rounding is the float32 one, cast once at the end
    w = model.model.layers[0].mlp.up_proj.weight
    got = quantize(model, "w4a16").model.layers[0].mlp.up_proj.weight
    assert torch.equal(got, w4_group_fake_quant(w.float()).to(torch.bfloat16))


@pytest.mark.skipif(BNB_REASON is not None, reason=f"w4a16_bnb unavailable: {BNB_REASON}")
def test_bnb_4bit_keeps_modules_and_vscale():
    vscaled = _vscaled().cuda()
    q = quantize(vscaled, "w4a16_bnb")
    v_proj, original = q.model.layers[0].self_attn.v_proj, vscaled.model.layers[0].self_attn.v_proj
    assert v_proj.weight.device.type == "cuda" and not torch.equal(v_proj.weight, original.weight)
    assert torch.allclose(v_proj.weight, original.weight, atol=0.2 * original.weight.abs().max().item())
    assert vsp.is_vscaled(q) and v_proj._forward_hooks
    assert torch.isfinite(_logits(q, _ids().cuda())).all()


# ---- the planted outlier (the paper's mechanism in miniature) ----------------------------------------------------


def _sampled(model, batch, t, seed):
    """Sequences sampled from ``model`` itself: a random model's own text, on which it has a low perplexity that
    quantisation noise visibly raises (on uniform random tokens every random model sits near the vocabulary size)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, 1), generator=g)
    with torch.no_grad():  # without the KV cache: 32 tokens of a tiny model, and no cache API to depend on
        for _ in range(t - 1):
            probs = model(input_ids=ids).logits[:, -1].float().softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], dim=1)
    return ids


def _perplexity(model, batches):
    nll, n = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            n += ids[:, 1:].numel()
    return math.exp(nll.item() / n)  # exp(mean token cross-entropy)


def test_planted_outlier_breaks_static_int8_and_smoothquant_repairs_it():
    # Larger weights than HF's 0.02 init, so that the random model's predictions are peaked enough to lose by noise.
    model = tiny_model(hidden_size=128, intermediate_size=256, head_dim=32, initializer_range=0.2)
    evaluation = [_sampled(model, 4, 32, seed) for seed in (1, 2)]
    calibration = [_sampled(model, 4, 32, 3)]
    planted = copy.deepcopy(model)
    a, row = 200.0, 5
    with torch.no_grad():  # function-preserving: up_proj's row r times a, down_proj's column r over a
        mlp = planted.model.layers[1].mlp
        mlp.up_proj.weight[row] *= a
        mlp.down_proj.weight[:, row] /= a

    fp = _perplexity(model, evaluation)
    assert _perplexity(planted, evaluation) == pytest.approx(fp, rel=1e-4)
    static_clean = _perplexity(quantize(model, "w8a8_static", calibration), evaluation)
    static_planted = _perplexity(quantize(planted, "w8a8_static", calibration), evaluation)
    smooth_planted = _perplexity(quantize(planted, "w8a8_smoothquant", calibration), evaluation)
    numbers = (
        f"fp32 {fp:.2f}, static clean {static_clean:.2f}, planted {static_planted:.2f}, smooth {smooth_planted:.2f}"
    )
    # Measured: fp32 18.16, static W8A8 clean 18.75, planted 25.62, SmoothQuant on the planted model 18.64.
    assert static_clean < 1.05 * fp, numbers
    assert static_planted > 1.25 * static_clean, numbers
    assert (static_planted - smooth_planted) > 0.8 * (static_planted - fp), numbers
