"""The playground's server: one page, and a small JSON API that steps one run per browser tab.

``create_app()`` builds a FastAPI app of thin routes over ``service.Sessions`` (tests make their own,
with their own store and limits); ``gradwatch serve`` runs it under uvicorn on 127.0.0.1. Settings
travel as dotted spec fields (``{"model.depth": 10}``) and are validated by ``Spec`` first and by the
playground's LIMITS second, so every refusal is the spec's one line, ``field: got X; allowed: ...``,
as JSON ``{"detail": ...}``.

Any web page the user visits can send requests to a server on localhost, and a DNS-rebinding page can
even read the answers, so every request must name this server's own loopback address as its Host (and
as its Origin, when it has one), and every POST must say it carries JSON (a cross-site form cannot).
Bodies are capped and their nesting bounded before anything is parsed further.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import asynccontextmanager
from operator import attrgetter
from pathlib import Path
from typing import get_args
from urllib.parse import urlsplit

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from gradwatch.spec import Activation, Init, ModelSpec, Spec, SpecError, TrainSpec
from gradwatch.web.service import HTTPError, Sessions

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
MAX_BODY = 64 * 1024  # bytes: the settings are a few hundred; anything near this is not the page
MAX_DEPTH = 4  # JSON nesting: {"model": {"depth": 3}} is 2; json.loads recurses once a level
LOOPBACK = ("127.0.0.1", "localhost", "::1")


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


def refusal(request: Request, hosts: tuple[str, ...]) -> HTTPError | None:
    """Why a request may not reach the API (a foreign Host or Origin, or a POST that is not JSON), or None."""
    host = urlsplit(f"//{request.headers.get('host', '')}").hostname or ""
    if host not in hosts:
        return HTTPError(403, f"host: got {host!r}; allowed: {', '.join(hosts)} (this server's own address)")
    origin = request.headers.get("origin")
    if origin is not None and (urlsplit(origin).hostname or "") != host:
        return HTTPError(403, f"origin: got {origin!r}; allowed: this server's own page (http://{host})")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if request.method == "POST" and kind != "application/json":
        return HTTPError(415, f"content-type: got {kind or 'none'!r}; allowed: application/json")
    return None


async def read_json(request: Request) -> object:
    """The body as JSON ({} when empty), refused past MAX_BODY bytes or MAX_DEPTH levels of nesting."""
    size = request.headers.get("content-length", "0")
    if not size.isdigit() or int(size) > MAX_BODY:
        raise HTTPError(413, f"body: got {size} bytes; allowed: at most {MAX_BODY}")
    raw = bytearray()
    async for chunk in request.stream():  # a chunked body has no length to check up front
        raw += chunk
        if len(raw) > MAX_BODY:
            raise HTTPError(413, f"body: got more than {MAX_BODY} bytes; allowed: at most {MAX_BODY}")
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise HTTPError(400, "body: got malformed JSON; allowed: a JSON object of field: value") from None
    if depth(value) > MAX_DEPTH:
        raise HTTPError(400, f"body: got JSON nested deeper than {MAX_DEPTH}; allowed: a JSON object of field: value")
    return value


def depth(value: object) -> int:
    """Levels of nesting of a parsed JSON value (a scalar is 0), without recursion."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        node, level = todo.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, level + 1)
            todo.extend((child, level + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def create_app(store_path: str | Path | None = None, max_sessions: int = 16, idle_s: float = IDLE_S,
               train_slots: int = 2, hosts: tuple[str, ...] | None = None) -> FastAPI:
    """The playground app; ``train_slots`` sessions train at once, the rest wait their turn.

    ``hosts``: the names this server answers to; by default loopback's and ``$GRADWATCH_HOST``, which
    ``gradwatch serve --host`` sets to the address it binds.
    """
    hosts = hosts or tuple(dict.fromkeys([*LOOPBACK, *filter(None, [os.environ.get("GRADWATCH_HOST")])]))
    torch.set_num_threads(1)  # tiny nets: intra-op threads only fight the other sessions for cores
    service = Sessions(store_path, max_sessions, idle_s, train_slots)

    @asynccontextmanager
    async def lifespan(_app):
        service.start()
        yield
        service.shutdown()

    app = FastAPI(title="gradwatch playground", lifespan=lifespan)
    app.state.sessions, app.state.reap = service.open_, service.reap
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def own_pages_only(request: Request, call_next):
        refused = refusal(request, hosts)
        return answer(refused) if refused else await call_next(request)

    app.add_exception_handler(HTTPError, lambda _request, exc: answer(exc))
    app.add_exception_handler(RequestValidationError, lambda _request, exc: answer(invalid(exc)))

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/api/options")
    def get_options():
        return options()

    @app.post("/api/sessions", status_code=201)
    async def open_session(request: Request):
        session = service.open(check(await read_json(request)))
        return {"id": session.id, "spec": session.spec.model_dump(mode="json")}

    @app.get("/api/sessions/{sid}/state")
    def state(sid: str, since: int = 0, boundary: int = -1):
        return service.find(sid).state(since, boundary)

    @app.post("/api/sessions/{sid}/{name}")
    async def command(sid: str, name: str, request: Request):
        settings = await read_json(request)
        return service.command(sid, name, check(settings) if name == "reset" and settings else None)

    @app.delete("/api/sessions/{sid}")
    def close(sid: str):
        return service.close(sid)

    return app


def invalid(exc: RequestValidationError) -> HTTPError:
    """FastAPI's list of parameter errors as the house's one line, e.g. ``since: got 'abc'; allowed: ...``."""
    err = exc.errors()[0]
    return HTTPError(422, f"{err['loc'][-1]}: got {err.get('input')!r}; allowed: {err['msg'].lower()}")


def answer(exc: HTTPError) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status)
