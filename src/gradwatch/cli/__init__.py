"""The ``gradwatch`` command: each command parses, calls the library, prints. Nothing else.

User mistakes (bad spec values, unknown runs, unreadable files, click's usage errors) print one red
line and exit 2, never a traceback. A command imports what it needs when it runs (torch, sklearn and
matplotlib take seconds), so ``gradwatch --help`` and a mistyped flag answer at once.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Literal, NoReturn

import typer
from rich.console import Console

from gradwatch.cli.errors import click_errors, usage_line, user_error

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="See, diagnose and fix vanishing and exploding gradients.")
console = Console(width=None if sys.stdout.isatty() else 160)  # pipes and logs get whole tables
errors = Console(stderr=True, soft_wrap=True)
STORE = typer.Option(None, "--store", help="SQLite run store (default ./gradwatch-runs/runs.db or $GRADWATCH_STORE)")
REPORTS = Path("gradwatch-report")  # each command writes its own folder under it: demo/, sweep-NAME/, ...
OUT = typer.Option(None, "--out", help="folder for the HTML report and PNGs (default gradwatch-report/COMMAND)")
PAGE = 50  # runs a page of `gradwatch runs` lists
REPORT_MAX = 500  # runs one report reads whole: ~2 MB of records each for a seed-sized run


def refuse(line: str) -> NoReturn:
    """Raise a user mistake as the spec's one-line SpecError (imported here: pydantic costs ~0.3 s)."""
    from gradwatch.spec import SpecError

    raise SpecError(line)


def _store(path: Path | None, write: bool = False):
    """The run store; ``write`` refuses one that cannot be written now, before anything trains."""
    from gradwatch.store import Store

    store = Store(path)
    if write:
        store.check_writable()
    return store


def out_dir(out: Path | None, default: str) -> Path:
    """The report folder, made now: a bad --out is refused before any training, not after."""
    from gradwatch.spec import file_part

    path = out or REPORTS / file_part(default)  # a sweep called ``a/b`` writes ``sweep-a_b``
    if path.exists() and not path.is_dir():
        refuse(f"--out: got {str(path)!r} (an existing file); allowed: a folder, new or existing")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        refuse(f"--out: got {str(path)!r} ({exc.strerror}); allowed: a folder that can be written")
    return path


def progress():
    """A progress bar with runs done, elapsed time and runs/s."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[rate]}"), console=console, transient=False)


def print_rows(title: str, rows: list[dict]) -> None:
    """A rich table of dict rows; floats in 3 significant digits; cells never cut, headers may wrap."""
    from rich.table import Table

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
    out: Path = OUT,
    epochs: int = typer.Option(None, min=1, help="override the seed's 100 epochs (quick looks)"),
    seeds: int = typer.Option(3, min=1, help="seeds per case"),
    workers: int = typer.Option(None, min=1, help="worker processes (default: one per core)"),
    doctor: bool = typer.Option(True, "--doctor/--no-doctor", help="also run the doctor on the deep sigmoid net"),
    store: Path = STORE,
) -> None:
    """Reproduce the seed experiment and its remedies: table, JSON and an HTML report."""
    from gradwatch.report.html import write_demo_report
    from gradwatch.studies import demo as study
    from gradwatch.sweep import run_each

    db, runs, out = _store(store, write=True), [], out_dir(out, "demo")
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
    rx = None
    if doctor:
        from gradwatch.doctor import doctor as treat
        from gradwatch.doctor.patients import from_spec
        from gradwatch.spec import Spec

        rx = treat(*from_spec(Spec()), seeds=seeds)
        console.print(str(rx), markup=False, highlight=False)
    console.print(f"report: {write_demo_report(runs, rows, out, rx).resolve()}")


@app.command("train")
def train_cmd(
    spec_file: Path = typer.Option(None, "--spec", help="YAML/JSON spec file"),
    flags: list[str] = typer.Argument(None, help="overrides such as model.depth=3 train.optimizer=sgd"),
    name: str = typer.Option("", help="a name to find the run by"),
    store: Path = STORE,
) -> None:
    """Train one spec, store it, print its summary and diagnosis."""
    from gradwatch.diagnose import diagnose
    from gradwatch.spec import Spec, check_name, from_flags
    from gradwatch.train import train

    check_name(name)
    spec = from_flags(flags or [], Spec.from_file(spec_file) if spec_file else None)
    db = _store(store, write=True)
    run = train(spec, name=name)
    db.put_run(run)
    _print_run(run, diagnose(run.records))


@app.command()
def runs(store: Path = STORE, group: str = typer.Option(None, help="only runs of this group"),
         page: int = typer.Option(1, min=1, help=f"page of {PAGE} runs, newest first")) -> None:
    """List stored runs, newest first, a page at a time."""
    db = _store(store)
    total = db.count(group)
    if not total:
        if group is None:
            return console.print("no runs stored yet")
        groups = ", ".join(db.groups()) or "none yet"
        refuse(f"--group: got {group!r}; allowed: a group with stored runs ({groups})")
    pages = -(-total // PAGE)
    if page > pages:
        refuse(f"--page: got {page}; allowed: 1 to {pages} ({total} run(s), {PAGE} a page)")
    rows = [{"id": r["id"], "name": r["name"], "group": r["group"], "status": r["status"],
             "final_loss": r["summary"].get("final_loss") or float("nan"), "verdict": r["summary"].get("verdict", "")}
            for r in db.runs(group, limit=PAGE, offset=(page - 1) * PAGE, newest_first=True)]
    more = f"; --page {page + 1} for older ones" if page < pages else ""
    print_rows(f"{total} run(s): page {page} of {pages}, newest first{more}", rows)


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

    stored = _store(store).get(run)
    print_findings(diagnose(stored.records), stored)


@app.command("doctor")
def doctor_cmd(
    target: list[str] = typer.Argument(None, help="spec overrides (model.depth=10 model.activation=sigmoid) "
                                       "or module:make_model, a function returning a fresh nn.Module"),
    data: str = typer.Option(None, "--data", help="with module:make_model: module:name of (X, Y) or a DataLoader"),
    loss: str = typer.Option("bce", "--loss", help="with module:make_model: bce, cross_entropy, mse or module:name"),
    steps: int = typer.Option(300, min=40, help="training steps per trial"),
    seeds: int = typer.Option(3, min=1, help="seeds per treatment"),
    workers: int = typer.Option(1, min=1, help="worker processes for the trials"),
) -> None:
    """Diagnose a model, try the remedies on it and rank them by measured effect."""
    from gradwatch.doctor import doctor
    from gradwatch.doctor.patients import patient

    rx = doctor(*patient(target or [], data, loss), steps=steps, seeds=seeds, workers=workers)
    console.print(str(rx), markup=False, highlight=False)


@app.command("report")
def report_cmd(
    refs: list[str] = typer.Argument(None, help="run ids, id prefixes or names (default: every stored run)"),
    out: Path = OUT,
    group: str = typer.Option(None, help="only runs of this group"),
    store: Path = STORE,
) -> None:
    """Write a self-contained HTML report (and PNGs) of stored runs."""
    from gradwatch.report.html import write_report

    db = _store(store)
    ids = [db.resolve(ref) for ref in refs] if refs else [r["id"] for r in db.runs(group, limit=REPORT_MAX + 1)]
    if not ids:
        groups = ", ".join(db.groups()) or "none yet"
        refuse(f"--group: got {group!r}; allowed: a group with stored runs ({groups})")
    if len(ids) > REPORT_MAX:  # each run's records are read whole: 100,000 runs would not fit in memory
        refuse(f"runs: got {len(ids) if refs else db.count(group)}; allowed: at most {REPORT_MAX} in one report "
               "(name them, or choose a --group)")
    out = out_dir(out, f"group-{group}" if group else "report")
    chosen = [db.get(run_id) for run_id in ids]
    console.print(f"report: {write_report(chosen, out, title=f'gradwatch report: {len(chosen)} run(s)').resolve()}")


@app.command()
def serve(host: str = typer.Option("127.0.0.1", help="address to bind (127.0.0.1: this machine only)"),
          port: int = typer.Option(8000, min=1, max=65535), store: Path = STORE) -> None:
    """Open the playground: train a net in the browser and watch its gradients live."""
    import os

    import uvicorn

    if store:
        os.environ["GRADWATCH_STORE"] = str(store)  # where the page's Save puts runs
    os.environ["GRADWATCH_HOST"] = host  # the name the app answers to besides loopback's
    console.print(f"gradwatch playground: http://{host}:{port}/  (Ctrl+C stops it)")
    uvicorn.run("gradwatch.web.app:create_app", factory=True, host=host, port=port, log_level="warning")


def print_findings(findings, run=None) -> None:
    """Findings in plain words (text, not rich markup), then the run's own ratio at init where a finding quotes one."""
    lines = [str(f) for f in findings] or ["no findings: gradients look healthy"]
    ratio = (run.summary.get("grad_ratio_first_last") if run else None) or math.nan
    if math.isfinite(ratio) and any("grad_ratio_first_last" in f.evidence for f in findings):
        lines.append(f"(a finding's first/last ratio is a median over the whole run. At initialisation this run "
                     f"(train.seed {run.spec.get('train', {}).get('seed', '?')}) has {ratio:.3g}: its grad_ratio_"
                     "first_last, the ratio tables and reports print, there as the median over a case's seeds)")
    console.print("\n".join(lines), markup=False, highlight=False)


@app.command()
def study(
    name: str = typer.Argument(..., help="all, depth, dying-relu, sequences, exploding, output-activation, "
                               "width-vs-depth, relu-he, criticality or isometry"),
    out: Path = OUT,
    quick: bool = typer.Option(False, help="tiny budgets: checks the machinery in seconds, proves nothing"),
    workers: int = typer.Option(None, min=1, help="worker processes (default: one per core)"),
    json_path: Path = typer.Option(None, "--json", help="also write what the study measured to this JSON file"),
    store: Path = STORE,
) -> None:
    """Run a built-in study (or all of them): tables, conclusions computed from data, an HTML report."""
    from gradwatch.studies import QUICK, STUDIES, run
    from gradwatch.studies.all import run_all, write_page

    if name != "all" and name not in STUDIES:
        refuse(f"study: got {name!r}; allowed: all, {', '.join(STUDIES)}")
    db, out = _store(store, write=True), out_dir(out, f"study-{name}" + ("-quick" if quick else ""))
    if quick:
        console.print(f"[bold yellow]{QUICK}[/]")
    started = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"study {name}" + (" (quick)" if quick else ""), total=None, rate="")
        tick = lambda run: bar.update(task, advance=1)  # noqa: E731
        if name == "all":
            results, page = run_all(db, out, workers, quick, tick)
        else:
            results, page = [run(name, db, workers, quick, tick)], None
    for result in results:
        print_rows(result.title + (" (quick)" if quick else ""), result.rows)
        console.print(result.conclusion, markup=False)
    console.print(f"report: {(page or write_page(results, out)).resolve()}")
    if json_path:
        measured = {r.title: r.measured or {"rows": r.rows} for r in results}
        chosen = measured if name == "all" else next(iter(measured.values()))
        json_path.write_text(json.dumps({**chosen, "seconds": round(time.perf_counter() - started, 1)}, indent=2))
        console.print(f"wrote {json_path}")


@app.command()
def sweep(
    study_file: Path = typer.Argument(..., help="STUDY.yaml: name, base spec, grid and/or list over spec fields"),
    backend: Literal["local", "ray"] = typer.Option("local", help="train here, or send ensembles to Ray"),
    address: str = typer.Option(None, help="Ray cluster address (default: start a local Ray)"),
    workers: int = typer.Option(1, min=1, help="local worker processes, one ensemble each at a time"),
    yes: bool = typer.Option(False, "--yes", help="run a grid of any size (else over 10,000 runs is refused)"),
    out: Path = OUT,
    store: Path = STORE,
) -> None:
    """Train every spec of a study file as stacked ensembles, resumably; print medians, write a report."""
    from gradwatch import sweep as sw
    from gradwatch.report.html import write_report

    plan = sw.load_study(study_file, limit=None if yes else sw.MAX_RUNS)  # validated whole, before any store opens
    console.print(sw.preflight(plan, workers, backend), highlight=False)  # the grid's size, or refused: too big
    db, out = _store(store, write=True), out_dir(out, f"sweep-{plan.name}")
    with progress() as bar:
        task = bar.add_task(f"sweep {plan.name}", total=None, rate="")
        tick = lambda done, total, reused, rate: bar.update(  # noqa: E731
            task, completed=done, total=total, rate=f"{rate:.1f} runs/s", description=f"{plan.name}: {reused:,} reused")
        outcome = sw.run_study(plan, db, backend, address, workers, tick)
    print_rows(f"{plan.name}: medians over seeds", sw.summarize(plan, db))
    page = write_report(sw.report_runs(plan, db, outcome.fresh), out, title=f"gradwatch sweep: {plan.name}")
    console.print(f"{outcome}. report: {page.resolve()}; all runs: gradwatch report --group '{plan.name}'")


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
    print_findings(findings, run)


def main() -> None:
    """Console entry point: every user mistake, click's usage errors included, as one red line, exit 2."""
    usage, abort = click_errors()
    try:
        code = app(standalone_mode=False, prog_name="gradwatch")  # returns, not raises, Ctrl-C's exit code (130)
    except abort:
        sys.exit(130)
    except usage as exc:
        fail(usage_line(exc))
    except Exception as exc:
        line = user_error(exc)
        if line is None:
            raise
        fail(line)
    if isinstance(code, int) and code:
        sys.exit(code)


def fail(line: str) -> NoReturn:
    """Print ``error: line`` in red (its brackets are text: ``model.[bold]`` is not markup) and exit 2."""
    from rich.markup import escape

    errors.print(f"[red]error: {escape(line)}[/]", highlight=False)
    sys.exit(2)
