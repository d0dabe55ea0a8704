"""Quantized attention projections (placement/qlinear.py, Plan.attn_bits): the kernels against
dequantize-then-matmul in Triton's CPU interpreter, the plan knob (JSON, plan_id, bytes), the
engine's swap there and back, and the perplexity cost on the bundled reference model."""

import json
import types

import pytest
import torch

from catalog.data import DATASETS, data_dir
from catalog.knobs import Knobs
from placement import hqq_backend
from placement import qlinear as ql
from placement.engine import Engine
from placement.plan import Plan, build_plan
from placement.spec import ModelSpec

needs_triton = pytest.mark.skipif(ql.triton is None, reason="triton is not installed")
# the kernels run where the tensors are: on the GPU when there is one (Triton's interpreter takes CPU
# tensors only when no CUDA device is present, as in CI)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
interpreted = pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU model's kernels run in Triton's interpreter, "
                                 "which a CUDA machine does not use (the cuda tests below cover the GPU)")
HAVE_WIKI = (data_dir() / DATASETS["wikitext2"]).is_file()


def _matrix(N, K, bits, dtype, seed=0, group_size=64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * 0.05
    return ql.quantize_linear(W.to(dtype), bits, group_size, dtype, hqq_backend, device, on="cpu")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_is_hqqs_own(bits, dtype):
    layout, buf = _matrix(96, 256, bits, dtype)
    v = layout.views(buf)
    ref = hqq_backend.dequantize(v["weight.W_q"], v["weight.scale"], v["weight.zero"], bits=bits, group_size=64,
                                 shape=(96, 256), compute_dtype=dtype)
    assert torch.equal(ql.dequantize(layout, buf), ref)
    # codes at `bits` each, one scale and one zero per 64 weights, each field 64-byte aligned
    assert 0 <= buf.numel() - (96 * 256 * bits // 8 + 2 * 384 * dtype.itemsize) < 3 * 64


def _dequantize_fp32(layout, buf):
    """W in fp32 from the packed codes, scales and zeros (the kernels' math: no rounding of W to bf16)."""
    v = layout.views(buf)
    codes = v["weight.W_q"]
    if layout.bits == 4:
        codes = torch.cat([codes >> 4, codes & 15], dim=0)
    return ((codes.float() - v["weight.zero"].float()) * v["weight.scale"].float()).reshape(layout.matrices[0][1])


@needs_triton
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M", [1, 4, 64])
@pytest.mark.parametrize("path", ["int", "mma"])
def test_kernel_equals_dequantize_then_matmul(bits, M, path):
    # 96 rows: 48 byte rows at 4 bits, not a power of two, so row masks are exercised
    for dtype, split in ((torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, 2)):
        layout, buf = _matrix(96, 256, bits, dtype, seed=M, device=DEV)
        x = torch.randn(M, 256, generator=torch.Generator().manual_seed(M + 1)).to(dtype).to(DEV)
        want = (x.float().cpu() @ _dequantize_fp32(layout, buf).cpu().T).to(DEV)  # [M, 96], fp32 on the CPU
        got = ql.qlinear(x, buf, layout, path=path, split=split)
        assert got.shape == (M, 96) and got.dtype == dtype
        # fp32: summation order only (int: and the activations' int16 steps, 1/32767 of a group's
        # largest); bf16: the output's rounding (8 bits of mantissa)
        tol = (1e-4 if path == "int" else 1e-5) if dtype == torch.float32 else 2 ** -8
        assert (got.float() - want).abs().max() <= tol * want.abs().max(), (dtype, split)


@needs_triton
@pytest.mark.parametrize("bits", [8, 4])
def test_a_group_of_projections_is_one_launch_equal_to_each_module(bits):
    """QuantGroup (a layer's q, k, v): one kernel launch gives what the same kernel gives each matrix
    on its own (the integer one up to INT_MAX_TOKENS rows, tl.dot above); past KERNEL_MAX_TOKENS
    the modules dequantize; groups the kernels cannot take are refused."""
    dtype = torch.bfloat16
    mods = []
    for seed, n in enumerate((96, 32, 32)):  # q and the smaller k, v: blocks of three sizes in one grid
        layout, buf = _matrix(n, 256, bits, dtype, seed=seed, device=DEV)
        bias = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEV) if seed != 1 else None
        mods.append(ql.QuantLinear(layout, buf, bias))
    group = ql.QuantGroup.of(mods)
    assert group is not None and group.current(mods)
    launches = []
    real = ql.qlinear_many
    for M in (1, ql.INT_MAX_TOKENS, ql.INT_MAX_TOKENS + 1, ql.KERNEL_MAX_TOKENS + 1):
        x = torch.randn(1, M, 256, generator=torch.Generator().manual_seed(7)).to(dtype).to(DEV)
        try:
            ql.qlinear_many = lambda *a, **k: launches.append((a[0].shape[0], len(a[1]))) or real(*a, **k)
            got = group(x)
        finally:
            ql.qlinear_many = real
        path = "int" if M <= ql.INT_MAX_TOKENS else "mma"
        for g, m in zip(got, mods):
            assert g.shape == m(x).shape == (1, M, m.out_features)
            if M <= ql.KERNEL_MAX_TOKENS:  # the same kernel as for the matrix alone
                alone = ql.qlinear(x[0], m.packed, m.layout, path=path)
                alone = alone if m.bias is None else alone + m.bias
                torch.testing.assert_close(g[0], alone, rtol=0, atol=0)
            torch.testing.assert_close(g, m(x), rtol=2 ** -7, atol=2 ** -7 * m(x).abs().max().item())
    # one launch for all three up to KERNEL_MAX_TOKENS rows; beyond, each module dequantizes
    assert launches == [(1, 3), (ql.INT_MAX_TOKENS, 3), (ql.INT_MAX_TOKENS + 1, 3)]
    other, _ = _matrix(32, 128, bits, dtype, device=DEV)  # another K
    assert ql.QuantGroup.of([mods[0], ql.QuantLinear(other, _)]) is None
    assert ql.QuantGroup.of([mods[0], torch.nn.Linear(256, 32)]) is None
    mods[1].packed = mods[1].packed.clone()  # moved: the group no longer describes the modules
    assert not group.current(mods) and ql.QuantGroup.of(mods).current(mods)


@needs_triton
def test_quant_linear_module_takes_the_kernels_up_to_the_limit_and_dequantizes_beyond():
    layout, buf = _matrix(64, 128, 4, torch.float32, device=DEV)
    bias = torch.randn(64, device=DEV)
    mod = ql.QuantLinear(layout, buf, bias)
    assert mod.kernel_ok and mod.use_kernel
    w = ql.dequantize(layout, buf)
    for shape in ((1, 1, 128), (2, 3, 128), (1, ql.KERNEL_MAX_TOKENS + 1, 128)):
        x = torch.randn(shape, device=DEV)
        want = torch.nn.functional.linear(x.cpu(), w.cpu(), bias.cpu()).to(DEV)
        # (the integer kernel's activations are int16: 1/32767 of a group's largest)
        torch.testing.assert_close(mod(x), want, atol=1e-4 * want.abs().max().item(), rtol=0)
    calls = []
    real = ql.qlinear
    try:
        ql.qlinear = lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k)
        mod(torch.randn(1, ql.KERNEL_MAX_TOKENS, 128, device=DEV))
        mod(torch.randn(1, ql.KERNEL_MAX_TOKENS + 1, 128, device=DEV))  # prefill past the limit: dequantize + F.linear
        mod.use_kernel = False
        mod(torch.randn(1, 2, 128, device=DEV))
    finally:
        ql.qlinear = real
    assert calls == [ql.KERNEL_MAX_TOKENS]


def test_integer_kernel_blocks_come_per_gpu_from_the_tuned_file(tmp_path, monkeypatch):
    # the shipped file's H200 entry (python -m placement.qlinear --sweep --write) parses
    h200 = ql.int_blocks("NVIDIA H200")
    assert h200 != ql._INT_GPU and set(h200) == {8, 4}
    path = tmp_path / "kernel_blocks.json"
    path.write_text(json.dumps({"GPU A": {"4": [1, 2, 3, 4, 5, 6], "qlinear": {"4": [8, 1024, 4, 1], "8": [0, 1, 2, 3],
                                                                                 "2": [8, 1024, 4, 1]}}}))
    monkeypatch.setattr(ql, "TUNED_BLOCKS", path)
    assert ql.int_blocks("GPU A") == {**ql._INT_GPU, 4: (8, 1024, 4, 1)}  # (8-bit's zero rows and 2-bit: ignored)
    assert ql.int_blocks("GPU B") == ql._INT_GPU
    # K splits only until the programs fill the SMs `per_sm` deep: Mixtral's q/k/v at one token
    qkv = tuple(ql.linear_layout(n, 4096, 4, torch.bfloat16, 64) for n in (4096, 1024, 1024))
    assert ql._int_config(qkv, 1, False, 132, (8, 1024, 4, 1)) == (8, 1024, 4, 1)  # 384 programs
    assert ql._int_config(qkv, 1, False, 132, (16, 512, 4, 4)) == (16, 512, 4, 4)  # 192 x 4 >= 4 x 132
    assert ql._int_config(qkv[:1], 1, False, 132, (32, 2048, 4, 8))[3] == 2  # K = 2 chunks: no more


def test_bad_input_is_one_line_naming_the_problem():
    layout, buf = _matrix(64, 128, 8, torch.float32, device=DEV)
    zeros = lambda columns: torch.zeros(1, columns, device=DEV)  # noqa: E731
    checks = [
        (lambda: ql.qlinear(zeros(64), buf, layout), "x has 64 columns but the quantized matrix is 64x128"),
        (lambda: ql.qlinear(zeros(128), buf, layout, path="tiles"), "path='tiles' is not a kernel"),
        (lambda: ql.qlinear_many(zeros(128), [layout, ql.linear_layout(64, 128, 4, torch.float32, 64)],
                                 ql.field_table([(buf, layout)] * 2, DEV)), "must share K, bits, group size"),
        (lambda: ql.qlinear_many(zeros(128), [layout] * 4, ql.field_table([(buf, layout)] * 4, DEV)),
         "one to three matrices"),
        (lambda: ql.qlinear(zeros(128), buf, layout, split=3), "split=3 does not cut K=128"),
        (lambda: ql.linear_layout(64, 96, 4, torch.float32, 64), "group_size=64 does not divide the input dimension"),
        (lambda: ql.linear_layout(63, 128, 4, torch.float32, 64), "odd number of rows"),
        (lambda: ql.linear_layout(64, 128, 2, torch.float32, 64), "bits=2 is not a quantized linear precision"),
        (lambda: Knobs(attn_bits=2), "attn_bits=2 is not supported; choose one of 16, 8, 4"),
    ]
    if ql.triton is None:
        checks = checks[3:]
    for call, message in checks:
        with pytest.raises(ValueError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


# --- the plan knob ----------------------------------------------------------------------------------
SPEC = ModelSpec("mixtral", num_layers=2, num_experts=4, top_k=2, hidden=64, intermediate=128,
                 dtype=torch.bfloat16, nonexpert_bytes=100_000, attn_linears=((64, 64), (32, 64), (32, 64), (64, 64)) * 2)


def test_attn_bits_is_part_of_the_plan_its_json_its_id_and_its_bytes():
    p16, p8, p4 = (build_plan(SPEC, Knobs(quantized=3, bits=4, gpu_experts=6, attn_bits=b)) for b in (16, 8, 4))
    assert (p16.attn_bits, p8.attn_bits, p4.attn_bits) == (16, 8, 4)
    assert len({p16.plan_id, p8.plan_id, p4.plan_id}) == 3 and len({p16.precision_id, p4.precision_id}) == 2
    for p in (p16, p8, p4):
        assert Plan.from_json(p.to_json()) == p and Plan.from_json(p.to_json()).plan_id == p.plan_id
    # a plan from before the knob has no attn_bits: it loads as 16 with the same id
    assert "attn_bits" not in p16.to_dict()
    old = json.loads(p16.to_json())
    assert Plan.from_dict(old) == p16 and json.loads(p4.to_json())["attn_bits"] == 4
    # bytes: attention's 16-bit weights (2 layers of 64x64, 32x64, 32x64, 64x64) out, packed ones in
    attn16 = 2 * (64 * 64 + 32 * 64 * 2 + 64 * 64) * 2
    packed = sum(ql.linear_layout(n, k, 4, torch.bfloat16, 64).nbytes for n, k in SPEC.attn_linears)
    assert p16.gpu_bytes(SPEC) - p4.gpu_bytes(SPEC) == attn16 - packed > 0
    assert p4.gpu_bytes(SPEC) < p8.gpu_bytes(SPEC) < p16.gpu_bytes(SPEC)
    assert p4.summary(SPEC)["attn_bits"] == 4 and p4.summary(SPEC)["gpu_bytes"] == p4.gpu_bytes(SPEC)
    # under one accelerator budget, quantized attention leaves room for more experts
    budget = SPEC.nonexpert_bytes + 7 * p16.expert_nbytes(SPEC, 16) // 2  # 3.5 experts beside the rest
    more = [build_plan(SPEC, Knobs(gpu_budget=budget, offload="cpu", attn_bits=b)).gpu_experts for b in (16, 4)]
    assert more == [3, 4]


def test_attn_bits_is_checked_against_the_model():
    with pytest.raises(ValueError, match="attn_bits=3 is not supported"):
        Plan(build_plan(SPEC, Knobs()).states, attn_bits=3)
    bare = ModelSpec("mixtral", 2, 4, 2, 64, 128, torch.float32, nonexpert_bytes=1000)  # projections unknown
    with pytest.raises(ValueError, match="needs the model's attention projections"):
        build_plan(bare, Knobs(attn_bits=8))
    with pytest.raises(ValueError, match="group_size=128 does not divide the input dimension"):
        build_plan(SPEC, Knobs(attn_bits=4, group_size=128))
    assert build_plan(bare, Knobs()).gpu_bytes(bare) == 1000 + 8 * build_plan(bare, Knobs()).expert_nbytes(bare, 16)


# --- the engine -------------------------------------------------------------------------------------
def _counting_quantizer():
    calls = []

    def quantize(weight, bits, group_size, dtype, device, **kw):
        calls.append(tuple(weight.shape))
        return hqq_backend.quantize(weight, bits, group_size, dtype, device, **kw)

    return types.SimpleNamespace(quantize=quantize, dequantize=hqq_backend.dequantize), calls


def _close(a, b, rel):
    return ((a - b).norm() / b.norm()).item() <= rel


@needs_triton
@interpreted
@pytest.mark.parametrize("family", ["tiny-random", "tiny-random-qwen2_moe"])  # qwen2_moe: q, k, v with bias
def test_engine_swaps_attention_there_and_back_exactly(fresh, tokens, family):
    model, _ = fresh(family)
    quantizer, calls = _counting_quantizer()
    engine = Engine(model, quantizer=quantizer, use_kernels=True)  # kernels in Triton's interpreter
    spec = engine.spec
    p16 = build_plan(spec, Knobs())
    engine.apply(p16)
    sig16 = engine.kernel_signature
    with torch.no_grad():
        ref = model(tokens).logits  # [2, 24, V]: 48 rows per projection, inside the kernels' limit
    mem16 = engine.memory()
    assert mem16["gpu_bytes"] == p16.gpu_bytes(spec) and mem16["host_attn_bytes"] == 0

    for bits, rel in ((8, 0.01), (4, 0.2)):  # (random weights: 4 bits move logits by about 11%)
        plan = build_plan(spec, Knobs(attn_bits=bits))
        report = engine.apply(plan)
        assert report.attn_swapped == len(spec.attn_linears) and report.moves == 0
        attn = model.model.layers[0].self_attn
        assert isinstance(attn.q_proj, ql.QuantLinear) and attn.q_proj.bits == bits and attn.q_proj.kernel_ok
        assert engine.kernel_signature != sig16  # a decoder captures its graphs again
        with torch.no_grad():
            got = model(tokens).logits
        assert _close(got, ref, rel), ((got - ref).norm() / ref.norm()).item()
        assert engine.memory()["gpu_bytes"] == plan.gpu_bytes(spec) < mem16["gpu_bytes"]
        # on the host: the 16-bit projections set aside and the served precision's packed ones
        assert engine.memory()["host_bytes"] == plan.host_bytes(spec) == plan.attn_nbytes(spec, 16) + plan.attn_nbytes(spec)
        engine.configure(use_kernels=False)  # the dequantize path agrees with the kernels
        with torch.no_grad():
            eager = model(tokens).logits
        engine.configure(use_kernels=True)
        torch.testing.assert_close(eager, got, atol=1e-4, rtol=1e-4)

    quantized = len(calls)
    assert quantized == 2 * len(spec.attn_linears)  # once per projection and precision
    engine.apply(p16)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, ref)  # the model's own weights, bit for bit
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert engine.kernel_signature == sig16 and engine.memory()["gpu_bytes"] == mem16["gpu_bytes"]
    assert engine.apply(build_plan(spec, Knobs(attn_bits=4))).attn_swapped and len(calls) == quantized  # cached
    assert engine.apply(build_plan(spec, Knobs(attn_bits=4))).attn_swapped == 0  # nothing changed: no swap


@needs_triton
def test_a_plan_with_4bit_attention_decodes_close_to_16bit(fresh):
    from placement.decode import Decoder

    model, _ = fresh()
    engine = Engine(model, use_kernels=True)
    dec = Decoder(model, engine, max_seqs=2, max_len=64)
    prompt = list(range(3, 15))

    def run(plan):
        """Logits after the prompt and after three decode steps fed the same tokens, and a generation."""
        engine.apply(plan)
        dec.open(0)
        out = [dec.prefill_all(0, prompt).float()]  # [V]
        for i, tok in enumerate((5, 9, 200)):
            dec.feed(0, tok, len(prompt) + i)
            dec.step()
            out.append(dec.logits[0].clone())
        dec.close(0)
        return torch.stack(out), dec.generate([prompt], 6, fixed_length=True).sequences[0].ids

    logits16, _ = run(build_plan(engine.spec, Knobs(quantized=4, bits=4)))
    logits4, ids4 = run(build_plan(engine.spec, Knobs(quantized=4, bits=4, attn_bits=4)))
    assert len(ids4) == 6 and not torch.equal(logits4, logits16)
    for got, want in zip(logits4, logits16):
        assert _close(got, want, 0.2), ((got - want).norm() / want.norm()).item()


# --- the reference model's perplexity ---------------------------------------------------------------
@pytest.mark.skipif(not HAVE_WIKI, reason="WikiText-2 not found (set QOS_DATA_DIR)")
def test_reference_perplexity_at_8_and_4_bit_attention(capsys):
    from catalog.data import eval_text
    from placement.models import load_model
    from profiler.perplexity import eval_windows, perplexity

    loaded = load_model("reference", device="cpu")
    engine = Engine(loaded.model)
    windows, _ = eval_windows(loaded.tokenizer, "wikitext2", eval_text("wikitext2"), seqlen=512, max_windows=8)
    ppl = {}
    for bits in (16, 8, 4):
        engine.apply(build_plan(engine.spec, Knobs(attn_bits=bits)))
        ppl[bits] = perplexity(loaded.model, "wikitext2", windows, batch_size=8).ppl
    with capsys.disabled():
        print(f"\nreference, WikiText-2 (8 windows of 512): attention 16-bit {ppl[16]:.2f}, "
              f"8-bit {ppl[8]:.2f} ({ppl[8] / ppl[16] - 1:+.2%}), 4-bit {ppl[4]:.2f} ({ppl[4] / ppl[16] - 1:+.2%})")
    # measured: +0.03% and +0.86% (README: +0.0 and +0.2-0.4% on 64 windows); a broken quantizer or kernel breaks these
    assert ppl[8] != ppl[16] != ppl[4] and abs(ppl[8] / ppl[16] - 1) < 0.005 and abs(ppl[4] / ppl[16] - 1) < 0.03


# --- on the GPU (-m cuda) ---------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096)])  # Mixtral-8x7B's q/o and k/v
def test_compiled_kernels_equal_dequantize_then_matmul_on_cuda(bits, shape):
    N, K = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    W = (torch.randn(N, K, device="cuda", generator=g) * 0.02).bfloat16()
    layout, buf = ql.quantize_linear(W, bits, 64, torch.bfloat16, hqq_backend, "cuda")
    w32 = _dequantize_fp32(layout, buf)
    for M in (1, 4, 16, 64):
        x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
        want = x.float() @ w32.T
        for path in ("int", "mma", None):  # None: the configured path and K split
            if path == "int" and M > ql.INT_MAX_TOKENS:
                continue
            got = ql.qlinear(x, buf, layout, path=path)
            err = (got.float() - want).abs().max() / want.abs().max()
            assert got.dtype == torch.bfloat16 and err <= 2 ** -7, (M, path, err.item())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_graphs_are_captured_again_after_an_attention_swap():
    from placement.decode import Decoder
    from placement.models import load_model

    loaded = load_model("tiny-random", device="cuda", dtype=torch.bfloat16)
    engine = Engine(loaded.model)
    graphs = Decoder(loaded.model, engine, max_seqs=2, max_len=128)
    eager = Decoder(loaded.model, engine, max_seqs=2, max_len=128, graphs=False)
    prompt = list(range(3, 15))

    def steps(dec):
        dec.open(0)
        dec.prefill_all(0, prompt)
        out = []
        for i, tok in enumerate((5, 9, 200)):
            dec.feed(0, tok, len(prompt) + i)
            dec.step()
            out.append(dec.logits[0].clone())
        dec.close(0)
        return torch.stack(out)

    for bits in (16, 4, 8, 16):
        engine.apply(build_plan(engine.spec, Knobs(quantized=8, bits=4, attn_bits=bits)))
        got = steps(graphs)
        assert graphs.reason is None and graphs.graphs and graphs.signature == engine.kernel_signature
        torch.testing.assert_close(got, steps(eager), atol=2e-2, rtol=2e-2)  # a replay reads the new projections


def test_a_host_budget_counts_set_aside_attention_and_keeps_one_precision(fresh):
    """Quantized attention keeps the 16-bit projections (and packed ones) in host memory: the plan's
    host bytes count them, a host budget below them refuses the plan in one line, and under a
    budget only the served precision's packed projections are kept."""
    spec = Engine(fresh()[0]).spec
    a8, a4 = build_plan(spec, Knobs(attn_bits=8)), build_plan(spec, Knobs(attn_bits=4))
    with pytest.raises(ValueError, match="attention projections set aside for 4-bit"):
        Engine(fresh()[0], host_budget=a4.host_bytes(spec) - 1).apply(a4)
    engine = Engine(fresh()[0], host_budget=max(a8.host_bytes(spec), a4.host_bytes(spec)))
    for plan in (a8, a4):
        engine.apply(plan)
        assert engine.memory()["host_attn_bytes"] >= engine.memory()["host_bytes"] == plan.host_bytes(spec)
    engine.apply(build_plan(spec, Knobs()))
    assert engine.memory()["host_attn_bytes"] == engine.memory()["host_bytes"] == 0
