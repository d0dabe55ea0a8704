"""The OpenAI-compatible HTTP API over a real Server (tiny-random, CPU), served by uvicorn on a loopback
port and called with the official `openai` client and with raw HTTP, as users do; no Ray."""

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from runtime.http_api import make_app
from runtime.metrics import METRICS, Metrics
from runtime.server import Server
from tests.conftest import profile_tiny
from tests.test_profiler import needs_data

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

KEYS = {"interactive": "sk-interactive-0123456789", "batch": "sk-batch-abcdefghijklmnop"}


def slos(prefer="quality"):
    return {"tenants": [
        {"name": "interactive", "max_ppl_increase": 0.5, "priority": 2, "max_ttft_s": 1e-6,
         "api_keys": [KEYS["interactive"]]},
        {"name": "batch", "max_ppl_increase": 0.5, "priority": 1, "api_keys": [KEYS["batch"]]},
    ], "prefer": prefer}


class Recorded:
    """An in-memory metric with Ray's interface."""

    made: dict = {}

    def __init__(self, name, description="", tag_keys=(), boundaries=None):
        self.name, self.tag_keys, self.values = name, tuple(tag_keys), {}
        Recorded.made[name] = self

    def _key(self, tags):
        assert set(tags or {}) == set(self.tag_keys), (self.name, tags)
        return tuple(sorted((tags or {}).items()))

    def inc(self, value=1.0, tags=None):
        assert value > 0, (self.name, value)  # Ray refuses counters that do not grow
        self.values[self._key(tags)] = self.values.get(self._key(tags), 0) + value

    def set(self, value, tags=None):
        self.values[self._key(tags)] = value

    def observe(self, value, tags=None):
        self.values.setdefault(self._key(tags), []).append(value)

    def total(self, **tags):
        return sum(v if not isinstance(v, list) else len(v) for k, v in self.values.items()
                   if set(tags.items()) <= set(k))


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    return profile_tiny(tmp_path_factory.mktemp("front") / "front.csv", "quantized=0,16;bits=4;gpu_experts=16")


@contextlib.contextmanager
def http_server(app):
    """`app` served by uvicorn on a free loopback port, in a thread; its base URL."""
    web = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not web.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{web.servers[0].sockets[0].getsockname()[1]}"
    finally:
        web.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def api(front):
    metrics = Metrics(Recorded, Recorded, Recorded)
    server = Server(str(front), {"slos": slos()}, device="cpu", tick_s=0.2, metrics=metrics)
    try:
        with http_server(make_app(lambda: server, model_name="tiny-random")) as url:
            yield url, server
    finally:
        server.stop()


def client(url, tenant="batch"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS[tenant], max_retries=0, timeout=120)


def post(url, path, body, key=KEYS["batch"]):
    """(status, parsed JSON) of a raw POST; body: bytes sent as they are, or JSON-encoded."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(url + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@needs_data
def test_completion_and_chat_through_the_openai_client(api):
    url, server = api
    c = client(url)
    done = c.completions.create(model="tiny-random", prompt="the market", max_tokens=8, temperature=0)
    assert done.object == "text_completion" and done.model == "tiny-random"
    assert done.choices[0].finish_reason in ("length", "stop") and done.choices[0].text
    assert done.usage.completion_tokens == 8 and done.usage.prompt_tokens > 0
    assert done.usage.total_tokens == done.usage.prompt_tokens + 8
    assert done.model_extra["qos"]["tenant"] == "batch"  # the key named the tenant

    # streaming gives the same greedy text, piece by piece, then the usage
    pieces = list(c.completions.create(model="tiny-random", prompt="the market", max_tokens=8, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    text = "".join(p.choices[0].text for p in pieces if p.choices)
    assert text == done.choices[0].text
    assert pieces[-1].usage.completion_tokens == 8

    chat = client(url, "interactive").chat.completions.create(
        model="tiny-random", messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0.7, seed=3)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 6
    assert chat.model_extra["qos"]["tenant"] == "interactive"
    streamed = list(client(url, "interactive").chat.completions.create(
        model="tiny-random", messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0.7, seed=3,
        stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in streamed) == chat.choices[0].message.content
    assert streamed[-1].choices[0].finish_reason == chat.choices[0].finish_reason

    models = c.models.list()
    assert [m.id for m in models.data] == ["tiny-random"]


@needs_data
def test_bad_bodies_keys_and_models_get_clear_errors(api):
    url, server = api
    body = {"model": "tiny-random", "prompt": "hi", "max_tokens": 4}
    status, err = post(url, "/v1/completions", b"{not json")
    assert status == 400 and "JSON" in err["error"]["message"]
    for bad, field in ((body | {"max_tokens": 0}, "max_tokens"), (body | {"temperature": "hot"}, "temperature"),
                       (body | {"top_p": 0}, "top_p"), ({"model": "tiny-random"}, "prompt"),
                       (body | {"n": 2}, "n"), (body | {"logprobs": 3}, "logprobs"),
                       (body | {"prompt": ["a", "b"]}, "prompt"), (body | {"stop": 5}, "stop")):
        status, err = post(url, "/v1/completions", bad)
        assert status == 400 and err["error"]["param"] == field, (bad, err)
        assert field in err["error"]["message"]
    status, err = post(url, "/v1/chat/completions", {"model": "tiny-random", "messages": [{"role": "robot",
                                                                                           "content": "x"}]})
    assert status == 400 and err["error"]["param"].startswith("messages.0.role")

    assert post(url, "/v1/completions", body, key=None)[0] == 401
    status, err = post(url, "/v1/completions", body, key="sk-not-a-key-of-anyone")
    assert status == 401 and err["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong-key-123456789", max_retries=0).completions.create(
            model="tiny-random", prompt="hi", max_tokens=2)

    status, err = post(url, "/v1/completions", body | {"model": "gpt-4"})
    assert status == 404 and "tiny-random" in err["error"]["message"]
    long = " ".join(["word"] * (server.executor.decoder.scratch + 10))
    status, err = post(url, "/v1/completions", body | {"prompt": long})
    assert status == 400 and "context" in err["error"]["message"]
    status, err = post(url, "/v1/completions", body | {"max_tokens": 10**9})
    assert status == 400 and "max_new_tokens" in err["error"]["message"]


@needs_data
def test_a_full_queue_is_a_429_with_retry_after(front):
    from runtime.limits import Limits

    server = Server(str(front), {"slos": slos()}, device="cpu", tick_s=3600, limits=Limits(max_seqs=1, max_queue=1))
    try:
        with http_server(make_app(lambda: server, model_name="tiny-random")) as url:
            busy = [server.submit("batch", "the market", 200)]  # decoding in the one slot
            while server.executor.running_count() < 1:
                time.sleep(0.01)
            busy.append(server.submit("batch", "the market", 200))  # the one place in the queue
            req = urllib.request.Request(url + "/v1/completions", method="POST", headers={
                "Authorization": f"Bearer {KEYS['batch']}", "Content-Type": "application/json"},
                data=json.dumps({"model": "tiny-random", "prompt": "hi", "max_tokens": 2}).encode())
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(req, timeout=30)
            assert err.value.code == 429 and err.value.headers["Retry-After"] == "1"
            assert json.loads(err.value.read())["error"]["type"] == "rate_limit_error"
            for r in busy:
                r.cancel()
    finally:
        server.stop()


@needs_data
def test_health_status_and_metrics(api):
    url, server = api
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        assert json.loads(r.read()) == {"status": "ok"}
    assert server.ready(timeout=60)
    with urllib.request.urlopen(url + "/ready", timeout=30) as r:
        assert json.loads(r.read()) == {"status": "ready"}
    server.executor.warmed.clear()  # as while the first plan warms up: alive, not ready
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + "/ready", timeout=30)
        assert err.value.code == 503 and json.loads(err.value.read()) == {"status": "warming"}
        with urllib.request.urlopen(url + "/health", timeout=30) as r:
            assert r.status == 200
    finally:
        server.executor.warmed.set()
    req = urllib.request.Request(url + "/qos/status", headers={"Authorization": f"Bearer {KEYS['batch']}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        status = json.loads(r.read())
    assert status["plan_id"] in server.plans and {t["name"] for t in status["tenants"]} == {"interactive", "batch"}
    assert KEYS["batch"] not in json.dumps(status)  # keys are secrets
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url + "/qos/status", timeout=30)
    assert err.value.code == 401

    before = Recorded.made["qos_requests_total"].total(tenant="interactive")
    client(url, "interactive").completions.create(model="tiny-random", prompt="a b c", max_tokens=3)
    for _ in range(100):  # the done-callback runs on the serving thread
        if Recorded.made["qos_requests_total"].total(tenant="interactive") > before:
            break
        time.sleep(0.02)
    made = Recorded.made
    assert made["qos_requests_total"].total(tenant="interactive") == before + 1
    assert made["qos_generation_tokens_total"].total(tenant="interactive") >= 3
    assert made["qos_time_to_first_token_seconds"].total(tenant="interactive") >= 1
    assert made["qos_slo_violations_total"].total(tenant="interactive", slo="ttft") >= 1  # max_ttft_s: 1 µs
    post(url, "/v1/completions", {"model": "tiny-random", "prompt": "hi", "max_tokens": 10**9})
    assert made["qos_requests_rejected_total"].total(tenant="batch") >= 1
    time.sleep(0.5)  # a controller tick or two
    assert made["qos_plan_info"].values[(("plan_id", server.status()["plan_id"]),)] == 1
    assert made["qos_accelerator_bytes"].total() > 0
    assert set(METRICS) <= set(made)


@needs_data
def test_a_live_slo_change_moves_the_plan_while_a_client_streams(api):
    url, server = api
    start = server.status()["plan_id"]
    stream = client(url).completions.create(model="tiny-random", prompt="the market", max_tokens=40, stream=True,
                                            stream_options={"include_usage": True})
    first = next(iter(stream))
    # a squeeze and a changed preference: the smallest plan is the only one that fits
    server.set_free_memory(min(p.gpu_bytes(server.engine.spec) for p in server.plans.values())
                           - server.engine.memory()["gpu_bytes"] + 1)
    server.reconfigure({"slos": slos(prefer="throughput")})
    rest = list(stream)
    usage = rest[-1].usage
    assert usage.completion_tokens == 40  # nothing lost
    assert len(rest[-1].model_extra["qos"]["plan_ids"]) >= 1
    for _ in range(100):
        if server.status()["plan_id"] != start:
            break
        time.sleep(0.05)
    assert server.status()["plan_id"] != start
    assert "".join(p.choices[0].text for p in [first, *rest] if p.choices)

    with pytest.raises(ValueError, match="tenants"):
        server.reconfigure({"slos": {"tenants": []}})  # refused, recorded, the SLOs stay
    assert server.status()["slo_rejections"][-1]["error"].startswith("user_config.slos")
    server.set_free_memory(None)
    server.reconfigure({"slos": slos()})


def test_the_readme_lists_every_metric():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert [name for name in METRICS if f"`ray_{name}" not in readme] == []
