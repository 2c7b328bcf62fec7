"""Sequences: a plain RNN, an LSTM and a GRU on the adding and long-lag recall tasks at growing lengths.

Hochreiter & Schmidhuber (1997)'s tests of memory: ``adding`` (sum the two marked values in a sequence
of U[0,1]; predicting the mean scores MSE 1/6, the sequence analogue of the seed's ln 2) and ``recall``
(the sign of the first step after T - 1 steps of unit noise; chance is ln 2). A run has learned when
its test loss ends below a quarter of chance, and sits at chance above 90% of it. Lengths run upward
and a cell stops lengthening at the first length where most of its seeds fail to learn, so the budget
goes where the answer is still open. The temporal picture, ||dL/dh_t|| for every step t (Pascanu et
al. 2013), is read from the ``state_grad_norm`` records of seed 0 of each cell at the length that
separates the LSTM from the RNN: the first sampled step (initialisation) and the last.
"""

from __future__ import annotations

import math
import statistics

import torch
from matplotlib.figure import Figure

from gradwatch.nets import build
from gradwatch.records import Run
from gradwatch.spec import Spec
from gradwatch.studies import Result
from gradwatch.theory import LN2, spectral_norm

TITLE = "Sequences: the length at which a plain RNN, an LSTM and a GRU stop learning"
CHANCE = {"adding": 1 / 6, "recall": LN2}  # MSE of predicting the mean; BCE of p = 0.5
LEARNED, AT_CHANCE = 0.25, 0.9  # test loss below 25% of chance: learned; above 90%: at chance
KINDS = ("rnn", "lstm", "gru")
LENGTHS = (10, 20, 50, 100)
# the budget: 1600 training sequences, batch 100, Adam lr 0.01, at most 30 epochs (480 steps), stopped
# early once the training loss is well inside "learned"; width 32. Five seeds on adding (the
# acceptance claim), three on recall.
BASE = {"model.width": 32, "data.n_samples": 2000, "train.batch_size": 100, "train.learning_rate": 0.01,
        "train.epochs": 30}
TASKS: dict[str, dict] = {
    "adding": {"model.output_activation": "linear", "train.stop_loss": 0.02},  # 12% of chance (1/6)
    "recall": {"data.noise": 1.0, "train.stop_loss": 0.05},  # 7% of chance (ln 2)
}
SEEDS = {"adding": 5, "recall": 3}
QUICK = {"lengths": (4, 8), "seeds": 2, "base": {"model.width": 8, "data.n_samples": 64, "train.epochs": 2}}


def spec(task: str, kind: str, length: int, seed: int = 0, quick: bool = False) -> Spec:
    """The run of ``kind`` on ``task`` at ``length`` steps (the study's budget, or the tiny one)."""
    base = {**BASE, **(QUICK["base"] if quick else {})}
    return Spec().replace(**base, **TASKS[task], **{"data.name": task, "data.seq_len": length,
                                                   "model.kind": kind, "train.seed": seed})


def _plan(quick: bool) -> tuple[tuple[int, ...], dict[str, int]]:
    return (QUICK["lengths"], dict.fromkeys(TASKS, QUICK["seeds"])) if quick else (LENGTHS, SEEDS)


def _length(run: Run) -> int:
    return run.spec["data"]["seq_len"]


def score(run: Run) -> float:
    """Test loss over chance: 1 = no better than the constant answer; diverged runs score inf."""
    loss = run.summary.get("test_loss")
    ok = run.status == "finished" and loss is not None and math.isfinite(loss)
    return loss / CHANCE[run.spec["data"]["name"]] if ok else math.inf


def _most(runs: list[Run], test) -> bool:
    return bool(runs) and sum(map(test, runs)) * 2 > len(runs)


def learned(runs: list[Run]) -> bool:
    return _most(runs, lambda r: score(r) <= LEARNED)


def next_jobs(runs: list[Run], quick: bool = False) -> list[tuple[str, str, Spec]]:
    """The next length for every (task, cell) most of whose seeds learned one length shorter."""
    lengths, seeds = _plan(quick)
    for i, length in enumerate(lengths):
        jobs = []
        for task in TASKS:
            for kind in KINDS:
                mine = [r for r in runs if r.name == f"{task}/{kind}"]
                if any(_length(r) == length for r in mine):
                    continue
                before = [r for r in mine if _length(r) == lengths[i - 1]] if i else None
                if i and not (before and learned(before)):  # stopped earlier, or failed one length shorter
                    continue
                jobs += [(f"{task}/{kind}", "", spec(task, kind, length, s, quick)) for s in range(seeds[task])]
        if jobs:
            return jobs
    return []


def table(runs: list[Run]) -> list[dict]:
    """One row per task and cell: test loss over chance per length (median, seeds learned), and its reach.

    ``learns_up_to`` is the longest length before the first one where most seeds fail to learn (0: none);
    ``stops_at`` is that first failing length ("-": it learned at every length it ran).
    """
    rows = []
    lengths = sorted({_length(r) for r in runs})
    for task in TASKS:
        for kind in KINDS:
            mine = [r for r in runs if r.name == f"{task}/{kind}"]
            if not mine:
                continue
            row: dict = {"task": task, "cell": kind}
            tried = {x: [r for r in mine if _length(r) == x] for x in lengths}
            for length, at in tried.items():
                ok = sum(score(r) <= LEARNED for r in at)
                row[f"T={length}"] = f"{statistics.median(map(score, at)):.2f} ({ok}/{len(at)})" if at else "-"
            fails = [x for x, at in tried.items() if at and not learned(at)]
            stop = min(fails, default=math.inf)
            row["stops_at"] = "-" if stop == math.inf else stop
            row["learns_up_to"] = max((x for x, at in tried.items() if at and x < stop), default=0)
            rows.append(row)
    return rows


def contrast(runs: list[Run]) -> tuple[int, float] | None:
    """(length, the RNN's median test loss over chance) at the shortest adding length where most LSTM
    seeds learned and most RNN seeds did not; None if there is none."""
    for length in sorted({_length(r) for r in runs}):
        at = {k: [r for r in runs if r.name == f"adding/{k}" and _length(r) == length] for k in ("rnn", "lstm")}
        if at["rnn"] and learned(at["lstm"]) and not learned(at["rnn"]):
            return length, statistics.median(map(score, at["rnn"]))
    return None


def _reach(row: dict) -> str:
    if not row["learns_up_to"]:
        return f"{row['cell']} does not learn even at T={row['stops_at']}"
    return f"{row['cell']} learns up to T={row['learns_up_to']}" + (
        f" and stops at T={row['stops_at']}" if row["stops_at"] != "-" else "")


def conclude(rows: list[dict], gap: tuple[int, float] | None) -> str:
    """Sentences computed from the table: where each cell stops, and whether the LSTM beats the RNN."""
    parts = [f"{task}: " + ", ".join(_reach(r) for r in rows if r["task"] == task)
             for task in TASKS if any(r["task"] == task for r in rows)]
    if gap:
        length, rnn = gap
        state = "stays at chance" if rnn >= AT_CHANCE else "does not learn but beats chance"
        verdict = (f"the LSTM learns the adding problem at T={length}, where the plain RNN {state} (its median "
                   f"test MSE is {rnn:.2f} of the 1/6 of predicting the mean)")
    else:
        verdict = ("NOT confirmed here: at no length did most LSTM seeds learn the adding problem while most RNN "
                   "seeds did not")
    return "; ".join(parts) + f". Within this budget, {verdict}."


def trace(run: Run, when: str) -> list[float]:
    """||dL/dh_t|| for t = 1..T on the first (``init``) or last (``trained``) sampled step."""
    rows = [r for r in run.records.rows if r[3] == "state_grad_norm"]
    if not rows:
        return []
    step = rows[0][0] if when == "init" else rows[-1][0]
    return [r[4] for r in rows if r[0] == step]


def w_hh_norm(run: Run) -> float:
    """Spectral norm of the run's recurrent matrix at init, rebuilt from its spec and seed as training did."""
    run_spec = Spec.model_validate(run.spec)
    torch.manual_seed(run_spec.train.seed)
    features = 1 if run_spec.data.name == "recall" else 2  # recall: the value; adding: (value, mark)
    return spectral_norm(build(run_spec.model, features, 1).cell.weight_hh)


def flows(runs: list[Run]) -> tuple[int, dict[str, Run]]:
    """Seed 0 of each cell on adding at the separating length (else the longest one the RNN ran)."""
    adding = [r for r in runs if r.name.startswith("adding/") and r.spec["train"]["seed"] == 0]
    rnn = [_length(r) for r in adding if r.name == "adding/rnn"]
    gap = contrast(runs)
    length = gap[0] if gap else max(rnn, default=0)
    chosen = {r.name.split("/")[1]: r for r in adding if _length(r) == length and trace(r, "init")}
    return length, {kind: chosen[kind] for kind in KINDS if kind in chosen}


def summarize(runs: list[Run]) -> Result:
    """Table, conclusion and two figures: loss over chance per length, and the temporal gradient flow."""
    rows = table(runs)
    length, traces = flows(runs)
    figures = [(_reach_figure(runs), _reach_caption(rows), "sequence_lengths"),
               (_flow_figure(traces, length), _flow_caption(traces, length), "temporal_flow")]
    return Result(TITLE, rows, conclude(rows, contrast(runs)), figures)


def _reach_figure(runs: list[Run]) -> Figure:
    fig = Figure(figsize=(9.5, 3.4), layout="constrained")
    for ax, task in zip(fig.subplots(1, len(TASKS), sharey=True), TASKS, strict=True):
        for i, kind in enumerate(KINDS):
            mine = [r for r in runs if r.name == f"{task}/{kind}"]
            lengths = sorted({_length(r) for r in mine})
            scores = [[min(score(r), 2.0) for r in mine if _length(r) == x] for x in lengths]
            ax.plot(lengths, [statistics.median(s) for s in scores], "o-", color=f"C{i}", label=kind)
            ax.fill_between(lengths, [min(s) for s in scores], [max(s) for s in scores], color=f"C{i}", alpha=0.15)
        ax.axhline(1.0, color="k", ls=":", lw=0.8)
        ax.axhline(LEARNED, color="k", ls="--", lw=0.6)
        ax.set(xscale="log", xlabel="sequence length T (log)", title=f"{task} (chance = {CHANCE[task]:.3g})")
    fig.axes[0].set_ylabel("test loss / chance (median, seeds' range)")
    fig.axes[-1].legend(fontsize=8)
    return fig


def _reach_caption(rows: list[dict]) -> str:
    reach = "; ".join(f"{r['task']} {_reach(r)}" for r in rows)
    return ("Test loss divided by chance (1/6 for adding, ln 2 for recall; dotted line) against sequence length, "
            f"median over seeds with the range shaded; below the dashed line ({LEARNED}) a run has learned. A cell "
            f"is not tried at longer lengths once most of its seeds fail to learn. {reach}.")


def _flow_figure(chosen: dict[str, Run], length: int) -> Figure:
    fig = Figure(figsize=(9.5, 3.4), layout="constrained")
    for ax, when in zip(fig.subplots(1, 2, sharey=True), ("init", "trained"), strict=True):
        for kind, run in chosen.items():
            values = trace(run, when)
            ax.plot(range(1, len(values) + 1), values, color=f"C{KINDS.index(kind)}", label=kind)
        ax.set(yscale="log", xlabel="time step t", title=f"adding, T={length}: {when}")
    fig.axes[0].set_ylabel("||dL/dh_t|| (first or last sampled step)")
    fig.axes[-1].legend(fontsize=8)
    return fig


def decay(trace: list[float]) -> float:
    """Average factor by which ||dL/dh_t|| shrinks per step going back from the last step to the first."""
    first, last = trace[0], trace[-1]
    return (first / last) ** (1 / (len(trace) - 1)) if len(trace) > 1 and first > 0 and last > 0 else math.nan


def _flow_caption(chosen: dict[str, Run], length: int) -> str:
    if not chosen:
        return "No adding runs recorded dL/dh_t, so there is no temporal picture to draw."
    parts = [f"{kind}: back at t=1 {_share(trace(run, 'init')):.1e} of the last step's gradient at init, "
             f"{_share(trace(run, 'trained')):.1e} after training" for kind, run in chosen.items()]
    text = (f"The norm of the gradient of the loss with respect to the hidden state h_t at every step of T={length} "
            "adding sequences (seed 0, the first and the last sampled step); the loss reads only the "
            "last state, so each curve shows how much of the error signal reaches back to step t. "
            + "; ".join(parts) + ".")
    if "rnn" in chosen:
        norm, factor = w_hh_norm(chosen["rnn"]), decay(trace(chosen["rnn"], "init"))
        why = (f"so the matrix alone could stretch the gradient by up to {norm:.2f} per step and it is tanh' < 1 that "
               "shrinks it" if norm >= 1 else "below 1, so the gradient must shrink by at least that factor per step")
        text += (f" The RNN's recurrent matrix has spectral norm {norm:.2f} at init (Pascanu et al. 2013's bound), "
                 f"{why}; measured, each step back multiplies it by {factor:.3f} on average.")
    return text


def _share(values: list[float]) -> float:
    return values[0] / values[-1] if values and values[-1] > 0 else math.nan
