"""The example notebooks, run top to bottom in a fresh kernel, with their outputs checked in structure.

The notebooks are committed without outputs. nbclient runs each against ipykernel's own ``python3``
kernel (this interpreter: no kernelspec to install, no network) and raises on any cell error. Cells
are found by the tag in their metadata, and each check reads what the cell printed or drew: figures
present as PNG, the diagnosis naming the expected kind, the stuck loss at ln 2. The sabotage tests
break GradWatch inside the kernel and expect these same checks to fail.
"""

import math
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("keras")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LESSON, WATCH = "vanishing_gradients.ipynb", "watch_your_model.ipynb"
LN2 = math.log(2)
REMEDIES = ("relu", "he_init", "batch_norm", "residual")
STUDIES = {"output_activation": "first/last ratio", "width_vs_depth": "equal parameter count", "relu_he": "decades"}
TIMEOUT = 600  # per cell; the whole lesson takes a few minutes on 2 busy cores
# Under `pytest -n 2 --dist loadgroup` (make test) each notebook runs once, on one worker, not once per worker
LESSON_RUN, OTHER_RUNS = pytest.mark.xdist_group("lesson"), pytest.mark.xdist_group("notebooks")


def execute(name: str, workdir: Path, head: str = "", until: str = ""):
    """The notebook executed in ``workdir``: ``head`` runs first as a cell of its own; ``until`` is the
    tag of the last cell to run."""
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    if until:
        nb.cells = nb.cells[: nb.cells.index(cell(nb, until)) + 1]
    if head:
        nb.cells.insert(0, nbformat.v4.new_code_cell(head))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=TIMEOUT,
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute()
    return nb


def cell(nb, tag: str):
    return next(c for c in nb.cells if tag in c.metadata.get("tags", []))


def text(c) -> str:
    """Everything the cell printed, and the plain-text form of what it displayed."""
    parts = [o.get("text", "") for o in c.outputs if o.output_type == "stream"]
    parts += [o.data.get("text/plain", "") for o in c.outputs if "data" in o]
    return "\n".join(parts)


def pngs(c) -> int:
    """Figures the cell drew: image/png outputs, and PNGs inside HTML (gradwatch.report.show)."""
    html = "".join(o.data.get("text/html", "") for o in c.outputs if "data" in o)
    return sum("image/png" in o.get("data", {}) for o in c.outputs) + html.count("data:image/png;base64,")


def number(pattern: str, c) -> float:
    match = re.search(pattern, text(c))
    assert match, f"{pattern!r} not in the output of {c.metadata.get('tags')}: {text(c)[:300]}"
    return float(match.group(1))


def check_stuck_and_vanishing(nb) -> None:
    """The lesson's first claim: the deep sigmoid net sits at ln 2 and GradWatch diagnoses vanishing."""
    fit = cell(nb, "fit")
    assert abs(number(r"loss after 100 epochs: ([\d.]+)", fit) - LN2) < 0.01
    assert re.search(r"^\s*vanishing \(", text(fit), re.M), text(fit)


@pytest.fixture(scope="module")
def lesson(tmp_path_factory):
    return execute(LESSON, tmp_path_factory.mktemp("lesson"))


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    return execute(WATCH, tmp_path_factory.mktemp("watch"))


@OTHER_RUNS
@pytest.mark.parametrize("name", [LESSON, WATCH])
def test_notebooks_are_committed_without_outputs(name):
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


@LESSON_RUN
def test_lesson_deep_sigmoid_net_is_stuck_at_ln2_with_vanishing_diagnosed(lesson):
    check_stuck_and_vanishing(lesson)
    assert pngs(cell(lesson, "data")) == 1


@LESSON_RUN
def test_lesson_sets_the_seeds_weight_change_beside_the_true_gradient(lesson):
    """Under Adam the first layer's weights move (the seed's measure) while its true gradient is tiny."""
    rows = [line.split() for line in text(cell(lesson, "seed_vs_true_table")).splitlines()
            if re.match(r"^dense\S*\s+[-\d.e+]+\s+[-\d.e+]+\s+[-\d.e+]+$", line)]
    assert len(rows) == 11  # ten hidden Dense layers and the output
    seed_gradient, percent_change, true_gradient = map(float, rows[0][1:])
    assert seed_gradient == pytest.approx(number(r"mean \|gradient\| ([\d.e+-]+)", cell(lesson, "seed_vs_true_table")),
                                          rel=0.01)
    assert percent_change > 1 and true_gradient < 1e-4 * seed_gradient
    assert pngs(cell(lesson, "seed_vs_true")) == 1


@LESSON_RUN
def test_lesson_draws_gradient_flow_loss_and_decision_boundary(lesson):
    assert pngs(cell(lesson, "gradient_flow")) == 1
    assert pngs(cell(lesson, "loss_boundary")) == 2


@LESSON_RUN
@pytest.mark.parametrize("remedy", REMEDIES)
def test_each_remedy_ends_below_the_stuck_loss_or_says_why_not(lesson, remedy):
    c = cell(lesson, f"remedy_{remedy}")
    assert pngs(c) == 3  # gradient flow, loss curves, decision boundaries
    loss = number(rf"{remedy}: loss ([\d.e+-]+) after 100 epochs", c)
    stuck = number(r"the sigmoid net's: ([\d.]+)", c)
    assert loss < 0.99 * stuck or "why:" in text(c)


@LESSON_RUN
def test_relu_and_batch_norm_train_with_no_finding(lesson):
    for remedy in ("relu", "batch_norm"):
        c = cell(lesson, f"remedy_{remedy}")
        assert number(rf"{remedy}: loss ([\d.e+-]+) after", c) < 0.2
        assert "findings: none" in text(c), text(c)


@LESSON_RUN
@pytest.mark.parametrize("study", STUDIES)
def test_each_study_question_prints_its_conclusion_and_figure(lesson, study):
    c = cell(lesson, f"study_{study}")
    assert STUDIES[study] in text(c) and pngs(c) == 1


@LESSON_RUN
def test_lesson_ends_pointing_to_gradwatch_serve(lesson):
    assert lesson.cells[-1].cell_type == "markdown" and "gradwatch serve" in lesson.cells[-1].source


SABOTAGE = {
    "no probe gradients": "from gradwatch.keras import GradWatch\n"
                          "GradWatch._measure_gradients = lambda self, step, epoch: None",
    "records dropped": "import gradwatch.records\n"
                       "gradwatch.records.Records.add = lambda self, *args, **kwargs: None",
}


@OTHER_RUNS
@pytest.mark.parametrize("sabotage", SABOTAGE)
def test_breaking_gradwatch_fails_the_lesson_checks(tmp_path, sabotage):
    with pytest.raises((AssertionError, nbclient.exceptions.CellExecutionError)):
        check_stuck_and_vanishing(execute(LESSON, tmp_path, head=SABOTAGE[sabotage], until="fit"))


@OTHER_RUNS
def test_watch_notebook_redraws_one_live_chart_and_the_cnn_trains(watched):
    live = cell(watched, "live")
    assert pngs(live) == 1  # clear_output replaced each epoch's chart with the next
    assert number(r"test accuracy ([\d.]+)%", live) > 80


@OTHER_RUNS
def test_watch_notebook_diagnoses_the_healthy_cnn_clean_and_the_sigmoid_one_vanishing(watched):
    assert "no findings" in text(cell(watched, "diagnose"))
    assert re.search(r"^vanishing \(", text(cell(watched, "sigmoid")), re.M)


@OTHER_RUNS
def test_watch_notebook_hands_the_records_to_pandas_and_draws_the_report(watched):
    frame = "".join(o.data.get("text/html", "") for o in cell(watched, "frame").outputs if "data" in o)
    assert all(f"<th>{column}</th>" in frame for column in ("run", "step", "epoch", "layer", "stat", "value"))
    assert "features.0" in text(cell(watched, "pivot"))
    assert pngs(cell(watched, "show")) >= 3
