"""CAPTIONS: one function per FIGURES entry, the same Runs in, a paragraph out whose numbers come from them.

Nothing here is written in advance except the physics: every loss, ratio and percentage is read
from the runs through ``report.measures``, the module the figures draw from, so a rerun with other
seeds or another spec rewrites the text with the picture. ``why`` and ``remedy`` turn a case's
records into the sentence the demo prints for each step of the remedies ladder.
"""

from __future__ import annotations

import math

from sklearn.linear_model import LogisticRegression

from gradwatch.diagnose import THRESHOLDS, diagnose
from gradwatch.records import Run, finite_median
from gradwatch.report import measures as m
from gradwatch.report.figures import FIGURES
from gradwatch.theory import LN2, SIGMOID_SLOPE

TARGET_LOSS = 0.2  # the demo's bar for "the remedy trains the deep net"
MENTION = 0.1  # a saturated or dead fraction worth a clause in a "why" sentence
FLAT = 1e-3  # a first-layer weight that moves less than this over training draws a flat line

ADAM_WHY = (
    "Why (old - new)/lr is not the gradient under Adam: Adam divides each step by a running RMS of "
    "the gradient (m / sqrt(v)), so every weight moves by about lr per step whatever the size of its "
    "gradient, and (old - new)/lr ends up counting steps rather than measuring the gradient. Under "
    "plain SGD the step is lr times the gradient, so (old - new)/lr is the gradient summed over the "
    "steps and the two measures agree (up to the steps whose gradient changes sign, which cancel)."
)


def _listing(values: dict[str, float], fmt: str = ".3g") -> str:
    return ", ".join(f"{name} {value:{fmt}}" for name, value in values.items())


def _vanishes(ratio: float) -> bool:
    return ratio < THRESHOLDS["vanishing_ratio"][0]


def ratio_note(runs: list[Run]) -> str:
    """The page's one statement of the first/last ratio, and which ratio ``gradwatch diagnose`` prints instead.

    Every caption and table on a page quotes ``measures.ratio`` in 3 significant digits, as the table
    prints it; the diagnosis reads a median over the whole run, so its number is quoted here beside ours.
    """
    cases = m.by_case(runs)
    init = {name: m.ratio(mine) for name, mine in cases.items()}
    what = "weight-gradient norm (biases left out)" if m.gradient_stat(runs) != "grad_norm" else \
        "gradient norm (weights and biases: these runs recorded no weight_grad_norm)"
    text = (f"The first/last ratio, wherever this page gives one: the first Dense layer's {what} divided by the "
            "last (output) layer's, read at initialisation (the first recorded step), as grad_ratio_first_last in "
            "the table; for a case of several seeds, the median of the seeds' ratios. \"Late in training\" is the "
            "same ratio over the last tenth of the steps.")
    finite = {name: v for name, v in init.items() if math.isfinite(v)}
    if not finite:
        return text
    name = min(finite, key=finite.get)
    mine = sorted(cases[name], key=lambda r: r.spec.get("train", {}).get("seed", 0))  # listed seed 0 first
    seeds = {_seed(r): m.ratio([r]) for r in mine}
    text += (f" {name}'s is {init[name]:.3g} at initialisation" + (f" (its seeds': {_listing(seeds)})" if len(mine) > 1
             else "") + f" and {m.ratio(mine, 'late'):.3g} late in training.")
    kind, said = _diagnosed(mine)
    if said:
        text += (f" `gradwatch diagnose` prints a first/last ratio of its own in its {kind} finding: a median over "
                 f"the whole run rather than the first step, so it need not equal either number, and for one run (a "
                 f"name picks the newest of its seeds). For {name} it prints {_listing(said, '.2g')}.")
    return text


def _seed(run: Run) -> str:
    seed = run.spec.get("train", {}).get("seed")
    return f"seed {seed}" if seed is not None else run.id


def _diagnosed(runs: list[Run]) -> tuple[str, dict[str, float]]:
    """The finding kind and, per seed, the first/last ratio ``diagnose`` quotes, where it quotes one."""
    kinds, said = [], {}
    for run in runs:
        found = next((f for f in diagnose(run.records) if "grad_ratio_first_last" in f.evidence), None)
        if found:
            kinds.append(found.kind)
            said[_seed(run)] = found.evidence["grad_ratio_first_last"]
    return (max(set(kinds), key=kinds.count) if kinds else ""), said


def data(runs: list[Run]) -> str:
    run = runs[0]
    if not m.is_planar(run):
        return "These runs' data are not two-dimensional, so there is no scatter to draw."
    d, spec = m.dataset(run), run.spec["data"]
    line = LogisticRegression().fit(d.x_train.numpy(), d.y_train.numpy().ravel())
    accuracy = line.score(d.x_test.numpy(), d.y_test.numpy().ravel())
    return (f"The data of {m.label(run)}: {len(d.x_train)} training points (filled) and {len(d.x_test)} test "
            f"points (hollow) from the {spec['name']} generator (n_samples={spec['n_samples']}, noise={spec['noise']}, "
            f"random_state={spec['seed']}). The classes interleave: the best straight line (a logistic "
            f"regression) scores {accuracy:.0%} on the test points, so the hidden layers must bend the boundary.")


def activations(runs: list[Run]) -> str:
    curves = m.activations()

    def slope(name: str, at: float) -> float:
        x, _, dy = curves[name]
        return dy[min(range(len(x)), key=lambda i: abs(x[i] - at))]

    peak = {name: max(dy) for name, (_, _, dy) in curves.items()}
    return (f"Left, each activation; right, its derivative computed by autograd. Sigmoid's slope peaks at "
            f"{peak['sigmoid']:.3g} (at x = 0) and is {slope('sigmoid', 3):.2g} at x = 3, so each sigmoid layer "
            f"scales the gradient passing back through it by at most a quarter: ten layers give at most "
            f"{peak['sigmoid'] ** 10:.1e}. Tanh peaks at {peak['tanh']:.3g}. ReLU's slope is {slope('relu', 1):.3g} "
            f"for x > 0 and {slope('relu', -1):.3g} below: no shrinking where a unit is active, no gradient where "
            f"it is not; at x = -1 Leaky ReLU keeps {slope('leaky_relu', -1):.2g} and ELU {slope('elu', -1):.2g}.")


def loss_curves(runs: list[Run]) -> str:
    cases = m.by_case(runs)
    final = {name: m.curve(mine)[1][-1] for name, mine in cases.items() if m.curve(mine)[1]}
    if not final:
        return "No epoch-level losses were recorded."
    epochs = len(m.curve(next(iter(cases.values())))[0])
    seeds = max(len(mine) for mine in cases.values())
    stuck = [n for n, v in final.items() if abs(v - LN2) < 0.01 * LN2]
    below = [n for n, v in final.items() if v <= TARGET_LOSS]
    text = f"Training loss per epoch on a log axis, median over {seeds} seed(s) (the band spans them). "
    if stuck:
        text += (f"After {epochs} epochs {', '.join(stuck)} sit at ln 2 = 0.693, the loss of answering 50% for "
                 "every point. ")
    if below:
        best = min(below, key=final.get)
        text += f"{len(below)} of {len(final)} fall to {TARGET_LOSS} or below, {best} lowest at {final[best]:.2g}. "
    return text + f"Final losses: {_listing(final)}."


def gradient_flow(runs: list[Run]) -> str:
    cases = m.by_case(runs)
    init = {name: m.ratio(mine) for name, mine in cases.items()}
    late = {name: m.ratio(mine, "late") for name, mine in cases.items()}
    ranked = sorted((v, n) for n, v in init.items() if math.isfinite(v))
    ratios = "; ".join(f"{n} {init[n]:.3g} -> {late[n]:.3g}" for n in cases)
    what = "Weight-gradient norm (biases left out)" if m.gradient_stat(runs) != "grad_norm" else \
        "Gradient norm (weights and biases)"
    text = (f"{what} per Dense layer, input on the left; each line is the median over a case's seeds. First/last "
            f"ratio (grad_ratio_first_last, as in the table) at initialisation, then late in training: {ratios}. ")
    if ranked:
        text += f"The gradient shrinks most on its way back in {ranked[0][1]} ({ranked[0][0]:.3g}). "
    twins = m.coinciding(cases, "init")
    if twins:
        text += ("At initialisation " + ", ".join(f"{n} lies exactly on {t}" for n, t in twins.items()) +
                 " (hollow markers): the same seeds build the same nets, and no optimizer has stepped yet. ")
    deep = max(cases.values(), key=lambda rs: m.sigmoid_depth(rs[0]))
    depth = m.sigmoid_depth(deep[0])
    if depth:
        text += (f"The dashed line is the chain rule's factor 0.25^k counted from the output of {m.label(deep[0])}: "
                 f"with sigmoid' <= 0.25 per layer, its {depth} sigmoid layers alone shrink the gradient by up to "
                 f"0.25^{depth} = {SIGMOID_SLOPE ** depth:.1e} (the weights add factors of their own); its "
                 f"measured ratio is {init[m.label(deep[0])]:.3g}.")
    return text


def seed_vs_true(runs: list[Run]) -> str:
    parts, factor = [], {}
    for name, mine in m.by_case(runs).items():
        run = m.representative(mine)
        seed, true = m.seed_vs_true(run)
        first = next(iter(seed))
        optimizer = run.spec.get("train", {}).get("optimizer", "?")
        times = seed[first] / true[first]
        parts.append(f"{name} ({optimizer}): {seed[first]:.1e} against {true[first]:.1e} ({times:.2g} times)")
        if math.isfinite(times) and times > 0:
            factor.setdefault(optimizer, []).append(max(times, 1 / times))
        if optimizer == "sgd":
            parts[-1] += _rounded(run, true[first])
    text = ("Red: the seed's measure (old - new)/lr per layer, divided by the number of steps so that it is a "
            "gradient per step; blue: the true mean |gradient| per step, as recorded. First layer, seed's "
            "measure against the true gradient: " + "; ".join(parts) + ". ")
    if "adam" in factor:
        text += f"Under Adam the two differ by up to {max(factor['adam']):.2g} times. "
    if "sgd" in factor:
        text += f"Under SGD they stay within a factor of {max(factor['sgd']):.2g}. "
    return text + ADAM_WHY


def _rounded(run: Run, gradient: float) -> str:
    """A clause when plain SGD's step is below float32's resolution at the first layer's weights."""
    weights = [abs(w) for row in run.summary.get("first_weights_start", []) for w in row]
    step = run.spec.get("train", {}).get("learning_rate", math.nan) * gradient
    half_ulp = finite_median(weights) * 2.0**-24  # float32: 24-bit significand, so steps below half an ulp vanish
    if not step < half_ulp:
        return ""
    return (f", and its typical step lr x gradient = {step:.1e} is below half a float32 ulp of its weights "
            f"({half_ulp:.1e}), so most steps round away to nothing")


def weight_traces(runs: list[Run]) -> str:
    moved, ratio, optimizer = {}, {}, {}
    for name, mine in m.by_case(runs).items():
        run = m.representative(mine)
        traces = list(m.traces(run).values())
        if traces and math.isfinite(change := abs(traces[0][-1][2] - traces[0][0][2])):  # not a diverged run's
            moved[name], ratio[name] = change, m.ratio(mine)
            optimizer[name] = run.spec.get("train", {}).get("optimizer")
    if not moved:
        return "No finite first-layer weight traces were recorded."
    text = ("Epoch against value of one weight per Dense layer (colours name the layer, the first layer's bold; "
            f"the median-loss seed of each case). How far the first layer's weight moved over training: "
            f"{_listing(moved, '.2g')}.")
    flat = [n for n in moved if moved[n] < FLAT]
    if starved := [n for n in flat if _vanishes(ratio[n])]:
        text += (" " + ", ".join(f"{n} (first/last ratio {ratio[n]:.3g})" for n in starved) +
                 ": a flat line, the seed's picture of a vanishing gradient.")
    if still := [n for n in flat if not _vanishes(ratio[n])]:
        text += (" " + ", ".join(f"{n} (first/last ratio {ratio[n]:.3g})" for n in still) +
                 ": barely moving although the gradient reaches the first layer, so small steps, not a vanishing "
                 "gradient.")
    adam = [n for n in moved if n not in flat and _vanishes(ratio[n]) and optimizer[n] == "adam"]
    if adam:
        text += (f" Yet {adam[0]}'s gradient vanishes (ratio {ratio[adam[0]]:.3g}) and its weight moved "
                 f"{moved[adam[0]]:.2g}: under Adam the step does not shrink with the gradient.")
    return text


def boundaries(runs: list[Run]) -> str:
    accuracy, drawn, spread = {}, {}, {}
    for name, mine in m.by_case(runs).items():
        run = m.representative(mine)
        if "boundary" not in run.summary:
            continue
        p = [v for row in run.summary["boundary"]["p"] for v in row]
        accuracy[name] = finite_median(r.summary.get("accuracy") for r in mine)
        drawn[name], spread[name] = run.summary.get("accuracy") or math.nan, (min(p), max(p))
    if not accuracy:
        return "No run drew a decision boundary (only 2-D binary data has one)."
    flat = [n for n, (lo, hi) in spread.items() if hi - lo < 0.1]
    text = ("Colour: the net's probability of the orange class over the plane, drawn for each case's median-loss "
            "seed; black: the p = 0.5 boundary. Test accuracy, the median over seeds as in the table: "
            + _listing(accuracy) + ".")
    other = {n: v for n, v in drawn.items() if not math.isclose(v, accuracy[n], abs_tol=5e-4)}
    if other:
        text += (" The seed drawn is not the median-accuracy one in " + ", ".join(
            f"{n} (it scores {v:.3g})" for n, v in other.items()) + ".")
    if flat:
        text += " Barely more confident than a coin anywhere on the plane: " + ", ".join(
            f"{n} (p from {spread[n][0]:.2f} to {spread[n][1]:.2f})" for n in flat) + "."
    return text


def why(runs: list[Run]) -> str:
    """What the records say held a case back: vanishing gradient, stalled loss, saturation, dead units."""
    return "; ".join(_gradient_clauses(runs) + _loss_clauses(runs) + _unit_clauses(runs))


def _gradient_clauses(runs: list[Run]) -> list[str]:
    start, end = m.ratio(runs), m.ratio(runs, "late")
    limit = THRESHOLDS["vanishing_ratio"][0]
    if not math.isfinite(start):
        return ["no first/last gradient ratio could be measured (NaN/Inf or a single layer)"]
    if start < limit:
        return [f"at initialisation its first layer's gradient is {start:.3g} of the output layer's (vanishing: "
                f"below {limit:g}), " + ("and still " if end < limit else "recovering to ") +
                f"{end:.3g} late in training"]
    return [f"the gradient does reach the first layer (first/last ratio {start:.3g} at initialisation, "
            f"{end:.3g} late)"]


def _loss_clauses(runs: list[Run]) -> list[str]:
    _, loss, _, _ = m.curve(runs)
    epochs = len(loss)
    window = max(1, min(int(THRESHOLDS["plateau_window"][0]), epochs - 1))
    before, after = m.trend(runs, window)
    out = []
    below = next((i for i, v in enumerate(loss) if v < 0.99 * LN2), epochs)  # 1% under ln 2: beating a coin
    if max(window, epochs // 4) <= below < epochs:
        out.append(f"its loss did not drop below ln 2 (a coin flip) until epoch {below + 1} of {epochs}")
    if not math.isfinite(after):
        broke = next((i for i, v in enumerate(loss) if not math.isfinite(v)), epochs - 1)
        out.append(f"the loss became NaN/Inf in epoch {broke + 1}: the run diverged")
    elif after <= TARGET_LOSS:  # trained: whether it still creeps down says nothing about being stuck
        out.append(f"its loss reached {after:.3g} in {epochs} epochs, at or below the {TARGET_LOSS} target: it trains")
    elif before - after > THRESHOLDS["plateau_change"][0] * before:
        out.append(f"the loss was still falling ({before:.3g} -> {after:.3g} over the last {window} epochs), so "
                   f"it is slow rather than stuck and needs more than {epochs} epochs")
    else:
        out.append(f"the loss has stopped moving ({before:.3g} -> {after:.3g} over the last {window} epochs)"
                   + (", at ln 2: a coin flip" if abs(after - LN2) < 0.01 * LN2 else ""))
    return out


def _unit_clauses(runs: list[Run]) -> list[str]:
    layers = m.dense_layers(runs[0].records)
    out = []
    scale = {n: v for n, v in m.profile(runs, "act_rms", "late", layers[:-1]).items() if math.isfinite(v)}
    first = scale.get(layers[0], math.nan)
    if len(scale) > 1 and max(scale.values()) > 3 * first:
        top = max(scale, key=scale.get)
        out.append(f"pre-activations grow from RMS {first:.2g} in {layers[0]} to {scale[top]:.2g} in {top}")
    for stat, what in (("saturated_frac", "sit within 1% of a bound, where the slope is nearly 0"),
                       ("dead_frac", "are dead (zero for every input)")):
        fracs = {n: v for n, v in m.profile(runs, stat, "late").items() if math.isfinite(v)}
        if fracs and max(fracs.values()) >= MENTION:
            worst = max(fracs, key=fracs.get)
            out.append(f"{fracs[worst]:.0%} of {worst}'s outputs {what}")
    return out


def layer_health(runs: list[Run]) -> str:
    name = m.label(runs[0])
    norm = "weight-gradient norm per Dense layer" if m.gradient_stat(runs) != "grad_norm" else "gradient norm per layer"
    return (f"{name}, median over {len(runs)} seed(s): loss, {norm}, pre-activation RMS and saturated or dead "
            f"units, at initialisation and late in training, every axis but the fractions' logarithmic. In short: "
            f"{why(runs)}.")


def remedy(name: str, runs: list[Run], figure: int | None, change: str = "") -> str:
    """The ladder's sentence for one remedy: it trains to the target, or a figure shows why not."""
    loss = m.final_loss(runs)
    what = f"{name} ({change})" if change else name
    if loss <= TARGET_LOSS:
        return f"{what} trains to loss {loss:.3g} <= {TARGET_LOSS}."
    shown = f"figure {figure} shows why: " if figure else "why: "
    return f"{what} does not reach {TARGET_LOSS} (loss {loss:.3g}); {shown}{why(runs)}."


# name -> fn(runs) -> paragraph, one per FIGURES entry and named like it: a missing caption fails at import
CAPTIONS = {name: globals()[name] for name in FIGURES}
