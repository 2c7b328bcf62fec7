"""STATS: every statistic gradwatch records, each a pure function from tensors to a tensor.

The PyTorch watcher, the Keras callback and the ensemble trainer all call these, so a number means
the same thing wherever it was measured. No function here reads a value back to the host (no
``.item()``, no ``if`` on a tensor): the caller decides when to pay for one sync, as torch's
``clip_grad_norm_`` does with ``_foreach_norm``. With ``members=True`` every tensor carries a leading
member axis E (an ensemble of stacked models) and each result gains a trailing E axis.
"""

from __future__ import annotations

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


def norm(tensors: list[Tensor], layout: Layout, members: bool = False) -> Tensor:
    """L2 norm per layer, over all of the layer's tensors (weights and biases together)."""
    if layout.one_each:
        return _norms(tensors, 2.0, members)
    return _segment(_norms(tensors, 2.0, members).square(), layout).sqrt()


def rms(tensors: list[Tensor], layout: Layout, members: bool = False) -> Tensor:
    """Root mean square per layer: the scale of one entry, comparable across layer sizes."""
    return norm(tensors, layout, members) / _per_member(layout.numel, members).sqrt()


def _rows(t: Tensor, members: bool) -> Tensor:
    """``t`` as (E, n) with a member axis, else as it is (a full reduction follows)."""
    return t.reshape(len(t), -1) if members else t


def _sums(tensors: list[Tensor], members: bool) -> Tensor:
    """Per-tensor sums in float32: (P,), or (P, E)."""
    return torch.stack([_rows(t, members).sum(dim=-1 if members else None, dtype=torch.float32) for t in tensors])


def mean_abs(tensors: list[Tensor], layout: Layout, members: bool = False) -> Tensor:
    """Mean |x| per layer (SageMaker Debugger's vanishing-gradient measure).

    ``abs().sum()`` per tensor, not ``_foreach_norm(ord=1)``, whose CPU kernel is ~3x slower.
    """
    return _segment(_sums(torch._foreach_abs(tensors), members), layout) / _per_member(layout.numel, members)


def max_abs(tensors: list[Tensor], layout: Layout, members: bool = False) -> Tensor:
    """Largest |x| per layer; NaN if the layer has a NaN.

    max(max x, -min x) from one ``aminmax`` pass per tensor: the inf-norm kernel is ~30x slower on CPU.
    """
    lows, highs = zip(*(torch.aminmax(_rows(t, members), dim=-1 if members else None) for t in tensors),
                      strict=True)
    return _segment(torch.maximum(torch.stack(highs), torch.stack(lows).neg()), layout, "amax")


def nonfinite(tensors: list[Tensor], layout: Layout, members: bool = False) -> Tensor:
    """Count of NaN/Inf entries per layer.

    x * 0 is 0 for a finite x and NaN otherwise: a multiply, a NaN -> 1 and a sum count them ~10x
    faster on CPU than ``~isfinite(x)`` does.
    """
    marks = [z.nan_to_num_(1.0) for z in torch._foreach_mul(tensors, 0.0)]
    return _segment(_sums(marks, members), layout)


def update_ratio(before: list[Tensor], after: list[Tensor], layout: Layout, members: bool = False) -> Tensor:
    """||W_new - W_old|| / ||W_old|| per layer; ~1e-3 is Karpathy's rule of thumb for healthy training."""
    delta = torch._foreach_sub(after, before)
    return norm(delta, layout, members) / norm(before, layout, members).clamp_min(1e-30)


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
    and so its gradient, is zero for all inputs. Features are the last axis.
    """
    if members:
        return torch.stack([(a.reshape(len(a), -1, a.shape[-1]) == 0).all(1).float().mean(1) for a in activations])
    return torch.stack([(a.reshape(-1, a.shape[-1]) == 0).all(0).float().mean() for a in activations])


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
