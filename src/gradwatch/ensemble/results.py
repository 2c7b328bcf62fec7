"""A trained Ensemble's members as Runs: Records, the summary ``train.summarize`` gives, the boundary.

Every value crosses to the host in one ``tolist`` per tensor; rows are assembled by ``zip`` over
columns shared by all members (the (step, epoch, layer, stat) of each row), so building a member's
Records costs a C loop, not a Python one per row.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from gradwatch.diagnose import verdict
from gradwatch.ensemble.training import Ensemble
from gradwatch.records import Records, Run
from gradwatch.stats import percent_change, seed_gradient

GRID = 50  # decision-boundary grid points per side, as train.boundary


def runs(ens: Ensemble, names: list[str], group: str) -> list[Run]:
    """One Run per member, in the ensemble's (activation-sorted) order."""
    ens.restore()
    records = _records(ens)
    summaries = _summaries(ens)
    return [Run(records=r, spec=spec.model_dump(mode="json"), summary=s, status=status, name=name, group=group,
                key=spec.key())
            for r, s, spec, status, name in zip(records, summaries, ens.specs, ens.status, names, strict=True)]


def _records(ens: Ensemble) -> list[Records]:
    """Each member's rows, in the order they were taken, up to the end of its last epoch."""
    out: list[Records] = []
    for _, part in ens.stack.groups:  # members of one activation share which stats they have
        columns: tuple[list, list, list, list] = ([], [], [], [])
        values, cuts, k = [], [], 0
        for i, (step, epoch, stat, layers, v, only) in enumerate(ens.blocks):
            if only is None or only == part:
                for column, item in zip(columns, (step, epoch, None, stat), strict=True):
                    column.extend(layers if item is None else itertools.repeat(item, len(layers)))
                values.append(v if only is not None else v[:, part])  # (layers, E_part)
            while k < len(ens.ends) and ens.ends[k] == i + 1:
                cuts.append(len(columns[0]))
                k += 1
        steps, epochs, layers, stats = columns
        rows = torch.cat(values).t().tolist()  # sync: every record of these members in one copy
        for j, member in enumerate(range(part.start, part.stop)):
            cut = cuts[ens.last_epoch[member]]
            out.append(Records(itertools.islice(zip(steps, epochs, layers, stats, rows[j], strict=True), cut)))
    return out


@torch.no_grad()
def _summaries(ens: Ensemble) -> list[dict]:
    """train.summarize's numbers for every member at once (retired members' state restored first)."""
    history = {stat: {k: v.tolist() for k, v in epochs.items()} for stat, epochs in ens.history.items()}
    init = next(v for _, _, stat, _, v, _ in ens.blocks if stat == "weight_grad_norm").tolist()  # (L, E)
    first = ens.dense[0]
    start, end = ens.initial[first], ens.stack.p[first].detach()  # (E, out, in)
    grads = seed_gradient(start, end, ens.lr).abs().flatten(1).mean(1).tolist()
    pcts = percent_change(start, end).flatten(1).nanmedian(1).values.tolist()
    starts, ends = start.tolist(), end.tolist()
    batches = math.ceil(ens.x.shape[1] / ens.train_spec.batch_size)
    grid = _boundaries(ens)
    out = []
    for e, status in enumerate(ens.status):
        k = ens.last_epoch[e]
        last = {stat: history[stat][k][e] for stat in ("loss", "accuracy", "test_accuracy", "test_loss")
                if stat in history}
        ratio = init[0][e] / init[-1][e] if len(init) > 1 and init[-1][e] > 0 else float("nan")
        summary = {
            "final_loss": last.get("loss"),
            "accuracy": last.get("test_accuracy"),
            "train_accuracy": last.get("accuracy"),
            "test_loss": last.get("test_loss"),
            "first_layer_grad": grads[e],
            "first_layer_pct_change": pcts[e],
            "grad_ratio_first_last": ratio,
            "first_weights_start": starts[e],
            "first_weights_end": ends[e],
            "steps": (k + 1) * batches,
            "verdict": verdict(ratio, status),
        }
        if grid is not None:
            summary["boundary"] = {"x": grid[0], "y": grid[1], "p": grid[2][e]}
        out.append(summary)
    return out


@torch.no_grad()
def _boundaries(ens: Ensemble) -> tuple[list, list, list] | None:
    """Each member's output probability on the 50 x 50 grid around 2-D binary data, else None."""
    x: Tensor = ens.data.x_train
    if ens.data.task != "binary" or x.shape[1] != 2:
        return None
    lo, hi = x.min(0).values - 0.5, x.max(0).values + 0.5
    gx, gy = torch.linspace(lo[0], hi[0], GRID), torch.linspace(lo[1], hi[1], GRID)
    points = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1).reshape(-1, 2)  # (GRID^2, 2)
    z = ens.predictions(points)  # (E, 1, GRID^2)
    return gx.tolist(), gy.tolist(), torch.sigmoid(z).reshape(-1, GRID, GRID).tolist()
