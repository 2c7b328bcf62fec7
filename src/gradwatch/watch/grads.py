"""Which gradient the watcher reads: a model's layers (unwrapped, tied, frozen), the optimizer inside a
trainer's wrapper, the loss scale mixed precision multiplied into the gradient, and the every-step reads.

The definition gradwatch records (README, "the gradient"): the gradient the optimizer applies at an update,
before clipping, unscaled, all-reduced, summed over accumulation micro-batches. The watcher reads it at the
end of each backward (before anyone clips it), keeps the last one, and commits it at the optimizer step,
divided by the scale found here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from gradwatch.stats import Layout, at, layer_norms, read, tensor_norms

MAX_LAYOUTS = 64  # distinct patterns of missing gradients cached before the cache starts over


def unwrap(model: nn.Module) -> nn.Module:
    """The user's own module inside torch.compile (``_orig_mod``) and DDP/DataParallel (``module``).

    Layers are named from it, so a wrapped model's records read ``dense1``, not ``module.dense1``.
    """
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def optimizer_of(optimizer):
    """The torch optimizer inside a trainer's wrapper, whose step hooks fire when the update happens.

    Accelerate's ``AcceleratedOptimizer`` (Hugging Face) keeps it in ``optimizer`` and has no hooks of
    its own; Lightning's ``LightningOptimizer`` keeps it in ``_optimizer``.
    """
    while not hasattr(optimizer, "_optimizer_step_pre_hooks"):
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None:
            raise ValueError(f"optimizer: got {type(optimizer).__name__}; allowed: a torch.optim.Optimizer")
        optimizer = inner
    return optimizer


def layers_of(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """(name, parameters it owns) per module, frozen ones included: a layer unfrozen later is recorded then.

    A shared parameter is counted once, under the LAST module that holds it in ``named_modules`` order:
    a tied output head (GPT-2's ``lm_head.weight`` is ``wte.weight``) is then the model's last layer,
    where the diagnosis looks for it, not its embedding.
    """
    owner = {id(p): name for name, module in model.named_modules() for p in module.parameters(recurse=False)}
    out = []
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False) if owner[id(p)] == name]
        if params:
            out.append((name or "model", params))
    return out


class Grads:
    """The layers that have gradients this step, and what their statistics need; one per pattern."""

    def __init__(self, layers: list[tuple[str, list[nn.Parameter]]], has: tuple[bool, ...]):
        flags = iter(has)
        groups = [(name, [p for p in ps if next(flags)]) for name, ps in layers]
        groups = [(name, ps) for name, ps in groups if ps]
        self.names = [name for name, _ in groups]
        self.params = [p for _, ps in groups for p in ps]
        self.layout = Layout.of([ps for _, ps in groups]) if groups else None


class Patterns:
    """``Grads`` per pattern of parameters present (all of them: ``all``), built once and cached."""

    def __init__(self, layers: list[tuple[str, list[nn.Parameter]]]):
        self.layers = layers
        self.all = Grads(layers, (True,) * sum(len(ps) for _, ps in layers))
        self.some: dict[tuple[bool, ...], Grads] = {}

    def of(self, has: tuple[bool, ...]) -> Grads:
        if all(has):
            return self.all
        if has not in self.some:
            if len(self.some) >= MAX_LAYOUTS:
                self.some.clear()
            self.some[has] = Grads(self.layers, has)
        return self.some[has]


class Gradient(NamedTuple):
    """The gradients as one backward left them (loss-scaled, not clipped), read without a sync."""

    layers: Grads
    reads: dict  # every-step entries' per-tensor reads (``parts``), (P, ...)
    now: dict[str, Tensor]  # every-step entries without parts, then (sampled steps) the sampled ones, per layer
    norms: Tensor | None  # sampled steps: per-tensor L2 norms before clipping, for the ``clip`` point
    grads: list[Tensor]  # the tensors themselves: clipped in place later, and the proofs' NaN/Inf counts
    versions: tuple[int, ...] = ()  # sampled steps: the tensors' version counters, which in-place clipping bumps


class StepReads:
    """The gradient entries: read at a backward's end, committed (unscaled) at the update. Every-step
    entries with ``parts`` keep a per-tensor read per step, combined per layer at the flush, many steps
    at once: two kernel calls per step instead of eight, when each costs more than the math."""

    def __init__(self):
        self.entries = at("grad", every_step=True)
        sampled = at("grad", every_step=False)
        self.sampled = {stat: s for stat, s in sampled.items() if not s.proof}
        self.proved = {stat: s for stat, s in sampled.items() if s.proof}  # read only when the proof fails
        self.clips = at("clip")
        self.steps: list[tuple[int, int, Grads, dict]] = []  # per step: its gradients' per-tensor reads

    def read(self, patterns: Patterns, params: list[nn.Parameter], sampled: bool) -> Gradient | None:
        """The gradients of ``params`` as they are; parameters without one (frozen, unused) are left out."""
        grads = [p.grad for p in params]
        layers = patterns.of(tuple(g is not None for g in grads))
        grads = [g for g in grads if g is not None]
        if not grads:
            return None
        reads, now = {}, {}
        for stat, s in self.entries.items():
            if s.parts:
                if s.parts[0] not in reads:
                    reads[s.parts[0]] = s.parts[0](grads)
            else:
                now[stat] = s.fn(grads, layers.layout)
        norms, versions = None, ()
        if sampled:
            now.update(read(self.sampled, grads, layers.layout))
            norms = reads.get(tensor_norms) if self.clips else None
            norms = tensor_norms(grads) if self.clips and norms is None else norms
            versions = tuple(g._version for g in grads)
        return Gradient(layers, reads, now, norms, grads, versions)

    def commit(self, step: int, epoch: int, kept: Gradient, inverse: Tensor | None) -> dict[str, Tensor]:
        """Queue ``kept``'s every-step reads as ``step``'s, times ``inverse`` (1 / loss scale): every read
        here scales linearly with the gradient (the proofs' NaN/Inf counts are read later, unscaled)."""
        unscale = (lambda t: t) if inverse is None else (lambda t: t * inverse)
        self.steps.append((step, epoch, kept.layers, {part: unscale(v) for part, v in kept.reads.items()}))
        return {stat: unscale(v) for stat, v in kept.now.items()}

    def clip(self, kept: Gradient, scale: Tensor | None, now: Tensor | None) -> dict[str, Tensor]:
        """The ``clip`` entries: the gradients' per-layer norm now (clipped) against ``kept``'s (before),
        each unscaled (``scale``: the backward's loss scale; ``now``: the scale they carry now); none when
        nothing wrote to the gradients since they were read (their version counters): a factor of 1, read
        at no cost, where most loops do not clip."""
        if tuple(g._version for g in kept.grads) == kept.versions:
            return {}
        layout = kept.layers.layout
        before = layer_norms(kept.norms, layout) / (1.0 if scale is None else scale)
        after = layer_norms(tensor_norms(kept.grads), layout) / (1.0 if now is None else now)
        return read(self.clips, before, after)

    def rows(self) -> tuple[list[tuple[int, int, str, list[str]]], list[Tensor]]:
        """(rows, values) of the steps read so far, each pattern of layers at once; then forgets them."""
        rows, values = [], []
        for layers in {id(e[2]): e[2] for e in self.steps}.values():
            mine = [(step, epoch, reads) for step, epoch, same, reads in self.steps if same is layers]
            stacked: dict = {}
            for stat, s in self.entries.items():
                if s.parts:
                    if s.parts[0] not in stacked:  # (P, ..., steps)
                        stacked[s.parts[0]] = torch.stack([reads[s.parts[0]] for *_, reads in mine], -1)
                    v = s.parts[1](stacked[s.parts[0]], layers.layout)  # (L, steps)
                    rows += [(step, epoch, stat, layers.names) for step, epoch, _ in mine]
                    values.append(v.T.reshape(-1))
        self.steps = []
        return rows, values


def loss_scales(optimizer, scaler) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(scale the backward's gradient carries, scale it carries at the optimizer step, skip flag), no sync.

    ``GradScaler.step`` unscales before a plain optimizer's step; a fused optimizer unscales inside its
    own step, so the scaler hands it ``grad_scale`` and ``found_inf`` as attributes instead. The scale of
    the backward is the scaler's own tensor when the user passed the scaler, else the fused one (None: 1).
    """
    fused = getattr(optimizer, "_step_supports_amp_scaling", False)
    now = getattr(optimizer, "grad_scale", None) if fused else None
    found_inf = getattr(optimizer, "found_inf", None) if fused else None
    return (now if scaler is None else getattr(scaler, "_scale", None)), now, found_inf


def scale_version(scaler) -> int | None:
    """The version counter of the scaler's scale tensor: ``GradScaler.update`` bumps it in place, no sync."""
    scale = getattr(scaler, "_scale", None)
    return None if scale is None else scale._version


class Snapshot:
    """The trainable weights before a sampled step, into one buffer kept between sampled steps.

    One ``cat`` into a flat buffer when the weights share a dtype and device (one copy, not one per
    parameter); ``weights`` holds its per-parameter views.
    """

    def __init__(self):
        self.layers: Grads | None = None
        self.weights: list[Tensor] = []
        self._flat: Tensor | None = None

    @torch.no_grad()  # the optimizer's hooks run before its own no_grad
    def take(self, layers: Grads) -> bool:
        """Copy ``layers``' weights; False when there are none (every layer frozen)."""
        params = layers.params
        if not params:
            return False
        if self.layers is not layers:  # first time, or a layer was frozen or unfrozen since
            self.layers, self._flat = layers, None
            if len({(p.dtype, p.device) for p in params}) == 1:
                self._flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype,
                                         device=params[0].device)
                self.weights = [v.view_as(p) for v, p in zip(self._flat.split([p.numel() for p in params]),
                                                             params, strict=True)]
            else:
                self.weights = [torch.empty_like(p) for p in params]
        if self._flat is not None:
            torch.cat([p.reshape(-1) for p in params], out=self._flat)
        else:
            for old, p in zip(self.weights, params, strict=True):
                old.copy_(p)
        return True
