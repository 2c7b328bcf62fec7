"""What the trainer integrations (``gradwatch.lightning``, ``gradwatch.transformers``) share: the watcher
they start and finish, and what they hand back (the same Records, findings, frame and Run as ``watch()``).
Each integration adds only its framework's events, named as that framework names them.
"""

from __future__ import annotations

import logging

from gradwatch.records import Records, Run
from gradwatch.watch import Watcher

log = logging.getLogger("gradwatch")


class Watching:
    """The watcher a callback drives; subclasses call ``_start`` when training starts, ``_finish`` at its end."""

    def __init__(self, every: int = 10, buffer: int = 1_000_000):
        if every < 1:
            raise ValueError(f"every: got {every}; allowed: >= 1")
        self.every, self.buffer = every, buffer
        self.watcher: Watcher | None = None

    def _start(self, model, optimizer, **options) -> None:
        if self.watcher is not None:  # a second fit starts clean
            self.watcher.detach()
        self.watcher = Watcher(model, optimizer, self.every, self.buffer, **options)

    def _finish(self, chief: bool) -> None:
        """Detach, and log the findings once (``chief``: the process that records, rank 0)."""
        self.watcher.detach()
        for finding in self.diagnose() if chief else ():
            log.warning("%s", finding)

    @property
    def records(self) -> Records:
        return self.watcher.records

    def diagnose(self):
        """Findings for what was recorded so far; see :func:`gradwatch.diagnose`."""
        return self.watcher.diagnose()

    def frame(self):
        """The records as a pandas DataFrame."""
        return self.watcher.frame()

    def run(self, **fields) -> Run:
        """The records as a :class:`Run`, ready for ``Store.put_run``."""
        return self.watcher.run(**fields)
