"""The closed loop, without a model: latency predicted at the load from the profile's batched points,
corrected by measured decode steps and TTFT at the same batch size, decaying back to the profile;
the controller acting on it (a faster plan, or admission control), saying which measurement did."""

import pytest

from catalog.feedback import HALF_LIFE_S, Curve, Feedback
from catalog.knobs import Knobs
from catalog.rows import Measured, ModelIdentity
from catalog.slo import parse_slos
from runtime.controller import CEILING_S, RECENT_S, RELEASE_S, Controller, World, rank


def measured(plan_id, curve, ppl, gpu_bytes=100, ttft=0.05):
    p50, p95 = curve[0][1], curve[0][2]
    return Measured(ModelIdentity("m"), Knobs(quantized=0 if ppl == 10 else 8, bits=4, gpu_experts=8), plan_id,
                    1000 / p50, ppl, gpu_bytes, 0, (ttft, ttft), (p50, p95), tuple(curve))


# "slow": best quality, 10 ms per token alone and 40 at 8 sequences; "fast": worse quality, a third quicker
SLOW = measured("slow", [(1, 10.0, 11.0), (8, 40.0, 44.0)], ppl=10.0)
FAST = measured("fast", [(1, 6.0, 6.6), (8, 24.0, 26.4)], ppl=10.4)


def test_a_curve_interpolates_the_measured_batches_and_extrapolates_the_last_slope():
    curve = Curve(((1, 5.0, 6.0), (4, 8.0, 10.0), (16, 20.0, None)))
    assert curve.at(1) == (5.0, 6.0) and curve.at(0.5) == (5.0, 6.0)
    p50, p95 = curve.at(2.5)
    assert p50 == pytest.approx(6.5) and p95 == pytest.approx(6.5 * (6 / 5 + 10 / 8) / 2)
    assert curve.at(10)[0] == pytest.approx(14.0) and curve.at(10)[1] == pytest.approx(14.0 * 10 / 8)
    assert curve.at(32)[0] == pytest.approx(36.0)  # 1 ms more per sequence, as from 4 to 16
    assert Curve(((1, 5.0, None),)).at(8) == (5.0, None)


def test_rows_carry_their_batched_points():
    row = {"model": "m", "plan_id": "p", "quantized": 0, "bits": 16, "gpu_experts": 8, "decode_tok_s": 100.0,
           "tpot_p50_ms": 10.0, "tpot_p95_ms": 12.0, "seq_tok_s_b4": 50.0, "tpot_p95_ms_b4": 25.0,
           "agg_tok_s_b4": 200.0, "ppl": 5.0, "gpu_bytes": 1, "host_bytes": 0}
    m = Measured.from_record(row)
    assert m.curve == ((1, 10.0, 12.0), (4, 20.0, 25.0))
    assert Measured.from_record(row, "seq_tok_s_b4").curve == m.curve  # whatever the speed column


def test_measured_steps_correct_the_plan_served_and_the_correction_decays():
    fb = Feedback([SLOW, FAST])
    assert fb.observe("slow", [(8, 0.080)] * 3, None, now=0.0) is None  # too few steps to say anything
    evidence = fb.observe("slow", [(8, 0.080)] * 10 + [(1, 0.010)] * 10, 0.10, now=0.0)
    # at batch 8: twice the profile; at batch 1: as profiled; weighted evenly -> sqrt(2)
    assert "80.0 ms per step at batch 8 vs 40.0 profiled" in evidence and "TTFT p50 0.1 s vs 0.05" in evidence
    k_tpot, k_ttft = fb.factors("slow", now=0.0)
    assert k_tpot == pytest.approx(1 + 0.4 * (2 ** 0.5 - 1)) and k_ttft == pytest.approx(1.4)
    assert fb.factors("slow", now=HALF_LIFE_S)[0] == pytest.approx(1 + 0.4 * (2 ** 0.5 - 1) / 2)
    # never served: as far off its profile as the plans measured (the machine's speed, which every plan
    # pays); the wait for a first token is the load's, which any plan pays too
    assert fb.factors("fast", now=0.0) == (pytest.approx(k_tpot), pytest.approx(1.4))
    fb.observe("fast", [(1, 0.006)] * 10, None, now=0.0)  # measured as profiled: its own word counts now
    assert fb.factors("fast", now=0.0)[0] == pytest.approx(1.0) and fb.factors("slow", now=0.0)[0] == k_tpot
    at8 = fb.option(fb_option(SLOW), batch=8, now=0.0)
    assert at8.tpot_ms[0] == pytest.approx(40.0 * k_tpot) and at8.decode_tok_s == pytest.approx(1000 / (40 * k_tpot))
    assert at8.ttft_s[0] == pytest.approx(0.05 * 1.4)


def fb_option(m):
    from catalog.policy import Option
    return Option(m.plan_id, m.decode_tok_s, m.ppl, m.gpu_bytes, m.ttft_s, m.tpot_ms)


SLOS = parse_slos("""
tenants:
  - {name: chat, max_tpot_ms: 30, p: 50, priority: 2}
  - {name: bulk, priority: 1}
prefer: quality
""")


def world(plan, load, steps=(), ttft=None):
    return World(plan, 100, frozenset(t for t, n in load if n), tuple(load), 8, tuple(steps), ttft)


def test_closed_loop_switches_when_the_load_breaks_a_latency_slo_and_open_loop_does_not():
    opened, closed = (Controller([SLOW, FAST], SLOS, closed_loop=flag) for flag in (False, True))
    quiet = world("slow", [("chat", 1)])
    assert opened.tick(quiet, 1000).plan_id == closed.tick(quiet, 1000).plan_id == "slow"  # 10 ms: quality wins
    busy = world("slow", [("chat", 6), ("bulk", 2)], steps=[(8, 0.040)] * 20)  # 40 ms a token at 8
    assert opened.tick(busy, 1000).plan_id == "slow"  # the batch-1 profile says 10 ms: fine
    decision = closed.tick(busy, 1000)
    # bulk waits at first (slow start), and at chat's 6 slow's 31 ms still breaks 30, fast's 19 does not
    assert decision.plan_id == "fast" and decision.all_met and closed.desired.admit == 0
    assert "measured: plan slow: 40.0 ms per step at batch 8 vs 40.0 profiled" in decision.reason
    assert closed.desired.plan_id == "fast" and closed.desired.hold == {"bulk"}


def test_a_slower_than_profiled_plan_is_corrected_and_then_admission_control_holds_the_lower_priority():
    clock = Clock()
    c = Controller([SLOW, FAST], SLOS, clock=clock)
    # fast measured at twice its profile at batch 8 (48 ms; x1.4 after one tick): no plan meets chat's
    # 30 ms with 8 running; with 7 it does (21.4 ms x 1.4): bulk may run 5 at most, and starts at none
    decision = c.tick(world("fast", [("chat", 2), ("bulk", 6)], steps=[(8, 0.048)] * 20), 1000)
    assert c.desired.hold == frozenset({"bulk"}) and c.desired.admit == 0
    assert decision.reason.startswith("admission control: bulk may run 0 sequences (new requests wait) so chat "
                                      "meet their SLOs (predicted: time per output token p50 ")
    assert "started at none as bulk joined chat" in decision.reason
    assert "measured: plan fast: 48.0 ms per step at batch 8 vs 24.0 profiled" in decision.reason
    assert decision.all_met  # with chat's 2 sequences alone
    # chat leaves: once it has been idle RELEASE_S, nothing is left to protect and the hold ends
    c.tick(world("fast", [("bulk", 6)]), 1000)
    assert c.desired.hold == frozenset({"bulk"})
    clock.now += RELEASE_S + 0.1
    c.tick(world("fast", [("bulk", 6)]), 1000)
    assert c.desired.hold == frozenset()


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def recent(tpot_ms=None, ttft_s=None, **others):
    """A tenant's Window.summary of its latest requests."""
    return {"requests": 5, "tpot_ms": {"p50": tpot_ms, "p95": tpot_ms}, "ttft_s": {"p50": ttft_s, "p95": ttft_s}}


def test_admission_grows_while_measured_inside_the_slo_halves_on_a_measured_break_and_remembers_it():
    clock = Clock()
    c = Controller([FAST], SLOS, clock=clock)  # FAST meets chat's 30 ms even with 8 running: measurement decides

    def tick(dt, chat_tpot, load=(("bulk", 8), ("chat", 1))):
        clock.now += dt
        c.tick(World("fast", 100, frozenset(t for t, _ in load), load, 8,
                      recent=(("chat", recent(chat_tpot)),) if chat_tpot else ()), 1000)
        return c.desired

    assert tick(0, 10.0).admit == 0  # slow start
    assert tick(RECENT_S, 10.0).admit == 1  # 10 ms is 20% inside 30: one more
    assert tick(0.1, 10.0).admit == 1  # the measurement has not seen the last change yet
    assert tick(RECENT_S, 10.0).admit == 2
    assert tick(RECENT_S, 10.0).admit == 3
    assert tick(RECENT_S, 25.0).admit == 3  # inside, but not by 20%: no more
    d = tick(RECENT_S, 40.0)  # broken: halved
    assert d.admit == 1 and "measured: chat's time per output token p50 40 ms over the last 2 s exceeds 30 ms" \
        in d.reason
    assert tick(RECENT_S, 10.0).admit == 2  # back up to below where it broke ...
    assert tick(RECENT_S, 10.0).admit == 2  # ... and no further for a while
    assert tick(CEILING_S, 10.0).admit == 3
    assert all("measured" in d["reason"] for d in c.decisions) and c.decisions_total == len(c.decisions) == 7


SLOS3 = parse_slos("""
tenants:
  - {name: chat, max_tpot_ms: 30, p: 50, priority: 2}
  - {name: docs, max_ttft_s: 0.5, p: 50, priority: 1}
  - {name: bulk, priority: 1}
prefer: quality
""")


def test_a_tenant_without_a_latency_slo_waits_before_its_equals_with_one_and_nobody_waits_for_an_equal():
    assert rank(SLOS3.tenant("bulk")) < rank(SLOS3.tenant("docs")) < rank(SLOS3.tenant("chat"))
    clock = Clock()
    c = Controller([SLOW, FAST], SLOS3, clock=clock)
    load = (("bulk", 10), ("chat", 1), ("docs", 2))
    c.tick(World("fast", 100, frozenset(t for t, _ in load), load, 8), 1000)
    assert c.desired.hold == frozenset({"bulk"}) and c.desired.admit == 0
    clock.now += RECENT_S
    c.tick(World("fast", 100, frozenset(t for t, _ in load), load, 8, recent=(("docs", recent(ttft_s=0.1)),)), 1000)
    assert c.desired.admit == 1
    # docs' first tokens measured 2x too late (so every plan's predicted too): holding docs as well
    # would help neither docs nor chat (which meets its SLO with bulk held), so docs is still served
    clock.now += RECENT_S
    c.tick(World("fast", 100, frozenset(t for t, _ in load), load, 8, ttft_p50_s=1.0,
                 recent=(("docs", recent(ttft_s=1.0)),)), 1000)
    assert c.desired.hold == frozenset({"bulk"}) and c.desired.admit == 0  # halved
    assert "docs's time to first token p50 1 s over the last 2 s exceeds 0.5 s" in c.desired.reason


def test_the_executor_reports_load_and_measured_steps_and_holds_back_whom_the_controller_says():
    import time

    from catalog.knobs import Knobs
    from placement.session import open_session
    from runtime.controller import Desired
    from tests.test_executor import Running

    session = open_session(ModelIdentity("tiny-random"), "cpu")
    plan = session.plan(Knobs())
    with Running(session, {plan.plan_id: plan}, max_seqs=4) as ex:
        held = [ex.submit("bulk", "a b c", 6) for _ in range(3)]
        [r.result(timeout=60) for r in held]
        world = ex.world()
        assert world.plan_id == plan.plan_id and world.max_seqs == 4 and world.ttft_p50_s > 0
        assert sum(b for b, _ in world.steps) >= 3 * 5 and all(s > 0 for _, s in world.steps)
        assert ex.world().steps == ()  # each measurement is handed over once

        ex.want(Desired(plan.plan_id, "test", time.time(), hold=frozenset({"bulk"})))
        bulk = ex.submit("bulk", "a b c", 4)
        chat = ex.submit("chat", "x y z", 4)
        assert chat.result(timeout=60)["new_tokens"] == 4
        time.sleep(0.2)
        assert not bulk.done() and dict(ex.world().load) == {"bulk": 1}  # waits while held
        ex.want(Desired(plan.plan_id, "test", time.time()))  # the hold ends
        assert bulk.result(timeout=60)["new_tokens"] == 4
        assert {name for name, _ in ex.world().recent} == {"bulk", "chat"}  # what each got lately

        # admitted one at a time: held tenants run `admit` sequences between them
        ex.want(Desired(plan.plan_id, "test", time.time(), hold=frozenset({"bulk"}), admit=1))
        bulks, most = [ex.submit("bulk", "a b c", 12) for _ in range(3)], 0
        while not all(r.done() for r in bulks):
            most = max(most, ex.running_count("bulk"))
            time.sleep(0.001)
        assert most == 1 and all(r.result()["new_tokens"] == 12 for r in bulks)
        assert ex.world().ttft_p50_s is None  # a held tenant's wait is imposed, not a mark against the plan


def test_waiting_for_a_first_token_under_load_does_not_chase_the_load_onto_an_unmeasured_plan():
    # (found on the H200: the served plan's TTFT, 260x its profile from queueing behind a flood,
    # marked that plan alone, and the controller moved to a slower plan nobody had measured)
    slos = parse_slos("tenants:\n  - {name: docs, max_ttft_s: 0.5, p: 50, priority: 1}\nprefer: quality")
    c = Controller([SLOW, FAST], slos)
    decision = c.tick(world("slow", [("docs", 8)], ttft=5.0), 1000)
    assert decision.plan_id == "slow" and not decision.switch  # both plans would wait as long
    assert "x40.60 every plan's TTFT" in c.evidence
