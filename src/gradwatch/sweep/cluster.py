"""Training ensembles as Ray tasks, on a cluster started with ``ray start`` or on a local Ray.

``connect(address)`` joins a cluster the way ``ray start`` on the same machine would: Ray >= 2.5x
turns token authentication on whenever a token exists (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN`` or
``RAY_AUTH_TOKEN_PATH``), but a driver given an explicit address presents it only if
``RAY_AUTH_MODE=token`` is set, so this sets it in that case (``RAY_AUTH_MODE`` set by the user
wins). A head that is unreachable or refuses the driver is one SpecError line naming the address
and the likely cause, after at most ``WAIT`` seconds of probing plus Ray's own bounded retries
(about 20 s). A head on a loopback address other than 127.0.0.1 (which Ray rewrites to the
machine's outward address) makes the driver use that same address as its node IP, so a cluster of
one machine's loopback stays on it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Callable

from gradwatch.records import Run
from gradwatch.spec import SpecError
from gradwatch.sweep.grid import Job
from gradwatch.sweep.local import train_chunk, worker

WAIT = 5.0  # seconds to wait for the head's port to answer before calling the address wrong
TOKEN = "a token-auth cluster needs this machine to hold its token: copy the head's ~/.ray/auth_token here " \
        "or set RAY_AUTH_TOKEN"


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SpecError(f"address: got {address!r}; allowed: HOST:PORT of a Ray head, e.g. 10.0.0.5:6379")
    return host.strip("[]"), int(port)


def _probe(address: str) -> None:
    """Refuse an address whose port does not answer (no cluster, wrong port, wrong host) in one line."""
    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=WAIT).close()
    except ConnectionRefusedError:
        raise SpecError(f"address: got {address!r}; nothing listens there (connection refused): no Ray cluster "
                        f"runs at that address, or its head uses another port (see `ray start --head --port`)") \
            from None
    except OSError as exc:  # timeout, unknown host, unreachable network
        raise SpecError(f"address: got {address!r}; no answer within {WAIT:.0f} s ({exc.strerror or exc}): "
                        "wrong host, or a firewall between here and the head") from None


def _use_token_if_any() -> None:
    """Token auth exactly when ``ray start`` here would use it: RAY_AUTH_MODE if set, else iff a token exists."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _node_ip(address: str) -> str | None:
    """The driver's node IP: the head's own loopback address when it is one (else Ray's choice)."""
    host, _ = _host_port(address)
    try:
        return host if ipaddress.ip_address(host).is_loopback else None
    except ValueError:  # a host name
        return None


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 sent to /dev/null for the block (C++ logging writes to the descriptor, not sys.stderr)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (None: start a local Ray), unless Ray is initialised already."""
    import ray

    if ray.is_initialized():
        return
    if address is None:
        ray.init(include_dashboard=False, log_to_driver=False)
        return
    _probe(address)
    _use_token_if_any()
    try:
        with _quiet_stderr():  # Ray's C++ client logs each retry there: 20 lines would bury our one
            ray.init(address=address, _node_ip_address=_node_ip(address), include_dashboard=False,
                     log_to_driver=False, logging_level=logging.ERROR)
    except Exception as exc:  # ConnectionError, AuthenticationError, RuntimeError: Ray's wording varies by version
        text = f"{type(exc).__name__}: {exc} {exc.__cause__ or ''}"
        auth = "auth" in text.lower() or "token" in text.lower()
        cause = (f"it refused this driver's credentials; {TOKEN}" if auth else
                 "something answers there but did not accept a Ray driver: is it the head's GCS port (the one "
                 "`ray start --head` printed), and the same Ray version here as on the cluster?")
        raise SpecError(f"address: got {address!r}; {cause}") from None


def _task(jobs: list[Job], thin: int, evaluate_every: int, every: int) -> tuple[str, list[Run]]:
    """One ensemble on whichever node Ray chose; returns that node's id with the Runs."""
    import ray

    worker()  # a Ray task holds one CPU
    return ray.get_runtime_context().get_node_id(), train_chunk(jobs, thin, evaluate_every, every)


def run_ray(todo: list[list[Job]], finished: Callable[[list[Run]], None], address: str | None, thin: int,
            evaluate_every: int, every: int) -> int:
    """Send every chunk to Ray as a task (retried by Ray if its node dies); returns how many nodes trained."""
    import ray

    connect(address)
    remote = ray.remote(num_cpus=1)(_task)
    pending = [remote.remote(part, thin, evaluate_every, every) for part in todo]
    nodes = set()
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        node, runs = ray.get(done[0])
        nodes.add(node)
        finished(runs)
    return len(nodes)

