"""``summarize(records)``: a run's headline numbers, read from its Records alone.

Every producer (``train``, the stacked ensembles, the Keras callback) calls it, so the demo table,
the store and the web page quote one definition of each number: the last epoch's loss and accuracy,
the seed notebook's two measures on the first Dense layer, and the first/last weight-gradient norm
ratio on the first batch with the one-word verdict it gives.
"""

from __future__ import annotations

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


def _read(records: Records) -> tuple[dict, dict, dict, int, int]:
    """In one pass over the rows (a sweep summarises hundreds of runs of ~10k rows each): the last value
    of each epoch-level scalar, the first layer's value of each FIRST_LAYER stat at its last step
    (``Records.last``), INIT's layer -> value at its first step (``Records.at``), the last loss's step,
    the updates the loss scaler skipped."""
    scalars: dict[str, float] = {}
    first: dict[str, tuple[int, float]] = {}
    init: dict[str, float] = {}
    start, steps, skipped = None, 0, 0
    wanted = {stat for stat, _ in FIRST_LAYER}
    for step, _, layer, stat, value in records.rows:
        if stat == SKIPPED:
            skipped += value > 0
        elif layer == "":
            scalars[stat] = value
            steps = step if stat == "loss" else steps
        elif stat in wanted and (stat not in first or first[stat][0] != step):
            first[stat] = (step, value)
        elif stat == INIT and (start is None or start == step):
            start, init[layer] = step, value
    return scalars, {stat: v for stat, (_, v) in first.items()}, init, steps, skipped


def summarize(records: Records, status: str = "finished", **extra) -> dict:
    """The summary of a run whose records these are; ``extra`` (e.g. the first weights) joins it as given.

    ``grad_ratio_first_last`` is the first over the last Dense layer's weight-gradient norm at the
    first step that has them (initialisation); ``steps`` the step of the last epoch's loss;
    ``skipped_steps`` the updates the loss scaler skipped (Inf/NaN found: never applied). Without any
    (a Keras fit with no probe, or on a backend without autodiff) the verdict is ``unknown``: a NaN
    ratio is no evidence of an explosion.
    """
    scalars, first, init, steps, skipped = _read(records)
    ratio = first_over_last(init)
    return {
        **{key: next((scalars[s] for s in stats if s in scalars), None) for key, stats in LAST.items()},
        **{key: first.get(stat) for stat, key in FIRST_LAYER},
        "grad_ratio_first_last": ratio,
        **extra,
        "steps": steps,
        "skipped_steps": skipped,
        "verdict": verdict(ratio, status) if init or status == "diverged" else "unknown",
    }
