import pytest

from catalog.policy import Option, choose, tenant_status
from catalog.slo import SLOError, load_slos, parse_slos

GOOD = """
tenants:
  - name: interactive
    min_decode_tok_s: 20
    max_ppl_increase: 0.10
    priority: 2
  - name: batch
    max_ppl_increase: 0.02
    priority: 1
gpu:
  reserve_gib: 2
prefer: quality
"""


def test_a_good_file_parses():
    spec = parse_slos(GOOD)
    assert [t.name for t in spec.tenants] == ["interactive", "batch"]
    assert spec.tenant("interactive").min_decode_tok_s == 20 and spec.reserve_bytes == 2 * 2**30
    with pytest.raises(SLOError, match="unknown tenant 'nobody'; tenants: interactive, batch"):
        spec.tenant("nobody")


@pytest.mark.parametrize("text, message", [
    ("", "the file is empty"),
    ("tenants: []", "tenants: must be a non-empty list"),
    ("tenants: [{name: a, colour: red}]", r"tenants\[0\]: unknown key\(s\) 'colour'"),
    ("tenants: [{name: a}]\nextra: 1", r"unknown key\(s\) 'extra'"),
    ("tenants: [{name: a, priority: high}]", r"tenants\[0\].priority: must be an integer, got 'high'"),
    ("tenants: [{name: a, min_decode_tok_s: -3}]", "min_decode_tok_s must be > 0, got -3"),
    ("tenants: [{name: a, max_ppl_increase: -0.1}]", "max_ppl_increase must be >= 0"),
    ("tenants: [{name: a}, {name: a}]", r"tenants\[1\].name: duplicate tenant name 'a'"),
    ("tenants: [{name: a}]\ngpu: {reserve_gib: -1}", "gpu.reserve_gib: must be from 0 to"),
    ("tenants: [{name: a}]\nprefer: speed", "prefer: must be one of quality, throughput, got 'speed'"),
    ("tenants: [{name: a}]\n  bad: [", "not valid YAML"),
    ("- a\n- b", "must be a mapping"),
    ("tenants: [{name: a, min_decode_tok_s: .nan}]", r"tenants\[0\].min_decode_tok_s: must be a finite number, got nan"),
    ("tenants: [{name: a, max_ppl_increase: .inf}]", "max_ppl_increase: must be a finite number, got inf"),
    ("tenants: [{name: a}]\ngpu: {reserve_gib: 1.0e+300}", "gpu.reserve_gib: must be from 0 to 1048576, got 1e\\+300"),
    ("tenants: [{name: a, priority: 1000}]", "priority must be from 0 to 100, got 1000"),
    ("tenants:" + "\n  - {name: t}" * 1001, r"tenants: 1001 of them; at most 1000"),
])
def test_bad_files_name_the_key_and_the_problem(text, message):
    with pytest.raises(SLOError, match=message):
        parse_slos(text, "slos.yaml")


def test_hostile_files_get_short_errors_fast():
    import time

    # a YAML alias bomb: 350 bytes that print as gigabytes
    levels = ", ".join(f"&{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi"))
    bomb = f"tenants: [{{name: t, priority: [&a [x, x, x, x, x, x, x, x, x], {levels}]}}]\n"
    deep = "tenants: " + "[" * 100_000 + "]" * 100_000
    assert len(bomb) < 600
    for text, message in [(bomb, "priority: must be an integer, got [['x', "), (deep, "nested too deeply"),
                          ("x" * (2 << 20), "an SLO file may have at most")]:
        start = time.perf_counter()
        with pytest.raises(SLOError, match=message.replace("[", r"\[").replace(".", r"\.")) as err:
            parse_slos(text, "slos.yaml")
        assert len(str(err.value)) < 300 and time.perf_counter() - start < 5


def test_a_file_that_is_not_utf8_or_too_big_is_refused_before_parsing(tmp_path):
    bad = tmp_path / "slos.yaml"
    bad.write_bytes(b"tenants: [{name: \xff\xfe}]\n")
    with pytest.raises(SLOError, match="not UTF-8 text"):
        load_slos(bad)
    bad.write_bytes(b"#" * (2 << 20))
    with pytest.raises(SLOError, match="bytes; an SLO file may have at most"):
        load_slos(bad)


def test_api_keys_name_one_tenant_and_are_never_shown():
    spec = parse_slos("tenants:\n  - {name: a, api_keys: [sk-aaaaaaaaaaaaaaaa1, sk-aaaaaaaaaaaaaaaa2]}\n"
                      "  - {name: b, api_keys: [sk-bbbbbbbbbbbbbbbb1]}\n  - {name: c}")
    assert spec.has_keys and spec.tenant_for_key("sk-aaaaaaaaaaaaaaaa2") == "a"
    assert spec.tenant_for_key("sk-bbbbbbbbbbbbbbbb1") == "b" and spec.tenant_for_key("sk-nope-nope-nope-1") is None
    assert "sk-" not in repr(spec)
    for text, message in [("[sk-short]", r"api_keys\[0\]: must be a string of 16 to 256"),
                          ("[sk-bbbbbbbbbbbbbbbb1]", r"api_keys\[0\]: the same key is given twice"),
                          ("[sk with spaces in it 123]", "without spaces"), ("sk-aaaaaaaaaaaaaaaa9", "must be a list")]:
        with pytest.raises(SLOError, match=message) as err:
            parse_slos(f"tenants:\n  - {{name: b, api_keys: [sk-bbbbbbbbbbbbbbbb1]}}\n  - {{name: a, api_keys: {text}}}")
        assert "sk-aaaa" not in str(err.value) and "sk-bbbb" not in str(err.value)  # keys are secrets


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(SLOError, match="cannot read SLO file"):
        load_slos(tmp_path / "none.yaml")


# base perplexity 10.0: +10% is 11.0, +2% is 10.2
FRONT = [
    Option("p16", decode_tok_s=8, ppl=10.0, gpu_bytes=90),
    Option("mixed", decode_tok_s=25, ppl=10.15, gpu_bytes=60),
    Option("q4", decode_tok_s=30, ppl=10.8, gpu_bytes=30),
    Option("q2", decode_tok_s=35, ppl=12.0, gpu_bytes=20),
]


def test_meets_every_active_slo_and_prefers_quality_among_them():
    spec = parse_slos(GOOD)
    d = choose(FRONT, spec, {"interactive", "batch"}, budget_bytes=100, base_ppl=10.0)
    assert d.plan_id == "mixed" and d.all_met and d.fits
    d = choose(FRONT, spec, {"batch"}, budget_bytes=100, base_ppl=10.0)
    assert d.plan_id == "p16"  # only batch active: best quality


def test_when_none_meets_all_the_higher_priority_wins_and_violations_are_reported():
    spec = parse_slos(GOOD)
    d = choose(FRONT, spec, {"interactive", "batch"}, budget_bytes=40, base_ppl=10.0)
    assert d.plan_id == "q4" and not d.all_met
    batch = next(t for t in d.tenants if t.tenant == "batch")
    assert batch.problems == ("perplexity +8.0% over 16-bit exceeds the allowed +2.0%",)
    d = choose(FRONT, spec, {"interactive"}, budget_bytes=25, base_ppl=10.0)
    assert d.plan_id == "q2" and d.tenants[0].problems[0].startswith("perplexity +20.0%")


def test_nothing_fits_picks_the_smallest_and_says_so():
    d = choose(FRONT, parse_slos(GOOD), {"batch"}, budget_bytes=10, base_ppl=10.0)
    assert d.plan_id == "q2" and not d.fits and "no plan fits the budget of 10 bytes" in d.reason


def test_hysteresis_and_switching_cost_stop_flapping():
    spec = parse_slos(GOOD.replace("prefer: quality", "prefer: throughput"))
    near = FRONT + [Option("q4b", decode_tok_s=31, ppl=10.8, gpu_bytes=31)]
    # q4b is 3% faster than the current q4: below the 5% margin, keep q4
    d = choose(near, spec, {"interactive"}, budget_bytes=35, current="q4", base_ppl=10.0)
    assert d.plan_id == "q4" and not d.switch and d.reason.startswith("kept")
    # a clearly better plan wins, unless moving it costs too much
    d = choose(FRONT, spec, {"interactive"}, budget_bytes=100, current="mixed", base_ppl=10.0)
    assert d.plan_id == "q4" and d.switch  # 20% faster, meets the SLO (q2 breaks its perplexity bound)
    d = choose(FRONT, spec, {"interactive"}, budget_bytes=100, current="mixed", base_ppl=10.0,
               switch_bytes=lambda pid: 10_000)
    assert d.plan_id == "mixed"
    # nothing changed: the same decision, no switch
    again = choose(FRONT, spec, {"interactive"}, budget_bytes=100, current=d.plan_id, base_ppl=10.0,
                   switch_bytes=lambda pid: 10_000)
    assert again.plan_id == d.plan_id and not again.switch


def test_latency_slos_parse_and_rule_out_plans_whose_profiled_percentile_is_too_slow():
    spec = parse_slos("tenants: [{name: chat, max_tpot_ms: 40, max_ttft_s: 0.5, p: 95}, {name: bulk, p: 50}]")
    chat = spec.tenant("chat")
    assert (chat.max_tpot_ms, chat.max_ttft_s, chat.p) == (40.0, 0.5, 95) and spec.tenant("bulk").p == 50
    for text, message in [("tenants: [{name: a, p: 99}]", "p must be one of 50, 95"),
                          ("tenants: [{name: a, max_tpot_ms: 0}]", "max_tpot_ms must be > 0"),
                          ("tenants: [{name: a, max_ttft_s: .nan}]", "max_ttft_s: must be a finite number")]:
        with pytest.raises(SLOError, match=message):
            parse_slos(text)
    fast = Option("fast", decode_tok_s=30, ppl=10.5, gpu_bytes=50, ttft_s=(0.2, 0.3), tpot_ms=(30.0, 38.0))
    jittery = Option("jittery", decode_tok_s=35, ppl=10.0, gpu_bytes=50, ttft_s=(0.2, 0.3), tpot_ms=(28.0, 55.0))
    slow_start = Option("slow-start", decode_tok_s=40, ppl=10.0, gpu_bytes=50, ttft_s=(0.4, 0.9), tpot_ms=(25.0, 30.0))
    unprofiled = Option("old", decode_tok_s=20, ppl=10.0, gpu_bytes=50)  # time per token from its speed: 50 ms
    decision = choose([fast, jittery, slow_start, unprofiled], spec, {"chat"}, 100, base_ppl=10.0)
    assert decision.plan_id == "fast" and decision.all_met
    statuses = {o.plan_id: tenant_status(o, chat, 10.0) for o in (jittery, slow_start, unprofiled)}
    assert statuses["jittery"].problems == ("time per output token p95 55 ms exceeds 40 ms",)
    assert statuses["slow-start"].problems == ("time to first token p95 0.9 s exceeds 0.5 s",)
    assert statuses["old"].problems == ("time per output token p95 50 ms exceeds 40 ms",)
    # p50 reads the median columns: the jittery plan's median is within a p50 limit of 40 ms
    median = parse_slos("tenants: [{name: chat, max_tpot_ms: 40, p: 50}]").tenant("chat")
    assert tenant_status(jittery, median, 10.0).met


def test_a_tenant_s_measured_latency_is_checked_against_its_slo():
    from runtime.server import latency_met

    chat = parse_slos("tenants: [{name: chat, max_tpot_ms: 40, max_ttft_s: 0.5}]").tenant("chat")
    assert latency_met(chat, {"requests": 0}) is None
    good = {"requests": 3, "ttft_s": {"p50": 0.1, "p95": 0.4}, "tpot_ms": {"p50": 20.0, "p95": 39.0}}
    assert latency_met(chat, good) is True
    assert latency_met(chat, {**good, "tpot_ms": {"p50": 20.0, "p95": 41.0}}) is False
    assert latency_met(parse_slos("tenants: [{name: x}]").tenant("x"), good) is None


def test_plans_over_the_host_budget_are_never_chosen():
    front = [Option("p16-host", decode_tok_s=8, ppl=10.0, gpu_bytes=20, host_bytes=70),
             Option("q4-host", decode_tok_s=12, ppl=10.8, gpu_bytes=20, host_bytes=20)]
    spec = parse_slos(GOOD)
    assert choose(front, spec, {"batch"}, budget_bytes=100, base_ppl=10.0).plan_id == "p16-host"
    assert choose(front, spec, {"batch"}, budget_bytes=100, base_ppl=10.0, host_budget=50).plan_id == "q4-host"
    with pytest.raises(ValueError, match="no plan of the front fits the host budget of 10 bytes"):
        choose(front, spec, {"batch"}, budget_bytes=100, base_ppl=10.0, host_budget=10)
