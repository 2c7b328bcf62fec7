"""The ``gradwatch`` command: each command parses, calls the library, prints. Nothing else.

User mistakes (bad spec values, unknown runs, unreadable files) print one red line and exit 2,
never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gradwatch.spec import SpecError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="See, diagnose and fix vanishing and exploding gradients.")
console = Console(width=None if sys.stdout.isatty() else 160)  # pipes and logs get whole tables
errors = Console(stderr=True, soft_wrap=True)
STORE = typer.Option(None, "--store", help="SQLite run store (default ./gradwatch-runs/runs.db or $GRADWATCH_STORE)")


def _store(path: Path | None):
    from gradwatch.store import Store

    return Store(path)


def progress() -> Progress:
    """A progress bar with runs done, elapsed time and runs/s."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[rate]}"), console=console, transient=False)


def print_rows(title: str, rows: list[dict]) -> None:
    """A rich table of dict rows; floats in 3 significant digits; cells never cut, headers may wrap."""
    cells = [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()] for row in rows]
    table = Table(title=title)
    for i, col in enumerate(rows[0] if rows else []):
        numeric = isinstance(rows[0][col], float | int)
        table.add_column(col, justify="right" if numeric else "left", overflow="fold",
                         min_width=max(len(c[i]) for c in cells))
    for row in cells:
        table.add_row(*row)
    console.print(table)


@app.command()
def demo(
    json_path: Path = typer.Option(None, "--json", help="also write the table as JSON here"),
    out: Path = typer.Option(Path("gradwatch-report"), "--out", help="folder for the HTML report and PNGs"),
    epochs: int = typer.Option(None, help="override the seed's 100 epochs (quick looks)"),
    seeds: int = typer.Option(3, min=1, help="seeds per case"),
    workers: int = typer.Option(None, min=1, help="worker processes (default: one per core)"),
    store: Path = STORE,
) -> None:
    """Reproduce the seed experiment and its remedies: table, JSON and an HTML report."""
    from gradwatch.report.html import write_demo_report
    from gradwatch.studies import demo as study
    from gradwatch.sweep import run_each

    db, runs = _store(store), []
    jobs = study.jobs(epochs, tuple(range(seeds)))
    with progress() as bar:
        task = bar.add_task("training the seed's nets", total=len(jobs), rate="")

        def done(run):
            db.put_run(run)
            runs.append(run)
            bar.update(task, advance=1, rate=f"{len(runs) / max(bar.tasks[0].elapsed or 1e-9, 1e-9):.1f} runs/s")

        run_each(jobs, done, workers)
    rows = study.summarize(runs)
    print_rows("the seed's experiment (medians over seeds)", rows)
    if json_path:
        json_path.write_text(json.dumps({"cases": rows}, indent=2))
        console.print(f"wrote {json_path}")
    console.print(f"report: {write_demo_report(runs, rows, out).resolve()}")


@app.command("train")
def train_cmd(
    spec_file: Path = typer.Option(None, "--spec", help="YAML/JSON spec file"),
    flags: list[str] = typer.Argument(None, help="overrides such as model.depth=3 train.optimizer=sgd"),
    name: str = typer.Option("", help="a name to find the run by"),
    store: Path = STORE,
) -> None:
    """Train one spec, store it, print its summary and diagnosis."""
    from gradwatch.diagnose import diagnose
    from gradwatch.spec import Spec, from_flags
    from gradwatch.train import train

    spec = from_flags(flags or [], Spec.from_file(spec_file) if spec_file else None)
    run = train(spec, name=name)
    _store(store).put_run(run)
    _print_run(run, diagnose(run.records))


@app.command()
def runs(store: Path = STORE, group: str = typer.Option(None, help="only runs of this group")) -> None:
    """List stored runs."""
    rows = [{"id": r["id"], "name": r["name"], "group": r["group"], "status": r["status"],
             "final_loss": r["summary"].get("final_loss") or float("nan"),
             "verdict": r["summary"].get("verdict", "")} for r in _store(store).runs(group)]
    print_rows(f"{len(rows)} run(s)", rows) if rows else console.print("no runs stored yet")


@app.command()
def show(run: str = typer.Argument(..., help="run id, id prefix or name"), store: Path = STORE) -> None:
    """Print one stored run: spec, summary, per-layer gradient norms and diagnosis."""
    from gradwatch.diagnose import diagnose

    stored = _store(store).get(run)
    _print_run(stored, diagnose(stored.records))


@app.command("diagnose")
def diagnose_cmd(run: str = typer.Argument(..., help="run id, id prefix or name"), store: Path = STORE) -> None:
    """Diagnose a stored run in plain language."""
    from gradwatch.diagnose import diagnose

    findings = diagnose(_store(store).get(run).records)
    print_findings(findings)


@app.command("report")
def report_cmd(
    refs: list[str] = typer.Argument(None, help="run ids, id prefixes or names (default: every stored run)"),
    out: Path = typer.Option(Path("gradwatch-report"), "--out", help="folder for the HTML report and PNGs"),
    group: str = typer.Option(None, help="only runs of this group"),
    store: Path = STORE,
) -> None:
    """Write a self-contained HTML report (and PNGs) of stored runs."""
    from gradwatch.report.html import write_report

    db = _store(store)
    chosen = [db.get(ref) for ref in refs] if refs else [db.get(r["id"]) for r in db.runs(group)]
    if not chosen:
        raise KeyError(f"group: got {group!r}; allowed: a group with stored runs (see `gradwatch runs`)")
    console.print(f"report: {write_report(chosen, out, title=f'gradwatch report: {len(chosen)} run(s)').resolve()}")


@app.command()
def serve(host: str = typer.Option("127.0.0.1", help="address to bind (127.0.0.1: this machine only)"),
          port: int = typer.Option(8000, min=1, max=65535), store: Path = STORE) -> None:
    """Open the playground: train a net in the browser and watch its gradients live."""
    import os

    import uvicorn

    if store:
        os.environ["GRADWATCH_STORE"] = str(store)  # where the page's Save puts runs
    console.print(f"gradwatch playground: http://{host}:{port}/  (Ctrl+C stops it)")
    uvicorn.run("gradwatch.web.app:create_app", factory=True, host=host, port=port, log_level="warning")


def print_findings(findings) -> None:
    """Findings in plain words (printed as text: their brackets and numbers are not rich markup)."""
    console.print("\n".join(map(str, findings)) or "no findings: gradients look healthy", markup=False,
                  highlight=False)


@app.command()
def study(
    name: str = typer.Argument(..., help="all, depth, dying-relu, sequences, exploding, output-activation, "
                               "width-vs-depth or relu-he"),
    out: Path = typer.Option(Path("gradwatch-study"), "--out", help="folder for the HTML report and PNGs"),
    quick: bool = typer.Option(False, help="tiny budgets: checks the machinery in seconds, proves nothing"),
    workers: int = typer.Option(None, min=1, help="worker processes (default: one per core)"),
    store: Path = STORE,
) -> None:
    """Run a built-in study (or all of them): tables, conclusions computed from data, an HTML report."""
    from gradwatch.studies import STUDIES, run_study
    from gradwatch.studies.all import run_all, write_page

    if name != "all" and name not in STUDIES:
        raise SpecError(f"study: got {name!r}; allowed: all, {', '.join(STUDIES)}")
    with progress() as bar:
        task = bar.add_task(f"study {name}", total=None, rate="")
        tick = lambda run: bar.update(task, advance=1)  # noqa: E731
        db = _store(store)
        if name == "all":
            results, page = run_all(db, out, workers, quick, tick)
        else:
            results, page = [run_study(name, db, workers, quick, tick)], None
    for result in results:
        print_rows(result.title, result.rows)
        console.print(result.conclusion, markup=False)
    console.print(f"report: {(page or write_page(results, out)).resolve()}")


@app.command()
def sweep(
    study_file: Path = typer.Argument(..., help="STUDY.yaml: name, base spec, grid and/or list over spec fields"),
    backend: Literal["local", "ray"] = typer.Option("local", help="train here, or send ensembles to Ray"),
    address: str = typer.Option(None, help="Ray cluster address (default: start a local Ray)"),
    workers: int = typer.Option(1, min=1, help="local worker processes, one ensemble each at a time"),
    out: Path = typer.Option(Path("gradwatch-report"), "--out", help="folder for the HTML report and PNGs"),
    store: Path = STORE,
) -> None:
    """Train every spec of a study file as stacked ensembles, resumably; print medians, write a report."""
    from gradwatch import sweep as sw
    from gradwatch.report.html import write_report

    plan = sw.load_study(study_file)  # validated whole before the store is opened or any run starts
    db = _store(store)
    with progress() as bar:
        task = bar.add_task(f"sweep {plan.name}", total=None, rate="")
        tick = lambda done, total, rate: bar.update(task, completed=done, total=total, rate=f"{rate:.1f} runs/s")  # noqa: E731
        fresh = sw.run_study(plan, db, backend, address, workers, tick)
    print_rows(f"{plan.name}: medians over seeds", sw.summarize(plan, db))
    page = write_report(sw.report_runs(plan, db, fresh), out, title=f"gradwatch sweep: {plan.name}")
    console.print(f"report: open {page.resolve()} in a browser; all runs: gradwatch report --group '{plan.name}'")


def _print_run(run, findings) -> None:
    console.print(f"[bold]{run.name or run.id}[/] ({run.id}, {run.status})")
    if run.spec:
        console.print(json.dumps(run.spec))
    summary = {k: v for k, v in run.summary.items() if not isinstance(v, list | dict)}
    console.print(summary)
    first = run.records.at("grad_norm", 0)
    if first:
        print_rows("gradient norm per layer at the first step",
                   [{"layer": k, "grad_norm": v} for k, v in first.items()])
    print_findings(findings)


def main() -> None:
    """Console entry point: click's own errors as usual, gradwatch's user errors as one red line."""
    try:
        code = app(standalone_mode=False)  # typer returns, not raises, the exit code of Ctrl-C (130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except (SpecError, KeyError, FileNotFoundError) as exc:
        message = exc.args[0] if exc.args else str(exc)
        errors.print(f"[red]error: {message}[/]", highlight=False)
        sys.exit(2)
    if isinstance(code, int) and code:
        sys.exit(code)
