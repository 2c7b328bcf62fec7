"""The diagnosis panel's Treat button: the doctor on the net on screen, on its own thread, in seconds.

The doctor trains the session's spec afresh (never the session's own model), untreated and with each
remedy its findings name, and ranks the treatments by the loss they reach. In the playground it runs
under a small fixed BUDGET, so a press answers in seconds on a busy two-core machine, and it takes a
trainer's slot while it works, so it shares the cores the sessions share instead of adding to them.
The page polls the result with the session's state, as the ranked table ``print(rx)`` shows.
The doctor seeds torch's global generator before each trial's model; a session opened or reset on
another thread at that moment draws its initial weights from the same generator, so such a trial's
init can differ from a quiet run's (the trainers' batches come from their own generators).
"""

from __future__ import annotations

import threading

from gradwatch.doctor import doctor
from gradwatch.doctor.patients import from_spec
from gradwatch.spec import Spec

# the doctor's budget in the playground: measured on the seed's 10 x 10 sigmoid net on a loaded 2-core
# host, 100 steps x 2 seeds took ~6 s and ranked a treatment that clears vanishing first (60 x 1: ~4 s,
# but one seed's ranking is a coin toss between the close ones)
BUDGET = {"steps": 100, "seeds": 2}


def one_line(exc: Exception) -> str:
    """An exception as the page shows it: its type and its first line."""
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"[:300]


class Treating:
    """One Treat press's state: ``idle | running | done | error``, and its table once done.

    A session makes a fresh one on every reset, so a doctor still running for the old settings
    writes into an object nobody reads any more.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.status, self.result, self.error = "idle", None, None

    def start(self, spec: Spec, slots: threading.Semaphore) -> None:
        """Run the doctor on ``spec`` in the background; a press while one runs is the same press."""
        with self.lock:
            if self.status == "running":
                return
            self.status, self.result, self.error = "running", None, None
        threading.Thread(target=self._run, args=(spec, slots), name="treat", daemon=True).start()

    def _run(self, spec: Spec, slots: threading.Semaphore) -> None:
        try:
            make_model, data, loss_fn, optimizer = from_spec(spec)
            with slots:  # threads=None: the server set torch's threads once for every session
                rx = doctor(make_model, data, loss_fn, optimizer, batch_size=spec.train.batch_size, workers=1,
                            threads=None, **BUDGET)
            result = {"findings": [f.kind for f in rx.findings], "rows": rx.rows() if rx.findings else [],
                      "untried": rx.untried, "seconds": rx.seconds,
                      "steps": rx.steps, "seeds": rx.seeds}
        except Exception as exc:  # any failure: the page must say so, not spin on "running" forever
            with self.lock:
                self.status, self.error = "error", one_line(exc)
            return
        with self.lock:
            self.status, self.result = "done", result

    def json(self) -> dict:
        with self.lock:
            return {"status": self.status, "error": self.error, **(self.result or {})}
