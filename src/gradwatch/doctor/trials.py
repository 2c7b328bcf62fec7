"""The doctor's trials: short training runs of a treatment from a seed, on the same batches for every
treatment, here or in worker processes, and the order in which they run (``Trials``).

The order is successive halving (Jamieson & Talwalkar 2016; Hyperband, Li et al. 2017) with its rungs the
steps, then the seeds: every proposed treatment is screened on the first seed for a quarter of the steps,
the best ``FINALISTS`` race on that seed for the whole budget, and the winner alone goes on to every seed.
A trial is watched only where its findings can still change the majority's; the rest train unwatched.
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool

import torch
from torch import Tensor

from gradwatch.doctor.prescription import COMBINED, SCREEN, Treatment, final_loss, rank
from gradwatch.doctor.treatments import TREATMENTS, Plan, adam
from gradwatch.doctor.workers import drop, lanes, pack, unpack
from gradwatch.records import Records
from gradwatch.spec import SpecError
from gradwatch.watch import watch

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


def plan_for(name: str, base: Plan, make_model) -> Plan | str:
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
    return run_trial(plan_for(name, Plan(optimizer=optimizer or adam), make_model), make_model, unpack(packed), loss_fn,
                     seed, watched)


class Trials:
    """The trials of one doctor call: each treatment's seeds on ``plans[seed]``, in ``pool`` where given.

    In a pool, an unwatched trial whose loss nothing reads yet is left waiting, to run beside the next batch
    of trials (the untreated run's last seed beside the screening), and collected when that batch ends.
    """

    def __init__(self, make_model, plans: dict[int, list], loss_fn, optimizer, steps: int, finalists: int, pool):
        self.make_model, self.plans, self.loss_fn, self.optimizer = make_model, plans, loss_fn, optimizer
        self.seeds, self.steps, self.finalists, self.pool = len(plans), steps, finalists, pool
        self.waiting: list[tuple[Treatment, Future]] = []

    def trial(self, treatments: list[Treatment]) -> list[Treatment]:
        """Every seed of a lone treatment; several race: each on the first seed, the best of them on the rest,
        unless ``finalists`` is 0 (every seed of each). Every loss is in when several return: they are ranked."""
        if len(treatments) > 1 and self.finalists:
            self.measure(treatments, range(1))
            self.measure([min(treatments, key=rank)], range(1, self.seeds))
        else:
            self.measure(treatments, range(self.seeds))
        if len(treatments) > 1:
            self.collect()
        return treatments

    def screen(self, treatments: list[Treatment]) -> None:
        """Each treatment's ``screened`` loss: the first seed, 1/SCREEN of the steps, unwatched."""
        jobs = [(t, 0, False) for t in treatments]
        for t, (losses, _) in zip(treatments, self.run(jobs, self.steps // SCREEN), strict=True):
            t.screened = final_loss(losses)

    def measure(self, treatments: list[Treatment], todo: range) -> None:
        """Each treatment on the seeds ``todo``: watched up to the first ``deciding`` seeds, the rest only where
        those leave the majority of findings open: the rest can change no finding, so they train unwatched
        (the same losses, without the watcher's 1.3-2x on a small net's step). In a pool, as many seeds as
        there are workers are watched at once (a worker waiting for the decision would idle), and the
        unwatched ones are left waiting."""
        deciding = (self.seeds + 1) // 2
        if self.pool:
            deciding = max(deciding, todo.start + lanes(self.pool))
        jobs = [(t, s, True) for t in treatments for s in todo if s < deciding]
        for (t, _, _), result in zip(jobs, self.run(jobs, self.steps), strict=True):
            t.record(*result)
        rest = [(t, s, t.unsettled(self.seeds)) for t in treatments for s in todo if s >= deciding]
        if self.pool:
            later = [job for job in rest if not job[2]]
            self.waiting += zip([t for t, _, _ in later], self._submit(later, self.steps), strict=True)
            rest = [job for job in rest if job[2]]
        for (t, _, _), result in zip(rest, self.run(rest, self.steps), strict=True):
            t.record(*result)

    def run(self, jobs: list[tuple[Treatment, int, bool]], length: int) -> list:
        """Each ``(treatment, seed, watched)`` trial for ``length`` steps, in order; in the pool where there is
        one, where the trials left waiting are collected once this batch ends: they ran beside it."""
        if not self.pool or not jobs:
            return [run_trial(t.plan, self.make_model, self.plans[s][:length], self.loss_fn, s, watched)
                    for t, s, watched in jobs]
        out = self._results(self._submit(jobs, length))
        self.collect()
        return out

    def collect(self) -> None:
        """Record the waiting trials' losses (their seeds come after the treatment's watched ones)."""
        done = self._results([f for _, f in self.waiting])
        for (t, _), result in zip(self.waiting, done, strict=True):
            t.record(*result)
        self.waiting = []

    def cancel(self) -> None:
        """Drop the waiting trials where the doctor stops early (an error): nothing will read them."""
        for _, f in self.waiting:
            f.cancel()
        self.waiting = []

    def _submit(self, jobs: list[tuple[Treatment, int, bool]], length: int) -> list[Future]:
        return [self.pool.submit(_remote, self.make_model, pack(self.plans[s][:length]), self.loss_fn, self.optimizer,
                                 t.name, s, watched) for t, s, watched in jobs]

    def _results(self, futures: list[Future]) -> list:
        try:
            return [f.result() for f in futures]
        except BrokenProcessPool:  # a worker died: the next call starts a fresh pool
            drop(self.pool)
            raise
        finally:
            for f in futures:
                f.cancel()
