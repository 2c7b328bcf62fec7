"""What theory predicts for a net at initialisation: numbers the studies draw beside the measurements.

Pure math on functions and tensors (it sits beside ``nets`` and imports nothing of gradwatch):

* the chain-rule bound: every sigmoid layer multiplies the backpropagated gradient by sigmoid' <= 0.25,
  so after L layers at most 0.25^L of it is left (the seed's "multiply many numbers below 1");
* the mean-field gain per layer, chi = sigma_w^2 E[phi'(z)^2] with sigma_w^2 = Var(w) * fan_in (Poole
  et al. 2016, Schoenholz et al. 2017): a gradient's squared norm changes by chi per layer, so chi < 1
  vanishes, chi > 1 explodes, and 1 / |ln chi| is the depth over which it survives; He's init makes
  chi = 1 for ReLU, Glorot's gives 1/2;
* spectra (Saxe et al. 2014, Pascanu et al. 2013): the singular values of a Jacobian between two hidden
  layers, and the spectral norm of a recurrent matrix, which bounds how much one time step can stretch
  dL/dh_t (below 1 / max|phi'| the gradient must vanish back through time).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

SIGMOID_SLOPE = 0.25  # max of sigmoid'(x) = s(1 - s), reached at x = 0
LN2 = math.log(2)  # BCE of answering p = 0.5 for every point: where a stuck binary classifier sits
HERMITE = 60  # Gauss-Hermite nodes; even, so none sits on the kink at 0 of ReLU-like activations
Activation = Callable[[torch.Tensor], torch.Tensor]


def sigmoid_bound(depth: int) -> float:
    """0.25^depth: the most of a gradient that ``depth`` sigmoid layers can pass back (weights aside)."""
    return SIGMOID_SLOPE**depth


def _gauss(phi: Activation, variance: float, mean: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """phi(z), phi'(z) (autograd) and the normalised weights at the Gauss-Hermite nodes of N(mean, variance)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(HERMITE)
    z = torch.tensor(mean + math.sqrt(variance) * nodes, dtype=torch.float64, requires_grad=True)
    out = phi(z)
    (slope,) = torch.autograd.grad(out.sum(), z)
    return out.detach(), slope, torch.tensor(weights / weights.sum())


def chi(phi: Activation, sigma_w2: float, bias: float = 0.0) -> float:
    """Mean-field gain sigma_w^2 E[phi'(z)^2], with z at its fixed-point variance.

    The pre-activation variance q is iterated to q = sigma_w^2 E[phi(z)^2], where the middle layers
    of a deep net sit. ``phi`` must accept float64 tensors (``nets.ACTIVATIONS[name]().double()``).
    """
    q = 1.0
    for _ in range(100):
        out, _, w = _gauss(phi, q, bias)
        q = min(max(sigma_w2 * float((w * out**2).sum()), 1e-12), 1e6)
    _, slope, w = _gauss(phi, q, bias)
    return sigma_w2 * float((w * slope**2).sum())


def depth_scale(gain: float) -> float:
    """Layers over which a squared gradient norm shrinks (or grows) by e: 1 / |ln chi|; inf at chi = 1."""
    return math.inf if abs(math.log(gain)) < 1e-9 else 1.0 / abs(math.log(gain))


def predicted_ratio(gain: float, depth: int) -> float:
    """First/last layer gradient-norm ratio that chi predicts across ``depth`` layers: chi^((depth - 1) / 2)."""
    return gain ** ((depth - 1) / 2)


def jacobian_singular_values(layers: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """Singular values of d layers(h) / d h for each row of ``h``: (rows, width).

    A net is dynamically isometric (Saxe et al. 2014) when they all sit near 1; a vanishing one has
    them near 0, an exploding one far above 1.
    """
    return torch.stack([torch.linalg.svdvals(torch.autograd.functional.jacobian(layers, row)) for row in h])


def spectral_norm(weight: torch.Tensor) -> float:
    """Largest singular value of a matrix: the most one recurrent step can stretch dL/dh."""
    return float(torch.linalg.matrix_norm(weight.detach().double(), ord=2))
