"""Decode steps through placement/fast_layers.py (fused q/k/v, compiled attention, norms and router)
against the model's own modules, on the CPU: logits, caches, greedy tokens, routing, plan switches
and the switch itself. Compiled modes run inductor's C++ backend (needs g++)."""

import pytest
import torch
from torch import nn

from catalog.knobs import Knobs
from placement import fast_layers as fl
from placement.decode import Decoder
from placement.engine import Engine
from placement.plan import build_plan
from tests.conftest import FAMILIES

@pytest.fixture(autouse=True)
def _compiled_or_failed(monkeypatch):
    """A test session compiles the layer functions for several modes and shapes (a server: one
    of each, a few graphs): more than dynamo's default 8 graphs per function, past which it would
    quietly run them uncompiled. Raise the limit, and fail rather than fall back (to uncompiled
    code, or the decoder to the model's modules)."""
    monkeypatch.setattr("placement.decode.FAST_FALLBACK", False)
    with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
        yield


# different lengths, so a batch's sequences sit at different positions; one crosses the 64 bucket
PROMPTS = [list(range(5, 25)), list(range(30, 37)), list(range(100, 171)), [7]]


def pair(model, engine, mode, max_seqs=4, max_len=128):
    """A decoder through the model's modules and one through fast layers, same model and engine."""
    return (Decoder(model, engine, max_seqs=max_seqs, max_len=max_len, fast_layers=False),
            Decoder(model, engine, max_seqs=max_seqs, max_len=max_len, fast_layers=mode))


def prefill(decoder, prompts, token=3):
    decoder._ensure_logits()
    for s, p in enumerate(prompts):
        decoder.prefill(s, p)
        decoder.feed(s, token + s, len(p))


def step_logits(decoder, B, kv_len):
    with torch.no_grad():
        decoder._decode_forward(B, kv_len)
    return decoder.logits[:B].clone()


@pytest.mark.parametrize("family,mode", [(f, "eager") for f in FAMILIES]
                         + [("tiny-random", m) for m in ("compile", "compile-reduce", "compile-autotune")])
def test_logits_and_caches_equal_the_model_modules_at_batch_1_and_4(fresh, family, mode):
    model, _ = fresh(family)
    engine = Engine(model)
    engine.apply(build_plan(engine.spec, Knobs()))
    ref, fast = pair(model, engine, mode)
    assert fast.fast is not None and fast.fast.mode == mode
    for d in (ref, fast):
        prefill(d, PROMPTS)
    for B, kv_len in [(1, 64), (4, 128)]:  # batch 1: slot 0 at position 20; batch 4: 20, 7, 71, 1
        before = engine.routed.clone()
        want = step_logits(ref, B, kv_len)
        routed = engine.routed - before
        got = step_logits(fast, B, kv_len)
        assert fast.fast_reason is None and ref.fast_reason == "off"
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert torch.equal(engine.routed - before - routed, routed)  # the same experts, as many times
        for layer in ref.cache.k:  # the step wrote the same keys and values at the same slots
            torch.testing.assert_close(fast.cache.k[layer], ref.cache.k[layer], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(fast.cache.v[layer], ref.cache.v[layer], rtol=1e-4, atol=1e-5)


def test_greedy_decode_is_token_for_token_the_same_and_compiles_a_few_graphs(fresh):
    model, _ = fresh()
    engine = Engine(model)
    engine.apply(build_plan(engine.spec, Knobs()))
    ref, fast = pair(model, engine, "compile")
    want = ref.generate(PROMPTS, 12, fixed_length=True)
    engine.reset_stats()
    torch._dynamo.reset()  # count this test's graphs alone
    got = fast.generate(PROMPTS, 12, fixed_length=True)  # steps at attention lengths 64 and 128 (all of it)
    assert [g.ids for g in got.sequences] == [g.ids for g in want.sequences]
    assert got.stats == want.stats  # experts called as often, through the same engine paths
    other = Decoder(model, engine, max_seqs=3, max_len=200, fast_layers="compile")
    other._ensure_logits()
    for d, B, kv_len in [(fast, 1, 64), (fast, 1, 128), (fast, 2, 64), (fast, 3, 128), (other, 1, 200), (other, 3, 64)]:
        step_logits(d, B, kv_len)
    # whatever the decoder: batch 1 and batch > 1, for a layer times attending to all of the cache
    # or part of it (a contiguous slice is a case of its own)
    graphs = [len(torch._dynamo.eval_frame._debug_get_cache_entry_list(fn._torchdynamo_orig_callable.__code__))
              for fn in (fast.fast.fns["moe_layer"], fast.fast.fns["head"])]
    assert graphs == [4, 2]


def test_a_plan_switch_between_steps_changes_nothing_but_the_experts(fresh):
    """Mid-generation the plan goes from all 16-bit on the accelerator to 4-bit experts, some
    fetched from host memory (the per-expert path): both paths see the same switch."""
    model, _ = fresh()
    engine = Engine(model)
    start = build_plan(engine.spec, Knobs())
    switched = build_plan(engine.spec, Knobs(quantized=12, bits=4, gpu_experts=10, cache_slots=4))
    ref, fast = pair(model, engine, "compile")

    def run(decoder):
        engine.apply(start)
        steps = []

        def between():
            steps.append(1)
            if len(steps) == 4:
                engine.apply(switched)

        return decoder.generate(PROMPTS, 10, fixed_length=True, between_steps=between)

    want, got = run(ref), run(fast)
    assert [g.ids for g in got.sequences] == [g.ids for g in want.sequences]
    assert got.stats["fetch_hits"] + got.stats["fetch_misses"] > 0
    assert got.stats == want.stats


class Wrapped(nn.Module):
    """A projection that is not an nn.Linear (as a quantized one is)."""

    def __init__(self, linear):
        super().__init__()
        self.inner = linear

    def forward(self, x):
        return self.inner(x)


def test_qkv_are_fused_as_views_and_swapped_projections_are_followed(fresh):
    model, _ = fresh("tiny-random-qwen2_moe")  # q/k/v with biases
    engine = Engine(model)
    engine.apply(build_plan(engine.spec, Knobs()))
    params = sum(p.numel() for p in model.parameters())
    ref, fast = pair(model, engine, "eager")
    for d in (ref, fast):
        prefill(d, PROMPTS[:2])
    want = step_logits(ref, 2, 64)
    assert fast.fast.ready()
    attn = model.model.layers[0].self_attn
    wqkv, bqkv = fast.fast.qkv[0]
    assert wqkv.shape == (attn.q_proj.out_features + 2 * attn.k_proj.out_features, attn.q_proj.in_features)
    for name in ("q_proj", "k_proj", "v_proj"):  # the model's parameters are views of the fused tensors
        proj = getattr(attn, name)
        assert proj.weight.untyped_storage().data_ptr() == wqkv.untyped_storage().data_ptr()
        assert proj.bias.untyped_storage().data_ptr() == bqkv.untyped_storage().data_ptr()
    assert sum(p.numel() for p in model.parameters()) == params
    assert fast.fast.ready() and fast.fast.qkv[0][0].data_ptr() == wqkv.data_ptr()  # no copy the second time
    torch.testing.assert_close(step_logits(ref, 2, 64), want)  # the modules read the same values

    # a projection the fast path cannot read: the step takes the model's modules, same logits
    attn.k_proj = Wrapped(attn.k_proj)
    torch.testing.assert_close(step_logits(fast, 2, 64), want, rtol=1e-4, atol=1e-5)
    assert "layer 0" in fast.fast_reason and "Wrapped" in fast.fast_reason
    # separate 16-bit weights put back (as the engine does going back to 16 bits): fused again
    inner = attn.k_proj.inner
    attn.k_proj = nn.Linear(inner.in_features, inner.out_features)
    with torch.no_grad():
        attn.k_proj.weight.copy_(inner.weight)
        attn.k_proj.bias.copy_(inner.bias)
    torch.testing.assert_close(step_logits(fast, 2, 64), want, rtol=1e-4, atol=1e-5)
    assert fast.fast_reason is None
    assert attn.k_proj.weight.untyped_storage().data_ptr() == fast.fast.qkv[0][0].untyped_storage().data_ptr()


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_quantized_attention_runs_its_own_modules_between_compiled_pieces(fresh, mode):
    """Plan.attn_bits 4: the engine's QuantLinear projections are called between three compiled
    pieces per layer, q/k/v as one kernel launch (a QuantGroup); back at 16 bits the model's weights
    are fused again."""
    model, _ = fresh()
    engine = Engine(model)
    engine.apply(build_plan(engine.spec, Knobs()))
    ref, fast = pair(model, engine, mode)
    for d in (ref, fast):
        prefill(d, PROMPTS)
    assert fast.fast.ready()
    engine.apply(build_plan(engine.spec, Knobs(attn_bits=4)))
    # kernels off (the CPU's default: dequantize + matmul, each module) and on (CUDA's default; on
    # the CPU Triton's interpreter): then q/k/v are one group, one launch (integer kernel at batch 1,
    # tl.dot at 4)
    for kernels_on in (engine.use_kernels, not engine.use_kernels):
        engine.configure(use_kernels=kernels_on)
        for B, kv_len in [(1, 128), (4, 128)]:
            want = step_logits(ref, B, kv_len)
            torch.testing.assert_close(step_logits(fast, B, kv_len), want, rtol=1e-4, atol=1e-5)
            assert fast.fast_reason is None and fast.fast.qkv == [None] * len(fast.fast.qkv)
            assert all((g is not None and g.current([a.q_proj, a.k_proj, a.v_proj])) == kernels_on
                       for g, a in zip(fast.fast.quant_qkv, (layer.self_attn for layer in model.model.layers)))
    engine.apply(build_plan(engine.spec, Knobs()))
    want = step_logits(ref, 4, 128)
    torch.testing.assert_close(step_logits(fast, 4, 128), want, rtol=1e-4, atol=1e-5)
    assert fast.fast_reason is None and all(qkv is not None for qkv in fast.fast.qkv)
    assert fast.fast.quant_qkv == [None] * len(fast.fast.qkv)


def test_the_switch_defaults_on_with_cuda_only_and_refuses_what_it_cannot_run(fresh, monkeypatch):
    model, _ = fresh()
    engine = Engine(model)
    monkeypatch.delenv("QOS_FAST_LAYERS", raising=False)
    default = Decoder(model, engine, max_seqs=2, max_len=64).fast
    assert (default is not None) == (engine.accel.type == "cuda")  # on the CPU: off unless asked
    monkeypatch.setenv("QOS_FAST_LAYERS", "eager")
    assert Decoder(model, engine, max_seqs=2, max_len=64).fast.mode == "eager"
    monkeypatch.setenv("QOS_FAST_LAYERS", "0")
    assert Decoder(model, engine, max_seqs=2, max_len=64).fast is None
    assert Decoder(model, engine, max_seqs=2, max_len=64, fast_layers=True).fast.mode == "compile"
    with pytest.raises(ValueError, match="fast_layers must be on, off or one of compile, compile-reduce, compile-autotune, eager"):
        Decoder(model, engine, max_seqs=2, max_len=64, fast_layers="fastest")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="fast_layers: attention implementation 'flash_attention_2'"):
        Decoder(model, engine, max_seqs=2, max_len=64, fast_layers=True)
    monkeypatch.setenv("QOS_FAST_LAYERS", "1")  # from the environment: served the old way instead
    assert Decoder(model, engine, max_seqs=2, max_len=64).fast is None


def test_a_model_without_the_engine_is_not_supported(fresh):
    model, _ = fresh()
    assert "experts not served by the engine" in fl.unsupported(model, 64)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["compile", "compile-reduce"])
def test_cuda_graphs_of_fast_layers_equal_the_model_modules_through_plan_switches(mode):
    """Every bucket captured with fast layers inside; greedy tokens equal the model's modules run
    eagerly, at 4-bit experts, then 2-bit experts with 4-bit attention (re-captured), then 16 bits."""
    from placement.models import load_model

    loaded = load_model("tiny-random", device="cuda", dtype=torch.float32)
    model = loaded.model
    engine = Engine(model)
    engine.apply(build_plan(engine.spec, Knobs(quantized=16, bits=4)))
    prompts = [list(range(3 + i, 20 + 2 * i)) for i in range(16)]
    ref = Decoder(model, engine, max_seqs=16, max_len=128, graphs=False, fast_layers=False)
    fast = Decoder(model, engine, max_seqs=16, max_len=128, fast_layers=mode)
    assert fast.capture_all() == len(fast.buckets()) and fast.fast_reason is None
    for knobs in [None, Knobs(quantized=16, bits=2, attn_bits=4), Knobs()]:
        if knobs is not None:
            engine.apply(build_plan(engine.spec, knobs))
        for n in (1, 3, 16):
            want = [g.ids for g in ref.generate(prompts[:n], 40, fixed_length=True).sequences]
            got = fast.generate(prompts[:n], 40, fixed_length=True)
            assert fast.reason is None and fast.fast_reason is None  # graphs, with fast layers in them
            assert [g.ids for g in got.sequences] == want


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_layers_on_cuda_compute_the_model_modules_logits_in_fp32_and_stay_near_them_in_bf16():
    """fp32: the same logits as the model's modules (the math is the same). bf16: each path rounds in
    its own places, and a token whose router is near a tie can take another expert in one of them
    (seen on an H200: one row of four 16x further from fp32 than the modules' own rounding), so
    the check is on the typical row (median error against fp32 within 2x the modules') and a bound
    on the worst."""
    from placement.models import load_model

    def logits(dtype):
        loaded = load_model("tiny-random", device="cuda", dtype=dtype)
        engine = Engine(loaded.model)
        engine.apply(build_plan(engine.spec, Knobs()))
        ref, fast = pair(loaded.model, engine, "compile")
        for d in (ref, fast):
            prefill(d, PROMPTS)
        want, got = step_logits(ref, 4, 128).float(), step_logits(fast, 4, 128).float()
        assert fast.fast_reason is None
        return want, got

    truth, got = logits(torch.float32)
    torch.testing.assert_close(got, truth, rtol=1e-5, atol=1e-5)
    want, got = logits(torch.bfloat16)
    modules_err, fast_err = (want - truth).abs().amax(1), (got - truth).abs().amax(1)
    assert fast_err.median() <= 2 * modules_err.median()
    assert fast_err.max() <= 0.15 * truth.abs().max()


def test_a_failing_fast_step_falls_back_to_the_model_modules_once(fresh, monkeypatch, caplog):
    """A fast-layers step that raises (as a compile past dynamo's recompile limit did on the H200)
    turns fast layers off for that decoder with one warning; its steps go on, through the model's
    modules, with the same logits."""
    monkeypatch.setattr("placement.decode.FAST_FALLBACK", True)
    model, _ = fresh()
    engine = Engine(model)
    engine.apply(build_plan(engine.spec, Knobs()))
    ref, dec = pair(model, engine, "eager")
    for d in (ref, dec):
        prefill(d, PROMPTS[:2])

    def broken(*args, **kwargs):
        raise RuntimeError("Dynamo recompile limit exceeded\nmore lines")

    monkeypatch.setattr(dec.fast, "forward", broken)
    with caplog.at_level("WARNING", logger="placement.decode"):
        got = step_logits(dec, 2, 64)
    assert dec.fast is None and dec.fast_reason == "failed: RuntimeError"
    assert [r.getMessage().count("\n") for r in caplog.records] == [0]
    assert "recompile limit" in caplog.records[0].getMessage()
    torch.testing.assert_close(got, step_logits(ref, 2, 64))
