"""Ensemble: one training loop for E stacked members, step for step what ``train.Training`` does to one.

Each step records what the watcher records for a single run, looping over the same STATS entries
per hook point on a member axis: the every-step gradient entries every ``thin``-th step; every
``every`` steps the sampled gradient entries, the weights and the update, and from the forward pass
each layer's output, its backpropagated signal and each activation's output; on each epoch's first
batch the Dense weight-matrix gradients; per epoch the loss, and (every ``evaluate_every``-th and at
a member's last) accuracy, test loss and the ``kernel`` entries (the seed's weight-change measures).
Values are kept as (layers, E) tensors (``blocks``) and turned into Records once, at the end.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import vmap

from gradwatch.data import check_output, load
from gradwatch.ensemble.fast import Manual, supports
from gradwatch.ensemble.optim import Optimizer
from gradwatch.ensemble.stack import Stack
from gradwatch.nets import OUTPUTS
from gradwatch.spec import Spec
from gradwatch.stats import Layout, activation_kinds, at, norm, read


def member_loss(loss_fn, z: Tensor, y: Tensor) -> Tensor:
    """nets.OUTPUTS's loss per member, (E,): the mean over each member's own batch of z (E, B, n_out)
    against y, from the loss's elementwise form (``reduction="none"``), one call for all members."""
    if not y.is_floating_point():  # class indices (E, B): cross-entropy takes (N, C) against (N,)
        return loss_fn(z.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)
    return loss_fn(z, y, reduction="none").flatten(1).mean(1)


# (step, epoch, stat, layer names, values (layers, members), member slice or None for all members)
Block = tuple[int, int, str, tuple[str, ...], Tensor, slice | None]


class Ensemble:
    """E members (sorted by activation) advanced an epoch at a time; ``done`` once all are retired."""

    def __init__(self, specs: list[Spec], every: int = 10, thin: int = 1, evaluate_every: int = 1):
        spec = specs[0]
        self.specs, self.train_spec = specs, spec.train
        self.every, self.thin, self.evaluate_every = every, thin, evaluate_every  # see train_many
        self.data = load(spec.data)
        check_output(self.data.task, spec.model.output_activation, spec.data.name)
        if self.data.x_train.dim() != 2:
            raise ValueError(f"data.name: got {spec.data.name!r}; allowed: tabular data for model.kind=mlp")
        self.stack = Stack(specs, self.data.x_train.shape[1], self.data.n_outputs)
        E, stack = len(specs), self.stack
        self.manual = Manual(stack, self.data.x_train.shape[1]) if supports(stack) else None  # else autograd
        self.loss_fn, self.predict = OUTPUTS[spec.model.output_activation]
        self.whole_step = (self.manual is not None and self.manual.whole and spec.model.output_activation == "sigmoid"
                           and self.data.n_outputs == 1)
        self.member_loss = partial(member_loss, self.loss_fn)  # z, y -> (E,)
        self.shared_loss = vmap(self.loss_fn, in_dims=(0, None))
        self.x = self.data.x_train.t().contiguous()  # (F, N)
        self.lr = torch.tensor([s.train.learning_rate for s in specs])[:, None, None]  # (E, 1, 1)
        self.optimizer = Optimizer(stack, specs)
        self.alive = torch.ones(E)  # (E,): 0 for retired members, whose gradients are then exactly 0
        seeds = sorted({s.train.seed for s in specs})
        self.orders = [torch.Generator().manual_seed(seed) for seed in seeds]  # one shuffle per distinct seed
        self.order_of = torch.tensor([seeds.index(s.train.seed) for s in specs])  # (E,)
        self.dense = [name for name in stack.matrices if name.endswith("weight")]
        self.dense_layers = tuple(n.rsplit(".", 1)[0] for n in self.dense)
        self.initial = {n: stack.p[n].detach().clone() for n in self.dense}  # (E, out, in) each
        self.names = tuple(stack.layers)
        # layers whose output the watcher probes for scale and backpropagated signal (not activations)
        self.signal = tuple(n for n in self.names if stack.kinds[n] not in activation_kinds())
        self.stats = {point: at(point) for point in ("weight", "update", "output", "signal", "activation",
                                                    "kernel_grad", "kernel", "clip")}  # STATS entries by hook point
        self.stats.update(step_grad=at("grad", every_step=True), sampled_grad=at("grad", every_step=False))
        self.layout = Layout.of([[v] for v in stack.views(stack.flat)], members=True)
        self.dense_layout = Layout.of([[stack.p[n]] for n in self.dense], members=True)
        self.blocks: list[Block] = []
        self.ends: list[int] = []  # len(blocks) at the end of each epoch
        self.history: dict[str, dict[int, Tensor]] = {}  # stat -> epoch -> (E,)
        self.step = self.epochs_done = 0
        self.status = ["running"] * E
        self.last_epoch = [-1] * E  # a member's last trained epoch
        self.kept: dict[int, tuple[Tensor, dict[str, Tensor]]] = {}  # retired member -> (params, buffers)

    @property
    def done(self) -> bool:
        return self.epochs_done >= self.train_spec.epochs or "running" not in self.status

    # --- one epoch ----------------------------------------------------------------------------
    def epoch(self) -> None:
        """Train one shuffled pass; members whose loss is NaN/Inf or at their stop_loss retire here."""
        n, size = self.x.shape[1], self.train_spec.batch_size
        perms = torch.stack([torch.randperm(n, generator=g) for g in self.orders])[self.order_of]  # (E, N)
        xs, ys = self.x[:, perms], self.data.y_train[perms]  # (F, E, N), (E, N, 1) or (E, N)
        losses, totals = [], []
        for start in range(0, n, size):
            part = slice(start, start + size)
            loss, total = self._step(xs[:, :, part].transpose(0, 1), ys[:, part], first=not losses)  # x: (E, F, B)
            losses.append(loss)
            totals.append(total)
        scalars = {"loss": torch.stack(losses).mean(0)}  # (E,): mean of the batch losses, as Keras reports
        if totals[0] is not None:
            scalars["grad_norm_before_clip"] = torch.stack(totals).amax(0)
        retiring = self._retire(scalars["loss"].tolist())  # sync: once per epoch, each member's loss
        measured = bool(retiring) or self.epochs_done % self.evaluate_every == 0
        if measured:
            scalars.update(self._evaluate())
        for stat, values in scalars.items():
            self._push(stat, ("",), values[None])
            self.history.setdefault(stat, {})[self.epochs_done] = values
        if measured:
            self._record_seed_measures()
        self.ends.append(len(self.blocks))
        for e in retiring:
            if self.epochs_done + 1 < self.train_spec.epochs:
                self._set_aside(e)
        self.epochs_done += 1

    def _step(self, x: Tensor, y: Tensor, first: bool) -> tuple[Tensor, Tensor | None]:
        stack, sampled = self.stack, self.step % self.every == 0
        loss, taps, grads = (self._by_hand if self.manual else self._by_autograd)(x, y, sampled)
        if first:  # the Dense weight-matrix gradients, before clipping (train._record_weight_grads)
            matrices = [stack.p[n].grad for n in self.dense]
            self._read("kernel_grad", self.dense_layers, matrices, self.dense_layout)
        self._record_grads(sampled)  # before clipping: the gradient the update applies, as the watcher records it
        views, t = stack.views(stack.grad), self.train_spec
        clips = sampled and self.stats["clip"] and (t.clip_norm is not None or t.clip_value is not None)
        before = norm(views, self.layout, members=True) if clips else None
        total = self.optimizer.clip_()
        if before is not None:  # clip_ scaled the views in place: their norm now is after clipping
            self._read("clip", self.names, before, norm(views, self.layout, members=True))
        if sampled:
            self._record_taps(taps, grads)
        before = stack.flat.clone() if sampled and (self.stats["weight"] or self.stats["update"]) else None
        self.optimizer.step()
        if before is not None:  # the weights before the step, as the watcher's, then the step itself
            old = stack.views(before)
            self._read("weight", self.names, old, self.layout)
            self._read("update", self.names, old, stack.views(stack.flat), self.layout)
        self.step += 1
        return loss.detach(), total

    def _by_autograd(self, x: Tensor, y: Tensor, sampled: bool) -> tuple[Tensor, dict, dict]:
        """Loss (E,) and, on sampled steps, module outputs and dL/d(output) by name; gradients in stack.grad."""
        taps: dict[str, Tensor] | None = {} if sampled else None
        z = self.stack.forward(x, True, taps)  # (E, n_out, B)
        loss = self.member_loss(z.transpose(1, 2), y)  # (E,)
        for name in self.signal if sampled else ():
            taps[name].retain_grad()
        self.stack.grad.zero_()
        (loss * self.alive).sum().backward()
        return loss, taps, {name: taps[name].grad for name in self.signal} if sampled else {}

    def _by_hand(self, x: Tensor, y: Tensor, sampled: bool) -> tuple[Tensor, dict, dict]:
        """``_by_autograd``'s results from fast.Manual; autograd only for the loss, or none at all where
        a whole step runs in kernels.c (sigmoid-output nets that it has)."""
        z = self.manual.step(x, y, self.alive / x.shape[2], sampled) if self.whole_step else None
        if z is not None:
            loss = self.member_loss(z.transpose(1, 2), y)
        else:
            buf = self.manual.forward(x)
            z = buf["z"][-1].detach().requires_grad_()  # (E, n_out, B): a leaf over the output buffer
            loss = self.member_loss(z.transpose(1, 2), y)  # (E,)
            (loss * self.alive).sum().backward()
            self.manual.backward(buf, z.grad)
        if not sampled:
            return loss, {}, {}
        buf, names = self.manual.sets[x.shape[2]], self.manual.names
        taps = {**dict(zip(names, buf["z"], strict=True)),
                **{f"act{i}": a for i, a in enumerate(buf["a"], 1)}}
        return loss, taps, {**dict(zip(names, buf["dz"], strict=False)), "out": buf["g"]}

    # --- statistics -------------------------------------------------------------------------------
    def _push(self, stat: str, names: tuple[str, ...], values: Tensor, part: slice | None = None) -> None:
        self.blocks.append((self.step, self.epochs_done, stat, names, values.detach(), part))

    def _read(self, point: str, names: tuple[str, ...], *args) -> None:
        """Push every STATS entry of ``point`` (``self.stats``' key) read from ``args`` on all members."""
        for stat, values in read(self.stats[point], *args, members=True).items():
            self._push(stat, names, values)

    def _record_grads(self, sampled: bool) -> None:
        grads = self.stack.views(self.stack.grad)  # (E, n_layer) each
        if self.step % self.thin == 0:
            self._read("step_grad", self.names, grads, self.layout)
        if sampled:
            self._read("sampled_grad", self.names, grads, self.layout)

    def _record_taps(self, taps: dict[str, Tensor], grads: dict[str, Tensor]) -> None:
        """Sampled-step forward/backward statistics, taken where the watcher's module hooks take them."""
        outs = [taps[n].detach() for n in self.signal]
        layout = Layout.of([[o] for o in outs], members=True)
        self._read("output", self.signal, outs, layout)
        self._read("signal", self.signal, [grads[n] for n in self.signal], layout)
        acts = tuple(f"act{i}" for i in range(1, self.stack.depth + 1))
        for name, part in self.stack.groups if acts else ():
            kind = type(self.stack.fns[name]).__name__
            outputs = [taps[a].detach()[part].transpose(1, 2) for a in acts]  # (E_part, B, H): features last
            for stat, s in self.stats["activation"].items():
                if kind in s.kinds:
                    self._push(stat, acts, s.fn(outputs, [s.kinds[kind]] * len(acts), members=True), part)

    @torch.no_grad()
    def _evaluate(self) -> dict[str, Tensor]:
        """Training-set accuracy and test loss/accuracy per member, in eval mode (batch norm's running stats)."""
        data, out = self.data, {}
        n = len(data.x_train)
        both = self.predictions(torch.cat([data.x_train, data.x_test])).transpose(1, 2)  # (E, N + N_test, n_out)
        for split, z, y in (("", both[:, :n], data.y_train), ("test_", both[:, n:], data.y_test)):
            if split:
                out["test_loss"] = self.shared_loss(z, y)
            if data.task != "regression":
                out[f"{split}accuracy"] = (self.predict(z) == y).float().flatten(1).mean(1)
        return out

    @torch.no_grad()
    def predictions(self, x: Tensor, chunk: int = 256) -> Tensor:
        """Every member's pre-activations on the same inputs (N, F), in eval mode: (E, n_out, N).

        In chunks of examples, so no activation outgrows the cache (and glibc's mmap threshold). By
        hand where the step is (no norm layers: train and eval mode agree), in chunks of a training
        batch through the step's own buffers, the last one padded with zeros: half the time of
        ``Stack.forward`` in chunks of 256 or 64 (107-127 against 149-325 ms for an evaluation and a
        decision boundary of 512 seed nets).
        """
        xs = x.t()[None].expand(self.stack.n, -1, -1)  # (E, F, N), one copy shared by all members
        if self.manual is None:
            return torch.cat([self.stack.forward(xs[:, :, i : i + chunk], train=False)
                              for i in range(0, len(x), chunk)], 2)
        size, parts = self.train_spec.batch_size, []
        for i in range(0, len(x), size):
            part = xs[:, :, i : i + size]
            parts.append(self.manual.forward(F.pad(part, (0, size - part.shape[2])))["z"][-1].clone())
        return torch.cat(parts, 2)[:, :, : len(x)]

    @torch.no_grad()
    def _record_seed_measures(self) -> None:
        """The ``kernel`` entries per Dense layer since the start: the seed's measures and a weight trace."""
        start, now = [self.initial[n] for n in self.dense], [self.stack.p[n] for n in self.dense]  # (E, out, in)
        self._read("kernel", self.dense_layers, start, now, self.lr)

    # --- retiring members -------------------------------------------------------------------------
    def _retire(self, losses: list[float]) -> list[int]:
        """Members that stop at this epoch, as ``train`` would: NaN/Inf (diverged), stop_loss or last epoch."""
        last = self.epochs_done + 1 >= self.train_spec.epochs
        retiring = []
        for e, (spec, loss) in enumerate(zip(self.specs, losses, strict=True)):
            if self.status[e] != "running":
                continue
            self.last_epoch[e] = self.epochs_done
            stop = spec.train.stop_loss
            if not math.isfinite(loss):
                self.status[e] = "diverged"
            elif last or (stop is not None and loss <= stop):
                self.status[e] = "finished"
            else:
                continue
            retiring.append(e)
        return retiring

    @torch.no_grad()
    def _set_aside(self, e: int) -> None:
        """Keep a retired member's state for its summary; zero its row so it computes harmless zeros."""
        stack = self.stack
        self.kept[e] = (stack.member(stack.flat, e), {k: b[e].clone() for k, b in stack.buffers.items()})
        stack.set_member_(stack.flat, e, 0.0)  # finite, so the zero gradient that reaches it stays exactly 0
        self.alive[e] = 0
        self.optimizer.forget_(e)

    @torch.no_grad()
    def restore(self) -> None:
        """Put every retired member's kept state back, for the summary and decision boundary."""
        for e, (flat, buffers) in self.kept.items():
            self.stack.set_member_(self.stack.flat, e, flat)
            for k, b in buffers.items():
                self.stack.buffers[k][e] = b
