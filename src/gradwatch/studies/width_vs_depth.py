"""Width against depth at equal parameter count (the seeds' second question).

The seed's deep-narrow net (10 hidden layers of 10, 1,031 parameters) against a shallow-wide one
(1 hidden layer of 257) and a middle one (3 of 21), each with sigmoid and with ReLU + He, five seeds.
"""

from __future__ import annotations

from matplotlib.figure import Figure

from gradwatch.records import Run
from gradwatch.studies import Result, arms, by_name, median

TITLE = "Shallow-wide against deep-narrow at equal parameter count"
SHAPES = {"1x257": (1, 257), "3x21": (3, 21), "10x10": (10, 10)}
ACTS = {"sigmoid": {}, "relu_he": {"model.activation": "relu", "model.init": "he_normal"}}
QUICK = {"train.epochs": 2, "data.n_samples": 64}
SEEDS = 5


def parameters(depth: int, width: int, n_in: int = 2) -> int:
    """Weights and biases of the MLP: depth Dense layers of width, then one output unit."""
    return (n_in + 1) * width + (depth - 1) * (width + 1) * width + width + 1


def next_jobs(runs: list[Run], quick: bool = False) -> list:
    specs = {f"{act}_{shape}": {**over, "model.depth": d, "model.width": w}
             for act, over in ACTS.items() for shape, (d, w) in SHAPES.items()}
    return [] if runs else arms(specs, SEEDS, {}, quick, QUICK)


def summarize(runs: list[Run]) -> Result:
    rows = []
    for name, mine in by_name(runs).items():
        act, shape = name.rsplit("_", 1)
        rows.append({"activation": act, "shape": shape, "parameters": parameters(*SHAPES[shape]),
                     "final_loss": median(mine, lambda r: r.summary["final_loss"]),
                     "loss_min": min(r.summary["final_loss"] for r in mine),
                     "loss_max": max(r.summary["final_loss"] for r in mine),
                     "accuracy": median(mine, lambda r: r.summary["accuracy"]),
                     "ratio_first_last": median(mine, lambda r: r.summary["grad_ratio_first_last"])})
    return Result(TITLE, rows, conclude(rows), [(_figure(rows), _caption(rows), "width_vs_depth")])


def conclude(rows: list[dict]) -> str:
    parts = []
    for act in ACTS:
        mine = sorted((r for r in rows if r["activation"] == act), key=lambda r: r["final_loss"])
        if len(mine) < 2:
            continue
        best, worst = mine[0], mine[-1]
        clear = best["loss_max"] < worst["loss_min"]
        parts.append(f"with {act}, {best['shape']} ends lowest (loss {best['final_loss']:.3f}) and {worst['shape']} "
                     f"highest ({worst['final_loss']:.3f})" + ("" if clear else ", with overlapping seeds"))
    return ("At equal parameter count, " + "; ".join(parts) + ".") if parts else "not enough runs"


def _figure(rows: list[dict]) -> Figure:
    fig = Figure(figsize=(6, 3), layout="constrained")
    ax = fig.subplots()
    for act in ACTS:
        mine = [r for r in rows if r["activation"] == act]
        spread = [[r["final_loss"] - r["loss_min"] for r in mine], [r["loss_max"] - r["final_loss"] for r in mine]]
        ax.errorbar([r["shape"] for r in mine], [r["final_loss"] for r in mine], yerr=spread, marker="o", capsize=3,
                    label=act)
    ax.set(yscale="log", xlabel="hidden layers x width", ylabel="final training loss (median, min-max)")
    ax.legend(fontsize=8)
    return fig


def _caption(rows: list[dict]) -> str:
    return "Final loss over five seeds (bars: min to max). " + "; ".join(
        f"{r['activation']} {r['shape']} ({r['parameters']} parameters): {r['final_loss']:.3f}" for r in rows) + "."
