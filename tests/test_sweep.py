"""Sweeps: a study file validated whole before any run, every run stored once however the sweep is stopped."""

import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gradwatch import sweep
from gradwatch.cli import app
from gradwatch.spec import Spec, SpecError
from gradwatch.train import train

TINY = {"data": {"n_samples": 48}, "model": {"depth": 2, "width": 4}, "train": {"epochs": 2, "batch_size": 16}}
STUDY = {"name": "tiny", "base": TINY, "grid": {"model.activation": ["sigmoid", "relu"], "train.seed": [0, 1, 2]}}
# long enough that a kill lands mid-sweep: 32 runs in ensembles of 2, each run committed on its own
LONG = {"name": "long", "base": {**TINY, "train": {"epochs": 100, "batch_size": 16}}, "chunk": 2,
        "grid": {"model.activation": ["sigmoid", "relu"], "train.seed": list(range(16))}}


def write(path, study: dict):
    path.write_text(yaml.safe_dump(study))
    return path


def keys(db) -> list[str]:
    try:
        with sqlite3.connect(db) as con:
            return [k for (k,) in con.execute("SELECT key FROM runs")]
    except sqlite3.OperationalError:  # the sweep has not created the table yet
        return []


BAD = [
    ({"grid": {"model.dept": [2]}}, "model.dept: unknown field; allowed: kind, depth, width"),
    ({"grid": {"model.depth": []}}, "grid.model.depth: got []; allowed: a non-empty list of values"),
    ({"grid": {"model.depth": ["deep"]}}, "model.depth: got 'deep'; allowed: input should be a valid integer"),
    ({"grid": {"model.activation": ["relu", "sigmod"]}}, "model.activation: got 'sigmod'; allowed: sigmoid, tanh"),
    ({"grids": {}}, "grids: unknown field; allowed: name, base, grid, list"),
    ({"table": {"rows": ["model.width"]}}, "table: got 'model.width'; allowed: a field the study varies"),
]


@pytest.mark.parametrize(("change", "message"), BAD)
def test_malformed_study_is_one_line_before_any_run_and_the_store_untouched(tmp_path, tmp_store, change, message):
    tmp_store.put_run(train(Spec().replace(**{"model.depth": 1, "train.epochs": 1})))
    before = tmp_store.path.read_bytes()
    path = write(tmp_path / "bad.yaml", {**STUDY, **change})
    with pytest.raises(SpecError) as err:
        sweep.load_study(path)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    out = CliRunner().invoke(app, ["sweep", str(path), "--store", str(tmp_store.path)])
    assert isinstance(out.exception, SpecError)
    assert tmp_store.path.read_bytes() == before


def test_sweep_command_has_help():
    out = CliRunner().invoke(app, ["sweep", "--help"])
    assert out.exit_code == 0 and "--backend" in out.stdout and "--workers" in out.stdout


def test_cli_prints_a_bad_study_in_one_red_line_and_exits_2(tmp_path):
    path = write(tmp_path / "bad.yaml", {**STUDY, "grid": {"model.depth": []}})
    out = subprocess.run([sys.executable, "-m", "gradwatch", "sweep", str(path), "--store", str(tmp_path / "r.db")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "error: grid.model.depth: got []; allowed: a non-empty list of values"
    assert not (tmp_path / "r.db").exists()


def test_grid_and_list_make_one_job_per_distinct_spec_named_without_the_seed():
    study = sweep.study({**STUDY, "list": [{"model.depth": 2}, {"model.depth": 3}, {"model.depth": 2}]})
    assert len(study.jobs) == 2 * 2 * 3 and len({spec.key() for *_, spec in study.jobs}) == 12
    assert study.varied == ["model.activation", "train.seed", "model.depth"]
    assert study.jobs[0][:2] == ("activation=sigmoid depth=2", "tiny")
    assert study.rows == ["model.activation", "model.depth"]


def test_jobs_are_grouped_into_ensembles_by_shape():
    base = Spec().replace(**{"train.epochs": 1})
    jobs = [("a", "", base), ("b", "", base.replace(**{"model.activation": "relu"})),
            ("c", "", base.replace(**{"model.depth": 2})),
            ("d", "", base.replace(**{"model.kind": "rnn", "data.name": "recall"})),  # a recurrent net reads sequences
            ("e", "", base.replace(**{"train.seed": 1}))]
    assert [[name for name, *_ in chunk] for chunk in sweep.chunks(jobs, 2)] == [["a", "b"], ["e"], ["c"], ["d"]]


def test_sweep_stores_each_run_once_and_a_rerun_adds_nothing(tmp_path, tmp_store):
    study = sweep.load_study(write(tmp_path / "s.yaml", STUDY))
    ticks = []
    outcome = sweep.run_study(study, tmp_store, on_progress=lambda done, total, reused, rate: ticks.append(
        (done, total, reused)))
    assert ticks[-1] == (6, 6, 0) and len(outcome.fresh) == 6 and outcome.reused == 0
    assert sorted(keys(tmp_store.path)) == sorted(spec.key() for *_, spec in study.jobs)
    assert {(r["name"], r["group"]) for r in tmp_store.runs()} == {("activation=sigmoid", "tiny"),
                                                                    ("activation=relu", "tiny")}
    again = sweep.run_study(study, tmp_store)
    assert (again.fresh, again.reused) == ([], 6) and len(keys(tmp_store.path)) == 6
    rows = sweep.summarize(study, tmp_store)
    assert [(r["activation"], r["runs"]) for r in rows] == [("sigmoid", 3), ("relu", 3)]
    mine = [r["summary"]["final_loss"] for r in tmp_store.runs() if r["name"] == "activation=relu"]
    assert rows[1]["final_loss"] == pytest.approx(sorted(mine)[1])  # the median over the seeds


def test_summary_table_rows_by_columns():
    study = sweep.study({**STUDY, "grid": {**STUDY["grid"], "model.depth": [1, 2]},
                         "table": {"rows": "model.depth", "columns": "model.activation", "value": "accuracy"}})
    assert (study.rows, study.columns, study.value) == (["model.depth"], "model.activation", "accuracy")


def interrupted(tmp_path, sig) -> tuple[int, int]:
    """Start the long sweep, send ``sig`` at a random moment after its first commit; (runs then, exit code)."""
    path, db = write(tmp_path / "long.yaml", LONG), tmp_path / "runs.db"
    cmd = [sys.executable, "-m", "gradwatch", "sweep", str(path), "--store", str(db), "--out", str(tmp_path / "rep")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,  # Ctrl-C as in a terminal,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even if we ignore it
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not (db.exists() and keys(db)):
        time.sleep(0.02)
    time.sleep(random.uniform(0, 0.5))
    proc.send_signal(sig)
    code = proc.wait(timeout=60)
    stored = len(keys(db))
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    expected = sorted(spec.key() for *_, spec in sweep.load_study(path).jobs)
    assert sorted(keys(db)) == expected  # exactly the grid's runs: none lost, none twice
    return stored, code


def test_sigkill_mid_sweep_loses_no_run(tmp_path):
    stored, code = interrupted(tmp_path, signal.SIGKILL)
    assert code == -signal.SIGKILL and 0 < stored < 32


def test_ctrl_c_mid_sweep_loses_no_run(tmp_path):
    stored, code = interrupted(tmp_path, signal.SIGINT)
    assert code == 130 and 0 < stored < 32


def test_cli_prints_the_grid_size_and_a_rerun_says_every_run_was_reused(tmp_path):
    path, db = write(tmp_path / "s.yaml", STUDY), str(tmp_path / "r.db")
    first = CliRunner().invoke(app, ["sweep", str(path), "--store", db, "--out", str(tmp_path / "rep")])
    assert first.exit_code == 0, first.output
    assert first.output.startswith("sweep tiny: 6 runs in 2 cases\n")
    assert "6 trained, 0 reused from the store." in first.output
    again = CliRunner().invoke(app, ["sweep", str(path), "--store", db, "--out", str(tmp_path / "rep")])
    assert "tiny: 6 reused" in again.output and "0 trained, 6 reused from the store." in again.output
    assert len(keys(db)) == 6


def test_grid_over_the_limit_is_refused_with_its_count_before_any_spec_is_built(tmp_path, monkeypatch):
    huge = {**STUDY, "grid": {"model.width": list(range(1, 101)), "train.seed": list(range(101))}}
    path, db = write(tmp_path / "huge.yaml", huge), tmp_path / "r.db"
    monkeypatch.setattr(Spec, "replace", lambda *a, **k: pytest.fail("a spec was built"))
    out = subprocess.run([sys.executable, "-m", "gradwatch", "sweep", str(path), "--store", str(db)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and not db.exists()
    assert out.stderr.strip() == "error: grid: 10,100 runs; allowed: at most 10,000 (pass --yes to run them anyway)"
    with pytest.raises(SpecError, match="grid: 10,100 runs"):
        sweep.load_study(path)


def test_yes_lifts_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "MAX_RUNS", 5)
    path, db = write(tmp_path / "s.yaml", STUDY), str(tmp_path / "r.db")
    refused = CliRunner().invoke(app, ["sweep", str(path), "--store", db])
    assert isinstance(refused.exception, SpecError) and str(refused.exception).startswith("grid: 6 runs;")
    ran = CliRunner().invoke(app, ["sweep", str(path), "--store", db, "--yes", "--out", str(tmp_path / "rep")])
    assert ran.exit_code == 0 and len(keys(db)) == 6


def test_study_bigger_than_the_machine_is_refused_in_one_line_and_nothing_written(tmp_path):
    big = {**STUDY, "base": {**TINY, "model": {"depth": 64, "width": 4096}}}
    parameters = 3 * 4096 + 63 * 4097 * 4096 + 4097  # 2 inputs (+ bias), 63 square layers, 1 output
    path, db = write(tmp_path / "big.yaml", big), tmp_path / "r.db"
    out = subprocess.run([sys.executable, "-m", "gradwatch", "sweep", str(path), "--store", str(db)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and not db.exists() and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith("error: memory: the sweep needs about ")
    assert f"ensembles of up to 6 nets of {parameters:,} parameters" in out.stderr
    assert "allowed: a smaller chunk" in out.stderr


def test_reused_runs_are_labelled_into_the_asking_sweep(tmp_path, tmp_store):
    first = sweep.load_study(write(tmp_path / "first.yaml", STUDY))
    sweep.run_study(first, tmp_store)
    wider = {**STUDY, "name": "wider", "grid": {**STUDY["grid"], "model.depth": [2, 3]}}  # depth 2 is TINY's
    second = sweep.load_study(write(tmp_path / "second.yaml", wider))
    ticks = []
    outcome = sweep.run_study(second, tmp_store, on_progress=lambda *tick: ticks.append(tick[:3]))
    assert ticks[0] == (0, 6, 6) and outcome.reused == 6 and len(outcome.fresh) == 6
    assert len(keys(tmp_store.path)) == 12  # nothing stored twice
    mine = tmp_store.runs("wider")
    assert sorted((r["name"], r["key"]) for r in mine) == sorted((n, s.key()) for n, _, s in second.jobs)
    assert {r["group"] for r in mine} == {"wider"}
    assert len(tmp_store.runs("tiny")) == 6 and {r["name"] for r in tmp_store.runs("tiny")} == {
        "activation=sigmoid", "activation=relu"}  # the first sweep keeps its runs and names
    listed = CliRunner().invoke(app, ["runs", "--group", "wider", "--store", str(tmp_store.path)])
    assert "12 run(s)" in listed.output
    assert sweep.run_study(second, tmp_store).reused == 12 and len(keys(tmp_store.path)) == 12


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_example_studies_load(path):
    study = sweep.load_study(path)
    assert study.jobs and len({spec.key() for *_, spec in study.jobs}) == len(study.jobs)
    sweep.check_memory(study, processes=2)  # no false alarm on what we ship


def test_memory_check_sizes_an_ensemble_from_one_member_because_members_share_every_term():
    from gradwatch.studies import criticality
    from gradwatch.sweep.local import chunks
    from gradwatch.sweep.run import _member_bytes

    jobs = criticality.next_jobs([], quick=True)  # members differ in activation, init, sigma_w^2, seed
    sizes = [{_member_bytes(s.data, s.model, s.train.batch_size, s.train.epochs, 10) for *_, s in part}
             for part in chunks(jobs)]
    assert len(sizes) == 2 and all(len(size) == 1 for size in sizes)  # one size per ensemble
    assert sizes[0] != sizes[1]  # and the depths differ
