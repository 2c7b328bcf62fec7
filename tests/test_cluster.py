"""Sweeps on real Ray clusters of two nodes started with `ray start`, token auth on and off, a node lost mid-sweep.

Every address is on the loopback interface: 127.0.0.2 for the heads, the nodes (`--node-ip-address`)
and the driver (the CLI passes the head's loopback address as its `_node_ip_address`). Not 127.0.0.1:
Ray rewrites that one to the machine's outward address. Every Ray process a test starts lives in a
session of its own (`ray start --block` in a new session); stopping a cluster SIGKILLs every process of
those sessions, found by session id, never by name.
"""

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gradwatch.sweep import study

pytest.importorskip("ray")
pytestmark = pytest.mark.ray

IP = "127.0.0.2"
BIN = Path(sys.executable).parent
SRC = Path(__file__).resolve().parents[1] / "src"
TINY = {"data": {"n_samples": 48}, "model": {"depth": 2, "width": 4}, "train": {"epochs": 100, "batch_size": 16}}
# 32 runs in ensembles of 2: 16 Ray tasks of about a second each, so a kill lands mid-sweep
STUDY = {"name": "cluster", "base": TINY, "chunk": 2,
         "grid": {"model.activation": ["sigmoid", "relu"], "train.seed": list(range(16))}}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((IP, 0))
        return sock.getsockname()[1]


def _session(sid: int) -> list[int]:
    """Every live process of session ``sid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


class Cluster:
    """A head and a second node on 127.0.0.2, one CPU each, token auth on (Ray's default once a token
    exists) or off; ``stop`` kills every process of both sessions and waits until none is left."""

    def __init__(self, home: Path, auth: bool):
        self.home, self.port, self.procs = home, _free_port(), []
        home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(SRC)}
        env.pop("RAY_AUTH_MODE", None)
        subprocess.run([BIN / "ray", "get-auth-token", "--generate"], env=env, capture_output=True, check=True,
                       timeout=60)  # a token in ~/.ray: `ray start --head` turns token auth on by itself
        node_env = {**env, "RAY_AUTH_MODE": "token" if auth else "disabled"}  # joining nodes: as Ray documents
        common = ["--block", f"--node-ip-address={IP}", "--num-cpus=1", "--disable-usage-stats"]
        self._start(["--head", f"--port={self.port}", "--include-dashboard=false", *common],
                    env if auth else node_env, "head")
        self._wait_port()
        self._start([f"--address={self.address}", *common], node_env, "node")

    @property
    def address(self) -> str:
        return f"{IP}:{self.port}"

    def _start(self, args: list[str], env: dict, name: str) -> None:
        log = open(self.home / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        self.procs.append(subprocess.Popen([BIN / "ray", "start", *args], env=env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True))

    def _wait_port(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection((IP, self.port), timeout=1).close()
                return
            except OSError:
                assert self.procs[0].poll() is None, (self.home / "head.log").read_text()
                time.sleep(0.2)
        raise TimeoutError(f"the head did not open {self.address}")

    def raylet(self, node: int) -> int:
        """The raylet of node ``node`` (0: the head), found among that node's own processes."""
        for pid in _session(self.procs[node].pid):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                return pid
        raise LookupError("no raylet")

    def stop(self) -> None:
        deadline = time.monotonic() + 30
        for proc in reversed(self.procs):
            while (pids := _session(proc.pid)) and time.monotonic() < deadline:
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
            proc.wait(timeout=10)
        assert not [pid for proc in self.procs for pid in _session(proc.pid)], "Ray processes left running"


def keys(db: Path) -> list[str]:
    try:
        with sqlite3.connect(db) as con:
            return [k for (k,) in con.execute("SELECT key FROM runs")]
    except sqlite3.OperationalError:  # not created yet
        return []


def sweep_cmd(tmp_path: Path, db: Path, *extra: str) -> list[str]:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    return [sys.executable, "-m", "gradwatch", "sweep", str(path), "--store", str(db), "--out",
            str(tmp_path / "report"), *extra]


def driver_env(home: Path) -> dict:
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(SRC)}
    env.pop("RAY_AUTH_MODE", None)  # what a user has: nothing set
    return env


def expected() -> list[str]:
    return sorted(spec.key() for *_, spec in study(STUDY).jobs)


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory):
    cluster = None
    try:
        cluster = Cluster(tmp_path_factory.mktemp("token") / "home", auth=True)
        yield cluster
    finally:
        if cluster:
            cluster.stop()


def rows(db: Path) -> dict[str, tuple]:
    with sqlite3.connect(db) as con:
        return {key: (name, grp, status, spec, summary) for key, name, grp, status, spec, summary in
                con.execute("SELECT key, name, grp, status, spec, summary FROM runs")}


def test_two_node_sweep_with_token_auth_stores_what_the_local_backend_stores(token_cluster, tmp_path):
    home = token_cluster.home  # the head's machine: its ~/.ray/auth_token is there, RAY_AUTH_MODE is not set
    local = subprocess.run(sweep_cmd(tmp_path, tmp_path / "local.db"), capture_output=True, text=True,
                           timeout=300, env=driver_env(home))
    assert local.returncode == 0, local.stderr
    start = time.monotonic()
    remote = subprocess.run(sweep_cmd(tmp_path, tmp_path / "ray.db", "--backend", "ray", "--address",
                                      token_cluster.address), capture_output=True, text=True, timeout=300,
                            env=driver_env(home))
    print(f"two nodes: 32 runs in {time.monotonic() - start:.1f} s (driver start and Ray connect included)")
    assert remote.returncode == 0, remote.stdout + remote.stderr
    assert "32 trained on 2 Ray node(s), 0 reused from the store." in remote.stdout
    ours, theirs = rows(tmp_path / "local.db"), rows(tmp_path / "ray.db")
    assert sorted(ours) == sorted(theirs) == expected()
    assert ours == theirs  # same names, groups, statuses, specs and summaries, to the last digit


def test_driver_killed_mid_sweep_then_rerun_stores_exactly_the_grid(token_cluster, tmp_path):
    db = tmp_path / "runs.db"
    cmd = sweep_cmd(tmp_path, db, "--backend", "ray", "--address", token_cluster.address)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=driver_env(
        token_cluster.home), start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None and not keys(db):
            time.sleep(0.05)
        proc.kill()
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    stored = len(keys(db))
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=driver_env(token_cluster.home))
    print(f"driver SIGKILL: {stored} stored at the kill, {len(keys(db))} after the re-run")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert 0 < stored < 32 and sorted(keys(db)) == expected()  # none lost, none twice


def test_driver_without_the_token_is_refused_in_one_line(token_cluster, tmp_path):
    start = time.monotonic()
    out = subprocess.run(sweep_cmd(tmp_path, tmp_path / "r.db", "--backend", "ray", "--address",
                                   token_cluster.address), capture_output=True, text=True, timeout=120,
                         env=driver_env(tmp_path / "elsewhere"))
    assert out.returncode == 2 and time.monotonic() - start < 90
    assert out.stderr.strip().startswith(f"error: address: got '{token_cluster.address}'; it refused this driver")
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_no_cluster_at_the_address_is_one_line_at_once(tmp_path):
    address, start = f"{IP}:{_free_port()}", time.monotonic()
    out = subprocess.run(sweep_cmd(tmp_path, tmp_path / "r.db", "--backend", "ray", "--address", address),
                         capture_output=True, text=True, timeout=120, env=driver_env(tmp_path))
    assert out.returncode == 2 and time.monotonic() - start < 60
    assert out.stderr.strip() == (f"error: address: got '{address}'; nothing listens there (connection refused): "
                                  "no Ray cluster runs at that address, or its head uses another port (see "
                                  "`ray start --head --port`)")


def test_node_lost_mid_sweep_on_a_cluster_without_auth_then_rerun_stores_exactly_the_grid(tmp_path):
    cluster = None
    try:
        cluster = Cluster(tmp_path / "home", auth=False)  # a token exists here, the cluster ignores tokens
        db = tmp_path / "runs.db"
        cmd = sweep_cmd(tmp_path, db, "--backend", "ray", "--address", cluster.address)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=driver_env(cluster.home), start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and proc.poll() is None and not keys(db):
                time.sleep(0.05)
            at_kill = len(keys(db))
            os.kill(cluster.raylet(1), signal.SIGKILL)  # the second node is gone
            output, _ = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
        after = len(keys(db))
        lines = [line for line in output.splitlines() if line.startswith("error:")]
        assert proc.returncode == 0 or (proc.returncode == 2 and len(lines) == 1), output
        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=driver_env(cluster.home))
        print(f"node lost: {at_kill} stored at the kill, {after} when the sweep ended "
              f"(exit {proc.returncode}), {len(keys(db))} after the re-run")
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert 0 < at_kill < 32 and sorted(keys(db)) == expected()  # none lost, none twice
    finally:
        if cluster:
            cluster.stop()
