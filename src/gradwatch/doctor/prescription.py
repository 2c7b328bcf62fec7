"""The doctor's method, whatever trains its trials (a PyTorch loop or a Keras ``fit``): each treatment's
measured losses and findings (``Treatment``), the ranking (``prescribe``) and its table (``Prescription``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gradwatch.diagnose import Diagnosis, diagnose
from gradwatch.diagnose.evidence import Evidence
from gradwatch.doctor.treatments import Plan
from gradwatch.records import Records

FINALISTS = 2  # treatments the screening keeps for the whole budget: they race on the first seed, the best on all
SCREEN = 4  # a screening trial runs 1/SCREEN of the steps, on the first seed
COMBINED = "+"  # "a+b": treatment b on top of treatment a (prescribe's second round)


def final_loss(losses: list[float]) -> float:
    """The mean loss of the last tenth of the steps: the trial's score (inf if it diverged)."""
    tail = losses[-max(1, len(losses) // 10) :]
    value = sum(tail) / len(tail) if len(losses) else math.inf
    return value if math.isfinite(value) else math.inf


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
        A race's runner-up is measured on the first seed only, and compared with the untreated run there.
        """
        kinds = {f.kind for f in self.findings}
        rows = []
        for place, t in enumerate([self.untreated, *self.treatments]):
            n = len(t.losses)
            spread = (f"({min(t.losses):.3g}-{max(t.losses):.3g})" if n > 1
                      else "(seed 0 only: beaten there)" if n < self.seeds else "")
            rows.append({
                "#": str(place or "-"), "treatment": t.name,
                "final loss (min-max)": f"{t.loss:.3g} {spread}" if n
                else f"{t.screened:.3g} (screened out: seed 0, {self.steps // SCREEN} steps)",
                # against the untreated run on the same seeds
                "vs untreated": _change(t.loss, statistics.median(self.untreated.losses[:n])) if place and n else "",
                "grad ratio": f"{t.ratio('grad_norm'):.2g}" if n else "",
                "signal ratio": f"{t.ratio('backprop_norm'):.2g}" if n else "",
                "clears": ", ".join(sorted(kinds - set(t.kinds))) if place and n else "",
                "still": (", ".join(t.kinds) or "-") if n else ""})
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


def prescribe(trial: Callable[[list[Treatment]], list[Treatment]], untreated: Treatment,
              propose: Callable[[str], Treatment | str], screen: Callable[[list[Treatment]], None] | None = None,
              finalists: int = FINALISTS, combine: bool = False) -> Prescription:
    """The doctor's method, whatever trains the trials: the untreated run's majority findings propose
    remedies; ``propose(name)`` makes each a Treatment or says why it cannot be tried; ``screen``
    (where given, and more than ``finalists`` are proposed) sets each one's ``screened`` loss and
    only the best ``finalists`` go on; ``trial`` trains those from the same seeds (the PyTorch doctor's
    races them: every seed for the winner only); what was measured ranks them (``rank``), the
    screened-out ones after them.

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
        tried = sorted(tried + more, key=rank)
        dropped = sorted(dropped + more_dropped, key=lambda t: t.screened)
    return Prescription(findings, untreated, tried + dropped, untried, seeds=0, steps=0, seconds=0.0)


def rank(t: Treatment) -> tuple[int, float, int]:
    """Measured on more seeds first (a race's winner before the runners-up it beat on the first seed), then
    lower loss; fewer findings left breaks a tie."""
    return -len(t.losses), t.loss, len(t.kinds)


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
    return sorted(trial(candidates), key=rank), dropped
