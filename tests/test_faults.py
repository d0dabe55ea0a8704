"""Fault injection: each case of issue 18 repeated, with its outcome asserted. Every accepted request
is resolved (answered, or failed with a clear error) and the serving and control loops live on:
cancel mid-decode, stop with a full queue, a reconfiguration that raises, a missing SLO file, a
tenant removed while its requests wait, deadlines, a client that leaves mid-stream, a server started
on the plan it served before a restart; over Ray (marked), a replica killed mid-load comes back on
its plan and its clients get a clear retryable error."""

import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from qos.cli import main
from runtime.limits import Limits, Rejected
from runtime.server import Server
from tests.test_http import KEYS, slos
from tests.test_profiler import needs_data

uvicorn = pytest.importorskip("uvicorn")


def shared_front(tmp_path_factory) -> Path:
    """A front of tiny-random (16-bit, and 4-bit everywhere), profiled once per test session for the
    modules that share it (fault, load and fuzz tests)."""
    path = tmp_path_factory.getbasetemp() / "shared-front" / "front.csv"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        assert main(["profile", "--model", "tiny-random", "--grid", "quantized=0,16;bits=4;gpu_experts=16",
                     "--out", str(path), "--max-windows", "1", "--seqlen", "32", "--new-tokens", "3",
                     "--repeats", "1", "--quiet"]) == 0
    return path


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    return shared_front(tmp_path_factory)


def resolved(reqs, timeout=60.0) -> list:
    """Each request's result, or the error it ended with; fails if one is still open after timeout."""
    out, deadline = [], time.time() + timeout
    for r in reqs:
        try:
            out.append(r.result(timeout=max(0.0, deadline - time.time())))
        except TimeoutError:
            pytest.fail(f"request {r.id} still unresolved after {timeout} s")
        except Exception as err:  # a clear error is a resolution
            out.append(err)
    return out


def wait_for(check, timeout=30.0, what="the condition"):
    deadline = time.time() + timeout
    while not check():
        if time.time() > deadline:
            pytest.fail(f"{what} did not happen within {timeout} s")
        time.sleep(0.02)


@pytest.fixture
def server(front):
    servers = []

    def make(config=None, **kwargs):
        s = Server(str(front), config or {"slos": slos()}, device="cpu", **{"tick_s": 3600} | kwargs)
        servers.append(s)
        return s
    yield make
    for s in servers:
        s.stop()
        assert not s.serve_thread.is_alive()


def plans_by_quantized(s: Server) -> dict[int, str]:
    return {s.plans[p].summary(s.engine.spec)["quantized"]: p for p in s.plans}


# --- the serving core, no Ray -------------------------------------------------------------------------
@needs_data
def test_a_server_starts_on_the_plan_it_served_before_a_restart(server):
    first = server()
    plans = plans_by_quantized(first)
    assert first.status()["plan_id"] == plans[0]  # nobody active, quality preferred
    quantized = max(plans)
    again = server(start_plan=plans[quantized], hysteresis=100.0)  # a switch would have to gain 100x
    status = again.status()
    assert status["plan_id"] == plans[quantized]
    assert status["history"][0]["from"] is None and status["history"][0]["reason"].startswith("restored")
    assert again.generate("batch", "hello", 3)["plan_id"] == plans[quantized]
    assert server(start_plan="not-a-plan").status()["plan_id"] == plans[0]  # unknown: the controller decides


@needs_data
def test_cancel_mid_decode_ends_the_request_with_what_it_has_and_the_loop_serves_on(server):
    s = server()
    req = s.submit("batch", "the market", 200)
    wait_for(lambda: len(req.tokens) >= 2, what="decoding")
    req.cancel()
    (result,) = resolved([req], timeout=30)
    assert result["finish_reason"] == "cancelled" and 2 <= result["new_tokens"] < 200
    wait_for(lambda: s.executor.queued() == 0, what="the slot freed")
    assert s.generate("batch", "hello", 3)["new_tokens"] == 3


@needs_data
def test_stop_with_a_full_queue_resolves_every_request_and_refuses_new_work(server):
    s = server(limits=Limits(max_seqs=1, max_queue=8))
    reqs = [s.submit("batch", "the market", 100)]
    wait_for(lambda: reqs[0].tokens, what="the first request decoding")
    reqs += [s.submit(t, "hello", 50) for t in ("batch", "interactive") * 4]
    with pytest.raises(Rejected, match="queue full"):
        s.submit("batch", "hello", 5)
    s.stop()
    outcomes = resolved(reqs, timeout=30)
    assert outcomes[0]["finish_reason"] == "aborted"
    assert all(isinstance(o, Rejected) and "the server stopped" in str(o) for o in outcomes[1:])
    with pytest.raises(Rejected, match="the server is stopping"):
        s.submit("batch", "hello", 3)
    assert not s.healthy()


@needs_data
def test_a_reconfiguration_that_raises_is_recorded_and_requests_are_still_resolved(server, monkeypatch):
    s = server(tick_s=0.1)
    plans = plans_by_quantized(s)
    calls = []

    def broken(plan):
        calls.append(plan.plan_id)
        raise RuntimeError("injected: the engine cannot apply this plan")
    monkeypatch.setattr(s.engine, "apply", broken)
    reqs = [s.submit("batch", "the market", 20) for _ in range(3)]
    smallest = min(s.plans[p].gpu_bytes(s.engine.spec) for p in s.plans)
    s.set_free_memory(smallest - s.engine.memory()["gpu_bytes"] + 1)  # only the smallest plan fits: a switch
    wait_for(lambda: calls, what="a switch attempted")
    more = [s.submit("interactive", "hello", 5) for _ in range(3)]
    outcomes = resolved(reqs + more, timeout=60)
    assert all(isinstance(o, dict) or "injected" in str(o) for o in outcomes), outcomes
    assert sum(isinstance(o, dict) for o in outcomes) >= 3  # served on the plan held
    status = s.status()
    assert status["plan_id"] == plans[0] and status["desired_plan_id"] == plans[max(plans)]
    assert "injected" in status["reconcile_errors"][-1]["error"] and status["reconcile_errors_total"] >= 1
    ticks = status["ticks"]
    wait_for(lambda: s.status()["ticks"] > ticks + 2, what="the control loop ticking on")
    monkeypatch.undo()  # the engine recovers: the next tick applies the desired plan
    wait_for(lambda: s.status()["plan_id"] == plans[max(plans)], what="the desired plan applied")
    assert s.generate("batch", "hello", 3)["new_tokens"] == 3 and s.healthy()


def test_the_executor_answers_waiting_requests_while_its_between_steps_hook_keeps_failing():
    from catalog.knobs import Knobs
    from catalog.rows import ModelIdentity
    from placement.session import open_session
    from runtime.executor import Executor

    session = open_session(ModelIdentity("tiny-random"), "cpu")
    plan = session.plan(Knobs())
    session.apply(plan)
    ex = Executor(session, {plan.plan_id: plan})

    def broken():
        raise RuntimeError("injected: between steps")
    thread = threading.Thread(target=ex.serve_forever, args=(broken,), daemon=True)
    thread.start()
    try:
        req = ex.submit("a", "hello", 3)
        assert req.exception(timeout=5) is not None or req.result(0)["new_tokens"] == 3
    finally:
        ex.stop()
        thread.join(10)


@needs_data
def test_a_missing_slo_file_keeps_the_last_good_slos_and_says_so(server, tmp_path):
    from catalog.slo import SLOError

    slo_file = tmp_path / "slos.yaml"
    with pytest.raises(SLOError, match="slos.yaml"):
        server({"slo_file": str(slo_file)})  # missing at start: one line naming it
    slo_file.write_text(yaml.safe_dump(slos(prefer="throughput")))
    s = server({"slo_file": str(slo_file)}, tick_s=0.05)
    slo_file.unlink()
    wait_for(lambda: s.status()["slo_rejections_total"] >= 1, what="the missing file recorded")
    status = s.status()
    assert "keeping the last good SLOs" in status["slo_rejections"][-1]["error"]
    assert len(status["slo_rejections"][-1]["error"].splitlines()) == 1
    assert status["prefer"] == "throughput" and {t["name"] for t in status["tenants"]} == {"interactive", "batch"}
    ticks = status["ticks"]
    assert s.generate("interactive", "hello", 3)["new_tokens"] == 3
    wait_for(lambda: s.status()["ticks"] > ticks + 3, what="ticks going on")
    assert s.status()["slo_rejections_total"] == 1  # said once, not once per tick


@needs_data
def test_a_tenant_removed_while_its_requests_wait_has_them_served_and_the_controller_ticks_on(server):
    s = server(limits=Limits(max_seqs=1), tick_s=0.05)
    reqs = [s.submit("batch", "the market", 8) for _ in range(4)]
    only = slos()
    only["tenants"] = [t for t in only["tenants"] if t["name"] == "interactive"]
    s.reconfigure({"slos": only})
    ticks = s.status()["ticks"]
    assert [r["new_tokens"] for r in resolved(reqs)] == [8] * 4
    wait_for(lambda: s.status()["ticks"] > ticks + 3, what="ticks going on")
    status = s.status()
    assert [t["name"] for t in status["tenants"]] == ["interactive"] and status["slo_rejections_total"] == 0
    with pytest.raises(Exception, match="unknown tenant 'batch'"):
        s.submit("batch", "hello")


@needs_data
def test_a_request_past_its_deadline_ends_running_or_waiting(server):
    s = server(limits=Limits(max_seqs=1))
    # 240 tokens take 0.4 s or more here even on an idle box: the deadline comes first
    running = s.submit("batch", "the market", 240, timeout_s=0.2)
    waiting = s.submit("batch", "hello", 5, timeout_s=0.1)  # ends while it waits for the one slot
    start = time.time()
    a, b = resolved([running, waiting], timeout=30)
    assert a["finish_reason"] == b["finish_reason"] == "timeout" and time.time() - start < 10
    assert a["new_tokens"] < 240 and b["new_tokens"] == 0
    with pytest.raises(Rejected, match="timeout_s"):
        s.submit("batch", "hello", 3, timeout_s=float("nan"))


# --- over HTTP, no Ray --------------------------------------------------------------------------------
@pytest.fixture
def web(server):
    from runtime.http_api import make_app

    s = server(tick_s=0.2)
    taken = []
    submit = s.submit

    def spy(*args, **kwargs):
        req = submit(*args, **kwargs)
        taken.append(req)
        return req
    s.submit = spy
    app = make_app(lambda: s, model_name="tiny-random")
    w = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=w.run, daemon=True)
    thread.start()
    wait_for(lambda: w.started, what="uvicorn started")
    yield w.servers[0].sockets[0].getsockname()[1], s, taken
    w.should_exit = True
    thread.join(10)


@needs_data
@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "waiting"])
def test_a_client_that_disconnects_cancels_its_request(web, stream):
    port, s, taken = web
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = {"model": "tiny-random", "prompt": "the market", "max_tokens": 200, "stream": stream}
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEYS['batch']}"})
    if stream:
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read(6) == b"data: "  # the first piece
    wait_for(lambda: taken and len(taken[-1].tokens) >= 2, what="decoding")
    conn.sock.shutdown(2)
    conn.close()  # the client leaves
    (result,) = resolved(taken[-1:], timeout=30)
    assert result["finish_reason"] == "cancelled" and result["new_tokens"] < 200
    wait_for(lambda: s.executor.queued() == 0, what="the executor emptied")


@needs_data
def test_a_tenant_key_reaches_no_control_call(web):
    """Free memory, reconfiguration and stopping are not on the HTTP API; /qos/status only reads."""
    from runtime.http_api import make_app

    routes = sorted((r.path, tuple(sorted(r.methods))) for r in make_app(lambda: None, model_name="m").routes
                    if getattr(r, "methods", None))
    assert routes == [("/health", ("GET",)), ("/qos/status", ("GET",)), ("/ready", ("GET",)),
                      ("/v1/chat/completions", ("POST",)),
                      ("/v1/completions", ("POST",)), ("/v1/models", ("GET",))]
    port, s, _ = web
    before = s.status()
    for method, path in [("POST", "/qos/status"), ("PUT", "/qos/status"), ("DELETE", "/qos/status"),
                         ("PATCH", "/qos/status"), ("POST", "/qos/free_memory"), ("POST", "/qos/stop"),
                         ("POST", "/qos/reload"), ("POST", "/qos/reconfigure"), ("POST", "/reconfigure"),
                         ("GET", "/docs"), ("GET", "/openapi.json"), ("DELETE", "/v1/models")]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request(method, path, json.dumps({"free_bytes": 1, "slos": {"tenants": [{"name": "x"}]}}),
                     {"Content-Type": "application/json", "Authorization": f"Bearer {KEYS['interactive']}"})
        assert conn.getresponse().status in (404, 405), (method, path)
        conn.close()
    after = s.status()
    assert (after["free_bytes"], after["plan_id"], after["slo_rejections_total"]) == \
        (before["free_bytes"], before["plan_id"], before["slo_rejections_total"])
    assert [t["name"] for t in after["tenants"]] == ["interactive", "batch"] and s.healthy()


# --- over Ray: a replica killed mid-load -----------------------------------------------------------
def http_post(url: str, body: dict, key: str = KEYS["batch"], timeout: float = 120) -> tuple:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def kill_replica(app: str, replica: str) -> None:
    """ray.kill of a Serve replica's actor: a crash, as far as Serve and the clients can tell."""
    import ray

    ray.kill(ray.get_actor(f"SERVE_REPLICA::{app}#QosServer#{replica}", namespace="serve"), no_restart=True)


def replaced(ray_app, app: str, old: set[str], count: int, timeout: float = 120.0) -> list[dict]:
    """The statuses of `count` live replicas once none of `old` is among them."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            got = ray_app.statuses(app, wait_s=5)
        except ValueError:
            got = []
        if len(got) == count and not {s["replica"] for s in got} & old:
            return got
        time.sleep(0.5)
    pytest.fail(f"the replicas of {app} were not replaced within {timeout} s")


@needs_data
@pytest.mark.ray
def test_a_replica_killed_mid_load_comes_back_on_its_plan_and_its_clients_are_told_to_retry(front, tmp_path,
                                                                                           monkeypatch):
    import pandas as pd

    from runtime import ray_app

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    slo_file = tmp_path / "slos.yaml"
    slo_file.write_text(yaml.safe_dump(slos()))
    port = ray_app.free_port()
    url = f"http://127.0.0.1:{port}"
    with ray_app.local_cluster(num_cpus=4):
        ray_app.write_config(tmp_path / "serve.yaml", front=str(front), slos=str(slo_file), app="faults",
                             device="cpu", tick_s=0.2, port=port)
        ray_app.deploy(tmp_path / "serve.yaml")
        (before,) = ray_app.statuses("faults")
        smallest = pd.read_csv(front).sort_values("gpu_bytes").iloc[0]
        (squeezed,) = ray_app.statuses("faults", free_bytes=int(smallest["gpu_bytes"]) - before["memory"]["gpu_bytes"]
                                       + 1, set_free=True)  # a co-tenant: only the smallest plan fits
        wait_for(lambda: ray_app.statuses("faults")[0]["plan_id"] == smallest["plan_id"], what="the squeeze applied")
        assert smallest["plan_id"] != before["plan_id"]  # the default plan is another: a restart must restore

        handle = ray_app.handle("faults")
        calls = [handle.generate.remote(t, "the market", 200) for t in ("batch", "interactive") * 20]
        out = {}

        def streaming():
            out["stream"] = http_post(url, {"model": "tiny-random", "prompt": "the market", "max_tokens": 200,
                                            "stream": True})
        threads = [threading.Thread(target=streaming), threading.Thread(target=lambda: out.setdefault(
            "plain", http_post(url, {"model": "tiny-random", "prompt": "the market", "max_tokens": 200})))]
        for t in threads:
            t.start()
        # kill once the handle's calls have reached the replica, not only the two HTTP requests: calls
        # still queued in the handle's router are sent to the replacement, and answered
        def in_flight():
            (s,) = ray_app.statuses("faults")
            return s["running"] > 0 and s["running"] + s["waiting"] > len(threads) + 8
        wait_for(in_flight, what="the handle's calls reaching the replica")
        kill_replica("faults", before["replica"])

        # every request is resolved, at once: answered, or told clearly that its replica died
        start = time.time()
        outcomes = []
        for c in calls:
            try:
                outcomes.append(ray_app.result(c, timeout_s=60))
            except ray_app.ReplicaLost as err:
                assert "retry" in str(err) and len(str(err).splitlines()) == 1
                outcomes.append(err)
        for t in threads:
            t.join(60)
            assert not t.is_alive()
        assert time.time() - start < 30
        assert any(isinstance(o, ray_app.ReplicaLost) for o in outcomes)
        assert all(isinstance(o, ray_app.ReplicaLost) or o["new_tokens"] == 200 for o in outcomes)
        status, headers, body = out["plain"]  # over HTTP: a 503 to retry (or an answer, had it finished)
        assert (status, headers.get("Retry-After")) == (503, str(ray_app.RETRY_AFTER_S)) or status == 200, out["plain"]
        if status == 503:
            assert "retry" in json.loads(body)["error"]["message"]
        status, _, body = out["stream"]  # a stream cut short ends with an error event
        last = body.decode().strip().split("\n\n")[-1]
        assert status == 200
        assert last == "data: [DONE]" or "retry" in json.loads(last[len("data: "):])["error"]["message"]

        # a client that retries is served once Serve has replaced the replica; the replacement carries
        # on from the dead one's rank: its plan (restored, not chosen afresh) and its simulated memory
        retried = http_post(url, {"model": "tiny-random", "prompt": "the market", "max_tokens": 4})
        assert retried[0] == 200 and json.loads(retried[2])["usage"]["completion_tokens"] == 4
        (after,) = replaced(ray_app, "faults", {before["replica"]}, 1)
        assert after["rank"] == before["rank"] and after["plan_id"] == smallest["plan_id"]
        assert after["restored"]["plan_id"] == smallest["plan_id"]
        assert after["history"][0]["from"] is None and after["history"][0]["reason"].startswith("restored")
        assert after["free_memory_version"] == squeezed["free_memory_version"]  # still squeezed
        assert after["budget_bytes"] < pd.read_csv(front)["gpu_bytes"].max()
        assert after["prefer"] == "quality" and {t["name"] for t in after["tenants"]} == {"interactive", "batch"}
        assert ray_app.result(handle.generate.remote("interactive", "hello", 3))["new_tokens"] == 3
        ray_app.stop("faults")
