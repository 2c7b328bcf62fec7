"""Manual: a plain stacked MLP's forward and backward by hand, in preallocated buffers.

For ensembles without norm layers or PReLU (the seed experiment and most sweeps) a step skips
autograd: the bias rides in the batched matmul (each layer's input carries a row of ones, its weight
block the bias as last column), weight gradients are written straight into the gradient buffer, and
no activation is allocated or copied twice. It computes what autograd computes, with the kernels
``nn``'s modules and their derivative formulas call (``sigmoid_backward``, ``threshold_backward``,
...; torch's derivatives.yaml), in about 60% of autograd's time for the seed's nets; its products
go through kernels.py, the small batched matmuls that are most of a step's time, which also apply
the activations and their derivatives that kernels.c has. Where it has every member's activation, there
is no skip connection and the output is a sigmoid under binary cross-entropy (the seed's nets), a step
runs whole in kernels.c, member after member (``step``; on a sampled step it also fills the buffers
the statistics read), so that a member's activations and gradients stay in cache: 0.76x of the layer
by layer step's training time.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from gradwatch.ensemble import kernels
from gradwatch.ensemble.stack import Stack

aten, nn_ops = torch.ops.aten, torch._C._nn
SELU = (1.6732632423543772848170429916717, 1.0507009873554804934193349852946)  # aten's alpha and scale

# activation module -> (forward(module, z, out), backward(module, grad, z, a, out)). An activation
# missing here trains through autograd (Stack.forward), so a new entry in nets.ACTIVATIONS needs none.
ACTS = {
    "Sigmoid": (lambda m, z, out: torch.sigmoid(z, out=out),
                lambda m, g, z, a, out: aten.sigmoid_backward.grad_input(g, a, grad_input=out)),
    "Tanh": (lambda m, z, out: torch.tanh(z, out=out),
             lambda m, g, z, a, out: aten.tanh_backward.grad_input(g, a, grad_input=out)),
    "ReLU": (lambda m, z, out: torch.clamp_min(z, 0, out=out),  # aten's relu is clamp_min(x, 0)
             lambda m, g, z, a, out: aten.threshold_backward.grad_input(g, a, 0, grad_input=out)),
    "LeakyReLU": (lambda m, z, out: nn_ops.leaky_relu(z, m.negative_slope, out=out),
                  lambda m, g, z, a, out: aten.leaky_relu_backward.grad_input(g, z, m.negative_slope, False,
                                                                              grad_input=out)),
    "ELU": (lambda m, z, out: nn_ops.elu(z, m.alpha, 1.0, 1.0, out=out),
            lambda m, g, z, a, out: aten.elu_backward.grad_input(g, m.alpha, 1.0, 1.0, False, z, grad_input=out)),
    "SELU": (lambda m, z, out: nn_ops.elu(z, *SELU, 1.0, out=out),  # aten's selu is elu(x, alpha, scale)
             lambda m, g, z, a, out: aten.elu_backward.grad_input(g, *SELU, 1.0, False, z, grad_input=out)),
    # gelu's out= variant fills a strided out (a slice of the next input) wrongly for more than one member
    "GELU": (lambda m, z, out: out.copy_(nn_ops.gelu(z, approximate=m.approximate)),
             lambda m, g, z, a, out: aten.gelu_backward.grad_input(g, z, approximate=m.approximate, grad_input=out)),
    "Identity": (lambda m, z, out: out.copy_(z), lambda m, g, z, a, out: out.copy_(g)),
}


def supports(stack: Stack) -> bool:
    """Whether ``Manual`` can train this stack: Dense layers and ACTS activations only."""
    return set(stack.layers) == set(stack.dense) and all(type(m).__name__ in ACTS for m in stack.fns.values())


class Manual:
    """Forward and backward of a Stack without autograd; one set of buffers per batch size."""

    def __init__(self, stack: Stack, n_in: int):
        self.stack, self.n_in = stack, n_in
        self.names = list(stack.dense)  # dense1 .. denseL, out
        self.blocks = [stack.dense[name] for name in self.names]  # each layer's [W | b] (E, out, in + 1)
        self.grads = [stack.grads[name].view(b.shape) for name, b in zip(self.names, self.blocks, strict=True)]
        self.sets: dict[int, dict[str, list]] = {}  # batch size -> buffers and the calls bound to them
        self.acts = [(stack.fns[name], *ACTS[type(stack.fns[name]).__name__], part) for name, part in stack.groups]
        # each member's activation as kernels.c's codes: applied inside the products, derived inside the backward
        self.forward_codes, self.backward_codes = self._codes(kernels.ACTIVATIONS), self._codes(kernels.DERIVATIVES)
        # a whole step member by member (kernels.step) needs both codes for every member and no skip connection
        self.whole = bool(self.forward_codes.all()) and torch.equal(self.forward_codes, self.backward_codes) \
            and not any(self._skips(i) for i in range(len(self.names) - 1))
        # (batch size, whether it fills the buffers) -> kernels.step's buffers and call
        self.steps: dict[tuple[int, bool], tuple[tuple[Tensor, ...], Callable[[], None] | None]] = {}

    def _codes(self, table: dict[str, int]) -> Tensor:
        """Each member's activation's code in ``table`` (E,) int8; 0 where it has none."""
        codes = torch.zeros(self.stack.n, dtype=torch.int8)
        for module, _, _, part in self.acts:
            codes[part] = table.get(type(module).__name__, 0)
        return codes

    def _buffers(self, size: int) -> dict[str, list]:
        """Per layer l: input h (E, in + 1, B) with a row of ones, output z (E, out, B), activation a,
        and the gradients dz (E, out, B) and dh (E, in, B); dL/dz of the output layer ``g``; and each
        layer's ``kernels`` calls on these buffers, its forward ``product`` and its ``backward``.

        A hidden layer's product also applies the activation of the members kernels.c has it for
        (``activate``: the others). Where no skip connection meets a layer's input, its backward also
        takes the activation's derivative likewise, writing dL/dz of the layer below (its ``dh`` is
        that ``dz``); the other members' derivatives follow in place (``derive``)."""
        if size not in self.sets:
            E, blocks, grads = self.stack.n, self.blocks, self.grads
            h = [torch.empty(E, b.shape[2], size) for b in blocks]
            for rows in h:
                rows[:, -1] = 1.0
            z = [torch.empty(E, b.shape[1], size) for b in blocks]
            # the activation goes straight into the next input unless a skip connection adds to it there
            a = [torch.empty_like(z[i]) if self._skips(i) else h[i + 1][:, :-1] for i in range(len(blocks) - 1)]
            dz = [torch.empty_like(t) for t in z[:-1]]
            fused = [i > 0 and not self._skips(i - 1) and (i == len(a) or not self._skips(i)) for i in range(len(h))]
            dh = [dz[i - 1] if fused[i] else torch.empty(E, b.shape[2] - 1, size) if i else None
                  for i, b in enumerate(blocks)]
            g = torch.empty_like(z[-1])
            starts = [*dz, g]  # layer i's backward starts from dL/dz of layer i
            self.sets[size] = {
                "h": h, "z": z, "a": a, "dz": dz, "dh": dh, "g": g,
                # [W | b] @ [h; 1], and the activation of hidden layers
                "product": [kernels.matmul(b, h[i], z[i], *((a[i], self.forward_codes) if i < len(a) else ()))
                            for i, b in enumerate(blocks)],
                # [dW | db] and, but for the first layer, dL/d(its input), or dL/dz below where fused
                "backward": [kernels.backward(starts[i], h[i], grads[i], *((b, dh[i]) if i else ()),
                                              *((a[i - 1], self.backward_codes) if fused[i] else ()))
                             for i, b in enumerate(blocks)],
                # per hidden layer, each other activation group's forward into a and backward into dz
                "activate": [[partial(forward, module, z[i][part], a[i][part])
                              for module, forward, _, part in self.acts if not self.forward_codes[part.start]]
                             for i in range(len(a))],
                "derive": [[partial(backward, module, dh[i + 1][part], z[i][part], a[i][part], dz[i][part])
                            for module, _, backward, part in self.acts
                            if not (fused[i + 1] and self.backward_codes[part.start])] for i in range(len(a))],
            }
        return self.sets[size]

    def step(self, x: Tensor, y: Tensor, scale: Tensor, taps: bool = False) -> Tensor | None:
        """A whole step of a sigmoid-output, binary cross-entropy stack, member after member in
        kernels.c (``kernels.step``), if ``whole`` and kernels.c is built, else None: from x (E, F, B),
        targets y (E, B, 1) and each member's loss weight over its batch size ``scale`` (E,), every
        gradient into ``stack.grads`` and the output's pre-activations, returned: (E, 1, B). With
        ``taps``, the buffers of ``forward`` and ``backward`` (``sets``) hold what they would have."""
        size = x.shape[2]
        if (size, taps) not in self.steps:
            E = self.stack.n
            buffers = (torch.empty(E, x.shape[1], size), torch.empty(E, size), torch.empty(E), torch.empty(E, 1, size))
            buf = self._buffers(size) if taps else None
            filled = (buf["h"], buf["z"], [*buf["dz"], buf["g"]]) if buf else None
            self.steps[size, taps] = buffers, kernels.step(self.blocks, self.grads, *buffers, self.forward_codes,
                                                           filled)
        (xs, ys, scales, out), call = self.steps[size, taps]
        if call is None:
            return None
        xs.copy_(x)
        ys.copy_(y.reshape(ys.shape))
        scales.copy_(scale)
        call()
        return out

    def _skips(self, i: int) -> bool:
        """Whether block i + 1 (dense{i+1}) adds its input back: residual members and matching widths."""
        width_in = self.n_in if i == 0 else self.stack.dense[self.names[i - 1]].shape[1]
        return self.stack.residual is not False and width_in == self.stack.dense[self.names[i]].shape[1]

    def forward(self, x: Tensor) -> dict[str, list[Tensor]]:
        """x (E, F, B) -> the buffers, the output's pre-activations in ``z[-1]``: (E, n_out, B)."""
        buf = self._buffers(x.shape[2])
        h, a = buf["h"], buf["a"]
        h[0][:, :-1].copy_(x)
        for i, product in enumerate(buf["product"]):
            product()  # z = [W | b] @ [h; 1] = W h + b
            if i == len(a):
                break
            for activate in buf["activate"][i]:
                activate()
            if self._skips(i):
                torch.add(h[i][:, :-1], a[i], out=h[i + 1][:, :-1])
                if self.stack.residual is not True:  # members differ: (E, 1, 1) mask
                    torch.where(self.stack.residual, h[i + 1][:, :-1], a[i], out=h[i + 1][:, :-1])
        return buf

    def backward(self, buf: dict[str, list[Tensor]], grad_out: Tensor) -> None:
        """From dL/dz of the output layer (E, n_out, B), every layer's [dW | db] into ``stack.grads``."""
        dh = buf["dh"]
        buf["g"].copy_(grad_out)
        carry = None
        for i in range(len(self.names) - 1, -1, -1):
            buf["backward"][i]()
            if i == 0:
                break
            if carry is not None:
                dh[i].add_(carry)
            carry = self._carry(i - 1, dh[i])
            for derive in buf["derive"][i - 1]:
                derive()

    def _carry(self, i: int, grad: Tensor) -> Tensor | None:
        """The gradient a skip connection of block i + 1 passes straight to that block's input."""
        if not self._skips(i):
            return None
        return grad if self.stack.residual is True else torch.where(self.stack.residual, grad, 0.0)
