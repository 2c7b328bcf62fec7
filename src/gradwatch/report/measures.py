"""The numbers the report draws and quotes, read from Runs: per-layer profiles, curves, trends.

Figures and captions both call these, so a caption's number is the number its picture shows.
Everything reads Records only (the report never touches a model), indexed once per run so that
thirty runs of 26k rows each are read in milliseconds rather than scanned per layer.
"""

from __future__ import annotations

import math
import weakref
from functools import lru_cache

import torch

from gradwatch.data import Dataset, load
from gradwatch.nets import ACTIVATIONS
from gradwatch.records import Records, Run, finite_median, first_over_last
from gradwatch.spec import DataSpec
from gradwatch.summary import INIT

TRACE = "weight_trace"  # the STATS entry the weight-trace picture draws
LATE = 0.1  # "late in training" = the last tenth of the recorded steps

Rows = list[tuple[int, int, float]]  # (step, epoch, value)
_INDEX: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def index(records: Records) -> dict[tuple[str, str], Rows]:
    """(stat, layer) -> rows in recorded order; built in one pass and kept while the Records live."""
    cached = _INDEX.get(records)
    if cached and cached[0] == len(records):
        return cached[1]
    table: dict[tuple[str, str], Rows] = {}
    for step, epoch, layer, stat, value in records.rows:
        table.setdefault((stat, layer), []).append((step, epoch, value))
    _INDEX[records] = (len(records), table)
    return table


def label(run: Run) -> str:
    """What a run is called in legends: its name (a demo case), else its id."""
    return run.name or run.id


def by_case(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by label, in first-seen order: the seeds of one case together."""
    cases: dict[str, list[Run]] = {}
    for run in runs:
        cases.setdefault(label(run), []).append(run)
    return cases


def representative(runs: list[Run]) -> Run:
    """The seed whose final loss is the median one (the lower middle for an even count)."""
    ranked = sorted(runs, key=lambda r: _finite(r.summary.get("final_loss"), math.inf))
    return ranked[(len(ranked) - 1) // 2]


def final_loss(runs: list[Run]) -> float:
    """Median final training loss over the seeds (what the demo's table shows)."""
    return finite_median(r.summary.get("final_loss") for r in runs)


def _finite(value, default: float) -> float:
    return value if isinstance(value, int | float) and math.isfinite(value) else default


def dense_layers(records: Records) -> list[str]:
    """Weight layers input to output (``records.layers("grad_norm")`` order), norms left out.

    The Dense layers are those with the seed's per-layer measures; without them every layer counts.
    """
    layers = records.layers("grad_norm")
    dense = set(records.layers("weight_grad_norm")) | set(records.layers("seed_gradient"))
    return [name for name in layers if name in dense] or layers


def profile(runs: list[Run], stat: str, when: str, layers: list[str] | None = None) -> dict[str, float]:
    """layer -> ``stat`` at initialisation (``when="init"``, first record) or ``"late"``; median over runs.

    Late is the median over the last tenth of the recorded steps, which smooths per-step noise and
    still catches every every-10-steps statistic several times.
    """
    layers = layers if layers is not None else runs[0].records.layers(stat)
    out = {}
    for layer in layers:
        out[layer] = finite_median(_at(index(r.records).get((stat, layer), []), when) for r in runs)
    return out


def _at(rows: Rows, when: str) -> float:
    if not rows:
        return math.nan
    if when == "init":
        return rows[0][2]
    first, last = rows[0][0], rows[-1][0]
    start = last - LATE * (last - first)
    return finite_median(v for s, _, v in rows if s >= start)


def gradient_stat(runs: list[Run]) -> str:
    """The per-layer gradient norm the report draws and divides: the Dense weight matrices' (``summary.INIT``,
    biases left out) where recorded, else ``grad_norm`` (weights and biases: a watched model of one's own)."""
    return INIT if runs[0].records.layers(INIT) else "grad_norm"


def ratio(runs: list[Run], when: str = "init") -> float:
    """The report's one first/last ratio: each seed's first over last Dense layer's ``gradient_stat`` at
    ``when`` (see ``profile``), then the median over seeds.

    At ``init`` it is the median of the runs' ``grad_ratio_first_last`` (``summary.summarize`` reads the
    same norm at the same first step), so the demo table, the captions and the pages print one number.
    """
    stat = gradient_stat(runs)
    return finite_median(first_over_last(profile([r], stat, when, dense_layers(r.records))) for r in runs)


def coinciding(cases: dict[str, list[Run]], when: str) -> dict[str, str]:
    """case -> the earlier case whose gradient profile at ``when`` it equals (to 1e-6), for the cases that
    do: at initialisation the demo's SGD twins are the Adam cases' very nets, as the optimizer has not stepped."""
    seen: dict[str, list[float]] = {}
    twins = {}
    for name, mine in cases.items():
        values = list(profile(mine, gradient_stat(mine), when, dense_layers(mine[0].records)).values())
        twin = next((other for other, theirs in seen.items() if len(theirs) == len(values) and all(
            math.isclose(a, b, rel_tol=1e-6) for a, b in zip(theirs, values, strict=True))), None)
        if twin:
            twins[name] = twin
        else:
            seen[name] = values
    return twins


def curve(runs: list[Run], stat: str = "loss") -> tuple[list[int], list[float], list[float], list[float]]:
    """(epochs, median, min, max) over runs of an epoch-level scalar, up to the shortest run."""
    series = [[v for _, _, v in index(r.records).get((stat, ""), [])] for r in runs]
    n = min((len(s) for s in series), default=0)
    columns = [[s[i] for s in series] for i in range(n)]
    return (list(range(1, n + 1)), [finite_median(c) for c in columns], [min(c) for c in columns],
            [max(c) for c in columns])


def trend(runs: list[Run], window: int) -> tuple[float, float]:
    """Median loss ``window`` epochs before the end and at the end."""
    _, loss, _, _ = curve(runs)
    if not loss:
        return math.nan, math.nan
    return loss[max(len(loss) - 1 - window, 0)], loss[-1]


def traces(run: Run) -> dict[str, Rows]:
    """layer -> rows of the weight trace (one weight per Dense layer per epoch), input layer first."""
    table = index(run.records)
    return {layer: table[(TRACE, layer)] for layer in run.records.layers(TRACE)}


def sigmoid_depth(run: Run) -> int:
    """Hidden sigmoid layers of a plain (non-residual, non-normalised) MLP; 0 when the bound does not apply."""
    model = run.spec.get("model", {})
    plain = not model.get("residual") and model.get("norm", "none") == "none" and model.get("kind") == "mlp"
    return int(model.get("depth", 0)) if plain and model.get("activation") == "sigmoid" else 0


def steps(run: Run) -> int:
    """Optimizer steps the run took."""
    rows = index(run.records).get(("loss", ""), [])
    return int(run.summary.get("steps") or (rows[-1][0] if rows else 0)) or 1


def seed_vs_true(run: Run) -> tuple[dict[str, float], dict[str, float]]:
    """Per layer, per step: the seed's mean |(old - new)/lr| / steps and the true mean |gradient|.

    Both are gradients per step, so under SGD they agree when the gradient keeps its sign, while
    under Adam the first one stays near 1 (each step ~ lr) however small the second one is.
    """
    table, n = index(run.records), steps(run)
    layers = dense_layers(run.records)
    seed = {name: table.get(("seed_gradient", name), [(0, 0, math.nan)])[-1][2] / n for name in layers}
    true = {name: finite_median(v for _, _, v in table.get(("grad_mean_abs", name), [])) for name in layers}
    return seed, true


def data_spec(run: Run) -> DataSpec | None:
    return DataSpec(**run.spec["data"]) if run.spec.get("data") else None


def is_planar(run: Run) -> bool:
    """Two input features and a binary label: data we can scatter and a boundary we can draw."""
    return bool(run.spec.get("data")) and run.spec["data"].get("name") in ("moons", "circles", "spirals", "xor")


@lru_cache(maxsize=8)
def _load(text: str) -> Dataset:
    return load(DataSpec.model_validate_json(text))


def dataset(run: Run) -> Dataset:
    """The run's data, regenerated from its spec (seeded, so identical to what it trained on)."""
    return _load(data_spec(run).model_dump_json())


@lru_cache(maxsize=1)
def activations(lo: float = -5.0, hi: float = 5.0, n: int = 201) -> dict[str, tuple[list, list, list]]:
    """name -> (x, f(x), f'(x)) for every ACTIVATIONS entry; f' by autograd, not by formula."""
    out = {}
    for name, make in ACTIVATIONS.items():
        x = torch.linspace(lo, hi, n, requires_grad=True)
        y = make()(x)
        (slope,) = torch.autograd.grad(y.sum(), x)
        out[name] = (x.detach().tolist(), y.detach().tolist(), slope.tolist())
    return out
