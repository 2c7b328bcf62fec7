"""The probe: one compiled training-mode step on the user's probe batch, its gradient and its layers' outputs.

``GradWatch`` asks it once per measured epoch for the loss's gradient w.r.t. every trainable weight and
for the outputs of the layers it taps (each kernel layer: ``act_rms``; each hidden activation:
saturation and dead units). Keras layers have no forward hooks, so a tapped layer's ``call`` is wrapped
for the duration of the forward only: under ``jax.jit``, ``tf.function`` and ``torch.jit.trace`` that is
the one trace, and the compiled step returns the outputs it saw. Compiled, because the eager probe ran
Keras's per-layer Python once more per epoch, which cost the seed's 7-step epochs 1.28x to 1.6x.
"""

from __future__ import annotations

import warnings
from functools import partial

import keras
import numpy as np
import torch


def _forward(model: keras.Model, taps: dict[str, keras.Layer], values: list, state: list, probe, loss: bool = True):
    """(the compiled loss, the model's output, {tapped layer: its output}) on the probe in training mode.

    Training mode, because its gradient is the one the optimizer applies: in inference mode batch norm
    divides by moving statistics that lag the weights (momentum 0.99), and a batch-norm net that trains
    well read vanishing at the start and exploding later. Through ``stateless_call`` and
    ``stateless_compute_loss``: the forward reads ``values`` as the trainable weights (so autodiff can
    differentiate it), and the state it updates (batch-norm moving statistics, dropout's seed, the loss
    tracker) is returned and dropped, so measuring leaves ``fit``'s own training untouched. A layer called
    twice keeps its first output, as the PyTorch watcher's probes do.
    """
    seen: dict[str, object] = {}

    def tap(name: str, call, *args, **kwargs):
        out = call(*args, **kwargs)
        if hasattr(out, "shape") and hasattr(out, "dtype"):  # one tensor: not an RNN's (output, state) tuple
            seen.setdefault(name, out)
        return out

    for name, layer in taps.items():
        layer.__dict__["call"] = partial(tap, name, layer.call)  # an instance attribute shadows the method
    try:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(tuple(probe))
        y_pred, _ = model.stateless_call(values, state, x, training=True)
        value = None
        if loss:
            metrics = [v.value for v in model.metrics_variables]
            value, _ = model.stateless_compute_loss(values, state, metrics, x=x, y=y, y_pred=y_pred,
                                                    sample_weight=sample_weight, training=True)
    finally:
        for layer in taps.values():
            layer.__dict__.pop("call", None)
    return value, y_pred, seen


class _Traced:
    """``forward`` as a TorchScript graph, traced on its first call: Keras's per-layer Python runs once.

    Every weight, state value and probe tensor is an input of the graph, never a constant baked in.
    Unseeded dropout draws from torch's global generator inside the graph, as it does eagerly.
    """

    def __init__(self, forward):
        self.forward, self.graph = forward, None

    def __call__(self, values: list, state: list, probe: tuple):
        flat, n, m = (*values, *state, *probe), len(values), len(state)
        if self.graph is None:
            def flat_forward(*t):
                loss, _, outputs = self.forward(list(t[:n]), list(t[n : n + m]), t[n + m :])
                return loss, outputs

            with warnings.catch_warnings():  # shape checks read as constants: right for one fixed probe
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                self.graph = torch.jit.trace(flat_forward, flat, check_trace=False, strict=False)
        return self.graph(*flat)


def _torch(forward, compiled: bool):
    """``torch.autograd.grad`` of the (traced) forward's loss: leaves ``.grad`` untouched, so fit's step is unaffected.

    Keras's unseeded torch dropout draws from torch's global generator: forked, so fit's masks stay its own.
    """
    run = _Traced(forward) if compiled else lambda v, s, p: forward(v, s, p)[::2]

    def step(values, state, probe):
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.enable_grad(), torch.random.fork_rng(devices):
            loss, outputs = run(values, state, probe)
            grads = torch.autograd.grad(loss, values, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(values, grads, strict=True)], outputs

    return step


def _tensorflow(forward, compiled: bool):
    """``GradientTape`` as in Keras's tensorflow ``train_step``, inside one ``tf.function``."""
    import tensorflow as tf

    def step(values, state, probe):
        values = [tf.identity(v) for v in values]
        with tf.GradientTape() as tape:
            tape.watch(values)
            loss, _, outputs = forward(values, state, probe)
        return tape.gradient(loss, values, unconnected_gradients=tf.UnconnectedGradients.ZERO), outputs

    return tf.function(step) if compiled else step


def _jax(forward, compiled: bool):
    """``jax.value_and_grad`` of the loss as a function of the trainable weights, as Keras's jax ``train_step``."""
    import jax

    def step(values, state, probe):
        def loss(vs):
            value, _, outputs = forward(vs, state, probe)
            return value, outputs

        (_, outputs), grads = jax.value_and_grad(loss, has_aux=True)(values)
        return grads, outputs

    return jax.jit(step) if compiled else step


# Keras backend -> make(forward, compiled) -> step(values, state, probe) -> (one gradient per trainable
# variable, {tapped layer: output}). numpy and openvino have no autodiff.
GRADIENTS = {"torch": _torch, "tensorflow": _tensorflow, "jax": _jax}


def host(value) -> torch.Tensor:
    """A float64 CPU copy of a backend tensor or Keras variable (a copy: a snapshot never aliases a weight).

    float64, because the norms of finite float32 values overflow: a 10 x 10 kernel of 1e19 has a float32
    L2 norm of Inf, which the diagnosis would read as a NaN/Inf that never happened.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64, copy=True)
    return torch.from_numpy(np.array(keras.ops.convert_to_numpy(value), dtype=np.float64))


def check(probe, model: keras.Model) -> None:
    """Refuse a bad probe in one line that names it and what is expected, before fit's first step.

    Keras's own error would come from inside the first probe, mid-``fit``, without naming the probe.
    """
    want = getattr(model, "input_shape", None) if model.built else None  # a subclassed model may not know it
    allowed = f"allowed: (x, y) or (x, y, sample_weight), one row per example, x of shape {want or '(n, ...)'}"
    if not isinstance(probe, (tuple, list)) or len(probe) not in (2, 3):
        got = f"a {type(probe).__name__}" + (f" of {len(probe)}" if isinstance(probe, (tuple, list)) else "")
        raise ValueError(f"probe: got {got}; {allowed}")
    shapes = [tuple(a.shape) if hasattr(a, "shape") else np.shape(a) for a in probe]
    width_ok = not isinstance(want, tuple) or (len(want) == len(shapes[0]) and all(
        w in (None, g) for w, g in zip(want[1:], shapes[0][1:], strict=True)))
    if len({s[:1] for s in shapes}) != 1 or not shapes[0] or not width_ok:
        raise ValueError(f"probe: got shapes {', '.join(map(str, shapes))}; {allowed}")


class Probe:
    """The gradient of ``variables`` and the outputs of ``taps`` on one probe batch, for one fit of one model.

    The step is compiled on the first measure (a trace, once per fit) and reused every epoch after.
    """

    def __init__(self, model: keras.Model, probe, variables: list, taps: dict[str, keras.Layer]):
        check(probe, model)
        self.model, self.probe = model, tuple(keras.ops.convert_to_tensor(a) for a in probe)
        index = {id(v): i for i, v in enumerate(model.trainable_variables)}
        self.picked = [index[id(v)] for v in variables]
        self.forward = partial(_forward, model, taps)
        make = GRADIENTS[keras.backend.backend()]
        self.step, self.eager = make(self.forward, True), make(self.forward, False)

    def measure(self) -> tuple[list[torch.Tensor] | None, dict[str, torch.Tensor]]:
        """(the picked gradients, the tapped outputs) as float64 CPU tensors.

        A step that raises on the model's own numbers (torch's binary cross-entropy refuses a NaN
        prediction) gives ``None`` for the gradients and the NaN/Inf outputs, for the diagnosis to report;
        on finite numbers a compiled step that raises is given up for the eager one, which may raise.
        """
        values = [v.value for v in self.model.trainable_variables]
        state = [v.value for v in self.model.non_trainable_variables]
        try:
            grads, outputs = self.step(values, state, self.probe)
        except Exception:  # noqa: BLE001 - whatever the backend raises, the numbers decide what it was
            with torch.no_grad():  # a no-op off the torch backend
                _, y_pred, outputs = self.forward(values, state, self.probe, loss=False)
            outputs = {name: host(t) for name, t in outputs.items()}
            if not all(torch.isfinite(t).all() for t in [host(y_pred), *outputs.values()]):  # sync: failures only
                return None, outputs
            if self.step is self.eager:
                raise
            self.step = self.eager
            grads, outputs = self.step(values, state, self.probe)
        return [host(grads[i]) for i in self.picked], {name: host(t) for name, t in outputs.items()}
