"""TREATMENTS: each remedy the diagnosis names, as a change to the user's own model or optimizer.

A treatment works on any ``nn.Module`` by surgery on its submodules (swap an activation module,
re-initialise the layers, wrap a layer with normalisation or a residual path), or changes the
optimizer or the clipping around it. It returns a ``Plan`` for a trial, or a sentence saying why it
does not apply to this model (no sigmoid modules to swap: the activations may be functional calls).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from gradwatch import stats

Surgery = Callable[[nn.Module, Tensor], None]  # in place, given an input batch
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
SATURATING = tuple(getattr(nn, kind) for kind in stats.SATURATING)  # the modules saturated_frac watches
PASS_THROUGH = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.PReLU, nn.SELU,
                nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.Dropout)  # may follow a layer inside a block


def adam(params) -> torch.optim.Optimizer:
    """The doctor's default optimizer: Adam at lr 1e-3 (Kingma & Ba 2015's default).

    The fused kernel, as ``train.make_optimizer`` uses: on small nets the per-tensor loop costs more
    than the arithmetic, and a trial is mostly small-net steps.
    """
    return torch.optim.Adam(params, lr=1e-3, fused=True)


@dataclass(frozen=True)
class Plan:
    """How a trial builds its model and optimizer: the user's factory, then surgeries, then these."""

    surgeries: tuple[Surgery, ...] = ()
    optimizer: Callable = adam
    clip_norm: float | None = None

    def build(self, make_model: Callable[[], nn.Module], x: Tensor):
        model = make_model()
        for surgery in self.surgeries:
            surgery(model, x)
        return model, self.optimizer(model.parameters()), self.clip_norm


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _named(model: nn.Module, types: tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module of ``types``, the model itself (name "") included."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, types)]


def _swap(types: tuple[type, ...], new: Callable[[], nn.Module]) -> Surgery:
    def surgery(model: nn.Module, _x: Tensor) -> None:
        for name, _ in _named(model, types):
            if name:  # the model itself cannot be swapped from inside
                _set(model, name, new())

    return surgery


def _init(weight_init: Callable[[Tensor], None], types: tuple[type, ...] = LAYERS) -> Surgery:
    """Re-initialise every layer of ``types``: ``weight_init`` on each matrix (2-D and up), biases zero."""

    @torch.no_grad()
    def surgery(model: nn.Module, _x: Tensor) -> None:
        for _, module in _named(model, types):
            for p in module.parameters(recurse=False):
                weight_init(p) if p.dim() >= 2 else p.zero_()

    return surgery


def _he(w: Tensor) -> None:
    nn.init.kaiming_normal_(w, nonlinearity="relu")


def _trace(model: nn.Module, x: Tensor) -> list[str]:
    """Names of the leaf modules in the order one forward pass calls them (a name per call)."""
    calls: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _i, n=n: calls.append(n))
             for n, m in model.named_modules() if n and not list(m.children())]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return calls


@torch.no_grad()
def lsuv(model: nn.Module, x: Tensor, tries: int = 5) -> None:
    """Orthogonal init, then each layer in call order scaled to unit output variance on ``x``.

    Mishkin & Matas (2016), "All you need is a good init": data-driven, so it works on any
    architecture whose layers are Linear or Conv modules.
    """
    _init(nn.init.orthogonal_)(model, x)
    modules = dict(model.named_modules())
    layers = list(dict.fromkeys(n for n in _trace(model, x) if isinstance(modules[n], LAYERS)))
    for name in layers[:-1]:  # the output layer's scale is the loss's business, not the signal's
        layer, seen = modules[name], []
        hook = layer.register_forward_hook(lambda _m, _i, out, seen=seen: seen.append(out.var().item()))  # sync: init
        for _ in range(tries):
            seen.clear()
            model(x)
            if not seen or not 0 < seen[0] < float("inf") or abs(seen[0] - 1) < 0.1:
                break
            layer.weight.div_(seen[0] ** 0.5)
        hook.remove()


class ReZero(nn.Module):
    """``x + alpha * block(x)`` with ``alpha`` starting at 0: the identity at first (Bachlechner et al. 2021)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.alpha * self.block(x)


def residual(model: nn.Module, x: Tensor) -> None:
    """Wrap each shape-preserving Linear (with the activation/norm modules called right after it) in ReZero.

    The call order comes from one traced forward pass; a module called more than once (one activation
    shared by every layer) stays where it is, so only the layer itself is wrapped.
    """
    modules, calls = dict(model.named_modules()), _trace(model, x)
    once = {n for n in calls if calls.count(n) == 1}
    for i, name in enumerate(calls):
        layer = modules[name]
        if not (isinstance(layer, nn.Linear) and layer.in_features == layer.out_features and name in once):
            continue
        followers = []
        for after in calls[i + 1 :]:
            if after not in once or not isinstance(modules[after], PASS_THROUGH):
                break
            followers.append(after)
        _set(model, name, ReZero(nn.Sequential(layer, *(modules[n] for n in followers))))
        for after in followers:
            _set(model, after, nn.Identity())


def batch_norm(model: nn.Module, x: Tensor) -> None:
    """Batch normalisation after every Linear/Conv but the last one called (Ioffe & Szegedy 2015)."""
    modules = dict(model.named_modules())
    layers = list(dict.fromkeys(n for n in _trace(model, x) if isinstance(modules[n], LAYERS)))
    for name in layers[:-1]:
        layer = modules[name]
        norm = (nn.BatchNorm1d(layer.out_features) if isinstance(layer, nn.Linear)
                else getattr(nn, f"BatchNorm{layer.weight.dim() - 2}d")(layer.out_channels))
        _set(model, name, nn.Sequential(layer, norm))


def _gru(model: nn.Module, _x: Tensor) -> None:
    """nn.RNN -> nn.GRU and nn.RNNCell -> nn.GRUCell, same sizes: gates carry the gradient through time."""
    for name, m in _named(model, (nn.RNN, nn.RNNCell)):
        if not name:
            continue
        if isinstance(m, nn.RNN):
            new = nn.GRU(m.input_size, m.hidden_size, m.num_layers, bias=m.bias, batch_first=m.batch_first,
                         dropout=m.dropout, bidirectional=m.bidirectional)
        else:
            new = nn.GRUCell(m.input_size, m.hidden_size, bias=m.bias)
        _set(model, name, new)


@torch.no_grad()
def _forget_bias(model: nn.Module, _x: Tensor) -> None:
    """An LSTM's forget-gate bias to 1 (Jozefowicz et al. 2015): gate order i, f, g, o in torch."""
    for _, m in _named(model, (nn.LSTM, nn.LSTMCell)):
        for pname, p in m.named_parameters():
            if pname.startswith("bias"):
                h = p.shape[0] // 4
                p[h : 2 * h] = 1.0 if pname.startswith("bias_ih") else 0.0


def _lr(factor: float) -> Callable[[Plan], Plan]:
    def change(plan: Plan) -> Plan:
        base = plan.optimizer

        def make(params):
            opt = base(params)
            for group in opt.param_groups:
                group["lr"] *= factor
            return opt

        return replace(plan, optimizer=make)

    return change


def _operate(surgery: Surgery, needs: tuple[type, ...] = (), why: str = "") -> Callable[[Plan, nn.Module], Plan | str]:
    """A treatment that adds ``surgery``, applicable where the model has a module of one of ``needs``."""

    def treat(plan: Plan, model: nn.Module) -> Plan | str:
        if needs and not _named(model, needs):
            return why
        return replace(plan, surgeries=(*plan.surgeries, surgery))

    return treat


def _tune(change: Callable[[Plan], Plan]) -> Callable[[Plan, nn.Module], Plan | str]:
    return lambda plan, _model: change(plan)


def _to_adam(plan: Plan, model: nn.Module) -> Plan | str:
    probe = plan.optimizer(copy.deepcopy(model).parameters())
    if isinstance(probe, torch.optim.Adam | torch.optim.AdamW):
        return "the optimizer is Adam already"
    return replace(plan, optimizer=adam)


ACTIVATIONS_ONLY = "no sigmoid/tanh modules to swap (the activations may be functional calls)"
RELU_ONLY = "no ReLU modules to swap (the activations may be functional calls)"

# remedy name (diagnose.REMEDIES) -> treat(plan, a fresh model) -> the treated Plan, or why it does not apply
TREATMENTS: dict[str, Callable[[Plan, nn.Module], Plan | str]] = {
    "relu_he": lambda plan, model: (ACTIVATIONS_ONLY if not _named(model, SATURATING) else replace(
        plan, surgeries=(*plan.surgeries, _swap(SATURATING, nn.ReLU), _init(_he)))),
    "leaky_relu": _operate(_swap((nn.ReLU,), lambda: nn.LeakyReLU(0.01)), (nn.ReLU,), RELU_ONLY),
    "he_init": _operate(_init(_he), LAYERS, "no Linear/Conv layers to re-initialise"),
    "orthogonal_init": _operate(_init(nn.init.orthogonal_, (*LAYERS, nn.RNNBase, nn.RNNCellBase)),
                                (*LAYERS, nn.RNNBase, nn.RNNCellBase), "no layers to re-initialise"),
    "lsuv": _operate(lsuv, LAYERS, "no Linear/Conv layers to scale"),
    "batch_norm": _operate(batch_norm, LAYERS, "no Linear/Conv layers to normalise"),
    "residual": _operate(residual, (nn.Linear,), "no Linear layers to wrap"),
    "gated_rnn": _operate(_gru, (nn.RNN, nn.RNNCell), "no nn.RNN/nn.RNNCell to swap for a GRU"),
    "forget_bias": _operate(_forget_bias, (nn.LSTM, nn.LSTMCell), "no LSTM"),
    "clip_norm": _tune(lambda plan: replace(plan, clip_norm=1.0)),
    "lower_lr": _tune(_lr(0.1)),
    "much_lower_lr": _tune(_lr(0.01)),
    "higher_lr": _tune(_lr(10.0)),
    "much_higher_lr": _tune(_lr(100.0)),
    "adam": _to_adam,
}
