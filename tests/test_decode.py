"""Decode paths: the batched slot decoder against transformers (every family, tier and precision),
sequences joining and leaving, several slots prefilled in one forward, sampling, speculative
prefetch, and the fused-kernel path of the engine (run on the CPU through Triton's interpreter)."""

import pytest
import torch

from placement import kernels
from placement.engine import Engine
from placement.models import load_model
from catalog.knobs import Knobs
from placement.plan import build_plan
from catalog.data import calibration_text
from placement.decode import Decoder, Sampling
from tests.conftest import FAMILIES


def hf_greedy(model, prompt, n):
    """Stock transformers greedy generation of exactly n tokens: the reference."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


PROMPTS = [list(range(5, 25)), list(range(30, 37)), list(range(100, 141)), [7]]


CASES = [(f, Knobs()) for f in FAMILIES] + [("tiny-random", Knobs(gpu_experts=4, cache_slots=4)),
                                             ("tiny-random", Knobs(gpu_experts=4, offload="cpu")),
                                             ("tiny-random", Knobs(quantized=16, bits=4))]


@pytest.mark.parametrize("family,knobs", CASES,
                         ids=[*(f"{f}-16-bit" for f in FAMILIES), "fetch", "cpu-tier", "4-bit"])
def test_batched_decoder_matches_transformers_generate_token_for_token(fresh, family, knobs):
    model, _ = fresh(family)
    engine = Engine(model)
    engine.apply(build_plan(engine.spec, knobs))
    expected = [hf_greedy(model, p, 12) for p in PROMPTS]
    decoder = Decoder(model, engine, max_seqs=4, max_len=64)
    for _ in range(2):  # slots are reused between calls
        run = decoder.generate(PROMPTS, 12, fixed_length=True)
        assert [g.ids for g in run.sequences] == expected
        assert run.steps == 11 and run.decode_tokens == 4 * 11 and run.decode_tok_s > 0
        assert all(g.ttft_s > 0 and g.decode_tok_s > 0 and g.finish_reason == "length" for g in run.sequences)
    assert decoder.reason == "no CUDA device" and decoder.capture_all() == 0
    with pytest.raises(ValueError, match="exceed the cache"):
        decoder.generate([PROMPTS[0]], 44)
    with pytest.raises(ValueError, match="give 1 to 4 prompts"):
        decoder.generate(PROMPTS + [[1]], 4)


def test_decode_buckets_cover_every_batch_and_length_a_step_can_take(fresh):
    model, _ = fresh()
    engine = Engine(model)
    decoder = Decoder(model, engine, max_seqs=6, max_len=200)
    assert decoder.buckets() == [(b, n) for b in (1, 2, 4, 6) for n in (64, 128, 200)]


def test_sequences_join_and_leave_between_steps_and_chunked_prefill_changes_nothing(fresh):
    """Sequences start at different steps, in free slots left by finished ones, and long prompts
    are prefilled in chunks: every sequence still equals running it alone."""
    model, _ = fresh()
    engine = Engine(model)
    engine.apply(build_plan(engine.spec, Knobs()))
    expected = {i: hf_greedy(model, p, 10) for i, p in enumerate(PROMPTS)}
    decoder = Decoder(model, engine, max_seqs=2, max_len=64)
    pending, got, slot_of = list(enumerate(PROMPTS)), {}, {}
    while pending or decoder.decoding:
        for slot in decoder.free_slots():
            if not pending:
                break
            i, p = pending.pop(0)
            decoder.open(slot)
            for start in range(0, len(p), 8):  # chunks of 8 tokens
                logits = decoder.prefill(slot, p[start:start + 8], start)
            first = int(decoder.sample(slot, logits))
            got[i], slot_of[slot] = [first], i
            decoder.feed(slot, first, len(p))
        for slot, tok in decoder.step().items():
            i = slot_of[slot]
            got[i].append(tok)
            if len(got[i]) == 10:
                decoder.close(slot)
    assert got == expected


def test_sampling_is_reproducible_by_seed_and_a_tiny_nucleus_is_greedy(fresh):
    model, _ = fresh()
    engine = Engine(model)
    engine.apply(build_plan(engine.spec, Knobs()))
    decoder = Decoder(model, engine, max_seqs=4, max_len=64)
    hot = Sampling(temperature=1.5, seed=3)

    def ids(sampling, prompts=PROMPTS[:2]):
        return [g.ids for g in decoder.generate(prompts, 10, sampling=sampling, fixed_length=True).sequences]

    first = ids(hot)
    assert first == ids(hot)  # same seed, same tokens
    assert first != ids(Sampling(temperature=1.5, seed=4))
    assert first[0] == ids(hot, PROMPTS[:1])[0]  # a sequence's draws are its own, whatever the batch
    greedy = ids(Sampling())
    assert first != greedy
    assert ids(Sampling(temperature=1.0, top_p=1e-6, seed=5)) == greedy
    for bad, match in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                       (dict(temperature=float("nan")), "temperature"), (dict(seed=-2), "seed")]:
        with pytest.raises(ValueError, match=match):
            Sampling(**bad)


def test_generation_stops_at_end_of_sequence_unless_fixed_length(fresh):
    model, _ = fresh()
    engine = Engine(model)
    engine.apply(build_plan(engine.spec, Knobs()))
    decoder = Decoder(model, engine, max_seqs=2, max_len=64)
    full = decoder.generate(PROMPTS[:2], 10, fixed_length=True).sequences
    eos = full[0].ids[3]
    run = decoder.generate(PROMPTS[:2], 10, eos_token_id=eos)
    cut = full[0].ids.index(eos) + 1
    assert run.sequences[0].ids == full[0].ids[:cut] and run.sequences[0].finish_reason == "stop"
    other = full[1].ids[: full[1].ids.index(eos) + 1] if eos in full[1].ids else full[1].ids
    assert run.sequences[1].ids == other


def test_transformers_baseline_timer_warms_up_at_its_own_length(fresh):
    import warnings

    from experiments.baselines import timed_generate

    model, _ = fresh()
    asked, generate = [], model.generate

    def spy(input_ids, **kwargs):
        asked.append((kwargs.get("min_new_tokens"), kwargs["max_new_tokens"]))
        return generate(input_ids, **kwargs)

    model.generate = spy
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen = timed_generate(model, [5, 6, 7], 6, fixed_length=True, warmup_tokens=2, eos_token_id=3)
    assert not [w for w in caught if "Unfeasible length" in str(w.message)]
    assert asked == [(2, 2), (6, 6)] and gen.new_tokens == 6


def test_prefetch_guesses_the_next_layers_experts_and_changes_no_output():
    loaded = load_model("reference")
    engine = Engine(loaded.model)
    ids = loaded.tokenizer.encode(calibration_text())[:24]
    decoder = Decoder(loaded.model, engine, max_seqs=1, max_len=64)
    runs = {}
    for prefetch in (False, True):  # every expert fetched through 2k slots
        plan = build_plan(engine.spec, Knobs(gpu_experts=0, prefetch=prefetch))
        assert plan.prefetch == prefetch
        engine.apply(plan)
        run = decoder.generate([ids], 32, fixed_length=True)
        runs[prefetch] = (run.sequences[0].ids, run.stats)
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
    decoder = Decoder(model, engine, max_seqs=1, max_len=32)
    expected = decoder.generate([prompt], 6, fixed_length=True).sequences[0].ids
    engine.configure(use_kernels=True)
    assert any(engine.layer_eager) and not engine.capturable
    run = decoder.generate([prompt], 6, fixed_length=True)
    assert run.sequences[0].ids == expected
    assert run.stats["kernel_layers"] == 5 * engine.spec.num_layers
    assert run.stats["fetch_hits"] + run.stats["fetch_misses"] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_of_several_slots_in_one_forward_equals_prefilling_each_alone(fresh, family):
    """prefill_many packs chunks of several sequences (any slots, any starts) into one forward:
    the same logits, the same cache and the same greedy tokens as prefilling each by itself."""
    model, _ = fresh(family)
    engine = Engine(model)
    engine.apply(build_plan(engine.spec, Knobs()))
    alone, packed = (Decoder(model, engine, max_seqs=4, max_len=96) for _ in range(2))
    slots = [3, 0, 2, 1]  # packed in another order than the slots
    expected = torch.stack([alone.prefill(i, p) for i, p in enumerate(PROMPTS)])
    cut = [len(p) // 2 for p in PROMPTS]  # halves: the second chunks start mid-prompt (one starts at 0)
    first = packed.prefill_many([(s, p[:c], 0) for s, p, c in zip(slots, PROMPTS, cut) if c])
    assert first.shape == (3, expected.shape[1])
    rest = packed.prefill_many([(s, p[c:], c) for s, p, c in zip(slots, PROMPTS, cut)])
    torch.testing.assert_close(rest, expected, rtol=1e-4, atol=1e-5)
    for layer in alone.cache.k:
        for i, (s, p) in enumerate(zip(slots, PROMPTS)):
            torch.testing.assert_close(packed.cache.k[layer][s, :, :len(p)], alone.cache.k[layer][i, :, :len(p)])
            torch.testing.assert_close(packed.cache.v[layer][s, :, :len(p)], alone.cache.v[layer][i, :, :len(p)])
    # decoding on from the packed prefill: the tokens of each sequence alone
    got = {}
    for s, p, logits in zip(slots, PROMPTS, rest):
        packed.open(s)
        got[s] = [int(packed.sample(s, logits))]
        packed.feed(s, got[s][0], len(p))
    for _ in range(7):
        for s, tok in packed.step().items():
            got[s].append(tok)
    assert [got[s] for s in slots] == [hf_greedy(model, p, 8) for p in PROMPTS]
    split = Decoder(model, engine, max_seqs=4, max_len=96)
    split.PACKED_MAX = 80 * 64  # too small for all four at once: several forwards, the same logits
    torch.testing.assert_close(split.prefill_many([(s, p, 0) for s, p in zip(slots, PROMPTS)]), expected,
                               rtol=1e-4, atol=1e-5)
    for bad, match in [([(0, [1], 0), (0, [2], 1)], "appears twice"), ([(0, [], 0), (1, [2], 0)], "do not fit"),
                       ([(0, [1] * 96, 0), (1, [2], 0)], "do not fit"), ([], "at least one")]:
        with pytest.raises(ValueError, match=match):
            packed.prefill_many(bad)


def test_first_tokens_of_several_slots_are_sampled_with_one_sync_as_each_alone(fresh):
    model, _ = fresh()
    engine = Engine(model)
    engine.apply(build_plan(engine.spec, Knobs()))
    logits = torch.randn(3, 512, generator=torch.Generator().manual_seed(0))
    kinds = [Sampling(), Sampling(temperature=1.5, seed=3), Sampling(temperature=0.8, top_p=0.9, seed=4)]
    together, alone = (Decoder(model, engine, max_seqs=3, max_len=32) for _ in range(2))
    for dec in (together, alone):
        for s, kind in enumerate(kinds):
            dec.open(s, kind)
    assert together.sample_many([0, 1, 2], logits) == [int(alone.sample(s, logits[s])) for s in range(3)]
    assert together.sample_many([], logits[:0]) == []
    assert together.sample_many([0], logits[:1]) == [int(logits[0].argmax())]


def test_quantized_prefill_forwards_stay_within_the_fused_kernels_limit(fresh):
    from placement.engine import QUANTIZED_KERNEL_MAX_TOKENS

    model, _ = fresh()
    engine = Engine(model, use_kernels=False)
    decoder = Decoder(model, engine, max_seqs=4, max_len=64)
    engine.apply(build_plan(engine.spec, Knobs()))
    assert decoder.prefill_chunk == 64 * 4  # 16-bit: any forward the scheduler's budget allows
    engine.apply(build_plan(engine.spec, Knobs(quantized=16, bits=4)))
    assert decoder.prefill_chunk == 64 * 4  # quantized, but no fused kernels: dequantized whole anyway
    engine.kernel_tables.enabled = True  # (as on a GPU; nothing runs here)
    assert decoder.prefill_chunk == QUANTIZED_KERNEL_MAX_TOKENS
    decoder.quantized_prefill_rows = 512
    assert decoder.prefill_chunk == 512


def test_pack_chunks_fills_each_forward_and_carries_an_overflowing_chunk_into_the_next():
    from placement.decode import pack_chunks

    assert pack_chunks([("a", 0, 5), ("b", 2, 9), ("c", 0, 1)], 4) == [
        [("a", 0, 4)], [("a", 4, 5), ("b", 2, 5)], [("b", 5, 9)], [("c", 0, 1)]]
    assert pack_chunks([("a", 0, 3)], 8) == [[("a", 0, 3)]] and pack_chunks([], 8) == []


def test_generate_prefills_its_prompts_together_as_the_server_does(fresh, monkeypatch):
    """generate() packs its prompts into forwards of prefill_chunk rows (what `qos profile` times
    is what a server's burst does), and each sequence's tokens are those of generating it alone."""
    model, _ = fresh()
    engine = Engine(model)
    engine.apply(build_plan(engine.spec, Knobs()))
    decoder = Decoder(model, engine, max_seqs=4, max_len=64)
    alone = [decoder.generate([p], 6, fixed_length=True).sequences[0].ids for p in PROMPTS]
    forwards, prefill_many = [], decoder.prefill_many

    def counted(chunks):
        forwards.append([(slot, len(ids)) for slot, ids, _ in chunks])
        return prefill_many(chunks)

    monkeypatch.setattr(decoder, "prefill_many", counted)
    monkeypatch.setattr(Decoder, "prefill_chunk", property(lambda self: 8))
    run = decoder.generate(PROMPTS, 6, fixed_length=True)
    assert [g.ids for g in run.sequences] == alone
    total = sum(map(len, PROMPTS))
    assert [sum(n for _, n in f) for f in forwards] == [8] * (total // 8) + ([total % 8] if total % 8 else [])
    assert max(len(f) for f in forwards) > 1  # several prompts in one forward
    # a prompt's first token comes with the forward that completes it, not after every other prompt's
    assert run.sequences[0].ttft_s < run.sequences[-1].ttft_s
