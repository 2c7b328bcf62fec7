"""STATS: every statistic gradwatch records, each a pure function from tensors to a tensor.

The PyTorch watcher, the Keras callback and the ensemble trainer all call these, so a number means
the same thing wherever it was measured. No function here reads a value back to the host (no
``.item()``, no ``if`` on a tensor): the caller decides when to pay for one sync, as torch's
``clip_grad_norm_`` does with ``_foreach_norm``. With ``members=True`` every tensor carries a leading
member axis E (an ensemble of stacked models) and each result gains a trailing E axis.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Layout:
    """Which layer each tensor belongs to, built once per model so no step builds index tensors."""

    segments: Tensor  # (P,) layer index of each tensor
    numel: Tensor  # (L,) elements per layer (per member)
    n: int
    one_each: bool = False  # one tensor per layer: per-tensor values are per-layer values already

    @classmethod
    def of(cls, groups: list[list[Tensor]], members: bool = False) -> Layout:
        device = groups[0][0].device
        seg = [i for i, group in enumerate(groups) for _ in group]
        numel = [sum(t[0].numel() if members else t.numel() for t in g) for g in groups]
        numel_t = torch.tensor(numel, dtype=torch.float32, device=device)
        return cls(torch.tensor(seg, device=device), numel_t, len(groups), len(seg) == len(groups))


def _norms(tensors: list[Tensor], ord: float, members: bool) -> Tensor:
    """Per-tensor vector norms: (P,), or (P, E) with a member axis."""
    if members:
        return torch.stack([torch.linalg.vector_norm(t.flatten(1).float(), ord, dim=1) for t in tensors])
    return torch.stack(torch._foreach_norm(tensors, ord))


def _segment(values: Tensor, layout: Layout, reduce: str = "sum") -> Tensor:
    """Combine per-tensor values into per-layer values: (P, ...) -> (L, ...)."""
    if layout.one_each:  # a module hook's single output: four kernel launches saved per call
        return values
    out = values.new_zeros((layout.n, *values.shape[1:]))
    index = layout.segments.view(-1, *([1] * (values.dim() - 1))).expand_as(values)
    return out.scatter_reduce_(0, index, values, reduce, include_self=False)


def tensor_norms(tensors: list[Tensor]) -> Tensor:
    """Each tensor's L2 norm, (P,), from one ``_foreach_norm``: the first half of ``norm``.

    The watcher takes these every step and combines many steps at once with ``layer_norms``: two
    kernel calls per step instead of eight, when each call costs more than the arithmetic. Stacked
    at once, as ``clip_grad_norm_`` does: stacking one step's 41 scalars costs ~25 us on CPU, ten
    steps' 410 at the flush ~330 us.
    """
    return _norms(tensors, 2.0, members=False)


def layer_norms(norms: Tensor, layout: Layout) -> Tensor:
    """Per-layer L2 norms (L, ...) from per-tensor ones (P, ...): the root of the sum of squares."""
    return norms if layout.one_each else _segment(norms.square(), layout).sqrt()


def norm(tensors: list[Tensor], layout: Layout, members: bool = False) -> Tensor:
    """L2 norm per layer, over all of the layer's tensors (weights and biases together)."""
    return layer_norms(_norms(tensors, 2.0, members), layout)


def rms(tensors: list[Tensor], layout: Layout, members: bool = False) -> Tensor:
    """Root mean square per layer: the scale of one entry, comparable across layer sizes."""
    return norm(tensors, layout, members) / _per_member(layout.numel, members).sqrt()


def _rows(t: Tensor, members: bool) -> Tensor:
    """``t`` as (E, n) with a member axis, else as it is (a full reduction follows)."""
    return t.reshape(len(t), -1) if members else t


def _sums(tensors: Iterable[Tensor], members: bool) -> Tensor:
    """Per-tensor sums in float32, (P,) or (P, E), of temporaries made one at a time.

    Fed a generator, each temporary is freed before the next is made, so the allocator reuses one
    block; a ``_foreach`` op makes them all at once, and on CPU mapping fresh pages for 5 MB of
    gradient-sized temporaries costs ~2 ms, more than the arithmetic.
    """
    return torch.stack([_rows(t, members).sum(dim=-1 if members else None, dtype=torch.float32) for t in tensors])


def abs_stats(tensors: list[Tensor], layout: Layout, members: bool = False) -> tuple[Tensor, Tensor]:
    """(largest |x|, mean |x|) per layer, from one |x| temporary per tensor that both reductions read.

    One pass over memory for the two: the temporary is still in cache when ``amax`` and ``sum`` read
    it, where ``aminmax`` plus ``abs().sum()`` read each gradient twice (~1.7 ms against ~1.2 ms for a
    20 x 256 MLP on one CPU core). ``amax`` propagates NaN, so a layer with a NaN has a NaN maximum.
    """
    maxes, sums = [], []
    for t in tensors:
        a = _rows(t.abs(), members)
        maxes.append(a.amax(dim=-1) if members else a.amax())
        sums.append(a.sum(dim=-1 if members else None, dtype=torch.float32))
    highest = _segment(torch.stack(maxes), layout, "amax")
    return highest, _segment(torch.stack(sums), layout) / _per_member(layout.numel, members)


def mean_abs(tensors: list[Tensor], layout: Layout, members: bool = False) -> Tensor:
    """Mean |x| per layer (SageMaker Debugger's vanishing-gradient measure)."""
    return abs_stats(tensors, layout, members)[1]


def max_abs(tensors: list[Tensor], layout: Layout, members: bool = False) -> Tensor:
    """Largest |x| per layer; NaN if the layer has a NaN."""
    return abs_stats(tensors, layout, members)[0]


def nonfinite(tensors: list[Tensor], layout: Layout, members: bool = False) -> Tensor:
    """Count of NaN/Inf entries per layer.

    x * 0 is 0 for a finite x and NaN otherwise: a multiply, a NaN -> 1 and a sum count them ~10x
    faster on CPU than ``~isfinite(x)`` does.
    """
    return _segment(_sums(((t * 0).nan_to_num_(1.0) for t in tensors), members), layout)


def update_ratio(before: list[Tensor], after: list[Tensor], layout: Layout, members: bool = False) -> Tensor:
    """||W_new - W_old|| / ||W_old|| per layer; ~1e-3 is Karpathy's rule of thumb for healthy training."""
    return update_ratio_([b.clone() for b in before], after, layout, members)


@torch.no_grad()
def update_ratio_(before: list[Tensor], after: list[Tensor], layout: Layout, members: bool = False,
                  old: Tensor | None = None) -> Tensor:
    """``update_ratio``, overwriting ``before`` with the update: no new tensor per parameter.

    ``old``: ``norm(before, layout, members)`` if the caller has it already (the watcher records it
    as the weight norm), so the weights are read once for both.
    """
    old = norm(before, layout, members) if old is None else old
    torch._foreach_sub_(before, after)
    return norm(before, layout, members) / old.clamp_min(1e-30)


def saturated_frac(activations: list[Tensor], bounds: list[tuple[float, float]], members: bool = False) -> Tensor:
    """Fraction of outputs within 1% of a saturating activation's bounds (sigmoid: 0/1, tanh: -1/1)."""
    fracs = []
    for a, (low, high) in zip(activations, bounds, strict=True):
        margin = 0.01 * (high - low)
        hit = ((a <= low + margin) | (a >= high - margin)).float()
        fracs.append(hit.flatten(1).mean(1) if members else hit.mean())
    return torch.stack(fracs)


def dead_frac(activations: list[Tensor], members: bool = False) -> Tensor:
    """Fraction of units that output exactly 0 for every example of the batch (dead ReLUs).

    Lu et al. (2019), "Dying ReLU and initialization"; a unit is dead on the batch when its output,
    and so its gradient, is zero for all inputs. Features are the last axis; the rest (batch, time,
    positions) are reduced. Two steps, so a caller can take the first where the activation is (a
    forward hook) and the second for many layers at once: ``unit_range``, then ``dead_of_ranges``.
    """
    lows, highs = zip(*(unit_range(a, members) for a in activations), strict=True)
    return dead_of_ranges(list(lows), list(highs))


def unit_range(a: Tensor, members: bool = False) -> tuple[Tensor, Tensor]:
    """Each unit's smallest and largest output over the batch: (units,) each, or (E, units).

    Min and max both 0 is all-zero without a temporary the size of ``a``: ``amin`` and ``amax`` take
    17 us on a 128 x 256 batch on CPU, where ``(a == 0).all(0)`` and ``aminmax(a, dim=0)`` take ~110.
    """
    first = 1 if members else 0
    a = a.unsqueeze(first) if a.dim() == first + 1 else a  # one example: still a batch axis to reduce
    dims = tuple(range(first, a.dim() - 1))
    return a.amin(dims), a.amax(dims)


def dead_of_ranges(lows: list[Tensor], highs: list[Tensor]) -> Tensor:
    """Per layer, the fraction of units whose range is [0, 0]; one stack when the layers agree in width."""
    if len({t.shape for t in lows}) == 1:
        return ((torch.stack(lows) == 0) & (torch.stack(highs) == 0)).float().mean(-1)
    return torch.stack([((lo == 0) & (hi == 0)).float().mean(-1) for lo, hi in zip(lows, highs, strict=True)])


def seed_gradient(old: Tensor, new: Tensor, learning_rate: float) -> Tensor:
    """The seed notebook's ``gradient = (old - new) / learning_rate``, entry by entry.

    Under plain SGD over one step this is the gradient; over many steps, or under Adam (which
    divides each step by a running RMS of the gradient), it is not: Adam moves every weight by
    about lr per step however small its gradient is.
    """
    return (old - new) / learning_rate


def percent_change(old: Tensor, new: Tensor) -> Tensor:
    """The seed notebook's ``|100 (old - new) / old|``, entry by entry."""
    return (100 * (old - new) / old).abs()


def seed_measures(old: list[Tensor], new: list[Tensor], learning_rate: float) -> tuple[Tensor, Tensor]:
    """Per layer, the notebook's two summaries: mean |(old - new) / lr| and median % change, (L,) each.

    The median is torch's (the lower middle value for an even count), NaN entries (old == 0) ignored.
    """
    pairs = list(zip(old, new, strict=True))
    grads = torch.stack([seed_gradient(o, n, learning_rate).abs().mean() for o, n in pairs])
    return grads, torch.stack([percent_change(o, n).nanmedian() for o, n in pairs])


def _per_member(numel: Tensor, members: bool) -> Tensor:
    return numel[:, None] if members else numel


# name -> function. Names are the strings stored in Records, SQLite, figures and diagnosis rules.
STATS = {
    "grad_norm": norm,
    "grad_rms": rms,
    "grad_mean_abs": mean_abs,
    "grad_max_abs": max_abs,
    "nonfinite": nonfinite,
    "weight_grad_norm": norm,  # a Dense layer's weight matrix alone, biases left out
    "state_grad_norm": norm,  # ||dL/dh_t|| of a recurrent net's hidden state at each time step t
    "weight_norm": norm,
    "update_ratio": update_ratio,
    "backprop_norm": norm,  # norm of dL/d(layer output): the signal itself, not the weights' share
    "act_rms": rms,
    "saturated_frac": saturated_frac,
    "dead_frac": dead_frac,
    "seed_gradient": seed_gradient,
    "percent_change": percent_change,
}
