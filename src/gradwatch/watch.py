"""``watch(model)``: per-layer gradient health of any PyTorch model, at a cost you do not notice.

Built like fastai's ``Hook``/``HookCallback(every=...)``: small hooks composed into one handle that
detaches cleanly, with module and autograd-node hooks registered only on sampled steps (every
``every``-th step). Every step pays for one statistic, the per-layer gradient norm (its RMS follows
from it): one ``_foreach_norm`` over the gradients (``clip_grad_norm_``'s fast path). Sampled steps
add the rest: max and mean |g|, NaN/Inf counts, weight norms, the update-to-weight ratio (with an
optimizer), and from the module hooks the backpropagated signal dL/d(layer output), the activation
scale, and saturated and dead units. Results stay on the tensors' device and reach the host in one
copy per ``every`` steps (the monitor's one ``# sync:``), unlike Cockpit's always-on extensions.

What keeps it cheap (``benchmarks/monitor_overhead.py``): with an optimizer, its step pre/post hooks
are the only per-step Python; a step's norms are combined per layer at the flush, many steps at
once; max and mean |g| share one read of each gradient; the weights' copy for the update ratio
reuses its buffers; NaN/Inf are counted only where a max |g| is not finite. Most of what remains
is memory traffic that any exact monitor at this cadence pays: the benchmark's ``floor`` line.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd import Variable

from gradwatch.diagnose import diagnose as _diagnose
from gradwatch.nets import RECTIFIERS, SATURATING
from gradwatch.records import Records, Run
from gradwatch.stats import (
    STATS,
    Layout,
    abs_stats,
    dead_of_ranges,
    layer_norms,
    tensor_norms,
    unit_range,
    update_ratio_,
)

PROBED = ("act_rms", "backprop_norm", "saturated_frac", "dead_frac")  # from module hooks, on sampled steps
MAX_LAYOUTS = 64  # distinct patterns of missing gradients cached before the cache starts over


def _unwrap(model: nn.Module) -> nn.Module:
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


def _layers(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """(name, trainable parameters it owns) per module, each shared parameter counted once."""
    seen: set[int] = set()
    out = []
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            out.append((name or "model", params))
    return out


class _Grads:
    """The layers that have gradients this step, and what their statistics need; one per pattern."""

    def __init__(self, layers: list[tuple[str, list[nn.Parameter]]], has: tuple[bool, ...]):
        flags = iter(has)
        groups = [(name, [p for p in ps if next(flags)]) for name, ps in layers]
        groups = [(name, ps) for name, ps in groups if ps]
        self.names = [name for name, _ in groups]
        self.layout = Layout.of([ps for _, ps in groups]) if groups else None
        self.root_numel = self.layout.numel.sqrt()[:, None] if groups else None  # rms = norm / sqrt(numel)


class Watcher:
    """Records per-layer statistics of ``model`` into ``self.records``; see :func:`watch`."""

    def __init__(self, model: nn.Module, optimizer=None, every: int = 10, buffer: int = 1_000_000):
        if every < 1:
            raise ValueError(f"every: got {every}; allowed: >= 1")
        if buffer < 1:
            raise ValueError(f"buffer: got {buffer}; allowed: >= 1")
        self.model, self.optimizer, self.every = model, optimizer, every
        self.records = Records(maxlen=buffer)
        self.step, self.epoch = 0, 0
        self._layers = _layers(_unwrap(model))
        self._names = [name for name, _ in self._layers]
        self._order = {name: i for i, name in enumerate(self._names)}
        self._params = [p for _, ps in self._layers for p in ps]
        self._all = _Grads(self._layers, (True,) * len(self._params))
        self._some: dict[tuple[bool, ...], _Grads] = {}
        self._norms: list[tuple[int, int, _Grads, Tensor]] = []  # per step: its per-tensor grad norms, (P,)
        self._pending: list[tuple[int, int, str, list[str], Tensor]] = []  # sampled stats awaiting the flush
        self._seen: dict[str, dict] = {}  # stat -> layer -> value (dead_frac: a unit_range), this step's probes
        self._numel: dict[str, int] = {}  # layer -> elements of its output, for act_rms
        self._unchecked: tuple[int, int, _Grads, list[Tensor]] | None = None  # gradients whose NaN/Inf to count
        self._before: list[Tensor] | None = None  # the weights before a sampled step
        self._flat: Tensor | None = None  # ... all in one buffer, when they share a dtype and device
        self._updated = False
        self._armed: list = []
        self._queued = False
        self._handles: list = []
        self._probes = self._modules_to_probe(model)
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return  # only rank 0 watches: gradients are all-reduced, so every rank would record the same
        if optimizer is None:
            self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._params]
        else:  # gradients final (clipped, all-reduced), weights old; then weights new
            self._handles = [optimizer.register_step_pre_hook(self._on_before_step),
                             optimizer.register_step_post_hook(self._on_after_step)]
        self._arm()

    def _modules_to_probe(self, model: nn.Module) -> list[tuple[nn.Module, object]]:
        """(module, forward hook) for each layer and each sigmoid/tanh/ReLU module, hooked on sampled steps.

        A torch.compile'd model runs its graph, not its modules' hooks, so it gets none (gradient and
        update statistics only).
        """
        if hasattr(model, "_orig_mod"):
            return []
        probes = []
        for name, module in _unwrap(model).named_modules():
            name, kind = name or "model", type(module).__name__
            if kind in SATURATING:
                probes.append((module, partial(self._on_activation, name, "saturated_frac", SATURATING[kind])))
            elif kind in RECTIFIERS:
                probes.append((module, partial(self._on_activation, name, "dead_frac", None)))
            elif name in self._order:
                probes.append((module, partial(self._on_forward, name)))
        return probes

    # --- events -------------------------------------------------------------------------------
    def _on_grad(self, _param: Tensor) -> None:
        """A parameter's gradient landed: run ``_on_backward`` once, when the whole backward ends."""
        if not self._queued:
            self._queued = True
            Variable._execution_engine.queue_callback(self._on_backward)

    def _on_backward(self) -> None:
        """Without an optimizer, each backward is a step: gradients are final here."""
        self._queued = False
        self._record_grads()
        if self._sampled():
            self._push("weight_norm", self._names, STATS["weight_norm"](self._params, self._all.layout))
        self._finish_step()

    def _on_before_step(self, *_args) -> None:
        self._record_grads()
        if self._sampled():
            with torch.no_grad():  # the optimizer's hooks run before its own no_grad
                self._copy_weights()
            self._updated = True

    def _copy_weights(self) -> None:
        """The weights before a sampled step, into one buffer kept between sampled steps.

        One ``cat`` into a flat buffer when the weights share a dtype and device (one copy, not one
        per parameter); ``self._before`` holds its per-parameter views, overwritten by update_ratio_.
        """
        params = self._params
        if self._before is None:
            if len({(p.dtype, p.device) for p in params}) == 1:
                self._flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype,
                                         device=params[0].device)
                self._before = [v.view_as(p) for v, p in zip(self._flat.split([p.numel() for p in params]),
                                                             params, strict=True)]
            else:
                self._before = [torch.empty_like(p) for p in params]
        if self._flat is not None:
            torch.cat([p.reshape(-1) for p in params], out=self._flat)
        else:
            for old, p in zip(self._before, params, strict=True):
                old.copy_(p)

    def _on_after_step(self, *_args) -> None:
        if self._updated:
            with torch.no_grad():  # the weights before the step give the weight norm and the ratio's denominator
                norms = STATS["weight_norm"](self._before, self._all.layout)
                ratio = update_ratio_(self._before, self._params, self._all.layout, old=norms)  # in place
            self._push("weight_norm", self._names, norms)
            self._push("update_ratio", self._names, ratio)
            self._updated = False
        self._finish_step()

    def _on_forward(self, name: str, _module, _inputs, output) -> None:
        """A layer's output: its scale now, and a hook on the autograd node that made it.

        Only the first call of a step is measured (an unrolled RNN cell: its first time step, the
        gradient that travelled furthest back), and only under autograd, so an evaluation pass between
        steps is not taken for the training step.
        """
        out = output[0] if isinstance(output, tuple) else output
        if not isinstance(out, Tensor) or not torch.is_grad_enabled() or name in self._seen["act_rms"]:
            return
        self._seen["act_rms"][name], self._numel[name] = tensor_norms([out.detach()])[0], out.numel()
        if out.grad_fn is not None:  # a node pre-hook: lighter than Tensor.register_hook
            out.grad_fn.register_prehook(partial(self._on_signal, name, self.step, out.output_nr))

    def _on_signal(self, name: str, step: int, index: int, grads: tuple[Tensor | None, ...]) -> None:
        """dL/d(layer output) arrived during backward: the backpropagated signal itself."""
        grad = grads[index]
        if step == self.step and grad is not None and name not in self._seen["backprop_norm"]:
            self._seen["backprop_norm"][name] = tensor_norms([grad])[0]

    def _on_activation(self, name: str, stat: str, bounds, _module, _inputs, output) -> None:
        if not isinstance(output, Tensor) or not torch.is_grad_enabled() or name in self._seen[stat]:
            return
        out = output.detach()
        if stat == "saturated_frac":
            self._seen[stat][name] = STATS[stat]([out], [bounds])[0]
        else:  # a conv's units are its channels, on axis 1; elsewhere features are the last axis.
            # Half of STATS["dead_frac"] here, the other half for all layers at once in _collect
            self._seen[stat][name] = unit_range(out.movedim(1, -1) if out.dim() > 3 else out)

    def _finish_step(self) -> None:
        if self._armed:
            self._disarm()
            self._collect()
        if self._sampled():
            self.flush()
        self.step += 1
        self._arm()

    # --- statistics ---------------------------------------------------------------------------
    def _sampled(self) -> bool:
        return self.step % self.every == 0

    def _grads(self) -> tuple[_Grads, list[Tensor]]:
        grads = [p.grad for p in self._params]
        if all(g is not None for g in grads):
            return self._all, grads
        has = tuple(g is not None for g in grads)  # parameters without a gradient this step are left out
        if has not in self._some:
            if len(self._some) >= MAX_LAYOUTS:
                self._some.clear()
            self._some[has] = _Grads(self._layers, has)
        return self._some[has], [g for g in grads if g is not None]

    def _record_grads(self) -> None:
        layers, grads = self._grads()
        if not grads:
            return
        self._norms.append((self.step, self.epoch, layers, tensor_norms(grads)))
        if self._sampled():
            highest, mean = abs_stats(grads, layers.layout)  # STATS' grad_max_abs and grad_mean_abs in one read
            self._push("grad_max_abs", layers.names, highest)
            self._push("grad_mean_abs", layers.names, mean)
            self._unchecked = (self.step, self.epoch, layers, grads)

    def _count_nonfinite(self, max_abs: list[float]) -> None:
        """Record NaN/Inf counts of the sampled step's gradients, given their max |g| per layer.

        A finite max |g| proves a zero count, so the counting pass (and its second sync) runs only
        when some max is NaN or Inf: a diverging run, where speed no longer matters.
        """
        step, epoch, layers, grads = self._unchecked
        self._unchecked = None
        counts = [0.0] * len(layers.names)
        if not all(map(math.isfinite, max_abs)):
            counts = STATS["nonfinite"](grads, layers.layout).tolist()  # sync: only once NaN/Inf appeared
        self.records.add(step, epoch, "nonfinite", dict(zip(layers.names, counts, strict=True)))

    def _push(self, stat: str, names: list[str], values: Tensor) -> None:
        self._pending.append((self.step, self.epoch, stat, names, values.float().reshape(-1)))

    def _collect(self) -> None:
        """Queue this sampled step's module statistics: layers in model order, one tensor per stat."""
        for stat, values in self._seen.items():
            if values:
                names = sorted(values, key=lambda n: self._order.get(n, -1))
                if stat == "dead_frac":  # each value is a unit_range: (lows, highs)
                    stacked = dead_of_ranges([values[n][0] for n in names], [values[n][1] for n in names])
                else:
                    stacked = torch.stack([values[n] for n in names])
                if stat == "act_rms":  # rms = norm / sqrt(numel), as stats.rms defines it
                    stacked = stacked / stacked.new_tensor([self._numel[n] for n in names]).sqrt()
                self._push(stat, names, stacked)

    # --- sampled-step module hooks -----------------------------------------------------------
    def _arm(self) -> None:
        """Register the module hooks for the coming step, only if it is sampled (fastai's ``every``)."""
        if not self._handles or not self._sampled():
            return
        self._seen = {stat: {} for stat in PROBED}
        self._armed = [module.register_forward_hook(hook) for module, hook in self._probes]

    def _disarm(self) -> None:
        for handle in self._armed:
            handle.remove()
        self._armed = []

    # --- outputs ------------------------------------------------------------------------------
    def _norm_rows(self) -> tuple[list[tuple[int, int, str, list[str]]], list[Tensor]]:
        """grad_norm and grad_rms of the pending steps: (rows, values), each pattern of layers at once."""
        rows, values = [], []
        for layers in {id(e[2]): e[2] for e in self._norms}.values():
            steps = [(step, epoch) for step, epoch, same, _ in self._norms if same is layers]
            per_tensor = torch.stack([ns for *_, same, ns in self._norms if same is layers])  # (steps, P)
            norms = layer_norms(per_tensor.T, layers.layout)  # (L, steps)
            for stat, v in (("grad_norm", norms), ("grad_rms", norms / layers.root_numel)):
                rows += [(step, epoch, stat, layers.names) for step, epoch in steps]
                values.append(v.T.reshape(-1))
        return rows, values

    def flush(self) -> None:
        """Copy pending statistics to the host in one transfer and append them to ``records``."""
        if not self._norms and not self._pending:
            return
        rows, values = self._norm_rows()
        rows += [(step, epoch, stat, names) for step, epoch, stat, names, _ in self._pending]
        values += [v for *_, v in self._pending]
        device = values[0].device
        flat = torch.cat([v.to(device) for v in values]).tolist()  # sync: the monitor's one copy per `every` steps
        i = 0
        for step, epoch, stat, names in rows:
            row = flat[i : i + len(names)]
            self.records.add_layers(step, epoch, stat, names, row)
            if stat == "grad_max_abs" and self._unchecked and self._unchecked[0] == step:
                self._count_nonfinite(row)
            i += len(names)
        self._pending, self._norms = [], []

    def log(self, epoch: int | None = None, **scalars: float) -> None:
        """Record whole-model scalars (``loss=..., accuracy=...``), e.g. once per epoch."""
        if epoch is not None:
            self.epoch = epoch
        self.flush()
        for stat, value in scalars.items():
            self.records.add(self.step, self.epoch, stat, {"": float(value)})  # sync: caller's scalars

    def frame(self):
        """The records as a pandas DataFrame (columns run, step, epoch, layer, stat, value)."""
        self.flush()
        return self.records.to_pandas()

    def diagnose(self):
        """Findings for what was recorded so far; see :func:`gradwatch.diagnose`."""
        self.flush()
        return _diagnose(self.records)

    def run(self, **fields) -> Run:
        """The records as a :class:`Run`, ready for ``Store.put_run``."""
        self.flush()
        return Run(records=self.records, **fields)

    def detach(self) -> None:
        """Remove every hook; the model then runs exactly as if it had never been watched."""
        self.flush()
        self._disarm()
        for handle in self._handles:
            handle.remove()
        self._handles, self._before, self._flat, self._updated, self._unchecked = [], None, None, False, None

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def watch(model: nn.Module, optimizer=None, every: int = 10, buffer: int = 1_000_000) -> Watcher:
    """Start recording ``model``'s per-layer gradient health; returns a :class:`Watcher`.

    Gradient norms are taken every step, everything else every ``every`` steps (see the module
    docstring). With ``optimizer`` a step is an optimizer step: gradients are read just before it
    (after clipping and DDP's all-reduce) and update-to-weight ratios are added; without one, each
    backward is a step. ``buffer`` bounds the rows kept in memory (the oldest go first).

    Examples:
        >>> with gradwatch.watch(model, optimizer) as w:
        ...     for x, y in loader:
        ...         opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        >>> print(w.diagnose())
    """
    return Watcher(model, optimizer, every, buffer)
