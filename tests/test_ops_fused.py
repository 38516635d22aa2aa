"""The fused (torch.compile) V-scale kernel against float64 autograd, the eager kernel and a tiny Llama; its fallback.

Tests marked slow compile with inductor (tens of seconds on CPU the first time). They share one compiled function per
process, as real runs do; the ``compiled`` fixture fails a test whose calls silently fell back to eager.
"""

import copy
import json
import pickle
import warnings

import pytest
import torch

import vscale_plugin as vsp
from vscale_plugin.hf.registry import attention_layers
from vscale_plugin.ops import KERNELS, VScale, compiled_vscale_values, fused, vscale_values
from vscale_plugin.testing.models import randomise_theta, tiny_model

FALLBACK = "compiled V-scale kernel is unavailable"


@pytest.fixture
def compiled():
    yield compiled_vscale_values
    assert fused._compiled is not None, "the compiled kernel was never built"
    assert fused._fallback_reason is None, f"the compiled kernel fell back to eager: {fused._fallback_reason}"


@pytest.fixture
def fresh_fused(monkeypatch):
    """fused.py's per-process state, reset for this test and restored after it."""
    monkeypatch.setattr(fused, "_compiled", None)
    monkeypatch.setattr(fused, "_fallback_reason", None)
    return fused


def _inputs(shape, dtype, seed=0, requires_grad=True):
    """Values ``(B, T, heads, d)`` with ||v||^2 / C spread over 1e-2..1e2, and per-head theta; C = c0 * exp(theta)."""
    g = torch.Generator().manual_seed(seed)
    heads, d = shape[-2], shape[-1]
    c0 = 512 * d * 0.02**2
    theta = torch.empty(heads).uniform_(-1.5, 1.5, generator=g)
    c = c0 * theta.exp()
    direction = torch.nn.functional.normalize(torch.randn(shape, generator=g, dtype=torch.float64), dim=-1)
    ratio = 10 ** torch.empty(*shape[:-1], 1, dtype=torch.float64).uniform_(-2, 2, generator=g)
    v = direction * (ratio * c.double().unsqueeze(-1)).sqrt()
    weights = torch.randn(shape, generator=g, dtype=torch.float64)  # a loss whose gradient differs per entry
    return v.to(dtype).requires_grad_(requires_grad), theta.requires_grad_(requires_grad), c0, weights


def _run(kernel, v, theta, c0, weights):
    """Output, grad of v and grad of theta of ``sum(weights * kernel(v, C))``, C per head as in VScale."""
    v = v.detach().requires_grad_()
    theta = theta.detach().requires_grad_()
    out = kernel(v, (c0 * theta.exp()).unsqueeze(-1))
    (out.double() * weights).sum().backward()
    return out.detach(), v.grad, theta.grad


def _reference(v, theta, c0, weights):
    """The same in float64 autograd, written from SPEC 1 (r = ||v||^2, phi = r / (r + C), v_hat = phi v)."""
    v64 = v.detach().double().requires_grad_()
    theta64 = theta.detach().double().requires_grad_()
    c = (c0 * theta64.exp()).unsqueeze(-1)
    r = (v64 * v64).sum(-1, keepdim=True)
    out = v64 * (r / (r + c))
    (out * weights).sum().backward()
    return out.detach(), v64.grad, theta64.grad


def _assert_close_scaled(actual, expected, tol):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * scale)


# bfloat16 keeps 8 significant bits: its values and value gradients are within a few units of 2^-8.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_matches_float64_autograd_for_outputs_and_value_and_theta_gradients(compiled, dtype):
    # (batch, T, kv_heads, d_head): MHA-like, GQA-like with d_head 64 and 128, odd lengths; one compiled graph
    # serves them all (dynamic=True).
    for seed, shape in enumerate([(2, 16, 4, 8), (3, 7, 2, 64), (2, 33, 8, 128)]):
        v, theta, c0, weights = _inputs(shape, dtype, seed=seed)
        out, grad_v, grad_theta = _run(compiled, v, theta, c0, weights)
        ref_out, ref_grad_v, ref_grad_theta = _reference(v, theta, c0, weights)
        assert out.dtype == dtype and grad_v.dtype == dtype and grad_theta.dtype == torch.float32
        tol = TOLERANCE[dtype]
        _assert_close_scaled(out, ref_out, tol)
        _assert_close_scaled(grad_v, ref_grad_v, tol)
        _assert_close_scaled(grad_theta, ref_grad_theta, tol)
        if dtype == torch.bfloat16:  # and within one bfloat16 rounding of the eager kernel: float32 inside, too
            eager = _run(vscale_values, v, theta, c0, weights)
            for actual, expected in zip((out, grad_v, grad_theta), eager, strict=True):
                torch.testing.assert_close(actual, expected, rtol=2**-7, atol=1e-6 * expected.abs().max().item())


@pytest.mark.slow
def test_compiled_follows_the_sequence_length_from_prefill_to_decoding_and_back(compiled):
    # Inference shapes as generate() produces them: a prompt, then one token per step, then a new prompt.
    with torch.no_grad():
        for seed, t in enumerate([12, 1, 1, 1, 20, 1]):
            v, theta, c0, _ = _inputs((2, t, 2, 16), torch.float32, seed=seed, requires_grad=False)
            c = (c0 * theta.exp()).unsqueeze(-1)
            r = v.double().square().sum(-1, keepdim=True)
            expected = v.double() * r / (r + c.double())
            out = compiled(v, c)
            assert out.shape == v.shape
            torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


@pytest.mark.slow
def test_compiled_keeps_zero_and_overflowing_vectors_finite_like_eager(compiled):
    v = torch.randn(2, 3, 2, 8)
    v[0, 0] = 0.0  # phi = 0
    v[0, 1] = 1e20  # ||v||^2 overflows float32: phi = 1
    v[1, 2, 0] = 1e-30
    v[1, 0, 1] = -1e20
    theta = torch.tensor([-1.0, 1.0])
    weights = torch.randn(2, 3, 2, 8, dtype=torch.float64)
    out, grad_v, grad_theta = _run(compiled, v, theta, 0.1, weights)
    eager_out, eager_grad_v, eager_grad_theta = _run(vscale_values, v, theta, 0.1, weights)
    for tensor in (out, grad_v, grad_theta):
        assert torch.isfinite(tensor).all()
    assert (out[0, 0] == 0).all()
    torch.testing.assert_close(out[0, 1], v[0, 1], rtol=1e-6, atol=0)
    torch.testing.assert_close(out, eager_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_v, eager_grad_v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_theta, eager_grad_theta, rtol=1e-5, atol=1e-6)


def _ids(batch=2, t=12, seed=1):
    return torch.randint(0, 128, (batch, t), generator=torch.Generator().manual_seed(seed))


def _llama(kernel="eager"):
    return randomise_theta(vsp.apply_vscale(tiny_model("llama"), kernel=kernel))


def _logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_tiny_llama_with_compiled_kernel_gives_eager_logits_and_every_gradient(compiled):
    ids = _ids()
    logits, grads = _logits_and_grads(_llama("compiled"), ids)
    eager_logits, eager_grads = _logits_and_grads(_llama("eager"), ids)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(eager_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert all(grads[n].abs().max() > 0 for n in grads if "vscale" in n)


@pytest.mark.slow
def test_backward_mode_with_the_compiled_kernel_keeps_the_baselines_logits_and_eager_gradients(compiled):
    ids = _ids()
    model = vsp.apply_vscale(tiny_model("llama"), mode="backward", kernel="compiled")
    logits, grads = _logits_and_grads(model, ids)
    eager_logits, eager_grads = _logits_and_grads(vsp.set_vscale_kernel(model, "eager"), ids)
    baseline_logits, _ = _logits_and_grads(tiny_model("llama"), ids)
    assert torch.equal(logits, baseline_logits) and torch.equal(eager_logits, baseline_logits)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    module = VScale(num_kv_heads=4, head_dim=8, hidden_size=32, mode="backward", kernel="compiled").bfloat16()
    v = _inputs((2, 9, 4, 8), torch.bfloat16)[0].flatten(-2)
    assert torch.equal(module(v).detach().view(torch.int16), v.detach().view(torch.int16))


def test_backward_mode_runs_on_the_compiled_kernel_and_keeps_the_values(fresh_fused, monkeypatch):
    calls = []

    def compiled_stand_in(v, c):
        calls.append(v.shape)
        return vscale_values(v, c)

    monkeypatch.setattr(fresh_fused, "_compile", lambda: compiled_stand_in)
    module = VScale(num_kv_heads=2, head_dim=8, hidden_size=16, mode="backward", kernel="compiled")
    eager = VScale(num_kv_heads=2, head_dim=8, hidden_size=16, mode="backward")
    v, _, _, weights = _inputs((2, 5, 2, 8), torch.float32)
    grads = []
    for m in (module, eager):
        x = v.detach().flatten(-2).requires_grad_()
        out = m(x)
        assert torch.equal(out, x)
        (out.double() * weights.flatten(-2)).sum().backward()
        grads.append(x.grad)
    assert calls == [(2, 5, 2, 8)]
    assert torch.equal(*grads)


@pytest.mark.slow
def test_generate_with_kv_cache_gives_the_same_tokens_with_either_kernel(compiled):
    model = _llama("compiled")
    prompt = _ids(batch=1, t=5)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "use_cache": True}
    tokens = model.generate(prompt, **kwargs)
    eager_tokens = vsp.set_vscale_kernel(model, "eager").generate(prompt, **kwargs)
    assert tokens.shape == (1, 13)
    assert torch.equal(tokens, eager_tokens)


@pytest.mark.slow
def test_save_and_from_pretrained_round_trip_keeps_the_kernel_out_of_the_checkpoint(compiled, tmp_path):
    model = _llama("compiled")
    ids = _ids()
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["vscale"] == {"mode": "learned", "sigma": 0.02}
    assert "kernel" not in (tmp_path / "config.json").read_text()

    loaded = vsp.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert {attn.vscale.kernel for attn in attention_layers(loaded)} == {"eager"}
    assert list(loaded.state_dict()) == list(model.state_dict())
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-6)
    vsp.set_vscale_kernel(loaded, "compiled")
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_deepcopy_and_pickle_of_a_model_that_ran_the_compiled_kernel(compiled):
    model = _llama("compiled")
    ids = _ids()
    expected = model(ids).logits.detach()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert {attn.vscale.kernel for attn in attention_layers(clone)} == {"compiled"}
        torch.testing.assert_close(clone(ids).logits, expected, rtol=0, atol=0)


@pytest.mark.slow
def test_compiling_the_whole_model_with_the_compiled_kernel_keeps_its_logits(compiled):
    model = _llama("compiled")
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(torch.compile(model)(ids).logits, expected, rtol=1e-5, atol=1e-6)


def _failing_compile(message="no working C++ compiler (g++ not found)"):
    def compile_():
        raise RuntimeError(message)

    return compile_


def _fallback_warnings(record):
    return [w for w in record if FALLBACK in str(w.message)]


def test_compile_failure_warns_once_naming_the_cause_then_computes_eagerly(fresh_fused, monkeypatch):
    monkeypatch.setattr(fresh_fused, "_compile", _failing_compile())
    v, theta, c0, weights = _inputs((2, 5, 2, 8), torch.float32)
    with pytest.warns(RuntimeWarning) as record:
        out, grad_v, grad_theta = _run(compiled_vscale_values, v, theta, c0, weights)
    (warning,) = _fallback_warnings(record)
    message = str(warning.message)
    assert "RuntimeError: no working C++ compiler (g++ not found)" in message and "eager" in message
    eager = _run(vscale_values, v, theta, c0, weights)
    for actual, expected in zip((out, grad_v, grad_theta), eager, strict=True):
        assert torch.equal(actual, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(compiled_vscale_values(v, 1.0), vscale_values(v, 1.0))


def test_a_compiled_function_failing_at_run_time_falls_back_too(fresh_fused, monkeypatch):
    def broken(v, c):
        raise RuntimeError("InductorError: kernel launch failed")

    monkeypatch.setattr(fresh_fused, "_compile", lambda: broken)
    v = torch.randn(2, 3, 2, 8)
    with pytest.warns(RuntimeWarning, match="kernel launch failed"):
        assert torch.equal(compiled_vscale_values(v, 2.0), vscale_values(v, 2.0))
    assert "kernel launch failed" in fresh_fused._fallback_reason


@pytest.mark.slow
def test_a_real_dynamo_failure_falls_back_with_the_reason(fresh_fused, monkeypatch):
    # A function of its own (a fresh dynamo cache), allowed one graph: the second dtype hits the recompile limit,
    # which fullgraph=True turns into an error.
    monkeypatch.setattr(
        fresh_fused,
        "_compile",
        lambda: torch.compile(lambda v, c: vscale_values(v, c), dynamic=True, fullgraph=True),
    )
    v, c = torch.randn(2, 3, 2, 8), torch.full((2, 1), 0.5)
    with torch._dynamo.config.patch(recompile_limit=1), pytest.warns(RuntimeWarning) as record:
        torch.testing.assert_close(compiled_vscale_values(v, c), vscale_values(v, c))
        assert not _fallback_warnings(record) and fresh_fused._fallback_reason is None
        out = compiled_vscale_values(v.bfloat16(), c)
    (warning,) = _fallback_warnings(record)
    assert "recompile limit" in str(warning.message)
    assert torch.equal(out, vscale_values(v.bfloat16(), c))


def test_bad_inputs_raise_their_own_error_and_keep_the_compiled_kernel(fresh_fused, monkeypatch):
    calls = []

    def compiled_stand_in(v, c):
        calls.append(v.shape)
        return vscale_values(v, c)

    monkeypatch.setattr(fresh_fused, "_compile", lambda: compiled_stand_in)
    v = torch.randn(2, 3, 2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="size"):
            compiled_vscale_values(v, torch.ones(5, 1))  # C for 5 heads, values of 2
    assert fresh_fused._fallback_reason is None
    compiled_vscale_values(v, torch.ones(2, 1))
    assert len(calls) == 2


def test_model_with_compiled_kernel_falls_back_with_one_warning_and_eager_results(fresh_fused, monkeypatch):
    monkeypatch.setattr(fresh_fused, "_compile", _failing_compile("triton is not installed"))
    ids = _ids()
    with pytest.warns(RuntimeWarning) as record:
        logits, grads = _logits_and_grads(_llama("compiled"), ids)  # two layers, forward and backward
    assert len(_fallback_warnings(record)) == 1
    eager_logits, eager_grads = _logits_and_grads(_llama("eager"), ids)
    assert torch.equal(logits, eager_logits)
    assert all(torch.equal(grads[n], eager_grads[n]) for n in eager_grads)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _logits_and_grads(_llama("compiled"), ids)


def test_kernel_defaults_to_eager_and_shows_in_repr():
    model = vsp.apply_vscale(tiny_model("llama"))
    assert {attn.vscale.kernel for attn in attention_layers(model)} == {"eager"}
    assert "kernel=eager" in repr(model)
    vsp.set_vscale_kernel(model, "compiled")
    assert "kernel=compiled" in repr(model) and "kernel=eager" not in repr(model)


def test_reapplying_with_another_kernel_only_switches_the_kernel():
    model = _llama("eager")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = dict(model.config.vscale)
    assert vsp.apply_vscale(model, kernel="compiled") is model
    assert {attn.vscale.kernel for attn in attention_layers(model)} == {"compiled"}
    assert all(len(attn.v_proj._forward_hooks) == 1 for attn in attention_layers(model))
    assert model.config.vscale == config
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and set(state) == set(
        model.state_dict()
    )
    with pytest.raises(ValueError, match="remove_vscale"):
        vsp.apply_vscale(model, mode="fixed", kernel="eager")
    assert vsp.apply_vscale(model) is model
    assert {attn.vscale.kernel for attn in attention_layers(model)} == {"eager"}


def test_kernel_is_neither_in_config_json_nor_in_the_state_dict_and_loads_eager(tmp_path):
    model = _llama("compiled")
    assert all("kernel" not in key for key in model.state_dict())
    model.save_pretrained(tmp_path)
    assert "kernel" not in json.loads((tmp_path / "config.json").read_text())["vscale"]
    assert "kernel" not in (tmp_path / "config.json").read_text()
    loaded = vsp.from_pretrained(tmp_path)
    assert {attn.vscale.kernel for attn in attention_layers(loaded)} == {"eager"}


def test_set_vscale_kernel_on_a_model_without_vscale_is_an_error():
    with pytest.raises(ValueError, match=r"no V-scale.*apply_vscale"):
        vsp.set_vscale_kernel(tiny_model("llama"), "compiled")


def test_unknown_kernel_is_an_error_naming_the_kernels():
    message = "kernel 'triton' is not one of eager, compiled"
    assert KERNELS == ("eager", "compiled")
    with pytest.raises(ValueError, match=message):
        VScale(num_kv_heads=2, head_dim=4, hidden_size=8, kernel="triton")
    module = VScale(num_kv_heads=2, head_dim=4, hidden_size=8)
    with pytest.raises(ValueError, match=message):
        module.kernel = "triton"
    assert module.kernel == "eager"
    with pytest.raises(ValueError, match=message):
        vsp.apply_vscale(plain := tiny_model("llama"), kernel="triton")
    assert not vsp.is_vscaled(plain)
    model = _llama()
    with pytest.raises(ValueError, match=message):
        vsp.set_vscale_kernel(model, "triton")
    assert {attn.vscale.kernel for attn in attention_layers(model)} == {"eager"}
