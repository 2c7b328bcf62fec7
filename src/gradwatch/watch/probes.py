"""Probes: the watcher's sampled-step module hooks, which read the STATS entries a step's forward and
backward pass offer: each layer's output and its backpropagated signal, each activation's output, and
a recurrent net's signal at each time step."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from gradwatch.stats import Layout, Stat, activation_kinds, at, read

CELLS = (nn.RNNCellBase,)  # called once per time step: each call's output is h_t
FUSED = (nn.RNNBase,)  # nn.RNN/GRU/LSTM: one call for the whole sequence, h_t inside the kernel


class Probes:
    """The sampled-step module hooks: each layer's output and dL/d(output), each activation's output.

    A forward hook per layer (a module that owns parameters) and per module some ``activation``
    entry reads, registered only for a sampled step (fastai's ``HookCallback(every=...)``); each
    hook reads its module's pieces for the ``output``, ``signal`` and ``activation`` entries of
    STATS, and ``collect`` combines them per entry, layers in model order. The first recurrent
    module in model order also gets a ``state_signal`` hook: the signal at each time step t.
    """

    def __init__(self, modules: list[tuple[str, nn.Module]], order: dict[str, int]):
        self.points = {point: at(point) for point in ("output", "signal", "state_signal")}
        self.entries = {**self.points["output"], **self.points["signal"], **at("activation")}
        self.order = order
        kinds = activation_kinds()
        self.hooks = []
        for name, module in modules:
            kind = type(module).__name__
            if kind in kinds:
                reads = {stat: s for stat, s in at("activation").items() if kind in s.kinds}
                self.hooks.append((module, partial(self._on_activation, name, kind, reads)))
            elif name in order:
                self.hooks.append((module, partial(self._on_forward, name)))
        recurrent = [m for _, m in modules if isinstance(m, CELLS + FUSED)][:1] if self.points["state_signal"] else []
        self.hooks += [(m, self._on_cell) for m in recurrent if isinstance(m, CELLS)]
        self.pre_hooks = [(m, self._on_sequence) for m in recurrent if isinstance(m, FUSED)]
        self.states: dict[int, Tensor] = {}  # time step -> its signal, as backward reaches it
        self.calls = 0  # the recurrent cell's calls this step: its time steps
        self.armed: list = []
        self.compiled = False  # a torch.compile trace ran these hooks: left attached, inert, for good
        self.step: int | None = None
        self.pieces: dict[str, dict[str, object]] = {}
        self.seen: set[tuple[str, str]] = set()
        self.sizes: dict[tuple[str, str], int] = {}  # (point, layer) -> elements of the tensor read there
        self.layouts: dict[tuple, Layout] = {}  # by those sizes in model order, and device

    def arm(self, step: int) -> None:
        self.step, self.seen, self.states, self.calls = step, set(), {}, 0
        self.pieces = {stat: {} for stat in self.entries}
        self.armed = [module.register_forward_hook(hook) for module, hook in self.hooks]
        self.armed += [module.register_forward_pre_hook(hook) for module, hook in self.pre_hooks]

    def disarm(self) -> None:
        for handle in self.armed:
            handle.remove()
        self.armed, self.step = [], None

    def _first(self, name: str, where: str, forward: bool = True) -> bool:
        """Only a step's first call is read (an unrolled RNN cell: its first time step, the gradient
        that travelled furthest back), and a forward only under autograd, so an evaluation pass is not.

        Never inside a torch.compile trace: a probe would break the graph, and hooks that come and go
        recompile it, so once traced they all stay attached and inert (the unwatched model's graphs).
        """
        if torch.compiler.is_compiling():
            self.compiled = True  # a write: dynamo guards on what a trace reads, not on this
            return False
        if self.compiled or (name, where) in self.seen or (forward and not torch.is_grad_enabled()):
            return False
        self.seen.add((name, where))
        return True

    def _one(self, point: str, name: str, t: Tensor) -> None:
        """Each ``point`` entry's read on one layer's tensor, combined for all layers at once in ``collect``
        (one kernel per entry here, not the five of a whole ``fn``: 41 such hooks run on an MLP's sampled step)."""
        t, shared = t.float(), {}  # float: fp16 norms overflow
        self.sizes[point, name] = t.numel()
        for stat, s in self.points[point].items():
            if s.parts is None:  # the whole fn, on this one layer: (1,)
                self.pieces[stat][name] = s.fn([t], self._layout((t.numel(),), t.device))
                continue
            if s.parts[0] not in shared:
                shared[s.parts[0]] = s.parts[0]([t])
            self.pieces[stat][name] = shared[s.parts[0]]

    def _layout(self, sizes: tuple[int, ...], device: torch.device) -> Layout:
        """One tensor per layer, of these element counts; built once per pattern."""
        if (sizes, device) not in self.layouts:
            numel = torch.tensor(sizes, dtype=torch.float32, device=device)
            self.layouts[sizes, device] = Layout(torch.arange(len(sizes), device=device), numel, len(sizes), True)
        return self.layouts[sizes, device]

    def _on_forward(self, name: str, _module, _inputs, output) -> None:
        """A layer's output: its statistics now, and a hook on the autograd node that made it."""
        out = output[0] if isinstance(output, tuple) else output
        if not isinstance(out, Tensor) or not self._first(name, "output"):
            return
        self._one("output", name, out.detach())
        if out.grad_fn is not None:  # a node pre-hook: lighter than Tensor.register_hook
            out.grad_fn.register_prehook(partial(self._on_signal, name, self.step, out.output_nr))

    def _on_signal(self, name: str, step: int, index: int, grads: tuple[Tensor | None, ...]) -> None:
        """dL/d(layer output) arrived during backward: the backpropagated signal itself."""
        grad = grads[index]
        if step == self.step and grad is not None and self._first(name, "signal", forward=False):
            self._one("signal", name, grad)

    def _on_cell(self, _module, _inputs, output) -> None:
        """A recurrent cell's call t: dL/dh_t on h_t (an LSTM's first output), the whole signal reaching
        step t, since h_t feeds both the next step and whatever reads it (Pascanu et al. 2013)."""
        out = output[0] if isinstance(output, tuple) else output
        if self.compiled or torch.compiler.is_compiling() or not torch.is_grad_enabled() or out.grad_fn is None:
            return
        out.grad_fn.register_prehook(partial(self._on_state, self.step, self.calls, out.output_nr, None))
        self.calls += 1

    def _on_sequence(self, module, inputs):
        """A fused nn.RNN/GRU/LSTM keeps h_t inside its kernel: dL/dx_t, the signal that reached input step t
        through the recurrence, stands in for it. A data input (no graph behind it) is made a leaf that
        asks for its gradient; an input with a graph keeps it (a node hook reads its gradient); a leaf
        the user asked gradients of is left alone (a hook on it would outlive the step)."""
        x = inputs[0] if inputs else None
        if (not isinstance(x, Tensor) or x.dim() != 3 or self.compiled or torch.compiler.is_compiling()
                or not torch.is_grad_enabled() or self.calls or (x.requires_grad and x.grad_fn is None)):
            return None
        self.calls = 1
        time_axis = 1 if module.batch_first else 0
        if x.grad_fn is None:
            x = x.detach().requires_grad_()
            x.register_hook(partial(self._on_state, self.step, 0, 0, time_axis))
            return (x, *inputs[1:])
        x.grad_fn.register_prehook(partial(self._on_state, self.step, 0, x.output_nr, time_axis))
        return None

    def _on_state(self, step: int, t: int, index: int, time_axis: int | None, grads) -> None:
        """A time step's signal arrived in backward (a fused module's: every step's at once, split on time)."""
        grad = grads[index] if isinstance(grads, tuple) else grads
        if step != self.step or grad is None:
            return
        if time_axis is None:
            self.states[t] = grad.detach()
        else:
            self.states.update(enumerate(grad.detach().unbind(time_axis)))

    def _on_activation(self, name: str, kind: str, reads: dict[str, Stat], _module, _inputs, output) -> None:
        if not isinstance(output, Tensor) or not self._first(name, "activation"):
            return
        out = output.detach()
        out = out.movedim(1, -1) if out.dim() > 3 else out  # a conv's units are its channels, on axis 1
        for stat, s in reads.items():  # a piece now, combined for all layers at once in collect
            param = s.kinds[kind]
            self.pieces[stat][name] = s.parts[0](out, param) if s.parts else s.fn([out], [param])[0]

    def collect(self, inverse: Tensor | None = None) -> list[tuple[str, list[str], Tensor]]:
        """(stat, layer names in model order, values) of each entry read on the armed step; the ``signal``
        entries (dL/d(output) of the loss-scaled loss: linear in it) times ``inverse``, 1 / loss scale."""
        out = []
        for stat, pieces in self.pieces.items():
            if pieces:
                names = sorted(pieces, key=lambda n: self.order.get(n, -1))
                s, values = self.entries[stat], [pieces[n] for n in names]
                if s.point == "activation":
                    combined = s.parts[1](values) if s.parts else torch.stack(values)
                elif s.parts:  # (L,) reads of one tensor per layer
                    layout = self._layout(tuple(self.sizes[s.point, n] for n in names), values[0].device)
                    combined = s.parts[1](torch.cat(values), layout)
                else:
                    combined = torch.cat(values)
                if inverse is not None and s.point == "signal":
                    combined = combined * inverse
                out.append((stat, names, combined))
        if self.states:
            grads = [self.states[t].float() for t in sorted(self.states)]
            names = [f"t{t}" for t in sorted(self.states)]
            layout = Layout.of([[g] for g in grads])
            scale = 1.0 if inverse is None else inverse
            out += [(stat, names, value * scale) for stat, value in read(self.points["state_signal"], grads,
                                                                          layout).items()]
        return out
