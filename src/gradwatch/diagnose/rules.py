"""THRESHOLDS (with precedents), REMEDIES and RULES: one rule per finding kind, read from Evidence.

A rule returns its findings (an empty list: looked, found nothing) or a string saying what it could
not measure, so a run without the data a rule needs gets no finding from it, never a guess.
Conditions are scale-free: gradient ratios between layers and over time, the backpropagated signal
dL/d(layer output), fractions of units, and the loss relative to where it started; no condition
compares an absolute gradient size with a constant.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from gradwatch.diagnose.evidence import Evidence
from gradwatch.records import finite_median

# name -> (value, precedent; departure)
THRESHOLDS: dict[str, tuple[float, str]] = {
    "vanishing_ratio": (1e-3, "AUTOTRAINER (ICSE 2021): ||g_first||/||g_last|| < 1e-3; we take the median over "
                              "steps, of the weight gradients and of the backpropagated signal dL/d(output)"),
    "exploding_ratio": (70.0, "AUTOTRAINER: ||g_first||/||g_last|| > 70; also between time steps (Pascanu 2013)"),
    "exploding_signal": (70.0, "AUTOTRAINER's 70, on the backpropagated signal dL/d(output) first/last, counted only "
                               "where each layer's output also grows that much toward the output (act_rms last/first): "
                               "a ratio that grows with depth both ways (He et al. 2015's gain above 1)"),
    "exploding_growth": (10.0, "ours, after Pascanu et al. 2013: the whole gradient norm's median in the run's last "
                               "quarter is 10x the third quarter's while the loss did not fall: growth that has not "
                               "stopped, not a net leaving its initial plateau"),
    "saturated_frac": (0.5, "ours: half of a sigmoid/tanh layer's outputs within 1% of a bound; Glorot 2010"),
    "dead_frac": (0.7, "AUTOTRAINER: dying ReLU when >= 70% of gradients are zero; we count dead units"),
    "plateau_change": (0.01, "the seed: loss changing < 1% over the window; Keras ReduceLROnPlateau-style"),
    "plateau_window": (10, "logged losses (epochs) in the window (Keras EarlyStopping's patience, 10 here)"),
    "plateau_guess": (5, "ours: the last 5 logged losses all sit at a uniform guess's loss (within tolerance)"),
    "plateau_stuck": (0.9, "ours: the loss is still above 90% of its first logged value: it never left the start"),
    "guess_tolerance": (0.01, "a uniform guess over k classes scores cross-entropy ln k; within 1% of it"),
    "update_small": (1e-4, "Karpathy (CS231n): update/weight ratio ~1e-3 is healthy; every layer 10x below it"),
    "slow_progress": (0.5, "AUTOTRAINER's slow convergence: the loss fell by less than half over the run"),
    "converged": (0.1, "ours: a loss below 10% of its first value has learned; swings down there are noise"),
    "oscillation_swing": (0.05, "AUTOTRAINER's oscillating loss: the loss swings by 5% of its first value per log"),
    "oscillation_zigzag": (3.0, "ours: those swings add up to 3x the window's net change, so they cancel out"),
}


def _t(name: str) -> float:
    return THRESHOLDS[name][0]


@dataclass(frozen=True)
class Remedy:
    name: str
    reason: str


@dataclass
class Finding:
    """One problem: its kind, where, the numbers that show it, how bad, and what to try first."""

    kind: str  # a key of RULES
    layers: list[str]
    evidence: dict[str, float]
    severity: str  # low | medium | high
    remedies: list[Remedy] = field(default_factory=list)

    def __str__(self) -> str:
        sentence = SENTENCES[self.kind].format(**self.evidence)
        tries = "\n       ".join(f"{i}. {r.name}: {r.reason}" for i, r in enumerate(self.remedies, 1))
        return f"{self.kind} ({self.severity}) in {_span(self.layers)}: {sentence}" + (
            f"\n  try: {tries}" if tries else "")


def _span(layers: list[str]) -> str:
    if not layers:
        return "whole model"
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 2 else ", ".join(layers)


# kind -> the plain-language sentence, filled from the finding's evidence
SENTENCES = {
    "non_finite": "NaN/Inf appeared at step {first_step:.0f}",
    "no_gradient": "{layers_without:.0f} layer(s) with weights got no gradient at all (zero or never computed)",
    "vanishing": "the first layer's gradient is {grad_ratio_first_last:.1e} of the last layer's, the "
                 "backpropagated signal {backprop_ratio_first_last:.1e} (median over steps)",
    "vanishing_in_time": "the gradient reaching the first time step is {time_ratio_first_last:.1e} of the last's",
    "exploding": "the first/last weight-gradient ratio is {grad_ratio_first_last:.3g} (through time "
                 "{time_ratio_first_last:.3g}, backpropagated signal as the outputs grow "
                 "{signal_ratio_first_last:.3g}); the gradient norm grew {late_growth:.3g}x in the last quarter",
    "saturation": "up to {saturated_frac:.0%} of sigmoid/tanh outputs sit within 1% of a bound, where the slope is ~0",
    "dying_relu": "up to {dead_frac:.0%} of ReLU units output 0 for every example, so they get no gradient",
    "plateau": "the loss moved {relative_change:.2%} over the last {epochs:.0f} logs and sits at {loss:.3f} "
               "({loss_vs_start:.0%} of where it started; ln {classes:.0f} = {guess:.3f} is a uniform guess)",
    "lr_too_small": "every layer's update is below {update_ratio:.1e} of its weights and the loss kept "
                    "{kept:.0%} of its first value",
    "lr_too_large": "the loss swings by {swing:.0%} of its first value per log, {zigzag:.1f}x its net change",
}

# remedy name -> the words a report prints; the doctor tries the ones it has a treatment for
REMEDIES: dict[str, str] = {
    "relu_he": "ReLU (or Leaky ReLU / ELU) with He init: derivative 1 where active, so no 0.25 per layer",
    "he_init": "He/Glorot init keeps each layer's signal variance near 1 (He et al. 2015)",
    "lsuv": "data-driven init (LSUV): scale each layer to unit output variance on a batch (Mishkin & Matas 2016)",
    "batch_norm": "batch normalisation re-centres pre-activations out of the flat tails (Ioffe & Szegedy 2015)",
    "residual": "residual connections give the gradient an identity path around each block (He et al. 2016)",
    "fewer_layers": "fewer layers: the product of per-layer factors has fewer terms",
    "leaky_relu": "Leaky ReLU / PReLU / ELU keep a gradient for negative inputs, so units cannot die",
    "lower_lr": "a lower learning rate stops one large step from pushing units dead or weights to overflow",
    "higher_lr": "a higher learning rate: the updates are too small to move the loss within the budget",
    "much_lower_lr": "a learning rate 100x lower: the second decade of a range test (Smith 2017)",
    "much_higher_lr": "a learning rate 100x higher: the second decade of a range test (Smith 2017)",
    "adam": "Adam scales each step by the gradient's running RMS, so small gradients still move the weights",
    "clip_norm": "clip the gradient norm (Pascanu et al. 2013): bounds each step without changing its direction",
    "orthogonal_init": "orthogonal init keeps the Jacobian's singular values near 1 (Saxe et al. 2014)",
    "gated_rnn": "GRU/LSTM gates carry the gradient across time steps additively (Hochreiter & Schmidhuber 1997)",
    "forget_bias": "an LSTM forget-gate bias of 1 remembers by default (Jozefowicz et al. 2015)",
    "check_data": "check inputs and loss for NaN/Inf (a log of 0), and lower the learning rate",
}


def _remedies(*names: str) -> list[Remedy]:
    return [Remedy(n, REMEDIES[n]) for n in names]


Result = list[Finding] | str  # findings, or what could not be measured
R = TypeVar("R")  # what a ratio reader returns: one layer -> ratio table, or a pair of them


def _depth_ratios(ev: Evidence, at_start: bool = False) -> tuple[dict[str, float], dict[str, float]]:
    """Per-layer ratios to the last layer: weight gradients (the seed's Dense weights where recorded), signal.

    An unrolled cell's signal is its first time step's (the watcher hooks a module's first call), a
    measure through time: where dL/dh_t is recorded, the time rules read that instead.
    """
    weights = ev.ratios("weight_grad_norm", at_start) or ev.ratios("grad_norm", at_start)
    return weights, {} if ev.layers("state_grad_norm") else ev.ratios("backprop_norm", at_start)


def _first(ratios: dict[str, float]) -> float:
    return next(iter(ratios.values()), math.nan)


def non_finite(ev: Evidence) -> Result:
    bad = ev.first_bad_step()
    if not bad:
        return []
    layers, step = bad
    return [Finding("non_finite", layers, {"first_step": step}, "high",
                    _remedies("check_data", "clip_norm", "lower_lr", "much_lower_lr"))]


def no_gradient(ev: Evidence) -> Result:
    if not ev.layers("grad_norm"):
        return "no gradient norms recorded"
    layers = ev.silent() + ev.missing()
    if not layers:
        return []
    return [Finding("no_gradient", layers, {"layers_without": float(len(layers))}, "high",
                    _remedies("he_init", "leaky_relu", "residual"))]


def _smallest(*values: float) -> float:
    return min(values, key=lambda v: v if math.isfinite(v) else math.inf)


def _worst_depth(ratios: tuple[dict[str, float], dict[str, float]]) -> float:
    """The smaller first/last ratio of ``_depth_ratios``'s two: weight gradients, signal."""
    return _smallest(*map(_first, ratios))


def _or_at_start(ev: Evidence, over_run: R, ratios: Callable[[bool], R], worst: Callable[[R], float]) -> R:
    """The ratios ``over_run``, or ``ratios(at_start=True)`` where the run's ``worst`` is not low and the loss
    kept at least ``slow_progress`` of its first value: a vanishing gradient judged as initialised only
    where the net then failed to learn, so a gated net whose loss falls is never judged by its start.

    An adaptive optimizer can rebalance the gradients within a few steps (Adam divides by each weight's own
    RMS) while the net stays slow: Glorot & Bengio 2010's sigmoid MLP through depth (3e-5 at the first step,
    ~2e-3 over the run, the loss at 72% of its start), a plain tanh RNN through time (the adding problem at
    seq_len 20: dL/dh_t first/last 5e-11 to 9e-7 at the first step, 5e-4 to 1e-2 over the run, the loss at the
    mean's 1/6).
    """
    if not worst(over_run) < _t("vanishing_ratio") and _kept(ev) >= _t("slow_progress"):
        return ratios(True)
    return over_run


def vanishing(ev: Evidence) -> Result:
    """A first/last ratio through depth below the threshold, over the run or at its start (``_or_at_start``)."""
    over_run = _depth_ratios(ev)
    if not any(over_run):
        return "first/last gradient ratio: fewer than two layers with a nonzero gradient"
    low = _t("vanishing_ratio")
    weights, signal = _or_at_start(ev, over_run, partial(_depth_ratios, ev), _worst_depth)
    worst = _worst_depth((weights, signal))
    if not worst < low:
        return []
    weak = [n for n, r in {**weights, **signal}.items() if r < low]
    saturated = max(ev.medians("saturated_frac").values(), default=0.0)
    dead = max(ev.medians("dead_frac").values(), default=0.0)
    if dead >= _t("dead_frac"):  # rectifiers are already in use: their dead units are the cause
        first = ("leaky_relu", "he_init", "batch_norm", "lsuv")
    elif saturated >= _t("saturated_frac") or worst < 1e-5:
        first = ("relu_he", "batch_norm", "residual", "lsuv")
    else:
        first = ("residual", "batch_norm", "relu_he", "lsuv")
    evidence = {"grad_ratio_first_last": _first(weights), "backprop_ratio_first_last": _first(signal)}
    return [Finding("vanishing", list(dict.fromkeys(weak)), evidence, "high" if worst < 1e-5 else "medium",
                    _remedies(*first, "fewer_layers"))]


def vanishing_in_time(ev: Evidence) -> Result:
    """dL/dh_t at the first time step over the last's below the threshold, over the run or at its start
    (``_or_at_start``): the gradient dies on its way back through time (Bengio et al. 1994)."""
    over_run = ev.ratios("state_grad_norm")
    if not over_run:
        return "dL/dh_t over time steps: not recorded (not a recurrent net of gradwatch's, or one step)"
    over_time = _or_at_start(ev, over_run, partial(ev.ratios, "state_grad_norm"), _first)
    ratio = _first(over_time)
    if not ratio < _t("vanishing_ratio"):
        return []
    weak = [t for t, r in over_time.items() if r < _t("vanishing_ratio")]
    return [Finding("vanishing_in_time", weak, {"time_ratio_first_last": ratio}, "high" if ratio < 1e-5 else "medium",
                    _remedies("gated_rnn", "forget_bias", "orthogonal_init"))]


def _late_growth(ev: Evidence) -> float:
    """Whole-model gradient norm, last quarter's median over the third quarter's, if the loss did not fall.

    1.0 where the loss fell over the same stretch (the net is learning) or nothing was logged.
    """
    norms, loss = ev.total_grad_norm(), ev.loss()
    if len(norms) < 8 or len(loss) < 4:
        return 1.0
    quarter, lq = len(norms) // 4, len(loss) // 4
    if finite_median(loss[-lq:]) < finite_median(loss[-2 * lq : -lq]):
        return 1.0
    before = finite_median(norms[-2 * quarter : -quarter])
    return finite_median(norms[-quarter:]) / before if before > 0 else 1.0


def _amplified(ev: Evidence, at_start: bool = False) -> float:
    """The backpropagated signal's first/last ratio where the forward pass grows as much, else nan.

    A net whose every layer multiplies by more than 1 grows both ways: its outputs toward the loss and
    its signal toward the input, while the weight gradients (their product) stay balanced. Batch
    norm grows the signal alone (it divides by each layer's spread), so it is not counted. ``at_start``:
    as initialised, before an adaptive optimizer shrinks the weights back (the run's median can hide it).
    """
    signal, outputs = _first(ev.ratios("backprop_norm", at_start)), ev.ratios("act_rms", at_start)
    forward = 1 / _first(outputs) if _first(outputs) > 0 else math.nan  # last layer's over the first's
    return signal if forward > _t("exploding_signal") else math.nan


def exploding(ev: Evidence) -> Result:
    """Gradients that grow toward the input (weights, or the signal as the outputs grow too) or back through
    time, or a gradient norm still growing. Through time or in a recurrent net the gates and the
    recurrent matrix are the cure; in a feed-forward net the init's scale is.
    """
    weights = ev.ratios("weight_grad_norm") or ev.ratios("grad_norm")
    over_time = ev.ratios("state_grad_norm")
    if not weights and not over_time:
        return "first/last gradient ratio: fewer than two layers with a nonzero gradient"
    growth = _late_growth(ev)
    amplified = _amplified(ev)
    evidence = {"grad_ratio_first_last": _first(weights), "time_ratio_first_last": _first(over_time),
                "signal_ratio_first_last": amplified if math.isfinite(amplified) else _amplified(ev, at_start=True),
                "late_growth": growth}
    high = _t("exploding_ratio")
    ratios = [v for k, v in evidence.items() if k != "late_growth" and math.isfinite(v)]
    if not (max(ratios, default=0.0) > high or growth > _t("exploding_growth")):
        return []
    big = [n for n, r in {**weights, **over_time}.items() if r > high]
    cure = (("orthogonal_init", "gated_rnn", "clip_norm", "lower_lr") if over_time else
            ("he_init", "lsuv", "clip_norm", "lower_lr", "orthogonal_init"))
    return [Finding("exploding", big, evidence, "high", _remedies(*cure))]


def _kept(ev: Evidence) -> float:
    """The last logged loss as a fraction of the first (1.0 where none was logged or it was not finite)."""
    loss = ev.loss()
    kept = loss[-1] / loss[0] if len(loss) > 1 and loss[0] else 1.0
    return kept if math.isfinite(kept) else 1.0


def _units(stat: str, threshold: str, remedies: tuple[str, ...]) -> Callable[[Evidence], Result]:
    """A rule for units stuck where their slope is zero: saturated sigmoid/tanh outputs or dead ReLUs.

    The two differ only in which fraction they read and what they suggest; a layer is hit when the
    median over sampled steps of its fraction reaches the threshold, and the loss (where logged)
    kept at least half its first value: a tanh net that saturates on its way to loss 0.001 learned.
    """

    def rule(ev: Evidence) -> Result:
        fracs = ev.medians(stat)
        if not fracs:
            return f"{stat}: not recorded (no such activation modules, or no sampled step)"
        hit = [n for n, f in fracs.items() if f >= _t(threshold)]
        if not hit or _kept(ev) < _t("slow_progress"):
            return []
        worst = max(fracs[n] for n in hit)
        kind = "saturation" if stat == "saturated_frac" else "dying_relu"
        return [Finding(kind, hit, {stat: worst}, "high" if worst > 0.9 else "medium", _remedies(*remedies))]

    return rule


def _window(ev: Evidence) -> list[float] | str:
    loss = ev.loss()
    window = int(_t("plateau_window"))
    if len(loss) <= window:
        return f"loss: {len(loss)} value(s) logged, the loss rules need more than {window}"
    if not all(math.isfinite(v) for v in loss):
        return "loss: NaN/Inf (see non_finite)"
    return loss


def _guess(losses: list[float]) -> int:
    """k where every one of ``losses`` is within tolerance of ln k (a uniform guess over k classes), else 0."""
    if not 0 < losses[-1] < math.log(1e6):  # no classifier guesses among a million classes
        return 0
    k = max(2, round(math.exp(losses[-1])))
    near = all(abs(v - math.log(k)) <= _t("guess_tolerance") * math.log(k) for v in losses)
    return k if near else 0


def plateau(ev: Evidence) -> Result:
    loss = _window(ev)
    if isinstance(loss, str):
        return loss
    window = int(_t("plateau_window"))
    old, new = loss[-window - 1], loss[-1]
    change = abs(old - new) / abs(old) if old else math.inf
    stuck = new >= _t("plateau_stuck") * loss[0] and change < _t("plateau_change")
    classes = _guess(loss[-int(_t("plateau_guess")) :])
    if not (stuck or classes):
        return []
    evidence = {"loss": new, "relative_change": change, "epochs": window, "loss_vs_start": new / loss[0] if loss[0]
                else 1.0, "classes": float(classes or 2), "guess": math.log(classes or 2)}
    return [Finding("plateau", [], evidence, "medium", _remedies("relu_he", "batch_norm", "residual", "lsuv"))]


def lr_too_small(ev: Evidence) -> Result:
    loss = _window(ev)
    if isinstance(loss, str):
        return loss
    updates = ev.medians("update_ratio")
    if not updates:
        return "update/weight ratio: not recorded (watch() without the optimizer)"
    vanished = _worst_depth(_depth_ratios(ev))
    largest, kept = max(updates.values()), _kept(ev)
    if largest >= _t("update_small") or kept < _t("slow_progress") or vanished < _t("vanishing_ratio"):
        return []  # small updates from a vanishing gradient are the vanishing finding's
    return [Finding("lr_too_small", [], {"update_ratio": largest, "kept": kept}, "medium",
                    _remedies("higher_lr", "much_higher_lr", "adam"))]


def lr_too_large(ev: Evidence) -> Result:
    loss = _window(ev)
    if isinstance(loss, str):
        return loss
    recent = loss[-int(_t("plateau_window")) - 1 :]
    steps = [abs(b - a) for a, b in zip(recent, recent[1:], strict=False)]
    swing = sum(steps) / len(steps) / loss[0] if loss[0] else 0.0
    zigzag = sum(steps) / max(abs(recent[-1] - recent[0]), 1e-12 * abs(loss[0]) or 1e-12)
    if swing < _t("oscillation_swing") or zigzag < _t("oscillation_zigzag") or _kept(ev) < _t("converged"):
        return []
    return [Finding("lr_too_large", [], {"swing": swing, "zigzag": zigzag}, "medium",
                    _remedies("lower_lr", "much_lower_lr", "clip_norm", "batch_norm"))]


# kind -> rule(evidence) -> findings or what it could not measure; removing one makes a test fail
RULES: dict[str, Callable[[Evidence], Result]] = {
    "non_finite": non_finite,
    "no_gradient": no_gradient,
    "exploding": exploding,
    "vanishing": vanishing,
    "vanishing_in_time": vanishing_in_time,
    "saturation": _units("saturated_frac", "saturated_frac", ("relu_he", "batch_norm", "lsuv")),
    "dying_relu": _units("dead_frac", "dead_frac", ("leaky_relu", "lower_lr", "he_init")),
    "plateau": plateau,
    "lr_too_small": lr_too_small,
    "lr_too_large": lr_too_large,
}
