"""One self-contained HTML page per report: tables, numbered figures with data-driven captions.

PNGs are embedded as base64 data URIs (and also written beside the page), so ``index.html`` can be
mailed, attached to a CI run or opened offline; there is no script, stylesheet or font to fetch.
``write_demo_report`` tells the seed notebook's story; ``write_report`` draws any list of runs (a
sweep, a study, ``gradwatch report RUN...``); ``show`` puts a run's key figures in a notebook cell.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

from gradwatch.records import Run
from gradwatch.report import measures as m
from gradwatch.report.captions import CAPTIONS, TARGET_LOSS, ratio_note, remedy
from gradwatch.report.figures import FIGURES
from gradwatch.spec import file_part

DPI = 150  # at least; a narrower figure gets more, so that every PNG is WIDTH pixels wide or more
WIDTH = 1200  # pixels: ticks stay legible when a PNG is opened on its own or zoomed
CSS_DPI = 96  # a page shows each figure at its natural size in inches (CSS px per inch), sharp on any screen
# the demo's remedies ladder, in the order of studies.demo.CASES (report sits below studies, so it
# cannot import them; tests/test_report.py checks the two agree)
LADDER = ("he_init", "batch_norm", "residual", "leaky_relu", "elu")
BASE_CASE = "deep_sigmoid"  # the net each remedy changes
SEED_CASES = ("deep_sigmoid", "deep_sigmoid_sgd", "deep_relu", "deep_relu_sgd")  # Adam beside SGD
KEY_FIGURES = ("loss_curves", "gradient_flow", "layer_health", "boundaries")  # what show() draws
MAX_HEALTH = 40  # per-case layer_health figures in a generic report: every case of the demo or a study; a
# sweep of hundreds of cases gets the first 40 and a line saying so (each figure is ~0.1 MB and ~1 s)
STYLE = ("body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px}"
         "td.num{text-align:right;font-variant-numeric:tabular-nums}figure{margin:1.5em 0}"
         "img{max-width:100%}figcaption{font-size:0.92em;line-height:1.4}")


class Page:
    """A page under construction: paragraphs, tables and numbered figures, rendered once at the end."""

    def __init__(self, title: str, out_dir: Path | None = None):
        self.title, self.out_dir, self.parts, self.count = title, out_dir, [f"<h1>{html.escape(title)}</h1>"], 0
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            for stale in out_dir.glob("fig[0-9][0-9]_*.png"):  # an earlier report's figures, numbered otherwise
                stale.unlink()

    def text(self, text: str, tag: str = "p") -> None:
        self.parts.append(f"<{tag}>{html.escape(text)}</{tag}>")

    def table(self, rows: list[dict]) -> None:
        """Dict rows as a table; floats to 3 significant digits, as the terminal prints them."""
        if not rows:
            return
        head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
        body = "".join("<tr>" + "".join(_cell(v) for v in row.values()) + "</tr>" for row in rows)
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def figure(self, name: str, runs: list[Run], stem: str = "") -> int:
        """Draw ``FIGURES[name]`` with its caption as the next numbered figure; returns its number."""
        return self.image(FIGURES[name](runs), CAPTIONS[name](runs), stem or name)

    def image(self, fig, caption: str, stem: str) -> int:
        """Any matplotlib Figure with its caption as the next numbered figure; returns its number.

        ``stem`` names the PNG written beside the page, made safe as a file name (a study's run
        ``adding/rnn`` is ``figNN_..._adding_rnn.png``); the page itself shows the name as it is.
        """
        self.count += 1
        buffer = io.BytesIO()
        width = fig.get_figwidth()  # inches
        fig.savefig(buffer, format="png", dpi=max(DPI, math.ceil(WIDTH / width)))
        png = buffer.getvalue()
        if self.out_dir is not None:
            (self.out_dir / f"fig{self.count:02d}_{file_part(stem)}.png").write_bytes(png)
        src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        self.parts.append(f'<figure id="fig{self.count}"><img alt="{html.escape(stem)}" '
                          f'style="width:{width * CSS_DPI:.0f}px" src="{src}">'
                          f"<figcaption><b>Figure {self.count}.</b> {html.escape(caption)}</figcaption></figure>")
        return self.count

    def body(self) -> str:
        return "\n".join(self.parts)

    def write(self) -> Path:
        """``out_dir/index.html``: the whole page, images inline."""
        path = self.out_dir / "index.html"
        path.write_text(f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
                        f"<title>{html.escape(self.title)}</title><style>{STYLE}</style></head>"
                        f"<body>\n{self.body()}\n</body></html>\n", encoding="utf-8")
        return path


def _cell(value) -> str:
    if isinstance(value, float):
        return f'<td class="num">{value:.3g}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def change(spec: dict, base: dict) -> str:
    """What ``spec`` changes from ``base``, e.g. ``model.init=he_normal`` (seeds ignored)."""
    mine, theirs = _flat(spec), _flat(base)
    diff = [f"{k}={v}" for k, v in mine.items() if theirs.get(k) != v and not k.endswith(".seed")]
    return ", ".join(diff)


def _summary_rows(runs: list[Run]) -> list[dict]:
    keys = ("final_loss", "accuracy", "grad_ratio_first_last")
    return [{"name": m.label(r), "id": r.id, "status": r.status,
             **{k: float(r.summary.get(k) if r.summary.get(k) is not None else math.nan) for k in keys},
             "verdict": r.summary.get("verdict", "")} for r in runs]


def write_report(runs: list[Run], out_dir: str | Path, title: str = "gradwatch report") -> Path:
    """Report on any runs (a sweep, a study, stored runs); returns the path of ``out_dir/index.html``."""
    if not runs:
        raise ValueError("runs: got none; allowed: one or more Runs")
    page = Page(title, Path(out_dir))
    cases = m.by_case(runs)
    page.text(f"{len(runs)} run(s) in {len(cases)} case(s); runs with the same name are seeds of one case "
              "and are drawn as their median.")
    page.table(_summary_rows(runs))
    page.text(ratio_note(runs))
    if m.is_planar(runs[0]):
        page.figure("data", runs)
    page.figure("loss_curves", runs)
    page.figure("gradient_flow", runs)
    page.figure("seed_vs_true", runs)
    page.figure("weight_traces", runs)
    if any("boundary" in r.summary for r in runs):
        page.figure("boundaries", runs)
    if len(cases) > MAX_HEALTH:
        page.text(f"Layer health of the first {MAX_HEALTH} of {len(cases)} cases; `gradwatch report NAME` draws "
                  "any other.")
    for name, mine in list(cases.items())[:MAX_HEALTH]:
        page.figure("layer_health", mine, stem=f"layer_health_{name}")
    return page.write()


def write_demo_report(runs: list[Run], rows: list[dict], out_dir: str | Path, prescription=None) -> Path:
    """The seed notebook's story, measured: table, seven figures, the remedies ladder; returns index.html.

    ``prescription``: ``gradwatch.doctor``'s on the deep sigmoid net, shown as its own section.
    """
    if not runs:
        raise ValueError("runs: got none; allowed: the demo's Runs")
    page = Page("Vanishing gradients, measured: the seed experiment and its remedies", Path(out_dir))
    cases = m.by_case(runs)
    seeds = max(len(mine) for mine in cases.values())
    epochs = len(m.curve(runs[:1])[0])
    page.text(f"{len(runs)} runs: {len(cases)} cases x {seeds} seed(s), {epochs} epochs each. The table gives "
              "medians over seeds: first_layer_grad is the seed's mean |(old - new)/lr| of the first layer, "
              "first_layer_pct_change its median % change, grad_ratio_first_last the first/last ratio below.")
    page.table(rows)
    page.text(ratio_note(runs))
    page.figure("data", runs)
    page.figure("activations", runs)
    page.figure("loss_curves", runs)
    page.figure("gradient_flow", runs)
    pairs = [r for r in runs if m.label(r) in SEED_CASES] or runs
    page.figure("seed_vs_true", pairs)
    page.figure("weight_traces", runs)
    page.figure("boundaries", runs)
    _ladder(page, cases)
    if prescription is not None:
        page.text("The doctor: the remedies tried on the deep sigmoid net", tag="h2")
        page.text(f"gradwatch.doctor trained the untreated net and each remedy its findings name from "
                  f"{prescription.seeds} seed(s) for {prescription.steps} steps on the same batches, ranked by final "
                  f"loss (median over seeds). Findings: "
                  + "; ".join(str(f).splitlines()[0] for f in prescription.findings) + ".")
        page.table(prescription.rows())
    return page.write()


def _ladder(page: Page, cases: dict[str, list[Run]]) -> None:
    """One sentence per remedy; a layer_health figure for each that misses the target loss."""
    ladder = [name for name in LADDER if name in cases]
    if not ladder:
        return
    base = cases[BASE_CASE][0].spec if BASE_CASE in cases else {}
    page.text("The remedies ladder", tag="h2")
    failing = [n for n in ladder if not m.final_loss(cases[n]) <= TARGET_LOSS]
    numbers = {name: page.count + 1 + i for i, name in enumerate(failing)}
    for name in ladder:
        page.text(remedy(name, cases[name], numbers.get(name), change(cases[name][0].spec, base)))
    for name in failing:
        page.figure("layer_health", cases[name], stem=f"layer_health_{name}")


class Shown:
    """A run's key figures for a notebook cell: Jupyter calls ``_repr_html_``; nothing is written."""

    def __init__(self, runs: list[Run]):
        self.runs = runs

    def _repr_html_(self) -> str:
        page = Page(", ".join(m.by_case(self.runs)))
        for name in KEY_FIGURES:
            if name != "boundaries" or any("boundary" in r.summary for r in self.runs):
                page.figure(name, self.runs)
        return page.body()


def show(run: Run | list[Run]) -> Shown:
    """Draw a run (or the seeds of one case) inline in Jupyter.

    Examples:
        >>> from gradwatch import report
        >>> report.show(gradwatch.train(gradwatch.Spec()))
    """
    return Shown(run if isinstance(run, list) else [run])
