"""The run store at scale: ``gradwatch runs`` (one page) and ``gradwatch show RUN`` on 100,000 stored runs.

Each command runs as its own process, as a user types it; a line gives the median wall time over
``--repeats`` runs and the largest peak RSS, beside the same command on a 100-run store (the
baseline: what the store's size adds) and beside ``gradwatch --help`` (the floor: Python, typer and
rich starting). Targets (last column): ``runs`` under 2 s, ``show`` under 0.5 s, both under 300 MB.

The stores are built from one real run of the seed's net (10 sigmoid layers of 10, moons): trained for
``--epochs`` epochs and its records tiled to the seed's 100 epochs (25,590 rows, what ``gradwatch
demo`` stores per run), with its real summary (decision-boundary grid and first-layer weights). That
run is stored once, through ``Store.put_run``; the other runs are copies made inside SQLite (new ids,
names, keys and 100 groups), each with the full summary and ``--rows`` of its records, so building
100,000 takes a minute rather than a day. ``show`` reads the seed-sized run, by name.

Also printed: the bytes a seed-sized run adds to a store, whole and thinned as sweeps and studies
keep it (per-step gradient norms every 10th step). Timings on a shared machine are noisy: compare the
columns of one invocation, not figures taken at different times. Run with
``nice .venv/bin/python benchmarks/store_scale.py`` (``--help`` lists the knobs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from gradwatch.records import Records, Run  # noqa: E402
from gradwatch.spec import Spec  # noqa: E402
from gradwatch.store import Store  # noqa: E402

SEED_EPOCHS = 100


def seed_run(epochs: int) -> Run:
    """The seed's net trained ``epochs`` epochs, its records tiled to SEED_EPOCHS (same rows per epoch)."""
    from gradwatch.train import train

    run = train(Spec().replace(**{"train.epochs": epochs}), name="seed")
    steps = run.summary["steps"]
    rows = [(s + k * steps, e + k * epochs, layer, stat, v)
            for k in range(SEED_EPOCHS // epochs) for s, e, layer, stat, v in run.records.rows]
    run.records = Records(rows)
    return run


def size(path: Path) -> int:
    """Bytes on disk once the write-ahead log is folded in."""
    Store(path).close()  # the last connection to close checkpoints the WAL
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + "-*"))


def bytes_per_run(run: Run, folder: Path) -> tuple[int, int]:
    """(whole, thinned): what one seed-sized run adds to an empty store."""
    _fresh(folder / "empty.db").close()
    empty = size(folder / "empty.db")
    out = []
    for name, records in (("whole", run.records), ("thin", run.records.thin(10))):
        store = _fresh(folder / f"{name}.db")
        store.put_run(Run(records=records, spec=run.spec, summary=run.summary, name="seed"))
        store.close()
        out.append(size(folder / f"{name}.db") - empty)
    return out[0], out[1]


def _fresh(path: Path) -> Store:
    for old in path.parent.glob(path.name + "*"):
        old.unlink()
    return Store(path)


def build(path: Path, n: int, run: Run, rows: int) -> float:
    """A store of ``n`` runs: ``run`` itself, and n - 1 copies with ``rows`` records each; returns seconds."""
    start = time.perf_counter()
    store = _fresh(path)
    store.put_run(run)
    db = store._db
    db.execute("BEGIN")
    db.execute("""
        WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
        INSERT INTO runs SELECT lower(hex(randomblob(6))), key || '-' || i, 'run' || i, 'group' || (i % 100),
                                status, created + i, spec, summary FROM runs, n WHERE id = ?""", (n - 1, run.id))
    db.execute("INSERT INTO arrays SELECT r.id, a.summary FROM runs r, arrays a WHERE a.run = ? AND r.id != ?",
               (run.id, run.id))
    db.execute("""INSERT INTO records SELECT r.id, t.step, t.epoch, t.layer, t.stat, t.value
                  FROM runs r, (SELECT * FROM records WHERE run = ? LIMIT ?) t WHERE r.id != ?""",
               (run.id, rows, run.id))
    db.execute("COMMIT")
    store.close()
    return time.perf_counter() - start


# forks the command from a fresh, small interpreter: a child's peak RSS on Linux starts at its parent's at
# fork time, so forking from this process (torch loaded) would report ~500 MB for `gradwatch --help`
LAUNCH = """import os, sys
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.execv(sys.executable, [sys.executable, "-m", "gradwatch", *sys.argv[1:]])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def measure(args: list[str], repeats: int) -> tuple[float, float]:
    """(median seconds, peak RSS in MB) of ``gradwatch ARGS`` as a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    times, peaks = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", LAUNCH, *args], capture_output=True, text=True, env=env)
        times.append(time.perf_counter() - start)  # includes the launcher's own start, ~20 ms
        peak, code = map(int, out.stdout.split())
        if code:
            raise SystemExit(f"gradwatch {' '.join(args)} failed: {out.stderr}")
        peaks.append(peak / 1024)  # KB on Linux
    return statistics.median(times), max(peaks)


def in_process(call, path: Path, repeats: int) -> float:
    """Median seconds of ``call(store)`` on a freshly opened store: the store's own share of a command."""
    times = []
    for _ in range(repeats):
        db = Store(path)
        start = time.perf_counter()
        call(db)
        times.append(time.perf_counter() - start)
        db.close()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000, help="runs in the large store")
    parser.add_argument("--baseline", type=int, default=100, help="runs in the baseline store")
    parser.add_argument("--rows", type=int, default=100, help="record rows of each copied run")
    parser.add_argument("--epochs", type=int, default=10, help="epochs actually trained for the seed-sized run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None,
                        help="build the stores in this folder and keep them; a later call with it reuses them")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = opts.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        run = seed_run(opts.epochs)
        whole, thin = bytes_per_run(run, folder)
        print(f"a seed-sized run ({len(run.records):,} record rows) adds {whole / 1e6:.2f} MB to a store; "
              f"thinned as sweeps keep it ({len(run.records.thin(10)):,} rows): {thin / 1e6:.2f} MB")
        stores = {}
        for n in (opts.baseline, opts.runs):
            path = stores[n] = folder / f"runs{n}.db"
            if path.exists() and Store(path).count() == n:
                print(f"reused the {n:,}-run store {path}: {size(path) / 1e9:.2f} GB")
                continue
            took = build(path, n, run, opts.rows)
            print(f"built a {n:,}-run store in {took:.0f} s: {size(path) / 1e9:.2f} GB")
        last_page = lambda n: ["runs", "--page", str(-(-n // 50))]  # noqa: E731
        commands = {"gradwatch --help (floor)": (lambda n: ["--help"], None),
                    "gradwatch runs (newest page)": (lambda n: ["runs"], 2.0),
                    "gradwatch runs --page LAST (oldest)": (last_page, 2.0),
                    "gradwatch show seed": (lambda n: ["show", "seed"], 0.5)}
        print(f"{'':36s} {f'{opts.baseline:,} runs':>18s} {f'{opts.runs:,} runs':>18s}   target")
        for label, (args, target) in commands.items():
            cells = []
            for n, path in stores.items():
                store = [] if target is None else ["--store", str(path)]
                seconds, mb = measure(args(n) + store, opts.repeats)
                cells.append(f"{seconds:6.2f} s {mb:5.0f} MB")
            goal = f"< {target} s, < 300 MB" if target else ""
            print(f"{label:36s} {cells[0]:>18s} {cells[1]:>18s}   {goal}")
        calls = {"in process: count + a page of runs": lambda db: (db.count(), db.runs(limit=50, newest_first=True)),
                 "in process: get('seed')": lambda db: db.get("seed")}
        for label, call in calls.items():
            cells = [f"{in_process(call, path, opts.repeats) * 1e3:9.1f} ms" for path in stores.values()]
            print(f"{label:36s} {cells[0]:>18s} {cells[1]:>18s}")

if __name__ == "__main__":
    main()
