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


def stuck_and_vanishing(nb) -> None:
    """The lesson's first claim: the deep sigmoid net sits at ln 2 and GradWatch diagnoses vanishing."""
    fit = cell(nb, "fit")
    assert abs(number(r"loss after 100 epochs: ([\d.]+)", fit) - LN2) < 0.01
    assert re.search(r"^\s*vanishing \(", text(fit), re.M), text(fit)


def seed_measures_beside_the_true_gradient(nb) -> None:
    """Under Adam the first layer's weights move (the seed's measure) while its true gradient is tiny."""
    c = cell(nb, "seed_vs_true_table")
    rows = [line.split() for line in text(c).splitlines()
            if re.match(r"^dense\S*\s+[-\d.e+]+\s+[-\d.e+]+\s+[-\d.e+]+$", line)]
    assert len(rows) == 11  # ten hidden Dense layers and the output
    seed_gradient, percent_change, true_gradient = map(float, rows[0][1:])
    assert seed_gradient == pytest.approx(number(r"mean \|gradient\| ([\d.e+-]+)", c), rel=0.01)
    assert percent_change > 1 and true_gradient < 1e-4 * seed_gradient


def figures_drawn(nb) -> None:
    """Data, seed-vs-true, gradient flow, loss with boundary; per remedy flow, loss and boundaries."""
    expected = {"data": 1, "seed_vs_true": 1, "gradient_flow": 1, "loss_boundary": 2,
                **{f"remedy_{r}": 3 for r in REMEDIES}, **{f"study_{s}": 1 for s in STUDIES}}
    assert {tag: pngs(cell(nb, tag)) for tag in expected} == expected


def remedies_below_the_stuck_loss_or_why_not(nb) -> None:
    for remedy in REMEDIES:
        c = cell(nb, f"remedy_{remedy}")
        loss = number(rf"{remedy}: loss ([\d.e+-]+) after 100 epochs", c)
        assert loss < 0.99 * number(r"the sigmoid net's: ([\d.]+)", c) or "why:" in text(c), text(c)
    for remedy in ("relu", "batch_norm"):  # both train, and a net that trains gets no finding
        c = cell(nb, f"remedy_{remedy}")
        assert number(rf"{remedy}: loss ([\d.e+-]+) after", c) < 0.2 and "findings: none" in text(c), text(c)


def study_conclusions(nb) -> None:
    for study, phrase in STUDIES.items():
        assert phrase in text(cell(nb, f"study_{study}"))


@pytest.mark.parametrize("name", [LESSON, WATCH])
def test_notebooks_are_committed_without_outputs(name):
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def test_lesson_runs_and_shows_the_stuck_net_its_diagnosis_remedies_and_studies(tmp_path):
    nb = execute(LESSON, tmp_path)
    stuck_and_vanishing(nb)
    seed_measures_beside_the_true_gradient(nb)
    figures_drawn(nb)
    remedies_below_the_stuck_loss_or_why_not(nb)
    study_conclusions(nb)
    doctor = text(cell(nb, "doctor"))  # the stuck net's findings and a treatment ranked first that clears them
    assert "untreated" in doctor and "vanishing" in doctor and re.search(r"^1\s+\w+\s+[\d.]+", doctor, re.M)
    assert nb.cells[-1].cell_type == "markdown" and "gradwatch serve" in nb.cells[-1].source


SABOTAGE = {
    "no probe gradients": "from gradwatch.keras.epochs import Pending\n"
                          "Pending._gradients = lambda self, measured, blocks: None",
    "records dropped": "from collections import deque\n"
                       "from gradwatch.keras import GradWatch\n"
                       "made = GradWatch.__init__\n"
                       "def dropping(self, *args, **kwargs):\n"
                       "    made(self, *args, **kwargs)\n"
                       "    self.records.rows = deque(maxlen=0)  # every row it records is dropped\n"
                       "GradWatch.__init__ = dropping",
}


@pytest.mark.parametrize("sabotage", SABOTAGE)
def test_breaking_gradwatch_fails_the_lesson_checks(tmp_path, sabotage):
    with pytest.raises((AssertionError, nbclient.exceptions.CellExecutionError)):
        stuck_and_vanishing(execute(LESSON, tmp_path, head=SABOTAGE[sabotage], until="fit"))


def test_watch_notebook_charts_live_diagnoses_and_hands_records_to_pandas(tmp_path):
    nb = execute(WATCH, tmp_path)
    live = cell(nb, "live")
    assert pngs(live) == 1  # clear_output replaced each epoch's chart with the next
    assert number(r"test accuracy ([\d.]+)%", live) > 80
    assert "no findings" in text(cell(nb, "diagnose"))  # the healthy CNN: no false alarm
    assert re.search(r"^vanishing \(", text(cell(nb, "sigmoid")), re.M)
    frame = "".join(o.data.get("text/html", "") for o in cell(nb, "frame").outputs if "data" in o)
    assert all(f"<th>{column}</th>" in frame for column in ("run", "step", "epoch", "layer", "stat", "value"))
    assert "features.0" in text(cell(nb, "pivot"))
    assert pngs(cell(nb, "show")) >= 3  # report.show: loss, gradient flow, layer health
    doctor = text(cell(nb, "doctor"))  # the failing CNN's findings and the treatments ranked against them
    assert "untreated" in doctor and "vanishing" in doctor and re.search(r"^1\s+\w+\s+[\d.]+", doctor, re.M)
