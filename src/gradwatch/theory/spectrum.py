"""The input-output Jacobian's singular values of a deep random net: dynamical isometry or not.

Between hidden layers J = D_L W_L ... D_2 W_2 with D_l = diag(phi'(z_l)). In the wide limit the D_l
and W_l are freely independent, so the spectrum of J J^T is the free multiplicative convolution of
L copies of D^2's law (phi'(u)^2, u ~ N(0, q*)) and W^T W's (Marchenko-Pastur for a Gaussian W, a
point mass at sigma_w2 for a scaled orthogonal one) (Pennington, Schoenholz & Ganguli 2017,
"Resurrecting the sigmoid"; Pennington et al. 2018). Its first two moments have a closed form
(``moments``); the whole density does not, so ``free_samples`` draws that same free model (iid D_l
at q*, independent W_l) by Monte Carlo, which is what the isometry study draws as "theory".
"""

from __future__ import annotations

import math

import torch

from gradwatch.theory.meanfield import Activation, derivatives, mu, q_star

# init -> the normalised variance of W^T W's spectrum (Marchenko-Pastur at ratio 1: 1; orthogonal: 0),
# i.e. minus the first coefficient s_1 of its S-transform
SPREAD = {"gaussian": 1.0, "orthogonal": 0.0}


def moments(phi: Activation, sigma_w2: float, sigma_b2: float, depth: int, init: str) -> tuple[float, float]:
    """Mean and variance of J J^T's eigenvalues over ``depth`` layers at q*.

    From the S-transform to first order: S_{JJ^T}(z) = (sigma_w2 mu_1)^-L (1 - L (mu_2 / mu_1^2 - 1 +
    SPREAD[init]) z + ...), mu_k = E[phi'(u)^(2k)], so the mean is chi_1^L and the variance over the
    squared mean L (mu_2 / mu_1^2 - 1 + SPREAD[init]): only an orthogonal W at chi_1 = 1 with phi'
    nearly constant (tanh near 0, i.e. small q*) keeps it near 0 at any depth.
    """
    q = q_star(phi, sigma_w2, sigma_b2)
    mu_1, mu_2 = mu(phi, q, 1), mu(phi, q, 2)
    mean = (sigma_w2 * mu_1) ** depth
    return mean, mean**2 * depth * (mu_2 / mu_1**2 - 1 + SPREAD[init])


def weight(init: str, sigma_w2: float, width: int, generator: torch.Generator) -> torch.Tensor:
    """One (width, width) float64 weight of variance sigma_w2 / width: Gaussian or scaled orthogonal."""
    w = torch.randn(width, width, generator=generator, dtype=torch.float64)
    if init == "orthogonal":
        q, r = torch.linalg.qr(w)
        w = q * torch.sign(torch.diagonal(r))  # Haar-distributed (Mezzadri 2007)
        return w * math.sqrt(sigma_w2)
    return w * math.sqrt(sigma_w2 / width)


def free_samples(phi: Activation, sigma_w2: float, sigma_b2: float, depth: int, init: str, width: int,
                 draws: int = 4, seed: int = 0) -> torch.Tensor:
    """Singular values of ``draws`` products D_L W_L ... D_1 W_1 of the free model: (draws * width,).

    Each D_l holds phi' at ``width`` fresh draws of N(0, q*), independent of every W_l: the mean-field
    assumption, so it is what theory predicts at this width rather than a measurement of a net.
    """
    generator = torch.Generator().manual_seed(seed)
    q = q_star(phi, sigma_w2, sigma_b2)
    values = []
    for _ in range(draws):
        jac = torch.eye(width, dtype=torch.float64)
        for _ in range(depth):
            u = math.sqrt(q) * torch.randn(width, generator=generator, dtype=torch.float64)
            jac = derivatives(phi, u)[1][:, None] * (weight(init, sigma_w2, width, generator) @ jac)
        values.append(torch.linalg.svdvals(jac))
    return torch.cat(values)


def max_over_median(values: torch.Tensor) -> float:
    """The spread of a spectrum that the isometry study compares: largest over median singular value.

    Infinite when the median is 0 to float64 precision (below 1e-12 of the largest): a ReLU net's
    Jacobian, whose layers each zero about half their units, is rank-deficient, not merely spread.
    """
    top, middle = float(values.max()), float(values.median())
    return math.inf if middle <= 1e-12 * top else top / middle
