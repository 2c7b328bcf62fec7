"""``doctor(model, x, y)`` for a compiled Keras model: the doctor's method on treated clones of it.

Entry point: ``from gradwatch.doctor.keras import doctor`` (``gradwatch.keras`` sits below the doctor,
so it cannot reach up to this module). Each trial is ``keras.models.clone_model`` of the user's
model, fresh weights from a seed, with a ``clone_function`` that changes the layers' configs
(activations, initializers) or wraps a hidden layer with batch normalisation, compiled with the
user's loss and a copy of the user's optimizer (its config changed for the learning-rate, clipping
and Adam treatments), fitted briefly under ``GradWatch`` with a probe batch. The findings, the
ranking and the table are the PyTorch doctor's own (``prescribe``, ``Prescription``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np

from gradwatch import stats
from gradwatch.diagnose import REMEDIES
from gradwatch.doctor import Prescription, Treatment, prescribe
from gradwatch.keras import GradWatch
from gradwatch.spec import SpecError

__all__ = ["KERAS_TREATMENTS", "Recipe", "doctor"]

SATURATING = tuple(kind.lower() for kind in stats.SATURATING)  # Keras names them sigmoid, tanh
PROBE = 256  # samples in GradWatch's probe batch: the gradient norms the diagnosis reads

Change = Callable[[dict], dict]  # a layer's or the optimizer's config -> the treated config


def _configured(change: Change) -> Callable[[keras.Optimizer], keras.Optimizer]:
    """A copy of the user's optimizer with ``change`` applied to its config."""
    return lambda opt: type(opt).from_config(change(opt.get_config()))


@dataclass(frozen=True)
class Recipe:
    """How a trial's model is made from the user's: hidden-layer config changes, batch norm, optimizer changes.

    "Hidden" is every layer before the last layer with a kernel: the output layer's activation belongs
    to the loss (a sigmoid before binary cross-entropy), so it is never swapped.
    """

    hidden: tuple[Change, ...] = ()
    batch_norm: bool = False
    optimizer: Callable[[keras.Optimizer], keras.Optimizer] = _configured(lambda c: c)  # a copy, unchanged

    def build(self, model: keras.Model, seed: int) -> keras.Model:
        """A compiled clone with fresh weights from ``seed``, treated."""
        order = [layer.name for layer in model.layers]
        kernels = [i for i, layer in enumerate(model.layers) if _has_kernel(layer)]
        hidden = set(order[: kernels[-1]]) if kernels else set()

        def clone(layer: keras.Layer) -> keras.Layer:
            config = layer.get_config()
            if layer.name in hidden:
                for change in self.hidden:
                    config = change(config)
            new = type(layer).from_config(config)
            if not (self.batch_norm and layer.name in hidden and _has_kernel(layer)):
                return new
            activation = config.get("activation", "linear")  # Dense/Conv -> linear layer, norm, then activation
            new = type(layer).from_config({**config, "activation": "linear"})
            return keras.Sequential([new, keras.layers.BatchNormalization(), keras.layers.Activation(activation)],
                                    name=f"{layer.name}_bn")

        keras.utils.set_random_seed(seed)
        treated = keras.models.clone_model(model, clone_function=clone)
        treated.compile(optimizer=self.optimizer(model.optimizer), loss=model.loss)
        return treated


def _has_kernel(layer: keras.Layer) -> bool:
    return "kernel_initializer" in layer.get_config()


def _activation(config: dict) -> str:
    return getattr(keras.activations.get(config.get("activation", "linear")), "__name__", "")


def _swap(old: tuple[str, ...], new: str) -> Change:
    return lambda c: {**c, "activation": new} if _activation(c) in old else c


def _init(name: str) -> Change:
    return lambda c: {**c, "kernel_initializer": name} if "kernel_initializer" in c else c


def _needs(test: Callable[[dict], bool], why: str, recipe: Recipe) -> Callable[[keras.Model], Recipe | str]:
    """``recipe`` where some layer's config passes ``test``, else ``why``."""
    return lambda model: recipe if any(test(layer.get_config()) for layer in model.layers) else why


def _to_adam(model: keras.Model) -> Recipe | str:
    if isinstance(model.optimizer, keras.optimizers.Adam | keras.optimizers.AdamW):
        return "the optimizer is Adam already"
    return Recipe(optimizer=lambda _opt: keras.optimizers.Adam(1e-3))


def _lr(factor: float) -> Callable[[keras.Model], Recipe | str]:
    def treat(model: keras.Model) -> Recipe | str:
        if not isinstance(model.optimizer.get_config().get("learning_rate"), float):
            return "the learning rate is a schedule: scale it in your own code"
        return Recipe(optimizer=_configured(lambda c: {**c, "learning_rate": c["learning_rate"] * factor}))

    return treat


KERNEL = lambda c: "kernel_initializer" in c  # noqa: E731

# remedy name (diagnose.REMEDIES) -> treat(the user's model) -> a Recipe, or why it does not apply; the
# remedies missing here (lsuv, residual, gated_rnn, forget_bias, ...) are named as not tried, with why
KERAS_TREATMENTS: dict[str, Callable[[keras.Model], Recipe | str]] = {
    "relu_he": _needs(lambda c: _activation(c) in SATURATING, "no sigmoid/tanh activations to swap",
                      Recipe(hidden=(_swap(SATURATING, "relu"), _init("he_normal")))),
    "leaky_relu": _needs(lambda c: _activation(c) == "relu", "no ReLU activations to swap",
                         Recipe(hidden=(_swap(("relu",), "leaky_relu"),))),
    "he_init": _needs(KERNEL, "no layers with a kernel to re-initialise", Recipe(hidden=(_init("he_normal"),))),
    "orthogonal_init": _needs(KERNEL, "no layers with a kernel to re-initialise",
                              Recipe(hidden=(_init("orthogonal"),))),
    "batch_norm": _needs(KERNEL, "no layers with a kernel to normalise", Recipe(batch_norm=True)),
    "clip_norm": lambda _model: Recipe(optimizer=_configured(lambda c: {**c, "clipnorm": 1.0,
                                                                         "global_clipnorm": None})),
    "lower_lr": _lr(0.1),
    "much_lower_lr": _lr(0.01),
    "higher_lr": _lr(10.0),
    "much_higher_lr": _lr(100.0),
    "adam": _to_adam,
}


@dataclass
class KerasTreatment(Treatment):
    """A Treatment whose ``build(seed)`` is the compiled Keras clone the trial from ``seed`` started with."""

    model: keras.Model | None = None

    def build(self, seed: int = 0):
        """``(model, optimizer, None)``: fit ``model`` on your data as the trial did (its optimizer is compiled in)."""
        treated = self.plan.build(self.model, seed)
        return treated, treated.optimizer, None


def doctor(model: keras.Model, x, y, steps: int = 300, seeds: int = 3, batch_size: int = 32) -> Prescription:
    """Diagnose a compiled Keras ``model``'s training on ``(x, y)``, try the remedies on clones of it, rank them.

    Every trial (the untreated one too) is a clone with fresh weights from the seed, fitted for about
    ``steps`` batches (whole epochs) with the model's own loss and optimizer; the score is the
    doctor's ``final_loss`` over the per-epoch training losses. The model itself is never trained.

    Examples:
        >>> from gradwatch.doctor.keras import doctor
        >>> rx = doctor(model, x_train, y_train)
        >>> print(rx)
        >>> treated, optimizer, _ = rx.treatments[0].build()
    """
    if getattr(model, "optimizer", None) is None or getattr(model, "loss", None) is None:
        raise SpecError("model: got an uncompiled Keras model; allowed: a compiled one (model.compile(optimizer, "
                        "loss)): its optimizer and loss are the untreated run's")
    if steps < 1 or seeds < 1 or batch_size < 1:
        raise SpecError(f"steps, seeds, batch_size: got {steps}, {seeds}, {batch_size}; allowed: each >= 1")
    x, y = np.asarray(x), np.asarray(y)
    epochs = max(1, math.ceil(steps / math.ceil(len(x) / batch_size)))
    start = time.perf_counter()

    def trial(treatments: list[Treatment]) -> list[Treatment]:
        for t in treatments:
            for seed in range(seeds):
                treated = t.plan.build(model, seed)
                keras.utils.set_random_seed(10_000 + seed)  # the same batches for every treatment of a seed
                watch = GradWatch(probe=(x[:PROBE], y[:PROBE]), verbose=0)
                history = treated.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, callbacks=[watch])
                t.record(history.history["loss"], watch.records)
        return treatments

    def propose(name: str) -> Treatment | str:
        made = KERAS_TREATMENTS[name](model) if name in KERAS_TREATMENTS else (
            "a change only you can make" if name == "fewer_layers" else "not built for Keras models")
        return made if isinstance(made, str) else KerasTreatment(name, REMEDIES[name], made, model=model)

    rx = prescribe(trial, KerasTreatment("untreated", "", Recipe(), model=model), propose)
    rx.seeds, rx.steps, rx.seconds = seeds, epochs * math.ceil(len(x) / batch_size), time.perf_counter() - start
    return rx
