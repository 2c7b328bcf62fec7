"""FIGURES: one function per picture, a list of Runs in, a matplotlib Figure out.

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot, so nothing is shown, no
backend is chosen for the caller (a notebook keeps its own) and no global figure list grows: the
way matplotlib's docs recommend embedding in servers. Every number drawn comes from
``report.measures``, which the captions read too. Runs with the same name are seeds of one case and
are drawn as their median (and spread); colours follow the order of the cases.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure

from gradwatch.records import Run
from gradwatch.report import measures as m
from gradwatch.theory import LN2, SIGMOID_SLOPE

HIGHLIGHT = ("sigmoid", "relu")  # the seed's two activations, drawn bold
TICKS = 8  # points: the smallest text on a figure, legible when a page shows it at its natural size
MARKERS = "osD^vPX*h<"  # one per colour, so cases that share a colour (the 11th on) still differ
LINES = ("-", "--", "-.", ":")  # lengths 10 and 4: a case's colour, marker and dash repeat only every 20 cases
LABEL_BOX = {"fc": "white", "ec": "none", "alpha": 0.8, "pad": 1}  # a label over lines stays readable


def _colour(i: int) -> str:
    return f"C{i % 10}"


def _case_style(i: int) -> dict:
    """The i-th case's line: its own colour, marker and dash, so lines drawn over each other stay apart."""
    return {"color": _colour(i), "marker": MARKERS[i % len(MARKERS)], "ls": LINES[i % len(LINES)], "ms": 4}


class _Plain(ticker.LogFormatter):
    """Log-axis labels as plain numbers (0.7, 0.001, 1e-05) rather than 7x10^-1: an axis spanning less
    than a decade labels its minor ticks, and these read at a glance."""

    def _num_to_string(self, x, vmin, vmax):
        return f"{x:.2g}"


def _log(ax) -> None:
    """A log y axis: every gradient, loss and scale panel uses one, so sibling figures compare directly."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_Plain())
    ax.yaxis.set_minor_formatter(_Plain(minor_thresholds=(1, 0.4)))  # minor labels only below ~1 decade


def _grid(n: int, cols: int = 5, size: tuple[float, float] = (2.0, 1.8), **kw):
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(size[0] * cols + 0.4, size[1] * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **kw).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _layer_axis(ax, layers: list[str]) -> None:
    ax.set_xticks(range(len(layers)), layers, rotation=60, fontsize=TICKS)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=TICKS, transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _scatter(ax, run: Run, size: float = 8) -> None:
    d = m.dataset(run)
    for x, y, face in ((d.x_train, d.y_train, True), (d.x_test, d.y_test, False)):
        c = np.where(y.reshape(-1).numpy() > 0.5, "C1", "C0")
        ax.scatter(x[:, 0], x[:, 1], s=size, c=c if face else "none", edgecolors=c, linewidths=0.6)


def data(runs: list[Run]) -> Figure:
    """The seed's scatter: training points filled, test points hollow, coloured by class."""
    fig = Figure(figsize=(4.2, 3.2), layout="constrained")
    ax = fig.subplots()
    run = runs[0]
    if not m.is_planar(run):
        _empty(ax, "no 2-D data to draw")
        return fig
    _scatter(ax, run, 14)
    spec = run.spec["data"]
    ax.set_title(f"{spec['name']}: n={spec['n_samples']}, noise={spec['noise']}", fontsize=10)
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    return fig


def activations(runs: list[Run]) -> Figure:
    """Every activation (left) beside its derivative by autograd (right); sigmoid and ReLU bold."""
    fig = Figure(figsize=(9.5, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    for i, (name, (x, y, slope)) in enumerate(m.activations().items()):
        bold = name in HIGHLIGHT
        style = {"color": _colour(i), "lw": 2.2 if bold else 0.9, "alpha": 1.0 if bold else 0.7, "label": name}
        left.plot(x, y, **style)
        right.plot(x, slope, **style)
    right.axhline(SIGMOID_SLOPE, color="k", ls=":", lw=0.8)
    right.annotate(f"{SIGMOID_SLOPE} = max sigmoid'", (-4.8, SIGMOID_SLOPE + 0.02), fontsize=TICKS)
    left.set_ylim(-2, 3)
    right.set_ylim(-0.1, 1.9)  # 1.76 = SELU's slope below 0
    left.set_title("f(x)", fontsize=9)
    right.set_title("f'(x) (autograd)", fontsize=9)
    right.legend(fontsize=TICKS, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def loss_curves(runs: list[Run]) -> Figure:
    """Training loss per epoch on a log axis: median over seeds, band from min to max."""
    fig = Figure(figsize=(9.5, 4.2), layout="constrained")
    ax = fig.subplots()
    for i, (name, mine) in enumerate(m.by_case(runs).items()):
        epochs, mid, lo, hi = m.curve(mine)
        ax.plot(epochs, mid, lw=1.4, label=name, markevery=max(1, len(epochs) // 10), **_case_style(i))
        if len(mine) > 1:
            ax.fill_between(epochs, lo, hi, color=_colour(i), alpha=0.15, lw=0)
    ax.axhline(LN2, color="k", ls=":", lw=0.8)
    ax.annotate("ln 2", (1, LN2 * 1.08), fontsize=TICKS)
    _log(ax)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (BCE)")
    ax.legend(fontsize=TICKS, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def _flow(ax, runs_by_case: dict[str, list[Run]], when: str) -> list[str]:
    """Per-layer medians of the gradient norm for each case on one log axis, plus the sigmoid chain-rule factor.

    A case whose line equals an earlier case's (the same seeds before the optimizers differ) is drawn
    with hollow markers over it and labelled with both names, so neither hides the other.
    """
    longest: list[str] = []
    deepest = max(runs_by_case.values(), key=lambda rs: m.sigmoid_depth(rs[0]))
    twins = m.coinciding(runs_by_case, when)
    for i, (name, mine) in enumerate(runs_by_case.items()):
        layers = m.dense_layers(mine[0].records)
        values = m.profile(mine, m.gradient_stat(mine), when, layers)
        style = _case_style(i) | ({"mfc": "none", "ms": 8, "mew": 1.2} if name in twins else {})
        ax.plot(range(len(layers)), list(values.values()), lw=1.2, label=name, **style)
        if name in twins:
            ax.annotate(f"{twins[name]} = {name}", (0, values[layers[0]]), xytext=(8, 8), textcoords="offset points",
                        fontsize=TICKS, color=style["color"], bbox=LABEL_BOX)
        longest = max(longest, layers, key=len)
        if mine is deepest and m.sigmoid_depth(mine[0]):
            n, top = len(layers), values[layers[-1]]
            bound = [top * SIGMOID_SLOPE ** (n - 1 - k) for k in range(n)]
            ax.plot(range(n), bound, "k--", lw=0.9, label=f"0.25^k from the output ({name})")
    _log(ax)
    _layer_axis(ax, longest)
    ax.tick_params(labelsize=TICKS)
    return longest


def gradient_flow(runs: list[Run]) -> Figure:
    """Gradient norm per Dense layer, input to output, at initialisation and late in training (log axis)."""
    fig = Figure(figsize=(11.0, 4.6), layout="constrained")
    first, late = fig.subplots(1, 2, sharey=True)
    cases = m.by_case(runs)
    _flow(first, cases, "init")
    _flow(late, cases, "late")
    first.set_title("at initialisation (first step)", fontsize=10)
    late.set_title("late in training (last tenth of steps)", fontsize=10)
    first.set_ylabel(_norm_label(runs))
    late.legend(fontsize=TICKS, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def _norm_label(runs: list[Run]) -> str:
    return "weight-gradient L2 norm" if m.gradient_stat(runs) != "grad_norm" else "gradient L2 norm (weights + biases)"


def seed_vs_true(runs: list[Run]) -> Figure:
    """The seed's (old - new)/lr per step beside the true mean |gradient|, per layer, one panel per case."""
    cases = m.by_case(runs)
    fig, axes = _grid(len(cases), cols=4, size=(3.0, 2.9), sharey=True)
    for ax, (name, mine) in zip(axes, cases.items(), strict=True):
        run = m.representative(mine)
        seed, true = m.seed_vs_true(run)
        layers = list(seed)
        ax.plot(range(len(layers)), list(seed.values()), "s-", ms=3, color="C3", label="|old - new| / (lr steps)")
        ax.plot(range(len(layers)), list(true.values()), "o-", ms=3, color="C0", label="true mean |gradient|")
        _log(ax)
        _layer_axis(ax, layers)
        ax.tick_params(axis="y", labelsize=TICKS)
        ax.set_title(f"{name} ({run.spec.get('train', {}).get('optimizer', '?')})", fontsize=9)
    axes[0].set_ylabel("per step")
    axes[-1].legend(fontsize=TICKS)
    return fig


def weight_traces(runs: list[Run]) -> Figure:
    """Epoch against value of one weight per Dense layer, the first layer's bold (the seed's flat-line picture).

    Colours follow the layer (the same in every panel, the output layer black), so one legend names them all.
    """
    cases = m.by_case(runs)
    fig, axes = _grid(len(cases), size=(2.4, 2.1))
    named: dict[str, object] = {}
    for ax, (name, mine) in zip(axes, cases.items(), strict=True):
        traces = m.traces(m.representative(mine))
        for j, (layer, rows) in enumerate(traces.items()):
            last = j == len(traces) - 1  # the output layer in black: an 11th colour would repeat the first's
            (line,) = ax.plot([e + 1 for _, e, _ in rows], [v for _, _, v in rows], lw=2.0 if j == 0 else 0.8,
                              color="k" if last and j else _colour(j))
            named.setdefault(layer, line)
        if not traces:
            _empty(ax, "no weight traces")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=TICKS)
    fig.supxlabel("epoch", fontsize=9)
    fig.supylabel("weight value (one weight per Dense layer)", fontsize=9)
    if named:
        fig.legend(list(named.values()), list(named), title="layer", fontsize=TICKS, title_fontsize=TICKS,
                   loc="outside right center")
    return fig


def boundaries(runs: list[Run]) -> Figure:
    """Each case's output probability over the plane (p = 0.5 drawn black) with its training points."""
    cases = {n: rs for n, rs in m.by_case(runs).items() if "boundary" in m.representative(rs).summary}
    fig, axes = _grid(max(len(cases), 1), size=(2.2, 2.1))
    if not cases:
        _empty(axes[0], "no 2-D binary runs")
    for ax, (name, mine) in zip(axes, cases.items(), strict=False):
        run = m.representative(mine)
        b = run.summary["boundary"]
        ax.contourf(b["x"], b["y"], b["p"], levels=np.linspace(0, 1, 11), cmap="RdBu_r", alpha=0.7)
        ax.contour(b["x"], b["y"], b["p"], levels=[0.5], colors="k", linewidths=1)
        if m.is_planar(run):
            _scatter(ax, run, 3)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def layer_health(runs: list[Run]) -> Figure:
    """One case, four panels: loss, gradient flow, pre-activation scale, saturated or dead units.

    The picture for "why did this net not train": it shows whether the gradient reaches the first
    layer, whether growing pre-activations push sigmoids into their flat tails (Glorot & Bengio
    2010), and whether the loss is stuck or merely slow. Only the first case of ``runs`` is drawn.
    Every case gets the same axes (log for loss, gradient and scale, linear for fractions), so two
    cases' figures compare panel by panel.
    """
    name, mine = next(iter(m.by_case(runs).items()))
    layers = m.dense_layers(mine[0].records)
    stat = "saturated_frac" if mine[0].records.layers("saturated_frac") else "dead_frac"
    fig = Figure(figsize=(10.0, 6.6), layout="constrained")
    (loss, flow), (scale, units) = fig.subplots(2, 2)
    epochs, mid, lo, hi = m.curve(mine)
    loss.plot(epochs, mid, color="C0")
    loss.fill_between(epochs, lo, hi, color="C0", alpha=0.2, lw=0)
    loss.axhline(LN2, color="k", ls=":", lw=0.8)
    loss.set(xlabel="epoch", title="training loss (median, spread over seeds)")
    for when, style in (("init", "o--"), ("late", "o-")):
        grads = m.profile(mine, m.gradient_stat(mine), when, layers)
        flow.plot(range(len(layers)), list(grads.values()), style, ms=3, label=when)
        scale.plot(range(len(layers)), list(m.profile(mine, "act_rms", when, layers).values()), style, ms=3,
                   label=when)
        fracs = m.profile(mine, stat, when)
        if fracs:
            units.plot(range(len(fracs)), list(fracs.values()), style, ms=3, label=when)
            _layer_axis(units, list(fracs))
            units.set(title=stat.replace("_", " ") + " per activation layer", ylim=(-0.05, 1.05))
    if m.sigmoid_depth(mine[0]):
        top = grads[layers[-1]]
        flow.plot(range(len(layers)), [top * SIGMOID_SLOPE ** (len(layers) - 1 - k) for k in range(len(layers))],
                  "k:", lw=0.9, label="0.25^k")
    if not units.lines:
        _empty(units, "no saturation or dead-unit records\n(only sigmoid, tanh and ReLU layers are hooked)")
    flow.set(title=_norm_label(mine) + " per layer")
    scale.set(title="pre-activation RMS per layer")
    for ax in (loss, flow, scale):
        _log(ax)
    for ax in (flow, scale):
        _layer_axis(ax, layers)
    for ax in (loss, flow, scale, units):
        ax.tick_params(labelsize=TICKS)
        ax.title.set_fontsize(10)
        if ax.lines and ax is not loss:
            ax.legend(fontsize=TICKS)
    fig.suptitle(name, fontsize=11)
    return fig


# name -> fn(runs) -> Figure; html.py captions each with CAPTIONS[name]
FIGURES = {
    "data": data,
    "activations": activations,
    "loss_curves": loss_curves,
    "gradient_flow": gradient_flow,
    "seed_vs_true": seed_vs_true,
    "weight_traces": weight_traces,
    "boundaries": boundaries,
    "layer_health": layer_health,
}
