"""Stack: E members' MLPs as stacked weights, one (E, P) parameter buffer, feature-major activations.

Activations are (E, H, B), so every batched matmul has the batch as its wide side (MKL is about 3x
slower on (E, B, H) with 10 units). All parameters of all members live in ONE (E, P) buffer whose
per-layer views are the autograd leaves; their gradients are views of ONE (E, P) buffer that backward
adds into in place, so an optimizer step is a few whole-buffer ops and a per-layer statistic a view.
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

    Members must come sorted by activation (``train_many`` sorts them), so that each activation
    applies to one contiguous slice of the member axis.
    """

    def __init__(self, specs: Sequence[Spec], n_in: int, n_out: int):
        nets = []
        for spec in specs:
            torch.manual_seed(spec.train.seed)  # as train.Training does before nets.build
            nets.append(build(spec.model, n_in, n_out))
        net, E = nets[0], len(nets)
        self.depth, self.norm, self.n = net.depth, specs[0].model.norm, E
        self.flat = torch.stack([torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in nets])  # (E, P)
        self.grad = torch.zeros_like(self.flat)  # (E, P)
        self.p: dict[str, Tensor] = {}  # parameter name -> leaf view: (E, out, in) matrices, (E, n, 1) vectors
        self.layers: dict[str, slice] = {}  # module name -> its columns of flat, input to output
        self.matrices = [name for name, p in net.named_parameters() if p.dim() == 2]  # Dense weights
        self.kinds = {name: type(m).__name__ for name, m in net.named_modules()}  # activations: member 0's
        start = 0
        for name, param in net.named_parameters():
            stop = start + param.numel()
            shape = (E, *param.shape) if param.dim() == 2 else (E, param.numel(), 1)
            self.p[name] = self.flat[:, start:stop].view(shape).requires_grad_()
            self.p[name].grad = self.grad[:, start:stop].view(shape)  # backward adds into it in place
            module = name.rsplit(".", 1)[0]
            self.layers[module] = slice(self.layers.get(module, slice(start, stop)).start, stop)
            start = stop
        self.buffers = {name: torch.stack([dict(m.named_buffers())[name] for m in nets])  # (E, H)
                        for name, b in net.named_buffers() if b.is_floating_point()}
        norm = getattr(net, "norm1", None)
        self.eps, self.momentum = getattr(norm, "eps", 1e-5), getattr(norm, "momentum", 0.1)
        self.groups = spans([s.model.activation for s in specs])  # (activation, member slice)
        self.fns = {name: ACTIVATIONS[name]() for name, _ in self.groups}
        residual = torch.tensor([s.model.residual for s in specs])
        self.residual = bool(residual[0]) if residual.all() or not residual.any() else residual.view(E, 1, 1)

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

    def views(self, buffer: Tensor) -> list[Tensor]:
        """One (E, n_layer) view of an (E, P) buffer per layer, input to output."""
        return [buffer[:, part] for part in self.layers.values()]
