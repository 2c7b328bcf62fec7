"""``GradWatch``: the seed notebook's weight-change check, and the true gradient norms, as a Keras callback.

The seed measures a vanishing gradient by keeping the weights before ``fit`` and comparing them with
the weights after it: ``(old - new) / lr`` and ``|100 (old - new) / old|``. GradWatch does exactly that
once per epoch, for every layer with a kernel, since the start of ``fit``; adds per-layer weight norms;
and, on a probe batch you pass, takes the gradient of the compiled loss itself, because under Adam the
weight change says little about the gradient, and each layer's output on it: its RMS, and in each
hidden sigmoid/tanh or ReLU-family activation the saturated and dead units. Records carry the Keras
layer names and the same statistic names as the PyTorch watcher (``stats.STATS``), so ``diagnose``,
the Store and the report read a Keras fit exactly as they read a PyTorch run.

Which backends give gradient norms and activations (``GRADIENTS``, see ``probe``): torch (autograd on a
``torch.jit.trace``), tensorflow (``GradientTape`` in a ``tf.function``) and jax (``jax.grad`` under
``jax.jit``), as each backend's own ``train_step`` takes them. On numpy and openvino the callback records
the weight change, weight norms and logs only, and its summary says so (verdict ``unknown``).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import keras
import numpy as np

from gradwatch.diagnose import THRESHOLDS
from gradwatch.diagnose import diagnose as _diagnose
from gradwatch.keras.epochs import Epoch, Pending
from gradwatch.keras.probe import GRADIENTS, Probe, check, host
from gradwatch.records import Records, Run, first_over_last
from gradwatch.stats import activation_kinds
from gradwatch.store import Store
from gradwatch.summary import summarize

VANISHING = THRESHOLDS["vanishing_ratio"][0]
# the STATS hook points a Keras fit offers the callback: per measured epoch, the weights and (the seed's
# measures) the kernels since the start of fit; on the probe batch, each layer's and each kernel's gradient,
# each kernel layer's output and each hidden activation's output
READS = ("grad", "kernel_grad", "weight", "kernel", "output", "activation")

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


def _number(value) -> float:
    return float(keras.ops.convert_to_numpy(value))


def _leaves(model, prefix: str = "") -> list[tuple[str, keras.Layer]]:
    """(name, layer) of every layer in call order, nested models walked and their layers named ``outer/inner``.

    A layer of your own that holds others (a residual block) is one leaf: its kernel is the first among its
    weights, its output the block's, and the activations inside it are not read."""
    out = []
    for layer in model.layers:
        name = prefix + layer.name
        out += _leaves(layer, name + "/") if getattr(layer, "layers", None) else [(name, layer)]
    return out


def _kernel_layers(leaves: list[tuple[str, keras.Layer]]) -> list[tuple[str, keras.Layer, int]]:
    """(name, layer, index of its kernel among its trainable weights) of every layer with a trainable kernel."""
    out = []
    for name, layer in leaves:
        kernels = [i for i, v in enumerate(layer.trainable_weights) if v.name == "kernel"]
        if kernels:
            out.append((name, layer, kernels[0]))
    return out


def _kind(layer: keras.Layer) -> str | None:
    """The ``activation`` entries' module class (``stats.SATURATING``, ``stats.RECTIFIERS``) a layer's output is.

    A ``ReLU``/``LeakyReLU``/``PReLU``/``ELU`` layer by its class; an ``Activation`` or a ``Dense``/``Conv``
    layer by its activation's Keras name, matched without case and underscores (``leaky_relu``: LeakyReLU).
    """
    kinds = activation_kinds()
    if type(layer).__name__ in kinds:
        return type(layer).__name__
    fn = getattr(layer, "activation", None)
    name = getattr(fn, "__name__", type(fn).__name__).lower().replace("_", "")
    return next((kind for kind in kinds if kind.lower() == name), None) if fn is not None else None


def _activations(leaves: list[tuple[str, keras.Layer]], kernels: list) -> list[tuple[str, str]]:
    """(name, kind) of each hidden activation: before the last kernel layer, whose activation belongs to the
    loss (a confident sigmoid output before binary cross-entropy sits at its bounds, and is meant to)."""
    names = {name for name, _, _ in kernels}
    last = max((i for i, (name, _) in enumerate(leaves) if name in names), default=0)
    return [(name, kind) for name, layer in leaves[:last] if (kind := _kind(layer))]


def _adaptive(optimizer) -> tuple[str, str] | None:
    """(class name, reason) when the optimizer moves weights by about lr per step whatever the gradient."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer's wrapped one
    for cls in type(optimizer).__mro__:
        if cls.__name__ in ADAPTIVE:
            return type(optimizer).__name__, ADAPTIVE[cls.__name__]
    return None


class GradWatch(keras.callbacks.Callback):
    """Records per-layer weight change, weight norms and (on a probe batch) gradient norms and activation
    statistics during ``fit``.

    ``probe`` is ``(x, y)`` or ``(x, y, sample_weight)``: a batch of your data on which the true gradient
    and the layers' outputs are taken in training mode (without it, neither). ``every`` is the cadence in
    epochs; the last epoch is always measured. ``verbose=1`` prints a plain-language summary when training
    ends. ``store`` (a Store or a path) receives the run when training ends.

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
        self._records, self._pending = Records(), Pending()
        self.status = "finished"
        self._layers: list[tuple[str, keras.Layer, int]] = []
        self._epoch, self._measured = -1, -1
        self._recorded: keras.Model | None = None  # the model the records are of

    @property
    def records(self) -> Records:
        """Every row so far, up to the last epoch that ended: the statistics of the epochs measured since
        the last read are computed first (``epochs.Pending``)."""
        self._pending.flush(self._records)
        return self._records

    # --- Keras events ---------------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._pending.flush(self._records)  # a fit that raised left its last epochs waiting
        if self._recorded is not None and self._recorded is not self.model:  # a second model: start clean
            self._records, self.status = Records(), "finished"
        self._recorded = self.model
        leaves = _leaves(self.model)
        self._layers = _kernel_layers(leaves)
        acts = _activations(leaves, self._layers)
        self._epoch, self._measured = -1, -1
        self._probe = None
        if self.probe is not None:
            check(self.probe, self.model)
        if self.probe is not None and keras.backend.backend() in GRADIENTS and self._layers:
            variables = [v for _, layer, _ in self._layers for v in layer.trainable_weights]
            taps = dict(leaves)
            taps = {name: taps[name] for name in [n for n, _, _ in self._layers] + [n for n, _ in acts]}
            self._probe = Probe(self.model, self.probe, variables, taps)
        self._pending = Pending([(name, len(layer.trainable_weights), k) for name, layer, k in self._layers], acts,
                                [host(layer.trainable_weights[k]) for _, layer, k in self._layers],
                                self._probe.unpack if self._probe is not None else None)
        if self._probe is not None:
            self._pending.add(Epoch(self._step(), 0, probe=self._probe.measure(), numel=self._probe.numel),
                              self._records)

    def on_epoch_end(self, epoch, logs=None):
        scalars = {stat: _number(value) for stat, value in (logs or {}).items()
                   if isinstance(value, (int, float, np.number)) or getattr(value, "ndim", None) == 0}
        if not math.isfinite(_number((logs or {}).get("loss", 0.0))):
            self.status = "diverged"
        self._epoch = epoch
        self._measure(self._step(), epoch, scalars, (epoch + 1) % self.every == 0)

    def on_train_end(self, logs=None):
        if self._epoch != self._measured:  # the last epoch is always measured, early stopping included
            self._measure(self._step(), self._epoch)
        self._pending.flush(self._records)
        if self.verbose:
            print(self.describe())
        if self.store is not None:
            store = self.store if isinstance(self.store, Store) else Store(self.store)
            store.put_run(self.run())

    # --- measures -------------------------------------------------------------------------------
    def _step(self) -> int:
        return int(_number(self.model.optimizer.iterations))

    def _measure(self, step: int, epoch: int, scalars: dict | None = None, measured: bool = True) -> None:
        """Keep what the end of ``epoch`` must take now for its rows: its logs (``scalars``) and, when it is
        ``measured``, the probe's step or host copies of the kernel layers' weights (``epochs.Epoch``)."""
        taken = Epoch(step, epoch, scalars or {})
        if measured:
            self._measured = epoch
        if measured and self._layers:
            taken.lr = _number(self.model.optimizer.learning_rate)
            if self._probe is not None:
                taken.probe, taken.numel = self._probe.measure(), self._probe.numel
            else:
                taken.weights = [host(v) for _, layer, _ in self._layers for v in layer.trainable_weights]
                taken.numel = sum(w.numel() for w in taken.weights)
        self._pending.add(taken, self._records)

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

