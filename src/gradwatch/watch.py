"""``watch(model)``: per-layer gradient health of any PyTorch model, at a cost you do not notice.

Built like fastai's ``Hook``/``HookCallback(every=...)``: small hooks composed into one handle that
detaches cleanly, with forward/backward module hooks registered only on sampled steps. Cheap
statistics (per-layer gradient norm and RMS) are taken every step; the rest (backpropagated signal,
activation scale, saturation, dead units, max/mean |g|, NaN/Inf counts, update-to-weight ratio)
every ``every`` steps. Results stay on the tensors' device and are copied to the host once per
``every`` steps (the only ``# sync:`` of the monitor), unlike Cockpit's always-on extensions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd import Variable

from gradwatch.diagnose import diagnose as _diagnose
from gradwatch.nets import RECTIFIERS, SATURATING
from gradwatch.records import Records, Run
from gradwatch.stats import STATS, Layout


def _layers(model: nn.Module) -> list[tuple[str, nn.Module, list[nn.Parameter]]]:
    """(name, module, trainable params it owns) per module, each shared parameter counted once."""
    seen: set[int] = set()
    out = []
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            out.append((name.removeprefix("_orig_mod.").removeprefix("module.") or "model", module, params))
    return out


class Watcher:
    """Records per-layer statistics of ``model`` into ``self.records``; see :func:`watch`."""

    def __init__(self, model: nn.Module, optimizer=None, every: int = 10, buffer: int = 1_000_000):
        if every < 1:
            raise ValueError(f"every: got {every}; allowed: >= 1")
        self.model, self.optimizer, self.every = model, optimizer, every
        self.records = Records(maxlen=buffer)
        self.step, self.epoch = 0, 0
        self._layers = _layers(model)
        self._names = [name for name, _, _ in self._layers]
        self._params = [p for _, _, ps in self._layers for p in ps]
        self._layout = Layout.of([ps for _, _, ps in self._layers]) if self._layers else None
        self._single: dict[torch.device, Layout] = {}
        self._layout_cache: dict[tuple[bool, ...], tuple[list[str], Layout]] = {}
        self._pending: list[tuple[int, int, str, list[str], Tensor]] = []
        self._sampled_hooks: list = []
        self._before: list[Tensor] | None = None
        self._queued = False
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for _, _, ps in self._layers for p in ps]
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._on_before_step))
            self._handles.append(optimizer.register_step_post_hook(self._on_after_step))
        self._arm()

    # --- events -------------------------------------------------------------------------------
    def _on_grad(self, _param: Tensor) -> None:
        """Any parameter's gradient landed: run ``_on_backward`` once, when the whole backward ends."""
        if not self._queued:
            self._queued = True
            Variable._execution_engine.queue_callback(self._on_backward)

    def _on_backward(self) -> None:
        """Gradients are final (DDP: pass the optimizer to read them after all-reduce instead)."""
        self._queued = False
        if self.optimizer is None:
            self._record_grads()
            self._finish_step()

    def _on_before_step(self, *_args) -> None:
        self._record_grads()
        if self._sampled():
            self._before = [p.detach().clone() for p in self._params]

    def _on_after_step(self, *_args) -> None:
        if self._before is not None:
            after = [p.detach() for p in self._params]
            self._push("update_ratio", self._names, STATS["update_ratio"](self._before, after, self._layout))
            self._before = None
        self._finish_step()

    def _finish_step(self) -> None:
        self._disarm()
        if self._sampled():
            self.flush()
        self.step += 1
        self._arm()

    # --- statistics ---------------------------------------------------------------------------
    def _sampled(self) -> bool:
        return self.step % self.every == 0

    def _grads(self) -> tuple[list[str], Layout, list[Tensor]]:
        has = tuple(p.grad is not None for p in self._params)
        if has not in self._layout_cache:  # parameters without a gradient this step are left out
            flags = iter(has)
            groups = [(n, [p for p in ps if next(flags)]) for n, _, ps in self._layers]
            groups = [(n, ps) for n, ps in groups if ps]
            layout = Layout.of([ps for _, ps in groups]) if groups else None
            self._layout_cache[has] = ([n for n, _ in groups], layout)
        names, layout = self._layout_cache[has]
        grads = [p.grad for p in self._params if p.grad is not None]
        return names, layout, grads

    def _record_grads(self) -> None:
        names, layout, grads = self._grads()
        if not grads:
            return
        norms = STATS["grad_norm"](grads, layout)
        self._push("grad_norm", names, norms)
        self._push("grad_rms", names, norms / layout.numel.sqrt())
        if self._sampled():
            for stat in ("grad_max_abs", "grad_mean_abs", "nonfinite"):
                self._push(stat, names, STATS[stat](grads, layout))
            weights = [p.detach() for p in self._params]
            self._push("weight_norm", self._names, STATS["weight_norm"](weights, self._layout))

    def _push(self, stat: str, names: list[str], values: Tensor) -> None:
        self._pending.append((self.step, self.epoch, stat, names, values.detach().float().reshape(-1)))

    # --- sampled-step module hooks -----------------------------------------------------------
    def _arm(self) -> None:
        """Register forward hooks for the coming step, only if it is sampled (fastai's ``every``)."""
        if not self._sampled():
            return
        for name, module in self.model.named_modules():
            name = name.removeprefix("_orig_mod.").removeprefix("module.")
            kind = type(module).__name__
            if kind in SATURATING or kind in RECTIFIERS:
                self._sampled_hooks.append(module.register_forward_hook(self._activation_hook(name, kind)))
            elif name in self._names:
                self._sampled_hooks.append(module.register_forward_hook(self._signal_hook(name)))

    def _disarm(self) -> None:
        for handle in self._sampled_hooks:
            handle.remove()
        self._sampled_hooks = []

    def _activation_hook(self, name: str, kind: str):
        def hook(_module, _inputs, output):
            if not isinstance(output, Tensor):
                return
            out = output.detach()
            if kind in SATURATING:
                self._push("saturated_frac", [name], STATS["saturated_frac"]([out], [SATURATING[kind]]))
            else:
                self._push("dead_frac", [name], STATS["dead_frac"]([out]))

        return hook

    def _signal_hook(self, name: str):
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            if not isinstance(out, Tensor):
                return
            if out.device not in self._single:
                self._single[out.device] = Layout.of([[out]])
            single = self._single[out.device]
            self._push("act_rms", [name], STATS["act_rms"]([out.detach()], single))
            if out.requires_grad:
                out.register_hook(lambda g: self._push("backprop_norm", [name], STATS["backprop_norm"]([g], single)))

        return hook

    # --- outputs ------------------------------------------------------------------------------
    def flush(self) -> None:
        """Copy pending statistics to the host in one transfer and append them to ``records``."""
        if not self._pending:
            return
        # sync: the monitor's one host copy, once per `every` steps
        flat = torch.cat([v for _, _, _, _, v in self._pending]).tolist()
        i = 0
        for step, epoch, stat, names, v in self._pending:
            self.records.add(step, epoch, stat, dict(zip(names, flat[i : i + v.numel()], strict=True)))
            i += v.numel()
        self._pending = []

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
        self._handles = []

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def watch(model: nn.Module, optimizer=None, every: int = 10, buffer: int = 1_000_000) -> Watcher:
    """Start recording ``model``'s per-layer gradient health; returns a :class:`Watcher`.

    Gradient norms are taken after every backward; with ``optimizer`` they are taken just before
    its step (so DDP gradients are read after all-reduce) and update-to-weight ratios are added.
    ``buffer`` bounds the rows kept in memory.

    Examples:
        >>> with gradwatch.watch(model, optimizer) as w:
        ...     for x, y in loader:
        ...         opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        >>> print(w.diagnose())
    """
    return Watcher(model, optimizer, every, buffer)
