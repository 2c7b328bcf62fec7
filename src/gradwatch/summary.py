"""``summarize(records)``: a run's headline numbers, read from its Records alone.

Every producer (``train``, the stacked ensembles, the Keras callback) calls it, so the demo table,
the store and the web page quote one definition of each number: the last epoch's loss and accuracy,
the seed notebook's two measures on the first Dense layer, and the first/last weight-gradient norm
ratio on the first batch with the one-word verdict it gives.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gradwatch.diagnose import verdict
from gradwatch.records import Records, first_over_last

# summary key -> the epoch-level scalars it is the last value of, first found wins (ours, then Keras's)
LAST = {
    "final_loss": ("loss",),
    "accuracy": ("test_accuracy", "val_accuracy"),
    "train_accuracy": ("accuracy",),
    "test_loss": ("test_loss", "val_loss"),
}
FIRST_LAYER = ("seed_gradient", "first_layer_grad"), ("percent_change", "first_layer_pct_change")
INIT = "weight_grad_norm"  # the first/last ratio's statistic, read at the first step that has it
SKIPPED = "skipped"  # the loss scaler's flag, 1 at each update it skipped: summed into ``skipped_steps``


@dataclass(frozen=True)
class Picks:
    """The rows a summary reads, by position, from one pass over the rows' (step, epoch, layer, stat).

    They depend on the rows' layout alone, never on their values, so runs that share one (the
    members of a stacked ensemble) are summarised from a single pass and each run's values
    (ensemble/results.py). ``scalars``: each epoch-level scalar's last row; ``first``: the first
    layer's row of each FIRST_LAYER stat at its last step (``Records.last``); ``init``: INIT's
    layer -> row at its first step (``Records.at``); ``steps``: the last loss's step; ``skipped``:
    the loss scaler's rows, whose updates were skipped where the value is positive.
    """

    scalars: dict[str, int]
    first: dict[str, int]
    init: dict[str, int]
    steps: int
    skipped: list[int]


def picks(rows: Iterable[tuple]) -> Picks:
    """``Picks`` of rows (step, epoch, layer, stat, ...) in one pass: a sweep summarises hundreds of runs
    of ~10k rows each."""
    scalars: dict[str, int] = {}
    first: dict[str, tuple[int, int]] = {}
    init: dict[str, int] = {}
    start, steps, skipped = None, 0, []
    wanted = {stat for stat, _ in FIRST_LAYER}
    for i, row in enumerate(rows):
        step, layer, stat = row[0], row[2], row[3]
        if stat == SKIPPED:
            skipped.append(i)
        elif layer == "":
            scalars[stat] = i
            steps = step if stat == "loss" else steps
        elif stat in wanted and (stat not in first or first[stat][0] != step):
            first[stat] = (step, i)
        elif stat == INIT and (start is None or start == step):
            start, init[layer] = step, i
    return Picks(scalars, {stat: i for stat, (_, i) in first.items()}, init, steps, skipped)


def summarize(records: Records, status: str = "finished", **extra) -> dict:
    """The summary of a run whose records these are; ``extra`` (e.g. the first weights) joins it as given.

    ``grad_ratio_first_last`` is the first over the last Dense layer's weight-gradient norm at the
    first step that has them (initialisation); ``steps`` the step of the last epoch's loss;
    ``skipped_steps`` the updates the loss scaler skipped (Inf/NaN found: never applied). Without any
    (a Keras fit with no probe, or on a backend without autodiff) the verdict is ``unknown``: a NaN
    ratio is no evidence of an explosion.
    """
    return summarize_picked(picks(records.rows), [row[4] for row in records.rows], status, **extra)


def summarize_picked(picked: Picks, values: Sequence[float], status: str = "finished", **extra) -> dict:
    """``summarize`` of the rows whose ``picks`` these are, from the rows' values alone."""
    scalars = {stat: values[i] for stat, i in picked.scalars.items()}
    init = {layer: values[i] for layer, i in picked.init.items()}
    ratio = first_over_last(init)
    return {
        **{key: next((scalars[s] for s in stats if s in scalars), None) for key, stats in LAST.items()},
        **{key: values[picked.first[stat]] if stat in picked.first else None for stat, key in FIRST_LAYER},
        "grad_ratio_first_last": ratio,
        **extra,
        "steps": picked.steps,
        "skipped_steps": sum(values[i] > 0 for i in picked.skipped),
        "verdict": verdict(ratio, status) if init or status == "diverged" else "unknown",
    }
