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
    assert all(b.is_pinned() for b in engine.masters.values())
    spec = engine.spec
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated() - engine.nonexpert_bytes - engine.routed.untyped_storage().nbytes()
    for knobs in [Knobs(), Knobs(gpu_experts=5, cache_slots=3), Knobs(gpu_experts=0, offload="cpu")]:
        plan = build_plan(spec, knobs)
        engine.apply(plan)
        with torch.no_grad():
            torch.testing.assert_close(model(tokens).logits, reference)
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
