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
import statistics
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gradwatch.diagnose import REMEDIES, Diagnosis, diagnose
from gradwatch.diagnose.evidence import Evidence
from gradwatch.doctor.treatments import TREATMENTS, Plan, adam
from gradwatch.doctor.workers import drop, pack, pool_for, unpack
from gradwatch.records import Records
from gradwatch.spec import SpecError
from gradwatch.watch import watch

__all__ = ["TREATMENTS", "Prescription", "Treatment", "doctor", "final_loss", "prescribe", "schedule"]

LOGS = 20  # loss logs per trial: enough for the loss rules' 10-log window
EVERY = 10  # the watcher's sampled-step cadence in a trial
FINALISTS = 2  # treatments measured on every seed and the whole budget; the rest are screened out
SCREEN = 4  # a screening trial runs 1/SCREEN of the steps, on the first seed
COMBINED = "+"  # "a+b": treatment b on top of treatment a (prescribe's second round)


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


def final_loss(losses: list[float]) -> float:
    """The mean loss of the last tenth of the steps: the trial's score (inf if it diverged)."""
    tail = losses[-max(1, len(losses) // 10) :]
    value = sum(tail) / len(tail) if len(losses) else math.inf
    return value if math.isfinite(value) else math.inf


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


@dataclass
class Treatment:
    """One treatment tried: its measured losses over seeds, the findings left, and ``build()``."""

    name: str
    reason: str
    plan: Plan
    losses: list[float] = field(default_factory=list)  # final loss per seed
    found: list[Diagnosis] = field(default_factory=list)  # per watched seed
    screened: float = math.nan  # the screening trial's final loss (first seed, 1/SCREEN of the steps)
    _make: Callable[[], nn.Module] | None = None
    _first_batch: Callable[[int], Tensor] | None = None

    @property
    def loss(self) -> float:
        """The median final loss over seeds; a treatment screened out has only its screening loss."""
        return statistics.median(self.losses) if self.losses else self.screened

    def _counts(self) -> dict[str, int]:
        """kind -> how many watched seeds show it."""
        counts: dict[str, int] = {}
        for d in self.found:
            for kind in dict.fromkeys(f.kind for f in d):
                counts[kind] = counts.get(kind, 0) + 1
        return counts

    @property
    def kinds(self) -> list[str]:
        """Finding kinds that most seeds show (a seed left unwatched could change none: ``unsettled``)."""
        return [k for k, n in self._counts().items() if 2 * n > len(self.found)]

    def unsettled(self, seeds: int) -> bool:
        """Whether the seeds not yet watched, out of ``seeds``, could change which kinds most seeds show.

        A kind is settled once its watched count is a majority of ``seeds``, or too small to become
        one were every remaining seed to show it; a kind no watched seed shows is settled once half the seeds
        are watched. Only while one is not do the remaining seeds' records matter.
        """
        left = seeds - len(self.found)
        return any(not 2 * n > seeds and 2 * (n + left) > seeds for n in [0, *self._counts().values()])

    def ratio(self, stat: str) -> float:
        """First/last layer ratio of ``stat`` (grad_norm or backprop_norm), median over the watched seeds."""
        values = [next(iter(r.values())) for r in (self._ratios.get(stat, []))]
        return statistics.median(values) if values else math.nan

    def build(self, seed: int = 0):
        """``(model, optimizer, clip_norm)``, as the trial from ``seed`` started: train them on its batches."""
        torch.manual_seed(seed)
        return self.plan.build(self._make, self._first_batch(seed))

    def record(self, losses: list[float], records: Records | None) -> None:
        """One seed's trial: its final loss, and where it was watched (``records``), its findings and ratios."""
        self.losses.append(final_loss(losses))
        if records is None:
            return
        self.found.append(diagnose(records))
        evidence = Evidence(records)
        for stat in ("grad_norm", "backprop_norm"):
            if ratios := evidence.ratios(stat):
                self._ratios.setdefault(stat, []).append(ratios)

    def __post_init__(self):
        self._ratios: dict[str, list[dict[str, float]]] = {}


@dataclass
class Prescription:
    """The untreated model's findings, the treatments tried (best first) and those that could not be."""

    findings: list
    untreated: Treatment
    treatments: list[Treatment]
    untried: dict[str, str]
    seeds: int
    steps: int
    seconds: float
    batches: Callable[[int], list] = field(repr=False, default=lambda seed: [])

    def rows(self) -> list[dict]:
        """One row per trial, untreated first then best first: the table ``print`` shows and the report draws.

        A treatment screened out shows its screening loss only: beside the whole budget's it compares nothing.
        """
        kinds = {f.kind for f in self.findings}
        rows = []
        for rank, t in enumerate([self.untreated, *self.treatments]):
            measured = bool(t.losses)
            rows.append({
                "#": str(rank or "-"), "treatment": t.name,
                "final loss (min-max)": f"{t.loss:.3g} ({min(t.losses):.3g}-{max(t.losses):.3g})" if measured
                else f"{t.screened:.3g} (screened out: seed 0, {self.steps // SCREEN} steps)",
                "vs untreated": _change(t.loss, self.untreated.loss) if rank and measured else "",
                "grad ratio": f"{t.ratio('grad_norm'):.2g}" if measured else "",
                "signal ratio": f"{t.ratio('backprop_norm'):.2g}" if measured else "",
                "clears": ", ".join(sorted(kinds - set(t.kinds))) if rank and measured else "",
                "still": (", ".join(t.kinds) or "-") if measured else ""})
        return rows

    def __str__(self) -> str:
        head = f"gradwatch doctor: {self.seeds} seed(s) x {self.steps} steps, {self.seconds:.1f} s"
        if not self.findings:
            return (f"{head}\nnothing to treat: no finding in most seeds (final loss {self.untreated.loss:.3g}, "
                    f"verdict {self.untreated.found[0].verdict})")
        lines = [head, "findings (untreated):"] + ["  " + str(f).splitlines()[0] for f in self.findings]
        rows = [list(self.rows()[0])] + [list(row.values()) for row in self.rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines += [f"not tried: {name}: {why}" for name, why in self.untried.items()]
        return "\n".join(lines)


def _change(loss: float, base: float) -> str:
    if not math.isfinite(loss):
        return "diverged"
    return f"{100 * (loss - base) / base:+.0f}%" if base and math.isfinite(base) else "-"


def _majority(untreated: Treatment) -> list:
    """One finding per kind that most seeds show, in the order of severity of the first seed that has it."""
    kinds = untreated.kinds
    chosen = {}
    for d in untreated.found:
        for f in d:
            if f.kind in kinds and f.kind not in chosen:
                chosen[f.kind] = f
    order = {"high": 0, "medium": 1, "low": 2}
    return sorted(chosen.values(), key=lambda f: order[f.severity])


def _plan(name: str, base: Plan, make_model) -> Plan | str:
    """The Plan of treatment ``name`` (``untreated``: the user's own; ``a+b``: ``b`` on top of ``a``), decided
    on a fresh model; why not, where a part does not apply."""
    plan: Plan | str = base
    if name == "untreated":
        return plan
    torch.manual_seed(0)
    model = make_model()
    for part in name.split(COMBINED):
        plan = TREATMENTS[part](plan, model) if not isinstance(plan, str) else plan
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


def prescribe(trial: Callable[[list[Treatment]], list[Treatment]], untreated: Treatment,
              propose: Callable[[str], Treatment | str], screen: Callable[[list[Treatment]], None] | None = None,
              finalists: int = FINALISTS, combine: bool = False) -> Prescription:
    """The doctor's method, whatever trains the trials: the untreated run's majority findings propose
    remedies; ``propose(name)`` makes each a Treatment or says why it cannot be tried; ``screen``
    (where given, and more than ``finalists`` are proposed) sets each one's ``screened`` loss and
    only the best ``finalists`` go on; ``trial`` trains those from the same seeds; the measured final
    loss ranks them (fewer findings left breaks a tie), the screened-out ones after them.

    ``combine`` (``propose`` takes ``a+b``: ``b`` on top of ``a``): where most seeds of the best treatment
    still show a finding, that finding's remedies are tried on top of it in a second round, as a
    clinician re-examines after a first treatment (AUTOTRAINER, too, repairs until no problem is
    left): a deep tanh net whose orthogonal, data-scaled init (LSUV) lets it learn but now oscillates at
    SGD's lr 0.1 (``lr_too_large`` on two seeds of three, loss 0.27) reaches 0.045, with no finding
    left, with lr 0.01 on top. A combination that does not apply is not proposed.

    The Prescription's budget fields (seeds, steps, seconds) are the caller's to fill in.
    """
    (untreated,) = trial([untreated])
    findings = _majority(untreated)
    untried: dict[str, str] = {}
    tried, dropped = _round(trial, propose, screen, finalists, [r.name for f in findings for r in f.remedies],
                            untried)
    if combine and tried and tried[0].kinds:
        best = tried[0]
        names = [f"{best.name}{COMBINED}{r.name}" for f in _majority(best) for r in f.remedies
                 if r.name not in best.name.split(COMBINED)]
        more, more_dropped = _round(trial, propose, screen, finalists, names, {})
        tried = sorted(tried + more, key=_rank)
        dropped = sorted(dropped + more_dropped, key=lambda t: t.screened)
    return Prescription(findings, untreated, tried + dropped, untried, seeds=0, steps=0, seconds=0.0)


def _rank(t: Treatment) -> tuple[float, int]:
    """Lower measured loss first; fewer findings left breaks a tie."""
    return t.loss, len(t.kinds)


def _round(trial, propose, screen, finalists: int, names: list[str],
           untried: dict[str, str]) -> tuple[list[Treatment], list[Treatment]]:
    """(measured, best first; screened out, best first) of the treatments ``names`` propose; those that
    cannot be tried go into ``untried`` with why."""
    candidates = []
    for name in dict.fromkeys(names):
        made = propose(name)
        if isinstance(made, str):
            untried[name] = made
        else:
            candidates.append(made)
    dropped = []
    if screen and len(candidates) > finalists:
        screen(candidates)
        candidates.sort(key=lambda t: t.screened)
        candidates, dropped = candidates[:finalists], candidates[finalists:]
    return sorted(trial(candidates), key=_rank), dropped
