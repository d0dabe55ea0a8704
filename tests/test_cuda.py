"""The engine on a real accelerator: same logits as stock transformers, and our byte accounting
against CUDA's own allocator."""

import pytest
import torch

from placement.engine import Engine
from placement.models import load_model
from catalog.knobs import Knobs
from placement.plan import build_plan

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_16bit_plans_match_transformers_on_cuda_and_bytes_match_the_allocator():
    loaded = load_model("tiny-random", device="cuda", dtype=torch.float32)
    model = loaded.model
    tokens = torch.randint(0, 512, (2, 32), device="cuda")
    with torch.no_grad():
        reference = model(tokens).logits
    engine = Engine(model)
    spec = engine.spec
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated() - engine.nonexpert_bytes - engine.routed.untyped_storage().nbytes()
    for knobs in [Knobs(), Knobs(gpu_experts=5, cache_slots=3), Knobs(gpu_experts=0, offload="cpu")]:
        plan = build_plan(spec, knobs)
        engine.apply(plan)
        with torch.no_grad():
            torch.testing.assert_close(model(tokens).logits, reference)
        # only the host tier is pinned, at its exact size (registered, not rounded up)
        assert all(b.is_pinned() for b in engine.store.host.values())
        assert engine.memory()["host_pinned_bytes"] == plan.host_packed_bytes(spec)
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated() - engine.routed.untyped_storage().nbytes() - base
        # the caching allocator rounds each block up to 512 bytes; our buffers are 64-byte aligned
        assert plan.gpu_bytes(spec) <= allocated <= plan.gpu_bytes(spec) + 512 * (len(engine.resident) + len(engine.slots) + 64)


def test_quantized_plans_run_on_cuda_and_switching_back_requantizes_nothing():
    loaded = load_model("tiny-random", device="cuda", dtype=torch.bfloat16)
    engine = Engine(loaded.model)
    a = build_plan(engine.spec, Knobs(quantized=8, bits=4, gpu_experts=10))
    b = build_plan(engine.spec, Knobs(quantized=16, bits=2, gpu_experts=4))
    tokens = torch.randint(0, 512, (1, 16), device="cuda")
    engine.apply(a)
    with torch.no_grad():
        first = loaded.model(tokens).logits
    engine.apply(b)
    assert engine.apply(a).requantized == 0
    with torch.no_grad():
        assert torch.equal(loaded.model(tokens).logits, first)


@pytest.mark.parametrize("knobs", [Knobs(), Knobs(quantized=16, bits=4)], ids=["16-bit", "4-bit"])
def test_graph_decode_equals_eager_decode_at_every_batch_bucket_and_recaptures_after_a_switch(knobs):
    """One CUDA graph per (batch, length) bucket replays exactly the eager step; a plan switch
    between two generate calls re-captures (the old graphs read stale tables)."""
    from placement.decode import Decoder

    loaded = load_model("tiny-random", device="cuda", dtype=torch.float32)
    engine = Engine(loaded.model)
    engine.apply(build_plan(engine.spec, knobs))
    prompts = [list(range(3 + i, 20 + 2 * i)) for i in range(16)]
    graphs = Decoder(loaded.model, engine, max_seqs=16, max_len=128)
    eager = Decoder(loaded.model, engine, max_seqs=16, max_len=128, graphs=False)
    for n in (1, 3, 16):
        want = [g.ids for g in eager.generate(prompts[:n], 40, fixed_length=True).sequences]
        got = graphs.generate(prompts[:n], 40, fixed_length=True)
        assert graphs.reason is None and [g.ids for g in got.sequences] == want
    assert {b for b, _ in graphs.graphs} == {1, 4, 16}
    engine.apply(build_plan(engine.spec, Knobs(quantized=16, bits=2)))
    want = [g.ids for g in eager.generate(prompts[:4], 20, fixed_length=True).sequences]
    assert [g.ids for g in graphs.generate(prompts[:4], 20, fixed_length=True).sequences] == want
    assert {b for b, _ in graphs.graphs} == {4}  # recaptured for the new plan, on demand


def test_seeded_experts_on_cuda_pin_only_the_host_tier_and_match_their_stock_model(tmp_path, monkeypatch):
    from placement.masters import fill_experts

    monkeypatch.setenv("QOS_CACHE_DIR", str(tmp_path))
    a = load_model("tiny-random", device="cuda", dtype=torch.float32, seeded_experts=True)
    b = load_model("tiny-random", device="cuda", dtype=torch.float32, seeded_experts=True)
    fill_experts([layer.mlp for layer in b.model.model.layers], b.masters, "cuda")
    tokens = torch.randint(0, 512, (1, 16), device="cuda")
    with torch.no_grad():
        reference = b.model(tokens).logits
    engine = Engine(a.model, fingerprint=a.fingerprint)
    plan = build_plan(engine.spec, Knobs(quantized=8, bits=4, gpu_experts=6))
    engine.apply(plan)
    mem = engine.memory()
    assert mem["host_pinned_bytes"] == mem["host_bytes"] == plan.host_bytes(engine.spec)
    assert mem["host_store_bytes"] == mem["host_bytes"]  # no masters, no variants kept beside the host tier
    engine.apply(build_plan(engine.spec, Knobs(gpu_experts=6)))
    with torch.no_grad():
        torch.testing.assert_close(a.model(tokens).logits, reference)
    assert engine.apply(plan).requantized == 0  # the variants came back from the disk cache
