"""The edge of chaos: how deep a net of a given init trains, against mean field's depth scale xi_c.

Schoenholz et al. (ICLR 2017, "Deep Information Propagation") show that a random net passes
information about its input through about 6 xi_c layers, xi_c the correlation depth scale, and that
deeper nets do not train; xi_c diverges at the order-chaos boundary (tanh at sigma_b^2 = 0.05:
sigma_w^2 ~ 1.76), so only near it do very deep nets train. Here tanh nets on a grid of sigma_w^2
(and ReLU nets on a grid of sigma_w^2 and sigma_b^2, whose edge is He's sigma_w^2 = 2) at 20
depths up to 200 train on scikit-learn's 8x8 digits with SGD for a fixed number of steps; members of
one depth share a stacked ensemble whatever their init. The heat map of test accuracy is drawn with
3, 6 and 12 xi_c and the critical sigma_w^2 over it, and the conclusion says how closely the deepest
trainable net follows xi_c.

Mean field is a theory of wide nets: it holds while depth is small against width. At width 32 and
Gaussian weights a product of L random matrices spreads its log singular values by a variance that
grows like L / width (Hanin & Nica 2019), so past a few widths the input-output Jacobian is a
projection onto a handful of directions (the isometry study: max/median 1e11 at depth 64) and no
net trains, whatever xi_c says. Orthogonal weights have the same length and correlation maps, so
the same q*, chi_1 and xi_c, without that spread (Pennington et al. 2017); Xiao et al. (ICML 2018)
test xi_c at depths far beyond the width with them. The tanh panel the study is judged by is
therefore orthogonal; a Gaussian tanh panel, Schoenholz et al.'s own init, is drawn beside it to
show the finite-width wall.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

from gradwatch import theory
from gradwatch.nets import ACTIVATIONS
from gradwatch.records import Run
from gradwatch.spec import Spec
from gradwatch.studies import Result, finite
from gradwatch.theory import meanfield


@dataclass(frozen=True)
class Panel:
    """One heat map: an activation, its sigma_w^2 grid, one sigma_b^2 (a panel per value) and the init
    whose weights sigma_w^2 scales (``nets.INITS``)."""

    activation: str
    sigma_w2: tuple[float, ...]
    sigma_b2: float
    init: str = "lecun_normal"


PANELS = {
    "tanh": Panel("tanh", tuple(np.round(np.linspace(1.0, 4.0, 30), 4)), 0.05, "orthogonal"),
    "tanh_gaussian": Panel("tanh", tuple(np.round(np.linspace(1.0, 4.0, 10), 4)), 0.05),
    "relu": Panel("relu", tuple(np.round(np.linspace(1.0, 4.0, 10), 4)), 0.0),
    "relu_biased": Panel("relu", tuple(np.round(np.linspace(1.0, 4.0, 10), 4)), 0.05),
}
DEPTHS = (3, 4, 5, 6, 7, 8, 10, 12, 15, 18, 22, 27, 33, 41, 51, 64, 82, 108, 150, 200)
SEEDS = 2
TRAINED = 0.3  # test accuracy that counts as trained: three times chance (ten classes)
# SGD's learning rate is RATE / depth (at most CAP): at the edge of chaos every layer adds about as much
# to the neural tangent kernel, whose top eigenvalue bounds a stable rate, so the kernel grows like the
# depth and a fixed rate that suits 10 layers diverges at 200. RATE is the one constant tuned, as the
# papers tuned theirs, once, where it matters: the best of 0.05, 0.1, 0.2, 0.3 for the critical
# orthogonal net at depth 200 (test accuracy after the budget, seed 0: 0.38, 0.43, 0.30, 0.14). No
# rate rescued Gaussian nets near the edge at depths 108 and 200: none of 0.3, 1, 3 trained in 24 epochs.
RATE = 0.1
CAP = 0.05
BASE = {"data.name": "digits", "data.n_samples": 1797, "model.output_activation": "softmax", "model.width": 32,
        "train.optimizer": "sgd", "train.epochs": 8, "train.batch_size": 16}
QUICK = {"depths": (2, 12), "sigma_w2": (1.0, 1.76, 3.0), "extra": {"train.epochs": 1, "data.n_samples": 200}}
BIG = 10**9  # a cadence never reached: the study reads only summaries (final accuracy), so none are recorded
CADENCE = {"thin": BIG, "every": BIG, "evaluate_every": BIG}
TITLE = "Edge of chaos: the deepest net that trains, against mean field's 6 xi_c"


def _grid(panel: Panel, quick: bool) -> tuple[tuple[float, ...], tuple[int, ...]]:
    return (QUICK["sigma_w2"], QUICK["depths"]) if quick else (panel.sigma_w2, DEPTHS)


def next_jobs(runs: list[Run], quick: bool = False) -> list[tuple[str, str, Spec]]:
    """Every (panel, sigma_w^2, depth, seed) at once, deepest first so the longest ensembles start first."""
    if runs:
        return []
    jobs = []
    for name, panel in PANELS.items():
        sigmas, depths = _grid(panel, quick)
        for depth in depths:
            over = {**BASE, **(QUICK["extra"] if quick else {}), "model.activation": panel.activation,
                    "model.init": panel.init, "model.depth": depth, "model.sigma_b2": panel.sigma_b2,
                    "train.learning_rate": min(CAP, RATE / depth)}
            jobs += [(name, "", Spec().replace(**over, **{"model.sigma_w2": float(w), "train.seed": s}))
                     for w in sigmas for s in range(2 if quick else SEEDS)]
    return sorted(jobs, key=lambda job: -job[2].model.depth)


def depth_scale(panel: Panel, sigma_w2: float) -> float:
    """The depth scale the panel is judged by: xi_c for tanh; for ReLU, whose correlations always
    approach 1 at a power law, the gradient's 1 / |ln chi_1| (He's point: infinite)."""
    phi = ACTIVATIONS[panel.activation]().double()
    if panel.activation == "relu":
        return theory.depth_scale(meanfield.chi_1(phi, sigma_w2, panel.sigma_b2))
    return meanfield.xi_c(phi, sigma_w2, panel.sigma_b2)


def measure(panel: Panel, runs: list[Run]) -> dict:
    """The panel's heat map and what it shows: accuracy per (sigma_w^2, depth), median over seeds,
    the deepest depth that trains per sigma_w^2, xi, and the share of sigma_w^2 whose deepest
    trainable depth lies between min(3 xi, D) and min(12 xi, D), D the deepest depth tried."""
    cells: dict[tuple[float, int], list[float]] = {}
    for run in runs:
        model = run.spec["model"]
        accuracy = run.summary.get("accuracy")
        cells.setdefault((model["sigma_w2"], model["depth"]), []).append(
            accuracy if accuracy is not None and math.isfinite(accuracy) else 0.1)  # diverged: chance
    sigmas, depths = sorted({w for w, _ in cells}), sorted({d for _, d in cells})
    accuracy = [[statistics.median(cells.get((w, d), [math.nan])) for d in depths] for w in sigmas]
    deepest = [max((d for d, a in zip(depths, row, strict=True) if a >= TRAINED), default=0) for row in accuracy]
    xi = [depth_scale(panel, w) for w in sigmas]
    top = max(depths, default=0)
    within = [min(3 * x, top) <= d <= min(12 * x, top) for x, d in zip(xi, deepest, strict=True)]
    phi = ACTIVATIONS[panel.activation]().double()
    critical = meanfield.critical_sigma_w2(phi, panel.sigma_b2)
    best = max(range(len(sigmas)), key=lambda i: (deepest[i], sum(accuracy[i])), default=None)
    return {"activation": panel.activation, "init": panel.init, "sigma_b2": panel.sigma_b2, "sigma_w2": sigmas,
            "depths": depths, "accuracy": accuracy, "xi_c": xi, "critical_sigma_w2": critical,
            "deepest_trainable": deepest,
            "fraction_within": sum(within) / len(within) if within else math.nan,
            "deepest_sigma_w2": sigmas[best] if best is not None else math.nan}


def summarize(runs: list[Run]) -> Result:
    measured = {name: measure(panel, [r for r in runs if r.name == name])
                for name, panel in PANELS.items() if any(r.name == name for r in runs)}
    if not measured:
        return Result(TITLE, [], "no runs")
    rows = [{"panel": name, "sigma_w2": w, "xi": round(x, 2), "deepest_trainable": d}
            for name, m in measured.items()
            for w, x, d in zip(m["sigma_w2"], m["xi_c"], m["deepest_trainable"], strict=True)]
    figures = [(_heat_map(name, m), _caption(name, m), f"criticality_{name}") for name, m in measured.items()]
    tanh = measured.get("tanh", next(iter(measured.values())))
    return Result(TITLE, rows, conclude(measured), figures, finite({**tanh, "panels": measured}))


def conclude(measured: dict[str, dict]) -> str:
    """One sentence per panel, computed from its heat map: where the boundary sits in units of xi, and
    whether the training budget rather than xi is what stops it near the edge."""
    parts = []
    for name, m in measured.items():
        gap = abs(m["deepest_sigma_w2"] - m["critical_sigma_w2"])
        pairs = [(d, x) for d, x in zip(m["deepest_trainable"], m["xi_c"], strict=True) if math.isfinite(x) and d]
        ratio = statistics.median(d / x for d, x in pairs) if pairs else math.nan
        cap = max(m["deepest_trainable"], default=0)
        short = sum(d < min(3 * x, max(m["depths"])) for d, x in zip(m["deepest_trainable"], m["xi_c"], strict=True))
        fall = "value falls" if short == 1 else "values fall"
        parts.append(
            f"{name} ({m['init']} init, sigma_b^2 = {m['sigma_b2']}): for {m['fraction_within']:.0%} of the "
            f"{len(m['sigma_w2'])} sigma_w^2 values the deepest net that trains (test accuracy >= {TRAINED}) "
            f"lies between 3 and 12 depth scales (capped at the deepest tried, {max(m['depths'])}); the "
            f"boundary sits at a median {ratio:.1f} xi (theory: about 6), and {short} {fall} short of 3 xi, "
            f"none trains deeper than {cap} layers in this budget; the sigma_w^2 that trains deepest, "
            f"{m['deepest_sigma_w2']:.2f}, is {gap:.2f} from the critical {m['critical_sigma_w2']:.2f} "
            f"({'within' if gap <= 0.25 else 'NOT within'} 0.25).")
    return " ".join(parts)


def _heat_map(name: str, m: dict) -> Figure:
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    sigmas, depths = np.array(m["sigma_w2"]), np.array(m["depths"])
    mesh = ax.pcolormesh(sigmas, depths, np.array(m["accuracy"]).T, shading="nearest", vmin=0.0, vmax=1.0,
                         cmap="viridis")
    fig.colorbar(mesh, ax=ax, label="test accuracy (median over seeds)")
    fine = np.linspace(sigmas.min(), sigmas.max(), 200)
    panel = PANELS[name]
    xi = np.array([depth_scale(panel, w) for w in fine])
    for factor, style in ((6, "-"), (3, ":"), (12, ":")):
        ax.plot(fine, np.minimum(factor * xi, 10 * depths.max()), style, color="w", lw=1.5 if factor == 6 else 1,
                label=f"{factor} xi" if factor == 6 else None)
    ax.axvline(m["critical_sigma_w2"], color="r", ls="--", lw=1, label=f"critical {m['critical_sigma_w2']:.2f}")
    ax.plot(sigmas, np.maximum(m["deepest_trainable"], depths.min()), "k.", ms=5, label="deepest trained")
    ax.set(yscale="log", ylim=(depths.min() * 0.9, depths.max() * 1.1), xlabel="sigma_w^2",
           ylabel="hidden layers (log)", title=f"{panel.activation}, {panel.init} init, sigma_b^2 = {panel.sigma_b2}")
    ax.legend(fontsize=7, loc="upper right")
    return fig


def _caption(name: str, m: dict) -> str:
    scale = "xi = 1 / |ln chi_1| (ReLU's correlations reach 1 at a power law, so its gradient's depth scale)" \
        if m["activation"] == "relu" else "xi = xi_c, the correlation depth scale"
    return (f"Test accuracy of {m['activation']} nets ({m['init']} init, width {BASE['model.width']}, digits, SGD at "
            f"{RATE}/depth for {BASE['train.epochs']} epochs of batch {BASE['train.batch_size']}) over sigma_w^2 and "
            f"depth, with 6 {scale} from mean field (white; dotted: 3 and 12 xi) and the critical sigma_w^2 = "
            f"{m['critical_sigma_w2']:.3f} (red). Black dots: the deepest net reaching accuracy {TRAINED}. "
            f"{m['fraction_within']:.0%} of sigma_w^2 values have it within [min(3 xi, D), min(12 xi, D)]; "
            f"the deepest-training sigma_w^2 is {m['deepest_sigma_w2']:.2f}.")
