"""Each rule is backed by a model built to have the problem, and a healthy one that must not."""

import math

import pytest

from gradwatch.diagnose import RULES, SENTENCES, diagnose, verdict
from gradwatch.records import Records
from gradwatch.spec import Spec
from gradwatch.train import train

CASES = {
    # the seed's deep sigmoid net with every unit pushed into sigmoid's flat top (bias 5)
    "deep_sigmoid": ({"model.bias_init": 5.0, "train.epochs": 3}, {"vanishing", "saturation"}),
    # a ReLU net whose large negative bias leaves units at 0 for every input
    "dying_relu": ({"model.activation": "relu", "model.init": "he_normal", "model.bias_init": -3.0,
                    "model.depth": 4, "model.width": 32, "train.epochs": 3}, {"dying_relu"}),
    # a tanh RNN on the adding problem with recurrent weights 3x orthogonal
    "exploding_rnn": ({"data.name": "adding", "data.seq_len": 30, "data.n_samples": 200, "model.kind": "rnn",
                       "model.activation": "tanh", "model.width": 32, "model.init": "orthogonal",
                       "model.init_gain": 3.0, "model.output_activation": "linear", "train.epochs": 2},
                      {"exploding"}),
    "healthy_relu": ({"model.activation": "relu", "model.init": "he_normal", "model.depth": 4,
                      "model.width": 32, "train.epochs": 5}, set()),
}


@pytest.fixture(scope="module")
def runs():
    return {name: train(Spec().replace(**over)) for name, (over, _) in CASES.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_constructed_case_is_diagnosed_as_built(runs, name):
    kinds = {f.kind for f in diagnose(runs[name].records)}
    expected = CASES[name][1]
    assert expected <= kinds
    if not expected:
        assert kinds == set()


def test_findings_carry_layers_evidence_and_ranked_remedies(runs):
    (vanishing,) = [f for f in diagnose(runs["deep_sigmoid"].records) if f.kind == "vanishing"]
    assert vanishing.layers[0] == "dense1" and vanishing.severity == "high"
    assert vanishing.evidence["grad_ratio_first_last"] < 1e-3
    assert vanishing.remedies[0].name == "relu_he"
    (dying,) = [f for f in diagnose(runs["dying_relu"].records) if f.kind == "dying_relu"]
    assert dying.remedies[0].name == "leaky_relu" and dying.evidence["dead_frac"] >= 0.7
    text = str(vanishing)
    assert "vanishing" in text and "dense1" in text and "try: 1. relu_he:" in text


def _plateau_records(loss: float) -> Records:
    records = Records()
    for epoch in range(15):
        records.add(epoch * 7, epoch, "loss", {"": loss + 1e-4 * (epoch % 2)})
    return records


def _nonfinite_records() -> Records:
    records = Records()
    records.add(0, 0, "grad_norm", {"dense1": 0.1, "out": 0.2})
    records.add(1, 0, "grad_norm", {"dense1": math.nan, "out": math.inf})
    return records


def test_plateau_follows_the_seed_and_ignores_converged_loss():
    assert [f.kind for f in diagnose(_plateau_records(0.693))] == ["plateau"]
    assert diagnose(_plateau_records(0.001)) == []


def test_non_finite_gradients_are_a_finding():
    (finding,) = [f for f in diagnose(_nonfinite_records()) if f.kind == "non_finite"]
    assert finding.evidence["first_step"] == 1 and finding.remedies[0].name == "clip_norm"


@pytest.mark.parametrize("kind", sorted(RULES))
def test_removing_a_rule_loses_its_finding(runs, kind, monkeypatch):
    source = {
        "vanishing": runs["deep_sigmoid"].records,
        "saturation": runs["deep_sigmoid"].records,
        "dying_relu": runs["dying_relu"].records,
        "exploding": runs["exploding_rnn"].records,
        "plateau": _plateau_records(0.693),
        "non_finite": _nonfinite_records(),
    }[kind]
    assert kind in {f.kind for f in diagnose(source)}
    monkeypatch.delitem(RULES, kind)
    assert kind not in {f.kind for f in diagnose(source)}


def test_every_rule_has_a_sentence_that_fills_from_its_evidence(runs):
    assert set(SENTENCES) == set(RULES)
    for run in runs.values():
        for finding in diagnose(run.records):
            assert "{" not in str(finding)


@pytest.mark.parametrize(("ratio", "status", "word"), [
    (1e-6, "finished", "vanishing"), (0.3, "finished", "healthy"), (500.0, "finished", "exploding"),
    (0.3, "diverged", "exploding"), (math.nan, "finished", "exploding")])
def test_verdict_rule(ratio, status, word):
    assert verdict(ratio, status) == word
