"""Does the output layer's activation change the earlier layers' gradients? (the seeds' first question)

The seed's 10 x 10 sigmoid net with three output layers: sigmoid + binary cross-entropy (the seed's),
tanh + squared error on -1/+1, and linear + squared error. The first layer's weight-gradient norm and
the first/last ratio are read at initialisation, five seeds each.
"""

from __future__ import annotations

import math
import statistics

from matplotlib.figure import Figure

from gradwatch.records import Run
from gradwatch.studies import Result, arms, by_name, median

TITLE = "Does the output activation change earlier layers' gradients?"
ARMS = {name: {"model.output_activation": name} for name in ("sigmoid", "tanh", "linear")}
BASE: dict = {}
QUICK = {"train.epochs": 2, "data.n_samples": 64}
SEEDS = 5


def next_jobs(runs: list[Run], quick: bool = False) -> list:
    return [] if runs else arms(ARMS, SEEDS, BASE, quick, QUICK)


def first_grad(run: Run) -> float:
    return run.records.at("weight_grad_norm", 0).get("dense1", math.nan)


def _spread(runs: list[Run], value) -> float:
    values = [value(r) for r in runs]
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[Run]) -> Result:
    rows = []
    for name, mine in by_name(runs).items():
        rows.append({"output": name,
                     "first_grad_init": median(mine, first_grad),
                     "log10_first_grad_sd": _spread(mine, lambda r: math.log10(first_grad(r))),
                     "ratio_first_last": median(mine, lambda r: r.summary["grad_ratio_first_last"]),
                     "final_loss": median(mine, lambda r: r.summary["final_loss"]),
                     "accuracy": median(mine, lambda r: r.summary["accuracy"])})
    return Result(TITLE, rows, conclude(rows), [(_figure(rows), _caption(rows), "output_activation")])


def conclude(rows: list[dict]) -> str:
    """Compare the spread between outputs with the spread between seeds, on a log scale."""
    if len(rows) < 2:
        return "not enough arms to compare"
    logs = [math.log10(r["first_grad_init"]) for r in rows]
    between = max(logs) - min(logs)
    within = max(r["log10_first_grad_sd"] for r in rows)
    hi = max(rows, key=lambda r: r["first_grad_init"])
    lo = min(rows, key=lambda r: r["first_grad_init"])
    ratios = [r["ratio_first_last"] for r in rows]
    if between > 2 * within:
        head = (f"Yes: the first layer's gradient at init is {10 ** between:.2g}x larger with a {hi['output']} output "
                f"than with {lo['output']} (seed spread {10 ** within:.2g}x)")
    else:
        head = (f"No measurable change: the first layer's gradient differs {10 ** between:.2g}x between outputs, "
                f"within the seed spread ({10 ** within:.2g}x)")
    return head + (f"; the first/last ratio stays between {min(ratios):.1e} and {max(ratios):.1e}, so the "
                   "output changes the scale of every layer's gradient, not the vanishing through the sigmoid layers.")


def _figure(rows: list[dict]) -> Figure:
    fig = Figure(figsize=(8, 3), layout="constrained")
    ax_grad, ax_loss = fig.subplots(1, 2)
    names = [r["output"] for r in rows]
    ax_grad.bar(names, [r["first_grad_init"] for r in rows])
    ax_grad.set(yscale="log", ylabel="first-layer gradient norm at init")
    ax_loss.bar(names, [r["final_loss"] for r in rows])
    ax_loss.set(ylabel="final training loss")
    return fig


def _caption(rows: list[dict]) -> str:
    return "Medians over seeds. " + "; ".join(
        f"{r['output']}: first-layer gradient {r['first_grad_init']:.2e}, ratio {r['ratio_first_last']:.1e}, "
        f"loss {r['final_loss']:.3f}" for r in rows) + "."
