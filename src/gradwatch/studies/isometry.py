"""Dynamical isometry: the input-output Jacobian's singular values at init, and whether they predict training.

Pennington, Schoenholz & Ganguli (NeurIPS 2017, "Resurrecting the sigmoid") show that at the edge of
chaos a tanh net with orthogonal weights keeps all singular values of d h_L / d x near 1 at any depth
(dynamical isometry), while Gaussian weights spread them over orders of magnitude as depth grows, and
ReLU cannot be isometric with either (its slopes are 0 or 1). Here each net's spectrum is measured at
init on digits inputs, beside the free-probability model's (theory.spectrum, by Monte Carlo at the
same width), and the same nets are trained for a short SGD budget.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import torch
from matplotlib.figure import Figure

from gradwatch.data import load
from gradwatch.nets import ACTIVATIONS, build
from gradwatch.records import Run
from gradwatch.spec import Spec
from gradwatch.studies import Result, finite
from gradwatch.theory import meanfield, spectrum

SIGMA_B2 = 1e-3  # small, so tanh's q* is small and its slope nearly constant: the regime of isometry
TANH_CRITICAL = meanfield.critical_sigma_w2(ACTIVATIONS["tanh"]().double(), SIGMA_B2)
# case -> (activation, init, sigma_w2, sigma_b2); gaussian/orthogonal are tanh at the edge of chaos
CASES = {
    "gaussian": ("tanh", "lecun_normal", TANH_CRITICAL, SIGMA_B2),
    "orthogonal": ("tanh", "orthogonal", TANH_CRITICAL, SIGMA_B2),
    "relu_he": ("relu", "lecun_normal", 2.0, 0.0),
    "relu_orthogonal": ("relu", "orthogonal", 2.0, 0.0),
}
DEPTHS = (8, 16, 32, 64, 128)
QUOTED = 64  # the depth whose spread the conclusion and the JSON quote
WIDTH = 64  # = digits' 64 pixels, so every layer, the first included, is square
PROBES = 4  # digits inputs whose Jacobians are pooled
SEEDS = 2
RATE, CAP = 0.3, 0.05  # SGD's learning rate RATE / depth, at most CAP, as the criticality study's
BASE = {"data.name": "digits", "data.n_samples": 1797, "model.output_activation": "softmax",
        "model.width": WIDTH, "train.optimizer": "sgd", "train.epochs": 3, "train.batch_size": 16}
QUICK = {"depths": (4, 8), "extra": {"train.epochs": 1, "data.n_samples": 200}}
CADENCE = {"thin": 10**9, "every": 10**9, "evaluate_every": 10**9}  # only the final accuracy is read
TITLE = "Dynamical isometry: Jacobian spectra at init, theory over measurement, and trained accuracy"


def _spec(case: str, depth: int, seed: int, quick: bool) -> Spec:
    activation, init, sigma_w2, sigma_b2 = CASES[case]
    return Spec().replace(**{**BASE, **(QUICK["extra"] if quick else {}),
        "model.activation": activation, "model.init": init, "model.sigma_w2": sigma_w2, "model.sigma_b2": sigma_b2,
        "model.depth": depth, "train.learning_rate": min(CAP, RATE / depth), "train.seed": seed})


def _depths(quick: bool) -> tuple[int, ...]:
    return QUICK["depths"] if quick else DEPTHS


def next_jobs(runs: list[Run], quick: bool = False) -> list[tuple[str, str, Spec]]:
    if runs:
        return []
    return [(case, "", _spec(case, depth, seed, quick)) for depth in sorted(_depths(quick), reverse=True)
            for case in CASES for seed in range(2 if quick else SEEDS)]


def measured(spec: Spec, probes: int = PROBES) -> torch.Tensor:
    """Singular values of d h_L / d x of ``spec``'s net at init (seed 0) at ``probes`` digits inputs, pooled.

    The product D_L W_L ... D_1 W_1 is formed from the net's own weights and its pre-activations z_l,
    D_l = diag(phi'(z_l)), in float64.
    """
    torch.manual_seed(spec.train.seed)
    data = load(spec.data)
    net = build(spec.model, data.x_train.shape[1], data.n_outputs).double()
    phi = ACTIVATIONS[spec.model.activation]().double()
    values = []
    for x in data.x_train[:probes].double():
        h, jac = x, torch.eye(len(x), dtype=torch.float64)
        for i in range(1, spec.model.depth + 1):
            layer = getattr(net, f"dense{i}")
            z = layer(h).detach()
            jac = meanfield.derivatives(phi, z)[1][:, None] * (layer.weight.detach() @ jac)
            h = phi(z)
        values.append(torch.linalg.svdvals(jac))
    return torch.cat(values)


def predicted(case: str, depth: int, quick: bool = False) -> torch.Tensor:
    """The free model's singular values for this case at this depth and width (Monte Carlo)."""
    activation, init, sigma_w2, sigma_b2 = CASES[case]
    phi = ACTIVATIONS[activation]().double()
    kind = "orthogonal" if init == "orthogonal" else "gaussian"
    return spectrum.free_samples(phi, sigma_w2, sigma_b2, depth, kind, WIDTH, draws=1 if quick else PROBES)


def summarize(runs: list[Run]) -> Result:
    quick = any(r.spec["train"]["epochs"] == QUICK["extra"]["train.epochs"] for r in runs)
    depths = sorted({r.spec["model"]["depth"] for r in runs})
    if not depths:
        return Result(TITLE, [], "no runs")
    spectra = {(case, d): (measured(_spec(case, d, 0, quick)), predicted(case, d, quick)) for case in CASES
               for d in depths}
    rows = []
    for (case, depth), (seen, theory) in spectra.items():
        accuracy = [r.summary.get("accuracy") for r in runs if r.name == case and r.spec["model"]["depth"] == depth]
        accuracy = [a if a is not None and math.isfinite(a) else 0.1 for a in accuracy]
        rows.append({"case": case, "depth": depth, "max_over_median": spectrum.max_over_median(seen),
                     "theory_max_over_median": spectrum.max_over_median(theory),
                     "accuracy": statistics.median(accuracy) if accuracy else math.nan})
    quoted = QUOTED if QUOTED in depths else depths[-1]
    at = {r["case"]: r for r in rows if r["depth"] == quoted}
    data = {"depth": quoted, "max_over_median": {c: r["max_over_median"] for c, r in at.items()},
            "theory_max_over_median": {c: r["theory_max_over_median"] for c, r in at.items()},
            "accuracy": {c: {r["depth"]: r["accuracy"] for r in rows if r["case"] == c} for c in CASES}}
    text = conclude(data)
    figures = [(_histograms(spectra, depths), _caption(data), "isometry_spectra"),
               (_accuracy(rows), "Test accuracy after the short SGD budget (median over seeds) against depth, "
                                 "for the same four inits whose spectra the figure above shows.", "isometry_accuracy")]
    return Result(TITLE, rows, text, figures, finite(data))


def conclude(data: dict) -> str:
    seen, theory, depth = data["max_over_median"], data["theory_max_over_median"], data["depth"]
    factor = seen["gaussian"] / seen["orthogonal"]
    acc = data["accuracy"]
    return (f"At depth {depth} the largest over the median singular value of d h_L / d x is {seen['orthogonal']:.3g} "
            f"for orthogonal critical tanh (theory {theory['orthogonal']:.3g}) against {seen['gaussian']:.3g} for "
            f"Gaussian (theory {theory['gaussian']:.3g}): {factor:.3g}x "
            f"{'smaller' if factor >= 1 else 'LARGER'}; ReLU: He {seen['relu_he']:.3g}, orthogonal "
            f"{seen['relu_orthogonal']:.3g}. After training, accuracy at depth {depth}: "
            + ", ".join(f"{c} {acc[c].get(depth, math.nan):.2f}" for c in CASES) + ".")


def _histograms(spectra: dict, depths: list[int]) -> Figure:
    fig = Figure(figsize=(2.2 * len(depths), 1.9 * len(CASES)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(CASES), len(depths), sharex=True, squeeze=False))
    bins = np.linspace(-6, 2, 41)
    for row, case in zip(axes, CASES, strict=True):
        for ax, depth in zip(row, depths, strict=True):
            seen, theory = spectra[case, depth]
            ax.hist(np.log10(seen.clamp_min(1e-30).numpy()).clip(-6, 2), bins=bins, density=True, color="C0",
                    alpha=0.6, label="measured")
            ax.hist(np.log10(theory.clamp_min(1e-30).numpy()).clip(-6, 2), bins=bins, density=True,
                    histtype="step", color="k", ls="--", label="theory (free model, Monte Carlo)")
            ax.set_title(f"{case}, L={depth}", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[-1][0].set_xlabel("log10 singular value")
    axes[0][0].legend(fontsize=6)
    return fig


def _accuracy(rows: list[dict]) -> Figure:
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.subplots()
    for case in CASES:
        mine = [r for r in rows if r["case"] == case]
        ax.plot([r["depth"] for r in mine], [r["accuracy"] for r in mine], marker="o", label=case)
    ax.set(xscale="log", xlabel="hidden layers", ylabel="test accuracy", ylim=(0, 1))
    ax.legend(fontsize=7)
    return fig


def _caption(data: dict) -> str:
    seen, theory = data["max_over_median"], data["theory_max_over_median"]
    return (f"Singular values of the input-output Jacobian d h_L / d x at init (width {WIDTH}, {PROBES} digits inputs, "
            f"seed 0; bars; values below 1e-6 are drawn in the leftmost bin) against theory (dashed): the "
            f"free-probability model of Pennington et al. 2017/2018 (independent D_l at the mean-field q* and W_l), "
            f"sampled by Monte Carlo at the same width because its "
            f"density has no closed form (its first two moments do: theory.spectrum.moments). tanh at the edge of "
            f"chaos (sigma_w^2 = {TANH_CRITICAL:.3f}, sigma_b^2 = {SIGMA_B2}); ReLU at He's sigma_w^2 = 2. At depth "
            f"{data['depth']}, max/median singular value: orthogonal {seen['orthogonal']:.3g} (theory "
            f"{theory['orthogonal']:.3g}), Gaussian {seen['gaussian']:.3g} (theory {theory['gaussian']:.3g}), "
            f"ReLU+He {seen['relu_he']:.3g} ({theory['relu_he']:.3g}), ReLU+orthogonal {seen['relu_orthogonal']:.3g} "
            f"({theory['relu_orthogonal']:.3g}); inf: at least half the singular values are 0 (each ReLU "
            f"layer zeroes about half its units, so the Jacobian is rank-deficient and no ReLU net is isometric).")
