"""A trained Ensemble's members as Runs: Records, their ``summarize``, the decision boundary.

Every value crosses to the host in one ``tolist`` per tensor; a member's Records are its values beside
columns all members share (the (step, epoch, layer, stat) of each row, ``Records.zipped``), whose rows
are made only when read, and its summary reads the rows ``summary.picks`` found once for all members
that trained as long.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from gradwatch.data import GRID, plane
from gradwatch.ensemble.training import Ensemble
from gradwatch.records import Records, Run
from gradwatch.stats import STATS, clipped
from gradwatch.summary import Picks, picks, summarize_picked


def runs(ens: Ensemble, names: list[str], group: str) -> list[Run]:
    """One Run per member, in the ensemble's (activation-sorted) order."""
    ens.restore()
    members = _records(ens)
    summaries = _summaries(ens, members)
    return [Run(records=r, spec=spec.model_dump(mode="json"), summary=s, status=status, name=name,
                group=group, key=spec.key())
            for (r, _, _), s, spec, status, name in zip(members, summaries, ens.specs, ens.status, names, strict=True)]


def _records(ens: Ensemble) -> list[tuple[Records, Picks, list[float]]]:
    """Each member's rows, in the order they were taken, up to the end of its last epoch; with the rows
    its summary reads (``summary.picks``, found once per group and length) and all of its values."""
    out: list[tuple[Records, Picks, list[float]]] = []
    for _, part in ens.stack.groups:  # members of one activation share which stats they have
        columns: tuple[list, list, list, list] = ([], [], [], [])
        values, cuts, k, clips = [], [], 0, []
        for i, (step, epoch, stat, layers, v, only) in enumerate(ens.blocks):
            if only is None or only == part:
                if stat in STATS and STATS[stat].point == "clip":
                    clips.append((len(columns[0]), len(columns[0]) + len(layers)))
                for column, item in zip(columns, (step, epoch, None, stat), strict=True):
                    column.extend(layers if item is None else itertools.repeat(item, len(layers)))
                values.append(v if only is not None else v[:, part])  # (layers, E_part)
            while k < len(ens.ends) and ens.ends[k] == i + 1:
                cuts.append(len(columns[0]))
                k += 1
        steps, epochs, layers, stats = columns
        rows = torch.cat(values).t().tolist()  # sync: every record of these members in one copy
        picked: dict[int, Picks] = {}  # cut -> its rows' picks: members that ran as long share them
        for j, member in enumerate(range(part.start, part.stop)):
            cut = cuts[ens.last_epoch[member]]
            if cut not in picked:
                picked[cut] = picks(itertools.islice(zip(steps, epochs, layers, stats, strict=True), cut))
            columns = (steps, epochs, layers, stats, rows[j])
            out.append((Records.zipped(columns, cut, _clipped_only(rows[j], clips)), picked[cut], rows[j]))
    return out


def _clipped_only(values: list[float], clips: list[tuple[int, int]]) -> list[bool] | None:
    """Which rows to keep: all (None) but the ``clip`` blocks (value spans) in which this member's
    clipping changed nothing, as the watcher records them (``stats.clipped``)."""
    drop = [(a, b) for a, b in clips if not clipped(values[a:b])]
    if not drop:
        return None
    keep = [True] * len(values)
    for a, b in drop:
        keep[a:b] = [False] * (b - a)
    return keep


@torch.no_grad()
def _summaries(ens: Ensemble, members: list[tuple[Records, Picks, list[float]]]) -> list[dict]:
    """``summarize`` of every member's records, with its first weights and decision boundary."""
    first = ens.dense[0]
    starts, ends = ens.initial[first].tolist(), ens.stack.p[first].detach().tolist()  # sync: once per ensemble
    grid = _boundaries(ens)
    out = []
    for e, ((_, picked, values), status) in enumerate(zip(members, ens.status, strict=True)):
        summary = summarize_picked(picked, values, status, first_weights_start=starts[e], first_weights_end=ends[e])
        if grid is not None:
            summary["boundary"] = {"x": grid[0], "y": grid[1], "p": grid[2][e]}
        out.append(summary)
    return out


@torch.no_grad()
def _boundaries(ens: Ensemble) -> tuple[list, list, list] | None:
    """Each member's output probability on ``data.plane``'s grid around 2-D binary data, else None."""
    x: Tensor = ens.data.x_train
    if ens.data.task != "binary" or x.shape[1] != 2:
        return None
    xs, ys, points = plane(x)  # points: (GRID^2, 2)
    z = ens.predictions(points)  # (E, 1, GRID^2)
    return xs.tolist(), ys.tolist(), torch.sigmoid(z).reshape(-1, GRID, GRID).tolist()  # sync: once per ensemble
