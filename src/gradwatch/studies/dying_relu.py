"""Dying ReLU: a negative bias switches most ReLU units off for every input, and they never return.

A dead unit outputs 0 for the whole batch, so its gradient is 0 and no optimizer step can revive it
(Lu et al. 2019). Leaky ReLU, PReLU and ELU keep a slope below zero, so the same units still learn.
The dead fraction is recorded per layer every 10 steps by the monitor.
"""

from __future__ import annotations

import statistics

from matplotlib.figure import Figure

from gradwatch.records import Run
from gradwatch.studies import Result, arms, by_name, median

TITLE = "Dying ReLU: dead units per layer, and the ReLU variants that keep them alive"
BASE = {"model.init": "he_normal", "model.bias_init": -1.0, "model.depth": 6, "model.width": 32,
        "train.learning_rate": 0.01, "train.epochs": 40}
QUICK = {"train.epochs": 2, "data.n_samples": 64, "model.depth": 3}
ARMS = {name: {"model.activation": name} for name in ("relu", "leaky_relu", "prelu", "elu")}
SEEDS = 3


def next_jobs(runs: list[Run], quick: bool = False) -> list:
    return [] if runs else arms(ARMS, SEEDS, BASE, quick, QUICK)


def _dead(run: Run, at: str) -> float:
    values = (run.records.at if at == "start" else run.records.last)("dead_frac")
    return statistics.mean(values.values()) if values else 0.0


def summarize(runs: list[Run]) -> Result:
    groups = by_name(runs)
    rows = [{"activation": name, "final_loss": median(mine, lambda r: r.summary["final_loss"]),
             "dead_at_start": median(mine, lambda r: _dead(r, "start")),
             "dead_at_end": median(mine, lambda r: _dead(r, "end"))} for name, mine in groups.items()]
    return Result(TITLE, rows, conclude(rows), [(_figure(groups), _caption(rows), "dying_relu")])


def conclude(rows: list[dict]) -> str:
    row = {r["activation"]: r for r in rows}
    relu = row.get("relu")
    if relu is None:
        return "no ReLU runs"
    alive = [n for n, r in row.items() if n != "relu" and r["final_loss"] < relu["final_loss"] - 0.05]
    text = (f"With bias {BASE['model.bias_init']}, {relu['dead_at_end']:.0%} of ReLU units end dead "
            f"and its loss ends at {relu['final_loss']:.3f}")
    if alive:
        best = min(alive, key=lambda n: row[n]["final_loss"])
        return text + f"; {', '.join(alive)} keep learning (best: {best}, loss {row[best]['final_loss']:.3f})."
    return text + "; no variant did better here."


def _figure(groups: dict[str, list[Run]]) -> Figure:
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    ax_dead, ax_loss = fig.subplots(1, 2)
    relu = groups.get("relu", [])[:1]
    for run in relu:
        for layer in run.records.layers("dead_frac"):
            steps, values = run.records.series("dead_frac", layer)
            ax_dead.plot(steps, values, label=f"relu {layer}")
    for name, mine in groups.items():
        epochs, losses = mine[0].records.series("loss", by="epoch")
        ax_loss.plot(epochs, losses, label=name)
    ax_dead.set(xlabel="step", ylabel="dead fraction (ReLU, seed 0)", ylim=(-0.02, 1.02))
    ax_loss.set(xlabel="epoch", ylabel="training loss (seed 0)")
    ax_dead.legend(fontsize=7)
    ax_loss.legend(fontsize=7)
    return fig


def _caption(rows: list[dict]) -> str:
    parts = [f"{r['activation']}: {r['dead_at_end']:.0%} dead at the end, loss {r['final_loss']:.3f}" for r in rows]
    return ("Left: the fraction of ReLU units that output 0 for the whole batch, per layer, over training. "
            "Right: loss per epoch for each activation, same net and bias. " + "; ".join(parts) + ".")
