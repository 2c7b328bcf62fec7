"""ReLU against sigmoid, crossed with He against Glorot init (the seeds' third question).

A 2 x 2 factorial on the seed's 10 x 10 net, five seeds per cell. Effects are read on log10 of the
first layer's weight-gradient norm at initialisation and on the final loss; the interaction is
(ReLU+He - ReLU+Glorot) - (sigmoid+He - sigmoid+Glorot), compared with the seed-to-seed spread.
"""

from __future__ import annotations

import math
import statistics

from matplotlib.figure import Figure

from gradwatch.records import Run
from gradwatch.studies import Result, arms, by_name, median

TITLE = "ReLU x He: a 2 x 2 factorial on first-layer gradient and final loss"
ACTS = {"sigmoid": "sigmoid", "relu": "relu"}
INITS = {"glorot": "glorot_uniform", "he": "he_normal"}
QUICK = {"train.epochs": 2, "data.n_samples": 64}
SEEDS = 5


def next_jobs(runs: list[Run], quick: bool = False) -> list:
    specs = {f"{a}_{i}": {"model.activation": act, "model.init": init}
             for a, act in ACTS.items() for i, init in INITS.items()}
    return [] if runs else arms(specs, SEEDS, {}, quick, QUICK)


def log_grad(run: Run) -> float:
    return math.log10(max(run.records.at("weight_grad_norm", 0).get("dense1", 0.0), 1e-45))


MEASURES = {"log10_first_grad": log_grad, "final_loss": lambda r: r.summary["final_loss"]}


def summarize(runs: list[Run]) -> Result:
    groups = by_name(runs)
    rows = []
    for name, mine in groups.items():
        act, init = name.split("_")
        row = {"activation": act, "init": init}
        for key, value in MEASURES.items():
            row[key] = median(mine, value)
            row[f"{key}_sd"] = statistics.stdev(map(value, mine)) if len(mine) > 1 else 0.0
        rows.append(row)
    return Result(TITLE, rows, conclude(rows), [(_figure(rows), _caption(rows), "relu_he")])


def effects(rows: list[dict], key: str) -> dict[str, float]:
    """Main effects and interaction of the 2 x 2 table on ``key`` (cell medians)."""
    cell = {(r["activation"], r["init"]): r[key] for r in rows}
    relu = (cell["relu", "he"] + cell["relu", "glorot"]) / 2 - (cell["sigmoid", "he"] + cell["sigmoid", "glorot"]) / 2
    he = (cell["relu", "he"] + cell["sigmoid", "he"]) / 2 - (cell["relu", "glorot"] + cell["sigmoid", "glorot"]) / 2
    inter = (cell["relu", "he"] - cell["relu", "glorot"]) - (cell["sigmoid", "he"] - cell["sigmoid", "glorot"])
    noise = max(r[f"{key}_sd"] for r in rows)
    return {"relu": relu, "he": he, "interaction": inter, "noise": noise}


def conclude(rows: list[dict]) -> str:
    if len(rows) < 4:
        return "the 2 x 2 table is incomplete"
    g, loss = effects(rows, "log10_first_grad"), effects(rows, "final_loss")

    def size(value: float, noise: float) -> str:
        return "clear" if abs(value) > 2 * noise else "within seed noise"

    return (f"On log10 first-layer gradient: ReLU adds {g['relu']:+.2f} decades, He init {g['he']:+.2f}, "
            f"interaction {g['interaction']:+.2f} ({size(g['interaction'], g['noise'])}). On final loss: ReLU "
            f"{loss['relu']:+.3f}, He {loss['he']:+.3f}, interaction {loss['interaction']:+.3f} "
            f"({size(loss['interaction'], loss['noise'])}).")


def _figure(rows: list[dict]) -> Figure:
    fig = Figure(figsize=(8, 3), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key in zip(axes, MEASURES, strict=True):
        for act in ACTS:
            mine = [r for r in rows if r["activation"] == act]
            ax.errorbar([r["init"] for r in mine], [r[key] for r in mine], yerr=[r[f"{key}_sd"] for r in mine],
                        marker="o", capsize=3, label=act)
        ax.set(ylabel=key, xlabel="init")
        ax.legend(fontsize=8)
    return fig


def _caption(rows: list[dict]) -> str:
    return ("Interaction plot: non-parallel lines mean the effect of the init depends on the activation. "
            "Bars: one standard deviation over seeds. " + "; ".join(
                f"{r['activation']}+{r['init']}: log10 grad {r['log10_first_grad']:.2f}, loss {r['final_loss']:.3f}"
                for r in rows) + ".")
