"""Fuzzing, seeded (no Ray): random and hostile SLO files through the SLO parser and a live Server's
reconfigure(), and random request bodies through the HTTP API. Errors are one line under 300
characters, the server keeps answering, no response is a 500 (or FastAPI's 422) and none hangs,
and the process grows by less than 100 MB over the run."""

import json
import os
import random
import threading
import time
import urllib.error
import urllib.request

import pytest
import yaml

from catalog.slo import SLOError, SLOSpec, parse_slos
from runtime.limits import Limits
from runtime.server import Server
from tests.test_faults import front, wait_for  # noqa: F401 (front: the fixture)
from tests.test_http import KEYS, slos
from tests.test_profiler import needs_data

uvicorn = pytest.importorskip("uvicorn")

CASES = 60
MAX_ERROR_CHARS = 300
MAX_GROWTH_MB = 100


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


# --- hostile SLO files -------------------------------------------------------------------------------
def _alias_bomb(levels: int) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\ntenants: [{{name: *a{levels - 1}}}]\n"


def _value(rng: random.Random):
    """A value of any kind YAML can write, some of them hostile."""
    return rng.choice([
        lambda: rng.randint(-10, 10**6), lambda: rng.uniform(-1e6, 1e6), lambda: float("nan"), lambda: float("inf"),
        lambda: 10 ** rng.randint(20, 400), lambda: -(10 ** rng.randint(20, 400)), lambda: "x" * rng.randint(0, 3000),
        lambda: rng.choice([True, False, None]), lambda: [rng.randint(0, 9)] * rng.randint(0, 5),
        lambda: {"k": rng.randint(0, 9)}, lambda: "\n\t\x00 \u2028 ünï\u0301 " * rng.randint(1, 4),
        lambda: rng.choice(["quality", "throughput", "fast", ""]), lambda: "sk-" + "k" * rng.randint(0, 300),
    ])()


def _tenant(rng: random.Random, i: int) -> dict:
    keys = ["name", "min_decode_tok_s", "max_ppl_increase", "max_ttft_s", "max_tpot_ms", "p", "priority", "api_keys",
            "colour"]
    t = {"name": f"t{i}"} if rng.random() < 0.7 else {}
    for key in rng.sample(keys, rng.randint(0, 4)):
        t[key] = _value(rng)
    return t


def hostile_slo_file(rng: random.Random, case: int) -> str | bytes:
    """One of many kinds of bad (and some good) SLO files; text, or bytes that need not be UTF-8."""
    good = yaml.safe_dump(slos())
    kind = case % 12
    if kind == 0:
        return _alias_bomb(rng.randint(4, 9))
    if kind == 1:
        n = rng.choice([50, 1000, 100_000])
        return rng.choice(["[" * n + "]" * n, "{a: " * n + "1" + "}" * n, "- " * n + "x"])
    if kind == 2:  # the good file with a few characters changed, dropped or added
        text = list(good)
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(len(text))
            op = rng.random()
            if op < 0.4:
                text[at] = rng.choice(":-[]{}&*!|>'\"#%@`\n\t ,?0x")
            elif op < 0.7:
                del text[at]
            else:
                text.insert(at, chr(rng.randint(1, 0x2FFF)))
        return "".join(text)
    if kind == 3:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 400)))
    if kind == 4:
        return rng.choice(["", "# nothing\n", "---\n---\n", "null", "~", "[]", "{}", "42", "tenants:", "tenants: []",
                           "tenants: !!binary AAAA", "tenants: !!set {a, b}", "tenants: [{name: 2001-01-01}]",
                           "%YAML 9.9\n---\ntenants: []", "tenants: [{<<: {name: m}}]"])
    if kind == 5:  # many tenants
        n = rng.choice([5, 999, 1001, 5000])
        return yaml.safe_dump({"tenants": [{"name": f"t{i}"} for i in range(n)]})
    if kind == 6:  # numbers out of range, of the wrong kind, NaN, infinite, huge
        doc = slos()
        doc["tenants"][rng.randrange(2)][rng.choice(["min_decode_tok_s", "max_ppl_increase", "max_ttft_s",
                                                     "max_tpot_ms", "p", "priority"])] = _value(rng)
        if rng.random() < 0.3:
            doc["gpu"] = {"reserve_gib": _value(rng)}
        return yaml.safe_dump(doc, allow_unicode=rng.random() < 0.5)
    if kind == 7:  # names: long, odd characters, duplicate
        doc = slos()
        doc["tenants"][0]["name"] = rng.choice(["x" * rng.randint(300, 200_000), "a\nb", "\x00", " ", "batch",
                                                "ü" * 100, "tenant: x", "-"])
        if rng.random() < 0.5:
            doc["tenants"][0]["priority"] = 1000  # an error that names the tenant
        return yaml.safe_dump(doc, allow_unicode=True)
    if kind == 8:  # api keys: short, long, shared, not strings, many
        doc = slos()
        doc["tenants"][1]["api_keys"] = rng.choice([["short"], ["k" * 5000], [KEYS["interactive"]],
                                                    [1234567890123456789],
                                                    [f"sk-many-keys-{i:06d}" for i in range(150)], "sk-not-a-list-00",
                                                    ["sk with spaces in it"], [None]])
        return yaml.safe_dump(doc)
    if kind == 9:  # random structures
        doc = {"tenants": [_tenant(rng, i) for i in range(rng.randint(0, 4))]}
        if rng.random() < 0.5:
            doc[rng.choice(["gpu", "prefer", "colour"])] = _value(rng)
        return yaml.safe_dump(doc, allow_unicode=True)
    if kind == 10:  # big: around the size limit
        return "# " + "x" * rng.choice([1000, (1 << 20) - 10, (1 << 20) + 10]) + "\n" + good
    return good if rng.random() < 0.5 else yaml.safe_dump(slos(prefer="throughput"))


# files that broke the parser once (or might): each is a case of its own, before the random ones
KNOWN = [
    "tenants: [{name: a, min_decode_tok_s: 1" + "0" * 400 + "}]",  # an integer too large for a float
    "tenants: [{name: a, priority: 1" + "0" * 400 + "}]",
    "tenants: [{name: a}]\ngpu: {reserve_gib: 1" + "0" * 400 + "}",
    "tenants: [{name: a, max_ttft_s: 1e400}]",
    "tenants: [{name: a, max_ppl_increase: .nan}]",
    "tenants: [{name: 2001-13-45}]",  # a timestamp YAML cannot build
    "!!python/object/apply:os.system ['echo pwned']",
    "tenants: [{name: a, priority: 1}",  # YAML's errors span lines
    "tenants:\n\t- name: a",
    'tenants: [{name: "a\\nb", priority: 1000}]',  # a name with a newline, in an error that names it
    "tenants: [{name: " + "x" * 5000 + ", priority: 1000}]",  # a long name, likewise
    "tenants: [{name: a, priority: -1" + "0" * 300 + "}]",  # a long number, likewise
    _alias_bomb(9),
    "[" * 100_000 + "]" * 100_000,
]


def one_line(message: str) -> bool:
    return "\n" not in message and "\r" not in message and len(message) < MAX_ERROR_CHARS


@pytest.fixture(scope="module")
def slo_files():
    rng = random.Random(18)
    return KNOWN + [hostile_slo_file(rng, case) for case in range(CASES)]


def test_the_slo_parser_takes_any_file_with_a_one_line_error(slo_files):
    bad = []
    for i, text in enumerate(slo_files):
        if isinstance(text, bytes):
            continue  # parse_slos takes text; load_slos decodes bytes (the Server test below)
        try:
            assert isinstance(parse_slos(text), SLOSpec)
        except SLOError as err:
            if not one_line(str(err)):
                bad.append((i, f"{len(str(err))} chars, {len(str(err).splitlines())} lines: {str(err)[:80]!r}"))
        except Exception as err:
            bad.append((i, f"{type(err).__name__}: {str(err)[:80]}"))
    assert not bad, "\n".join(map(str, bad))


@pytest.fixture(scope="module")
def server(front):
    s = Server(str(front), {"slos": slos()}, device="cpu", tick_s=0.05, limits=Limits(max_new_tokens=16))
    s.generate("batch", "warm up", 2)
    yield s
    s.stop()


@needs_data
def test_a_live_server_takes_any_slo_file_or_user_config_and_keeps_answering(server, slo_files, tmp_path):
    rss = rss_mb()
    good = {"slos": slos()}
    refused = accepted = 0
    for i, text in enumerate(slo_files):
        path = tmp_path / f"slos-{i}.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        configs = [{"slo_file": str(path)}]
        try:  # inline, as a Serve config's user_config would carry it (when it is YAML at all)
            configs.append({"slos": yaml.safe_load(text)})
        except Exception:
            pass
        for config in configs:
            try:
                server.reconfigure(config)
                accepted += 1
            except SLOError as err:
                assert one_line(str(err)), (i, str(err)[:200])
                refused += 1
            tenant = server.slos.tenants[0].name  # whoever the SLOs served now name
            assert server.generate(tenant, "still there?", 2)["new_tokens"] == 2, i
            server.reconfigure(good)
    status = server.status()
    assert refused >= CASES and accepted >= 5 and status["slo_rejections_total"] >= refused
    assert all(len(r["error"]) <= 500 for r in status["slo_rejections"]) and len(status["slo_rejections"]) <= 50
    assert len(json.dumps(status)) < 200_000  # bounded, whatever was thrown at it
    assert server.healthy() and server.status()["ticks"] > 0
    grew = rss_mb() - rss
    print(f"\nfuzz: {len(slo_files)} SLO files, {accepted + refused} reconfigurations ({refused} refused), "
          f"RSS {grew:+.1f} MB")
    assert grew < MAX_GROWTH_MB, f"grew {grew:.0f} MB"


# --- random request bodies ---------------------------------------------------------------------------
def hostile_body(rng: random.Random, case: int):
    """A request body for /v1/completions or /v1/chat/completions: often nearly right, sometimes not
    JSON at all; (path, bytes, headers)."""
    chat = rng.random() < 0.4
    body = ({"model": "tiny-random", "messages": [{"role": "user", "content": "hi"}]} if chat
            else {"model": "tiny-random", "prompt": "the market"})
    fields = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
              "stream", "stream_options", "stop", "seed", "user", "logprobs", "presence_penalty", "frequency_penalty",
              "logit_bias", "echo", "best_of", "suffix", "timeout_s", "unknown_field"]
    for key in rng.sample(fields, rng.choice([0, 0, 0, 1, 1, 2, 4])):
        body[key] = rng.choice([
            rng.randint(-5, 20), rng.randint(-(2**70), 2**70), rng.uniform(-3, 3), None, True, "",
            "x" * rng.randint(1, 50),
            [], ["a"], ["a", "b"], [1, 2], {}, {"include_usage": True}, {"a": [1, {"b": None}]}, float("nan"),
            [{"role": "user", "content": "hi"}], [{"role": "robot", "content": 1}], [{"type": "text", "text": "x"}],
            "\ud800", "tiny-random", "gpt-4", 1e308,
        ])
    if case % 15 == 0:
        long = [{"role": "user", "content": "x " * 400}] if chat and rng.random() < 0.8 else "word " * 400
        body["messages" if chat else "prompt"] = long
    data = json.dumps(body, allow_nan=True).encode()
    if case % 10 == 3:
        data = rng.choice([b"{not json", b"", b"[]", b"null", b"\xff\xfe", b'{"model": "tiny-random", "prompt": "a"',
                           json.dumps([body]).encode(), b'{"model": "tiny-random", "prompt": "\\ud800"}'])
    headers = {"Content-Type": rng.choice(["application/json"] * 4 + ["text/plain",
                                                                      "application/x-www-form-urlencoded"])}
    key = rng.choice([KEYS["batch"]] * 6 + [KEYS["interactive"], None, "", "sk-wrong-key-0123456789", "x" * 5000])
    if key is not None:
        headers["Authorization"] = rng.choice(["Bearer "] * 6 + ["bearer ", "Basic ", ""]) + key
    return ("/v1/chat/completions" if chat else "/v1/completions"), data, headers


@pytest.fixture
def web(server):
    from runtime.http_api import make_app

    app = make_app(lambda: server, model_name="tiny-random")
    w = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical"))
    thread = threading.Thread(target=w.run, daemon=True)
    thread.start()
    wait_for(lambda: w.started, what="uvicorn started")
    yield f"http://127.0.0.1:{w.servers[0].sockets[0].getsockname()[1]}"
    w.should_exit = True
    thread.join(10)


@needs_data
def test_random_request_bodies_get_answers_or_json_errors_never_a_500_and_never_a_hang(web, server):
    server.reconfigure({"slos": slos()})
    rng = random.Random(18)
    rss = rss_mb()
    seen = {}
    for case in range(CASES + 40):
        path, data, headers = hostile_body(rng, case)
        req = urllib.request.Request(web + path, data=data, headers=headers, method="POST")
        start = time.time()
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, body = r.status, r.read()
        except urllib.error.HTTPError as err:
            status, body = err.code, err.read()
        assert time.time() - start < 30, (case, "slow")
        seen[status] = seen.get(status, 0) + 1
        assert status in (200, 400, 401, 404, 429), (case, status, body[:300], data[:200])
        if status != 200:
            error = json.loads(body)["error"]
            assert error["type"] and one_line(error["message"]), (case, error)
        elif json.loads(data).get("stream"):
            assert body.rstrip().endswith(b"data: [DONE]"), (case, body[-200:])
        else:
            assert json.loads(body)["usage"]["completion_tokens"] >= 1
    assert seen.get(200, 0) >= 10 and seen.get(400, 0) >= 10 and seen.get(401, 0) >= 5, seen
    assert server.generate("batch", "still there?", 2)["new_tokens"] == 2 and server.healthy()
    wait_for(lambda: server.executor.queued() == 0, what="nothing left running")
    grew = rss_mb() - rss
    print(f"\nfuzz: {CASES + 40} request bodies, statuses {dict(sorted(seen.items()))}, RSS {grew:+.1f} MB")
    assert grew < MAX_GROWTH_MB, f"grew {grew:.0f} MB"
