"""STATS: every statistic gradwatch records, each an entry saying where it is read, how often, and how.

The PyTorch watcher, the stacked ensembles and the Keras callback loop over this table for each hook
point (``POINTS``) and never name an entry, so a number means the same thing wherever it was
measured and a new statistic is one entry here (Cockpit's quantities, optax's transforms). No
function here reads a value back to the host (no ``.item()``, no ``if`` on a tensor): the caller
decides when to pay for one sync, as torch's ``clip_grad_norm_`` does with ``_foreach_norm``. With
``members=True`` every tensor carries a leading member axis E (an ensemble of stacked models) and
each result gains a trailing E axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# hook point -> what a monitor hands the entry's fn there (L layers in, (L,) or (L, E) out)
POINTS = {
    "grad": "fn(grads, layout, members): each layer's parameter gradients, as the optimizer applies them",
    "weight": "fn(weights, layout, members): each layer's parameters, before the step",
    "update": "fn(before, after, layout, members): each layer's parameters before and after the step",
    "output": "fn(outputs, layout, members): each layer's output on the step's batch",
    "signal": "fn(grads, layout, members): dL/d(each layer's output), the backpropagated signal itself",
    "activation": "fn(outputs, params, members): each activation module's output (features last), with the "
                  "entry's ``kinds`` parameter for its module class",
    "kernel_grad": "fn(grads, layout, members): each Dense layer's weight-matrix gradient alone (biases left "
                   "out), on each epoch's first batch: the seed's and AUTOTRAINER's measure",
    "state_signal": "fn(grads, layout, members): dL/dh_t of a recurrent net's hidden state at each time step t "
                    "(Pascanu et al. 2013; a fused nn.RNN/GRU/LSTM: dL/dx_t), layers t0 .., on sampled steps",
    "kernel": "fn(start, now, lr, members): each Dense layer's weight matrix at the start of training and now, "
              "once per epoch: the seed notebook's measures",
    "clip": "fn(before, after, members): each layer's gradient L2 norm (``norm``) before clipping and after it, "
            "both unscaled, (L,) or (L, E)",
    "scaler": "fn(found_inf, members): the loss scaler's Inf/NaN flag at an update (layer \"\"), as a tensor",
}
EVERY_STEP = ("grad", "scaler")  # points read at every update: no module hook is needed there
LAYERED = ("grad", "weight", "output", "signal", "kernel_grad", "state_signal")  # fn(tensors, layout, members)
PER_EPOCH = ("kernel_grad", "kernel")  # points read once per epoch, whatever ``every_step``


@dataclass(frozen=True)
class Stat:
    """Where a statistic is read (a ``POINTS`` key), how often, and the pure function that reads it.

    ``every_step``: on every optimizer step (``EVERY_STEP`` points only: module hooks exist on
    sampled steps alone), else on sampled steps, or at the point's own cadence for the per-epoch points.
    ``parts``: ``(read, combine)``, a cheaper road to ``fn``'s result for a monitor that gathers
    reads first. At a layered point ``read(tensors, members)`` gives per-tensor values (P, ...)
    and ``combine(values, layout)`` per-layer ones, so many steps combine at once and entries with
    the same ``read`` share one pass over memory; at ``activation`` ``read(output, param, members)``
    runs inside the module hook and ``combine(pieces)`` once for all layers.
    ``kinds``: at ``activation``, module class name -> the parameter ``fn`` gets for its outputs.
    ``proof``: an entry whose finite values prove this one zero, so a monitor may skip reading it.
    """

    point: str
    every_step: bool
    fn: Callable[..., Tensor]
    parts: tuple[Callable, Callable] | None = None
    kinds: dict[str, Any] | None = None
    proof: str | None = None

    @property
    def cadence(self) -> str:
        """``step``, ``sampled`` (every ``every`` steps) or ``epoch``: how often a monitor reads it."""
        return "step" if self.every_step else "epoch" if self.point in PER_EPOCH else "sampled"


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


def _rows(t: Tensor, members: bool) -> Tensor:
    """``t`` as (E, n) with a member axis, else as it is (a full reduction follows)."""
    return t.reshape(len(t), -1) if members else t


def _per_layer(numel: Tensor, like: Tensor) -> Tensor:
    """(L,) element counts shaped to divide a (L, ...) result."""
    return numel.view(-1, *([1] * (like.dim() - 1)))


def _segment(values: Tensor, layout: Layout, reduce: str = "sum") -> Tensor:
    """Combine per-tensor values into per-layer values: (P, ...) -> (L, ...)."""
    if layout.one_each:  # a module hook's single output: four kernel launches saved per call
        return values
    out = values.new_zeros((layout.n, *values.shape[1:]))
    index = layout.segments.view(-1, *([1] * (values.dim() - 1))).expand_as(values)
    return out.scatter_reduce_(0, index, values, reduce, include_self=False)


# --- norms -----------------------------------------------------------------------------------
def tensor_norms(tensors: list[Tensor], members: bool = False) -> Tensor:
    """Each tensor's L2 norm, (P,) or (P, E): the read half of ``norm``.

    One ``_foreach_norm`` without a member axis: the watcher takes these every step and combines
    many steps at once with ``layer_norms``, two kernel calls per step instead of eight. Stacked at
    once, as ``clip_grad_norm_`` does: stacking one step's 41 scalars costs ~25 us on CPU.
    """
    if members:  # float32, or wider: a float64 member keeps its precision, as it would read alone
        return torch.stack([torch.linalg.vector_norm(t.flatten(1).to(torch.promote_types(t.dtype, torch.float32)),
                                                     2.0, dim=1) for t in tensors])
    return torch.stack(torch._foreach_norm(tensors, 2.0))


def layer_norms(norms: Tensor, layout: Layout) -> Tensor:
    """Per-layer L2 norms (L, ...) from per-tensor ones (P, ...): the root of the sum of squares."""
    return norms if layout.one_each else _segment(norms.square(), layout).sqrt()


def layer_rms(norms: Tensor, layout: Layout) -> Tensor:
    """Per-layer root mean square (L, ...) from per-tensor norms (P, ...)."""
    per_layer = layer_norms(norms, layout)
    return per_layer / _per_layer(layout.numel, per_layer).sqrt()


def norm(tensors: list[Tensor], layout: Layout, members: bool = False) -> Tensor:
    """L2 norm per layer, over all of the layer's tensors (weights and biases together)."""
    return layer_norms(tensor_norms(tensors, members), layout)


def rms(tensors: list[Tensor], layout: Layout, members: bool = False) -> Tensor:
    """Root mean square per layer: the scale of one entry, comparable across layer sizes."""
    return layer_rms(tensor_norms(tensors, members), layout)


# --- |x| ---------------------------------------------------------------------------------------
def abs_reads(tensors: list[Tensor], members: bool = False) -> Tensor:
    """Each tensor's largest |x| and sum of |x|, (P, 2) or (P, 2, E), from one |x| temporary per tensor.

    One pass over memory for the two: the temporary is still in cache when ``amax`` and ``sum``
    read it, where ``aminmax`` plus ``abs().sum()`` read each gradient twice (~1.7 ms against ~1.2
    ms for a 20 x 256 MLP on one CPU core). ``amax`` propagates NaN, so a NaN gives a NaN maximum.
    """
    maxes, sums = [], []
    for t in tensors:
        a = _rows(t.abs(), members)
        maxes.append(a.amax(dim=-1) if members else a.amax())
        sums.append(a.sum(dim=-1 if members else None, dtype=torch.float32))
    return torch.stack([torch.stack(maxes).float(), torch.stack(sums)], 1)


def layer_max_abs(reads: Tensor, layout: Layout) -> Tensor:
    return _segment(reads[:, 0], layout, "amax")


def layer_mean_abs(reads: Tensor, layout: Layout) -> Tensor:
    sums = _segment(reads[:, 1], layout)
    return sums / _per_layer(layout.numel, sums)


def max_abs(tensors: list[Tensor], layout: Layout, members: bool = False) -> Tensor:
    """Largest |x| per layer; NaN if the layer has a NaN."""
    return layer_max_abs(abs_reads(tensors, members), layout)


def mean_abs(tensors: list[Tensor], layout: Layout, members: bool = False) -> Tensor:
    """Mean |x| per layer (SageMaker Debugger's vanishing-gradient measure)."""
    return layer_mean_abs(abs_reads(tensors, members), layout)


def _sums(tensors: Iterable[Tensor], members: bool) -> Tensor:
    """Per-tensor sums in float32, (P,) or (P, E), of temporaries made one at a time.

    Fed a generator, each temporary is freed before the next is made, so the allocator reuses one
    block; a ``_foreach`` op makes them all at once, and on CPU mapping fresh pages for 5 MB of
    gradient-sized temporaries costs ~2 ms, more than the arithmetic.
    """
    return torch.stack([_rows(t, members).sum(dim=-1 if members else None, dtype=torch.float32) for t in tensors])


def nonfinite(tensors: list[Tensor], layout: Layout, members: bool = False) -> Tensor:
    """Count of NaN/Inf entries per layer.

    x * 0 is 0 for a finite x and NaN otherwise: a multiply, a NaN -> 1 and a sum count them ~10x
    faster on CPU than ``~isfinite(x)`` does.
    """
    return _segment(_sums(((t * 0).nan_to_num_(1.0) for t in tensors), members), layout)


@torch.no_grad()
def update_ratio(before: list[Tensor], after: list[Tensor], layout: Layout, members: bool = False) -> Tensor:
    """||W_new - W_old|| / ||W_old|| per layer; ~1e-3 is Karpathy's rule of thumb for healthy training.

    Each difference is a temporary freed before the next is made (see ``_sums``), so no copy of
    the weights is allocated whole; each old tensor's norm is read just before its difference, while
    it is still in cache, not in a second pass over all the weights.
    """
    dims = {"dim": 1} if members else {}
    old, change = [], []
    for b, a in zip(before, after, strict=True):
        old.append(torch.linalg.vector_norm(_rows(b, members).float(), **dims))
        change.append(torch.linalg.vector_norm(_rows(b - a, members).float(), **dims))
    return layer_norms(torch.stack(change), layout) / layer_norms(torch.stack(old), layout).clamp_min(1e-30)


# --- activations -------------------------------------------------------------------------------
def saturated_frac(outputs: list[Tensor], bounds: list[tuple[float, float]], members: bool = False) -> Tensor:
    """Fraction of outputs within 1% of a saturating activation's bounds (sigmoid: 0/1, tanh: -1/1)."""
    fracs = []
    for a, (low, high) in zip(outputs, bounds, strict=True):
        margin = 0.01 * (high - low)
        hit = ((a <= low + margin) | (a >= high - margin)).float()
        fracs.append(hit.mean(tuple(range(1, hit.dim()))) if members else hit.mean())  # no copy of a strided hit
    return torch.stack(fracs)


def unit_range(a: Tensor, _param: Any = None, members: bool = False) -> tuple[Tensor, Tensor]:
    """Each unit's smallest and largest output over the batch: (units,) each, or (E, units).

    Min and max both 0 is all-zero without a temporary the size of ``a``: ``amin`` and ``amax`` take
    17 us on a 128 x 256 batch on CPU, where ``(a == 0).all(0)`` and ``aminmax(a, dim=0)`` take ~110.
    """
    first = 1 if members else 0
    a = a.unsqueeze(first) if a.dim() == first + 1 else a  # one example: still a batch axis to reduce
    dims = tuple(range(first, a.dim() - 1))
    return a.amin(dims), a.amax(dims)


def dead_of_ranges(ranges: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Per layer, the fraction of units whose range is [0, 0]; one stack when the layers agree in width."""
    lows, highs = zip(*ranges, strict=True)
    if len({t.shape for t in lows}) == 1:
        return ((torch.stack(lows) == 0) & (torch.stack(highs) == 0)).float().mean(-1)
    return torch.stack([((lo == 0) & (hi == 0)).float().mean(-1) for lo, hi in ranges])


def dead_frac(outputs: list[Tensor], params: list | None = None, members: bool = False) -> Tensor:
    """Fraction of units that output exactly 0 for every example of the batch (dead ReLUs).

    Lu et al. (2019), "Dying ReLU and initialization"; a unit is dead on the batch when its output,
    and so its gradient, is zero for all inputs. Features are the last axis; the rest (batch, time,
    positions) are reduced.
    """
    return dead_of_ranges([unit_range(a, None, members) for a in outputs])


# --- the seed notebook's measures --------------------------------------------------------------
def seed_gradient(old: Tensor, new: Tensor, learning_rate: float | Tensor) -> Tensor:
    """The seed notebook's ``gradient = (old - new) / learning_rate``, entry by entry.

    Under plain SGD over one step this is the gradient; over many steps, or under Adam (which
    divides each step by a running RMS of the gradient), it is not: Adam moves every weight by
    about lr per step however small its gradient is.
    """
    return (old - new) / learning_rate


def percent_change(old: Tensor, new: Tensor) -> Tensor:
    """The seed notebook's ``|100 (old - new) / old|``, entry by entry; NaN (skipped) where ``old`` is 0.

    A weight that starts at 0 has no relative change: x / 0 would be an Inf that medians carry and the
    diagnosis reads as a NaN/Inf. Every caller takes a NaN-ignoring median, so those entries drop out.
    """
    return torch.where(old != 0, (100 * (old - new) / old).abs(), torch.full_like(old, math.nan))


def mean_seed_gradient(start: list[Tensor], now: list[Tensor], lr: float | Tensor, members: bool = False) -> Tensor:
    """Per layer, the notebook's mean |(old - new) / lr| since the start of training."""
    means = [_rows(seed_gradient(s, n, lr).abs(), members) for s, n in zip(start, now, strict=True)]
    return torch.stack([m.mean(1) if members else m.mean() for m in means])


def _nanmedian(t: Tensor, members: bool) -> Tensor:
    """``np.median`` ignoring NaN: the mean of the two middle values for an even count, where torch's
    median takes the lower one. The upper one is minus the lower median of ``-t``; no sort, no size limit
    (``nanquantile`` refuses 16M entries)."""
    low, high = (t.nanmedian(1).values, -(-t).nanmedian(1).values) if members else (t.nanmedian(), -(-t).nanmedian())
    return (low + high) / 2


def median_percent_change(start: list[Tensor], now: list[Tensor], _lr: Any = None, members: bool = False) -> Tensor:
    """Per layer, the notebook's ``np.median`` of the % change since the start, NaN entries (old == 0) ignored."""
    changes = [_rows(percent_change(s, n), members) for s, n in zip(start, now, strict=True)]
    return torch.stack([_nanmedian(c, members) for c in changes])


def weight_trace(start: list[Tensor], now: list[Tensor], _lr: Any = None, members: bool = False) -> Tensor:
    """Per layer, the value of its weight matrix's first entry now: the seed's epoch-vs-weight picture,
    where a first layer's flat line is the vanishing gradient seen by eye."""
    return torch.stack([_rows(n, True)[:, 0] if members else n.reshape(-1)[0] for n in now])


def clip_factor(before: Tensor, after: Tensor, members: bool = False) -> Tensor:
    """Per layer, the gradient's norm after clipping over its norm before: 1 unclipped, < 1 clipped.

    ``clip_grad_norm_`` scales every gradient by one factor, so every layer reads the same value;
    a layer with no gradient (norm 0) reads 1, not 0/0.
    """
    return torch.where(before > 0, after / before, torch.ones_like(before))


def clipped(factors: Sequence[float]) -> bool:
    """Whether one step's ``clip`` values (a factor per layer, on the host) show any clipping.

    Every monitor records a step's ``clip`` rows only where this holds, so a ``clip_factor`` row means
    a clip happened, whoever recorded it; a step where clipping changed nothing (all exactly 1) leaves none.
    """
    return any(f != 1.0 for f in factors)


def skipped(found_inf: Tensor, members: bool = False) -> Tensor:
    """1 where the scaler found Inf/NaN and skipped the update, else 0: its own flag as a float, shape (1,)."""
    return (found_inf > 0).float().reshape(-1)


# activations whose outputs pile up at a bound when saturated: module class -> (low, high)
SATURATING = {"Sigmoid": (0.0, 1.0), "Tanh": (-1.0, 1.0)}
# the ReLU family: units counted dead when their output is exactly 0 for every input
RECTIFIERS = dict.fromkeys(("ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU"))

# name -> Stat. Names are the strings stored in Records, SQLite, figures and diagnosis rules.
STATS = {
    "grad_norm": Stat("grad", True, norm, parts=(tensor_norms, layer_norms)),
    "grad_rms": Stat("grad", True, rms, parts=(tensor_norms, layer_rms)),
    "grad_mean_abs": Stat("grad", False, mean_abs, parts=(abs_reads, layer_mean_abs)),
    "grad_max_abs": Stat("grad", False, max_abs, parts=(abs_reads, layer_max_abs)),
    "nonfinite": Stat("grad", False, nonfinite, proof="grad_max_abs"),  # a finite max |g| proves no NaN/Inf
    "weight_norm": Stat("weight", False, norm),
    "update_ratio": Stat("update", False, update_ratio),
    "act_rms": Stat("output", False, rms, parts=(tensor_norms, layer_rms)),
    "backprop_norm": Stat("signal", False, norm, parts=(tensor_norms, layer_norms)),  # the signal, not dL/dW
    "saturated_frac": Stat("activation", False, saturated_frac, kinds=SATURATING),
    "dead_frac": Stat("activation", False, dead_frac, parts=(unit_range, dead_of_ranges), kinds=RECTIFIERS),
    "weight_grad_norm": Stat("kernel_grad", False, norm),
    "state_grad_norm": Stat("state_signal", False, norm),
    "seed_gradient": Stat("kernel", False, mean_seed_gradient),
    "percent_change": Stat("kernel", False, median_percent_change),
    "weight_trace": Stat("kernel", False, weight_trace),
    "clip_factor": Stat("clip", False, clip_factor),  # whole-model clipping: after / before, per layer
    "skipped": Stat("scaler", True, skipped),  # an update the scaler skipped: its Inf gradient is not recorded
}


def at(point: str, every_step: bool | None = None) -> dict[str, Stat]:
    """The entries read at ``point`` (with this cadence, if given), in table order."""
    return {name: s for name, s in STATS.items() if s.point == point and every_step in (None, s.every_step)}


def activation_kinds() -> set[str]:
    """Module classes some ``activation`` entry reads: their outputs are activations, not layers'."""
    return {kind for s in at("activation").values() for kind in s.kinds or {}}


def read(stats: dict[str, Stat], *args, members: bool = False) -> dict[str, Tensor]:
    """Each entry's value from one point's inputs (``POINTS``); entries sharing a ``parts`` read pass once."""
    shared: dict[Callable, Tensor] = {}
    out = {}
    for name, s in stats.items():
        if s.parts and s.point in LAYERED:
            tensors, layout = args
            if s.parts[0] not in shared:
                shared[s.parts[0]] = s.parts[0](tensors, members)
            out[name] = s.parts[1](shared[s.parts[0]], layout)
        else:
            out[name] = s.fn(*args, members=members)
    return out
