import math
import os
import signal
import subprocess
import sys
import time

import pytest

from gradwatch.records import Records, Run
from gradwatch.spec import SpecError
from gradwatch.store import Store


def _run(n_rows: int = 5, name: str = "r") -> Run:
    records = Records()
    for step in range(n_rows):
        records.add(step, 0, "grad_norm", {"dense1": 0.1 * step, "out": math.nan if step == 2 else 1.0})
    return Run(records=records, spec={"model": {"depth": 1}}, summary={"final_loss": 0.5}, name=name, key="k1")


def test_round_trip_keeps_spec_records_summary_and_nan(tmp_store):
    run = _run()
    tmp_store.put_run(run)
    back = tmp_store.get(run.id[:6])
    assert back.spec == run.spec and back.summary == run.summary and back.name == "r"
    assert len(back.records) == len(run.records)
    for a, b in zip(back.records.rows, run.records.rows, strict=True):
        assert a[:4] == b[:4] and (a[4] == b[4] or (math.isnan(a[4]) and math.isnan(b[4])))
    assert tmp_store.has("k1") and not tmp_store.has("other")
    assert tmp_store.get("r").id == run.id  # by name


def test_unknown_run_is_a_one_line_key_error(tmp_store):
    with pytest.raises(KeyError, match="run: got 'nope'; allowed"):
        tmp_store.get("nope")


WRITER = """
import sys
from gradwatch.records import Records, Run
from gradwatch.spec import SpecError
from gradwatch.store import Store
store = Store(sys.argv[1])
i = 0
while True:
    records = Records()
    for step in range(2000):
        records.add(step, 0, "grad_norm", {f"dense{j}": float(step) for j in range(10)})
    store.put_run(Run(records=records, name=f"run{i}"))
    print(i, flush=True)
    i += 1
"""


def test_process_killed_mid_write_leaves_every_finished_run_whole(tmp_path):
    path = tmp_path / "runs.db"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    proc.stdout.readline()  # at least two runs committed; the third is being written
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = Store(path)
    runs = store.runs()
    assert len(runs) >= 2
    for head in runs:
        assert len(store.get(head["id"]).records) == 20_000  # no half-written run


def test_summary_arrays_are_read_only_by_get(tmp_store):
    run = _run()
    run.summary = {"final_loss": 0.5, "boundary": {"p": [[0.1, 0.9]]}, "first_weights_start": [[1.0]]}
    tmp_store.put_run(run)
    assert tmp_store.runs()[0]["summary"] == {"final_loss": 0.5}  # a listing parses no grid
    assert tmp_store.get(run.id).summary == run.summary


def test_a_store_written_with_arrays_inline_still_reads_whole(tmp_store):
    run = _run()
    tmp_store.put_run(run)
    tmp_store._db.execute("UPDATE runs SET summary = ?", ('{"final_loss": 0.5, "boundary": {"p": [[0.2]]}}',))
    assert tmp_store.runs()[0]["summary"] == {"final_loss": 0.5}
    assert tmp_store.get(run.id).summary["boundary"] == {"p": [[0.2]]}


def test_runs_are_paged_through_the_index(tmp_store):
    for i in range(5):
        tmp_store.put_run(Run(records=Records(), name=f"r{i}", group="even" if i % 2 == 0 else "odd", created=i))
    assert [r["name"] for r in tmp_store.runs(limit=2, offset=1, newest_first=True)] == ["r3", "r2"]
    assert [r["name"] for r in tmp_store.runs(group="even")] == ["r0", "r2", "r4"]
    assert (tmp_store.count(), tmp_store.count("odd"), tmp_store.groups()) == (5, 2, ["even", "odd"])
    plan = " ".join(str(row) for row in tmp_store._db.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM runs WHERE grp = ? ORDER BY created LIMIT 2", ("even",)))
    assert "runs_group" in plan


def test_an_id_prefix_is_a_prefix_not_a_pattern(tmp_store):
    run = _run()
    tmp_store.put_run(run)
    assert tmp_store.get(run.id[:3]).id == run.id
    for ref in ("", " ", "%", "_" * 3, run.id + "x"):
        with pytest.raises(KeyError, match="run: got"):
            tmp_store.get(ref)


def test_a_store_that_cannot_be_written_is_refused_up_front(tmp_store):
    tmp_store.check_writable()  # a writable one passes and stays empty
    assert tmp_store.count() == 0 and "write_probe" not in str(tmp_store._db.execute(
        "SELECT name FROM sqlite_master").fetchall())
    tmp_store._db.execute("PRAGMA query_only = ON")  # as a read-only file or mount answers
    with pytest.raises(SpecError, match="store: got .* allowed: a gradwatch SQLite file"):
        tmp_store.check_writable()


@pytest.mark.parametrize("content", [b"", b"not a database\n" * 100])
def test_a_file_that_is_not_a_store_is_one_line(tmp_path, content):
    path = tmp_path / "x.db"
    if content:
        path.write_bytes(content)
    else:
        path.mkdir()
    with pytest.raises(SpecError, match=r"^store: got '.*x.db' \((is a folder|file is not a database)\)"):
        Store(path)
