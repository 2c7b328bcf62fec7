"""Study files: a base spec, a grid and/or a list over any spec field, validated whole into a Study.

Every problem is a one-line SpecError naming the field, raised before a store is opened or a run
starts; a grid whose size passes ``MAX_RUNS`` is refused from its size alone, before a single spec
of it is built (a 10^6-run grid would otherwise be built, then trained, without a word).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

from gradwatch.data import DATASETS, check_output
from gradwatch.spec import Spec, SpecError, load_mapping, parse, value_at

Job = tuple[str, str, Spec]  # (name, group, spec)
CHUNK = 256  # members per ensemble: past ~128 a bigger one is barely faster, and progress gets coarse
MAX_RUNS = 10_000  # a bigger grid needs `gradwatch sweep --yes` (its help quotes this number): ~0.2 MB per stored run
STUDY_FIELDS = ("name", "base", "grid", "list", "table", "chunk", "evaluate_every", "thin")
VALUES = ("final_loss", "accuracy", "train_accuracy", "test_loss", "grad_ratio_first_last", "first_layer_grad",
          "first_layer_pct_change")  # summary numbers a study table can show


@dataclass(frozen=True)
class Study:
    """Jobs to train as one sweep (one per distinct spec, in grid order) and how to tabulate them.

    A study file makes one (``load_study``); a built-in study makes one per stage of its plan
    (``gradwatch.studies.run``), with no table: it summarizes its runs itself.
    """

    name: str
    jobs: list[Job]
    varied: list[str] = field(default_factory=list)  # dotted fields that take more than one value
    rows: list[str] = field(default_factory=list)
    columns: str | None = None
    value: str | None = None
    chunk: int = CHUNK
    evaluate_every: int = 10
    thin: int = 10  # per-step gradient norms stored every `thin` steps (records.thin), as studies do
    every: int = 10  # the watcher's sampled statistics every `every` steps (train_many's)


def load_study(path: str | Path, limit: int | None = MAX_RUNS) -> Study:
    """Read and validate a study file; every problem is a one-line SpecError naming the field."""
    return study(load_mapping(path), Path(path).stem, limit)


def _positive(mapping: dict, name: str, default: int) -> int:
    value = mapping.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SpecError(f"{name}: got {value!r}; allowed: an integer >= 1")
    return value


def _values(where: str, values) -> list:
    if not isinstance(values, list) or not values:
        raise SpecError(f"{where}: got {values!r}; allowed: a non-empty list of values")
    return values


def study(mapping: dict, default_name: str = "study", limit: int | None = MAX_RUNS) -> Study:
    """Validate a study mapping (see ``load_study``) into a Study, building every spec it names.

    ``limit``: the most runs the grid may name (None: no limit); counted before any spec is built.
    """
    for key in mapping:
        if key not in STUDY_FIELDS:
            raise SpecError(f"{key}: unknown field; allowed: {', '.join(STUDY_FIELDS)}")
    name = mapping.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise SpecError(f"name: got {name!r}; allowed: a non-empty text")
    base_map = mapping.get("base") or {}
    if not isinstance(base_map, dict):
        raise SpecError(f"base: got {base_map!r}; allowed: a mapping with data/model/train")
    base = parse(base_map)
    grid = mapping.get("grid") or {}
    if not isinstance(grid, dict):
        raise SpecError(f"grid: got {grid!r}; allowed: a mapping of field: [values], e.g. model.depth: [2, 4]")
    axes = {key: _values(f"grid.{key}", values) for key, values in grid.items()}
    variants = _values("list", mapping["list"]) if "list" in mapping else [{}]
    for i, variant in enumerate(variants):
        if not isinstance(variant, dict):
            raise SpecError(f"list[{i}]: got {variant!r}; allowed: a mapping of field: value")
    size = len(variants) * math.prod(map(len, axes.values()))
    if limit is not None and size > limit:
        raise SpecError(f"grid: {size:,} runs; allowed: at most {limit:,} (pass --yes to run them anyway)")
    specs: dict[str, Spec] = {}
    for variant in variants:
        for combo in itertools.product(*axes.values()):
            spec = base.replace(**variant, **dict(zip(axes, combo, strict=True)))
            check_output(DATASETS[spec.data.name][1], spec.model.output_activation, spec.data.name)
            specs.setdefault(spec.key(), spec)
    fields = list(dict.fromkeys([*axes, *(f for v in variants for f in v)]))
    varied = [f for f in fields if len({json_value(s, f) for s in specs.values()}) > 1]
    rows, columns, value = _table(mapping.get("table") or {}, varied)
    group = name.strip()
    jobs = [(label(spec, varied), group, spec) for spec in specs.values()]
    return Study(group, jobs, varied, rows, columns, value, chunk=_positive(mapping, "chunk", CHUNK),
                 evaluate_every=_positive(mapping, "evaluate_every", 10), thin=_positive(mapping, "thin", 10))


def _table(table: dict, varied: list[str]) -> tuple[list[str], str | None, str | None]:
    """(row fields, column field, value) of the summary table; by default one row per case."""
    if not isinstance(table, dict):
        raise SpecError(f"table: got {table!r}; allowed: a mapping with rows, columns, value")
    for key in table:
        if key not in ("rows", "columns", "value"):
            raise SpecError(f"table.{key}: unknown field; allowed: rows, columns, value")
    columns, value = table.get("columns"), table.get("value")
    rows = table.get("rows", [f for f in varied if f not in ("train.seed", columns)])
    rows = [rows] if isinstance(rows, str) else rows
    for key in [*rows, *([columns] if columns else [])]:
        if key not in varied:
            raise SpecError(f"table: got {key!r}; allowed: a field the study varies ({', '.join(varied)})")
    if value is not None and value not in VALUES:
        raise SpecError(f"table.value: got {value!r}; allowed: {', '.join(VALUES)}")
    return rows, columns, value


def json_value(spec: Spec | dict, dotted: str):
    """The value of ``dotted`` in a spec (or its ``model_dump``), hashable for grouping."""
    return value_at(spec.model_dump(mode="json") if isinstance(spec, Spec) else spec, dotted)


def label(spec: Spec, varied: list[str]) -> str:
    """A run's name: the varied fields except the seed (so a case's seeds share it), short where unambiguous."""
    leaves = [f.rsplit(".", 1)[-1] for f in varied]
    parts = [f"{leaf if leaves.count(leaf) == 1 else dotted}={json_value(spec, dotted)}"
             for dotted, leaf in zip(varied, leaves, strict=True) if dotted != "train.seed"]
    return " ".join(parts) or "base"


def cases(study: Study) -> int:
    """How many distinct run names (cases; a case's seeds share its name) the study trains."""
    return len({name for name, *_ in study.jobs})
