import math
import os
import signal
import subprocess
import sys
import time

import pytest

from gradwatch.records import Records, Run
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
