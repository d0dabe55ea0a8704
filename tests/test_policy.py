import pytest

from catalog.policy import Option, choose
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
