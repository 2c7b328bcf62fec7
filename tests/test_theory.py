"""theory's predictions against autograd on wide nets built to match them."""

import math

import pytest
import torch

from gradwatch import theory
from gradwatch.nets import ACTIVATIONS, build
from gradwatch.spec import ModelSpec


def _phi(name):
    return ACTIVATIONS[name]().double()


@pytest.mark.parametrize("depth", [1, 5, 10])
def test_sigmoid_bound_is_reached_where_every_sigmoid_sits_at_its_steepest_and_never_passed(depth):
    """A chain of sigmoids with identity weights: biases of -0.5 put every pre-activation at 0 (the
    slope's peak), where autograd's gradient ratio is the bound; anywhere else it is below it."""
    sigmoid = ACTIVATIONS["sigmoid"]()

    def chain(x):
        h = sigmoid(x)
        for _ in range(depth - 1):
            h = sigmoid(h - 0.5)
        return h

    at_peak = torch.zeros(1, requires_grad=True)
    (slope,) = torch.autograd.grad(chain(at_peak).sum(), at_peak)
    assert slope.item() == pytest.approx(theory.sigmoid_bound(depth), rel=1e-6)
    elsewhere = torch.linspace(-4, 4, 81, requires_grad=True)
    (slopes,) = torch.autograd.grad(chain(elsewhere).sum(), elsewhere)
    assert slopes.max().item() <= theory.sigmoid_bound(depth) * (1 + 1e-6)


@pytest.mark.parametrize(("name", "sigma_w2", "expected"), [
    ("relu", 2.0, 1.0),  # He et al. 2015: the init that keeps ReLU's gradient norm
    ("relu", 1.0, 0.5),  # Glorot on a square layer: half of it lost per layer
    ("linear", 1.0, 1.0),
    ("leaky_relu", 2.0, 1.0001),  # (1 + 0.01^2) / 2 * 2
])
def test_chi_closed_forms(name, sigma_w2, expected):
    assert theory.chi(_phi(name), sigma_w2) == pytest.approx(expected, rel=1e-6)


def test_chi_predicts_the_gradient_ratio_of_a_wide_deep_net():
    """dL/dh at the first hidden layer over the last one, measured by autograd, against chi^((L-1)/2)."""
    depth, width = 8, 512
    spec = ModelSpec(depth=depth, width=width, activation="relu", init="glorot_normal")
    torch.manual_seed(0)
    net = build(spec, width, 1)
    hidden = []

    def keep(_module, _inputs, out):
        out.retain_grad()
        hidden.append(out)

    for i in range(1, depth + 1):
        getattr(net, f"act{i}").register_forward_hook(keep)
    net(torch.randn(64, width)).pow(2).sum().backward()
    measured = hidden[0].grad.norm().item() / hidden[-1].grad.norm().item()
    predicted = theory.predicted_ratio(theory.chi(_phi("relu"), 1.0), depth)
    assert measured == pytest.approx(predicted, rel=0.3)
    assert theory.depth_scale(0.5) == pytest.approx(1 / math.log(2))
    assert theory.depth_scale(1.0) == math.inf


def test_jacobian_singular_values_of_a_linear_map_are_the_matrix_s():
    torch.manual_seed(0)
    w = torch.randn(6, 6)
    values = theory.jacobian_singular_values(lambda h: w @ h, torch.randn(3, 6))
    assert values.shape == (3, 6)
    assert torch.allclose(values, torch.linalg.svdvals(w).expand(3, 6), atol=1e-5)
    assert theory.spectral_norm(w) == pytest.approx(torch.linalg.svdvals(w)[0].item(), rel=1e-6)
    q, _ = torch.linalg.qr(w)
    assert torch.allclose(theory.jacobian_singular_values(lambda h: q @ h, torch.randn(2, 6)), torch.ones(2, 6),
                          atol=1e-5)
