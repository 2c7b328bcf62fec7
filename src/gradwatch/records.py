"""Records, the long table every later stage reads, and Run, what a training run leaves behind.

Records are the only contract downstream of training: the store, the diagnosis, the report and the
web page read rows ``(step, epoch, layer, stat, value)`` and never touch a model, which is what lets
the PyTorch watcher, the Keras callback and the ensemble trainer stand in for one another.
``layer`` is the framework's own module name (``dense1`` .. ``out``; ``""`` for whole-model scalars
such as ``loss``); ``stat`` is a key of ``stats.STATS`` or an epoch-level scalar.
"""

from __future__ import annotations

import math
import statistics
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import compress, islice, repeat

COLUMNS = ("step", "epoch", "layer", "stat", "value")


class Records:
    """Append-only rows, optionally bounded to the last ``maxlen`` (a long watch stays small)."""

    def __init__(self, rows: Iterable[tuple] = (), maxlen: int | None = None):
        self._rows: deque[tuple[int, int, str, str, float]] = deque(rows, maxlen=maxlen)
        self._columns: tuple[tuple[Sequence, ...], int, Sequence[bool] | None] | None = None

    @classmethod
    def zipped(cls, columns: tuple[Sequence, ...], stop: int, keep: Sequence[bool] | None = None) -> Records:
        """Records whose rows are ``zip(*columns)`` up to ``stop`` (those with a true ``keep``), made as
        tuples only when ``rows`` is first read; iterating or pickling them reads the columns.

        Why: a stacked ensemble of 512 seed runs holds 4.7M rows, whose step, epoch, layer and stat
        columns all its members share; making them as tuples up front (and the garbage collector's
        pass over them) took 0.65 s of its 6, and a sweep only iterates them into the store.
        Arrow's tables keep columns for the same reason; the rows they stand for are the contract.
        """
        records = cls()
        records._columns = (columns, stop, keep)
        return records

    @property
    def rows(self) -> deque[tuple[int, int, str, str, float]]:
        """The rows as a deque of tuples, made once from the columns of ``zipped`` Records."""
        if self._columns is not None:
            self._rows.extend(self._zip())
            self._columns = None
        return self._rows

    def _zip(self) -> Iterator[tuple]:
        columns, stop, keep = self._columns
        rows = islice(zip(*columns, strict=True), stop)
        return rows if keep is None else compress(rows, keep)

    def __iter__(self) -> Iterator[tuple[int, int, str, str, float]]:
        """The rows in order, without making them all at once from a ``zipped`` Records' columns."""
        return iter(self._rows) if self._columns is None else self._zip()

    def __len__(self) -> int:
        if self._columns is None:
            return len(self._rows)
        _, stop, keep = self._columns
        return stop if keep is None else sum(islice(keep, stop))

    def add(self, step: int, epoch: int, stat: str, values: dict[str, float]) -> None:
        """One row per layer of ``values`` (layer -> value) for ``stat`` at ``step``/``epoch``."""
        self.add_layers(step, epoch, stat, values.keys(), map(float, values.values()))

    def add_layers(self, step: int, epoch: int, stat: str, layers: Iterable[str], values: Iterable[float]) -> None:
        """``add`` from parallel sequences of equal length, as a monitor's flush has them: no dict per row."""
        # repeat() is endless, so zip ends with layers and values
        self.rows.extend(zip(repeat(step), repeat(epoch), layers, repeat(stat), values, strict=False))

    def stats(self) -> list[str]:
        return list(dict.fromkeys(r[3] for r in self.rows))

    def layers(self, stat: str) -> list[str]:
        """Layer names that have ``stat``, in the order they were first recorded (input to output)."""
        return list(dict.fromkeys(r[2] for r in self.rows if r[3] == stat))

    def series(self, stat: str, layer: str = "", by: str = "step") -> tuple[list[int], list[float]]:
        """(x, values) of one stat of one layer over time; ``by`` is ``step`` or ``epoch``."""
        col = COLUMNS.index(by)
        rows = [r for r in self.rows if r[3] == stat and r[2] == layer]
        return [r[col] for r in rows], [r[4] for r in rows]

    def at(self, stat: str, step: int | None = None) -> dict[str, float]:
        """layer -> value of ``stat`` at ``step`` (default: the first step that has it)."""
        rows = [r for r in self.rows if r[3] == stat]
        if not rows:
            return {}
        step = rows[0][0] if step is None else step
        return {r[2]: r[4] for r in rows if r[0] == step}

    def last(self, stat: str) -> dict[str, float]:
        """layer -> value of ``stat`` at the last step that has it."""
        rows = [r for r in self.rows if r[3] == stat]
        return self.at(stat, rows[-1][0]) if rows else {}

    def thin(self, every: int, stats: tuple[str, ...] = ("grad_norm", "grad_rms")) -> Records:
        """A copy keeping ``stats`` (the per-step ones) only on steps that are multiples of ``every``.

        Sweeps and studies store hundreds of runs; the per-step gradient norms are most of their rows.
        """
        return Records(r for r in self.rows if r[3] not in stats or r[0] % every == 0)

    def to_pandas(self, run: str = ""):
        """The long table as a DataFrame with a ``run`` column, ready for ``pivot_table``."""
        import pandas as pd

        frame = pd.DataFrame(list(self.rows), columns=list(COLUMNS))
        frame.insert(0, "run", run)
        return frame


def first_over_last(values: dict[str, float]) -> float:
    """First layer's value over the last layer's, of a layer -> value dict as ``Records.at`` gives one.

    The first/last gradient-norm ratio (AUTOTRAINER's vanishing/exploding measure); NaN with fewer
    than two layers or a last layer at 0 (or NaN).
    """
    names = list(values)
    if len(names) < 2 or not values[names[-1]] > 0:
        return math.nan
    return values[names[0]] / values[names[-1]]


def finite_median(values: Iterable) -> float:
    """Median of the finite values (None, NaN and Inf left out); NaN when there are none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


@dataclass
class Run:
    """A finished (or diverged) run: its spec, its records and a few summary numbers.

    ``spec`` is ``Spec.model_dump()`` for gradwatch's own runs and ``{}`` for a watched user model;
    ``key`` is ``Spec.key()`` (empty for user models) and lets a sweep skip what is already stored.
    ``status`` is ``finished`` or ``diverged`` (NaN/Inf met: a finding, not a crash).
    """

    records: Records
    spec: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    status: str = "finished"
    name: str = ""
    group: str = ""
    key: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    created: float = field(default_factory=time.time)
