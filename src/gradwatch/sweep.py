"""Run many specs and store each Run as it finishes; skip what the store already holds.

``run_each`` is the local backend: independent runs spread over worker processes (spawned, one
torch thread each: tiny models gain nothing from intra-op threads and lose a lot to contention).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

from gradwatch.records import Run
from gradwatch.spec import Spec
from gradwatch.train import train

Job = tuple[str, str, Spec]  # (name, group, spec)


def _train_one(job: Job) -> Run:
    import torch

    torch.set_num_threads(1)
    name, group, spec = job
    return train(spec, name=name, group=group)


def workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def run_each(jobs: Iterable[Job], on_done: Callable[[Run], None], processes: int | None = None) -> None:
    """Train every job, calling ``on_done(run)`` in this process as each finishes (in any order)."""
    jobs = list(jobs)
    processes = processes or workers()
    if processes == 1 or len(jobs) == 1:
        for job in jobs:
            on_done(_train_one(job))
        return
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        for future in as_completed([pool.submit(_train_one, job) for job in jobs]):
            on_done(future.result())
