"""DATASETS: seeded, offline data sets as torch tensors, split into train and test.

The 2-D sets come from scikit-learn's generators (the seed notebook's ``make_moons``); ``digits`` is
scikit-learn's bundled copy of the UCI digits; ``adding`` and ``recall`` are the long-lag sequence tasks
of Hochreiter & Schmidhuber (1997) used to show why LSTM fixes the plain RNN. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits, make_circles, make_moons
from sklearn.model_selection import train_test_split

from gradwatch.spec import DataSpec, SpecError


@dataclass(frozen=True)
class Dataset:
    """Train/test tensors plus what the output layer and loss need to know."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_outputs: int
    task: str  # "binary" | "multiclass" | "regression"


GRID = 50  # decision-boundary grid points per side


def plane(x: torch.Tensor, n: int = GRID) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(xs (n,), ys (n,), points (n * n, 2)): an n x n grid 0.5 beyond 2-D data on every side, row by row
    in y (``meshgrid(indexing="xy")``), where a decision boundary is drawn."""
    lo, hi = x.min(0).values - 0.5, x.max(0).values + 0.5
    xs, ys = torch.linspace(lo[0], hi[0], n), torch.linspace(lo[1], hi[1], n)
    return xs, ys, torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)


def _moons(spec: DataSpec, rng: np.random.Generator):
    return make_moons(n_samples=spec.n_samples, noise=spec.noise, random_state=spec.seed)


def _circles(spec: DataSpec, rng: np.random.Generator):
    return make_circles(n_samples=spec.n_samples, noise=spec.noise, factor=0.5, random_state=spec.seed)


def _spirals(spec: DataSpec, rng: np.random.Generator):
    n = spec.n_samples // 2
    t = np.sqrt(rng.uniform(0, 1, n)) * 3 * np.pi  # sqrt spreads points evenly along the arm
    arm = np.stack([t * np.cos(t), t * np.sin(t)], 1) / (3 * np.pi)
    x = np.concatenate([arm, -arm]) + rng.normal(0, spec.noise, (2 * n, 2))
    return x, np.repeat([0, 1], n)


def _xor(spec: DataSpec, rng: np.random.Generator):
    x = rng.uniform(-1, 1, (spec.n_samples, 2))
    y = (x[:, 0] * x[:, 1] > 0).astype(int)
    return x + rng.normal(0, spec.noise, x.shape), y


def _digits(spec: DataSpec, rng: np.random.Generator):
    x, y = load_digits(return_X_y=True)
    keep = rng.permutation(len(y))[: spec.n_samples]
    return x[keep] / 16.0, y[keep]


def _adding(spec: DataSpec, rng: np.random.Generator):
    """Sum of the two marked values in a sequence of U[0,1]; predicting the mean scores MSE 1/6."""
    n, t = spec.n_samples, spec.seq_len
    values = rng.uniform(0, 1, (n, t))
    marks = np.zeros((n, t))
    first = rng.integers(0, max(t // 2, 1), n)
    second = rng.integers(t // 2, t, n)
    marks[np.arange(n), first] = 1
    marks[np.arange(n), second] = 1
    return np.stack([values, marks], -1), (values * marks).sum(1)


def _recall(spec: DataSpec, rng: np.random.Generator):
    """Recall the sign of the first step after ``seq_len - 1`` steps of noise; chance is ln 2."""
    n, t = spec.n_samples, spec.seq_len
    bit = rng.integers(0, 2, n)
    x = rng.normal(0, max(spec.noise, 1e-3), (n, t, 1))
    x[:, 0, 0] = 2 * bit - 1
    return x, bit


# name -> (generator(spec, rng) -> (x, y), task)
DATASETS = {
    "moons": (_moons, "binary"),
    "circles": (_circles, "binary"),
    "spirals": (_spirals, "binary"),
    "xor": (_xor, "binary"),
    "digits": (_digits, "multiclass"),
    "adding": (_adding, "regression"),
    "recall": (_recall, "binary"),
}

# which output activations make sense for each task (the loss follows the output activation)
OUTPUTS = {"binary": ("sigmoid", "tanh", "linear"), "multiclass": ("softmax",), "regression": ("linear",)}


def load(spec: DataSpec) -> Dataset:
    """Generate ``spec``'s data and split it exactly like the seed notebook's ``train_test_split``."""
    make, task = DATASETS[spec.name]
    x, y = make(spec, np.random.default_rng(spec.seed))
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=spec.test_size, random_state=spec.seed)
    if task == "multiclass":
        target = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
        n_outputs = int(np.max(y)) + 1
    else:
        target = lambda a: torch.as_tensor(a, dtype=torch.float32).reshape(-1, 1)  # noqa: E731
        n_outputs = 1
    feat = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    return Dataset(feat(x_tr), target(y_tr), feat(x_te), target(y_te), n_outputs, task)


def check_output(task: str, output_activation: str, name: str) -> None:
    """Refuse an output activation that cannot fit the task (e.g. sigmoid on 10 digit classes)."""
    if output_activation not in OUTPUTS[task]:
        allowed = ", ".join(OUTPUTS[task])
        raise SpecError(
            f"model.output_activation: got {output_activation!r}; allowed: {allowed} (for data.name={name})"
        )
