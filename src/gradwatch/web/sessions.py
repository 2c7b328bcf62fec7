"""One live run per browser tab: a Training stepped an epoch at a time on its own small thread.

The request thread never trains: it flips the session's state (train, pause, step, reset) and reads
the snapshot the worker leaves after each epoch. Workers take turns through a semaphore with as many
slots as the machine should spend (2 by default), so eight tabs on two cores share them instead of
starving the event loop; a thread waiting on the semaphore holds no GIL. Like TensorFlow Playground,
the page only ever sees small per-epoch summaries, never the model.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
import uuid

from gradwatch.diagnose import diagnose
from gradwatch.nets import ACTIVATIONS, sigma_w2
from gradwatch.records import Records
from gradwatch.spec import Spec
from gradwatch.theory import meanfield
from gradwatch.train import Training, boundary
from gradwatch.web.treat import Treating, one_line

LAYER_STATS = ("grad_norm", "backprop_norm", "act_rms", "saturated_frac", "dead_frac")  # the latest value: bars
TRACE = "weight_trace"  # every epoch's value per layer, drawn as lines over epochs (the seed's weight picture)
SCALARS = ("loss", "accuracy", "test_loss", "test_accuracy")
WINDOW = 20_000  # rows the live diagnosis reads: the latest ~80 epochs of a 10x10 net, ~30 ms of work
DIAGNOSE_EVERY = 1.0  # seconds between live diagnoses of a running session, at least
DIAGNOSE_SHARE = 0.05  # ...and at most this share of a session's time goes to them
BOUNDARY_EVERY = 0.5  # seconds between decision-boundary grids
GRID = 40  # decision-boundary grid points per axis


def num(v: float) -> float | None:
    """JSON has no NaN/Inf: a diverged value travels as null."""
    return v if isinstance(v, int | float) and math.isfinite(v) else None


def recent(rows) -> Records:
    """The last ~WINDOW rows, from the first row of an epoch.

    A flush writes each stat's layers input to output, and a rule takes the first layer it meets as
    the input side, so a window cut mid-flush would turn the net around.
    """
    if len(rows) <= WINDOW:
        return Records(rows)
    window = Records(itertools.islice(reversed(rows), WINDOW))
    window.rows.reverse()
    first = window.rows[0][1]
    while window.rows and window.rows[0][1] == first:
        window.rows.popleft()
    return window


def predicted(training: Training) -> dict[str, float] | None:
    """Mean field's weight-gradient norm of each hidden layer over the last one's, for the page's dashed
    overlay (theory.meanfield.gradient_profile at the net's init); None where it does not apply
    (recurrent nets, norm layers, skip connections)."""
    model = training.spec.model
    if model.kind != "mlp" or model.norm != "none" or model.residual or model.depth < 1:
        return None
    x = training.data.x_train
    profile = meanfield.gradient_profile(ACTIVATIONS[model.activation]().double(), sigma_w2(model), model.sigma_b2,
                                         model.depth, float(x.square().mean()), x.shape[1], model.width)
    return {f"dense{i}": num(r) for i, r in enumerate(profile, 1)}


def finding_json(f) -> dict:
    return {"kind": f.kind, "severity": f.severity, "layers": f.layers, "text": str(f)}


class Session:
    """A tab's run: status ``idle | running | paused | finished | diverged | saved | error``, and what it showed.

    ``error``: the trainer raised; ``error`` holds its one-line reason until a reset starts over.
    """

    def __init__(self, spec: Spec, slots: threading.Semaphore):
        self.id = uuid.uuid4().hex[:12]
        self.slots = slots
        self.lock = threading.Lock()  # guards the snapshot below; never held while training
        self.wake = threading.Condition(self.lock)
        self.train_lock = threading.Lock()  # held for one epoch, and by reset/save
        self.polled = time.monotonic()
        self.closed = False
        self._load(spec)
        self.thread = threading.Thread(target=self._work, name=f"session-{self.id}", daemon=True)
        self.thread.start()

    def _load(self, spec: Spec) -> None:
        """A fresh Training and an empty snapshot (called under train_lock, or before the thread starts)."""
        training = Training(spec)  # may raise SpecError (e.g. an output that cannot fit the data)
        theory = predicted(training)
        with self.lock:
            self.spec, self.training, self.theory = spec, training, theory
            self.status, self.pending, self.saved, self.error = "idle", 0, None, None
            self.history: dict[str, list] = {k: [] for k in ("epoch", *SCALARS)}
            self.weights: dict[str, list[float]] = {}
            self.layers: dict[str, dict[str, float | None]] = {}
            self.findings: list[dict] = []
            self.treating = Treating()  # a doctor still running for the old settings writes into the old one
            self.boundary, self.boundary_version = None, 0
            self.updates, self.seen = 0, 0
            self._diagnosed = self._drawn = 0.0  # monotonic times: next diagnosis, last drawing
        self._after_epoch(None)

    # ---- commands, from the request thread ----

    def command(self, name: str) -> None:
        """``train``, ``pause`` or ``step``; a finished or saved run ignores them (reset starts over)."""
        with self.lock:
            if self.status in ("finished", "diverged", "saved", "error"):
                return
            if name == "train":
                self.status = "running"
            elif name == "pause":
                self.status = "paused" if self.status == "running" else self.status
            elif name == "step":
                self.status, self.pending = "paused", self.pending + 1
            self.wake.notify()

    def reset(self, spec: Spec | None = None) -> None:
        with self.train_lock:
            self._load(spec or self.spec)

    def treat(self) -> None:
        """Start the doctor on this session's settings (the net on screen), sharing the trainers' slots."""
        with self.lock:
            spec, treating = self.spec, self.treating
        treating.start(spec, self.slots)

    def finish(self):
        """Stop for good and return the Run (the watcher detaches, so the run cannot train on)."""
        with self.train_lock:
            with self.lock:
                if self.status == "saved":
                    return None
                self.status = "saved"
            return self.training.finish()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.wake.notify()

    # ---- the worker ----

    def _work(self) -> None:
        while True:
            with self.lock:
                while not self.closed and not (self.status == "running" or self.pending):
                    self.wake.wait()
                if self.closed:
                    return
                self.pending = max(0, self.pending - 1)
            with self.slots, self.train_lock:
                with self.lock:
                    if self.closed or self.status not in ("running", "paused"):
                        continue  # reset, finished or saved while this thread waited for a slot
                try:
                    self._after_epoch(self.training.epoch())
                except Exception as exc:  # any failure: the page must say so, not spin on "running" forever
                    with self.lock:
                        self.status = "error"
                        self.error = one_line(exc)
            time.sleep(0.001)  # let a waiting session take the slot before this one asks again

    def _after_epoch(self, scalars: dict | None) -> None:
        """Fold the epoch's new rows into the snapshot; diagnose and draw now and then (worker thread)."""
        training = self.training
        rows = training.watcher.records.rows
        new = list(itertools.islice(reversed(rows), len(rows) - self.seen))[::-1] if len(rows) > self.seen else []
        latest: dict[str, dict[str, float | None]] = {}
        for _, _, layer, stat, value in new:  # the last value of each layer's stat wins
            if stat in LAYER_STATS or stat == TRACE:
                latest.setdefault(stat, {})[layer] = num(value)
        now = time.monotonic()
        done = training.done
        findings = boundary_grid = None
        if scalars is not None and (done or now >= self._diagnosed or self.status != "running"):
            # live: the recent epochs, so the words follow the bars; at the end: the whole run, as `gradwatch diagnose`
            findings = [finding_json(f) for f in diagnose(training.watcher.records if done else recent(rows))]
            cost = time.monotonic() - now
            self._diagnosed = now + max(DIAGNOSE_EVERY, cost / DIAGNOSE_SHARE)
        if done or now - self._drawn >= BOUNDARY_EVERY or self.status != "running":
            boundary_grid = self._boundary()
            self._drawn = now
        with self.lock:
            self.seen = len(rows)
            for stat, values in latest.items():
                if stat != TRACE:
                    self.layers[stat] = {**self.layers.get(stat, {}), **values}
            if scalars is not None:
                self.history["epoch"].append(training.epochs_done)
                for k in SCALARS:
                    self.history[k].append(num(scalars.get(k, math.nan)))
                for name, value in latest.get(TRACE, {}).items():
                    self.weights.setdefault(name, []).append(value)
                self.updates += 1
            if findings is not None:
                self.findings = findings
            if boundary_grid is not None:
                self.boundary, self.boundary_version = boundary_grid, self.boundary_version + 1
            if done and self.status not in ("saved",):
                self.status = "diverged" if training.status == "diverged" else "finished"

    def _boundary(self) -> dict | None:
        data = self.training.data
        x, y = data.x_train, data.y_train
        if x.dim() != 2 or x.shape[1] != 2:
            return None
        grid = boundary(self.training.model, x, GRID)
        grid["p"] = [[num(v) for v in row] for row in grid["p"]]
        grid["points"] = {"x1": x[:, 0].tolist(), "x2": x[:, 1].tolist(), "y": y.flatten().tolist()}
        return grid

    # ---- what the page polls ----

    def state(self, since: int = 0, boundary_version: int = -1) -> dict:
        """The snapshot, with only the epochs after ``since`` and the grid only if the page's is stale."""
        self.polled = time.monotonic()
        with self.lock:
            since = max(0, min(since, len(self.history["epoch"])))
            out = {
                "id": self.id,
                "status": self.status,
                "epoch": self.training.epochs_done,
                "epochs": self.spec.train.epochs,
                "updates": self.updates,
                "since": since,
                "history": {k: v[since:] for k, v in self.history.items()},
                "weights": {k: v[since:] for k, v in self.weights.items()},
                "layers": {k: dict(v) for k, v in self.layers.items()},
                "theory": self.theory,
                "findings": list(self.findings),
                "boundary_version": self.boundary_version,
                "saved": self.saved,
                "error": self.error,
                "treat": self.treating.json(),
            }
            if boundary_version != self.boundary_version:
                out["boundary"] = self.boundary
        return out
