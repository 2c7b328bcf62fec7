"""Trainable depth: for each remedy, the deepest moons net that still reaches loss <= 0.3.

Every remedy of the seeds (ReLU family, Glorot/He/LeCun init, batch and layer norm, residual
connections) against plain sigmoid and tanh, at depths 2 to 64, five seeds each. Depths run in
increasing order and a remedy stops deepening once most of its seeds fail (the budget goes where
the answer is still open); the ratio of first to last weight-gradient norm is read at
initialisation and at the end of training for every run.
"""

from __future__ import annotations

import statistics

import torch
from matplotlib.figure import Figure

from gradwatch import theory
from gradwatch.nets import ACTIVATIONS, build
from gradwatch.records import Run, first_over_last
from gradwatch.spec import Spec

TARGET = 0.3
DEPTHS = (2, 4, 8, 16, 32, 64)
SEEDS = 5
# the budget: the seed's data and batch, Adam at lr 0.01 (0.001 leaves even a 2-layer sigmoid net
# above 0.3 in 60 epochs, which would measure patience rather than depth), width 10 as in the seed
BASE = {"train.learning_rate": 0.01, "train.epochs": 60, "train.stop_loss": TARGET}
REMEDIES: dict[str, dict] = {
    "sigmoid": {},
    "tanh": {"model.activation": "tanh"},
    "relu_glorot": {"model.activation": "relu"},
    "relu_he": {"model.activation": "relu", "model.init": "he_normal"},
    "leaky_relu": {"model.activation": "leaky_relu", "model.init": "he_normal"},
    "prelu": {"model.activation": "prelu", "model.init": "he_normal"},
    "elu": {"model.activation": "elu", "model.init": "he_normal"},
    "selu_lecun": {"model.activation": "selu", "model.init": "lecun_normal"},
    "batch_norm": {"model.norm": "batch"},
    "layer_norm": {"model.norm": "layer"},
    "residual": {"model.residual": True},
    "residual_norm": {"model.residual": True, "model.norm": "batch"},
}
QUICK = {"depths": (2, 4), "seeds": 2, "extra": {"train.epochs": 3, "data.n_samples": 64}}
TITLE = "Trainable depth: the deepest net each remedy trains to loss <= 0.3"


def _plan(quick: bool):
    if quick:
        return QUICK["depths"], QUICK["seeds"], {**BASE, **QUICK["extra"]}
    return DEPTHS, SEEDS, BASE


def trained(run: Run) -> bool:
    return run.status == "finished" and (run.summary.get("final_loss") or float("inf")) <= TARGET


def _depth(run: Run) -> int:
    return run.spec["model"]["depth"]


def next_jobs(runs: list[Run], quick: bool = False) -> list[tuple[str, str, Spec]]:
    """The next depth's runs for every remedy still alive (most seeds trained one depth shallower)."""
    depths, seeds, base = _plan(quick)
    for i, depth in enumerate(depths):
        jobs = []
        for name, over in REMEDIES.items():
            mine = [r for r in runs if r.name == name]
            if any(_depth(r) == depth for r in mine):
                continue
            if i and not _alive(mine, depths[i - 1], seeds):
                continue
            jobs += [(name, "", Spec().replace(**base, **over, **{"model.depth": depth, "train.seed": s}))
                     for s in range(seeds)]
        if jobs:
            return jobs
    return []


def _alive(mine: list[Run], depth: int, seeds: int) -> bool:
    at = [r for r in mine if _depth(r) == depth]
    return len(at) == seeds and sum(map(trained, at)) * 2 > seeds


def summarize(runs: list[Run]) -> object:
    from gradwatch.studies import Result

    detail, rows = [], []
    for name in REMEDIES:
        mine = [r for r in runs if r.name == name]
        depths = sorted({_depth(r) for r in mine})
        best = 0
        for depth in depths:
            at = [r for r in mine if _depth(r) == depth]
            ok = sum(map(trained, at))
            if ok * 2 > len(at):
                best = depth
            detail.append({"remedy": name, "depth": depth, "trained": f"{ok}/{len(at)}",
                           "final_loss": statistics.median(r.summary["final_loss"] or float("nan") for r in at),
                           "ratio_init": statistics.median(r.summary["grad_ratio_first_last"] for r in at),
                           "ratio_end": statistics.median(first_over_last(r.records.last("weight_grad_norm"))
                                                          for r in at),
                           "first_grad": statistics.median(_first(r.records.at("weight_grad_norm")) for r in at)})
        rows.append({"remedy": name, "trainable_depth": best, "deepest_tried": max(depths, default=0)})
    return Result(TITLE, rows, conclude(rows, detail), [(_figure(detail), _caption(detail), "trainable_depth")]) \
        if rows \
        else Result(TITLE, rows, "no runs")


def _first(values: dict[str, float]) -> float:
    return next(iter(values.values()), float("nan"))


def conclude(rows: list[dict], detail: list[dict] = ()) -> str:
    """Sentences computed from the table: each of the expected orderings, confirmed or contradicted.

    With the per-depth ``detail``, a tie or reversal of He over Glorot comes with the numbers that explain it.
    """
    depth = {r["remedy"]: r["trainable_depth"] for r in rows}

    def claim(a: str, b: str) -> str:
        verb = "trains deeper than" if depth[a] > depth[b] else "does NOT train deeper than"
        return f"{a} ({depth[a]}) {verb} {b} ({depth[b]})"

    parts = [claim("relu_he", "relu_glorot"), claim("relu_glorot", "sigmoid")]
    deep = "trains at depth 64" if depth["residual_norm"] >= 64 else f"stops at depth {depth['residual_norm']}"
    best = max(depth.values())
    winners = ", ".join(n for n, d in depth.items() if d == best)
    text = "; ".join(parts) + f"; residual_norm {deep}. Deepest: {winners} ({best})."
    if depth["relu_he"] <= depth["relu_glorot"] and detail:
        text += " " + _why_he_ties(detail, depth["relu_glorot"])
    return text


def _why_he_ties(detail: list[dict], depth: int) -> str:
    """Why He did not out-train Glorot here, from the runs: gradient size, balance, and one depth deeper."""
    at = {(d["remedy"], d["depth"]): d for d in detail if d["remedy"] in ("relu_he", "relu_glorot")}
    he, glorot = at.get(("relu_he", depth)), at.get(("relu_glorot", depth))
    if not (he and glorot):
        return ""
    text = (f"Why: at depth {depth} Glorot's first-layer weight gradient at init is {glorot['first_grad']:.1e} against "
            f"He's {he['first_grad']:.1e}, yet its first/last ratio is {glorot['ratio_init']:.2g} (He: "
            f"{he['ratio_init']:.2g}): Glorot halves the forward signal and the backward one per ReLU layer, so every "
            "weight gradient shrinks by the same factor" + (
                ", and Adam, which divides each step by the gradient's running RMS, is blind to a common factor."
                if Spec().replace(**BASE).train.optimizer == "adam" else "."))
    deeper = min((d for r, d in at if d > depth), default=None)
    if deeper and ("relu_he", deeper) in at and ("relu_glorot", deeper) in at:
        text += (f" One depth deeper ({deeper}) He trains {at['relu_he', deeper]['trained']} seeds and Glorot "
                 f"{at['relu_glorot', deeper]['trained']}.")
    return text


def _figure(detail: list[dict]) -> Figure:
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax_ok, ax_ratio = fig.subplots(1, 2)
    for i, name in enumerate(REMEDIES):
        mine = [d for d in detail if d["remedy"] == name]
        xs = [d["depth"] for d in mine]
        frac = [int(d["trained"].split("/")[0]) / int(d["trained"].split("/")[1]) for d in mine]
        style = "-" if i < 10 else "--"
        ax_ok.plot(xs, frac, style, marker="o", label=name)
        ax_ratio.plot(xs, [d["ratio_init"] for d in mine], style, marker="o", label=name)
    xs = [d for d in DEPTHS]
    ax_ratio.plot(xs, [theory.sigmoid_bound(d) for d in xs], "k:", label="0.25^L (sigmoid bound)")
    sigmoid = predicted_gains()["sigmoid"]  # its outputs stay O(1), so chi predicts the weight-gradient ratio too
    ax_ratio.plot(xs, [theory.predicted_ratio(sigmoid, d) for d in xs], ":", color="C0", lw=1,
                  label="chi^((L-1)/2) (sigmoid, mean field)")
    for ax in (ax_ok, ax_ratio):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hidden layers (log scale)")
    ax_ok.set_ylabel(f"fraction of seeds reaching loss <= {TARGET}")
    ax_ratio.set_yscale("log")
    ax_ratio.set_ylim(1e-30, 1e3)
    ax_ratio.set_ylabel("first/last weight-gradient norm at init")
    ax_ratio.legend(fontsize=7, loc="lower left", ncols=2)
    return fig


# remedy -> (activation, sigma_w^2 = Var(w) * fan_in of its init on a square layer): the nets the
# acceptance orders, with the mean-field prediction drawn beside their measured ratio
MEAN_FIELD = {"sigmoid": ("sigmoid", 1.0), "relu_glorot": ("relu", 1.0), "relu_he": ("relu", 2.0)}


def predicted_gains() -> dict[str, float]:
    """remedy -> theory.chi, the factor by which a squared gradient norm changes per layer at init."""
    return {name: theory.chi(ACTIVATIONS[act]().double(), sigma_w2) for name, (act, sigma_w2) in MEAN_FIELD.items()}


ISOMETRY_DEPTH = 16  # the depth at which the caption quotes the Jacobian's singular values
ISOMETRY = ("sigmoid", "relu_glorot", "relu_he", "residual_norm")


def singular_values(name: str, depth: int = ISOMETRY_DEPTH, probes: int = 8) -> torch.Tensor:
    """Singular values of d h_L / d h_1 (last over first hidden layer) of a remedy's net at init, seed 0.

    The first hidden layer's output is swapped for the input of the Jacobian by a forward hook and
    the last one read at ``out``'s input, so the net's own forward defines the map. Eval mode: batch
    norm passes through with its initial statistics (mean 0, variance 1).
    """
    spec = Spec().replace(**BASE, **REMEDIES[name], **{"model.depth": depth})
    torch.manual_seed(0)
    net = build(spec.model, 2, 1).eval()
    x = torch.randn(probes, 2)
    firsts: list[torch.Tensor] = []
    hook = net.act1.register_forward_hook(lambda _m, _i, out: firsts.append(out.detach()))
    net(x)
    hook.remove()

    def layers(h: torch.Tensor) -> torch.Tensor:
        last: list[torch.Tensor] = []
        hooks = [net.act1.register_forward_hook(lambda *_: h.unsqueeze(0)),
                 net.out.register_forward_pre_hook(lambda _m, inputs: last.append(inputs[0][0]))]
        net(x[:1])
        for handle in hooks:
            handle.remove()
        return last[0]

    return theory.jacobian_singular_values(layers, firsts[0])


def _caption(detail: list[dict]) -> str:
    sig = [d for d in detail if d["remedy"] == "sigmoid"]
    deepest = max(sig, key=lambda d: d["depth"]) if sig else None
    text = ("Left: the share of seeds that reach the target at each depth (a remedy stops deepening once most "
            "seeds fail). Right: first/last weight-gradient norm at initialisation, median over seeds, against "
            "the sigmoid chain-rule bound 0.25^L. Mean field (Schoenholz et al. 2017) predicts the backpropagated "
            "signal dL/dh to change by sqrt(chi) per layer, chi = "
            + ", ".join(f"{gain:.3g} for {name}" for name, gain in predicted_gains().items())
            + "; for sigmoid (thin dotted line) that is also the weight-gradient ratio drawn here, while ReLU's "
            "forward signal shrinks by the same chi, so ReLU+Glorot's weight gradients stay balanced. At init, the "
            f"root-mean-square singular value of d h_L / d h_1 at depth {ISOMETRY_DEPTH} (seed 0, 8 inputs; all of "
            "them near 1 is Saxe et al. 2014's dynamical isometry; mean field predicts chi^((L-1)/2)) is "
            + ", ".join(f"{singular_values(name).square().mean().sqrt():.2g} for {name}" for name in ISOMETRY) + ".")
    if deepest:
        text += (f" Plain sigmoid at depth {deepest['depth']}: ratio {deepest['ratio_init']:.1e} at init, "
                 f"{deepest['ratio_end']:.1e} at the end, {deepest['trained']} seeds trained.")
    return text
