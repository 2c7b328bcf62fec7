import math

import pytest
import torch

from gradwatch.nets import ACTIVATIONS, INITS, build
from gradwatch.spec import ModelSpec

FAN_IN, FAN_OUT = 1000, 800
# init -> variance it promises for a (FAN_OUT, FAN_IN) weight
PROMISED = {
    "default": 1 / (3 * FAN_IN),  # kaiming_uniform(a=sqrt 5): bound = 1/sqrt(fan_in)
    "glorot_uniform": 2 / (FAN_IN + FAN_OUT),
    "glorot_normal": 2 / (FAN_IN + FAN_OUT),
    "he_uniform": 2 / FAN_IN,
    "he_normal": 2 / FAN_IN,
    "lecun_normal": 1 / FAN_IN,
    "orthogonal": 1 / FAN_IN,  # rows orthonormal: each row has unit norm over FAN_IN entries
}

# activation -> closed-form derivative
DERIVATIVES = {
    "sigmoid": lambda x: torch.sigmoid(x) * (1 - torch.sigmoid(x)),
    "tanh": lambda x: 1 - torch.tanh(x) ** 2,
    "relu": lambda x: (x > 0).float(),
    "leaky_relu": lambda x: torch.where(x > 0, 1.0, 0.01),
    "prelu": lambda x: torch.where(x > 0, 1.0, 0.25),
    "elu": lambda x: torch.where(x > 0, 1.0, torch.exp(x)),
    "selu": lambda x: 1.0507009873554805 * torch.where(x > 0, 1.0, 1.6732632423543772 * torch.exp(x)),
    "gelu": lambda x: 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-(x**2) / 2) / math.sqrt(2 * math.pi),
    "linear": lambda x: torch.ones_like(x),
}


def test_every_table_entry_is_tested():
    assert set(PROMISED) == set(INITS)
    assert set(DERIVATIVES) == set(ACTIVATIONS)


@pytest.mark.parametrize("name", sorted(INITS))
def test_init_gives_the_variance_it_promises(name):
    torch.manual_seed(0)
    w = torch.empty(FAN_OUT, FAN_IN)
    INITS[name](w)
    assert w.var().item() == pytest.approx(PROMISED[name], rel=0.03)
    assert abs(w.mean().item()) < 0.01 * math.sqrt(PROMISED[name]) * 10


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_derivative_matches_closed_form(name):
    x = torch.linspace(-6, 6, 1001).requires_grad_()
    ACTIVATIONS[name]()(x).sum().backward()
    assert torch.allclose(x.grad, DERIVATIVES[name](x.detach()), atol=1e-5)


@pytest.mark.parametrize(("activation", "runs_as"), [("relu", "relu"), ("tanh", "tanh"), ("sigmoid", "tanh"),
                                                     ("elu", "tanh")])
def test_a_plain_rnn_runs_relu_or_tanh_and_every_other_activation_as_tanh(activation, runs_as):
    model = build(ModelSpec(kind="rnn", width=6, activation=activation), 2, 1)
    assert model.cell.nonlinearity == runs_as
    x, h = torch.randn(4, 2), torch.randn(4, 6)
    cell = model.cell
    pre = x @ cell.weight_ih.T + cell.bias_ih + h @ cell.weight_hh.T + cell.bias_hh
    assert torch.allclose(cell(x, h), torch.relu(pre) if runs_as == "relu" else torch.tanh(pre), atol=1e-6)


def test_mlp_layers_are_named_like_the_seed_tables():
    model = build(ModelSpec(depth=3, norm="batch"), 2, 1)
    names = [n for n, _ in model.named_children()]
    assert names == ["dense1", "norm1", "act1", "dense2", "norm2", "act2", "dense3", "norm3", "act3", "out"]


def test_keras_defaults_zero_bias_and_gain_scales_weights():
    torch.manual_seed(0)
    plain = build(ModelSpec(depth=2), 2, 1)
    torch.manual_seed(0)
    scaled = build(ModelSpec(depth=2, init_gain=3.0, bias_init=-2.0), 2, 1)
    assert torch.all(plain.dense1.bias == 0)
    assert torch.allclose(scaled.dense1.weight, 3 * plain.dense1.weight)
    assert torch.all(scaled.dense2.bias == -2.0) and torch.all(scaled.out.bias == 0)


def test_residual_adds_the_block_input():
    torch.manual_seed(0)
    model = build(ModelSpec(depth=2, activation="linear", residual=True), 3, 1)
    x = torch.randn(4, 3)
    h1 = model.dense1(x)
    expected = model.out(h1 + model.dense2(h1))
    assert torch.allclose(model(x), expected, atol=1e-6)


def test_sigma_w2_and_sigma_b2_set_the_mean_field_scale():
    spec = ModelSpec(depth=2, width=FAN_IN, init="lecun_normal", sigma_w2=1.76, sigma_b2=0.05, bias_init=0.5)
    torch.manual_seed(0)
    net = build(spec, FAN_IN, 3)
    assert net.dense2.weight.var().item() * FAN_IN == pytest.approx(1.76, rel=0.03)
    assert net.dense2.bias.var().item() == pytest.approx(0.05, rel=0.15)
    assert net.dense2.bias.mean().item() == pytest.approx(0.5, abs=0.03)
    assert net.out.bias.abs().max().item() == 0.0


@pytest.mark.parametrize("name", sorted(INITS))
def test_scale_is_the_variance_times_fan_in_of_a_square_layer(name):
    from gradwatch.nets import SCALE, sigma_w2

    torch.manual_seed(0)
    w = torch.empty(FAN_IN, FAN_IN)
    INITS[name](w)
    assert w.var().item() * FAN_IN == pytest.approx(SCALE[name], rel=0.03)
    assert sigma_w2(ModelSpec(init=name, init_gain=2.0)) == pytest.approx(4 * SCALE[name])


@pytest.mark.parametrize("model", [
    ModelSpec(),
    ModelSpec(init="default", depth=3, width=7),
    ModelSpec(init="orthogonal", sigma_w2=1.76, sigma_b2=0.05, activation="tanh"),
    ModelSpec(init="he_normal", bias_init=0.1, activation="prelu", norm="batch", residual=True),
], ids=["seed", "default", "sigma", "prelu_norm"])
def test_redraw_draws_what_a_fresh_build_draws(model):
    """The stacked ensembles build one net and redraw it per member: any other draw order changes every seed."""
    torch.manual_seed(3)
    net = build(model, 2, 1)
    other = build(model, 2, 1)  # moves the generator on, so a redraw that drew nothing would differ
    torch.manual_seed(7)
    net.redraw_(model)
    torch.manual_seed(7)
    fresh = build(model, 2, 1)
    assert net.state_dict().keys() == fresh.state_dict().keys()
    for name, value in fresh.state_dict().items():
        assert torch.equal(net.state_dict()[name], value), name
    assert not torch.equal(other.dense1.weight, fresh.dense1.weight)
