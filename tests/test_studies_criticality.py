"""The criticality and isometry studies: their measures on constructed runs, spectra of built nets, --json."""

import json
import math

import pytest
from typer.testing import CliRunner

from gradwatch.cli import app
from gradwatch.records import Records, Run
from gradwatch.spec import Spec
from gradwatch.studies import criticality, isometry
from gradwatch.theory import spectrum


def _run(sigma_w2: float, depth: int, accuracy: float | None, seed: int = 0) -> Run:
    spec = Spec().replace(**{"model.init": "lecun_normal", "model.sigma_w2": sigma_w2, "model.depth": depth,
                             "model.activation": "tanh", "model.sigma_b2": 0.05, "train.seed": seed})
    return Run(Records(), spec.model_dump(mode="json"), {"accuracy": accuracy}, name="tanh")


def test_deepest_trainable_and_fraction_within_follow_the_accuracy_table():
    panel = criticality.PANELS["tanh"]
    xi = {w: criticality.depth_scale(panel, w) for w in (1.0, 4.0)}  # 3.6 and 7.0 layers
    depths = (4, 16, 60, 200)
    trains = {1.0: {4, 16}, 4.0: {4}}  # sigma_w2 = 1 trains to 16 (in [10.9, 43.5]); 4 only to 4 (below 21)
    runs = [_run(w, d, 0.9 if d in trains[w] else 0.1, s) for w in trains for d in depths for s in (0, 1)]
    runs.append(_run(4.0, 60, None, 2))  # a diverged seed counts as chance, it does not vanish
    m = criticality.measure(panel, runs)
    assert m["deepest_trainable"] == [16, 4]
    assert m["xi_c"] == pytest.approx([xi[1.0], xi[4.0]])
    assert m["fraction_within"] == 0.5
    assert m["deepest_sigma_w2"] == 1.0 and m["critical_sigma_w2"] == pytest.approx(1.76, abs=0.01)
    assert "50% of the 2 sigma_w^2 values" in criticality.conclude({"tanh": m})
    assert "NOT within 0.25" in criticality.conclude({"tanh": m})


def test_members_of_one_depth_differ_only_in_init_so_they_share_a_stack():
    from gradwatch.ensemble import shape_key

    jobs = criticality.next_jobs([], quick=True)
    by_depth = {}
    for _, _, spec in jobs:
        by_depth.setdefault(spec.model.depth, set()).add(shape_key(spec))
    assert all(len(keys) == 1 for keys in by_depth.values())
    assert {spec.model.init for *_, spec in jobs} == {"orthogonal", "lecun_normal"}  # tanh twice, one stack
    assert len(jobs) == len(criticality.PANELS) * 3 * 2 * 2


def test_orthogonal_critical_tanh_net_is_isometric_and_matches_theory():
    seen = {case: spectrum.max_over_median(isometry.measured(isometry._spec(case, 32, 0, True)))
            for case in ("gaussian", "orthogonal")}
    theory = spectrum.max_over_median(isometry.predicted("orthogonal", 32))
    assert seen["orthogonal"] < 5 and seen["gaussian"] > 10 * seen["orthogonal"]
    assert theory / 2 < seen["orthogonal"] < theory * 2
    assert math.isinf(spectrum.max_over_median(isometry.measured(isometry._spec("relu_he", 32, 0, True))))


def test_study_json_holds_what_was_measured(tmp_path):
    path = tmp_path / "iso.json"
    out = CliRunner().invoke(app, ["study", "isometry", "--quick", "--workers", "1", "--store",
                                   str(tmp_path / "runs.db"), "--out", str(tmp_path / "out"), "--json", str(path)])
    assert out.exit_code == 0, out.stdout
    data = json.loads(path.read_text())
    assert data["depth"] == 8 and data["seconds"] > 0
    assert data["max_over_median"]["gaussian"] > 10 * data["max_over_median"]["orthogonal"]
    assert data["max_over_median"]["relu_he"] is None  # rank-deficient: JSON has no Infinity
