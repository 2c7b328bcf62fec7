"""Mean field against the papers' numbers and against wide random nets built by nets.build."""

import math

import pytest
import torch

from gradwatch.nets import ACTIVATIONS, build
from gradwatch.spec import ModelSpec
from gradwatch.theory import meanfield as mf
from gradwatch.theory import spectrum


def _phi(name):
    return ACTIVATIONS[name]().double()


def test_critical_sigma_w2_of_tanh_is_schoenholz_s():
    """Schoenholz et al. 2017, Fig. 1: the edge of chaos of tanh at sigma_b^2 = 0.05 is sigma_w^2 ~ 1.76."""
    critical = mf.critical_sigma_w2(_phi("tanh"), 0.05)
    assert critical == pytest.approx(1.76, abs=0.02)
    assert mf.chi_1(_phi("tanh"), critical, 0.05) == pytest.approx(1.0, abs=1e-6)


def test_chi_1_is_one_at_he_s_point_for_relu_and_half_at_glorot_s():
    assert mf.chi_1(_phi("relu"), 2.0, 0.0) == pytest.approx(1.0, rel=1e-9)
    assert mf.chi_1(_phi("relu"), 1.0, 0.05) == pytest.approx(0.5, rel=1e-9)
    assert mf.critical_sigma_w2(_phi("relu"), 0.0) == pytest.approx(2.0, rel=1e-6)


def test_q_star_of_relu_has_its_closed_form():
    """ReLU halves E[z^2]: q* = sigma_b2 / (1 - sigma_w2 / 2) below He's point."""
    assert mf.q_star(_phi("relu"), 1.0, 0.1) == pytest.approx(0.2, rel=1e-6)
    assert mf.q_star(_phi("linear"), 0.5, 0.1) == pytest.approx(0.2, rel=1e-6)


def test_xi_c_diverges_at_the_edge_of_chaos_and_is_finite_on_both_sides():
    tanh, critical = _phi("tanh"), mf.critical_sigma_w2(_phi("tanh"), 0.05)
    near = mf.xi_c(tanh, critical * 1.001, 0.05)
    assert near > 200
    for sigma_w2 in (1.0, 3.0):
        assert 2 < mf.xi_c(tanh, sigma_w2, 0.05) < 20 < near
    assert mf.c_star(tanh, 1.0, 0.05) == 1.0  # order: inputs become one
    assert 0.0 < mf.c_star(tanh, 3.0, 0.05) < 0.5  # chaos: they decorrelate
    assert mf.xi_c(_phi("relu"), 1.0, 0.0) == pytest.approx(1 / math.log(2))
    assert 0 < mf.xi_q(tanh, 3.0, 0.05) < 5


def test_correlation_map_matches_two_inputs_through_a_wide_layer():
    torch.manual_seed(0)
    width, sigma_w2, sigma_b2, c, draws = 800, 2.5, 0.05, 0.3, 16
    q = mf.q_star(_phi("tanh"), sigma_w2, sigma_b2)
    z1, z2 = torch.randn(2, draws, width, dtype=torch.float64)
    h = torch.tanh(math.sqrt(q) * torch.stack([z1, c * z1 + math.sqrt(1 - c * c) * z2], 1))  # (draws, 2, width)
    w = torch.randn(draws, width, width, dtype=torch.float64) * math.sqrt(sigma_w2 / width)
    out = h @ w.transpose(1, 2) + torch.randn(draws, 1, width, dtype=torch.float64) * math.sqrt(sigma_b2)
    measured = float((out[:, 0] * out[:, 1]).mean() / out.square().mean())
    assert measured == pytest.approx(mf.correlation_map(_phi("tanh"), sigma_w2, sigma_b2, c), abs=0.015)


def _measured_profile(spec: ModelSpec, n_in: int, repeats: int = 8) -> float:
    """First over last hidden layer's weight-gradient norm, RMS over single examples and seeds."""
    ratios = []
    for seed in range(repeats):
        torch.manual_seed(seed)
        net = build(spec, n_in, 10).double()
        x = torch.randn(1, n_in, dtype=torch.float64)
        (net(x) * torch.randn(1, 10, dtype=torch.float64)).sum().backward()
        first, last = net.dense1.weight.grad.norm(), getattr(net, f"dense{spec.depth}").weight.grad.norm()
        ratios.append(float(first / last) ** 2)
    return math.sqrt(sum(ratios) / len(ratios))


@pytest.mark.parametrize(("activation", "sigma_w2", "sigma_b2"), [
    ("tanh", 1.3, 0.05),  # ordered: vanishes by orders of magnitude over 50 layers
    ("tanh", 1.76, 0.05),  # the edge of chaos
    ("tanh", 3.0, 0.05),  # chaotic: grows
    ("relu", 1.8, 0.0),
])
def test_gradient_profile_predicts_a_50_layer_random_net_within_2x(activation, sigma_w2, sigma_b2):
    depth, width, n_in = 50, 256, 64
    spec = ModelSpec(depth=depth, width=width, activation=activation, init="lecun_normal", sigma_w2=sigma_w2,
                     sigma_b2=sigma_b2, output_activation="softmax")
    predicted = mf.gradient_profile(_phi(activation), sigma_w2, sigma_b2, depth, 1.0, n_in, width)[0]
    measured = _measured_profile(spec, n_in)
    assert predicted / 2 < measured < predicted * 2, (predicted, measured)


@pytest.mark.parametrize("init", sorted(spectrum.SPREAD))
def test_spectrum_moments_match_the_free_model_they_summarise(init):
    tanh, sigma_b2 = _phi("tanh"), 0.05
    sigma_w2 = mf.critical_sigma_w2(tanh, sigma_b2)
    mean, variance = spectrum.moments(tanh, sigma_w2, sigma_b2, 6, init)
    squares = spectrum.free_samples(tanh, sigma_w2, sigma_b2, 6, init, 400, draws=3) ** 2
    assert mean == pytest.approx(1.0, abs=1e-3)  # chi_1 = 1 at the edge of chaos
    assert float(squares.mean()) == pytest.approx(mean, rel=0.1)
    assert float(squares.var()) == pytest.approx(variance, rel=0.25)


def test_orthogonal_critical_tanh_is_isometric_where_gaussian_is_not():
    """Pennington et al. 2017, Fig. 3: at depth 64 orthogonal weights keep the spectrum near 1."""
    tanh, sigma_b2 = _phi("tanh"), 1e-3
    sigma_w2 = mf.critical_sigma_w2(tanh, sigma_b2)
    spread = {init: spectrum.max_over_median(spectrum.free_samples(tanh, sigma_w2, sigma_b2, 64, init, 96, 1))
              for init in spectrum.SPREAD}
    assert spread["orthogonal"] < 20 and spread["gaussian"] > 1000 * spread["orthogonal"]
