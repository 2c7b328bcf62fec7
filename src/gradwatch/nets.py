"""ACTIVATIONS, INITS and OUTPUTS tables, and ``build(model_spec)``: a Spec becomes a torch module.

Layers are named as in the seed's Keras tables: ``dense1 .. denseL`` then ``out`` (with ``norm<i>`` and
``act<i>`` beside them), so records, figures and diagnoses read ``dense1`` rather than ``layers.0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gradwatch.spec import ModelSpec

# name -> module factory. The derivative of each is tested against its closed form.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "prelu": lambda: nn.PReLU(init=0.25),  # He et al. 2015's initial slope
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "linear": nn.Identity,
}

# model.activation -> torch RNNCell's nonlinearity, which has only these two: every activation not
# listed here runs as tanh in a plain RNN (LSTM and GRU cells fix their own gates and ignore it)
RNN_NONLINEARITY = {"relu": "relu", "tanh": "tanh"}


def _default(w: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # what nn.Linear.reset_parameters does


def _lecun_normal(w: torch.Tensor) -> None:
    nn.init.normal_(w, 0.0, 1.0 / math.sqrt(w.shape[1]))  # LeCun et al. 1998, SELU's partner


# name -> in-place initialiser of a (fan_out, fan_in) weight; each promises a variance that
# tests/test_nets.py measures on a wide layer (Glorot & Bengio 2010; He et al. 2015).
INITS: dict[str, Callable[[torch.Tensor], None]] = {
    "default": _default,
    "glorot_uniform": nn.init.xavier_uniform_,
    "glorot_normal": nn.init.xavier_normal_,
    "he_uniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
    "he_normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
    "lecun_normal": _lecun_normal,
    "orthogonal": nn.init.orthogonal_,
}

# init -> Var(w) x fan_in on a square layer: mean field's sigma_w^2 (times init_gain^2) for that init
SCALE = {"default": 1 / 3, "glorot_uniform": 1.0, "glorot_normal": 1.0, "he_uniform": 2.0, "he_normal": 2.0,
         "lecun_normal": 1.0, "orthogonal": 1.0}


def sigma_w2(spec: ModelSpec) -> float:
    """The mean-field weight scale sigma_w^2 = Var(w) x fan_in that ``spec``'s init gives a square layer."""
    return spec.sigma_w2 if spec.sigma_w2 is not None else SCALE[spec.init] * spec.init_gain**2


def _bce(z, y, reduction: str = "mean"):
    return F.binary_cross_entropy_with_logits(z, y, reduction=reduction)


def _tanh_mse(z, y, reduction: str = "mean"):
    return F.mse_loss(torch.tanh(z), 2 * y - 1, reduction=reduction)


# output activation -> (loss on the pre-activation z, prediction from z). Sigmoid + BCE is fused
# (BCE-with-logits) for the same reason Keras clips probabilities: log(sigmoid) underflows. Each
# loss takes torch's ``reduction``, so the stacked ensembles take one loss per member from it.
OUTPUTS: dict[str, tuple[Callable, Callable]] = {
    "sigmoid": (_bce, lambda z: (z > 0).float()),
    "softmax": (F.cross_entropy, lambda z: z.argmax(-1)),
    "tanh": (_tanh_mse, lambda z: (z > 0).float()),
    "linear": (F.mse_loss, lambda z: (z > 0.5).float()),  # binary targets 0/1: the midpoint; regression has none
}


def init_(linear: nn.Linear | nn.Module, spec: ModelSpec) -> None:
    """Initialise one Dense layer's weight and bias per ``spec``.

    The weight's scale is ``init_gain``, or sqrt(``sigma_w2``) on a unit-scale init (mean field's
    W ~ (0, sigma_w2 / fan_in)); the bias is ``bias_init``, plus N(0, ``sigma_b2``) noise if asked.
    """
    with torch.no_grad():
        INITS[spec.init](linear.weight)
        linear.weight.mul_(spec.init_gain if spec.sigma_w2 is None else math.sqrt(spec.sigma_w2))
        if spec.init != "default" or spec.bias_init:
            linear.bias.fill_(spec.bias_init)  # Keras: zeros
        if spec.sigma_b2:
            linear.bias.normal_(spec.bias_init, math.sqrt(spec.sigma_b2))


def _output(spec: ModelSpec) -> ModelSpec:
    """The output layer's init: the hidden layers' weights, no bias offset or noise."""
    return spec.model_copy(update={"bias_init": 0.0, "sigma_b2": 0.0})


class MLP(nn.Module):
    """``depth`` x (Dense -> norm -> activation [+ skip]) -> Dense ``out``; returns pre-activations.

    With ``residual`` each hidden block adds its input back (He et al. 2016) wherever the shapes
    match, i.e. from the second hidden layer on.
    """

    def __init__(self, spec: ModelSpec, n_in: int, n_out: int):
        super().__init__()
        self.depth, self.residual = spec.depth, spec.residual
        width = n_in
        for i in range(1, spec.depth + 1):
            self.add_module(f"dense{i}", nn.Linear(width, spec.width))
            init_(self.get_submodule(f"dense{i}"), spec)
            if spec.norm != "none":
                norm = nn.BatchNorm1d(spec.width) if spec.norm == "batch" else nn.LayerNorm(spec.width)
                self.add_module(f"norm{i}", norm)
            self.add_module(f"act{i}", ACTIVATIONS[spec.activation]())
            width = spec.width
        self.out = nn.Linear(width, n_out)
        init_(self.out, _output(spec))

    def redraw_(self, spec: ModelSpec) -> None:
        """Draw the Dense layers' weights again, as construction draws them and in its order.

        Under one ``torch.manual_seed``, ``build(spec)`` and a built net's ``redraw_(spec)`` give the
        same weights (no other module draws at construction), without constructing modules: most of
        a stacked ensemble's setup, which builds one member after another (ensemble/stack.py).
        """
        for i in range(1, self.depth + 1):
            dense = getattr(self, f"dense{i}")
            dense.reset_parameters()
            init_(dense, spec)
        self.out.reset_parameters()
        init_(self.out, _output(spec))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i in range(1, self.depth + 1):
            z = getattr(self, f"dense{i}")(h)
            if hasattr(self, f"norm{i}"):
                z = getattr(self, f"norm{i}")(z)
            z = getattr(self, f"act{i}")(z)
            h = h + z if self.residual and h.shape == z.shape else z
        return self.out(h)


CELLS = {"rnn": nn.RNNCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}


class Recurrent(nn.Module):
    """One recurrent ``cell`` unrolled step by step, then Dense ``out`` on the last hidden state.

    Unrolling by hand (instead of ``nn.RNN``) keeps every hidden state h_t in the graph, so the
    watcher reads dL/dh_t for each t (the ``state_signal`` entries): the temporal gradient-flow
    picture of Pascanu et al. (2013). ``init_gain`` scales the recurrent weights, the knob that makes an RNN explode.
    """

    def __init__(self, spec: ModelSpec, n_in: int, n_out: int):
        super().__init__()
        kwargs = {"nonlinearity": RNN_NONLINEARITY.get(spec.activation, "tanh")} if spec.kind == "rnn" else {}
        self.kind = spec.kind
        self.cell = CELLS[spec.kind](n_in, spec.width, **kwargs)
        with torch.no_grad():
            if spec.init != "default":
                INITS[spec.init](self.cell.weight_ih)
                INITS[spec.init](self.cell.weight_hh)
            self.cell.weight_hh.mul_(spec.init_gain)
            if spec.kind == "lstm":  # forget-gate bias 1: remember by default (Jozefowicz et al. 2015)
                for bias in (self.cell.bias_ih, self.cell.bias_hh):
                    bias[spec.width : 2 * spec.width] = 0.5
        self.out = nn.Linear(spec.width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, F)
        h = None
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return self.out(h[0] if self.kind == "lstm" else h)


def build(spec: ModelSpec, n_in: int, n_out: int) -> nn.Module:
    """The module ``spec`` describes; call under ``torch.manual_seed`` for a reproducible init."""
    return (MLP if spec.kind == "mlp" else Recurrent)(spec, n_in, n_out)
