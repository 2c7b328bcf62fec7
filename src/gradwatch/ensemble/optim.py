"""Optimizer: every member's gradient clipping and Adam or SGD step, on the stack's flat buffers at once.

Both optimizers are elementwise and clipping is per member, so running them on many members' stacked
weights is exactly what ``train.make_optimizer`` and ``train.clip_`` do to each run alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradwatch.ensemble.stack import Stack, spans
from gradwatch.spec import Spec

BETAS, EPS = (0.9, 0.999), 1e-7  # torch Adam's betas with Keras's epsilon, as train.make_optimizer


class Optimizer:
    """Clips and steps E members' weights; Adam's moments laid out like the stack's flat buffer."""

    def __init__(self, stack: Stack, specs: list[Spec]):
        self.stack, self.train_spec = stack, specs[0].train
        self.rates = spans([s.train.learning_rate for s in specs])  # (learning rate, member slice)
        self.adam = self.train_spec.optimizer == "adam"
        if self.adam:
            self.m, self.v = torch.zeros_like(stack.flat), torch.zeros_like(stack.flat)
            self.count = torch.zeros(())  # torch Adam's float32 step count

    def clip_(self) -> Tensor | None:
        """Clip each member's gradient as ``train.clip_`` does; returns its norm before clipping, (E,)."""
        g, t, total = self.stack.grad, self.train_spec, None
        if t.clip_norm is not None:
            total = self.stack.member_norms(g)  # (E,)
            coef = (t.clip_norm / (total + 1e-6)).clamp(max=1.0)[:, None]  # clip_grad_norm_'s coefficient
            for view in self.stack.views(g):
                view.mul_(coef)
        if t.clip_value is not None:
            g.clamp_(-t.clip_value, t.clip_value)
        return total

    @torch.no_grad()
    def step(self) -> None:
        """Adam (torch's fused kernel, as ``Adam(fused=True)``) or SGD, one call per run of equal learning rates."""
        stack = self.stack
        whole = len(self.rates) == 1  # one learning rate: the flat buffers themselves
        buffers = (stack.flat, stack.grad, self.m, self.v) if self.adam else (stack.flat, stack.grad)
        if self.adam:
            self.count += 1
        for lr, part in self.rates:
            ps, gs, *state = ([b] for b in buffers) if whole else ([v[part] for v in stack.views(b)] for b in buffers)
            if self.adam:
                torch._fused_adam_(ps, gs, *state, [], [self.count] * len(ps), lr=lr, beta1=BETAS[0],
                                   beta2=BETAS[1], weight_decay=0.0, eps=EPS, amsgrad=False, maximize=False)
            else:
                torch._foreach_add_(ps, gs, alpha=-lr)  # as SGD's param.add_(grad, alpha=-lr)

    def forget_(self, e: int) -> None:
        """Zero a retired member's Adam moments: Adam then moves its zeroed row by 0 / (0 + eps) = 0."""
        if self.adam:
            for state in (self.m, self.v):
                self.stack.set_member_(state, e, 0.0)
