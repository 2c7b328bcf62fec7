"""A study's results as a table of medians over seeds, and the runs its report draws."""

from __future__ import annotations

import math

from gradwatch.records import Run, finite_median
from gradwatch.store import Store
from gradwatch.sweep.grid import Study, json_value

SHOWN = ("final_loss", "accuracy", "grad_ratio_first_last")  # the table's columns when a study names none


def summarize(study: Study, store: Store) -> list[dict]:
    """The study's table from every stored run of its specs: medians over whatever is not a row or column."""
    keys = {spec.key() for *_, spec in study.jobs}
    heads = {h["key"]: h for h in store.runs() if h["key"] in keys}
    values = [study.value or "final_loss"] if study.value or study.columns else list(SHOWN)
    cells: dict[tuple, dict[str, list[float]]] = {}  # rows in grid order
    for *_, spec in study.jobs:
        cells.setdefault(tuple(json_value(spec, f) for f in study.rows), {})
    for head in heads.values():
        row = tuple(json_value(head["spec"], f) for f in study.rows)
        for value in values:
            column = f"{study.columns}={json_value(head['spec'], study.columns)}" if study.columns else value
            number = head["summary"].get(value)
            cells.setdefault(row, {}).setdefault(column, []).append(math.nan if number is None else float(number))
    table = []
    for row, columns in cells.items():
        if not columns:
            continue
        entry = {f.rsplit(".", 1)[-1]: v for f, v in zip(study.rows, row, strict=True)}
        entry["runs"] = max(len(v) for v in columns.values())
        entry.update({c: finite_median(v) for c, v in columns.items()})
        table.append(entry)
    return table


def report_runs(study: Study, store: Store, fresh: list[str], per_case: int = 3) -> list[Run]:
    """The runs a study's HTML report draws: up to ``per_case`` seeds of each case, this sweep's first."""
    names = {spec.key(): name for name, _, spec in study.jobs}
    heads = [h for h in store.runs(study.name) if h["key"] in names]
    first = set(fresh)
    chosen: dict[str, list[str]] = {}
    for head in sorted(heads, key=lambda h: h["id"] not in first):  # this sweep's runs first, else oldest first
        picked = chosen.setdefault(names[head["key"]], [])
        if len(picked) < per_case and head["key"] not in {k for k, _ in picked}:
            picked.append((head["key"], head["id"]))
    runs = []
    for name, picked in chosen.items():
        for _, run_id in picked:
            run = store.get(run_id)
            run.name, run.group = name, study.name
            runs.append(run)
    return runs
