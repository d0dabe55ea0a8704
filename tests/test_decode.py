"""Decode paths: the static-cache decoder, speculative prefetch, and the fused-kernel path of the
engine (run on the CPU through Triton's interpreter)."""

import pytest
import torch

from placement import kernels
from placement.engine import Engine
from placement.models import load_model
from catalog.knobs import Knobs
from placement.plan import build_plan
from catalog.data import calibration_text
from placement.decode import GraphDecoder, timed_generate


@pytest.mark.parametrize("knobs", [Knobs(), Knobs(gpu_experts=4, cache_slots=4), Knobs(quantized=16, bits=4)],
                         ids=["16-bit", "fetch", "4-bit"])
def test_static_cache_decoder_matches_transformers_generate(fresh, knobs):
    model, _ = fresh()
    prompt = list(range(5, 25))
    engine = Engine(model)
    engine.apply(build_plan(engine.spec, knobs))
    expected = timed_generate(model, prompt, 12, fixed_length=True, warmup_tokens=0).ids
    decoder = GraphDecoder(model, engine, max_len=40)
    for _ in range(2):  # the cache is reset between calls
        got = decoder.generate(prompt, 12)
        assert got.ids == expected
        assert got.decode_tok_s > 0 and got.ttft_s > 0
    assert decoder.reason == "no CUDA device"
    with pytest.raises(ValueError, match="exceed the cache"):
        decoder.generate(prompt, 21)


def test_prefetch_guesses_the_next_layers_experts_and_changes_no_output():
    loaded = load_model("reference")
    engine = Engine(loaded.model)
    ids = loaded.tokenizer.encode(calibration_text())[:24]
    decoder = GraphDecoder(loaded.model, engine, max_len=64)
    runs = {}
    for prefetch in (False, True):  # every expert fetched through 2k slots
        plan = build_plan(engine.spec, Knobs(gpu_experts=0, prefetch=prefetch))
        assert plan.prefetch == prefetch
        engine.apply(plan)
        runs[prefetch] = (decoder.generate(ids, 32).ids, decoder.decode_stats)
    assert runs[True][0] == runs[False][0]
    off, on = runs[False][1], runs[True][1]
    assert off["prefetch_issued"] == 0
    # 4 layers x top-2 through 4 slots: the LRU alone never hits; guesses for layers 1-3 do
    assert off["fetch_hits"] == 0
    later_layer_calls = 31 * 3 * 2
    assert on["prefetch_hits"] == on["fetch_hits"] > 0.4 * later_layer_calls
    assert on["prefetch_issued"] <= later_layer_calls


needs_triton = pytest.mark.skipif(not kernels.available(torch.device("cpu")),
                                  reason="triton is not installed (or its interpreter is unavailable)")


@needs_triton
@pytest.mark.parametrize("bits", [16, 4, 2])
def test_fused_kernel_decode_matches_the_per_expert_path(fresh, bits):
    model, _ = fresh()
    engine = Engine(model, use_kernels=True)
    assert engine.use_kernels
    total = engine.spec.num_layers * engine.spec.num_experts
    knobs = Knobs() if bits == 16 else Knobs(quantized=total - 3, bits=bits)  # some 16-bit experts too
    engine.apply(build_plan(engine.spec, knobs))
    assert all(engine.fast_bits) and not any(engine.layer_eager)
    x = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        fused = model(x[:, :1]).logits  # one token: the kernel path
        engine.configure(use_kernels=False)
        eager = model(x[:, :1]).logits
    assert engine.stats.kernel_layers == engine.spec.num_layers
    torch.testing.assert_close(fused, eager, rtol=1e-3, atol=1e-3)


@needs_triton
def test_mixed_tiers_use_kernels_for_accelerator_experts_and_the_loop_for_host_ones(fresh):
    model, _ = fresh()
    prompt = list(range(7, 19))
    engine = Engine(model, use_kernels=False)
    plan = build_plan(engine.spec, Knobs(quantized=8, bits=4, gpu_experts=8, cache_slots=4))
    engine.apply(plan)
    expected = GraphDecoder(model, engine, 32).generate(prompt, 6).ids
    engine.configure(use_kernels=True)
    assert any(engine.layer_eager) and not engine.capturable
    decoder = GraphDecoder(model, engine, 32)
    assert decoder.generate(prompt, 6).ids == expected
    assert decoder.decode_stats["kernel_layers"] == 5 * engine.spec.num_layers
    assert decoder.decode_stats["fetch_hits"] + decoder.decode_stats["fetch_misses"] > 0
