"""Mean-field signal propagation through a deep random net: how deep a net of a given init can train.

A layer is z = W h + b with W ~ (0, sigma_w2 / fan_in) and b ~ N(0, sigma_b2) (Poole et al. 2016,
Schoenholz et al. 2017, "Deep Information Propagation"). In the wide limit every pre-activation is
Gaussian, so a few one- and two-dimensional Gaussian integrals (Gauss-Hermite quadrature) say:

* the length map q -> sigma_w2 E[phi(sqrt(q) z)^2] + sigma_b2 and its fixed point q*;
* chi_1 = sigma_w2 E[phi'(sqrt(q*) z)^2]: the factor by which a backpropagated squared gradient
  norm changes per layer (order for chi_1 < 1, chaos for chi_1 > 1, the edge of chaos at chi_1 = 1);
* the correlation map of two inputs, its fixed point c*, and the depth scales xi_q and xi_c over
  which a length and a correlation approach their fixed points. Information about the input, hence
  trainability, survives about 6 xi_c layers; xi_c diverges at the edge of chaos.

``phi`` is any activation module of ``nets.ACTIVATIONS`` that accepts float64 tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

Activation = Callable[[torch.Tensor], torch.Tensor]
NODES = 80  # Gauss-Hermite nodes per axis; even, so none sits on the kink at 0 of ReLU-like activations
Q_MAX = 1e12  # a length that grows past this has no fixed point (ReLU above He's sigma_w2 = 2)


def _hermite() -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes z and weights w with sum(w f(z)) = E[f(Z)], Z ~ N(0, 1)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(NODES)
    return torch.tensor(nodes), torch.tensor(weights / weights.sum())


Z, W = _hermite()  # (NODES,) each, float64


def derivatives(phi: Activation, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """phi(u), phi'(u) and phi''(u) by autograd (exact for the piecewise activations, 0 on their kinks)."""
    u = u.detach().requires_grad_()
    out = phi(u)
    (slope,) = torch.autograd.grad(out.sum(), u, create_graph=True)
    curve = torch.autograd.grad(slope.sum(), u, allow_unused=True)[0] if slope.requires_grad else None
    return out.detach(), slope.detach(), torch.zeros_like(u) if curve is None else curve.detach()


def expect(fn: Callable[[torch.Tensor], torch.Tensor], q: float) -> float:
    """E[fn(sqrt(q) Z)] for Z ~ N(0, 1)."""
    return float((W * fn(math.sqrt(q) * Z)).sum().detach())  # detach: PReLU's slope is a parameter


def mu(phi: Activation, q: float, k: int = 1) -> float:
    """E[phi'(u)^(2k)], u ~ N(0, q): the moments of D^2, the squared slope a layer applies."""
    return expect(lambda u: derivatives(phi, u)[1] ** (2 * k), q)


def length_map(phi: Activation, sigma_w2: float, sigma_b2: float, q: float) -> float:
    """The next layer's pre-activation variance q_{l+1} from q_l."""
    return sigma_w2 * expect(lambda u: phi(u) ** 2, q) + sigma_b2


def q_star(phi: Activation, sigma_w2: float, sigma_b2: float, q: float = 1.0, steps: int = 500) -> float:
    """The length map's fixed point q*, iterated from ``q`` (capped at Q_MAX where it diverges)."""
    for _ in range(steps):
        nxt = min(length_map(phi, sigma_w2, sigma_b2, q), Q_MAX)
        if abs(nxt - q) <= 1e-13 * max(q, 1e-12):
            return nxt
        q = max(nxt, 1e-300)
    return q


def chi_1(phi: Activation, sigma_w2: float, sigma_b2: float) -> float:
    """sigma_w2 E[phi'(u)^2], u ~ N(0, q*): the per-layer factor of a backpropagated squared gradient norm."""
    return sigma_w2 * mu(phi, q_star(phi, sigma_w2, sigma_b2))


def _pair(q: float, c: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pre-activations (u1, u2) with variance q and correlation c on the 2-D grid, and its weights."""
    z1, z2 = Z[:, None], Z[None, :]
    u1 = math.sqrt(q) * z1.expand(NODES, NODES)
    u2 = math.sqrt(q) * (c * z1 + math.sqrt(max(1 - c * c, 0.0)) * z2)
    return u1, u2, W[:, None] * W[None, :]


def correlation_map(phi: Activation, sigma_w2: float, sigma_b2: float, c: float, q: float | None = None) -> float:
    """The next layer's correlation of two inputs' pre-activations, both at length q (default q*)."""
    q = q_star(phi, sigma_w2, sigma_b2) if q is None else q
    u1, u2, w = _pair(q, c)
    return (sigma_w2 * float((w * phi(u1) * phi(u2)).sum().detach()) + sigma_b2) / q


def c_star(phi: Activation, sigma_w2: float, sigma_b2: float) -> float:
    """The correlation map's stable fixed point: 1 in the ordered phase (chi_1 <= 1), below 1 in chaos."""
    if chi_1(phi, sigma_w2, sigma_b2) <= 1.0:
        return 1.0
    q, low, high = q_star(phi, sigma_w2, sigma_b2), 0.0, 1.0 - 1e-9
    if correlation_map(phi, sigma_w2, sigma_b2, low, q) <= low:
        return low  # odd phi without bias: uncorrelated inputs stay uncorrelated
    for _ in range(50):  # the map lies above the diagonal below c* and below it between c* and 1
        mid = (low + high) / 2
        low, high = (mid, high) if correlation_map(phi, sigma_w2, sigma_b2, mid, q) > mid else (low, mid)
    return (low + high) / 2


def chi_c(phi: Activation, sigma_w2: float, sigma_b2: float) -> float:
    """sigma_w2 E[phi'(u1) phi'(u2)] at c*: the slope of the correlation map at its fixed point."""
    c = c_star(phi, sigma_w2, sigma_b2)
    if c == 1.0:
        return chi_1(phi, sigma_w2, sigma_b2)
    u1, u2, w = _pair(q_star(phi, sigma_w2, sigma_b2), c)
    return sigma_w2 * float((w * derivatives(phi, u1)[1] * derivatives(phi, u2)[1]).sum())


def depth(slope: float) -> float:
    """-1 / ln(slope): the layers over which a deviation from a fixed point shrinks by e; inf at slope 1."""
    return math.inf if slope >= 1.0 - 1e-12 else -1.0 / math.log(max(slope, 1e-300))


def xi_c(phi: Activation, sigma_w2: float, sigma_b2: float) -> float:
    """Correlation depth scale -1 / ln chi_c (Schoenholz et al. 2017, eq. 9); diverges at the edge of chaos."""
    return depth(chi_c(phi, sigma_w2, sigma_b2))


def xi_q(phi: Activation, sigma_w2: float, sigma_b2: float) -> float:
    """Length depth scale: -1 / ln(chi_1 + sigma_w2 E[phi''(u) phi(u)]), u ~ N(0, q*) (their eq. 5)."""
    q = q_star(phi, sigma_w2, sigma_b2)

    def slope(u: torch.Tensor) -> torch.Tensor:
        out, first, second = derivatives(phi, u)
        return first**2 + second * out

    return depth(sigma_w2 * expect(slope, q))


def critical_sigma_w2(phi: Activation, sigma_b2: float, low: float = 0.1, high: float = 10.0) -> float:
    """The sigma_w2 where chi_1 = 1 (the edge of chaos at this sigma_b2), by bisection on [low, high]."""
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if chi_1(phi, mid, sigma_b2) < 1.0 else (low, mid)
    return (low + high) / 2


def gradient_profile(phi: Activation, sigma_w2: float, sigma_b2: float, depth: int, q_in: float,
                     n_in: int, width: int) -> list[float]:
    """Predicted weight-gradient norm of hidden layers 1..depth, relative to the last hidden layer.

    Layer l's gradient is delta_l h_{l-1}^T, so its squared norm is |delta_l|^2 |h_{l-1}|^2; the length
    map carries q from the input's mean square ``q_in`` (over its ``n_in`` features) and each layer
    multiplies |delta|^2 by chi at its own q on the way back. The first over the last entry is the
    gradient-norm ratio that mean field predicts for a net of this init.
    """
    qs = [sigma_w2 * q_in + sigma_b2]  # q_1 .. q_depth
    for _ in range(depth - 1):
        qs.append(min(length_map(phi, sigma_w2, sigma_b2, qs[-1]), Q_MAX))
    inputs = [n_in * q_in] + [width * (q - sigma_b2) / sigma_w2 for q in qs[1:]]  # |h_{l-1}|^2
    chis = [sigma_w2 * mu(phi, q) for q in qs]
    deltas = [1.0] * depth  # |delta_l|^2 / |delta_depth|^2: delta_l = phi'(z_l) * W_{l+1}^T delta_{l+1}
    for i in range(depth - 2, -1, -1):
        deltas[i] = deltas[i + 1] * chis[i]
    norms = [math.sqrt(d * h) for d, h in zip(deltas, inputs, strict=True)]
    return [n / norms[-1] for n in norms]
