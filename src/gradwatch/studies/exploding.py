"""Exploding gradients: inits that make gradients grow, NaN recorded (not raised), clipping as the fix.

A deep ReLU net with twice He's init scale and a ReLU RNN with recurrent weights at twice an
orthogonal matrix: each layer (or time step) multiplies the backpropagated signal by more than 1,
so one SGD step overflows. The runs end as ``diverged`` with the step recorded; the same runs clipped
by norm (Pascanu et al. 2013, torch's ``clip_grad_norm_``) or by value finish.
"""

from __future__ import annotations

from matplotlib.figure import Figure

from gradwatch.records import Run
from gradwatch.studies import Result, arms, by_name

TITLE = "Exploding gradients: NaN recorded, and clipping by norm or value"
MLP = {"model.activation": "relu", "model.init": "he_normal", "model.init_gain": 2.0, "model.depth": 10,
       "model.width": 16, "train.optimizer": "sgd", "train.learning_rate": 0.01, "train.epochs": 40}
RNN = {"data.name": "adding", "data.seq_len": 30, "data.n_samples": 500, "model.kind": "rnn",
       "model.activation": "relu", "model.width": 32, "model.init": "orthogonal", "model.init_gain": 2.0,
       "model.output_activation": "linear", "train.optimizer": "sgd", "train.learning_rate": 0.01,
       "train.epochs": 10}
CLIPS = {"none": {}, "clip_norm": {"train.clip_norm": 1.0}, "clip_value": {"train.clip_value": 0.1}}
QUICK = {"train.epochs": 2, "data.n_samples": 64}
SEEDS = 3


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
        peaks = [max(r.records.series("grad_norm_before_clip")[1] or [float("nan")]) for r in mine]
        rows.append({"arm": name, "finished": f"{len(finished)}/{len(mine)}",
                     "final_loss": min((r.summary["final_loss"] for r in finished), default=float("nan")),
                     "peak_norm_before_clip": max(peaks)})
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
                                                    if saved else "clipping does not save every seed"))
    return "; ".join(parts) + "."


def _all(row: dict) -> bool:
    done, total = row["finished"].split("/")
    return done == total


def _figure(groups: dict[str, list[Run]]) -> Figure:
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, net in zip(axes, ("mlp", "rnn"), strict=True):
        for name, mine in groups.items():
            if not name.startswith(net):
                continue
            run = mine[0]
            steps, norms = [], []
            for step in sorted({r[0] for r in run.records.rows if r[3] == "grad_norm"}):
                values = run.records.at("grad_norm", step).values()
                steps.append(step)
                norms.append(sum(v * v for v in values) ** 0.5)
            ax.plot(steps, norms, label=f"{name} (after clipping)" if "clip" in name else f"{name}")
        ax.set(yscale="log", xlabel="step", ylabel="total gradient norm", title=net.upper())
        ax.legend(fontsize=7)
    return fig


def _caption(rows: list[dict]) -> str:
    parts = [f"{r['arm']}: {r['finished']} finished, peak norm before clipping {r['peak_norm_before_clip']:.3g}"
             for r in rows]
    return ("Total gradient norm per step (seed 0); for the clipped arms the recorded norm is after clipping, and "
            "the norm before clipping is in the table. A line that stops early is a run that reached NaN/Inf, "
            "recorded as diverged. " + "; ".join(parts) + ".")
