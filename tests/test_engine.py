import pytest
import torch

from placement import hqq_backend, kernels
from placement.engine import (GROUPED_MIN_TOKENS_PER_EXPERT, KERNEL_MAX_TOKENS, QUANTIZED_KERNEL_MAX_TOKENS, Engine,
                              tokens_per_expert)
from catalog.knobs import Knobs
from placement.plan import ExpertId, ExpertState, Plan, build_plan
from tests.conftest import FAMILIES


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def all16(spec, tier_of):
    """An all-16-bit plan with tiers chosen per expert by `tier_of(layer, expert)`."""
    states = tuple(tuple(ExpertState(16, tier_of(l, e)) for e in range(spec.num_experts))
                   for l in range(spec.num_layers))
    return states


@pytest.mark.parametrize("name", FAMILIES)
def test_16bit_plans_match_unmodified_transformers_whatever_the_tiers(fresh, tokens, name):
    model, _ = fresh(name)
    reference = logits(model, tokens)  # the stock transformers model, before the engine exists
    engine = Engine(model)
    spec = engine.spec
    tierings = {
        "accel": (lambda l, e: "accel", "fetch", 0),
        "host-fetch": (lambda l, e: "host", "fetch", 3),
        "host-cpu": (lambda l, e: "host", "cpu", 0),
        "mixed": (lambda l, e: "accel" if (l + e) % 2 else "host", "fetch", 1),
    }
    for label, (tier_of, offload, slots) in tierings.items():
        engine.apply(Plan(all16(spec, tier_of), offload, slots))
        torch.testing.assert_close(logits(model, tokens), reference, msg=f"{name}, {label}")


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    with pytest.raises(ValueError, match="unsupported model architecture 'llama'.*mixtral, olmoe, qwen2_moe, qwen3_moe"):
        Engine(AutoModelForCausalLM.from_config(config))


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_quantized_expert_matches_hqq_linear(fresh, bits):
    model, _ = fresh()
    fused = model.model.layers[1].mlp.experts
    w_gate_up, w_down, act = fused.gate_up_proj[5].detach().clone(), fused.down_proj[5].detach().clone(), fused.act_fn
    engine = Engine(model)
    states = [[ExpertState(16, "accel")] * 8 for _ in range(2)]
    states[1][5] = ExpertState(bits, "accel")
    engine.apply(Plan(tuple(map(tuple, states))))

    gate_up = hqq_backend.hqq_linear(w_gate_up, bits, 64, torch.float32, "cpu")
    down = hqq_backend.hqq_linear(w_down, bits, 64, torch.float32, "cpu")
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0))
    gate, up = gate_up(x).chunk(2, dim=-1)
    expected = down(act(gate) * up)
    got = engine.run_expert(1, 5, x)
    torch.testing.assert_close(got, expected)
    # and it really is quantized: off the 16-bit expert by more than 0.1% of the output's scale (an
    # absolute 1e-4 was within 8-bit's error, about 1% of outputs near 0.01, for most inputs)
    g16, u16 = (x @ w_gate_up.T).chunk(2, dim=-1)
    exact = act(g16) * u16 @ w_down.T
    assert (got - exact).abs().max() > 1e-3 * exact.abs().max()


def test_apply_a_b_a_gives_a_fresh_a_and_quantizes_nothing_again(fresh, tokens):
    a = Knobs(quantized=6, bits=4, gpu_experts=10, seed=1)
    b = Knobs(quantized=12, bits=2, gpu_experts=4, offload="cpu", seed=2)

    model, _ = fresh()
    engine = Engine(model)
    spec = engine.spec
    first = engine.apply(build_plan(spec, a))
    engine.apply(build_plan(spec, b))
    again = engine.apply(build_plan(spec, a))
    switched = logits(model, tokens)

    fresh_model, _ = fresh()
    Engine(fresh_model).apply(build_plan(spec, a))
    assert torch.equal(switched, logits(fresh_model, tokens))
    assert first.requantized == 6 and again.requantized == 0
    assert engine.apply(build_plan(spec, a)).moves == 0  # nothing changed: zero moves


@pytest.mark.parametrize("name", FAMILIES)
def test_memory_accounting_matches_plan_and_tensors(fresh, name):
    model, _ = fresh(name)
    engine = Engine(model)
    spec = engine.spec
    for knobs in [Knobs(), Knobs(quantized=5, bits=3, gpu_experts=7, cache_slots=2),
                  Knobs(quantized=16, bits=8, gpu_experts=0, offload="cpu")]:
        plan = build_plan(spec, knobs)
        engine.apply(plan)
        mem = engine.memory()
        assert mem["gpu_bytes"] == plan.gpu_bytes(spec)
        # host: the host tier at plan precision, plus (cpu offload) matrices dequantized so far,
        # which reach the plan's bound once every host expert has run
        assert mem["host_bytes"] == plan.host_packed_bytes(spec) + mem["host_dequant_bytes"] <= plan.host_bytes(spec)
        for eid, _ in plan.items():
            engine.run_expert(eid.layer, eid.expert, torch.zeros(1, spec.hidden))
        assert engine.memory()["host_bytes"] == plan.host_bytes(spec)
        # and against the tensors themselves: every parameter, buffer, resident expert and slot
        real = sum(t.numel() * t.element_size() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
        real += sum(buf.untyped_storage().nbytes() for _, buf, _ in engine.resident.values())
        real += sum(s.untyped_storage().nbytes() for s in engine.slots)
        assert real == plan.gpu_bytes(spec)
    if name == "tiny-random-qwen2_moe":  # the shared expert is counted with the non-expert weights
        shared = model.model.layers[0].mlp.shared_expert
        assert spec.nonexpert_bytes > sum(p.numel() * 4 for p in shared.parameters()) > 0


def test_apply_never_holds_more_than_the_new_footprint_while_loading(fresh):
    model, _ = fresh()
    engine = Engine(model)
    spec = engine.spec
    engine.apply(build_plan(spec, Knobs()))  # everything 16-bit on the accelerator
    small = build_plan(spec, Knobs(quantized=16, bits=4, gpu_experts=8, seed=5))
    seen = []
    to_device_many = engine.store.to_device_many

    def watch(keys, device, progress=None):  # the loads' buffers are allocated together
        seen.append(engine.memory()["gpu_bytes"] + sum(engine.layout(bits, gs).nbytes for _, bits, gs in keys))
        return to_device_many(keys, device, progress)

    engine.store.to_device_many = watch
    report = engine.apply(small)
    assert report.loaded == 8 and seen
    assert max(seen) <= small.gpu_bytes(spec)


def test_fetch_cache_counts_hits_misses_and_bytes(fresh, tokens):
    model, _ = fresh()
    engine = Engine(model)
    plan = build_plan(engine.spec, Knobs(gpu_experts=0, cache_slots=2))
    engine.apply(plan)
    logits(model, tokens)
    s = engine.stats
    assert s.fetch_hits + s.fetch_misses == s.expert_calls > 0
    assert s.bytes_fetched == s.fetch_misses * plan.expert_nbytes(engine.spec, 16)
    engine.apply(build_plan(engine.spec, Knobs(gpu_experts=0, cache_slots=16)))
    engine.reset_stats()
    logits(model, tokens)
    logits(model, tokens)  # with a slot per expert, the second pass only hits
    assert engine.stats.fetch_misses == 16 and engine.stats.hit_rate == pytest.approx(1 - 16 / engine.stats.expert_calls)


def test_router_frequencies_drive_frequency_selection(fresh, tokens):
    from placement.selection import router_frequencies

    model, _ = fresh()
    engine = Engine(model)
    engine.apply(build_plan(engine.spec, Knobs()))
    freqs = router_frequencies(engine, tokens.flatten().tolist(), window=16)
    assert all(sum(row) == pytest.approx(1.0) for row in freqs)
    plan = build_plan(engine.spec, Knobs(quantized=4, selection="frequency"), freqs)
    chosen = [freqs[eid.layer][eid.expert] for eid, s in plan.items() if s.bits != 16]
    others = [freqs[eid.layer][eid.expert] for eid, s in plan.items() if s.bits == 16]
    assert max(chosen) <= min(others)


def test_running_without_a_plan_or_with_a_foreign_plan_is_a_clear_error(fresh, tokens):
    model, _ = fresh()
    engine = Engine(model)
    with pytest.raises(RuntimeError, match="no plan yet"):
        logits(model, tokens)
    wrong = Plan(tuple(tuple(ExpertState() for _ in range(4)) for _ in range(2)))
    with pytest.raises(ValueError, match="plan has 2x4 experts but the model has 2 MoE layers x 8 experts"):
        engine.apply(wrong)


def test_expert_ids_are_ordered():
    assert sorted([ExpertId(1, 0), ExpertId(0, 7)]) == [ExpertId(0, 7), ExpertId(1, 0)]


def test_changing_the_group_size_rebuilds_every_quantized_expert(fresh, tokens):
    model, _ = fresh()
    engine = Engine(model)
    # host experts at 16 and 4 bits: the slots are sized for 16-bit ones whatever the group size
    g64 = build_plan(engine.spec, Knobs(quantized=12, bits=4, gpu_experts=4, cache_slots=16))
    g32 = build_plan(engine.spec, Knobs(quantized=12, bits=4, gpu_experts=4, cache_slots=16, group_size=32))
    assert g64.slot_nbytes(engine.spec) == g32.slot_nbytes(engine.spec)
    engine.apply(g64)
    logits(model, tokens)  # fills the fetch slots with group-64 variants
    engine.apply(g32)
    switched = logits(model, tokens)
    other, _ = fresh()
    Engine(other).apply(g32)
    assert torch.equal(switched, logits(other, tokens))


def test_cpu_offload_dequantizes_a_host_expert_once_and_apply_drops_what_the_plan_no_longer_serves(fresh, tokens):
    import types

    model, _ = fresh()
    calls = []

    def dequantize(*args, **kwargs):
        calls.append(kwargs["bits"])
        return hqq_backend.dequantize(*args, **kwargs)

    engine = Engine(model, quantizer=types.SimpleNamespace(quantize=hqq_backend.quantize, dequantize=dequantize))
    spec = engine.spec
    plan = build_plan(spec, Knobs(quantized=8, bits=4, gpu_experts=0, offload="cpu"))  # 8 of 16 host experts 4-bit
    engine.apply(plan)
    assert engine.host_weights == {} and engine.memory()["host_dequant_bytes"] == 0
    first = logits(model, tokens)  # every expert's first call: dequantized then and kept
    quantized = {(eid, 4, 64) for eid, s in plan.items() if s.bits == 4}
    assert set(engine.host_weights) == quantized and len(calls) == 2 * len(quantized)
    kept = {k: [t.data_ptr() for t in w.values()] for k, w in engine.host_weights.items()}
    assert engine.memory()["host_dequant_bytes"] == len(quantized) * plan.expert_nbytes(spec, 16)
    calls.clear()
    second = logits(model, tokens)  # every call a cache hit
    assert calls == [] and torch.equal(first, second)
    other, _ = fresh()  # and exactly what dequantizing on every call gives (a fetch plan does)
    Engine(other).apply(build_plan(spec, Knobs(quantized=8, bits=4, gpu_experts=0, cache_slots=16)))
    torch.testing.assert_close(logits(other, tokens), first, rtol=0, atol=0)

    engine.apply(plan)  # the same plan: nothing dropped
    assert {k: [t.data_ptr() for t in w.values()] for k, w in engine.host_weights.items()} == kept
    moved = build_plan(spec, Knobs(quantized=8, bits=4, gpu_experts=4, offload="cpu"))  # 4 quantized go on the accelerator
    engine.apply(moved)
    assert set(engine.host_weights) == {k for k in quantized if moved.state(k[0]).tier == "host"} != quantized
    engine.apply(build_plan(spec, Knobs(quantized=8, bits=4, gpu_experts=0, cache_slots=16)))  # fetched instead
    assert engine.host_weights == {} and engine.memory()["host_dequant_bytes"] == 0
    engine.apply(plan)
    logits(model, tokens)
    engine.apply(build_plan(spec, Knobs(quantized=8, bits=4, gpu_experts=16)))  # no host experts at all
    assert engine.host_weights == {}


needs_triton = pytest.mark.skipif(not kernels.available(torch.device("cpu")),
                                  reason="triton is not installed (or its interpreter is unavailable)")


def count_kernel_calls(monkeypatch) -> dict[str, int]:
    """Count the engine's calls of the slot and the grouped kernels (which still run)."""
    calls = {"slots": 0, "grouped": 0}
    for name, key in (("moe_experts", "slots"), ("moe_experts_grouped", "grouped")):
        def counted(*args, _fn=getattr(kernels, name), _key=key, **kwargs):
            calls[_key] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(kernels, name, counted)
    return calls


def test_the_grouped_kernels_take_over_where_they_were_measured_faster_for_each_precision():
    # a Mixtral layer, 8 experts, top-2 (experiments/bench_grouping on an H200): 16-bit grouped from 4
    # tokens, 8-bit from 12, 4- and 2-bit from 16
    assert tokens_per_expert(1, 2, 8) == pytest.approx(1.0)  # batch 1: one token per routed expert
    batches = (1, 2, 3, 4, 5, 8, 12, 16, 64)
    first = {bits: next(t for t in batches if tokens_per_expert(t, 2, 8) >= least)
             for bits, least in GROUPED_MIN_TOKENS_PER_EXPERT.items()}
    assert first == {16: 4, 8: 12, 4: 16, 2: 16}
    # with 64 experts and top-8 (OLMoE) fewer tokens share an expert: 16-bit grouped from 7 tokens
    assert tokens_per_expert(6, 8, 64) < GROUPED_MIN_TOKENS_PER_EXPERT[16] <= tokens_per_expert(7, 8, 64)


@needs_triton
def test_batched_decode_step_on_the_grouped_kernels_matches_the_per_expert_path(fresh, monkeypatch):
    model, _ = fresh()
    engine = Engine(model, use_kernels=True)
    spec = engine.spec
    engine.apply(build_plan(spec, Knobs(quantized=4, bits=4)))  # 4-bit and 16-bit experts in each layer
    assert all(len(bits) == 2 for bits in engine.fast_bits)
    assert not any(engine.layer_eager)
    launches = sum(len(bits) for bits in engine.fast_bits)  # (layer, precision) pairs, one grouping per layer
    calls = count_kernel_calls(monkeypatch)
    ids = torch.randint(0, 512, (16, 1), generator=torch.Generator().manual_seed(3))  # 16 sequences, 1 token
    with torch.no_grad():
        fused = model(ids).logits  # [16, 1, V]: every MoE layer call has 16 rows
        assert calls == {"slots": 0, "grouped": launches} and engine.stats.kernel_layers == spec.num_layers
        # 12 rows: 16-bit experts grouped, 4-bit ones in slots (the output zeroed and the routing
        # counted by the layer, not by the first slot kernel)
        routed = engine.routed.clone()
        mixed = model(ids[:12]).logits
        assert calls == {"slots": spec.num_layers, "grouped": launches + spec.num_layers}
        assert (engine.routed - routed).sum(dim=1).tolist() == [12 * spec.top_k] * spec.num_layers
        model(ids[:1])  # batch 1: the slot kernels
        assert calls == {"slots": spec.num_layers + launches, "grouped": launches + spec.num_layers}
        assert engine.stats.kernel_layers == 3 * spec.num_layers
        # a longer call (prefill) leaves the kernels
        assert engine.kernel_path(KERNEL_MAX_TOKENS) and not engine.kernel_path(KERNEL_MAX_TOKENS + 1)
        engine.configure(use_kernels=False)
        eager = model(ids).logits
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed, eager[:12], rtol=1e-4, atol=1e-4)


@needs_triton
def test_a_prefill_chunk_runs_quantized_experts_grouped_and_16bit_ones_as_matrix_products(fresh, monkeypatch):
    model, _ = fresh()
    engine = Engine(model, use_kernels=True)
    spec = engine.spec
    engine.apply(build_plan(spec, Knobs(quantized=4, bits=4)))  # 4-bit and 16-bit experts in each layer
    calls = count_kernel_calls(monkeypatch)
    looped = []  # the precisions of the experts the per-expert loop ran
    run_expert = engine.run_expert
    monkeypatch.setattr(engine, "run_expert",
                        lambda layer, e, x: looped.append(engine.plan.states[layer][e].bits) or run_expert(layer, e, x))
    ids = torch.randint(0, 512, (1, KERNEL_MAX_TOKENS + 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        chunk = model(ids).logits  # one prompt chunk past the decode limit
        assert calls == {"slots": 0, "grouped": spec.num_layers}  # the 4-bit experts of each layer, grouped
        assert looped and set(looped) == {16}
        assert engine.stats.kernel_layers == spec.num_layers
        assert engine.kernel_bits(0, KERNEL_MAX_TOKENS) == (16, 4)
        assert engine.kernel_bits(0, QUANTIZED_KERNEL_MAX_TOKENS) == (4,)
        assert engine.kernel_bits(0, QUANTIZED_KERNEL_MAX_TOKENS + 1) == ()  # longer: dequantized whole
        engine.configure(use_kernels=False)
        eager = model(ids).logits
    torch.testing.assert_close(chunk, eager, rtol=1e-4, atol=1e-4)


@needs_triton
def test_a_fetched_expert_runs_all_its_rows_in_one_grouped_kernel_call(fresh, monkeypatch):
    model, _ = fresh()
    engine = Engine(model, use_kernels=True)
    states = [[ExpertState(16, "accel")] * 8 for _ in range(2)]
    states[1][3] = ExpertState(4, "host")
    engine.apply(Plan(tuple(map(tuple, states)), "fetch", 1))  # expert (1, 3) fetched, at 4 bits
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))  # [n, H]
    expected = engine.expert_output(ExpertId(1, 3), 4, 64, x)
    calls = count_kernel_calls(monkeypatch)
    torch.testing.assert_close(engine.run_expert(1, 3, x), expected, rtol=1e-4, atol=1e-4)
    assert calls == {"slots": 0, "grouped": 1}
    torch.testing.assert_close(engine.run_expert(1, 3, x[:1]), expected[:1], rtol=1e-4, atol=1e-4)
    assert calls == {"slots": 1, "grouped": 1}
    torch.testing.assert_close(engine.run_expert(1, 3, x[:3]), expected[:3], rtol=1e-4, atol=1e-4)  # 3 slots
    assert calls == {"slots": 2, "grouped": 1}


def test_pinned_host_buffers_own_their_pages_and_are_unregistered_with_their_store(monkeypatch):
    """With CUDA, host buffers are registered page by page: each on pages of its own, and whatever
    is still registered when its HostBuffers goes is unregistered (CUDA calls recorded by a fake)."""
    import gc

    from placement import store

    calls = []

    class FakeCudart:
        def cudaHostRegister(self, ptr, size, flags):
            calls.append(("register", ptr, size))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))
            return 0

    monkeypatch.setattr(store, "_cudart", lambda: FakeCudart())
    bufs = store.HostBuffers(pin=True)
    a, b = bufs.empty(100), bufs.empty(5000)
    assert [c[2] for c in calls] == [4096, 8192] and a.numel() == 100 and b.numel() == 5000
    assert a.data_ptr() % 4096 == 0 and b.data_ptr() % 4096 == 0
    assert bufs.pinned_bytes() == 5100
    bufs.release(a)
    assert calls[-1] == ("unregister", a.data_ptr()) and bufs.pinned_bytes() == 5000
    ptr_b = b.data_ptr()
    del bufs
    gc.collect()
    assert calls[-1] == ("unregister", ptr_b)
    b.fill_(7)  # the memory stays valid while a tensor holds it
    assert int(b.sum()) == 7 * 5000
