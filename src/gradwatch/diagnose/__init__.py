"""``diagnose(records)``: findings in plain language, with remedies ranked by the evidence.

THRESHOLDS holds every number a rule uses, each with the published precedent it follows and where
gradwatch departs from it; RULES holds one function per finding kind; REMEDIES holds the fixes the
seed lesson teaches (``gradwatch.doctor`` measures them). Rules read Records only, so they judge a
PyTorch run, a Keras fit, an ensemble member or a stored run alike.
"""

from __future__ import annotations

import math

from gradwatch.diagnose.evidence import Evidence
from gradwatch.diagnose.rules import REMEDIES, RULES, SENTENCES, THRESHOLDS, Finding, Remedy
from gradwatch.records import Records

__all__ = ["REMEDIES", "RULES", "SENTENCES", "THRESHOLDS", "Diagnosis", "Finding", "Remedy", "diagnose", "verdict"]

GRADIENT_FLOW = ("vanishing", "exploding")  # with neither measurable, a run's gradient health is unknown
ORDER = {"high": 0, "medium": 1, "low": 2}


class Diagnosis(list):
    """The findings, most severe first (a list), plus what could not be measured and why.

    ``verdict`` is the most severe finding's kind, ``healthy`` when every rule looked and found
    nothing wrong, ``unknown`` when nothing was found but the gradient flow could not be measured.
    """

    def __init__(self, findings: list[Finding], unmeasured: dict[str, str]):
        super().__init__(sorted(findings, key=lambda f: ORDER[f.severity]))
        self.unmeasured = unmeasured

    @property
    def verdict(self) -> str:
        if self:
            return self[0].kind
        return "unknown" if all(k in self.unmeasured for k in GRADIENT_FLOW) else "healthy"

    def __str__(self) -> str:
        lines = [str(f) for f in self] or [f"no findings: verdict {self.verdict}"]
        if self.verdict == "unknown":
            lines += [f"could not measure {kind}: {why}" for kind, why in self.unmeasured.items()]
        return "\n".join(lines)


def diagnose(records: Records) -> Diagnosis:
    """Every rule's findings on ``records``, most severe first; empty means nothing looked wrong.

    Examples:
        >>> for finding in gradwatch.diagnose(run.records):
        ...     print(finding)
    """
    evidence = Evidence(records)
    findings, unmeasured = [], {}
    for kind, rule in RULES.items():
        result = rule(evidence)
        if isinstance(result, str):
            unmeasured[kind] = result
        else:
            findings += result
    return Diagnosis(findings, unmeasured)


def verdict(grad_ratio_first_last: float, status: str = "finished") -> str:
    """One word for a run's gradient health, from the first/last gradient-norm ratio at init.

    vanishing below AUTOTRAINER's 1e-3, exploding above its 70 or when the run diverged (NaN/Inf),
    healthy otherwise, and unknown where no ratio could be measured (one layer, no gradients). The
    full diagnosis (``diagnose``) looks at far more than this one number.
    """
    if status == "diverged":
        return "exploding"
    if not math.isfinite(grad_ratio_first_last):
        return "unknown"
    if grad_ratio_first_last > THRESHOLDS["exploding_ratio"][0]:
        return "exploding"
    return "vanishing" if grad_ratio_first_last < THRESHOLDS["vanishing_ratio"][0] else "healthy"
