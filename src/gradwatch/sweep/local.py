"""Training jobs on this machine: ensembles by layer shape, in this process or over spawned workers.

``chunks`` groups jobs by ``ensemble.shape_key`` into stacked ensembles and ``train_chunk`` trains
one (recurrent nets: one ``train`` each); ``run_each`` runs one ``train`` per job over a process
pool: the demo's path, where every run goes through the watcher as a user's does. Every process
that trains is tuned the same way (``tune``): one torch thread, glibc keeping freed memory.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

from gradwatch.ensemble import shape_key, stackable, train_many
from gradwatch.records import Run
from gradwatch.sweep.grid import CHUNK, Job
from gradwatch.train import train


def workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


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


def tune() -> None:
    """One torch thread (tiny models gain nothing from more and lose a lot to contention), memory kept."""
    import torch

    torch.set_num_threads(1)
    keep_memory()


def worker(parent: int | None = None) -> None:
    """Set up a worker process (a pool's or a Ray task's): ``tune``, and death with its parent, so a
    sweep killed with SIGKILL leaves no orphan training on (Linux's PR_SET_PDEATHSIG, plus a check
    for a parent that died while this worker was still starting; elsewhere workers end with their pipe)."""
    tune()
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def parallel(fn: Callable, items: list, processes: int, on_result: Callable) -> None:
    """``on_result(fn(item))`` for every item, in this process as each finishes, over spawned workers."""
    pool = ProcessPoolExecutor(processes, mp_context=get_context("spawn"), initializer=worker,
                               initargs=(os.getpid(),))
    try:
        for future in as_completed([pool.submit(fn, item) for item in items]):
            on_result(future.result())
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _train_one(job: Job) -> Run:
    tune()
    name, group, spec = job
    return train(spec, name=name, group=group)


def run_each(jobs: Iterable[Job], on_done: Callable[[Run], None], processes: int | None = None) -> None:
    """Train every job, calling ``on_done(run)`` in this process as each finishes (in any order)."""
    jobs = list(jobs)
    processes = processes or workers()
    if processes == 1 or len(jobs) == 1:
        for job in jobs:
            on_done(_train_one(job))
        return
    parallel(_train_one, jobs, processes, on_done)


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
