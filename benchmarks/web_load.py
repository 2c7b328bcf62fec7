"""Load test for the playground: N browser-like sessions train 10x10 nets at once on a 2-core server.

Starts ``gradwatch serve`` in its own process (pinned to 2 cores where the machine has more), opens
N sessions with the seed's failing net, presses Train in each and polls each one's state every 150 ms
the way the page does. Per session it prints the update rate (polls that brought a new epoch, per
second) and the longest stall (the longest time without a new epoch, and the slowest single poll).
Acceptance: every session keeps updating, no stall reaches 2 s.

    .venv/bin/python benchmarks/web_load.py [--sessions 8] [--seconds 20]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx

NET = {"model.depth": 10, "model.width": 10, "model.activation": "sigmoid", "train.epochs": 2000}
POLL_S = 0.15
STALL_LIMIT_S = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, store: str, cores: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gradwatch", "serve", "--port", str(port), "--store", store]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    available = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(proc.pid, available[:cores])  # the server gets `cores` cores, like a small laptop
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/api/options", timeout=1).raise_for_status()
            return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server did not start: {proc.stderr.read().decode()[-2000:]}")


def session(base: str, seconds: float, out: dict, index: int, start: threading.Barrier) -> None:
    with httpx.Client(base_url=base, timeout=30) as client:
        sid = client.post("/api/sessions", json=NET).json()["id"]
        start.wait()
        client.post(f"/api/sessions/{sid}/train")
        began = last_new = time.monotonic()
        seen, new_polls, since, version = -1, 0, 0, -1
        stall = slowest = 0.0
        while (now := time.monotonic()) - began < seconds:
            t0 = time.monotonic()
            state = client.get(f"/api/sessions/{sid}/state", params={"since": since, "boundary": version}).json()
            t1 = time.monotonic()
            slowest = max(slowest, t1 - t0)
            since += len(state["history"]["epoch"])
            version = state["boundary_version"]
            if state["updates"] != seen:
                if seen >= 0:
                    new_polls += 1
                    stall = max(stall, t1 - last_new)
                seen, last_new = state["updates"], t1
            time.sleep(max(0.0, POLL_S - (time.monotonic() - now)))
        stall = max(stall, time.monotonic() - last_new)
        out[index] = {"id": sid, "rate": new_polls / (time.monotonic() - began), "epochs": state["epoch"],
                      "stall": stall, "slowest_poll": slowest}
        client.delete(f"/api/sessions/{sid}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(port, os.path.join(tmp, "runs.db"), args.cores)
        try:
            results: dict[int, dict] = {}
            barrier = threading.Barrier(args.sessions)
            threads = [threading.Thread(target=session, args=(f"http://127.0.0.1:{port}", args.seconds, results, i,
                                                                barrier)) for i in range(args.sessions)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            server.terminate()
            server.wait(10)
    print(f"{args.sessions} sessions, 10x10 sigmoid nets, server on {args.cores} cores, {args.seconds:g} s, "
          f"polling every {POLL_S * 1000:.0f} ms")
    print(f"{'session':>8} {'updates/s':>10} {'epochs':>7} {'max stall s':>12} {'slowest poll s':>15}")
    for i in sorted(results):
        r = results[i]
        print(f"{i:>8} {r['rate']:>10.1f} {r['epochs']:>7} {r['stall']:>12.2f} {r['slowest_poll']:>15.2f}")
    worst = max(r["stall"] for r in results.values())
    low = min(r["rate"] for r in results.values())
    ok = len(results) == args.sessions and worst < STALL_LIMIT_S
    print(f"min update rate {low:.1f}/s, max stall {worst:.2f} s (limit {STALL_LIMIT_S:g} s): {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
