"""The probe: one compiled training-mode step on the user's probe batch, its gradient and its layers' outputs.

``GradWatch`` asks it once per measured epoch for the loss's gradient w.r.t. every trainable weight and
for the outputs of the layers it taps (each kernel layer: ``act_rms``; each hidden activation:
saturation and dead units). Keras layers have no forward hooks, so a tapped layer's ``call`` is wrapped
for the duration of the forward only: under ``jax.jit``, ``tf.function`` and ``torch.jit.trace`` that is
the one trace, and the compiled step returns the outputs it saw. Compiled, because the eager probe ran
Keras's per-layer Python once more per epoch, which cost the seed's 7-step epochs 1.28x to 1.6x.
"""

from __future__ import annotations

import json
import math
import warnings
from functools import partial

import keras
import numpy as np
import torch


def _forward(model: keras.Model, taps: list[keras.Layer], values: list, state: list, probe, loss: bool = True):
    """(the compiled loss, the model's output, {tapped layer's position in ``taps``: its output}) on the probe
    in training mode (positions, not names: a step traced on one model serves another of its structure).

    Training mode, because its gradient is the one the optimizer applies: in inference mode batch norm
    divides by moving statistics that lag the weights (momentum 0.99), and a batch-norm net that trains
    well read vanishing at the start and exploding later. Through ``stateless_call`` and
    ``stateless_compute_loss``: the forward reads ``values`` as the trainable weights (so autodiff can
    differentiate it), and the state it updates (batch-norm moving statistics, dropout's seed, the loss
    tracker) is returned and dropped, so measuring leaves ``fit``'s own training untouched. A layer called
    twice keeps its first output, as the PyTorch watcher's probes do.
    """
    seen: dict[int, object] = {}

    def tap(i: int, call, *args, **kwargs):
        out = call(*args, **kwargs)
        if hasattr(out, "shape") and hasattr(out, "dtype"):  # one tensor: not an RNN's (output, state) tuple
            seen.setdefault(i, out)
        return out

    for i, layer in enumerate(taps):
        layer.__dict__["call"] = partial(tap, i, layer.call)  # an instance attribute shadows the method
    try:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(tuple(probe))
        y_pred, _ = model.stateless_call(values, state, x, training=True)
        value = None
        if loss:
            metrics = [v.value for v in model.metrics_variables]
            value, _ = model.stateless_compute_loss(values, state, metrics, x=x, y=y, y_pred=y_pred,
                                                    sample_weight=sample_weight, training=True)
    finally:
        for layer in taps:
            layer.__dict__.pop("call", None)
    return value, y_pred, dict(sorted(seen.items()))


class _Traced:
    """``fn`` as a TorchScript graph, traced on its first call: Keras's per-layer Python runs once.

    Every weight, state value and probe tensor is an input of the graph, never a constant baked in.
    Unseeded dropout draws from torch's global generator inside the graph, as it does eagerly. Run
    without the profiling executor's optimising passes, which cost ~100 ms over the first calls and
    save nothing measurable on the probe's small graph.
    """

    def __init__(self, fn):
        self.fn, self.graph = fn, None

    def __call__(self, *flat):
        with torch.jit.optimized_execution(False):
            if self.graph is None:
                with warnings.catch_warnings():  # shape checks read as constants: right for one fixed probe
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)
                    self.graph = torch.jit.trace(self.fn, flat, check_trace=False)
            return self.graph(*flat)


def _torch(model: keras.Model, probe: tuple, forward, pack, compiled: bool, shared: dict):
    """``torch.autograd.grad`` of the (traced) forward's loss: leaves ``.grad`` untouched, so fit's step is
    unaffected. Keras's unseeded torch dropout draws from torch's global generator: forked, so fit's masks
    stay its own. The trace and the order of its outputs are kept in ``shared`` (see ``Probe``)."""
    n, m = len(model.trainable_variables), len(model.non_trainable_variables)

    def loss_and_outputs(*flat):
        loss, _, outputs = forward(list(flat[:n]), list(flat[n : n + m]), flat[n + m :])
        shared["taps"] = list(outputs)  # the tapped layers, in the order of the graph's outputs
        return loss, tuple(outputs.values())

    run = shared.setdefault("run", _Traced(loss_and_outputs)) if compiled else loss_and_outputs

    def step():
        values = [v.value for v in model.trainable_variables]
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.enable_grad(), torch.random.fork_rng(devices):
            loss, outputs = run(*values, *[v.value for v in model.non_trainable_variables], *probe)
            grads = torch.autograd.grad(loss, values, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(values, grads, strict=True)]
        pieces = pack(values, grads, dict(zip(shared["taps"], outputs, strict=True)), join=False)
        return torch.cat([t.detach().reshape(-1) for t in pieces])  # a copy: the weights change with fit's next step

    return step


def _tensorflow(model: keras.Model, probe: tuple, forward, pack, compiled: bool, shared: dict):
    """``GradientTape`` as in Keras's tensorflow ``train_step``, inside one ``tf.function`` kept in ``shared``:
    the variables are its arguments, not captured, so a fit of the same structure runs the same graph
    (a variable's trace type is its shape and dtype) where each fit's own trace cost ~0.2 s."""
    import tensorflow as tf

    def packed(variables, state, probe):
        values = [tf.identity(v) for v in variables]
        with tf.GradientTape() as tape:
            tape.watch(values)
            loss, _, outputs = forward(values, state, probe)
        grads = tape.gradient(loss, values, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return pack(values, grads, outputs)

    run = shared.setdefault("run", tf.function(packed)) if compiled else packed

    def step():
        return run([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
                   probe)

    return step


# XLA options for the probe's compile: at optimisation level 0 the seed's net compiles in 0.22 s instead
# of 0.49 s and each call takes 0.35 ms instead of 0.16: one compile per model structure against one call per epoch
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _jax(model: keras.Model, probe: tuple, forward, pack, compiled: bool, shared: dict):
    """``jax.value_and_grad`` of the loss as a function of the trainable weights, as Keras's jax ``train_step``,
    under one ``jax.jit`` kept in ``shared`` (``FAST_COMPILE``), whose C++ dispatch costs ~0.05 ms a call
    where an ahead-of-time ``Compiled`` object's Python one cost ~0.4."""
    import jax

    def packed(values, state, probe):
        def loss(vs):
            value, _, outputs = forward(vs, state, probe)
            return value, outputs

        (_, outputs), grads = jax.value_and_grad(loss, has_aux=True)(values)
        return pack(values, grads, outputs)

    run = shared.setdefault("run", jax.jit(packed, compiler_options=FAST_COMPILE)) if compiled else packed

    def step():
        return run([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
                   probe)

    return step


# Keras backend -> make(model, probe, forward, pack, compiled, shared) -> step() -> one flat vector of the picked
# weights, their gradients and the tapped outputs (``Probe.pack``). numpy and openvino have no autodiff.
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


def _config(obj) -> str | None:
    """A Keras layer's or loss's config without its name, as text; None for a class of your own (its Python
    may do what no config says) or a config Keras cannot give."""
    if not type(obj).__module__.startswith("keras."):
        return None
    try:
        config = obj.get_config()
    except NotImplementedError:
        return None
    return json.dumps({k: v for k, v in config.items() if k != "name"}, sort_keys=True, default=repr)


def structure(model: keras.Model, taps: list[keras.Layer], probe: tuple) -> tuple | None:
    """Everything a trace of the probe's step reads besides the numbers it is given: each layer's class and
    config (its name aside), which layers are tapped, the loss, every variable's shape and dtype, the probe's
    shapes and dtypes. Two fits with equal structures run the same graph, so one trace serves both; None
    (every fit traces its own) for a model whose configs cannot say it: not a ``Sequential`` of Keras's
    own layers with a built-in loss."""
    layers: list[keras.Layer] = []

    def walk(container) -> bool:
        for layer in container.layers:
            if type(layer) is keras.Sequential:
                layers.append(layer)
                if not walk(layer):
                    return False
            elif getattr(layer, "layers", None) or _config(layer) is None:
                return False
            else:
                layers.append(layer)
        return True

    loss = model.loss if isinstance(model.loss, str) else _config(model.loss)
    if type(model) is not keras.Sequential or loss is None or not walk(model):
        return None
    configs = tuple(("trainable", layer.trainable) if type(layer) is keras.Sequential else (type(layer), _config(layer))
                    for layer in layers)
    position = {id(layer): i for i, layer in enumerate(layers)}
    variables = tuple((tuple(v.shape), str(v.dtype), v.trainable) for v in model.variables)
    return (keras.backend.backend(), configs, tuple(position[id(t)] for t in taps), loss, variables,
            tuple((tuple(a.shape), str(a.dtype)) for a in probe))


# structure() -> what a fit of that structure shares with the next (a compiled step, its outputs' order and
# the packed vector's layout): the compile is paid once per process, not once per fit. Bounded: the oldest
# structure is dropped first.
SHARED: dict[tuple, dict] = {}
SHARED_MAX = 16


def _shared(key: tuple | None) -> dict:
    if key is None:
        return {}
    if key not in SHARED and len(SHARED) >= SHARED_MAX:
        SHARED.pop(next(iter(SHARED)))
    return SHARED.setdefault(key, {})


class Probe:
    """The picked weights, their gradients and the tapped layers' outputs on one probe batch, for one fit.

    The step is compiled on the first measure (a trace) and reused every epoch after, and by later fits of
    a model of the same ``structure``; it packs everything into one vector, so each measure is one copy to
    the host (split here), where the eager probe made 55 for the seed's net.
    """

    def __init__(self, model: keras.Model, probe, variables: list, taps: dict[str, keras.Layer]):
        self.model, self.probe = model, tuple(keras.ops.convert_to_tensor(a) for a in probe)
        index = {id(v): i for i, v in enumerate(model.trainable_variables)}
        self.picked = [index[id(v)] for v in variables]
        self.names = list(taps)  # the tapped layers' names, by the position the step knows them by
        self.forward = partial(_forward, model, list(taps.values()))
        shared = _shared(structure(model, list(taps.values()), self.probe))
        self.parts: list[tuple[str, tuple[int, ...]]] = shared.setdefault("parts", [])  # (what, shape) packed
        make = partial(GRADIENTS[keras.backend.backend()], model, self.probe, self.forward, self.pack)
        self.step, self.eager = make(True, shared), make(False, shared)

    def pack(self, values: list, grads: list, outputs: dict, join: bool = True):
        """The picked ``values`` and ``grads`` and ``outputs`` as one vector, in backend ops (inside the
        compiled step), or as a list (``join=False``: torch, whose own ``cat`` joins them where Keras's ops
        cost more); what each piece is, is noted for ``unpack``."""
        pieces = [(f"{what}:", ts[i]) for what, ts in (("weight", values), ("grad", grads)) for i in self.picked]
        pieces += [(f"output:{name}", t) for name, t in outputs.items()]
        self.parts[:] = [(what, tuple(t.shape)) for what, t in pieces]  # in place: another fit may share it
        if not join:
            return [t for _, t in pieces]
        dtype = keras.backend.result_type(*[t.dtype for _, t in pieces])  # float32, or wider: never narrowed
        return keras.ops.concatenate([keras.ops.reshape(keras.ops.cast(t, dtype), (-1,)) for _, t in pieces])

    def unpack(self, packed) -> dict[str, list | dict]:
        """``pack``'s vector as float64 CPU tensors: ``{"weight": [...], "grad": [...], "output": {}}``; a failed
        ``measure``'s numbers, already on the host (a dict), as they are."""
        if isinstance(packed, dict):
            return packed
        pieces = host(packed).split([math.prod(shape) for _, shape in self.parts])
        out: dict = {"weight": [], "grad": [], "output": {}}
        for (what, shape), t in zip(self.parts, pieces, strict=True):
            kind, key = what.split(":", 1)
            if kind == "output":
                out[kind][self.names[int(key)]] = t.view(shape)
            else:
                out[kind].append(t.view(shape))
        return out

    @property
    def numel(self) -> int:
        """Numbers in one measure: the picked weights, their gradients and the tapped outputs."""
        return sum(math.prod(shape) for _, shape in self.parts)

    def measure(self):
        """One step's numbers, for ``unpack`` to give as ``{"weight": [...], "grad": [...], "output": {layer: ...}}``.

        The packed vector stays on the device until ``unpack`` copies it to the host: a backend array that
        is never written again (jax's and tensorflow's never change; torch's is a fresh ``cat``), so keeping
        it costs nothing and the copy can wait for the statistics (``epochs``).

        A step that raises on the model's own numbers (torch's binary cross-entropy refuses a NaN
        prediction) gives ``None`` for the gradients and the NaN/Inf outputs, for the diagnosis to report
        (and copies of the weights); on finite numbers a compiled step that raises is given up for the eager
        one, which may raise.
        """
        try:
            return self.step()
        except Exception:  # noqa: BLE001 - whatever the backend raises, the numbers decide what it was
            values = [v.value for v in self.model.trainable_variables]
            with torch.no_grad():  # a no-op off the torch backend
                _, y_pred, outputs = self.forward(values, [v.value for v in self.model.non_trainable_variables],
                                                  self.probe, loss=False)
            outputs = {self.names[i]: host(t) for i, t in outputs.items()}
            seen = [host(t) for t in keras.tree.flatten(y_pred)] + list(outputs.values())
            if not all(torch.isfinite(t).all() for t in seen):  # sync: on a failed probe only
                return {"weight": [host(values[i]) for i in self.picked], "grad": None, "output": outputs}
            if self.step is self.eager:
                raise
            self.step = self.eager
            return self.step()
