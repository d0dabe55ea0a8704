import json

import pytest
import torch

from placement.packed import expert_layout
from catalog.knobs import Knobs
from placement.plan import ExpertId, ExpertState, Plan, build_plan, diff
from placement.spec import ModelSpec

SPEC = ModelSpec("mixtral", num_layers=4, num_experts=8, top_k=2, hidden=64, intermediate=128,
                 dtype=torch.float32, nonexpert_bytes=100_000)
E16 = expert_layout(64, 128, 16, torch.float32).nbytes
E4 = expert_layout(64, 128, 4, torch.float32).nbytes


def test_plan_json_round_trip_and_stable_id():
    plan = build_plan(SPEC, Knobs(quantized=10, bits=3, gpu_experts=20, seed=3))
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.plan_id == plan.plan_id
    assert build_plan(SPEC, Knobs(quantized=10, bits=3, gpu_experts=20, seed=3)).plan_id == plan.plan_id
    assert build_plan(SPEC, Knobs(quantized=10, bits=3, gpu_experts=20, seed=4)).plan_id != plan.plan_id
    json.loads(plan.to_json())


def test_knobs_give_counts_and_bytes():
    plan = build_plan(SPEC, Knobs(quantized=12, bits=4, gpu_experts=20, cache_slots=3))
    assert (plan.experts_total, plan.quantized, plan.gpu_experts, plan.host_experts) == (32, 12, 20, 12)
    # quantized experts take accelerator room first: all 12 are on it, plus 8 at 16 bits
    on_accel = [s for _, s in plan.items() if s.tier == "accel"]
    assert sum(s.bits == 4 for s in on_accel) == 12
    assert plan.gpu_bytes(SPEC) == 100_000 + 12 * E4 + 8 * E16 + 3 * E16  # 3 slots sized for 16-bit
    assert plan.host_bytes(SPEC) == 12 * E16


def test_host_bytes_count_dequantized_matrices_of_cpu_offload_and_a_host_budget_is_checked():
    fetch = build_plan(SPEC, Knobs(quantized=12, bits=4, gpu_experts=20))
    cpu = build_plan(SPEC, Knobs(quantized=12, bits=4, gpu_experts=20, offload="cpu"))
    on_host = [s for _, s in cpu.items() if s.tier == "host"]
    dequant = sum(s.bits != 16 for s in on_host) * 3 * 64 * 128 * 4  # 16-bit matrices of quantized host experts
    assert cpu.host_bytes(SPEC) == fetch.host_bytes(SPEC) + dequant == cpu.host_packed_bytes(SPEC) + dequant
    assert build_plan(SPEC, Knobs(gpu_experts=20, host_budget=12 * E16)).host_bytes(SPEC) == 12 * E16
    with pytest.raises(ValueError, match=r"keeps 0.00118 GB in host memory \(12 host experts\), over the "
                                         r"host budget of 0.001 GB"):
        build_plan(SPEC, Knobs(gpu_experts=20, host_budget=1_000_000))
    with pytest.raises(ValueError, match="host_budget=-1 must be >= 0 bytes"):
        Knobs(host_budget=-1)


def test_all_on_accelerator_needs_no_slots_and_cpu_offload_none():
    assert build_plan(SPEC, Knobs()).slots_used() == 0
    assert build_plan(SPEC, Knobs(gpu_experts=0, offload="cpu")).gpu_bytes(SPEC) == SPEC.nonexpert_bytes


def test_random_selection_is_seeded_and_spreads_over_layers():
    a = build_plan(SPEC, Knobs(quantized=16, seed=1))
    b = build_plan(SPEC, Knobs(quantized=16, seed=2))
    assert a != b
    assert len({eid.layer for eid, s in a.items() if s.bits != 16}) > 1


def test_frequency_selection_quantizes_least_routed_first():
    freqs = [[(l * 8 + e) / 100 for e in range(8)] for l in range(4)]  # expert (0,0) least routed
    plan = build_plan(SPEC, Knobs(quantized=3, selection="frequency"), scores=freqs)
    assert {eid for eid, s in plan.items() if s.bits != 16} == {ExpertId(0, 0), ExpertId(0, 1), ExpertId(0, 2)}
    with pytest.raises(ValueError, match="router statistics"):
        build_plan(SPEC, Knobs(quantized=3, selection="frequency"))


def test_gpu_budget_takes_the_most_experts_that_fit():
    budget = 100_000 + 32 * E4 // 2  # non-experts plus room for about half the experts at 4 bits
    plan = build_plan(SPEC, Knobs(quantized=32, bits=4, gpu_budget=budget))
    assert plan.gpu_bytes(SPEC) <= budget
    one_more = build_plan(SPEC, Knobs(quantized=32, bits=4, gpu_experts=plan.gpu_experts + 1))
    assert one_more.gpu_bytes(SPEC) > budget


@pytest.mark.parametrize(
    "knobs, message",
    [
        (dict(quantized=33), "quantized=33 exceeds the model's 32 experts"),
        (dict(quantized=1, bits=5), "bits=5 is not supported; choose one of 16, 8, 4, 3, 2"),
        (dict(quantized=1, bits=16), "bits=16 leaves experts unquantized"),
        (dict(selection="magic"), "selection='magic' is not supported; choose one of random, frequency, sensitivity"),
        (dict(offload="disk"), "offload='disk' is not supported; choose one of fetch, cpu"),
        (dict(gpu_budget=99_999), "smaller than the model's non-expert weights"),
        (dict(gpu_experts=40), "gpu_experts=40 exceeds"),
        (dict(quantized=-1), "quantized=-1 must be >= 0"),
        (dict(cache_slots=0), "cache_slots=0 must be >= 1"),
        (dict(gpu_experts=1, gpu_budget=10**9), "not both"),
        (dict(gpu_budget=100_001, cache_slots=8), "cannot hold the non-expert weights"),
        (dict(quantized=1, group_size=60), "group_size=60 must be a positive multiple of 8"),
        (dict(quantized=1, group_size=48), "group_size=48 does not divide"),
    ],
)
def test_bad_knobs_name_the_problem(knobs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_plan(SPEC, Knobs(**knobs))


def test_expert_state_validates():
    with pytest.raises(ValueError, match="tier='gpu'"):
        ExpertState(16, "gpu")


def test_diff_evicts_before_loading_and_is_empty_for_equal_plans():
    a = build_plan(SPEC, Knobs(quantized=8, bits=4, gpu_experts=16))
    b = build_plan(SPEC, Knobs(quantized=8, bits=4, gpu_experts=16, seed=9))
    assert diff(a, a) == []
    moves = diff(b, a)
    frees = [m.frees_accel for m in moves]
    assert frees == sorted(frees, reverse=True)  # every eviction before every load
    assert {m.expert for m in moves} == {eid for eid, s in b.items() if a.state(eid) != s}


def test_move_costs_are_tagged():
    a = build_plan(SPEC, Knobs())
    b = build_plan(SPEC, Knobs(quantized=4, bits=2, gpu_experts=20))
    costs = {m.cost for m in diff(b, a, have_variant=lambda eid, bits: False)}
    assert costs == {"requantize", "tier"}
    assert {m.cost for m in diff(b, a)} == {"precision", "tier"}


def test_prefetch_is_a_plan_knob_that_leaves_earlier_plan_ids_alone():
    off = build_plan(SPEC, Knobs(quantized=8, bits=4, gpu_experts=16))
    on = build_plan(SPEC, Knobs(quantized=8, bits=4, gpu_experts=16, prefetch=True))
    assert not off.prefetch and on.prefetch and on.states == off.states
    assert "prefetch" not in off.to_dict() and on.to_dict()["prefetch"] is True
    # a plan without prefetch hashes the same fields as before the knob existed: its id is unchanged
    assert set(off.to_dict()) == {"states", "offload", "cache_slots", "group_size"}
    assert Plan.from_dict(off.to_dict()) == off
    assert on.plan_id != off.plan_id and Plan.from_json(on.to_json()) == on
    assert on.summary(SPEC)["prefetch"] is True and off.summary(SPEC)["prefetch"] is False
    assert on.precision_id == off.precision_id  # perplexity does not depend on it
    assert on.gpu_bytes(SPEC) == off.gpu_bytes(SPEC)


def test_prefetch_where_it_cannot_act_builds_the_plan_without_it():
    for knobs in [Knobs(prefetch=True),  # nothing on the host
                  Knobs(gpu_experts=8, offload="cpu", prefetch=True),  # nothing fetched
                  Knobs(gpu_experts=8, cache_slots=3, prefetch=True)]:  # fewer than 2 x top-k slots
        plan = build_plan(SPEC, knobs)
        assert not plan.prefetch
        assert plan.plan_id == build_plan(SPEC, Knobs(**{**knobs.__dict__, "prefetch": False})).plan_id
    assert build_plan(SPEC, Knobs(gpu_experts=8, cache_slots=4, prefetch=True)).prefetch


@pytest.mark.parametrize("offload, slots, tiers, message", [
    ("cpu", 0, "host", "prefetch=True needs offload='fetch' and host experts"),
    ("fetch", 0, "accel", "prefetch=True needs offload='fetch' and host experts"),
])
def test_plan_rejects_prefetch_that_cannot_act(offload, slots, tiers, message):
    states = tuple(tuple(ExpertState(16, tiers) for _ in range(8)) for _ in range(4))
    with pytest.raises(ValueError, match=message):
        Plan(states, offload, slots, prefetch=True)
    with pytest.raises(ValueError, match="prefetch='yes' must be True or False"):
        Knobs(prefetch="yes")


def test_switching_prefetch_alone_moves_no_expert():
    off = build_plan(SPEC, Knobs(quantized=8, bits=4, gpu_experts=16))
    on = build_plan(SPEC, Knobs(quantized=8, bits=4, gpu_experts=16, prefetch=True))
    assert diff(on, off) == [] and diff(off, on) == []
