"""``watch(model)``: per-layer gradient health of any PyTorch model, at a cost you do not notice.

Built like fastai's ``Hook``/``HookCallback(every=...)``: small hooks composed into one handle that
detaches cleanly, with module and autograd-node hooks registered only on sampled steps (every
``every``-th step). What is read where is ``stats.STATS``: the watcher loops over its entries for
each hook point (gradients before the optimizer step, weights before it, the update, each layer's
output and backpropagated signal, each activation's output) and names none. Every step pays only
for the every-step entries (the per-layer gradient norm and RMS: one ``_foreach_norm`` over the
gradients, ``clip_grad_norm_``'s fast path); sampled steps add the rest. Results stay on the
tensors' device and reach the host in one copy per ``every`` steps (the monitor's one ``# sync:``),
unlike Cockpit's always-on extensions.

What keeps it cheap (``benchmarks/monitor_overhead.py``): with an optimizer, its step pre/post hooks
are the only per-step Python; a step's per-tensor reads are combined per layer at the flush, many
steps at once (an entry's ``parts``); entries that share a read (max and mean |g|) share one pass
over memory; the weights' copy before a sampled step reuses its buffer; an entry with a ``proof``
(NaN/Inf counts) is read only where its proof (max |g|) is not finite. Most of what remains is
memory traffic that any exact monitor at this cadence pays: the benchmark's ``floor`` line.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd import Variable

from gradwatch.diagnose import diagnose as _diagnose
from gradwatch.records import Records, Run
from gradwatch.stats import Layout, at, read
from gradwatch.watch.probes import Probes

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


class _Snapshot:
    """The weights before a sampled step, in one buffer kept between sampled steps.

    One ``cat`` into a flat buffer when the weights share a dtype and device (one copy, not one per
    parameter); ``before`` holds its per-parameter views.
    """

    def __init__(self, params: list[nn.Parameter]):
        self.params, self.before, self.flat = params, None, None

    @torch.no_grad()  # the optimizer's hooks run before its own no_grad
    def take(self) -> list[Tensor]:
        params = self.params
        if self.before is None:
            if len({(p.dtype, p.device) for p in params}) == 1:
                self.flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
                self.before = [v.view_as(p) for v, p in zip(self.flat.split([p.numel() for p in params]), params,
                                                            strict=True)]
            else:
                self.before = [torch.empty_like(p) for p in params]
        if self.flat is not None:
            torch.cat([p.reshape(-1) for p in params], out=self.flat)
        else:
            for old, p in zip(self.before, params, strict=True):
                old.copy_(p)
        return self.before


class _StepReads:
    """The every-step gradient entries: a read per step (``parts``), combined per layer at the flush,
    many steps at once: two kernel calls per step instead of eight, when each costs more than the math."""

    def __init__(self):
        self.entries = at("grad", every_step=True)
        self.steps: list[tuple[int, int, _Grads, dict]] = []  # per step: its gradients' per-tensor reads

    def add(self, step: int, epoch: int, layers: _Grads, grads: list[Tensor]) -> dict[str, Tensor]:
        """Read this step's gradients; returns the values of entries without parts, to push as they are."""
        reads, now = {}, {}
        for stat, s in self.entries.items():
            if s.parts:
                if s.parts[0] not in reads:
                    reads[s.parts[0]] = s.parts[0](grads)
            else:
                now[stat] = s.fn(grads, layers.layout)
        self.steps.append((step, epoch, layers, reads))
        return now

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
        self._params = [p for _, ps in self._layers for p in ps]
        self._all = _Grads(self._layers, (True,) * len(self._params))
        self._some: dict[tuple[bool, ...], _Grads] = {}
        self._reads, sampled = _StepReads(), at("grad", every_step=False)
        self._sampled_grads = {stat: s for stat, s in sampled.items() if not s.proof}
        self._proved = {stat: s for stat, s in sampled.items() if s.proof}  # read only when the proof fails
        self._weights, self._updates = at("weight"), at("update")
        self._pending: list[tuple[int, int, str, list[str], Tensor]] = []  # values awaiting the flush
        self._unchecked: tuple[int, int, _Grads, list[Tensor]] | None = None  # gradients a proof may clear
        self._snapshot = _Snapshot(self._params)
        self._updated, self._queued = False, False
        self._handles: list = []
        # a torch.compile'd model runs its graph, not its modules' hooks: gradient and update statistics only
        modules = [] if hasattr(model, "_orig_mod") else list(_unwrap(model).named_modules())
        self._probes = Probes([(name or "model", m) for name, m in modules], {n: i for i, n in enumerate(self._names)})
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return  # only rank 0 watches: gradients are all-reduced, so every rank would record the same
        if optimizer is None:
            self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._params]
        else:  # gradients final (clipped, all-reduced), weights old; then weights new
            self._handles = [optimizer.register_step_pre_hook(self._on_before_step),
                             optimizer.register_step_post_hook(self._on_after_step)]
        self._arm()

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
            self._push_all(self._names, read(self._weights, self._params, self._all.layout))
        self._finish_step()

    def _on_before_step(self, *_args) -> None:
        self._record_grads()
        self._updated = self._sampled() and bool(self._weights or self._updates)
        if self._updated:
            self._snapshot.take()

    def _on_after_step(self, *_args) -> None:
        if self._updated:
            before, layout = self._snapshot.before, self._all.layout
            with torch.no_grad():  # the weights before the step, then the step itself
                self._push_all(self._names, read(self._weights, before, layout))
                self._push_all(self._names, read(self._updates, before, self._params, layout))
            self._updated = False
        self._finish_step()

    def _finish_step(self) -> None:
        if self._probes.armed:
            self._probes.disarm()
            for stat, names, values in self._probes.collect():
                self._push(stat, names, values)
        if self._sampled():
            self.flush()
        self.step += 1
        self._arm()

    def _arm(self) -> None:
        """Register the module hooks for the coming step, only if it is sampled (fastai's ``every``)."""
        if self._handles and self._sampled():
            self._probes.arm(self.step)

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
        """Every step the every-step entries (``_StepReads``); sampled steps the rest."""
        layers, grads = self._grads()
        if not grads:
            return
        self._push_all(layers.names, self._reads.add(self.step, self.epoch, layers, grads))
        if self._sampled():
            self._push_all(layers.names, read(self._sampled_grads, grads, layers.layout))
            self._unchecked = (self.step, self.epoch, layers, grads) if self._proved else None

    def _prove(self, proof: str, values: list[float]) -> None:
        """Record the entries ``proof`` vouches for on the sampled step's gradients: zeros when all of
        its values are finite, else read (a second sync, in a diverging run, where speed no longer matters)."""
        step, epoch, layers, grads = self._unchecked
        finite = all(map(math.isfinite, values))
        for stat, s in self._proved.items():
            if s.proof == proof:
                counts = [0.0] * len(layers.names)
                if not finite:
                    counts = s.fn(grads, layers.layout).tolist()  # sync: only once NaN/Inf appeared
                self.records.add_layers(step, epoch, stat, layers.names, counts)

    def _push(self, stat: str, names: list[str], values: Tensor) -> None:
        self._pending.append((self.step, self.epoch, stat, names, values.float().reshape(-1)))

    def _push_all(self, names: list[str], values: dict[str, Tensor]) -> None:
        for stat, v in values.items():
            self._push(stat, names, v)

    # --- outputs ------------------------------------------------------------------------------
    def flush(self) -> None:
        """Copy pending statistics to the host in one transfer and append them to ``records``."""
        if not self._reads.steps and not self._pending:
            return
        rows, values = self._reads.rows()
        rows += [(step, epoch, stat, names) for step, epoch, stat, names, _ in self._pending]
        values += [v for *_, v in self._pending]
        self._pending = []
        if not values:
            return
        device = values[0].device
        flat = torch.cat([v.to(device) for v in values]).tolist()  # sync: the monitor's one copy per `every` steps
        proofs = {s.proof for s in self._proved.values()}
        i = 0
        for step, epoch, stat, names in rows:
            row = flat[i : i + len(names)]
            self.records.add_layers(step, epoch, stat, names, row)
            if stat in proofs and self._unchecked and self._unchecked[0] == step:
                self._prove(stat, row)
            i += len(names)
        if self._unchecked and any(r[0] == self._unchecked[0] for r in rows):
            self._unchecked = None

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
        self._probes.disarm()
        for handle in self._handles:
            handle.remove()
        self._handles, self._updated, self._unchecked = [], False, None
        self._snapshot = _Snapshot(self._params)

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
