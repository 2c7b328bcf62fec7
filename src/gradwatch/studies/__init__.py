"""STUDIES: curated experiments that prove each remedy with a number, and answer the seeds' questions.

A study is a module with ``TITLE``, ``next_jobs(runs) -> [(name, group, spec)]`` (called until it
returns nothing, so a study can stage its runs, e.g. stop deepening a remedy once it fails) and
``summarize(runs) -> Result``, and optionally ``CADENCE``, the sweep's record cadences (``thin``,
``evaluate_every``, ``every``) for a study of thousands of runs that reads only their summaries.
Studies hold no training code: ``run`` hands each stage's jobs to the sweep engine as a
``sweep.Study``, the same ``sweep.run_study`` that runs a user's study file (same-shape MLPs as one
stacked ensemble, each Run stored as it finishes, stored runs reused on a re-run).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module

from gradwatch import sweep
from gradwatch.records import Run
from gradwatch.store import Store


@dataclass
class Result:
    """What a study found: a table, a conclusion computed from it, and captioned figures."""

    title: str
    rows: list[dict]
    conclusion: str
    figures: list[tuple[object, str, str]] = field(default_factory=list)  # (Figure, caption, stem)
    measured: dict = field(default_factory=dict)  # what ``gradwatch study NAME --json`` writes, if more than rows


def finite(value):
    """A copy of ``Result.measured`` for JSON: infinities (a depth scale at the edge of chaos, the spread
    of a rank-deficient spectrum) become None, since JSON has no Infinity."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return None if isinstance(value, float) and math.isinf(value) else value


QUICK = "QUICK RUN (tiny budgets: checks the machinery, proves nothing)"
THIN = 10  # per-step gradient norms kept every 10th step: hundreds of runs stay a few MB each study

# name -> module under gradwatch.studies; each has a test on a tiny budget
STUDIES = {
    "depth": "depth",
    "dying-relu": "dying_relu",
    "sequences": "sequences",
    "exploding": "exploding",
    "output-activation": "output_activation",
    "width-vs-depth": "width_vs_depth",
    "relu-he": "relu_he",
    "criticality": "criticality",
    "isometry": "isometry",
}


def module(name: str):
    return import_module(f"gradwatch.studies.{STUDIES[name]}")


def run(name: str, store: Store, workers: int | None = None, quick: bool = False,
        on_run: Callable[[Run], None] | None = None) -> Result:
    """Train (or reuse from ``store``) every run of study ``name`` and summarize them.

    ``quick`` shrinks every budget (fewer epochs, seeds and sizes) so tests can run the machinery.
    Each stage's runs reach ``summarize`` in the order one process trains them (ensemble by ensemble,
    ``sweep.chunks``), however many processes trained them and whether or not they were stored already.
    """
    study, group = module(name), f"study:{name}" + (":quick" if quick else "")
    runs: list[Run] = []
    stage: dict[str, Run] = {}  # this stage's runs by key

    def keep(run: Run) -> None:
        stage[run.key] = run
        if on_run:
            on_run(run)

    while jobs := [(n, group, spec) for n, _, spec in study.next_jobs(runs, quick)]:
        stage.clear()
        plan = sweep.Study(group, jobs, **{"thin": THIN, "evaluate_every": 1, **getattr(study, "CADENCE", {})})
        sweep.run_study(plan, store, processes=workers or sweep.workers(), on_run=keep)
        runs += [stage[spec.key()] for part in sweep.chunks(jobs, plan.chunk) for *_, spec in part]
    result = study.summarize(runs)
    if quick:  # the console and every page print the conclusion: a quick one must not read as a finding
        result.conclusion = f"{QUICK}. {result.conclusion}"
    return result


def by_name(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by name (one name per study arm, one run per seed), in first-seen order."""
    out: dict[str, list[Run]] = {}
    for run in runs:
        out.setdefault(run.name, []).append(run)
    return out


def median(runs: list[Run], value: Callable[[Run], float]) -> float:
    """Median over seeds of ``value(run)``, ignoring runs where it is missing."""
    import statistics

    values = [v for v in map(value, runs) if v is not None]
    return statistics.median(values) if values else float("nan")


def arms(specs: dict[str, dict], seeds: int, base: dict, quick: bool, quick_base: dict) -> list:
    """One job per arm and seed: ``base`` (plus ``quick_base`` when quick) updated by the arm's overrides."""
    from gradwatch.spec import Spec

    quick_base = quick_base if quick else {}
    return [(name, "", Spec().replace(**{**base, **over, **quick_base, "train.seed": s}))
            for name, over in specs.items() for s in range(2 if quick else seeds)]
