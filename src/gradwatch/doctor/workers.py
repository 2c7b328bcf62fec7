"""The doctor's worker processes: started once per process, kept warm, fed batches packed into two tensors.

Spawned, not forked: forking a process that holds torch's threads is not safe. Whether they pay depends on
the host: see ``doctor``'s ``workers``.
"""

from __future__ import annotations

import os
import pickle
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch
from torch import Tensor


def pack(batches: list) -> tuple:
    """Batches for a worker as two tensors and the batch sizes: a pickled tensor costs ~0.2 ms, so 300
    batches sent one by one took longer than a small net's trial."""
    if all(isinstance(t, Tensor) for batch in batches for t in batch):
        xs, ys = zip(*batches, strict=True)
        return torch.cat(xs), torch.cat(ys), [len(x) for x in xs]
    return (batches,)


def unpack(packed: tuple) -> list:
    """The batches ``pack`` packed, as views of its two tensors: the same values, not copies."""
    if len(packed) == 1:
        return packed[0]
    x, y, sizes = packed
    return list(zip(x.split(sizes), y.split(sizes), strict=True))


def _one_thread() -> None:
    """A worker's start: one intra-op thread, so that the workers share the cores instead of fighting for them."""
    torch.set_num_threads(1)


_POOLS: dict[int, ProcessPoolExecutor] = {}  # workers -> the pool every doctor call in this process shares


def pool_for(workers: int | None, *picklable) -> ProcessPoolExecutor | None:
    """Worker processes for the trials, started once per process and kept warm for the next doctor call.

    ``None`` asks for one per core where the user's pieces come from an importable
    module: a piece defined in ``__main__`` (a notebook, a script) makes a spawned worker re-run that
    script, which only an ``if __name__ == "__main__":`` guard makes safe; there an explicit
    ``workers`` opts in. A piece that does not pickle (a lambda) keeps the trials here.
    """
    if workers is None and any(getattr(getattr(p, "func", p), "__module__", None) == "__main__" for p in picklable):
        return None
    workers = min(workers or os.cpu_count() or 1, 4)
    if workers < 2:
        return None
    try:
        pickle.dumps(picklable)
    except (pickle.PicklingError, AttributeError, TypeError):
        return None
    if workers not in _POOLS:
        _POOLS[workers] = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_one_thread)
    return _POOLS[workers]


def lanes(pool: ProcessPoolExecutor) -> int:
    """How many trials ``pool`` runs side by side: the workers it was started with."""
    return next(workers for workers, started in _POOLS.items() if started is pool)


def drop(pool: ProcessPoolExecutor) -> None:
    """Forget a pool whose worker died, so that the next doctor call starts a fresh one."""
    for key in [k for k, v in _POOLS.items() if v is pool]:
        del _POOLS[key]
