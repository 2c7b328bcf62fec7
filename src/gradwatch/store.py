"""Store: the embedded SQLite run store (default ``./gradwatch-runs/runs.db``).

Each run (spec, records, summary) is written in ONE transaction, in WAL mode, so a process killed
at any moment leaves every finished run intact and no half-written one; that is what lets a sweep
resume by skipping the keys already stored. The store only ever adds runs, and labels: a stored run
that a later sweep reuses is labelled into that sweep's group under its case name, so each group
lists every run it asked for while the run keeps its first name and group.

A sweep can leave 100,000 runs behind, so listing must not read what only one run's report needs:
a summary's arrays (the decision-boundary grid, the first layer's weights; ~54 KB of JSON a run, a
few KB once zlib'd) live in their own table that only ``get`` reads, and ``runs``/``get`` find rows
by index, a page at a time.
Anything wrong with the file itself (a folder, a text file, a truncated database, no write access)
is one SpecError line naming the path, raised when the store is opened, before any training.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import zlib
from pathlib import Path

from gradwatch.records import Records, Run
from gradwatch.spec import SpecError

DEFAULT_PATH = Path("gradwatch-runs") / "runs.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, key TEXT, name TEXT, grp TEXT, status TEXT, created REAL,
    spec TEXT, summary TEXT);
CREATE INDEX IF NOT EXISTS runs_key ON runs(key);
CREATE INDEX IF NOT EXISTS runs_name ON runs(name, created);
CREATE INDEX IF NOT EXISTS runs_group ON runs(grp, created);
CREATE INDEX IF NOT EXISTS runs_created ON runs(created);
CREATE TABLE IF NOT EXISTS arrays (run TEXT PRIMARY KEY REFERENCES runs(id), summary BLOB);  -- zlib'd JSON
CREATE TABLE IF NOT EXISTS records (
    run TEXT REFERENCES runs(id), step INTEGER, epoch INTEGER, layer TEXT, stat TEXT, value REAL);
CREATE INDEX IF NOT EXISTS records_run ON records(run);
CREATE TABLE IF NOT EXISTS labels (run TEXT REFERENCES runs(id), grp TEXT, name TEXT, PRIMARY KEY (run, grp));
CREATE INDEX IF NOT EXISTS labels_group ON labels(grp);
"""


HEAD = ("id", "key", "name", "group", "status", "created", "spec", "summary")


def default_path() -> Path:
    return Path(os.environ.get("GRADWATCH_STORE", DEFAULT_PATH))


def split_summary(summary: dict) -> tuple[dict, dict]:
    """(scalars, arrays): the numbers and words a listing shows, and the lists and grids only a report reads."""
    arrays = {k: v for k, v in summary.items() if isinstance(v, list | dict)}
    return {k: v for k, v in summary.items() if k not in arrays}, arrays


class Store:
    """Runs in one SQLite file: ``put_run``, ``runs``, ``count``, ``get``, ``has``.

    Examples:
        >>> store = gradwatch.Store()            # ./gradwatch-runs/runs.db
        >>> store.put_run(gradwatch.train(gradwatch.Spec()))
        >>> store.runs()[0]["summary"]["final_loss"]
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.is_dir():
                raise IsADirectoryError(21, "is a folder")
            self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise self.refusal(exc) from None

    def refusal(self, exc: Exception) -> SpecError:
        """One line naming the store's path and what SQLite or the OS said about it."""
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        return SpecError(f"store: got {str(self.path)!r} ({reason}); allowed: a gradwatch SQLite file or a new "
                         "path in a writable folder (--store or $GRADWATCH_STORE)")

    def check_writable(self) -> None:
        """Take the write lock and write (rolled back), so a read-only store is refused before a run trains."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("CREATE TABLE write_probe (x)")
            finally:
                self._db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise self.refusal(exc) from None

    def put_run(self, run: Run) -> str:
        """Write ``run`` with all its records atomically; returns its id."""
        rows = ((run.id, s, e, layer, stat, None if math.isnan(v) else v) for s, e, layer, stat, v in run.records)
        scalars, arrays = split_summary(run.summary)
        with self._transaction():
            self._db.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (run.id, run.key, run.name, run.group, run.status, run.created,
                 json.dumps(run.spec), json.dumps(scalars)),
            )
            if arrays:
                packed = zlib.compress(json.dumps(arrays).encode())
                self._db.execute("INSERT INTO arrays VALUES (?, ?)", (run.id, packed))
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

    def count(self, group: str | None = None) -> int:
        """How many runs (of ``group``) are stored, from the index alone."""
        where, args = _where(group)
        return self._db.execute(f"SELECT COUNT(*) FROM runs{where}", args).fetchone()[0]

    def groups(self) -> list[str]:
        return [g for (g,) in self._db.execute("SELECT DISTINCT grp FROM runs WHERE grp != '' ORDER BY grp")]

    def runs(self, group: str | None = None, limit: int | None = None, offset: int = 0,
             newest_first: bool = False) -> list[dict]:
        """Run headers (id, key, name, group, status, created, spec, scalar summary), oldest first.

        ``limit``/``offset`` read one page through the ``created`` index; the summaries' arrays stay unread.
        With ``group``: its own runs and those labelled into it, under the group's name for them.
        """
        where, args = _where(group)
        order = "DESC" if newest_first else ""
        label = "(SELECT l.name FROM labels l WHERE l.run = runs.id AND l.grp = ?)"
        sql = (f"SELECT id, key, COALESCE({label}, name), COALESCE(?, grp), status, created, spec, summary "
               f"FROM runs{where} ORDER BY created {order}, rowid {order} LIMIT ? OFFSET ?")
        return [_head(row) for row in self._db.execute(sql, (group, group, *args, -1 if limit is None else limit,
                                                             offset))]

    def label(self, labels: list[tuple[str, str, str]]) -> None:
        """Label stored runs into other groups: ``(run id, group, name)`` each, in one transaction."""
        with self._transaction():
            self._db.executemany("INSERT OR REPLACE INTO labels VALUES (?, ?, ?)", labels)

    def resolve(self, ref: str) -> str:
        """A run id from an id, a unique id prefix, or a run name (the newest run of that name)."""
        if ref.strip():
            # a range over the primary key, not LIKE: an index seek, and '%' or '_' in ref mean themselves
            ids = [i for (i,) in self._db.execute("SELECT id FROM runs WHERE id >= ? AND id < ? LIMIT 2",
                                                  (ref, ref + "\U0010ffff"))]
            if len(ids) == 1:
                return ids[0]
            named = self._db.execute("SELECT id FROM runs WHERE name = ? ORDER BY created DESC LIMIT 1",
                                     (ref,)).fetchone()
            if named:
                return named[0]
        raise KeyError(f"run: got {ref!r}; allowed: a run id, unique id prefix or run name (see `gradwatch runs`)")

    def get(self, ref: str) -> Run:
        """The whole run: records, and the summary with its arrays."""
        run_id = self.resolve(ref)
        # json.loads(row[-1]) and not head["summary"]: a store written before arrays moved out has them inline
        row = self._db.execute("SELECT id, key, name, grp, status, created, spec, summary FROM runs WHERE id = ?",
                               (run_id,)).fetchone()
        head = _head(row)
        arrays = self._db.execute("SELECT summary FROM arrays WHERE run = ?", (run_id,)).fetchone()
        rows = self._db.execute(
            "SELECT step, epoch, layer, stat, value FROM records WHERE run = ? ORDER BY rowid", (run_id,)
        )
        records = Records((s, e, layer, stat, math.nan if v is None else v) for s, e, layer, stat, v in rows)
        summary = {**json.loads(row[-1]), **(json.loads(zlib.decompress(arrays[0])) if arrays else {})}
        return Run(records=records, spec=head["spec"], summary=summary, status=head["status"],
                   name=head["name"], group=head["group"], key=head["key"], id=run_id, created=head["created"])

    def close(self) -> None:
        self._db.close()


def _where(group: str | None) -> tuple[str, tuple]:
    if group is None:
        return "", ()
    return " WHERE grp = ? OR id IN (SELECT run FROM labels WHERE grp = ?)", (group, group)


def _head(row: tuple) -> dict:
    """A runs row as a dict; a store written before arrays moved out has them inline, and they stay out here."""
    item = dict(zip(HEAD, row, strict=True))
    item["spec"], item["summary"] = json.loads(item["spec"]), split_summary(json.loads(item["summary"]))[0]
    return item
