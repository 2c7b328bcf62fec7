"""``gradwatch study all``: the demo's cases and every study, in one HTML report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gradwatch import sweep
from gradwatch.records import Run
from gradwatch.report.html import Page
from gradwatch.store import Store
from gradwatch.studies import STUDIES, Result, demo, module, run


def write_page(results: list[Result], out_dir: Path, demo_runs: list[Run] = ()) -> Path:
    """One page: the demo's table and key figures (if given), then each study's table, conclusion, figures."""
    page = Page("Every remedy, measured: gradwatch studies", Path(out_dir))
    if demo_runs:
        page.text("The seed experiment and its remedies ladder", "h2")
        page.table(demo.summarize(list(demo_runs)))
        for name in ("loss_curves", "gradient_flow", "seed_vs_true"):
            page.figure(name, list(demo_runs))
    for result in results:
        page.text(result.title, "h2")
        page.table(result.rows)
        page.text("Conclusion (computed from the table): " + result.conclusion)
        for fig, caption, stem in result.figures:
            page.image(fig, caption, stem)
    closing(page, results)
    return page.write()


# the studies the closing note quotes: the trainable-depth table, then each conclusion sentence
CLOSING = ("depth", "sequences", "exploding", "output-activation", "width-vs-depth", "relu-he", "criticality",
           "isometry")


def closing(page: Page, results: list[Result]) -> None:
    """The closing note: the trainable-depth table again and the conclusions, each as computed above."""
    found = {r.title: r for r in results}
    chosen = {name: found[module(name).TITLE] for name in CLOSING if module(name).TITLE in found}
    if not chosen:
        return
    page.text("Closing note", "h2")
    if "depth" in chosen:
        page.text("Trainable depth (the deepest net each remedy trains to the target loss, majority of seeds):")
        page.table(chosen["depth"].rows)
    for name, result in chosen.items():
        page.text(f"{name}: {result.conclusion}")


def run_all(store: Store, out_dir: Path, workers: int | None = None, quick: bool = False,
            on_run: Callable[[Run], None] | None = None) -> tuple[list[Result], Path]:
    """Train the demo's cases and every study (reusing stored runs), then write the report."""
    demo_runs: list[Run] = []

    def keep(run: Run) -> None:
        demo_runs.append(run)
        if on_run:
            on_run(run)

    cases = demo.jobs(epochs=3 if quick else None, seeds=(0,) if quick else demo.SEEDS)
    sweep.run_study(sweep.Study("demo", cases, thin=1, evaluate_every=1), store,
                    processes=workers or sweep.workers(), on_run=keep)
    results = [run(name, store, workers, quick, on_run) for name in STUDIES]
    return results, write_page(results, out_dir, demo_runs)
