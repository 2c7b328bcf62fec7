"""Evidence: Records indexed once, and the scale-free measures every rule reads from them.

Every measure here is a ratio (between layers, between time steps, between parts of the run, or a
fraction of units), so none depends on the loss's scale, the batch reduction or a layer's size,
and none divides by zero: a layer whose gradient is exactly zero is counted, not divided by.
"""

from __future__ import annotations

import math
import statistics

from gradwatch.records import Records, finite_median

# statistics whose NaN/Inf means the training itself broke; a derived ratio (percent change of a
# zero weight) may be NaN in a healthy run and is not one of them
RAW = ("loss", "nonfinite", "grad_norm", "grad_max_abs", "weight_norm", "backprop_norm", "act_rms")


class Evidence:
    """``stat -> layer -> [(step, value)]`` in record order, built in one pass over the rows."""

    def __init__(self, records: Records):
        self.table: dict[str, dict[str, list[tuple[int, float]]]] = {}
        for step, _epoch, layer, stat, value in records.rows:
            self.table.setdefault(stat, {}).setdefault(layer, []).append((step, value))

    def layers(self, stat: str) -> list[str]:
        """Layers that have ``stat``, input to output (the order they were first recorded)."""
        return list(self.table.get(stat, {}))

    def values(self, stat: str, layer: str = "") -> list[float]:
        return [v for _, v in self.table.get(stat, {}).get(layer, [])]

    def medians(self, stat: str) -> dict[str, float]:
        """layer -> median of its finite values of ``stat`` (layers with none are left out)."""
        out = {layer: finite_median(self.values(stat, layer)) for layer in self.layers(stat)}
        return {layer: v for layer, v in out.items() if math.isfinite(v)}

    def ratios(self, stat: str, at_start: bool = False) -> dict[str, float]:
        """layer -> median over steps of its ``stat`` divided by the last layer's at the same step.

        Only steps where the last layer's value is finite and above zero count; a last layer that
        never gets a gradient leaves this empty (``silent`` names it instead). ``at_start``: the
        first such step alone, the net as initialised (the seed's and AUTOTRAINER's moment).
        """
        names = self.layers(stat)
        if len(names) < 2:
            return {}
        last = {s: v for s, v in self.table[stat][names[-1]] if math.isfinite(v) and v > 0}
        if at_start and last:
            last = {min(last): last[min(last)]}
        out = {}
        for name in names[:-1]:
            per_step = [v / last[s] for s, v in self.table[stat][name] if s in last and math.isfinite(v)]
            if per_step:
                out[name] = statistics.median(per_step)
        return out

    def silent(self, stat: str = "grad_norm") -> list[str]:
        """Layers whose every recorded value of ``stat`` is exactly zero: they get no gradient at all."""
        return [n for n in self.layers(stat) if len(vs := self.values(stat, n)) >= 2 and all(v == 0 for v in vs)]

    def missing(self) -> list[str]:
        """Layers with weights (a weight norm) that never had a gradient recorded: left out of the graph."""
        have = set(self.layers("grad_norm")) | set(self.layers("weight_grad_norm"))
        return [n for n in self.layers("weight_norm") if n not in have] if have else []

    def loss(self) -> list[float]:
        """The logged loss, one value per log (an epoch for gradwatch's own runs)."""
        return self.values("loss")

    def total_grad_norm(self) -> list[float]:
        """The whole model's gradient norm at each step, from the per-layer norms (root of the sum of squares)."""
        steps: dict[int, float] = {}
        for layer in self.layers("grad_norm"):
            for s, v in self.table["grad_norm"][layer]:
                steps[s] = steps.get(s, 0.0) + v * v
        return [math.sqrt(v) for _, v in sorted(steps.items())]

    def first_bad_step(self) -> tuple[list[str], float] | None:
        """(layers, first step) where a raw statistic went NaN/Inf or a NaN/Inf count was positive."""
        bad: dict[str, int] = {}
        for stat in RAW:
            for layer, rows in self.table.get(stat, {}).items():
                for step, v in rows:
                    if not math.isfinite(v) or (stat == "nonfinite" and v > 0):
                        bad[layer or "loss"] = min(step, bad.get(layer or "loss", step))
                        break
        return (list(bad), float(min(bad.values()))) if bad else None
