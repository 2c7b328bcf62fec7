"""The playground's server: one page, and a small JSON API that steps one run per browser tab.

``create_app()`` builds a FastAPI app (tests make their own, with their own store and limits);
``gradwatch serve`` runs it under uvicorn on 127.0.0.1. Settings travel as dotted spec fields
(``{"model.depth": 10}``) and are validated by ``Spec`` first and by the playground's LIMITS second,
so every refusal is the spec's one line, ``field: got X; allowed: ...``, as JSON ``{"detail": ...}``.
Sessions that nobody polls for ``idle_s`` seconds are reaped, like a closed tab's.
"""

from __future__ import annotations

import json
import math
import threading
import time
from contextlib import asynccontextmanager
from operator import attrgetter
from pathlib import Path
from typing import get_args

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from gradwatch.spec import Activation, Init, ModelSpec, Spec, SpecError, TrainSpec
from gradwatch.store import Store
from gradwatch.web.sessions import Session

STATIC = Path(__file__).parent / "static"

# dotted field -> (lowest, highest) the playground allows, tighter than the spec's own ranges
LIMITS: dict[str, tuple[float, float]] = {
    "model.depth": (1, 30),
    "model.width": (1, 64),
    "train.epochs": (1, 2000),
    "data.n_samples": (8, 2000),
    "train.batch_size": (1, 2000),
}
# optimizer steps one run may take: ~100 record rows a step at depth 30 keeps a run's rows under ~250 MB
MAX_STEPS = 20_000
# dotted field -> the values the playground offers (the 2-D data sets, the MLP)
CHOICES: dict[str, tuple[str, ...]] = {
    "data.name": ("moons", "circles", "spirals", "xor"),
    "model.kind": ("mlp",),
}
# the playground's starting point: the seed notebook's net, for 100 epochs
DEFAULTS = {"data.name": "moons", "train.epochs": 100}


class HTTPError(Exception):
    def __init__(self, status: int, detail: str):
        self.status, self.detail = status, detail


def check(settings: object) -> Spec:
    """Dotted settings -> Spec, or a 422 naming the first field out of the playground's range."""
    if not isinstance(settings, dict):
        raise HTTPError(400, f"body: got {type(settings).__name__}; allowed: a JSON object of field: value")
    try:
        spec = Spec().replace(**{**DEFAULTS, **settings})
    except SpecError as exc:
        raise HTTPError(422, str(exc)) from None
    for field, (lo, hi) in LIMITS.items():
        value = attrgetter(field)(spec)  # attrgetter follows dots: spec.model.depth
        if not lo <= value <= hi:
            raise HTTPError(422, f"{field}: got {value!r}; allowed: >= {lo} and <= {hi}")
    for field, allowed in CHOICES.items():
        value = attrgetter(field)(spec)  # attrgetter follows dots: spec.model.depth
        if value not in allowed:
            raise HTTPError(422, f"{field}: got {value!r}; allowed: {', '.join(allowed)}")
    data, train = spec.data, spec.train
    n_train = data.n_samples - math.ceil(data.n_samples * data.test_size)  # what train_test_split keeps
    per_epoch = math.ceil(max(1, n_train) / train.batch_size)
    if train.epochs * per_epoch > MAX_STEPS:  # each bound alone admits millions of steps, and their rows
        raise HTTPError(422, f"train.epochs: got {train.epochs}; allowed: <= {MAX_STEPS // per_epoch} with {n_train} "
                        f"training samples in batches of {train.batch_size} (at most {MAX_STEPS} steps a run)")
    return spec


def options() -> dict:
    """What the page's controls may offer, straight from the spec's types and the LIMITS above."""
    literal = lambda model, name: list(get_args(model.model_fields[name].annotation))  # noqa: E731
    return {
        "limits": LIMITS,
        "choices": {
            **CHOICES,
            "model.activation": list(get_args(Activation)),
            "model.init": list(get_args(Init)),
            "model.norm": literal(ModelSpec, "norm"),
            "train.optimizer": literal(TrainSpec, "optimizer"),
        },
        "defaults": Spec().replace(**DEFAULTS).model_dump(mode="json"),
    }


# seconds without a poll before a session is reaped: Chrome wakes a tab hidden for 5 minutes once a
# minute ("intensive wake up throttling"), so a minute would reap the run of a teacher who switched to slides
IDLE_S = 300.0


def create_app(store_path: str | Path | None = None, max_sessions: int = 16, idle_s: float = IDLE_S,
               train_slots: int = 2) -> FastAPI:
    """The playground app; ``train_slots`` sessions train at once, the rest wait their turn."""
    torch.set_num_threads(1)  # tiny nets: intra-op threads only fight the other sessions for cores
    sessions: dict[str, Session] = {}
    slots = threading.BoundedSemaphore(train_slots)
    guard = threading.Lock()
    stop = threading.Event()

    def reap() -> None:
        cutoff = time.monotonic() - idle_s
        with guard:
            for sid in [sid for sid, s in sessions.items() if s.polled < cutoff]:
                sessions.pop(sid).close()

    def reaper() -> None:
        while not stop.wait(min(5.0, idle_s / 2)):
            reap()

    @asynccontextmanager
    async def lifespan(_app):
        thread = threading.Thread(target=reaper, name="session-reaper", daemon=True)
        thread.start()
        yield
        stop.set()
        with guard:
            for s in sessions.values():
                s.close()
            sessions.clear()

    app = FastAPI(title="gradwatch playground", lifespan=lifespan)
    app.state.sessions = sessions
    app.state.reap = reap
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(HTTPError)
    async def _refuse(_request, exc: HTTPError):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    async def body(request: Request) -> dict:
        raw = await request.body()
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except ValueError:
            raise HTTPError(400, "body: got malformed JSON; allowed: a JSON object of field: value") from None

    def find(sid: str) -> Session:
        reap()
        session = sessions.get(sid)
        if session is None:
            raise HTTPError(404, f"session: got {sid!r}; allowed: an open session (idle ones close after {idle_s:g} s)")
        return session

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/api/options")
    def get_options():
        return options()

    @app.post("/api/sessions", status_code=201)
    async def open_session(request: Request):
        spec = check(await body(request))
        reap()
        with guard:
            if len(sessions) >= max_sessions:
                raise HTTPError(429, f"sessions: got {len(sessions)} open; allowed: at most {max_sessions} "
                                "(close a tab, or wait for idle ones to close)")
        try:
            session = Session(spec, slots)
        except SpecError as exc:
            raise HTTPError(422, str(exc)) from None
        with guard:
            sessions[session.id] = session
        return {"id": session.id, "spec": spec.model_dump(mode="json")}

    @app.get("/api/sessions/{sid}/state")
    def state(sid: str, since: int = 0, boundary: int = -1):
        return find(sid).state(since, boundary)

    @app.post("/api/sessions/{sid}/{name}")
    async def command(sid: str, name: str, request: Request):
        session = find(sid)
        if name in ("train", "pause", "step"):
            session.command(name)
        elif name == "reset":
            settings = await body(request)
            spec = check(settings) if settings else None
            try:
                session.reset(spec)
            except SpecError as exc:
                raise HTTPError(422, str(exc)) from None
        elif name == "save":
            return save(session)
        else:
            raise HTTPError(404, f"command: got {name!r}; allowed: train, pause, step, reset, save")
        return {"id": sid, "status": session.status}

    def save(session: Session) -> dict:
        if session.status in ("running", "idle"):
            raise HTTPError(409, f"status: got {session.status!r}; allowed: paused, finished or diverged "
                            "(train, then pause or let it finish)")
        run = session.finish()
        if run is None:
            return {"id": session.id, "status": "saved", "run": session.saved}
        run.name = run.name or f"playground-{run.id[:6]}"
        run.group = "playground"
        store = Store(store_path)
        try:
            store.put_run(run)
        finally:
            store.close()
        session.saved = run.id
        return {"id": session.id, "status": "saved", "run": run.id, "name": run.name}

    @app.delete("/api/sessions/{sid}")
    def close(sid: str):
        with guard:
            session = sessions.pop(sid, None)
        if session:
            session.close()
        return {"id": sid, "status": "closed"}

    return app



