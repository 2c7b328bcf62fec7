"""``doctor(make_model, data, loss_fn)``: the diagnosis's remedies, tried on the user's own model and ranked.

The untreated model trains for a short budget from a few seeds, watched as any user's loop would be
(``gradwatch.watch``); its findings (those most seeds agree on) propose treatments, each a change in
``TREATMENTS``; every treatment trains from the same seeds on the same batches, and the treatments
are ranked by the final loss they reach. Where more than ``FINALISTS`` are proposed, all of them
are first screened on one seed for a quarter of the steps; the best race on that seed for the whole
budget, and the winner alone goes on to every seed: successive halving (Jamieson & Talwalkar 2016;
Hyperband, Li et al. 2017), its rungs the steps, then the seeds (``trials.Trials``).
A trial is watched on half its seeds first, and on the rest only while they could still change which
findings most seeds show; otherwise they train unwatched, for their loss alone.
Repair tools before it (AUTOTRAINER, ICSE 2021; DeepDiagnosis, ICSE 2022) apply fixes in a fixed
order; Kim et al. (ICST 2023) found a random choice of repair does as well as them. Here every claim
is a measurement on the user's model, and ``t.build()`` hands over the treated model, its optimizer
and its clip norm to reproduce it in the user's own loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from gradwatch.diagnose import REMEDIES
from gradwatch.doctor.prescription import COMBINED, FINALISTS, SCREEN, Prescription, Treatment, final_loss, prescribe
from gradwatch.doctor.treatments import TREATMENTS, Plan, adam
from gradwatch.doctor.trials import LOGS, Trials, plan_for, run_trial, schedule
from gradwatch.doctor.workers import pool_for
from gradwatch.spec import SpecError

__all__ = ["FINALISTS", "SCREEN", "TREATMENTS", "Prescription", "Treatment", "doctor", "final_loss", "prescribe",
           "run_trial", "schedule"]


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
    where those four pickle; kept warm for the next call. The default is 1: one call on a small net is over
    about when the workers would have started (4-6 s on a quiet 2-core host, 22-32 s at load 6-8), and on a
    busy host two warm workers took 1.1-1.35x (median 1.2x) the wall time of one process. Many calls on a
    quiet host gain: the clinic's held-out half took a median 6.9x one plain run per model with two warm
    workers, 10.6x in one process (``benchmarks/clinic.py --workers``). ``threads``: torch's
    intra-op threads during the trials, restored after (None: leave them): small nets on a busy CPU
    lose more to idle threads than they gain, measured: the seed's net took 653 s wall at torch's
    default of 2 threads on a loaded 2-core host, 28 s at 1. ``finalists``: how many treatments the
    screening keeps to race for the whole budget (0: no screening, every treatment on every seed).

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

    trials = Trials(make_model, plans, loss_fn, optimizer, steps, finalists, pool)

    def propose(name: str) -> Treatment | str:
        parts = name.split(COMBINED)
        plan = plan_for(name, base, make_model) if set(parts) <= set(TREATMENTS) else "a change only you can make"
        if not isinstance(plan, str):
            plan = _fits(plan, make_model, plans[0][0][0])
        return plan if isinstance(plan, str) else Treatment(name, REMEDIES[parts[-1]], plan, **kwargs)

    try:
        rx = prescribe(trials.trial, Treatment("untreated", "", base, **kwargs), propose,
                       trials.screen if finalists else None, finalists, combine=True)
        trials.collect()
    finally:
        trials.cancel()
        torch.set_num_threads(before)
    rx.seeds, rx.steps, rx.seconds, rx.batches = seeds, steps, time.perf_counter() - start, lambda seed: plans[seed]
    return rx
