"""Run many specs fast and store each Run as it finishes; skip what the store already holds.

``run_many(jobs, on_done)`` groups jobs by layer shape (``ensemble.shape_key``) into stacked
ensembles of at most ``chunk`` members and trains each with ``ensemble.train_many`` (recurrent nets:
one ``train`` each), locally in this process or as Ray tasks (``backend="ray"``, on the cluster at
``address`` or a local Ray). ``run_study`` does it for a study file (``gradwatch sweep STUDY.yaml``):
a base spec, a grid and/or a list over any spec field, validated whole before any run starts, each
finished run committed in its own transaction, keys already stored skipped, so a sweep killed at any
moment (SIGKILL, Ctrl-C) resumes without losing or repeating a run. ``run_each`` runs one ``train``
per job over a process pool: the demo's path, where every run goes through the watcher as a user's does.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import os
import signal
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from pathlib import Path

from gradwatch.data import DATASETS, check_output
from gradwatch.ensemble import shape_key, stackable, train_many
from gradwatch.records import Run, finite_median
from gradwatch.spec import Spec, SpecError, load_mapping, parse, value_at
from gradwatch.store import Store
from gradwatch.train import train

Job = tuple[str, str, Spec]  # (name, group, spec)
BACKENDS = ("local", "ray")
CHUNK = 256  # members per ensemble: past ~128 a bigger one is barely faster, and progress gets coarse
STUDY_FIELDS = ("name", "base", "grid", "list", "table", "chunk", "evaluate_every", "thin")
VALUES = ("final_loss", "accuracy", "train_accuracy", "test_loss", "grad_ratio_first_last", "first_layer_grad",
          "first_layer_pct_change")  # summary numbers a study table can show
SHOWN = ("final_loss", "accuracy", "grad_ratio_first_last")  # the table's columns when a study names none


def _train_one(job: Job) -> Run:
    _tune()
    name, group, spec = job
    return train(spec, name=name, group=group)


def workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def _tune() -> None:
    """One torch thread (tiny models gain nothing from more and lose a lot to contention), memory kept."""
    import torch

    torch.set_num_threads(1)
    keep_memory()


def _worker(parent: int | None = None) -> None:
    """Set up a worker process: ``_tune``, and death with its parent, so a sweep killed with SIGKILL
    leaves no orphan training on (Linux's PR_SET_PDEATHSIG, plus a check for a parent that died
    while this worker was still starting; elsewhere workers end with their pipe)."""
    _tune()
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def _parallel(fn: Callable, items: list, processes: int, on_result: Callable) -> None:
    """``on_result(fn(item))`` for every item, in this process as each finishes, over spawned workers."""
    pool = ProcessPoolExecutor(processes, mp_context=get_context("spawn"), initializer=_worker,
                               initargs=(os.getpid(),))
    try:
        for future in as_completed([pool.submit(fn, item) for item in items]):
            on_result(future.result())
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def run_each(jobs: Iterable[Job], on_done: Callable[[Run], None], processes: int | None = None) -> None:
    """Train every job, calling ``on_done(run)`` in this process as each finishes (in any order)."""
    jobs = list(jobs)
    processes = processes or workers()
    if processes == 1 or len(jobs) == 1:
        for job in jobs:
            on_done(_train_one(job))
        return
    _parallel(_train_one, jobs, processes, on_done)


# --- many specs at once ---------------------------------------------------------------------------
def keep_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of returning it to the kernel.

    An ensemble frees and re-allocates the same multi-megabyte activations every step; by default
    glibc unmaps them and page-faults them back in, which makes an evaluation pass 2-3x slower than
    its arithmetic (what LD_PRELOAD'ing jemalloc or tcmalloc does for PyTorch's CPU performance
    guide). A no-op where glibc's ``mallopt`` is missing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: never trim the heap top
    libc.mallopt(-3, 1 << 25)  # M_MMAP_THRESHOLD: heap, not mmap, up to 32 MiB (glibc's ceiling)


def chunks(jobs: list[Job], size: int = CHUNK) -> list[list[Job]]:
    """Jobs grouped by ``shape_key`` into ensembles of at most ``size``; recurrent jobs one by one."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        key = shape_key(job[2]) if stackable(job[2]) else ("single", len(groups))
        groups.setdefault(key, []).append(job)
    return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]


def train_chunk(jobs: list[Job], thin: int = 1, evaluate_every: int = 1, every: int = 10) -> list[Run]:
    """One chunk's Runs: ``train_many`` for an ensemble, ``train`` for a lone recurrent job."""
    if not stackable(jobs[0][2]):
        runs = [train(spec, name=name, group=group) for name, group, spec in jobs]
        for run in runs:
            run.records = run.records.thin(thin) if thin > 1 else run.records
        return runs
    runs = train_many([spec for *_, spec in jobs], every=every, thin=thin, evaluate_every=evaluate_every,
                      names=[name for name, *_ in jobs])
    for run, (_, group, _) in zip(runs, jobs, strict=True):
        run.group = group
    return runs


def _ray_chunk(jobs: list[Job], thin: int, evaluate_every: int, every: int) -> list[Run]:
    _worker()  # a Ray task holds one CPU
    return train_chunk(jobs, thin, evaluate_every, every)


def run_many(jobs: Iterable[Job], on_done: Callable[[Run], None], backend: str = "local", address: str | None = None,
             processes: int = 1, chunk: int = CHUNK, thin: int = 1, evaluate_every: int = 1, every: int = 10) -> None:
    """Train every job, calling ``on_done(run)`` in this process as each finishes, ensemble by ensemble.

    ``backend="local"`` trains here (``processes=1``, one ensemble after another) or over spawned
    worker processes; ``"ray"`` sends each ensemble to Ray as a task (``ray.init(address=address)``
    unless Ray is initialised already; no address starts a local Ray). ``thin``, ``evaluate_every`` and
    ``every`` are ``train_many``'s cadences (1, 1, 10: records exactly as ``train`` makes them).

    Examples:
        >>> jobs = [(f"seed{s}", "mine", gradwatch.Spec().replace(**{"train.seed": s})) for s in range(128)]
        >>> run_many(jobs, store.put_run)
    """
    if backend not in BACKENDS:
        raise SpecError(f"backend: got {backend!r}; allowed: {', '.join(BACKENDS)}")
    todo = chunks(list(jobs), chunk)

    def finished(runs: list[Run]) -> None:
        for run in runs:
            on_done(run)

    if backend == "ray":
        _run_ray(todo, finished, address, thin, evaluate_every, every)
    elif processes > 1 and len(todo) > 1:
        _parallel(partial(train_chunk, thin=thin, evaluate_every=evaluate_every, every=every), todo, processes,
                  finished)
    else:
        _tune()
        for part in todo:
            finished(train_chunk(part, thin, evaluate_every, every))


def _run_ray(todo: list[list[Job]], finished: Callable, address: str | None, thin: int, evaluate_every: int,
             every: int) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=1)(_ray_chunk)
    pending = [remote.remote(part, thin, evaluate_every, every) for part in todo]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        finished(ray.get(done[0]))


# --- study files ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Study:
    """A validated study file: its jobs in grid order (one per distinct spec) and how to tabulate them."""

    name: str
    jobs: list[Job]
    varied: list[str]  # dotted fields that take more than one value
    rows: list[str]
    columns: str | None
    value: str | None
    chunk: int = CHUNK
    evaluate_every: int = 10
    thin: int = 10  # per-step gradient norms stored every `thin` steps (records.thin), as studies do


def load_study(path: str | Path) -> Study:
    """Read and validate a study file; every problem is a one-line SpecError naming the field."""
    return study(load_mapping(path), Path(path).stem)


def _positive(mapping: dict, field: str, default: int) -> int:
    value = mapping.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SpecError(f"{field}: got {value!r}; allowed: an integer >= 1")
    return value


def _values(where: str, values) -> list:
    if not isinstance(values, list) or not values:
        raise SpecError(f"{where}: got {values!r}; allowed: a non-empty list of values")
    return values


def study(mapping: dict, default_name: str = "study") -> Study:
    """Validate a study mapping (see ``load_study``) into a Study, building every spec it names."""
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
    axes = {field: _values(f"grid.{field}", values) for field, values in grid.items()}
    variants = _values("list", mapping["list"]) if "list" in mapping else [{}]
    for i, variant in enumerate(variants):
        if not isinstance(variant, dict):
            raise SpecError(f"list[{i}]: got {variant!r}; allowed: a mapping of field: value")
    specs: dict[str, Spec] = {}
    for variant in variants:
        for combo in itertools.product(*axes.values()):
            spec = base.replace(**variant, **dict(zip(axes, combo, strict=True)))
            check_output(DATASETS[spec.data.name][1], spec.model.output_activation, spec.data.name)
            specs.setdefault(spec.key(), spec)
    fields = list(dict.fromkeys([*axes, *(f for v in variants for f in v)]))
    varied = [f for f in fields if len({json_value(s, f) for s in specs.values()}) > 1]
    table = _table(mapping.get("table") or {}, varied)
    group = name.strip()
    jobs = [(label(spec, varied), group, spec) for spec in specs.values()]
    return Study(group, jobs, varied, *table, chunk=_positive(mapping, "chunk", CHUNK),
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
    for field in [*rows, *([columns] if columns else [])]:
        if field not in varied:
            raise SpecError(f"table: got {field!r}; allowed: a field the study varies ({', '.join(varied)})")
    if value is not None and value not in VALUES:
        raise SpecError(f"table.value: got {value!r}; allowed: {', '.join(VALUES)}")
    return rows, columns, value


def json_value(spec: Spec | dict, field: str):
    """The value of dotted ``field`` in a spec (or its ``model_dump``), hashable for grouping."""
    return value_at(spec.model_dump(mode="json") if isinstance(spec, Spec) else spec, field)


def label(spec: Spec, varied: list[str]) -> str:
    """A run's name: the varied fields except the seed (so a case's seeds share it), short where unambiguous."""
    leaves = [f.rsplit(".", 1)[-1] for f in varied]
    parts = [f"{leaf if leaves.count(leaf) == 1 else field}={json_value(spec, field)}"
             for field, leaf in zip(varied, leaves, strict=True) if field != "train.seed"]
    return " ".join(parts) or "base"


def run_study(study: Study, store: Store, backend: str = "local", address: str | None = None, processes: int = 1,
              on_progress: Callable[[int, int, float], None] | None = None) -> list[Run]:
    """Train the study's runs that ``store`` lacks, committing each as it finishes; returns those Runs.

    ``on_progress(done, total, runs_per_second)`` is called after each commit.
    """
    stored = store.keys()
    todo = [job for job in study.jobs if job[2].key() not in stored]
    fresh: list[Run] = []
    start = time.perf_counter()

    def done(run: Run) -> None:
        store.put_run(run)
        fresh.append(run)
        if on_progress:
            on_progress(len(fresh), len(todo), len(fresh) / max(time.perf_counter() - start, 1e-9))

    if on_progress:
        on_progress(0, len(todo), 0.0)
    run_many(todo, done, backend, address, processes, study.chunk, study.thin, study.evaluate_every)
    return fresh


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


def report_runs(study: Study, store: Store, fresh: list[Run], per_case: int = 3) -> list[Run]:
    """The runs a study's HTML report draws: up to ``per_case`` seeds of each case, this sweep's first."""
    keys = {spec.key(): name for name, _, spec in study.jobs}
    chosen: dict[str, list[Run]] = {}
    for run in fresh:
        if len(chosen.setdefault(run.name, [])) < per_case:
            chosen[run.name].append(run)
    have = {run.key for runs in chosen.values() for run in runs}
    for head in store.runs():
        name = keys.get(head["key"])
        if name is not None and head["key"] not in have and len(chosen.setdefault(name, [])) < per_case:
            chosen[name].append(store.get(head["id"]))
            have.add(head["key"])
    return [run for runs in chosen.values() for run in runs]
