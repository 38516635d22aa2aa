"""The one-call Hugging Face integration (SPEC section 3) against an independent eager reference."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import vscale_plugin as vsp
from tests import reference
from vscale_plugin.hf.registry import REGISTRY, attention_layers
from vscale_plugin.ops import MODES
from vscale_plugin.testing.models import randomise_theta, tiny_config, tiny_model

torch.backends.cuda.matmul.allow_tf32 = False


def _ids(batch=2, t=12, vocab=128, seed=1):
    return torch.randint(0, vocab, (batch, t), generator=torch.Generator().manual_seed(seed))


def _vscaled(model_type="llama", attn="eager", mode="learned", **overrides):
    model = vsp.apply_vscale(tiny_model(model_type, attn_implementation=attn, **overrides), mode=mode)
    return randomise_theta(model) if mode == "learned" else model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _reference_loss_and_grads(model, ids, vscale=True):
    """Logits and parameter gradients of the independent float64 reference on the model's weights."""
    weights = {n: p.detach().double().requires_grad_() for n, p in model.named_parameters()}
    shapes = reference.Shapes.of(model.config)
    c = None
    if vscale:
        sigma = model.config.vscale["sigma"]
        c0 = shapes.hidden * shapes.head_dim * sigma**2  # C = d_model * d_head * sigma^2 * lambda
        c = []
        for i in range(shapes.layers):
            theta = weights.get(f"model.layers.{i}.self_attn.vscale.theta")
            c.append(c0 * (theta.exp() if theta is not None else torch.ones(shapes.kv_heads, dtype=torch.float64)))
    logits = reference.forward(weights, shapes, ids, c)
    reference.causal_lm_loss(logits, ids).backward()
    return logits.detach(), {n: w.grad for n, w in weights.items()}


def _assert_close_to_reference(actual, expected, tol=2e-5):
    # Tolerance relative to each tensor's scale: float32 model against a float64 reference.
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * max(scale, 1e-12))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("model_type", ["llama", "mistral"])
@pytest.mark.parametrize("mode", ["learned", "fixed"])
def test_logits_and_every_gradient_match_independent_reference(model_type, kv_heads, attn, mode):
    model = _vscaled(model_type, attn, mode, num_key_value_heads=kv_heads)
    ids = _ids()
    logits, grads = _loss_and_grads(model, ids)
    ref_logits, ref_grads = _reference_loss_and_grads(model, ids)
    _assert_close_to_reference(logits, ref_logits)
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        _assert_close_to_reference(grad, ref_grads[name])
    if mode == "learned":
        assert all(grads[n].abs().max() > 0 for n in grads if "vscale" in n)


def test_unpatched_model_matches_reference_without_vscale():
    # Guards the reference itself: without V-scale it must reproduce stock transformers.
    model = tiny_model("llama")
    ids = _ids()
    logits, _ = _loss_and_grads(model, ids)
    ref_logits, _ = _reference_loss_and_grads(model, ids, vscale=False)
    _assert_close_to_reference(logits, ref_logits)
    patched_ref, _ = _reference_loss_and_grads(_vscaled("llama"), ids)
    assert (patched_ref - ref_logits).abs().max() > 1e-3


def test_theta_has_one_entry_per_kv_head_and_original_keys_are_unchanged():
    model = tiny_model("llama", num_key_value_heads=2)
    before = set(model.state_dict())
    vsp.apply_vscale(model)
    after = set(model.state_dict())
    added = after - before
    assert before <= after
    assert added == {f"model.layers.{i}.self_attn.vscale.theta" for i in range(2)}
    for name, p in model.named_parameters():
        if name in added:
            assert p.shape == (2,) and torch.equal(p.detach(), torch.zeros(2)) and p.requires_grad


@pytest.mark.parametrize("mode", ["fixed", "backward"])
def test_fixed_and_backward_modes_add_no_trainable_parameter(mode):
    model = tiny_model("llama")
    n = sum(1 for _ in model.parameters())
    vsp.apply_vscale(model, mode=mode)
    assert sum(1 for _ in model.parameters()) == n
    assert model.config.vscale == {"mode": mode, "sigma": 0.02}
    thetas = {f"model.layers.{i}.self_attn.vscale.theta" for i in range(2)}
    assert {key for key in model.state_dict() if "vscale" in key} == thetas


def test_eager_and_sdpa_agree():
    ids = _ids(t=16)
    eager = _vscaled("llama", "eager")
    sdpa = _vscaled("llama", "sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    logits_e, grads_e = _loss_and_grads(eager, ids)
    logits_s, grads_s = _loss_and_grads(sdpa, ids)
    torch.testing.assert_close(logits_s, logits_e, rtol=1e-5, atol=1e-5)
    for name in grads_e:
        torch.testing.assert_close(grads_s[name], grads_e[name], rtol=1e-4, atol=1e-6)


def test_attention_implementation_is_never_changed():
    for attn in ("eager", "sdpa"):
        model = _vscaled("llama", attn)
        assert model.config._attn_implementation == attn


def test_flex_attention_agrees_with_eager_where_available():
    try:
        flex = _vscaled("llama", "flex_attention")
        with torch.no_grad():  # flex_attention has no CPU backward
            logits_f = flex(_ids(t=16)).logits
    except (ImportError, ValueError, RuntimeError, NotImplementedError) as err:
        pytest.skip(f"flex_attention not usable here: {str(err).splitlines()[0][:120]}")
    torch.testing.assert_close(logits_f, _vscaled("llama", "eager")(_ids(t=16)).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_incremental_decoding_with_kv_cache_equals_full_forward(attn):
    model = _vscaled("llama", attn)
    ids = _ids(batch=2, t=14)
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache()
        out = model(ids[:, :6], past_key_values=cache, use_cache=True)
        steps = [out.logits]
        for t in range(6, 14):
            out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def _cached_values(cache, layer):
    layers = getattr(cache, "layers", None)
    return layers[layer].values if layers is not None else cache.value_cache[layer]


def test_kv_cache_stores_scaled_values():
    model = _vscaled("llama")
    ids = _ids(batch=1, t=8)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cached = _cached_values(out.past_key_values, 0)  # (batch, kv_heads, T, d)
        attn = attention_layers(model)[0]
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        v = torch.nn.functional.linear(x, attn.v_proj.weight).view(1, 8, 2, 8).transpose(1, 2).double()
        c = 32 * 8 * 0.02**2 * attn.vscale.theta.double().exp().view(1, 2, 1, 1)
        r = (v**2).sum(-1, keepdim=True)
    torch.testing.assert_close(cached.double(), v * r / (r + c), rtol=1e-5, atol=1e-7)


def test_greedy_generation_with_and_without_cache_agree():
    model = _vscaled("llama")
    prompt = _ids(batch=1, t=5)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (1, 13)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("mode", MODES)
def test_save_pretrained_and_from_pretrained_restore_vscale_and_theta(tmp_path, mode):
    model = _vscaled("llama", mode=mode, num_key_value_heads=4)
    ids = _ids()
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = vsp.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert vsp.is_vscaled(loaded)
    assert loaded.config.vscale == {"mode": mode, "sigma": 0.02}
    assert loaded.config._attn_implementation == "sdpa"  # transformers' default, not forced to eager
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_from_pretrained_passes_transformers_kwargs(tmp_path):
    _vscaled("llama").save_pretrained(tmp_path)
    loaded = vsp.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.bfloat16)
    assert loaded.config._attn_implementation == "eager"
    assert loaded.model.layers[0].self_attn.vscale.theta.dtype == torch.bfloat16
    loaded, info = vsp.from_pretrained(tmp_path, output_loading_info=True)
    assert vsp.is_vscaled(loaded)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_from_pretrained_without_vscale_is_plain_transformers(tmp_path):
    model = tiny_model("mistral")
    model.save_pretrained(tmp_path)
    loaded = vsp.from_pretrained(tmp_path).eval()
    assert not vsp.is_vscaled(loaded)
    torch.testing.assert_close(loaded(_ids()).logits, model(_ids()).logits, rtol=1e-5, atol=1e-6)


def test_plain_transformers_load_reports_theta_as_unexpected(tmp_path):
    # The documented door is vsp.from_pretrained; plain loading must at least not hide what it dropped.
    for mode in MODES:
        _vscaled("llama", mode=mode).save_pretrained(tmp_path / mode)
        _, info = AutoModelForCausalLM.from_pretrained(tmp_path / mode, output_loading_info=True)
        assert {f"model.layers.{i}.self_attn.vscale.theta" for i in range(2)} <= set(info["unexpected_keys"])


def test_from_pretrained_refuses_a_checkpoint_whose_theta_is_missing(tmp_path):
    model = tiny_model("llama")
    model.config.vscale = {"mode": "learned", "sigma": 0.02}  # config says V-scale, weights have none
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="lack"):
        vsp.from_pretrained(tmp_path)


@pytest.mark.parametrize("mode", MODES)
def test_remove_restores_outputs_bitwise(mode):
    model = tiny_model("llama")
    ids = _ids()
    before_logits, before_grads = _loss_and_grads(model, ids)
    keys = list(model.state_dict())
    randomise_theta(vsp.apply_vscale(model, mode=mode))
    patched_logits, patched_grads = _loss_and_grads(model, ids)
    assert torch.equal(patched_logits, before_logits) == (mode == "backward")  # its forward is the baseline's
    assert not torch.equal(patched_grads["model.embed_tokens.weight"], before_grads["model.embed_tokens.weight"])
    vsp.remove_vscale(model)
    after_logits, after_grads = _loss_and_grads(model, ids)
    assert torch.equal(after_logits, before_logits)
    assert all(torch.equal(after_grads[n], g) for n, g in before_grads.items())
    assert list(model.state_dict()) == keys
    assert not vsp.is_vscaled(model) and model.config.vscale is None
    assert all(not attn.v_proj._forward_hooks for attn in attention_layers(model))


def test_apply_is_idempotent():
    model = _vscaled("llama")
    ids = _ids()
    expected = model(ids).logits
    params = [n for n, _ in model.named_parameters()]
    assert vsp.apply_vscale(model) is model
    assert [n for n, _ in model.named_parameters()] == params
    assert all(len(attn.v_proj._forward_hooks) == 1 for attn in attention_layers(model))
    assert torch.equal(model(ids).logits, expected)


def test_applying_different_settings_on_a_vscaled_model_is_an_error():
    model = _vscaled("llama")
    with pytest.raises(ValueError, match="remove_vscale"):
        vsp.apply_vscale(model, mode="fixed")
    vsp.remove_vscale(model)
    vsp.apply_vscale(model, mode="fixed", sigma=0.01)
    assert model.config.vscale == {"mode": "fixed", "sigma": 0.01}


def test_deepcopy_keeps_each_copy_bound_to_its_own_theta():
    model = _vscaled("llama")
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            if "vscale" in name:
                p.add_(1.0)
    ids = _ids()
    ref_model, _ = _reference_loss_and_grads(clone, ids)
    _assert_close_to_reference(clone(ids).logits.detach(), ref_model)
    assert not torch.allclose(clone(ids).logits, model(ids).logits)


def test_bf16_autocast_stays_finite_and_close_to_float32():
    model = _vscaled("llama", "sdpa")
    ids = _ids(t=32)
    expected = model(ids).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
        out.loss.backward()
    assert torch.isfinite(out.logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert (out.logits.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_bf16_weights_keep_vscale_statistics_in_float32():
    model = _vscaled("llama").to(torch.bfloat16)
    ids = _ids(t=32)
    logits = model(ids).logits
    reference_logits = _vscaled("llama")(ids).logits
    assert torch.isfinite(logits).all()
    assert (logits.float() - reference_logits).abs().max() < 0.1 * reference_logits.abs().max()


def test_huge_value_activations_stay_finite():
    model = _vscaled("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.mul_(1e19)  # ||v||^2 overflows float32
    out = model(_ids(), labels=_ids())
    out.loss.backward()
    assert torch.isfinite(out.logits).all()
    assert torch.isfinite(model.model.layers[0].self_attn.vscale.theta.grad).all()


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = _ids()
    model = _vscaled("llama")
    _, plain = _loss_and_grads(model.train(), ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, checkpointed = _loss_and_grads(model, ids)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)


def test_meta_device_model_is_patched_then_materialised(tmp_path):
    source = _vscaled("llama")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="eager")
    vsp.apply_vscale(model)
    assert model.model.layers[0].self_attn.vscale.theta.is_meta
    model.to_empty(device="cpu")
    model.load_state_dict(source.state_dict())
    model.model.rotary_emb.inv_freq = source.model.rotary_emb.inv_freq  # a non-persistent buffer
    ids = _ids()
    torch.testing.assert_close(model.eval()(ids).logits, source(ids).logits, rtol=0, atol=0)


def test_patching_after_from_pretrained_of_a_plain_checkpoint(tmp_path):
    tiny_model("qwen2").save_pretrained(tmp_path)
    model = vsp.apply_vscale(AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager"))
    randomise_theta(model)
    model.save_pretrained(tmp_path / "vscaled")
    loaded = vsp.from_pretrained(tmp_path / "vscaled", attn_implementation="eager").eval()
    torch.testing.assert_close(loaded(_ids()).logits, model.eval()(_ids()).logits, rtol=1e-6, atol=1e-6)


def test_unsupported_architecture_error_lists_what_is_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(NotImplementedError, match="gpt2") as err:
        vsp.apply_vscale(model)
    assert "llama" in str(err.value) and "mistral" in str(err.value)
    with pytest.raises(TypeError, match="Hugging Face"):
        vsp.apply_vscale(torch.nn.Linear(2, 2))


def test_unknown_mode_is_an_error_naming_the_modes():
    with pytest.raises(ValueError, match="learned, fixed, backward"):
        vsp.apply_vscale(tiny_model("llama"), mode="adaptive")


def _v_proj_reference_hook(module, args, output):
    # Hand-written V-scale on v_proj's output, independent of vscale_plugin: per KV head, theta from the
    # V-scaled twin, C = d_model * d_head * sigma^2 * exp(theta).
    v = output.double().unflatten(-1, (module.kv_heads, module.head_dim))
    r = (v**2).sum(-1, keepdim=True)
    c = module.c.view(module.kv_heads, 1)
    return (v * r / (r + c)).flatten(-2).to(output.dtype)


def _attn_kinds(model_type):
    return ["eager", "sdpa"] if model_type != "gemma2" else ["eager"]  # gemma2 has no sdpa in transformers


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(REGISTRY))
def test_every_registered_architecture_scales_values_right_after_v_proj(model_type):
    for attn in _attn_kinds(model_type):
        model = _vscaled(model_type, attn)
        twin = tiny_model(model_type, attn_implementation=attn)
        config = model.config
        for layer_attn, twin_attn in zip(attention_layers(model), attention_layers(twin), strict=True):
            v_proj = twin_attn.v_proj
            v_proj.kv_heads, v_proj.head_dim = config.num_key_value_heads, layer_attn.vscale.head_dim
            v_proj.c = config.hidden_size * v_proj.head_dim * 0.02**2 * layer_attn.vscale.theta.detach().double().exp()
            v_proj.register_forward_hook(_v_proj_reference_hook)
        ids = _ids(t=20)
        torch.testing.assert_close(model(ids).logits, twin(ids).logits, rtol=1e-5, atol=1e-5)

        with torch.no_grad():
            full = model(ids).logits
            out = model(ids[:, :12], use_cache=True)
            steps = [out.logits]
            for t in range(12, 20):
                out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
                steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)

        plain = tiny_model(model_type, attn_implementation=attn)
        vsp.remove_vscale(model)
        assert torch.equal(model(ids).logits, plain(ids).logits)
