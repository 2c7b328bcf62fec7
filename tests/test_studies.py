"""Each study's machinery on a tiny budget, and conclusions that follow the data, not a script."""

import html

import pytest

from gradwatch.studies import (
    STUDIES,
    depth,
    dying_relu,
    exploding,
    module,
    output_activation,
    relu_he,
    run,
    width_vs_depth,
)
from gradwatch.studies.all import write_page

COLUMNS = {
    "depth": {"remedy", "trainable_depth", "deepest_tried"},
    "dying-relu": {"activation", "final_loss", "dead_at_start", "dead_at_end"},
    "exploding": {"arm", "finished", "final_loss", "peak_grad_norm"},
    "output-activation": {"output", "first_grad_init", "log10_first_grad_sd", "ratio_first_last", "final_loss",
                          "accuracy"},
    "width-vs-depth": {"activation", "shape", "parameters", "final_loss", "loss_min", "loss_max", "accuracy",
                       "ratio_first_last"},
    "relu-he": {"activation", "init", "log10_first_grad", "log10_first_grad_sd", "final_loss", "final_loss_sd"},
    "criticality": {"panel", "sigma_w2", "xi", "deepest_trainable"},
    "isometry": {"case", "depth", "max_over_median", "theory_max_over_median", "accuracy"},
}


def test_every_study_is_tested():
    assert set(COLUMNS) | {"sequences"} == set(STUDIES)  # sequences: tests/test_sequences.py


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from gradwatch.store import Store

    store = Store(tmp_path_factory.mktemp("studies") / "runs.db")
    return {name: run(name, store, workers=1, quick=True) for name in COLUMNS}, store


@pytest.mark.parametrize("name", sorted(COLUMNS))
def test_study_runs_on_a_tiny_budget_and_yields_its_table(results, name):
    result = results[0][name]
    assert result.rows and set(result.rows[0]) == COLUMNS[name]
    assert result.conclusion and result.figures
    assert result.conclusion.startswith("QUICK RUN (tiny budgets")  # printed and on every page: no firm claim


def test_rerun_reuses_stored_runs(results):
    _, store = results
    before = len(store.runs())
    run("relu-he", store, workers=1, quick=True)
    assert len(store.runs()) == before


def test_study_page_holds_every_table_and_figure(results, tmp_path):
    page = write_page(list(results[0].values()), tmp_path).read_text()
    assert page.count("<table>") == len(COLUMNS) + 1 and page.count("<figure") >= len(COLUMNS)  # + closing note's
    assert "Conclusion (computed from the table)" in page
    note = page[page.index("Closing note"):]
    assert "<table>" in note and all(html.escape(results[0][name].conclusion.split(";")[0]) in note for name in
                                     ("depth", "exploding", "output-activation", "width-vs-depth", "relu-he"))


def _depth_rows(he: int, glorot: int) -> list[dict]:
    depths = {name: 4 for name in depth.REMEDIES} | {"relu_he": he, "relu_glorot": glorot, "residual_norm": 64}
    return [{"remedy": n, "trainable_depth": d, "deepest_tried": 64} for n, d in depths.items()]


def test_depth_conclusion_follows_the_data():
    assert "relu_he (32) trains deeper than relu_glorot (16)" in depth.conclude(_depth_rows(32, 16))
    assert "relu_he (16) does NOT train deeper than relu_glorot (16)" in depth.conclude(_depth_rows(16, 16))


def test_dying_relu_conclusion_follows_the_data():
    rows = [{"activation": "relu", "final_loss": 0.69, "dead_at_start": 0.9, "dead_at_end": 0.9},
            {"activation": "elu", "final_loss": 0.01, "dead_at_start": 0.0, "dead_at_end": 0.0}]
    assert "elu keep learning" in dying_relu.conclude(rows)
    rows[1]["final_loss"] = 0.69
    assert "no variant did better" in dying_relu.conclude(rows)


def test_exploding_conclusion_follows_the_data():
    rows = [{"arm": "mlp_none", "finished": "0/3"}, {"arm": "mlp_clip_norm", "finished": "3/3"},
            {"arm": "mlp_clip_value", "finished": "2/3"}]
    text = exploding.conclude(rows)
    assert "diverges (NaN) in every seed" in text and "clip_norm make every seed finish" in text
    rows[1]["final_loss"] = 0.05
    assert "and they learn (median final loss clip_norm 0.05" in exploding.conclude(rows)
    rows[1]["final_loss"] = 0.99
    assert "finishing is not learning" in exploding.conclude(rows)
    rows[1]["finished"] = "1/3"
    assert "clipping does not save every seed" in exploding.conclude(rows)


def test_output_activation_conclusion_follows_the_data():
    rows = [{"output": "sigmoid", "first_grad_init": 1e-7, "log10_first_grad_sd": 0.1, "ratio_first_last": 2e-7},
            {"output": "linear", "first_grad_init": 1.2e-7, "log10_first_grad_sd": 0.1, "ratio_first_last": 2e-7}]
    assert output_activation.conclude(rows).startswith("No measurable change")
    rows[1]["first_grad_init"] = 1e-5
    assert output_activation.conclude(rows).startswith("Yes")


def test_relu_he_conclusion_follows_the_data():
    def cell(act, init, grad):
        return {"activation": act, "init": init, "log10_first_grad": grad, "log10_first_grad_sd": 0.1,
                "final_loss": 0.5, "final_loss_sd": 0.01}

    parallel = [cell("sigmoid", "glorot", -7), cell("sigmoid", "he", -6), cell("relu", "glorot", -2),
                cell("relu", "he", -1)]
    assert "interaction +0.00 (within seed noise)" in relu_he.conclude(parallel)
    parallel[3]["log10_first_grad"] = 1.0
    assert "interaction +2.00 (clear)" in relu_he.conclude(parallel)


def test_width_vs_depth_conclusion_follows_the_data():
    rows = [{"activation": "sigmoid", "shape": "1x257", "final_loss": 0.3, "loss_min": 0.29, "loss_max": 0.31},
            {"activation": "sigmoid", "shape": "10x10", "final_loss": 0.69, "loss_min": 0.68, "loss_max": 0.7}]
    assert "with sigmoid, 1x257 ends lowest" in width_vs_depth.conclude(rows)
    rows[0]["final_loss"], rows[0]["loss_max"] = 0.9, 0.95
    assert "with sigmoid, 10x10 ends lowest" in width_vs_depth.conclude(rows)


def test_study_modules_resolve():
    assert all(module(name).TITLE for name in STUDIES)


def test_depth_jacobian_spectrum_follows_mean_field():
    """RMS singular value of d h_L / d h_1 at init against theory's chi^((L-1)/2); residual+norm stays near 1."""
    from gradwatch import theory

    rms = {name: depth.singular_values(name, depth=8).square().mean().sqrt().item() for name in depth.ISOMETRY}
    predicted = theory.predicted_ratio(depth.predicted_gains()["sigmoid"], 8)
    assert predicted / 3 < rms["sigmoid"] < predicted * 3
    assert rms["sigmoid"] < rms["relu_glorot"] < rms["relu_he"]
    assert 0.5 < rms["residual_norm"] < 2


def test_depth_explains_he_not_beating_glorot_from_the_runs():
    def cell(remedy, depth_, trained, grad, ratio):
        return {"remedy": remedy, "depth": depth_, "trained": trained, "first_grad": grad, "ratio_init": ratio}

    detail = [cell("relu_he", 16, "5/5", 0.3, 0.9), cell("relu_glorot", 16, "5/5", 1e-3, 2.0),
              cell("relu_he", 32, "2/5", 0.2, 0.8), cell("relu_glorot", 32, "0/5", 1e-5, 3.0)]
    text = depth.conclude(_depth_rows(16, 16), detail)
    assert "Why: at depth 16 Glorot's first-layer weight gradient at init is 1.0e-03 against He's 3.0e-01" in text
    assert "One depth deeper (32) He trains 2/5 seeds and Glorot 0/5." in text
    assert "Why:" not in depth.conclude(_depth_rows(32, 16), detail)
