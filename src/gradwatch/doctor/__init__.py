"""``doctor(make_model, data, loss_fn)``: the diagnosis's remedies, tried on the user's own model and ranked.

The untreated model trains for a short budget from a few seeds, watched as any user's loop would be
(``gradwatch.watch``); its findings (those most seeds agree on) propose treatments, each a change in
``TREATMENTS``; every treatment trains from the same seeds on the same batches, and the treatments
are ranked by the final loss they reach. Where more than ``FINALISTS`` are proposed, all of them
are first screened on one seed for a quarter of the steps and only the best go on to every seed
and the whole budget: successive halving (Jamieson & Talwalkar 2016; Hyperband, Li et al. 2017).
A trial is watched on half its seeds first, and on the rest only while they could still change which
findings most seeds show; otherwise they train unwatched, for their loss alone.
Repair tools before it (AUTOTRAINER, ICSE 2021; DeepDiagnosis, ICSE 2022) apply fixes in a fixed
order; Kim et al. (ICST 2023) found a random choice of repair does as well as them. Here every claim
is a measurement on the user's model, and ``t.build()`` hands over the treated model, its optimizer
and its clip norm to reproduce it in the user's own loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool

import torch
from torch import Tensor, nn

from gradwatch.diagnose import REMEDIES
from gradwatch.doctor.prescription import COMBINED, FINALISTS, SCREEN, Prescription, Treatment, final_loss, prescribe
from gradwatch.doctor.treatments import TREATMENTS, Plan, adam
from gradwatch.doctor.workers import drop, pack, pool_for, unpack
from gradwatch.records import Records
from gradwatch.spec import SpecError
from gradwatch.watch import watch

__all__ = ["TREATMENTS", "Prescription", "Treatment", "doctor", "final_loss", "prescribe", "schedule"]

LOGS = 20  # loss logs per trial: enough for the loss rules' 10-log window
EVERY = 10  # the watcher's sampled-step cadence in a trial


def schedule(data, steps: int, seed: int, batch_size: int = 32) -> list[tuple[Tensor, Tensor]]:
    """The ``steps`` batches a trial from ``seed`` trains on: the same for every treatment.

    ``(X, Y)`` tensors are shuffled into epochs by a generator seeded with ``seed``; any other
    re-iterable of ``(x, y)`` batches (a DataLoader) is read one pass at a time, as it yields them.
    """
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        order = torch.Generator().manual_seed(seed)
        out: list[tuple[Tensor, Tensor]] = []
        while len(out) < steps:
            out += [(x[i], y[i]) for i in torch.randperm(len(x), generator=order).split(batch_size)]
        return out[:steps]
    batches: list = []
    while len(batches) < steps:
        one_pass = list(data)
        if not one_pass:
            raise SpecError("data: got an empty iterable; allowed: (X, Y) tensors or re-iterable (x, y) batches")
        batches += one_pass
    return batches[:steps]


def run_trial(plan: Plan, make_model, batches, loss_fn, seed: int,
              watched: bool = True) -> tuple[list[float], Records | None]:
    """Train ``plan``'s model on ``batches`` from ``seed``; (per-step losses, records: None unless ``watched``).

    A screening trial, or a seed that can change no finding, is scored on its loss alone: unwatched, it
    skips the watcher's cost (measured 1.2-1.8x a plain run on the clinic's small nets) and trains exactly
    as it would watched.
    """
    torch.manual_seed(seed)
    model, optimizer, clip_norm = plan.build(make_model, batches[0][0])
    per_log = max(1, len(batches) // LOGS)
    losses: list[Tensor] = []
    with watch(model, optimizer, every=EVERY) if watched else _Unwatched() as w:
        for step, (x, y) in enumerate(batches):
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            optimizer.step()
            losses.append(loss.detach())
            if (step + 1) % per_log == 0:
                logged = torch.stack(losses[-per_log:]).mean().item()  # sync: once per log
                w.log(epoch=step // per_log, loss=logged)
                if not math.isfinite(logged):
                    break
    return torch.stack(losses).tolist(), w.records  # sync: once per trial


class _Unwatched:
    """A stand-in for the watcher in a trial nobody diagnoses: logs nothing, records nothing."""

    records = None

    def __enter__(self) -> _Unwatched:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def log(self, **_scalars) -> None:
        pass


def _plan(name: str, base: Plan, make_model) -> Plan | str:
    """The Plan of treatment ``name`` (``untreated``: the user's own; ``a+b``: ``b`` on top of ``a``), decided
    on a fresh model; why not, where a part does not apply."""
    if name == "untreated":
        return base
    torch.manual_seed(0)
    model, plan = make_model(), base
    for part in name.split(COMBINED):
        plan = TREATMENTS[part](plan, model)
        if isinstance(plan, str):  # the first part that does not apply says why
            return plan
    return plan


def _remote(make_model, packed: tuple, loss_fn, optimizer, name: str, seed: int, watched: bool):
    """One trial in a worker process: the plan is rebuilt there (surgeries are closures, not pickles)."""
    return run_trial(_plan(name, Plan(optimizer=optimizer or adam), make_model), make_model, unpack(packed), loss_fn,
                     seed, watched)


def _fits(plan: Plan, make_model, x: Tensor) -> Plan | str:
    """``plan`` if its model builds and runs a forward pass on ``x``, else why not (a surgery that does not fit)."""
    torch.manual_seed(0)
    try:
        model, _, _ = plan.build(make_model, x)
        with torch.no_grad():
            model(x)
    except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
        return f"does not fit this model ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"
    return plan


def doctor(make_model: Callable[[], nn.Module], data, loss_fn: Callable, optimizer: Callable | None = None,
           steps: int = 300, seeds: int = 3, batch_size: int = 32, workers: int | None = 1,
           threads: int | None = 1, finalists: int = FINALISTS) -> Prescription:
    """Diagnose ``make_model()``'s training, try the remedies on it, and return the ranked Prescription.

    ``make_model()`` returns a fresh module (the doctor seeds it); ``data`` is ``(X, Y)`` tensors or a
    re-iterable of ``(x, y)`` batches; ``loss_fn(output, target)``; ``optimizer`` maps parameters to
    an optimizer (default Adam, lr 1e-3). A model with no finding gets no treatment. ``workers``:
    processes for the trials (None: one per core where the pieces are importable, see ``workers.pool_for``), used
    where those four pickle; kept warm for the next call. The default is 1, the fastest measured on a
    shared 2-core host (load 6-8): two warm workers took 1.1-1.35x (median 1.2x) the wall time of one
    process on six of the clinic's models, whose trials are too short to gain from a second process on a
    busy host; starting the workers took 22-32 s there, once per process. ``threads``: torch's
    intra-op threads during the trials, restored after (None: leave them): small nets on a busy CPU
    lose more to idle threads than they gain, measured: the seed's net took 653 s wall at torch's
    default of 2 threads on a loaded 2-core host, 28 s at 1. ``finalists``: how many treatments the
    screening keeps for the whole measurement (0: no screening, every treatment measured in full).

    Examples:
        >>> rx = gradwatch.doctor(make_model, (X, Y), torch.nn.functional.cross_entropy)
        >>> print(rx)
        >>> model, optimizer, clip_norm = rx.treatments[0].build()
    """
    if steps < 2 * LOGS or seeds < 1:
        raise SpecError(f"steps, seeds: got {steps}, {seeds}; allowed: steps >= {2 * LOGS}, seeds >= 1")
    start = time.perf_counter()
    plans = {seed: schedule(data, steps, seed, batch_size) for seed in range(seeds)}
    base = Plan(optimizer=optimizer or adam)
    kwargs = {"_make": make_model, "_first_batch": lambda seed: plans[seed][0][0]}

    pool = pool_for(workers, make_model, loss_fn, optimizer)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)

    def run(jobs: list[tuple[Treatment, int, bool]], length: int) -> list:
        """Each ``(treatment, seed, watched)`` trial for ``length`` steps; in the pool where there is one, in order."""
        if pool:
            futures = [pool.submit(_remote, make_model, pack(plans[s][:length]), loss_fn, optimizer, t.name, s,
                                   watched) for t, s, watched in jobs]
            try:
                return [f.result() for f in futures]
            except BrokenProcessPool:  # a worker died: the next call starts a fresh pool
                drop(pool)
                raise
            finally:
                for f in futures:
                    f.cancel()
        return [run_trial(t.plan, make_model, plans[s][:length], loss_fn, s, watched) for t, s, watched in jobs]

    def trial(treatments: list[Treatment]) -> list[Treatment]:
        """Every seed of each treatment, watched on the first ``deciding`` seeds and then only where those
        leave the majority of findings open: the rest can change no finding, so they are trained unwatched
        (the same losses, without the watcher's 1.3-2x on a small net's step)."""
        deciding = (seeds + 1) // 2
        jobs = [(t, s, True) for t in treatments for s in range(deciding)]
        for (t, _, _), result in zip(jobs, run(jobs, steps), strict=True):
            t.record(*result)
        rest = [(t, s, t.unsettled(seeds)) for t in treatments for s in range(deciding, seeds)]
        for (t, _, _), result in zip(rest, run(rest, steps), strict=True):
            t.record(*result)
        return treatments

    def screen(treatments: list[Treatment]) -> None:
        jobs = [(t, 0, False) for t in treatments]
        for t, (losses, _) in zip(treatments, run(jobs, steps // SCREEN), strict=True):
            t.screened = final_loss(losses)

    def propose(name: str) -> Treatment | str:
        parts = name.split(COMBINED)
        plan = _plan(name, base, make_model) if set(parts) <= set(TREATMENTS) else "a change only you can make"
        if not isinstance(plan, str):
            plan = _fits(plan, make_model, plans[0][0][0])
        return plan if isinstance(plan, str) else Treatment(name, REMEDIES[parts[-1]], plan, **kwargs)

    try:
        rx = prescribe(trial, Treatment("untreated", "", base, **kwargs), propose, screen if finalists else None,
                       finalists, combine=True)
    finally:
        torch.set_num_threads(before)
    rx.seeds, rx.steps, rx.seconds, rx.batches = seeds, steps, time.perf_counter() - start, lambda seed: plans[seed]
    return rx
