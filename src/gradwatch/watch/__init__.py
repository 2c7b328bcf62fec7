"""``watch(model)``: per-layer gradient health of any PyTorch model, at a cost you do not notice.

Built like fastai's ``Hook``/``HookCallback(every=...)``: small hooks composed into one handle that
detaches cleanly, with module and autograd-node hooks registered only on sampled steps (every
``every``-th step). What is read where is ``stats.STATS``: the watcher loops over its entries for
each hook point (gradients at the end of the update's last backward, their clipping, the loss
scaler's skip flag, weights before the step, the update, each layer's output and backpropagated
signal, each activation's output) and names none. Every step pays only
for the every-step entries (the per-layer gradient norm and RMS: one ``_foreach_norm`` over the
gradients, ``clip_grad_norm_``'s fast path); sampled steps add the rest. Results stay on the
tensors' device and reach the host in one copy per ``every`` steps (the monitor's one ``# sync:``),
unlike Cockpit's always-on extensions.

What keeps it cheap (``benchmarks/monitor_overhead.py``): the per-step Python is the optimizer's step
hooks and two one-line gradient hooks (first and last trainable layer) that queue one read at the
backward's end, not a hook per layer; a step's per-tensor reads are combined per layer at the flush, many
steps at once (an entry's ``parts``), and a sampled step's module hooks read one kernel's worth each,
combined for all layers at the step's end; entries that share a read (max and mean |g|) share one pass
over memory; the weights' copy before a sampled step reuses its buffer; the clip entries are not read
where nothing wrote to the gradients since the backward (their version counters); an entry with a
``proof`` (NaN/Inf counts) is read only where its proof (max |g|) is not finite.
Most of what remains is memory traffic that any exact monitor at this cadence pays: the benchmark's
``floor`` line.
"""

from __future__ import annotations

import math
import warnings
from itertools import accumulate

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd import Variable

from gradwatch.diagnose import diagnose as _diagnose
from gradwatch.records import Records, Run
from gradwatch.stats import at, clipped, read
from gradwatch.summary import summarize
from gradwatch.watch.grads import (
    Gradient,
    Patterns,
    Snapshot,
    StepReads,
    layers_of,
    loss_scales,
    optimizer_of,
    scale_version,
    unwrap,
)
from gradwatch.watch.probes import Probes

NO_OPTIMIZER = ("watch(model) without an optimizer records each backward's gradient: loss-scaled under GradScaler, "
                "partial under accumulation; pass the optimizer (and scaler) for the gradient each update applies")


class Watcher:
    """Records ``model``'s per-layer statistics (:func:`watch`); ``driven``: the caller calls ``before_step``."""

    def __init__(self, model: nn.Module, optimizer=None, every: int = 10, buffer: int = 1_000_000,
                 scaler=None, driven: bool = False):
        if every < 1:
            raise ValueError(f"every: got {every}; allowed: >= 1")
        if buffer < 1:
            raise ValueError(f"buffer: got {buffer}; allowed: >= 1")
        self.optimizer = None if optimizer is None else optimizer_of(optimizer)
        self.model, self.every, self.scaler, self._driven = model, every, scaler, driven
        self.records = Records(maxlen=buffer)
        self.step, self.epoch = 0, 0
        self._layers = layers_of(unwrap(model))
        self._names = [name for name, _ in self._layers]
        self._params = [p for _, ps in self._layers for p in ps]
        self._patterns = Patterns(self._layers)
        self._reads = StepReads()
        self._weights, self._updates, self._scaler = at("weight"), at("update"), at("scaler")
        self._latest: Gradient | None = None  # the last backward's gradient, awaiting its update
        self._scaler_version: int | None = None  # the scaler's scale tensor's version when _latest was read
        self._clipping: tuple | None = None  # (gradient, scale, scale now) for the sampled step's clip entries
        self._inverse: Tensor | None = None  # 1 / loss scale of the committed step: the signal is scaled too
        self._awaiting = False  # a step's gradient was committed and its optimizer step has not ended yet
        self._pending: list[tuple[int, int, str, list[str], Tensor]] = []  # values awaiting the flush
        self._unchecked: tuple[int, int, Gradient] | None = None  # gradients a proof may clear
        self._snapshot = Snapshot()
        self._updated, self._queued = False, False
        self._handles: list = []  # the optimizer's step hooks
        self._sentinels: list[tuple[Tensor, object]] = []  # (parameter, its hook): where a backward is noticed
        self._watching = False  # hooked: this process records (rank 0), and not detached
        # a compiled model (``torch.compile(model)``, ``model.compile()``) runs its graph, not its modules'
        # hooks: gradient and update statistics only (compile after watch: ``Probes`` turn inert)
        compiled = hasattr(model, "_orig_mod") or getattr(unwrap(model), "_compiled_call_impl", None) is not None
        modules = [] if compiled else list(unwrap(model).named_modules())
        self._probes = Probes([(name or "model", m) for name, m in modules], {n: i for i, n in enumerate(self._names)})
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return  # only rank 0 watches: gradients are all-reduced, so every rank would record the same
        self._watching = True
        if not driven:
            self._place()
        if self.optimizer is None:
            warnings.warn(NO_OPTIMIZER, stacklevel=3)
        else:  # weights old (the update's gradient is committed here unless driven); then weights new
            if not driven:
                self._handles.append(self.optimizer.register_step_pre_hook(self._on_before_step))
            self._handles.append(self.optimizer.register_step_post_hook(self._on_after_step))
        self._arm()

    # --- events -------------------------------------------------------------------------------
    def _place(self) -> None:
        """Hook the first trainable parameter of the first and of the last trainable layer (the head).

        A backward is noticed where a sentinel's gradient lands, and read once, when the whole backward
        ends (``queue_callback``, as DDP's reducer finalises its all-reduce): gradients of any layer,
        frozen ones' too once unfrozen. Two hooks, not one per layer: a Python hook costs ~9 us a step
        (44 no-op ones made a 17.8 ms MLP step 2.1% slower). A sentinel frozen later is moved at the next
        step's end; a backward that reaches neither is read at the optimizer step (``_on_before_step``).
        """
        for _, handle in self._sentinels:
            handle.remove()
        trainable = [[p for p in ps if p.requires_grad] for _, ps in self._layers]
        firsts = [ps[0] for ps in trainable if ps]
        chosen = list({id(p): p for p in (firsts[:1] + firsts[-1:])}.values())
        self._sentinels = [(p, p.register_post_accumulate_grad_hook(self._on_grad)) for p in chosen]

    def _on_grad(self, _param: Tensor) -> None:
        """A sentinel's gradient landed: read the gradients once, when the whole backward ends."""
        if not self._queued:
            self._queued = True
            Variable._execution_engine.queue_callback(self._queue_again)

    def _queue_again(self) -> None:
        """Queue the reading behind every callback queued during the backward: DDP's all-reduce ends in one."""
        Variable._execution_engine.queue_callback(self._on_backward)

    def _on_backward(self) -> None:
        """A backward ended: keep its gradient for the coming update; without an optimizer it is the step."""
        self._queued = False
        if self._latest is not None and scale_version(self.scaler) != self._scaler_version:
            self._skip()  # the scaler moved on without an optimizer step: it found Inf/NaN, skipped that update
        self._latest = self._reads.read(self._patterns, self._params, self._sampled())
        self._scaler_version = scale_version(self.scaler)
        if self.optimizer is None:
            self._commit(None)
            if self._sampled():
                self._push_all(self._names, read(self._weights, self._params, self._patterns.all.layout))
            self._finish_step()

    def _skip(self) -> None:
        """The kept gradient's update never happened: a ``scaler`` row for the step, none of its gradient."""
        self._latest, self._awaiting, self._updated, self._clipping = None, False, False, None
        self._push_all([""], read(self._scaler, torch.ones(1)))
        self._finish_step()

    def _on_before_step(self, optimizer, *_args) -> None:
        """The optimizer's step pre-hook: gradients clipped, unscaled (fused AMP: still scaled)."""
        scale, now, found_inf = loss_scales(optimizer, self.scaler)
        if self._latest is None:  # no sentinel saw a backward (none reached, or gradients set by hand)
            self._latest, scale = self._reads.read(self._patterns, self._params, self._sampled()), now
            if self._latest is not None:
                self._place()  # hook layers that do get gradients from now on
        self.before_step(scale, now=now, found_inf=found_inf)

    def before_step(self, scale: Tensor | None = None, now: Tensor | None = None,
                    found_inf: Tensor | None = None) -> None:
        """Commit the update's gradient, divided by ``scale``; ``now``, ``found_inf``: a fused optimizer's."""
        if self._awaiting:  # the last committed update's optimizer step never ran: the scaler skipped it
            self._skip()
        kept = self._latest = self._latest or self._reads.read(self._patterns, self._params, self._sampled())
        self._commit(scale)
        if found_inf is not None:
            self._push_all([""], read(self._scaler, found_inf))
        if self._sampled():
            self._clipping = None if kept is None or kept.norms is None else (kept, scale, now)
            if not self._driven:  # clipped already (driven: clipped next, so measured after the step)
                self._measure_clip()
            if self._weights or self._updates:
                self._updated = self._snapshot.take(self._patterns.of(tuple(p.requires_grad for p in self._params)))
        self._awaiting = True

    def _measure_clip(self) -> None:
        if self._clipping is not None:
            self._push_all(self._clipping[0].layers.names, self._reads.clip(*self._clipping))
            self._clipping = None

    def _on_after_step(self, *_args) -> None:
        self._awaiting = False
        self._measure_clip()
        if self._updated:
            layers, before = self._snapshot.layers, self._snapshot.weights
            with torch.no_grad():  # the weights before the step, then the step itself
                self._push_all(layers.names, read(self._weights, before, layers.layout))
                self._push_all(layers.names, read(self._updates, before, layers.params, layers.layout))
            self._updated = False
        self._finish_step()

    def _finish_step(self) -> None:
        if self._probes.armed and not self._probes.compiled:
            self._probes.disarm()
            for stat, names, values in self._probes.collect(self._inverse):
                self._push(stat, names, values)
        if self._sampled():
            self.flush()
        self.step += 1
        if not all(p.requires_grad for p, _ in self._sentinels):  # one was frozen: move it
            self._place()
        self._arm()

    def _arm(self) -> None:
        """Register the module hooks for the coming step, only if it is sampled (fastai's ``every``)."""
        if self._watching and self._sampled() and not self._probes.compiled:
            self._probes.arm(self.step)

    # --- statistics ---------------------------------------------------------------------------
    def _sampled(self) -> bool:
        return self.step % self.every == 0

    def _commit(self, scale: Tensor | None) -> None:
        """Queue the kept gradient's entries as this step's, divided by the loss scale ``scale``."""
        kept, self._latest = self._latest, None
        self._inverse = None if scale is None else 1.0 / scale  # the signal's probes read the scaled loss too
        if kept is None:
            return
        self._push_all(kept.layers.names, self._reads.commit(self.step, self.epoch, kept, self._inverse))
        if self._sampled():
            self._unchecked = (self.step, self.epoch, kept) if self._reads.proved else None

    def _prove(self, proof: str, values: list[float]) -> None:
        """Record the entries ``proof`` vouches for on the sampled step's gradients: zeros when all of
        its values are finite, else read (a second sync, in a diverging run, where speed no longer matters)."""
        step, epoch, kept = self._unchecked
        layers, grads = kept.layers, kept.grads
        finite = all(map(math.isfinite, values))
        for stat, s in self._reads.proved.items():
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
        proofs = {s.proof for s in self._reads.proved.values()}
        ends = list(accumulate(len(names) for *_, names in rows))
        # a step the scaler skipped keeps only its scaler rows: its Inf gradient never reached the weights
        skipped = {r[0] for r, end in zip(rows, ends, strict=True) if r[2] in self._scaler and flat[end - 1] > 0}
        for (step, epoch, stat, names), end in zip(rows, ends, strict=True):
            row = flat[end - len(names) : end]
            if (step in skipped and stat not in self._scaler) or (stat in self._reads.clips and not clipped(row)):
                continue
            self.records.add_layers(step, epoch, stat, names, row)
            if stat in proofs and self._unchecked and self._unchecked[0] == step:
                self._prove(stat, row)
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
        """The records as a :class:`Run`, ready for ``Store.put_run``, summarised as every producer's are
        (:func:`gradwatch.summary.summarize`: skipped updates counted there); ``summary`` adds to it."""
        self.flush()
        summary = summarize(self.records, fields.get("status", "finished"))
        return Run(records=self.records, **{**fields, "summary": {**summary, **fields.get("summary", {})}})

    def detach(self) -> None:
        """Remove every hook; the model then runs exactly as if it had never been watched."""
        if self._awaiting and self._driven:  # the last committed update's step never came: skipped
            self._skip()
        self.flush()
        self._probes.disarm()
        for handle in [*self._handles, *(h for _, h in self._sentinels)]:
            handle.remove()
        self._handles, self._sentinels, self._watching = [], [], False
        self._updated, self._unchecked, self._latest, self._awaiting = False, None, None, False
        self._snapshot = Snapshot()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def watch(model: nn.Module, optimizer=None, every: int = 10, buffer: int = 1_000_000, scaler=None) -> Watcher:
    """Start recording ``model``'s per-layer gradient health; returns a :class:`Watcher`.

    Gradient norms are taken every step, everything else every ``every`` steps (see the module
    docstring). With ``optimizer`` a step is an optimizer step, and the gradient recorded is the one
    it applies, before clipping: read at the end of the last backward before the step (so summed over
    accumulation micro-batches, and after DDP's all-reduce), divided by the loss scale (``scaler``: the
    ``torch.amp.GradScaler``, if any; a fused optimizer is handed its scale by the scaler), with the
    ``clip`` entries (after / before clipping) and update-to-weight ratios on sampled steps. An update
    the scaler skips (Inf/NaN found) is a ``scaler`` row, not a gradient. Without an optimizer each
    backward is a step, as it lands (a one-time warning says so). ``buffer`` bounds the rows kept in
    memory (the oldest go first).

    Examples:
        >>> with gradwatch.watch(model, optimizer) as w:
        ...     for x, y in loader:
        ...         opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        >>> print(w.diagnose())
    """
    return Watcher(model, optimizer, every, buffer, scaler)
