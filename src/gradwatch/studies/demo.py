"""The seed notebook's experiment and its remedies ladder: ten cases over three seeds.

Data: ``make_moons(n_samples=250, noise=0.05, random_state=42)``, 20% test split (random_state 42).
Nets: 10 hidden Dense layers of 10 units (3 for the shallow case), sigmoid output, BCE, batch 32,
100 epochs; Adam lr 0.001 as in the notebook, and plain SGD lr 0.1 where the seed's weight-change
measure is meant to be read as a gradient.
"""

from __future__ import annotations

import statistics

from gradwatch.records import Run
from gradwatch.spec import Spec

SGD = {"train.optimizer": "sgd", "train.learning_rate": 0.1}

# case name -> overrides of the seed's deep sigmoid net (Spec's defaults)
CASES: dict[str, dict] = {
    "deep_sigmoid": {},
    "shallow_sigmoid": {"model.depth": 3},
    "deep_relu": {"model.activation": "relu"},
    "deep_sigmoid_sgd": SGD,
    "deep_relu_sgd": {"model.activation": "relu", **SGD},
    "he_init": {"model.init": "he_normal"},
    "batch_norm": {"model.norm": "batch"},
    "residual": {"model.residual": True},
    "leaky_relu": {"model.activation": "leaky_relu"},
    "elu": {"model.activation": "elu"},
}
SEEDS = (0, 1, 2)
COLUMNS = ("final_loss", "accuracy", "first_layer_grad", "first_layer_pct_change", "grad_ratio_first_last")


def jobs(epochs: int | None = None, seeds=SEEDS) -> list[tuple[str, str, Spec]]:
    """(case, group, spec) for every case and seed."""
    extra = {"train.epochs": epochs} if epochs else {}
    return [(name, "demo", Spec().replace(**over, **extra, **{"train.seed": seed}))
            for name, over in CASES.items() for seed in seeds]


def summarize(runs: list[Run]) -> list[dict]:
    """One row per case, in CASES order: medians over seeds, and the majority verdict."""
    rows = []
    for name in CASES:
        mine = [r for r in runs if r.name == name]
        if not mine:
            continue
        row = {"name": name}
        for col in COLUMNS:
            row[col] = statistics.median(float(r.summary[col]) for r in mine)
        verdicts = [r.summary["verdict"] for r in mine]
        row["verdict"] = max(set(verdicts), key=verdicts.count)
        rows.append(row)
    return rows
