"""The sweep engine: a Study's runs trained on a backend, each committed as it finishes, stored ones reused.

``run_study`` is the one path from a Study to stored runs, for study files (``gradwatch sweep``) and
the built-in studies (``gradwatch study``) alike: runs whose key is already stored are reused (and
labelled into this study's group under their case names, so ``runs --group`` finds all of them), the
rest train as stacked ensembles (``run_many``) and each is committed in its own transaction, so a
sweep killed at any moment (SIGKILL, Ctrl-C, a lost Ray node) resumes without losing or repeating a
run. Finished runs are not kept in memory: a 10^5-run sweep holds one ensemble per worker at a time.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache, partial

from gradwatch.records import Run
from gradwatch.spec import DataSpec, ModelSpec, SpecError
from gradwatch.store import Store
from gradwatch.sweep.grid import CHUNK, Job, Study, cases
from gradwatch.sweep.local import chunks, parallel, train_chunk, tune

BACKENDS = ("local", "ray")
BYTES_PER_PARAMETER = 16  # float32 weight, gradient and Adam's two moments
BYTES_PER_ROW = 120  # one Records row (a tuple of five Python objects) until its run is stored
PROCESS_BYTES = 400 << 20  # one process's torch, numpy and sklearn before any net


def run_many(jobs: Iterable[Job], on_done: Callable[[Run], None], backend: str = "local", address: str | None = None,
             processes: int = 1, chunk: int = CHUNK, thin: int = 1, evaluate_every: int = 1, every: int = 10) -> int:
    """Train every job, calling ``on_done(run)`` in this process as each finishes, ensemble by ensemble.

    ``backend="local"`` trains here (``processes=1``, one ensemble after another) or over spawned
    worker processes; ``"ray"`` sends each ensemble to Ray as a task (see ``sweep.cluster``).
    ``thin``, ``evaluate_every`` and ``every`` are ``train_many``'s cadences (1, 1, 10: records exactly
    as ``train`` makes them). Returns how many machines (Ray nodes) trained.

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
        from gradwatch.sweep.cluster import run_ray

        return run_ray(todo, finished, address, thin, evaluate_every, every)
    if processes > 1 and len(todo) > 1:
        parallel(partial(train_chunk, thin=thin, evaluate_every=evaluate_every, every=every), todo, processes,
                 finished)
    else:
        tune()
        for part in todo:
            finished(train_chunk(part, thin, evaluate_every, every))
    return 1


@dataclass
class Outcome:
    """What ``run_study`` did: ids of the runs it trained, how many stored ones it reused, on how many nodes."""

    fresh: list[str] = field(default_factory=list)
    reused: int = 0
    nodes: int = 0
    backend: str = "local"

    def __str__(self) -> str:
        where = f" on {self.nodes} Ray node(s)" if self.backend == "ray" and self.nodes else ""
        return f"{len(self.fresh):,} trained{where}, {self.reused:,} reused from the store"


def run_study(study: Study, store: Store, backend: str = "local", address: str | None = None, processes: int = 1,
              on_progress: Callable[[int, int, int, float], None] | None = None,
              on_run: Callable[[Run], None] | None = None) -> Outcome:
    """Train the study's runs that ``store`` lacks, committing each as it finishes; reuse the others.

    ``on_progress(trained, to_train, reused, runs_per_second)`` is called before the first run and
    after each commit; ``on_run(run)`` with every run of the study: each reused one (read back from
    the store, under this study's name and group) before training starts, each fresh one once stored.
    """
    check_memory(study, processes, backend)
    reused = _reuse(study, store)
    todo = list({spec.key(): (name, group, spec) for name, group, spec in study.jobs if spec.key() not in reused}
                .values())
    if on_run:
        for (name, group, _), run_id in reused.values():
            run = store.get(run_id)
            run.name, run.group = name, group
            on_run(run)
    outcome, start = Outcome(reused=len(reused), backend=backend), time.perf_counter()

    def done(run: Run) -> None:
        store.put_run(run)
        outcome.fresh.append(run.id)
        if on_run:
            on_run(run)
        if on_progress:
            on_progress(len(outcome.fresh), len(todo), len(reused),
                        len(outcome.fresh) / max(time.perf_counter() - start, 1e-9))

    if on_progress:
        on_progress(0, len(todo), len(reused), 0.0)
    if todo:
        outcome.nodes = run_many(todo, done, backend, address, processes, study.chunk, study.thin,
                                 study.evaluate_every, study.every)
    return outcome


def _reuse(study: Study, store: Store) -> dict[str, tuple[Job, str]]:
    """key -> (job, stored run id) for every job already stored, labelled into the job's group and name."""
    wanted = {spec.key(): (name, group, spec) for name, group, spec in study.jobs}
    found: dict[str, tuple[Job, dict]] = {}
    for head in store.runs():
        job = wanted.get(head["key"])
        if job and (head["key"] not in found or (head["name"], head["group"]) == job[:2]):
            found[head["key"]] = (job, head)  # any stored copy; one already under this name and group first
    labels = [(head["id"], group, name) for (name, group, _), head in found.values()
              if (head["name"], head["group"]) != (name, group)]
    if labels:
        store.label(labels)
    return {key: (job, head["id"]) for key, (job, head) in found.items()}


def preflight(study: Study, processes: int, backend: str) -> str:
    """The line printed before a sweep starts (its size), once ``check_memory`` has let it through."""
    check_memory(study, processes, backend)
    return f"sweep {study.name}: {len(study.jobs):,} runs in {cases(study):,} cases"


def check_memory(study: Study, processes: int, backend: str = "local") -> None:
    """Refuse, in one line, a local sweep whose ensembles would need more memory than this machine has
    (a Ray sweep's ensembles run on the cluster's nodes, whose memory is theirs to check)."""
    if backend != "local":
        return
    # a chunk's members share ensemble.shape_key, which fixes every term of _member_bytes: one per chunk
    # (per member, the cache would build a net per init and sigma_w^2: minutes for a deep study's grid)
    per_chunk = sorted(((len(part) * _member_bytes(spec.data, spec.model, spec.train.batch_size, spec.train.epochs,
                                                   study.thin), len(part), spec)
                        for part in chunks(study.jobs, study.chunk) for spec in [part[0][2]]), key=lambda c: c[0])
    if not per_chunk:
        return
    biggest = per_chunk[-processes:]
    need = PROCESS_BYTES * (1 + processes) + sum(size for size, *_ in biggest)
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        _, members, spec = biggest[-1]
        raise SpecError(f"memory: the sweep needs about {need / 2**30:.1f} GiB at once ({processes} worker(s), "
                        f"ensembles of up to {members} nets of {_parameters(spec.data, spec.model):,} parameters); "
                        f"this machine has {have / 2**30:.1f} GiB; allowed: a smaller chunk (nets per ensemble), "
                        "fewer workers or smaller nets")


@lru_cache(maxsize=1024)
def _parameters(data: DataSpec, model: ModelSpec) -> int:
    """The net's parameter count, from a copy built on torch's meta device (no memory, no arithmetic)."""
    import torch

    from gradwatch.data import load
    from gradwatch.nets import build

    dataset = load(data)
    with torch.device("meta"):
        net = build(model, dataset.x_train.shape[-1], dataset.n_outputs)
    return sum(p.numel() for p in net.parameters())


@lru_cache(maxsize=1024)
def _member_bytes(data: DataSpec, model: ModelSpec, batch: int, epochs: int, thin: int) -> int:
    """One ensemble member's peak bytes: parameters with their optimizer state, a batch's activations
    and their gradients, and its records until stored (per layer, the thinned per-step norms plus the
    statistics sampled every 10th step)."""
    layers = model.depth + 1
    steps = epochs * math.ceil(data.n_samples / batch)
    rows = steps * layers * (2 / thin + 8 / 10)
    return (_parameters(data, model) * BYTES_PER_PARAMETER + batch * model.width * layers * 16
            + int(rows * BYTES_PER_ROW))
