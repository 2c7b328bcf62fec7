"""``diagnose(records)``: findings in plain language, with remedies ranked by the evidence.

THRESHOLDS holds every number a rule uses, each with the published precedent it follows and where
gradwatch departs from it; RULES holds one function per finding kind; REMEDIES holds the fixes the
seed lesson teaches. Rules read Records only, so they judge a PyTorch run, a Keras fit, an ensemble
member or a stored run alike.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from gradwatch.records import Records

# name -> (value, precedent; departure)
THRESHOLDS: dict[str, tuple[float, str]] = {
    "vanishing_ratio": (1e-3, "AUTOTRAINER (ICSE 2021): ||g_first||/||g_last|| < 1e-3; we use the median over steps"),
    "vanishing_abs": (1e-4, "AUTOTRAINER: ||g_first|| < 1e-4 as well; SageMaker Debugger flags mean |g| < 1e-7"),
    "exploding_ratio": (70.0, "AUTOTRAINER: ||g_first||/||g_last|| > 70"),
    "exploding_growth": (
        1e3, "ours: a layer's median gradient norm in the last tenth of steps is 1000x the first tenth's (Pascanu 2013)"
    ),
    "saturated_frac": (0.5, "ours: half of a sigmoid/tanh layer's outputs within 1% of a bound; Glorot 2010"),
    "dead_frac": (0.7, "AUTOTRAINER: dying ReLU when >= 70% of gradients are zero; we count dead units"),
    "plateau_change": (0.01, "the seed: loss changing < 1% over the window; Keras ReduceLROnPlateau-style"),
    "plateau_window": (10, "epochs in the plateau window (Keras EarlyStopping's patience, 10 here)"),
    "plateau_floor": (0.05, "ours: a loss below this has converged, not stalled"),
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

    kind: str  # vanishing | exploding | saturation | dying_relu | plateau | non_finite
    layers: list[str]
    evidence: dict[str, float]
    severity: str  # low | medium | high
    remedies: list[Remedy] = field(default_factory=list)

    def __str__(self) -> str:
        sentence = SENTENCES[self.kind].format(**self.evidence)
        if self.kind == "plateau" and abs(self.evidence["loss"] - math.log(2)) < 0.01:
            sentence += " = ln 2, what guessing 50/50 scores"
        tries = "\n       ".join(f"{i}. {r.name}: {r.reason}" for i, r in enumerate(self.remedies, 1))
        return f"{self.kind} ({self.severity}) in {_span(self.layers)}: {sentence}" + (
            f"\n  try: {tries}" if tries else "")


# kind -> the plain-language sentence, filled from the finding's evidence
SENTENCES = {
    "vanishing": "the first layer's gradient is {grad_ratio_first_last:.1e} of the last layer's "
    "({first_grad_norm:.1e} vs {last_grad_norm:.2g})",
    "exploding": "the first layer's gradient is {grad_ratio_first_last:.3g}x the last layer's; "
    "a layer's typical gradient grew up to {max_growth:.3g}x during training",
    "saturation": "up to {saturated_frac:.0%} of sigmoid/tanh outputs sit within 1% of a bound, where the slope is ~0",
    "dying_relu": "up to {dead_frac:.0%} of ReLU units output 0 for every example, so they get no gradient",
    "plateau": "the loss moved {relative_change:.2%} over the last {epochs:.0f} epochs and sits at {loss:.3f}",
    "non_finite": "NaN/Inf appeared at step {first_step:.0f}",
}


def _span(layers: list[str]) -> str:
    if not layers:
        return "whole model"
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 2 else ", ".join(layers)


# the seed lesson's fixes, in the words a report prints
REMEDIES: dict[str, str] = {
    "relu_he": "ReLU (or Leaky ReLU / ELU) with He init: derivative 1 where active, so no 0.25 per layer",
    "he_init": "He/Glorot init keeps each layer's signal variance near 1 (He et al. 2015)",
    "batch_norm": "batch normalisation re-centres pre-activations out of the flat tails (Ioffe & Szegedy 2015)",
    "residual": "residual connections give the gradient an identity path around each block (He et al. 2016)",
    "fewer_layers": "fewer layers: the product of per-layer factors has fewer terms",
    "leaky_relu": "Leaky ReLU / PReLU / ELU keep a gradient for negative inputs, so units cannot die",
    "lower_lr": "a lower learning rate stops one large step from pushing units dead or weights to overflow",
    "clip_norm": "clip the gradient norm (Pascanu et al. 2013): bounds each step without changing its direction",
    "smaller_init": "a smaller init gain (or orthogonal init) keeps the Jacobian's spectral radius near 1",
    "lstm": "LSTM/GRU gates carry the gradient across time steps additively (Hochreiter & Schmidhuber 1997)",
    "check_data": "check inputs and loss for NaN/Inf, and lower the learning rate",
}


def _remedies(*names: str, because: dict[str, str] | None = None) -> list[Remedy]:
    because = because or {}
    return [Remedy(n, because.get(n, REMEDIES[n])) for n in names]


def _median_by_layer(records: Records, stat: str) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for _, _, layer, s, v in records.rows:
        if s == stat and math.isfinite(v):
            values.setdefault(layer, []).append(v)
    return {layer: statistics.median(v) for layer, v in values.items()}


def vanishing(records: Records) -> list[Finding]:
    norms = _median_by_layer(records, "grad_norm")
    if len(norms) < 2:
        return []
    names = list(norms)
    last = norms[names[-1]]
    ratio = norms[names[0]] / last if last > 0 else 0.0
    if not (ratio < _t("vanishing_ratio") and norms[names[0]] < _t("vanishing_abs")):
        return []
    weak = [n for n in names[:-1] if last > 0 and norms[n] / last < _t("vanishing_ratio")]
    saturated = max(_median_by_layer(records, "saturated_frac").values(), default=0.0)
    dead = max(_median_by_layer(records, "dead_frac").values(), default=0.0)
    if dead >= _t("dead_frac"):  # rectifiers are already in use: their dead units are the cause
        first = ("leaky_relu", "he_init", "batch_norm")
    elif saturated >= _t("saturated_frac") or ratio < 1e-5:
        first = ("relu_he", "residual", "batch_norm")
    else:
        first = ("residual", "batch_norm", "relu_he")
    return [
        Finding(
            "vanishing",
            weak,
            {"grad_ratio_first_last": ratio, "first_grad_norm": norms[names[0]], "last_grad_norm": last},
            "high" if ratio < 1e-5 else "medium",
            _remedies(*first, "fewer_layers"),
        )
    ]


def exploding(records: Records) -> list[Finding]:
    norms = _median_by_layer(records, "grad_norm")
    if len(norms) < 2:
        return []
    names = list(norms)
    last = norms[names[-1]]
    ratio = norms[names[0]] / last if last > 0 else math.inf
    growth = {}
    for layer in names:
        _, series = records.series("grad_norm", layer)
        finite = [v for v in series if math.isfinite(v)]
        tenth = max(1, len(finite) // 10)
        if len(finite) >= 2 * tenth and statistics.median(finite[:tenth]) > 0:
            # medians of the first and last tenth: one spike is not a trend
            growth[layer] = statistics.median(finite[-tenth:]) / statistics.median(finite[:tenth])
    grown = [n for n, g in growth.items() if g > _t("exploding_growth")]
    if ratio <= _t("exploding_ratio") and not grown:
        return []
    big = [n for n in names if norms[n] > _t("exploding_ratio") * last] or grown
    evidence = {"grad_ratio_first_last": ratio, "max_growth": max(growth.values(), default=1.0)}
    return [Finding("exploding", big, evidence, "high", _remedies("clip_norm", "smaller_init", "lower_lr", "lstm"))]


def saturation(records: Records) -> list[Finding]:
    fracs = _median_by_layer(records, "saturated_frac")
    hit = [n for n, f in fracs.items() if f >= _t("saturated_frac")]
    if not hit:
        return []
    worst = max(fracs[n] for n in hit)
    return [Finding("saturation", hit, {"saturated_frac": worst}, "high" if worst > 0.9 else "medium",
                    _remedies("relu_he", "batch_norm", "he_init"))]


def dying_relu(records: Records) -> list[Finding]:
    fracs = _median_by_layer(records, "dead_frac")
    hit = [n for n, f in fracs.items() if f >= _t("dead_frac")]
    if not hit:
        return []
    worst = max(fracs[n] for n in hit)
    return [Finding("dying_relu", hit, {"dead_frac": worst}, "high" if worst > 0.9 else "medium",
                    _remedies("leaky_relu", "lower_lr", "he_init"))]


def plateau(records: Records) -> list[Finding]:
    epochs, losses = records.series("loss", "", by="epoch")
    window = int(_t("plateau_window"))
    if len(losses) <= window or not all(math.isfinite(v) for v in losses[-window - 1 :]):
        return []
    old, new = losses[-window - 1], losses[-1]
    change = abs(old - new) / max(abs(old), 1e-12)
    if change >= _t("plateau_change") or new < _t("plateau_floor"):
        return []
    return [Finding("plateau", [], {"loss": new, "relative_change": change, "epochs": window}, "medium",
                    _remedies("relu_he", "batch_norm", "residual"))]


def non_finite(records: Records) -> list[Finding]:
    bad: dict[str, int] = {}
    for step, _, layer, stat, v in records.rows:
        if not math.isfinite(v) or (stat == "nonfinite" and v > 0):
            bad.setdefault(layer or "loss", step)
    if not bad:
        return []
    return [Finding("non_finite", list(bad), {"first_step": float(min(bad.values()))}, "high",
                    _remedies("clip_norm", "lower_lr", "check_data"))]


# kind -> rule(records) -> findings; each has a test that fails when its entry is removed
RULES = {
    "non_finite": non_finite,
    "exploding": exploding,
    "vanishing": vanishing,
    "saturation": saturation,
    "dying_relu": dying_relu,
    "plateau": plateau,
}


def diagnose(records: Records) -> list[Finding]:
    """Every rule's findings on ``records``, most severe first; empty means nothing looked wrong.

    Examples:
        >>> for finding in gradwatch.diagnose(run.records):
        ...     print(finding)
    """
    order = {"high": 0, "medium": 1, "low": 2}
    findings = [f for rule in RULES.values() for f in rule(records)]
    return sorted(findings, key=lambda f: order[f.severity])


def verdict(grad_ratio_first_last: float, status: str = "finished") -> str:
    """One word for a run's gradient health, from the first/last gradient-norm ratio at init.

    vanishing below AUTOTRAINER's 1e-3, exploding above its 70 or when the run diverged (NaN/Inf),
    healthy otherwise. The full diagnosis (``diagnose``) looks at far more than this one number.
    """
    if status == "diverged" or not math.isfinite(grad_ratio_first_last) or grad_ratio_first_last > _t(
        "exploding_ratio"
    ):
        return "exploding"
    return "vanishing" if grad_ratio_first_last < _t("vanishing_ratio") else "healthy"
