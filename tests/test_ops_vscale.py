"""V-scale math against closed forms (SPEC section 1) and float64 autograd."""

import math

import pytest
import torch
from torch.autograd.functional import jacobian
from torch.func import functional_call

from vscale_plugin.ops import MODES, VScale, backward_only_values, phi, vscale_constant, vscale_values


def _scaled_to(r: float, d: int, seed: int = 0) -> torch.Tensor:
    """A float64 vector of dimension d with ||v||^2 == r."""
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return v * math.sqrt(r) / v.norm()


def test_constant_is_d_model_times_d_head_times_sigma_squared_times_lambda():
    assert vscale_constant(512, 64) == pytest.approx(512 * 64 * 0.02**2)
    assert vscale_constant(2048, 128, sigma=0.01, lam=3.0) == pytest.approx(2048 * 128 * 1e-4 * 3.0)


@pytest.mark.parametrize(("r", "expected"), [(0.0, 0.0), (2.0, 0.5), (6.0, 0.75), (18.0, 0.9), (2e12, 1.0)])
def test_phi_values(r, expected):
    assert phi(torch.tensor(r, dtype=torch.float64), 2.0).item() == pytest.approx(expected, rel=1e-9)


def test_vscale_values_scale_each_head_by_its_own_phi():
    v = torch.randn(3, 5, 2, 8, dtype=torch.float64)
    c = torch.tensor([[0.5], [4.0]], dtype=torch.float64)
    out = vscale_values(v, c)
    r = (v**2).sum(-1, keepdim=True)
    torch.testing.assert_close(out, v * r / (r + c), rtol=1e-12, atol=0)


@pytest.mark.parametrize("ratio", [0.01, 0.3, 1.0, 3.0, 10.0, 300.0])
def test_jacobian_matches_closed_form_and_its_eigenvalues(ratio):
    d, c = 8, 1.7
    r = ratio * c
    v = _scaled_to(r, d, seed=int(ratio * 100))
    jac = jacobian(lambda x: vscale_values(x, c), v)
    closed = r / (r + c) * torch.eye(d, dtype=torch.float64) + 2 * c / (r + c) ** 2 * torch.outer(v, v)
    torch.testing.assert_close(jac, closed, rtol=1e-10, atol=1e-12)

    eig = torch.linalg.eigvalsh(jac)  # symmetric: phi*I + a v v^T
    along_v = (r**2 + 3 * c * r) / (r + c) ** 2
    orthogonal = torch.full((d - 1,), r / (r + c), dtype=torch.float64)
    expected = torch.sort(torch.cat([orthogonal, torch.tensor([along_v], dtype=torch.float64)])).values
    torch.testing.assert_close(eig, expected, rtol=1e-10, atol=1e-12)
    assert (jac @ v) @ v / (v @ v) == pytest.approx(along_v, rel=1e-10)


def test_gain_along_v_peaks_at_nine_eighths_when_r_is_three_c():
    c, d = 0.9, 6
    gains = []
    for ratio in torch.linspace(0.05, 20, 400).tolist():
        v = _scaled_to(ratio * c, d)
        jac = jacobian(lambda x: vscale_values(x, c), v)
        gains.append(((jac @ v) @ v / (v @ v)).item())
    assert max(gains) <= 9 / 8 + 1e-12
    v = _scaled_to(3 * c, d)
    jac = jacobian(lambda x: vscale_values(x, c), v)
    assert ((jac @ v) @ v / (v @ v)).item() == pytest.approx(9 / 8, rel=1e-12)


def test_small_norm_values_get_gradient_shrunk_about_three_r_over_c():
    c, r = 1.0, 1e-4
    v = _scaled_to(r, 16)
    jac = jacobian(lambda x: vscale_values(x, c), v)
    assert ((jac @ v) @ v / (v @ v)).item() == pytest.approx(3 * r / c, rel=1e-3)


def test_identity_in_the_limit_c_to_zero():
    v = torch.randn(4, 16, dtype=torch.float64)
    torch.testing.assert_close(vscale_values(v, 1e-14), v, rtol=1e-12, atol=0)
    jac = jacobian(lambda x: vscale_values(x, 1e-14), v[0])
    torch.testing.assert_close(jac, torch.eye(16, dtype=torch.float64), rtol=0, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_use_float32_norms_and_keep_their_dtype(dtype):
    # Squared norms of 64 entries of ~4 overflow float16 (max 65504): float32 inside avoids inf/0 phi.
    v = (torch.randn(2, 3, 4, 64) * 40).to(dtype)
    out = vscale_values(v, 100.0)
    assert out.dtype == dtype
    v64 = v.double()
    r = (v64**2).sum(-1, keepdim=True)
    torch.testing.assert_close(out.double(), v64 * r / (r + 100.0), rtol=1e-2, atol=1e-2)
    assert torch.isfinite(out).all()


def test_zero_and_huge_vectors_stay_finite_forward_and_backward():
    v = torch.zeros(3, 2, 8, dtype=torch.float32)
    v[1] = 1e20  # ||v||^2 overflows float32
    v[2, 0] = 1e-30
    v.requires_grad_(True)
    out = vscale_values(v, torch.tensor([[1e-3], [5.0]]))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(v.grad).all()
    assert (out[0] == 0).all()
    torch.testing.assert_close(out[1], v[1].detach(), rtol=1e-6, atol=0)


def test_zero_vector_with_vanishing_c_gives_zero_not_nan():
    out = vscale_values(torch.zeros(2, 4), torch.tensor([[0.0], [0.0]]))
    assert torch.equal(out, torch.zeros(2, 4))


@pytest.mark.parametrize("frozen_mode", ["fixed", "backward"])
def test_learned_module_owns_theta_fixed_and_backward_modules_keep_it_frozen_at_zero(frozen_mode):
    learned = VScale(num_kv_heads=3, head_dim=4, hidden_size=16, mode="learned")
    frozen = VScale(num_kv_heads=3, head_dim=4, hidden_size=16, mode=frozen_mode)
    assert [n for n, _ in learned.named_parameters()] == ["theta"]
    assert list(frozen.parameters()) == []
    assert [n for n, _ in frozen.named_buffers()] == ["theta"]
    assert set(frozen.state_dict()) == {"theta"} == set(learned.state_dict())
    for m in (learned, frozen):
        assert torch.equal(m.theta, torch.zeros(3))
        torch.testing.assert_close(m.lam(), torch.ones(3))


def test_modes_are_the_papers_three():
    assert MODES == ("learned", "fixed", "backward")


# Integer views of each float dtype: equal views mean equal bits (torch.equal would take -0.0 for +0.0).
_BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def _awkward_values(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """(2, 5, 3 * 8) values on the flat projection layout: ordinary, signed zeros, a zero head, tiny and huge norms."""
    v = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    v[0, 0, :8] = 0.0  # a zero vector: phi = 0
    v[0, 1, 3] = -0.0
    v[0, 2, 8:16] *= 1e-3  # ||v||^2 << C: phi ~ r / C
    v[1, 0, 16:] *= 1e3 if dtype == torch.float16 else 1e18  # phi -> 1; 1e18 overflows ||v||^2 in float32
    return v.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_backward_mode_returns_the_values_bit_for_bit(dtype):
    m = VScale(num_kv_heads=3, head_dim=8, hidden_size=16, mode="backward").to(dtype)
    v = _awkward_values(dtype).requires_grad_()
    out = m(v)
    assert out.dtype == dtype and out.shape == v.shape and out.requires_grad
    assert torch.equal(out.detach().view(_BITS[dtype]), v.detach().view(_BITS[dtype]))  # -0.0 stays -0.0 too


def _phi_v_vjp_float64(v: torch.Tensor, c: float, upstream: torch.Tensor) -> torch.Tensor:
    """Written here from SPEC 1, independent of the module: the vector-Jacobian product of v -> phi*v in float64."""
    v64 = v.detach().double().unflatten(-1, (-1, 8)).requires_grad_()
    r = (v64 * v64).sum(-1, keepdim=True)
    (grad,) = torch.autograd.grad(v64 * r / (r + c), v64, upstream.double().unflatten(-1, (-1, 8)))
    return grad.flatten(-2)


# The module computes in float32 (bfloat16 rounds its input gradient to 8 significant bits).
_GRAD_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_mode_gradient_is_fixed_modes_phi_v_jacobian(dtype):
    backward = VScale(num_kv_heads=3, head_dim=8, hidden_size=16, mode="backward").to(dtype)
    fixed = VScale(num_kv_heads=3, head_dim=8, hidden_size=16, mode="fixed").to(dtype)
    v = _awkward_values(dtype, seed=1)
    v[1, 0, 16:] = v[1, 1, 16:]  # a float32-overflowing norm has no finite float64 Jacobian to compare with
    upstream = torch.randn(v.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    grads = {}
    for name, m in (("backward", backward), ("fixed", fixed)):
        x = v.clone().requires_grad_()
        m(x).backward(upstream)
        grads[name] = x.grad
    assert grads["backward"].dtype == dtype
    assert torch.equal(grads["backward"], grads["fixed"])  # the same float32 phi*v graph, differentiated alike
    expected = _phi_v_vjp_float64(v, 16 * 8 * 0.02**2, upstream)  # C = d_model * d_head * sigma^2, lambda = 1
    tol = _GRAD_TOLERANCE[dtype]
    torch.testing.assert_close(grads["backward"].double(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    assert (grads["backward"].double() - upstream.double()).abs().max() > 0.1  # not the identity's gradient


def test_backward_only_values_follows_the_gradient_of_the_scaled_tensor_alone():
    v = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    scaled = vscale_values(v, 2.0)
    out = backward_only_values(v, scaled)
    assert torch.equal(out, v)
    jac = jacobian(lambda x: backward_only_values(x, vscale_values(x, 2.0)), v[0].detach())
    torch.testing.assert_close(jac, jacobian(lambda x: vscale_values(x, 2.0), v[0].detach()), rtol=0, atol=0)


def test_backward_mode_huge_values_stay_finite_forward_and_backward():
    m = VScale(num_kv_heads=1, head_dim=8, hidden_size=16, mode="backward")
    v = torch.full((2, 8), 1e20, requires_grad=True)  # ||v||^2 overflows float32
    out = m(v)
    out.sum().backward()
    assert torch.equal(out, v.detach()) and torch.isfinite(v.grad).all()


def test_module_applies_lambda_per_kv_head_on_the_flat_projection_layout():
    m = VScale(num_kv_heads=2, head_dim=4, hidden_size=32, mode="learned", sigma=0.05).double()
    with torch.no_grad():
        m.theta.copy_(torch.tensor([-1.0, 2.0]))
    v = torch.randn(2, 7, 8, dtype=torch.float64)
    out = m(v)
    c0 = 32 * 4 * 0.05**2
    for h, lam in enumerate([math.exp(-1.0), math.exp(2.0)]):
        head = v[..., 4 * h : 4 * (h + 1)]
        r = (head**2).sum(-1, keepdim=True)
        torch.testing.assert_close(out[..., 4 * h : 4 * (h + 1)], head * r / (r + c0 * lam), rtol=1e-12, atol=0)


def test_theta_gradient_matches_float64_finite_differences():
    m = VScale(num_kv_heads=2, head_dim=4, hidden_size=8, mode="learned").double()
    v = torch.randn(5, 8, dtype=torch.float64) * 0.1
    theta = torch.tensor([0.3, -0.4], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: functional_call(m, {"theta": t}, (v,)), (theta,))


def test_reset_parameters_restores_the_paper_init():
    m = VScale(num_kv_heads=2, head_dim=4, hidden_size=8)
    with torch.no_grad():
        m.theta.fill_(3.0)
    m.reset_parameters()
    assert torch.equal(m.theta.detach(), torch.zeros(2))


@pytest.mark.parametrize(("kwargs", "message"), [({"mode": "adaptive"}, "mode"), ({"sigma": 0.0}, "sigma")])
def test_bad_settings_are_rejected_with_the_allowed_values(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        VScale(num_kv_heads=1, head_dim=4, hidden_size=8, **kwargs)
    if message == "mode":
        assert all(mode in str(err.value) for mode in MODES)
