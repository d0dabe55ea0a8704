"""The serving loop and controller without Ray: requests answered across reconfigurations, SLO
reloads (bad files rejected), memory squeezes."""

import os
import time

import pandas as pd
import pytest

from runtime.server import Server
from tests.conftest import profile_tiny
from tests.test_profiler import needs_data

SLOS = """
tenants:
  - name: interactive
    min_decode_tok_s: 1
    max_ppl_increase: 0.5
    priority: 2
  - name: batch
    max_ppl_increase: 0.5
    priority: 1
prefer: {prefer}
"""


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    return profile_tiny(tmp_path_factory.mktemp("front") / "front.csv", "quantized=0,8,16;bits=4;gpu_experts=0,8,16")


@needs_data
def test_requests_are_answered_across_slo_changes_and_memory_squeezes(front, tmp_path):
    slos = tmp_path / "slos.yaml"
    slos.write_text(SLOS.format(prefer="quality"))
    server = Server(str(front), str(slos), device="cpu", tick_s=3600)  # ticks by hand
    try:
        df = pd.read_csv(front)
        assert server.status()["plan"]["quantized"] == 0  # nobody active, quality preferred, no pressure

        futures = [server.submit(t, "hello moe", 12) for t in ("interactive", "batch") * 3]
        slos.write_text(SLOS.format(prefer="throughput"))
        time.sleep(0.01)
        server.tick()
        smallest = int(df["gpu_bytes"].min())
        server.set_free_memory(smallest - server.engine.memory()["gpu_bytes"] + 1)  # room for the smallest plan only
        server.tick()
        results = [f.result(timeout=120) for f in futures]
        assert len(results) == 6 and all(r["new_tokens"] == 12 for r in results)
        assert server.ready(timeout=0) and server.status()["ready"]  # warmed up before the first step
        server.tick()
        server.executor.reconcile()
        status = server.status()
        assert status["plan"]["gpu_bytes"] <= smallest
        assert status["history"] and status["history"][-1]["to"] == status["plan_id"]
        assert {r["plan_id"] for r in results} <= set(server.plans)

        slos.write_text("tenants: [{name: x, priority: high}]")
        time.sleep(0.01)
        server.tick()
        assert server.status()["slo_rejections"][-1]["error"].endswith("must be an integer, got 'high'")
        assert server.slos.prefer == "throughput"  # the good SLOs stay

        with pytest.raises(Exception, match="unknown tenant 'nobody'"):
            server.submit("nobody", "hi")

        # a tenant removed while its requests wait: they are still served, and the control loop ticks on
        queued = [server.submit("batch", "hello moe", 8) for _ in range(4)]
        slos.write_text(SLOS.format(prefer="quality").split("  - name: batch")[0] + "prefer: quality\n")
        os.utime(slos, (2_000_000_000, 2_000_000_000))
        server.tick()
        assert [t.name for t in server.slos.tenants] == ["interactive"]
        assert [r.result(timeout=60)["new_tokens"] for r in queued] == [8] * 4
        server.tick()
        with pytest.raises(Exception, match="unknown tenant 'batch'"):
            server.submit("batch", "hi")
    finally:
        server.stop()


def test_a_warming_server_is_not_ready_and_answers_what_it_accepted_meanwhile(front, tmp_path, monkeypatch):
    import threading

    from placement.decode import Decoder

    gate, warm_up = threading.Event(), Decoder.warm_up
    monkeypatch.setattr(Decoder, "warm_up", lambda self: gate.wait(60) and warm_up(self))  # a long warm-up
    slos = tmp_path / "slos.yaml"
    slos.write_text(SLOS.format(prefer="quality"))
    server = Server(str(front), str(slos), device="cpu", tick_s=3600)
    try:
        req = server.submit("interactive", "hello moe", 4)
        assert not server.ready(timeout=0.2) and server.status()["ready"] is False
        gate.set()
        assert server.ready(timeout=60) and server.status()["ready"] is True
        assert req.result(timeout=60)["new_tokens"] == 4
    finally:
        server.stop()


def test_controller_keeps_desired_state_apart_and_a_quiet_tick_changes_nothing(tmp_path):
    """The controller alone, on a hand-made front: no model, no executor."""
    from catalog.knobs import Knobs
    from catalog.rows import Measured, ModelIdentity
    from runtime.controller import Controller, World

    ident = ModelIdentity("tiny-random")
    front = [Measured(ident, Knobs(), "big", 10.0, 5.0, 1000, 0),
             Measured(ident, Knobs(quantized=16), "small", 20.0, 6.0, 400, 0)]
    slos = tmp_path / "slos.yaml"
    slos.write_text(SLOS.format(prefer="quality"))
    c = Controller(front, slos)
    first = c.tick(World(None, 0, frozenset()), free_bytes=2000)
    assert c.desired.plan_id == "big" == first.plan_id and first.switch
    serving = World("big", 1000, frozenset({"batch"}))
    again = c.tick(serving, free_bytes=1000)  # nothing changed: the same goal, no switch
    assert not again.switch and c.desired.plan_id == "big" and c.ticks == 2
    squeezed = c.tick(serving, free_bytes=-500)  # a co-tenant took memory: only "small" fits
    assert squeezed.switch and c.desired.plan_id == "small" and "big" not in c.desired.reason
    slos.write_text("tenants: [{name: x, priority: high}]")
    os.utime(slos, (1, 1))  # a new mtime whatever the clock's resolution
    c.tick(serving, free_bytes=1000)
    assert c.rejections and c.slos.prefer == "quality"  # the bad file is recorded, the good SLOs stay
    slos.unlink()
    c.tick(serving, free_bytes=1000)
    c.tick(serving, free_bytes=1000)  # a missing file is one rejection, not one per tick
    assert len(c.rejections) == 2 and "keeping the last good SLOs" in c.rejections[-1]["error"]
    for i in range(60):  # strange files are rejections too, kept as a ring with a total
        slos.write_bytes(b"tenants: [{name: \xff}]" if i % 2 else b"tenants: [{name: a, min_decode_tok_s: .nan}]")
        os.utime(slos, (10 + i, 10 + i))
        c.tick(serving, free_bytes=1000)
    assert c.rejected_total == 62 and len(c.rejections) == 50 and c.slos.prefer == "quality"
    assert {r["error"].split(": ", 1)[1][:20] for r in list(c.rejections)[-2:]} == {
        "not UTF-8 text (byte", "tenants[0].min_decod"}


def test_a_switch_of_attention_precision_is_charged_its_bytes(fresh):
    """The controller's move cost: experts loaded onto the accelerator, and every projection when
    the attention precision changes (an attention-only switch used to cost nothing but hysteresis)."""
    import types

    from catalog.knobs import Knobs
    from placement.engine import Engine
    from placement.plan import build_plan

    model, _ = fresh()
    spec = Engine(model).spec
    same, attn4 = build_plan(spec, Knobs()), build_plan(spec, Knobs(attn_bits=4))
    half4 = build_plan(spec, Knobs(quantized=8, bits=4))
    fake = types.SimpleNamespace(plans={p.plan_id: p for p in (same, attn4, half4)},
                                 engine=types.SimpleNamespace(spec=spec, plan=same))
    cost = lambda plan: Server._switch_bytes(fake, plan.plan_id)  # noqa: E731
    assert cost(same) == 0
    assert cost(attn4) == attn4.attn_nbytes(spec) > 0
    assert cost(half4) == 8 * half4.expert_nbytes(spec, 4)
