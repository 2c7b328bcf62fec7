"""Exploding gradients: inits that make gradients grow, NaN recorded (not raised), clipping as the fix.

A deep ReLU net at 1.5x He's init scale and a ReLU RNN with recurrent weights at twice an orthogonal
matrix, both under SGD at lr 0.05: each layer (or time step) multiplies the backpropagated signal by
more than 1, so a step overflows. Such runs end as ``diverged`` with the step recorded; the same runs
clipped by norm (Pascanu et al. 2013, torch's ``clip_grad_norm_``) or by value finish, and the
conclusion says whether they also learned (final loss below what guessing scores).
"""

from __future__ import annotations

import math
import statistics

from matplotlib.figure import Figure

from gradwatch.records import Run
from gradwatch.studies import Result, arms, by_name
from gradwatch.theory import LN2

TITLE = "Exploding gradients: NaN recorded, and clipping by norm or value"
MLP = {"model.activation": "relu", "model.init": "he_normal", "model.init_gain": 1.5, "model.depth": 10,
       "model.width": 16, "train.optimizer": "sgd", "train.learning_rate": 0.05, "train.epochs": 40}
RNN = {"data.name": "adding", "data.seq_len": 10, "data.n_samples": 500, "model.kind": "rnn",
       "model.activation": "relu", "model.width": 32, "model.init": "orthogonal", "model.init_gain": 2.0,
       "model.output_activation": "linear", "train.optimizer": "sgd", "train.learning_rate": 0.05,
       "train.epochs": 20}
CLIPS = {"none": {}, "clip_norm": {"train.clip_norm": 1.0}, "clip_value": {"train.clip_value": 0.1}}
QUICK = {"train.epochs": 2, "data.n_samples": 64}
SEEDS = 3
CHANCE = {"mlp": LN2, "rnn": 1 / 6}  # what guessing scores: ln 2 on the moons, the mean's MSE on adding


def next_jobs(runs: list[Run], quick: bool = False) -> list:
    if runs:
        return []
    jobs = arms({f"mlp_{c}": {**MLP, **o} for c, o in CLIPS.items()}, SEEDS, {}, quick, QUICK)
    return jobs + arms({f"rnn_{c}": {**RNN, **o} for c, o in CLIPS.items()}, SEEDS, {}, quick, QUICK)


def summarize(runs: list[Run]) -> Result:
    groups = by_name(runs)
    rows = []
    for name, mine in groups.items():
        finished = [r for r in mine if r.status == "finished"]
        peaks = [v for r in mine for v in (r.records.series("grad_norm_before_clip")[1] or _total_norms(r)[1])
                 if math.isfinite(v)]
        losses = [r.summary["final_loss"] for r in finished]
        rows.append({"arm": name, "finished": f"{len(finished)}/{len(mine)}",
                     "final_loss": statistics.median(losses) if losses else float("nan"),
                     "peak_grad_norm": max(peaks, default=float("nan"))})
    return Result(TITLE, rows, conclude(rows), [(_figure(groups), _caption(rows), "exploding")])


def conclude(rows: list[dict]) -> str:
    """For each net: did the unclipped runs diverge, and did clipping make them finish?"""
    row = {r["arm"]: r for r in rows}
    parts = []
    for net in ("mlp", "rnn"):
        bare = row.get(f"{net}_none")
        if not bare:
            continue
        diverged = bare["finished"].startswith("0/")
        saved = [c for c in ("clip_norm", "clip_value") if f"{net}_{c}" in row and _all(row[f"{net}_{c}"])]
        state = "diverges (NaN) in every seed" if diverged else f"finishes in {bare['finished']} seeds"
        parts.append(f"unclipped {net} {state}; " + (f"{' and '.join(saved)} make every seed finish"
                                                    if saved else "clipping does not save every seed")
                     + _learned(net, [row[f"{net}_{c}"] for c in saved]))
    return "; ".join(parts) + "."


def _learned(net: str, rows: list[dict]) -> str:
    """Whether the saved runs also learned: their median final loss against what guessing scores."""
    losses = {r["arm"].split("_", 1)[1]: r.get("final_loss", math.nan) for r in rows}
    if not losses or not all(map(math.isfinite, losses.values())):
        return ""
    said = ", ".join(f"{arm} {loss:.3g}" for arm, loss in losses.items())
    if all(loss < CHANCE[net] for loss in losses.values()):
        return f", and they learn (median final loss {said}; guessing scores {CHANCE[net]:.3g})"
    return (f", but finishing is not learning: median final loss {said}, against {CHANCE[net]:.3g} for guessing; "
            "clipping stops the overflow, the init that causes it still needs fixing")


def _all(row: dict) -> bool:
    done, total = row["finished"].split("/")
    return done == total


def _figure(groups: dict[str, list[Run]]) -> Figure:
    """Per net, one run per arm (a diverged seed where there is one): total gradient norm per step,
    after clipping as trained, and dashed before clipping where clipping by norm measured it."""
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, net in zip(axes, ("mlp", "rnn"), strict=True):
        for i, (name, mine) in enumerate((n, m) for n, m in groups.items() if n.startswith(net)):
            run = next((r for r in mine if r.status == "diverged"), mine[0])
            color, label = f"C{i}", f"{name}, seed {run.spec['train']['seed']}" + (f" ({run.status})"
                                                                                 if run.status == "diverged" else "")
            ax.plot(*_total_norms(run), color=color, marker="o", markersize=2,
                    label=label + (", after clipping" if "clip" in name else ""))
            before = run.records.series("grad_norm_before_clip")
            if before[0]:
                ax.plot(*before, color=color, linestyle="--", label=f"{name}, before clipping")
        ax.set(yscale="log", xlabel="step", ylabel="total gradient norm", title=net.upper())
        ax.legend(fontsize=7)
    return fig


def _total_norms(run: Run) -> tuple[list[int], list[float]]:
    """(steps, total gradient norm) from the per-layer norms the watcher recorded: after any clipping.

    One pass over the rows, summing each step's squares in row (layer) order.
    """
    squares: dict[int, float] = {}
    for step, _, _, stat, value in run.records.rows:
        if stat == "grad_norm":
            squares[step] = squares.get(step, 0.0) + value * value
    steps = sorted(squares)
    return steps, [math.sqrt(squares[s]) for s in steps]


def _caption(rows: list[dict]) -> str:
    parts = [f"{r['arm']}: {r['finished']} finished, peak gradient norm {r['peak_grad_norm']:.3g}" for r in rows]
    return ("Total gradient norm per step of one seed per arm (a diverged one where there is one, its line "
            "ending where NaN/Inf appeared); for the clipped arms the solid line is after clipping, the dashed "
            "one before clipping by norm. "
            "peak_grad_norm in the table is the largest finite total norm over the seeds: before clipping for "
            "clip_norm (which measures it), as trained otherwise, so for clip_value after clipping. A line that "
            "stops early is a run that reached NaN/Inf, recorded as diverged. " + "; ".join(parts) + ".")
