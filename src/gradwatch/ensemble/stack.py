"""Stack: E members' MLPs as stacked weights, one flat parameter buffer, feature-major activations.

Activations are (E, H, B), so every batched matmul has the batch as its wide side (MKL is about 3x
slower on (E, B, H) with 10 units). All parameters of all members live in ONE flat buffer, layer by
layer, whose per-layer (E, n) views are the autograd leaves; their gradients are views of ONE buffer
laid out alike that backward adds into in place, so an optimizer step is a few whole-buffer ops and
a per-layer statistic a view.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from gradwatch.nets import ACTIVATIONS, build
from gradwatch.spec import Spec


def spans(values: list) -> list[tuple]:
    """(value, slice) for each run of equal consecutive values: ``[a, a, b]`` -> ``[(a, 0:2), (b, 2:3)]``."""
    stops = list(itertools.accumulate(len(list(run)) for _, run in itertools.groupby(values)))
    return [(values[stop - 1], slice(start, stop)) for start, stop in zip([0, *stops[:-1]], stops, strict=True)]


class Stack:
    """E members' MLPs as stacked weights; ``forward`` maps (E, F, B) to (E, n_out, B) pre-activations.

    Storage is layer-major: one flat buffer holds, per layer (module with parameters, input to
    output), a contiguous (E, n_layer) block; a Dense layer's block is (E, out, in + 1), its weight
    with its bias as the last column, so a batched matmul against inputs with a row of ones adds the
    bias for free (fast.py) and the weight gradient lands in the gradient buffer without a copy.
    Members must come sorted by activation (``train_many`` sorts them), so that each activation
    applies to one contiguous slice of the member axis.
    """

    def __init__(self, specs: Sequence[Spec], n_in: int, n_out: int):
        rows: dict[str, list[Tensor]] = {}  # module -> each member's block
        buffers: dict[str, list[Tensor]] = {}  # batch norm's running statistics
        net = model = None
        for spec in specs:  # one net at a time: E whole nn.Modules alive at once cost more than the nets
            # torch.manual_seed's CPU part, as train.Training seeds before nets.build (the rest seeds
            # CUDA/XPU lazily and formats a stack trace per call: a fifth of this loop's time)
            torch.default_generator.manual_seed(spec.train.seed)
            if net is not None and spec.model == model:  # the previous member's net, its weights drawn anew
                net.redraw_(spec.model)
            else:
                net, model = build(spec.model, n_in, n_out), spec.model
                held = [(name, m, _augmented(m) is not None) for name, m in net.named_modules()
                        if any(True for _ in m.parameters(recurse=False))]
                floats = [(name, b) for name, b in net.named_buffers() if b.is_floating_point()]
            for name, module, dense in held:
                rows.setdefault(name, []).append(_row(module, dense))
            for name, b in floats:
                buffers.setdefault(name, []).append(b)
        E, owners = len(specs), list(rows)
        self.depth, self.norm, self.n = net.depth, specs[0].model.norm, E
        rows = {name: torch.stack(r) for name, r in rows.items()}  # (E, n)
        self.flat = torch.cat([r.reshape(-1) for r in rows.values()])  # (E * P,): every block back to back
        self.grad = torch.zeros_like(self.flat)
        self.sizes = [r.numel() for r in rows.values()]  # each layer's block, all members
        self.layers = dict(zip(owners, self.views(self.flat), strict=True))  # module -> (E, n) block
        self.grads = dict(zip(owners, self.views(self.grad), strict=True))
        self.dense = {name: self.layers[name].view(E, *_augmented(net.get_submodule(name)))
                      for name in owners if _augmented(net.get_submodule(name))}  # module -> (E, out, in + 1)
        self.p: dict[str, Tensor] = {}  # parameter name -> leaf view: (E, out, in) matrices, (E, n, 1) vectors
        for name in owners:
            for param, view, grad in zip(*self._params(net, name), strict=True):
                self.p[f"{name}.{param}"] = view.requires_grad_()
                view.grad = grad  # backward adds into the gradient buffer in place
        self.matrices = [name for name, p in net.named_parameters() if p.dim() == 2]  # Dense weights
        self.kinds = {name: type(m).__name__ for name, m in net.named_modules()}  # activations: member 0's
        self.buffers = {name: torch.stack(b) for name, b in buffers.items()}  # (E, H)
        norm = getattr(net, "norm1", None)
        self.eps, self.momentum = getattr(norm, "eps", 1e-5), getattr(norm, "momentum", 0.1)
        self.groups = spans([s.model.activation for s in specs])  # (activation, member slice)
        self.fns = {name: ACTIVATIONS[name]() for name, _ in self.groups}
        residual = torch.tensor([s.model.residual for s in specs])
        self.residual = bool(residual[0]) if residual.all() or not residual.any() else residual.view(E, 1, 1)

    def _params(self, net, name: str) -> tuple[list[str], list[Tensor], list[Tensor]]:
        """A module's parameter names with their views into the parameter and gradient blocks."""
        module, E = net.get_submodule(name), self.n
        names = [n for n, _ in module.named_parameters(recurse=False)]
        if name in self.dense:  # weight = all but the last column, bias = the last column
            aug, grad = self.dense[name], self.grads[name].view(self.dense[name].shape)
            return names, [aug[:, :, :-1], aug[:, :, -1:]], [grad[:, :, :-1], grad[:, :, -1:]]
        sizes = [p.numel() for _, p in module.named_parameters(recurse=False)]
        cut = lambda block: [v.reshape(E, -1, 1) for v in block.split(sizes, 1)]  # noqa: E731
        return names, cut(self.layers[name]), cut(self.grads[name])

    # --- the member axis across blocks ----------------------------------------------------------
    def views(self, buffer: Tensor) -> list[Tensor]:
        """One (E, n_layer) view per layer, input to output, of a buffer laid out like ``flat``."""
        return [b.view(self.n, -1) for b in buffer.split(self.sizes)]

    def member_norms(self, buffer: Tensor) -> Tensor:
        """Each member's L2 norm over all of its layers: (E,)."""
        return torch.stack([v.square().sum(1) for v in self.views(buffer)]).sum(0).sqrt()

    def member(self, buffer: Tensor, e: int) -> Tensor:
        """A copy of member ``e``'s entries of ``buffer``, in layer order."""
        return torch.cat([v[e] for v in self.views(buffer)])

    def set_member_(self, buffer: Tensor, e: int, values: Tensor | float) -> None:
        sizes = [v.shape[1] for v in self.layers.values()]
        parts = values.split(sizes) if isinstance(values, Tensor) else [values] * len(sizes)
        for view, part in zip(self.views(buffer), parts, strict=True):
            view[e] = part

    def forward(self, x: Tensor, train: bool = True, taps: dict[str, Tensor] | None = None) -> Tensor:
        """(E, F, B) -> (E, n_out, B); ``taps`` (sampled steps) collects each module's output by name."""
        p, h = self.p, x
        taps = {} if taps is None else taps
        for i in range(1, self.depth + 1):
            z = taps[f"dense{i}"] = torch.baddbmm(p[f"dense{i}.bias"], p[f"dense{i}.weight"], h)  # (E, H, B)
            if self.norm != "none":
                z = taps[f"norm{i}"] = self._normalize(i, z, train)
            a = taps[f"act{i}"] = self._activate(i, z)  # (E, H, B)
            h = self._skip(h, a)
        taps["out"] = torch.baddbmm(p["out.bias"], p["out.weight"], h)  # (E, n_out, B)
        return taps["out"]

    def _activate(self, i: int, z: Tensor) -> Tensor:
        if f"act{i}.weight" in self.p:
            return torch.where(z > 0, z, self.p[f"act{i}.weight"] * z)  # PReLU, one slope per member: (E, 1, 1)
        if len(self.groups) == 1:
            return self.fns[self.groups[0][0]](z)
        return torch.cat([self.fns[name](z[part]) for name, part in self.groups])

    def _skip(self, h: Tensor, a: Tensor) -> Tensor:
        """MLP's residual rule: add the block's input where the shapes match (from the second layer on)."""
        if self.residual is False or h.shape != a.shape:
            return a
        if self.residual is True:
            return h + a
        return torch.where(self.residual, h + a, a)  # members differ: (E, 1, 1) mask

    def _normalize(self, i: int, z: Tensor, train: bool) -> Tensor:
        E, H, B = z.shape
        w, b = self.p[f"norm{i}.weight"], self.p[f"norm{i}.bias"]  # (E, H, 1)
        if self.norm == "layer":
            return F.layer_norm(z.transpose(1, 2), (H,), eps=self.eps).transpose(1, 2) * w + b
        # one batch-norm channel per (member, unit): statistics over the B examples, running stats per member
        mean, var = self.buffers[f"norm{i}.running_mean"], self.buffers[f"norm{i}.running_var"]  # (E, H)
        y = F.batch_norm(z.reshape(1, E * H, B), mean.view(-1), var.view(-1), w.reshape(-1), b.reshape(-1),
                         train, self.momentum, self.eps)
        return y.view(E, H, B)


def _augmented(module) -> tuple[int, int] | None:
    """(out, in + 1) for a Dense layer (a 2-D weight and a bias), else None."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if isinstance(weight, Tensor) and weight.dim() == 2 and isinstance(bias, Tensor):
        return weight.shape[0], weight.shape[1] + 1
    return None


def _row(module, dense: bool) -> Tensor:
    """One member's block of a layer: [weight | bias] for a ``dense`` layer, else its parameters in order
    (detached: a copy of the values, under no autograd context, which costs more than the copy)."""
    if dense:
        return torch.cat([module.weight.detach(), module.bias.detach()[:, None]], 1).reshape(-1)
    return torch.cat([p.detach().reshape(-1) for p in module.parameters(recurse=False)])
