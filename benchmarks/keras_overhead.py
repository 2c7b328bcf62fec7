"""What ``GradWatch`` costs the seed notebook's ``fit``: watched over bare wall time, per Keras backend.

The seed notebook's fit: ten ``Dense(10, sigmoid)`` and a sigmoid output, Adam, batch 32, on
``make_moons(250, noise=0.05, random_state=42)`` with 20% held out (200 training points, 7 steps an
epoch), ``GradWatch(probe=(x_train, y_train))`` measuring every epoch, as the notebook attaches it.
Each repeat fits a fresh model bare and a fresh one watched, in alternating order, so drift on a
shared machine hits both alike; each time is a whole ``fit`` (Keras's own trace or jit of its train
step included, and the probe's). Prints each line's median, the median of the per-repeat ratios and
the median time spent inside the callback's own events (a jax probe's device work may finish outside them).

The backend is Keras's, chosen before Keras is imported, so run one process per backend::

    KERAS_BACKEND=tensorflow .venv/bin/python benchmarks/keras_overhead.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import torch  # noqa: E402

from gradwatch.data import load  # noqa: E402
from gradwatch.keras import GradWatch  # noqa: E402
from gradwatch.spec import DataSpec  # noqa: E402


def seed_model() -> keras.Model:
    keras.utils.set_random_seed(42)
    layers = [keras.layers.Dense(10, activation="sigmoid") for _ in range(10)]
    model = keras.Sequential([keras.Input((2,)), *layers, keras.layers.Dense(1, activation="sigmoid")])
    model.compile(loss="binary_crossentropy", optimizer="adam", metrics=["accuracy"])
    return model


def timed_fit(x, y, epochs: int, watched: bool) -> tuple[float, float]:
    """(seconds of the whole fit, seconds of them spent inside GradWatch's own events)."""
    model = seed_model()
    callbacks, inside = [GradWatch(probe=(x, y), verbose=0)] if watched else [], [0.0]
    for watch in callbacks:  # each event timed: the callback's own cost, less noisy than the fit's
        for event in ("on_train_begin", "on_epoch_end", "on_train_end"):
            def timed(*args, handler=getattr(watch, event), **kwargs):
                start = time.perf_counter()
                try:
                    return handler(*args, **kwargs)
                finally:
                    inside[0] += time.perf_counter() - start

            setattr(watch, event, timed)
    start = time.perf_counter()
    model.fit(x, y, epochs=epochs, callbacks=callbacks, verbose=0)
    return time.perf_counter() - start, inside[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=100, help="epochs per fit (the notebook's: 100)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved pairs of bare and watched fits")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the notebook sets it: a net this small trains fastest on one thread
    data = load(DataSpec())
    x, y = data.x_train.numpy(), data.y_train.numpy()
    timed_fit(x, y, 1, True)  # imports and first-use costs paid outside the timing
    times: dict[str, list[float]] = {"bare": [], "watched": []}
    inside: list[float] = []
    for r in range(args.repeats):
        for watched in (r % 2 == 1, r % 2 == 0):
            fit, spent = timed_fit(x, y, args.epochs, watched)
            times["watched" if watched else "bare"].append(fit)
            inside += [spent] if watched else []
    ratios = [w / b for w, b in zip(times["watched"], times["bare"], strict=True)]
    print(f"backend {keras.backend.backend()}, {args.epochs} epochs, {args.repeats} repeats "
          f"(medians): bare fit {statistics.median(times['bare']):.2f} s, watched fit "
          f"{statistics.median(times['watched']):.2f} s, watched / bare {statistics.median(ratios):.3f}x "
          f"(per repeat: {', '.join(f'{r:.3f}' for r in ratios)}); inside the callback "
          f"{statistics.median(inside):.3f} s a watched fit")


if __name__ == "__main__":
    main()
