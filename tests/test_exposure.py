"""Every listener the project starts binds loopback unless the operator names an address: the
listening sockets of every Ray process of `ray_app.local_cluster()` (tests, demo) with an application
deployed by `qos serve`, and of the README's `ray start --head` line, each with the address it binds.

Ray binds its servers to loopback only when the node's address is loopback, which on Linux it takes
only in its single-machine mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0): without it, 11 of 15 listeners
of `ray start --head` and 17 of 19 of `local_cluster()` with `qos serve` bound 0.0.0.0, :: or the
machine's address. In it, one remains: each Serve replica's inter-deployment gRPC server, which Serve
binds to all interfaces whatever it is told, and which only token auth guards."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from qos.cli import main
from tests.test_faults import shared_front
from tests.test_http import slos
from tests.test_profiler import needs_data
from tests.conftest import stop_processes
from tests.test_readme import BLOCKS, ROOT, _port_taken, commands

psutil = pytest.importorskip("psutil")

# What Ray binds beyond loopback whatever it is told: each Serve replica's inter-deployment gRPC
# server ("[::]:0" in ray/serve/_private/replica.py), one per replica process. Token auth guards it (an
# interceptor); with auth off it unpickles what any host sends it. The tests below assert exactly this
# set, so a Ray that adds a listener, or moves this one to loopback, fails them: then update the
# README's security note and this.
REPLICA = "ray::ServeReplica:"
ALL_INTERFACES = ("::", "0.0.0.0")


class Listener(NamedTuple):
    ip: str
    port: int
    process: str  # its name (Ray renames its workers and agents: ray::DashboardAgent, ray::ProxyActor, ...)
    pid: int


def listeners(pids: set[int]) -> set[Listener]:
    """The listening TCP sockets and the bound, unconnected UDP sockets of the processes `pids`."""
    found = set()
    for c in psutil.net_connections(kind="inet"):
        if c.pid in pids and c.laddr and (c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr)):
            try:
                found.add(Listener(c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name(), c.pid))
            except psutil.NoSuchProcess:
                pass
    return found


def with_descendants(pids: set[int]) -> set[int]:
    out = set(pids)
    for pid in pids:
        try:
            out |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
    return out


def loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback  # ::ffff:127.0.0.1 is loopback too


def beyond_loopback(found: set[Listener], replicas: int) -> list[Listener]:
    """The listeners beyond loopback, after checking that they are exactly the known ones: one on all
    interfaces in each of the `replicas` Serve replica processes."""
    beyond = sorted(l for l in found if not loopback(l.ip))
    unknown = [l for l in beyond if not (l.process.startswith(REPLICA) and l.ip in ALL_INTERFACES)]
    assert not unknown, f"Ray listeners beyond loopback:\n{table(set(unknown))}"
    per_replica = Counter(l.pid for l in beyond)
    assert len(per_replica) == replicas and set(per_replica.values()) <= {1}, (
        f"expected one listener on all interfaces in each of {replicas} Serve replica(s) (the inter-deployment "
        f"gRPC server), found:\n{table(set(beyond))}\nupdate the README's security note and this test")
    return beyond


def probe(port: int) -> str:
    """Call a Serve replica's inter-deployment gRPC server from the machine's own non-loopback address
    (as another host would) without a token; the status code it answers (None: no such address)."""
    import grpc

    ips = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
           if a.family.name == "AF_INET" and not loopback(a.address)]
    if not ips:
        return None
    with grpc.insecure_channel(f"{ips[0]}:{port}") as channel:
        call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest", request_serializer=bytes,
                                   response_deserializer=bytes)
        try:
            call(b"\x0a\x01x", timeout=30)  # pickled_request_metadata: one byte, not a pickle
        except grpc.RpcError as err:
            return err.code().name
    return "OK"


def table(found: set[Listener]) -> str:
    return "\n".join(f"  {l.ip:>18} {l.port:>6} {l.process}" for l in sorted(found))


def test_loopback_is_told_from_other_addresses_and_only_a_replicas_grpc_server_may_be_beyond_it():
    assert all(map(loopback, ["127.0.0.1", "127.0.1.1", "::1", "::ffff:127.0.0.1"]))
    assert not any(map(loopback, ["0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2", "fe80::1%eth0"]))
    raylet = Listener("::ffff:127.0.0.1", 1, "raylet", 10)
    replica = Listener("::", 2, "ray::ServeReplica:app:QosServer", 11)
    assert beyond_loopback({raylet, replica}, replicas=1) == [replica]
    assert beyond_loopback({raylet}, replicas=0) == []
    for found, replicas in [({raylet, Listener("::", 6379, "gcs_server", 12)}, 0),  # another process
                            ({raylet, replica._replace(ip="192.0.2.2")}, 1),  # another address
                            ({raylet, replica, replica._replace(port=3)}, 1),  # two in one replica
                            ({raylet}, 1)]:  # Serve moved it to loopback
        with pytest.raises(AssertionError):
            beyond_loopback(found, replicas)


def test_joining_a_local_cluster_uses_single_machine_mode_only_when_it_is_on_loopback():
    from runtime import ray_app

    for address, single in [("127.0.0.1:6379", True), ("localhost:6379", True), ("[::1]:6379", True),
                            ("192.0.2.2:6379", False), ("head.example:6379", False), (None, False),
                            ("ray://127.0.0.1:10001", False)]:
        assert ray_app._loopback_address(address) is single, address


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    return shared_front(tmp_path_factory)


@needs_data
@pytest.mark.ray
def test_local_cluster_and_the_application_qos_serve_deploys_on_it_listen_on_loopback_only(front, tmp_path):
    from runtime import ray_app

    me = psutil.Process()
    before = listeners({me.pid})  # the test process's own, if any: not Ray's
    slo_file = tmp_path / "slos.yaml"
    slo_file.write_text(yaml.safe_dump(slos()))
    port = ray_app.free_port()
    with ray_app.local_cluster(num_cpus=4):
        assert main(["serve", "--front", str(front), "--slos", str(slo_file), "--name", "exposure", "--config",
                     str(tmp_path / "serve.yaml"), "--device", "cpu", "--port", str(port), "--json"]) == 0
        found = listeners(with_descendants({me.pid})) - before
        import ray
        node_ip = ray.util.get_node_ip_address()
        beyond = beyond_loopback(found, replicas=1)
        print(f"local_cluster() with `qos serve`: {len(found)} listeners\n{table(found)}")
        answer = probe(beyond[0].port)
        token_auth = os.environ.get("RAY_AUTH_MODE") == "token"
    names = {l.process for l in found}
    # the measurement sees the cluster: GCS, raylet, both agents, Serve's proxy on its port
    assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, table(found)
    assert any(l.port == port and l.process.startswith("ray::ProxyActor") for l in found), table(found)
    assert node_ip == "127.0.0.1"
    assert os.environ.get(ray_app.SINGLE_MACHINE) is None  # the mode ends with the cluster
    # the replica's gRPC server is guarded exactly when token auth is on (local_cluster's default: off,
    # and then a caller from another host reaches Serve's unpickling: UNKNOWN, its error)
    assert answer in (None, "UNAUTHENTICATED" if token_auth else "UNKNOWN"), answer


def _readme_ray_block() -> list[str]:
    """The README's commands that start the local cluster: the Ray block's `ray ...` lines up to its
    `ray start`."""
    (block,) = [b for b in BLOCKS if "ray" in b.needs and any(re.search(r"\bray start\b", c) for c in commands(b.code))]
    ray_lines = [c for c in commands(block.code) if re.match(r"(\w+=\S+ )*ray ", c)]
    starts = [i for i, c in enumerate(ray_lines) if re.search(r"\bray start\b", c)]
    assert len(starts) == 1, f"expected one `ray start` in the README's Ray block: {ray_lines}"
    return ray_lines[:starts[0] + 1]


def test_the_readme_starts_ray_in_single_machine_mode_with_token_auth():
    *before, start = _readme_ray_block()
    assert re.match(r"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start --head\b", start), start
    assert any(c.startswith("ray get-auth-token --generate") for c in before), before


@needs_data
@pytest.mark.ray
def test_the_readmes_cluster_listens_on_loopback_only_and_qos_serve_joins_it(front, tmp_path):
    if _port_taken(6379) or _port_taken(8265):
        pytest.skip("a Ray cluster already runs here (ports 6379/8265 taken)")
    ray_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    marker = f"RAY_TMPDIR={ray_dir}".encode()
    env = {**os.environ, "RAY_TMPDIR": ray_dir, "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "RAY_AUTH_MODE"):
        env.pop(name, None)  # as in the operator's shell

    def cluster() -> set[int]:
        """The cluster's processes: those started with its RAY_TMPDIR and their children (the agents
        and workers rename themselves over their environment, so they are found as children)."""
        pids = set()
        for p in psutil.process_iter():
            try:
                if p.pid != os.getpid() and marker in Path(f"/proc/{p.pid}/environ").read_bytes().split(b"\0"):
                    pids.add(p.pid)
            except OSError:
                pass
        return with_descendants(pids)

    def run(args: list[str], what: str) -> None:
        done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{what} exited with {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}"

    try:
        for command in _readme_ray_block():
            run(["bash", "-c", command], f"`{command}`")
        slo_file = tmp_path / "slos.yaml"
        slo_file.write_text(yaml.safe_dump(slos()))
        from runtime.ray_app import free_port

        port = free_port()
        # `qos serve` finds the cluster and joins it (outside single-machine mode a driver would wait
        # on the machine's address, where nothing listens), and deploys an application
        run([sys.executable, "-m", "qos", "serve", "--front", str(front), "--slos", str(slo_file), "--config",
             str(tmp_path / "serve.yaml"), "--device", "cpu", "--port", str(port)], "qos serve")
        found = listeners(cluster())
        print(f"the README's `ray start` and `qos serve`: {len(found)} listeners\n{table(found)}")
        names = {l.process for l in found}
        assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, table(found)
        assert {6379, 8265, port} <= {l.port for l in found}, table(found)  # GCS, dashboard, Serve's proxy
        (replica,) = beyond_loopback(found, replicas=1)
        assert probe(replica.port) in (None, "UNAUTHENTICATED")  # token auth on: a caller without it is refused
    finally:
        stop_processes(cluster)
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_a_local_cluster_without_token_auth_says_so_once(monkeypatch, capsys):
    """local_cluster() (tests, `qos demo`) runs without token auth unless told: it warns, once, in
    one line naming what is exposed (ray.init is stubbed: no cluster starts)."""
    from runtime import ray_app

    def no_cluster(*args, **kwargs):
        raise RuntimeError("no cluster in this test")

    monkeypatch.setattr(ray_app.ray, "init", no_cluster)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray_app._warn_once.cache_clear()
    for _ in range(2):
        with pytest.raises(RuntimeError, match="no cluster"), ray_app.local_cluster():
            pass
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "RAY_AUTH_MODE=disabled" in err[0] and "all interfaces" in err[0]
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    ray_app._warn_once.cache_clear()
    with pytest.raises(RuntimeError, match="no cluster"), ray_app.local_cluster():
        pass
    assert capsys.readouterr().err == ""


def test_a_local_cluster_that_timed_out_at_startup_is_started_once_more(monkeypatch, caplog):
    """Ray gives the raylet a fixed 30 s to register (a loaded CI machine missed it once): local_cluster
    starts the node again, once, from a fresh folder; any other failure, or a second timeout, is
    raised (ray.init is stubbed: no cluster starts)."""
    from runtime import ray_app

    calls, shutdowns = [], []

    def init(*args, fail=("timeout",), **kwargs):
        calls.append(kwargs["_temp_dir"])
        if len(calls) <= len(fail):
            raise Exception({"timeout": "The current node timed out during startup. This could happen ...",
                             "other": "something else"}[fail[len(calls) - 1]])

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setattr(ray_app.ray, "shutdown", lambda: shutdowns.append(1))
    monkeypatch.setattr(ray_app.serve, "shutdown", lambda: None)
    monkeypatch.setattr(ray_app.ray, "init", init)
    with caplog.at_level("WARNING"), ray_app.local_cluster():
        pass
    assert len(calls) == 2 and calls[0] != calls[1] and len(shutdowns) == 2  # after the timeout, and at exit
    assert "timed out at startup" in caplog.text and not any(os.path.exists(t) for t in calls)
    for fail in (("timeout", "timeout"), ("other",)):
        calls.clear()
        monkeypatch.setattr(ray_app.ray, "init", lambda *a, fail=fail, **k: init(*a, fail=fail, **k))
        with pytest.raises(Exception, match="timed out during startup" if fail[0] == "timeout" else "something"):
            with ray_app.local_cluster():
                pass
        assert len(calls) == len(fail)
