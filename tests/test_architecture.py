"""Imports point only down the pipeline, and no module outgrows a newcomer's reading."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "gradwatch"

# highest first; a module may import only modules of strictly lower layers (or its own folder)
LAYERS = [
    {"__main__"},
    {"cli", "web"},
    {"studies"},
    {"sweep", "report"},
    {"doctor"},
    {"train", "ensemble", "lightning", "transformers"},
    {"trainers"},
    {"watch", "keras", "tensorboard"},
    {"summary"},
    {"diagnose", "store"},
    {"records"},
    {"stats", "nets", "data", "theory"},
    {"spec"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
MAX_LINES = 400
TOO_LONG_OK: dict[str, str] = {}  # path -> why it may stay long


def _modules():
    return [p for p in SRC.rglob("*.py") if p.name != "__init__.py" or p.parent != SRC]


def _unit(path: Path) -> str:
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gradwatch"):
            parts = node.module.split(".")
            if len(parts) > 1:
                yield parts[1]
            else:
                yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("gradwatch."):
                    yield alias.name.split(".")[1]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down_the_pipeline(path):
    unit = _unit(path)
    assert unit in RANK, f"{unit}: add it to LAYERS in tests/test_architecture.py"
    for target in _imports(path):
        if target == unit or target not in RANK:
            continue
        assert RANK[target] > RANK[unit], f"{unit} imports {target}, which is not below it"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_modules_stay_short(path):
    rel = str(path.relative_to(SRC))
    if rel in TOO_LONG_OK:
        return
    assert len(path.read_text().splitlines()) <= MAX_LINES, f"{rel} is over {MAX_LINES} lines: make it a folder"


def test_public_surface_is_small():
    import gradwatch

    assert len(gradwatch.__all__) <= 8
    assert set(gradwatch.__all__) == {"Spec", "train", "watch", "diagnose", "doctor", "Store", "__version__"}


def test_public_functions_stay_functions_after_their_folders_are_imported():
    import gradwatch
    import gradwatch.diagnose.rules
    import gradwatch.doctor.treatments
    import gradwatch.train  # noqa: F401  (imports the watch folder)

    assert all(callable(getattr(gradwatch, name)) for name in ("watch", "diagnose", "doctor", "train"))


def test_every_table_is_a_plain_dict():
    from gradwatch.data import DATASETS
    from gradwatch.diagnose import REMEDIES, RULES, THRESHOLDS
    from gradwatch.doctor import TREATMENTS
    from gradwatch.nets import ACTIVATIONS, INITS, OUTPUTS
    from gradwatch.stats import STATS

    for table in (ACTIVATIONS, INITS, OUTPUTS, STATS, DATASETS, RULES, THRESHOLDS, REMEDIES, TREATMENTS):
        assert type(table) is dict and table
