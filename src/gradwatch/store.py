"""Store: the embedded SQLite run store (default ``./gradwatch-runs/runs.db``).

Each run (spec, records, summary) is written in ONE transaction, in WAL mode, so a process killed
at any moment leaves every finished run intact and no half-written one; that is what lets a sweep
resume by skipping the keys already stored. The store only ever adds runs.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from pathlib import Path

from gradwatch.records import Records, Run

DEFAULT_PATH = Path("gradwatch-runs") / "runs.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, key TEXT, name TEXT, grp TEXT, status TEXT, created REAL,
    spec TEXT, summary TEXT);
CREATE INDEX IF NOT EXISTS runs_key ON runs(key);
CREATE TABLE IF NOT EXISTS records (
    run TEXT REFERENCES runs(id), step INTEGER, epoch INTEGER, layer TEXT, stat TEXT, value REAL);
CREATE INDEX IF NOT EXISTS records_run ON records(run);
"""


def default_path() -> Path:
    return Path(os.environ.get("GRADWATCH_STORE", DEFAULT_PATH))


class Store:
    """Runs in one SQLite file: ``put_run``, ``runs``, ``get``, ``has``.

    Examples:
        >>> store = gradwatch.Store()            # ./gradwatch-runs/runs.db
        >>> store.put_run(gradwatch.train(gradwatch.Spec()))
        >>> store.runs()[0]["summary"]["final_loss"]
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)

    def put_run(self, run: Run) -> str:
        """Write ``run`` with all its records atomically; returns its id."""
        rows = ((run.id, s, e, layer, stat, None if math.isnan(v) else v) for s, e, layer, stat, v in run.records.rows)
        with self._transaction():
            self._db.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (run.id, run.key, run.name, run.group, run.status, run.created,
                 json.dumps(run.spec), json.dumps(run.summary)),
            )
            self._db.executemany("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?)", rows)
        return run.id

    def _transaction(self):
        db = self._db

        class _Txn:
            def __enter__(self):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, kind, *_):
                db.execute("ROLLBACK" if kind else "COMMIT")

        return _Txn()

    def has(self, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM runs WHERE key = ? LIMIT 1", (key,)).fetchone() is not None

    def keys(self) -> set[str]:
        return {k for (k,) in self._db.execute("SELECT key FROM runs")}

    def runs(self, group: str | None = None) -> list[dict]:
        """Every run's header (id, key, name, group, status, created, spec, summary), oldest first."""
        sql = "SELECT id, key, name, grp, status, created, spec, summary FROM runs"
        args: tuple = ()
        if group is not None:
            sql, args = sql + " WHERE grp = ?", (group,)
        cols = ("id", "key", "name", "group", "status", "created", "spec", "summary")
        out = []
        for row in self._db.execute(sql + " ORDER BY created, rowid", args):
            item = dict(zip(cols, row, strict=True))
            item["spec"], item["summary"] = json.loads(item["spec"]), json.loads(item["summary"])
            out.append(item)
        return out

    def resolve(self, ref: str) -> str:
        """A run id from an id, a unique id prefix, or a run name (the newest run of that name)."""
        ids = [i for (i,) in self._db.execute("SELECT id FROM runs WHERE id LIKE ?", (ref + "%",))]
        if len(ids) == 1:
            return ids[0]
        named = self._db.execute("SELECT id FROM runs WHERE name = ? ORDER BY created DESC", (ref,)).fetchone()
        if named:
            return named[0]
        raise KeyError(f"run: got {ref!r}; allowed: a run id, unique id prefix or run name (see `gradwatch runs`)")

    def get(self, ref: str) -> Run:
        """The whole run, records included."""
        run_id = self.resolve(ref)
        head = next(r for r in self.runs() if r["id"] == run_id)
        rows = self._db.execute(
            "SELECT step, epoch, layer, stat, value FROM records WHERE run = ? ORDER BY rowid", (run_id,)
        )
        records = Records((s, e, layer, stat, math.nan if v is None else v) for s, e, layer, stat, v in rows)
        return Run(records=records, spec=head["spec"], summary=head["summary"], status=head["status"],
                   name=head["name"], group=head["group"], key=head["key"], id=run_id, created=head["created"])

    def close(self) -> None:
        self._db.close()
