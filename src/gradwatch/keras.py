"""``GradWatch``: the seed notebook's weight-change check, and the true gradient norms, as a Keras callback.

The seed measures a vanishing gradient by keeping the weights before ``fit`` and comparing them with
the weights after it: ``(old - new) / lr`` and ``|100 (old - new) / old|``. GradWatch does exactly that
once per epoch, for every layer with a kernel, since the start of ``fit``; adds per-layer weight norms;
and, on a probe batch you pass, takes the gradient of the compiled loss itself, because under Adam the
weight change says little about the gradient. Records carry the Keras layer names and the same
statistic names as the PyTorch watcher (``stats.STATS``), so ``diagnose``, the Store and the report
read a Keras fit exactly as they read a PyTorch run.

Which backends give gradient norms (``GRADIENTS``): torch (autograd), tensorflow (``GradientTape``) and
jax (``jax.grad``), as each backend's own ``train_step`` takes them. On numpy and openvino the callback
records the weight change, weight norms and logs only, and its summary says so (verdict ``unknown``).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import keras
import numpy as np
import torch

from gradwatch.diagnose import THRESHOLDS
from gradwatch.diagnose import diagnose as _diagnose
from gradwatch.records import Records, Run, first_over_last
from gradwatch.stats import Layout, at, read
from gradwatch.store import Store
from gradwatch.summary import summarize

VANISHING = THRESHOLDS["vanishing_ratio"][0]
# the STATS hook points a Keras fit offers the callback: per measured epoch, the weights and (the seed's
# measures) the kernels since the start of fit; on the probe batch, each layer's and each kernel's gradient
READS = ("grad", "kernel_grad", "weight", "kernel")

# optimizer class (or a base class of it) -> why its weight change does not track the gradient
ADAPTIVE: dict[str, str] = {
    "Adam": "divides each step by a running RMS of the gradient (Kingma & Ba 2015)",
    "Nadam": "divides each step by a running RMS of the gradient, as Adam does",
    "Adamax": "divides each step by a running maximum of |gradient|",
    "RMSprop": "divides each step by a running RMS of the gradient (Tieleman & Hinton 2012)",
    "Adagrad": "divides each step by the root of the summed squared gradients",
    "Adadelta": "scales each step by a ratio of running RMS values, not by the gradient's size",
    "Adafactor": "divides each step by a factored running RMS of the gradient",
    "Lamb": "normalises Adam's step per layer",
    "Lion": "takes the sign of the update, so each weight moves by exactly lr",
}


def _loss(model: keras.Model, values: list, probe):
    """The compiled loss on the probe batch in training mode, as fit's own step takes it, changing nothing.

    Training mode, because its gradient is the one the optimizer applies: in inference mode batch norm
    divides by moving statistics that lag the weights (momentum 0.99), and a batch-norm net that trains
    well read vanishing at the start and exploding later. Through ``stateless_call`` and
    ``stateless_compute_loss``: the forward reads ``values`` as the trainable weights (so ``jax.grad`` can
    differentiate it), and the state it updates (batch-norm moving statistics, dropout's seed, the loss
    tracker) is returned and dropped, so measuring leaves ``fit``'s own training untouched.
    """
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(probe)
    state = [v.value for v in model.non_trainable_variables]
    y_pred, _ = model.stateless_call(values, state, x, training=True)
    metrics = [v.value for v in model.metrics_variables]
    loss, _ = model.stateless_compute_loss(values, state, metrics, x=x, y=y, y_pred=y_pred,
                                           sample_weight=sample_weight, training=True)
    return loss


def _picked(model: keras.Model, variables: list, grads: list) -> list:
    """The gradients of ``variables`` among those of all the model's trainable variables."""
    index = {id(v): i for i, v in enumerate(model.trainable_variables)}
    return [grads[index[id(v)]] for v in variables]


def _torch_gradients(model: keras.Model, variables: list, probe) -> list[torch.Tensor]:
    """``torch.autograd.grad`` of the loss: leaves ``.grad`` untouched, so fit's own step is unaffected.

    Keras's unseeded torch dropout draws from torch's global generator: forked, so fit's masks stay its own.
    """
    values = [v.value for v in model.trainable_variables]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.enable_grad(), torch.random.fork_rng(devices):
        grads = torch.autograd.grad(_loss(model, values, probe), values, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(values, grads, strict=True)]
    return _picked(model, variables, grads)


def _tensorflow_gradients(model: keras.Model, variables: list, probe) -> list[torch.Tensor]:
    """``GradientTape`` as in Keras's tensorflow ``train_step``; each gradient copied to the host once."""
    import tensorflow as tf

    values = [tf.identity(v.value) for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        tape.watch(values)
        loss = _loss(model, values, probe)
    grads = tape.gradient(loss, values, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return [torch.from_numpy(np.array(g)) for g in _picked(model, variables, grads)]  # a writable copy


def _jax_gradients(model: keras.Model, variables: list, probe) -> list[torch.Tensor]:
    """``jax.grad`` of the loss as a function of the trainable weights, as Keras's jax ``train_step`` takes it."""
    import jax

    values = [v.value for v in model.trainable_variables]
    grads = jax.grad(lambda vs: _loss(model, vs, probe))(values)
    return [torch.from_numpy(np.array(g)) for g in _picked(model, variables, grads)]


# Keras backend -> fn(model, variables, probe) -> one gradient per variable, as torch tensors.
# numpy and openvino have no autodiff.
GRADIENTS = {"torch": _torch_gradients, "tensorflow": _tensorflow_gradients, "jax": _jax_gradients}


def _check_probe(probe, model: keras.Model) -> None:
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


def _host(variable) -> torch.Tensor:
    """A CPU copy of a Keras variable (torch.tensor copies, so the snapshot never aliases the weight)."""
    return torch.tensor(keras.ops.convert_to_numpy(variable))


def _number(value) -> float:
    return float(keras.ops.convert_to_numpy(value))


def _kernel_layers(model, prefix: str = "") -> list[tuple[str, keras.Layer, int]]:
    """(name, layer, index of its kernel among its trainable weights) of every layer with a kernel.

    Nested models are walked, their layers named ``outer/inner``; a layer whose kernel is frozen is left out.
    """
    out = []
    for layer in model.layers:
        name = prefix + layer.name
        if getattr(layer, "layers", None):
            out += _kernel_layers(layer, name + "/")
            continue
        kernels = [i for i, v in enumerate(layer.trainable_weights) if v.name == "kernel"]
        if kernels:
            out.append((name, layer, kernels[0]))
    return out


def _adaptive(optimizer) -> tuple[str, str] | None:
    """(class name, reason) when the optimizer moves weights by about lr per step whatever the gradient."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer's wrapped one
    for cls in type(optimizer).__mro__:
        if cls.__name__ in ADAPTIVE:
            return type(optimizer).__name__, ADAPTIVE[cls.__name__]
    return None


class GradWatch(keras.callbacks.Callback):
    """Records per-layer weight change, weight norms and (on a probe batch) gradient norms during ``fit``.

    ``probe`` is ``(x, y)`` or ``(x, y, sample_weight)``: a batch of your data on which the true gradient
    is taken (without it, no gradient norms). ``every`` is the cadence in epochs; the last epoch is always
    measured. ``verbose=1`` prints a plain-language summary when training ends. ``store`` (a Store or a
    path) receives the run when training ends.

    Examples:
        >>> watch = gradwatch.keras.GradWatch(probe=(x_train[:256], y_train[:256]))
        >>> model.fit(x_train, y_train, epochs=30, callbacks=[watch])
        >>> watch.diagnose(); watch.frame(); gradwatch.Store().put_run(watch.run())
    """

    def __init__(self, probe=None, every: int = 1, verbose: int = 1, store: Store | str | Path | None = None,
                 name: str = ""):
        super().__init__()
        if not isinstance(every, int) or every < 1:  # GradWatch(x, y) puts y here
            shown = every if isinstance(every, int) else f"a {type(every).__name__}"
            raise ValueError(f"every: got {shown}; allowed: an int >= 1 (the probe is GradWatch(probe=(x, y)))")
        self.probe, self.every, self.verbose, self.store, self.name = probe, every, verbose, store, name
        self.records = Records()
        self.status = "finished"
        self._layers: list[tuple[str, keras.Layer, int]] = []
        self._initial: list[torch.Tensor] = []
        self._epoch, self._measured = -1, -1
        self._layouts: dict[tuple[str, torch.device], Layout] = {}
        self._recorded: keras.Model | None = None  # the model the records are of

    # --- Keras events ---------------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        if self._recorded is not None and self._recorded is not self.model:  # a second model: start clean
            self.records, self.status = Records(), "finished"
        self._recorded = self.model
        self._layers, self._layouts = _kernel_layers(self.model), {}
        self._epoch, self._measured = -1, -1
        self._initial = [_host(layer.trainable_weights[k]) for _, layer, k in self._layers]
        if self.probe is not None:
            _check_probe(self.probe, self.model)
            self._probe = keras.tree.map_structure(keras.ops.convert_to_tensor, self.probe)
        self._measure_gradients(self._step(), 0)

    def on_epoch_end(self, epoch, logs=None):
        step = self._step()
        for stat, value in (logs or {}).items():
            if isinstance(value, (int, float, np.number)) or getattr(value, "ndim", None) == 0:
                self.records.add(step, epoch, stat, {"": _number(value)})
        if not math.isfinite(_number((logs or {}).get("loss", 0.0))):
            self.status = "diverged"
        self._epoch = epoch
        if (epoch + 1) % self.every == 0:
            self._measure(step, epoch)

    def on_train_end(self, logs=None):
        if self._epoch != self._measured:  # the last epoch is always measured, early stopping included
            self._measure(self._step(), self._epoch)
        if self.verbose:
            print(self.describe())
        if self.store is not None:
            store = self.store if isinstance(self.store, Store) else Store(self.store)
            store.put_run(self.run())

    # --- measures -------------------------------------------------------------------------------
    def _step(self) -> int:
        return int(_number(self.model.optimizer.iterations))

    def _layout(self, what: str, groups: list[list[torch.Tensor]]) -> Layout:
        key = (what, groups[0][0].device)
        if key not in self._layouts:  # built once per device, as the watcher does
            self._layouts[key] = Layout.of(groups)
        return self._layouts[key]

    def _measure(self, step: int, epoch: int) -> None:
        self._measured = epoch
        if not self._layers:
            return
        self._measure_weights(step, epoch)
        self._measure_gradients(step, epoch)

    def _record(self, step: int, epoch: int, values: dict[str, torch.Tensor], skip_nan: bool = False) -> None:
        """One row per kernel layer of each entry in ``values`` (stat -> (L,)); ``skip_nan``: a NaN value
        (the median % change of a kernel that starts at 0: it has no relative change) is left out."""
        if values:
            rows = torch.stack(list(values.values())).tolist()  # sync: once per measured epoch and point
            names = [name for name, _, _ in self._layers]
            for stat, row in zip(values, rows, strict=True):
                kept = [(n, v) for n, v in zip(names, row, strict=True) if not (skip_nan and math.isnan(v))]
                self.records.add_layers(step, epoch, stat, [n for n, _ in kept], [v for _, v in kept])

    def _measure_weights(self, step: int, epoch: int) -> None:
        """The ``kernel`` entries of STATS on each kernel since the start of fit (the seed's measures), and
        the ``weight`` entries on each layer's weights."""
        weights = [[_host(v) for v in layer.trainable_weights] for _, layer, _ in self._layers]
        kernels = [ws[k] for ws, (_, _, k) in zip(weights, self._layers, strict=True)]
        lr = _number(self.model.optimizer.learning_rate)
        self._record(step, epoch, read(at("kernel"), self._initial, kernels, lr), skip_nan=True)
        flat = [w for ws in weights for w in ws]
        self._record(step, epoch, read(at("weight"), flat, self._layout("layers", weights)))

    def _measure_gradients(self, step: int, epoch: int) -> None:
        """The ``grad`` entries of STATS on the compiled loss's gradient on the probe batch, per layer, and
        the ``kernel_grad`` entries per kernel (biases left out, as train.py measures the first/last ratio)."""
        gradients = GRADIENTS.get(keras.backend.backend())
        if self.probe is None or gradients is None or not self._layers:
            return
        variables = [v for _, layer, _ in self._layers for v in layer.trainable_weights]
        flat = gradients(self.model, variables, self._probe)
        sizes = [len(layer.trainable_weights) for _, layer, _ in self._layers]
        groups = [flat[sum(sizes[:i]) : sum(sizes[: i + 1])] for i in range(len(sizes))]
        kernels = [[group[k]] for group, (_, _, k) in zip(groups, self._layers, strict=True)]
        values = read(at("grad"), flat, self._layout("layers", groups))
        values.update(read(at("kernel_grad"), [k for [k] in kernels], self._layout("kernels", kernels)))
        self._record(step, epoch, values)

    # --- outputs --------------------------------------------------------------------------------
    def frame(self):
        """The records as a pandas DataFrame (columns run, step, epoch, layer, stat, value)."""
        return self.records.to_pandas(self.name)

    def diagnose(self):
        """Findings for what was recorded so far; see :func:`gradwatch.diagnose`."""
        return _diagnose(self.records)

    def run(self) -> Run:
        """The records and headline numbers as a :class:`Run`, ready for ``Store.put_run``."""
        return Run(records=self.records, summary=self._summary(), status=self.status,
                   name=self.name or (self.model.name if self.model is not None else ""))

    def _summary(self) -> dict:
        """The headline numbers, as ``summarize`` reads them from any run's records."""
        return summarize(self.records, self.status)

    def describe(self) -> str:
        """What the callback saw, in plain language: a per-layer table, the findings, and the Adam caveat."""
        lines = [self._headline(), *self._table()]
        start = first_over_last(self.records.at("weight_grad_norm"))
        now = first_over_last(self.records.last("weight_grad_norm"))
        if math.isfinite(start):
            lines.append(f"first/last kernel gradient norm: {start:.2g} at the start, {now:.2g} now "
                         f"(below {VANISHING:g} the first layers barely learn: AUTOTRAINER's vanishing threshold)")
        else:
            lines.append(self._no_gradients())
        findings = self.diagnose()
        lines += ["findings:", *(textwrap.indent(str(f), "  ") for f in findings)] if findings else ["findings: none"]
        note = self._adam_note(now)
        return "\n".join(lines + ([note] if note else []))

    def _headline(self) -> str:
        optimizer = self.model.optimizer
        _, losses = self.records.series("loss")
        loss = f"; loss {losses[0]:.4g} -> {losses[-1]:.4g}" if losses else ""
        return (f"GradWatch on {self.model.name}: {self._step()} steps, {type(optimizer).__name__} "
                f"lr {_number(optimizer.learning_rate):.3g}{loss}")

    def _table(self) -> list[str]:
        cols = ("percent_change", "seed_gradient", "weight_norm", "weight_grad_norm")
        last = {stat: self.records.last(stat) for stat in cols}
        rows = [f"{'layer':<14}{'median % change':>17}{'mean |(old-new)/lr|':>21}{'weight norm':>13}"
                f"{'kernel grad norm':>18}"]
        for name, _, _ in self._layers:
            cells = [last[stat].get(name, math.nan) for stat in cols]
            rows.append(f"{name:<14}{cells[0]:>17.3g}{cells[1]:>21.3g}{cells[2]:>13.3g}{cells[3]:>18.3g}")
        return rows

    def _no_gradients(self) -> str:
        backend = keras.backend.backend()
        if backend not in GRADIENTS:
            return (f"no gradient norms: the {backend} backend gives none here ({' and '.join(GRADIENTS)} do); "
                    "the weight change above is all there is")
        return "no gradient norms: pass GradWatch(probe=(x, y)) with a batch of your data to get them"

    def _adam_note(self, ratio: float) -> str:
        """Why the weight change misleads under an Adam-like optimizer, with this run's own numbers."""
        adaptive = _adaptive(self.model.optimizer)
        if adaptive is None or not self._layers:
            return ""
        name, reason = adaptive
        first = self._layers[0][0]
        moved = self.records.last("percent_change").get(first, math.nan)
        evidence = (f" Here {first}'s weights moved a median {moved:.3g}% since the start of fit, although its "
                    f"true gradient norm is only {ratio:.2g} times the last layer's." if ratio < VANISHING else "")
        return (f"Why the weight change misleads here: {name} {reason}, so it moves every weight by about lr "
                f"per step however small its gradient; (old - new) / lr then counts steps, not gradient."
                f"{evidence} Read the gradient norms, not the weight change.")

