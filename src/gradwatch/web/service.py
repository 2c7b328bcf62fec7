"""The playground's session service: the open sessions, bounded, reaped when idle, saved to the store.

The routes in ``app.py`` only translate HTTP to these calls and back; everything a request can do to
a session (open, find, command, reset, save, close) goes through one ``Sessions`` object, which is the
only holder of the sessions dict and its lock. A refusal is an ``HTTPError`` carrying the status and
the spec's one-line ``field: got X; allowed: ...`` detail.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from gradwatch.spec import Spec, SpecError
from gradwatch.store import Store
from gradwatch.web.sessions import Session

COMMANDS = ("train", "pause", "step", "reset", "save", "treat")
SAVABLE = ("paused", "finished", "diverged")  # idle, running, error or saved runs have nothing (new) to keep


class HTTPError(Exception):
    """A refused request: its HTTP status and one line of detail."""

    def __init__(self, status: int, detail: str):
        self.status, self.detail = status, detail


class Sessions:
    """At most ``limit`` open sessions; ``train_slots`` of them train at once; unpolled ones close after ``idle_s``."""

    def __init__(self, store_path: str | Path | None, limit: int, idle_s: float, train_slots: int):
        self.store_path, self.limit, self.idle_s = store_path, limit, idle_s
        self.open_: dict[str, Session] = {}
        self.slots = threading.BoundedSemaphore(train_slots)
        self.guard = threading.Lock()
        self.stop = threading.Event()

    def start(self) -> None:
        """Reap idle sessions in the background until ``shutdown``."""
        threading.Thread(target=self._reaper, name="session-reaper", daemon=True).start()

    def shutdown(self) -> None:
        self.stop.set()
        with self.guard:
            for session in self.open_.values():
                session.close()
            self.open_.clear()

    def _reaper(self) -> None:
        while not self.stop.wait(min(5.0, self.idle_s / 2)):
            self.reap()

    def reap(self) -> None:
        cutoff = time.monotonic() - self.idle_s
        with self.guard:
            for sid in [sid for sid, s in self.open_.items() if s.polled < cutoff]:
                self.open_.pop(sid).close()

    def open(self, spec: Spec) -> Session:
        self.reap()
        with self.guard:
            if len(self.open_) >= self.limit:
                raise HTTPError(429, f"sessions: got {len(self.open_)} open; allowed: at most {self.limit} "
                                "(close a tab, or wait for idle ones to close)")
        session = unprocessable(Session, spec, self.slots)
        with self.guard:
            self.open_[session.id] = session
        return session

    def find(self, sid: str) -> Session:
        self.reap()
        session = self.open_.get(sid)
        if session is None:
            raise HTTPError(404, f"session: got {sid!r}; allowed: an open session "
                            f"(idle ones close after {self.idle_s:g} s)")
        return session

    def command(self, sid: str, name: str, spec: Spec | None = None) -> dict:
        """Run one of COMMANDS on session ``sid``; ``spec`` is reset's new settings (None: the same again)."""
        session = self.find(sid)
        if name not in COMMANDS:
            raise HTTPError(404, f"command: got {name!r}; allowed: {', '.join(COMMANDS)}")
        if name == "save":
            return self.save(session)
        if name == "reset":
            unprocessable(session.reset, spec)
        elif name == "treat":
            session.treat()
            return {"id": sid, "status": session.status, "treat": "running"}
        else:
            session.command(name)
        return {"id": sid, "status": session.status}

    def save(self, session: Session) -> dict:
        """Store the session's run in the playground group (once; a second save answers the first's id)."""
        if session.status not in (*SAVABLE, "saved"):
            raise HTTPError(409, f"status: got {session.status!r}; allowed: {', '.join(SAVABLE)} "
                            "(train, then pause or let it finish)")
        run = session.finish()
        if run is None:
            return {"id": session.id, "status": "saved", "run": session.saved}
        run.name = run.name or f"playground-{run.id[:6]}"
        run.group = "playground"
        store = Store(self.store_path)
        try:
            store.put_run(run)
        finally:
            store.close()
        session.saved = run.id
        return {"id": session.id, "status": "saved", "run": run.id, "name": run.name}

    def close(self, sid: str) -> dict:
        with self.guard:
            session = self.open_.pop(sid, None)
        if session is None:
            raise HTTPError(404, f"session: got {sid!r}; allowed: an open session")
        session.close()
        return {"id": sid, "status": "closed"}


def unprocessable(fn, *args):
    """``fn(*args)``, with a SpecError (e.g. an output that cannot fit the data) as a 422."""
    try:
        return fn(*args)
    except SpecError as exc:
        raise HTTPError(422, str(exc)) from None
