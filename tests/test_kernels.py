"""The fused expert kernels against the eager reference (hqq's own dequantization), on hqq's real
packed output, so a wrong reading of its bit packing fails here.

Without CUDA the kernels run in Triton's CPU interpreter, asked for before triton is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from placement import hqq_backend, kernels  # noqa: E402
from placement.experts import expert_forward  # noqa: E402
from placement.packed import expert_layout, pack  # noqa: E402

pytestmark = pytest.mark.skipif(not kernels.available("cuda" if torch.cuda.is_available() else "cpu"),
                                reason="needs triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_expert(hidden, inter, bits, dtype, gs, seed, device="cpu", optimize=True):
    """A packed buffer of a random expert, quantized by hqq (bits < 16)."""
    g = torch.Generator().manual_seed(seed)
    layout = expert_layout(hidden, inter, bits, dtype, gs)
    tensors = {}
    for name, shape in layout.matrices:
        w = torch.randn(shape, generator=g) / shape[1] ** 0.5
        if bits == 16:
            tensors[name] = w.to(dtype)
        else:
            q = hqq_backend.quantize(w.to(device), bits, gs, dtype, device, optimize=optimize)
            tensors.update({f"{name}.{k}": v.cpu() for k, v in q.items()})
    return layout, pack(layout, tensors).to(device)


def reference(layout, buf, x):
    return expert_forward(layout, layout.views(buf), x, F.silu, hqq_backend.dequantize).float()


@pytest.mark.parametrize("bits", [16, 8, 4, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slots_match_the_eager_expert(bits, dtype):
    # (H, I, gs) differ by dtype so both group sizes and a row count that is not a multiple of the
    # row block (I = 192 at 2-bit: 96 rows per program family) are covered
    hidden, inter, gs = (64, 256, 32) if dtype == torch.float32 else (128, 192, 64)
    experts = [make_expert(hidden, inter, bits, dtype, gs, seed) for seed in range(3)]
    layout = experts[0][0]
    assert kernels.supports(layout, nn.SiLU())
    T, k = 3, 2
    x = torch.randn(T, hidden, generator=torch.Generator().manual_seed(7)).to(dtype).to(DEVICE)
    bufs = [b.to(DEVICE) for _, b in experts]
    # slot s is (token s // k, choice s % k); slot 3 is empty, slots 0 and 4 share expert 0
    routed = [0, 1, 2, None, 0, 1]
    table = kernels.expert_table([None if e is None else bufs[e] for e in routed])
    weights = torch.tensor([0.7, 0.3, 0.9, 0.5, 0.25, 0.75], device=DEVICE)
    tokens = torch.arange(T, device=DEVICE).repeat_interleave(k)
    out = torch.full((T, hidden), 0.5, device=DEVICE)  # accumulates into what is there
    got = kernels.moe_experts(x, table, weights.to(dtype), layout, slot_token=tokens, out=out)
    assert got is out

    expected = torch.full((T, hidden), 0.5, device=DEVICE)
    for s, e in enumerate(routed):
        if e is not None:
            t = s // k
            expected[t] += weights[s] * reference(layout, bufs[e], x[t : t + 1])[0]
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, expected, **tol)


def test_default_slots_are_the_tokens_and_out_starts_at_zero():
    layout, buf = make_expert(64, 128, 4, torch.float32, 64, seed=1)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    dev_buf = buf.to(DEVICE)  # kept alive: the table holds only its address
    got = kernels.moe_experts(x.to(DEVICE), kernels.expert_table([dev_buf] * 2),
                              torch.ones(2, device=DEVICE), layout)
    torch.testing.assert_close(got.cpu(), reference(layout, buf, x), rtol=1e-4, atol=1e-4)


def test_supports_only_the_packings_and_activation_it_implements():
    silu = nn.SiLU()
    for bits in (16, 8, 4, 2):
        assert kernels.supports(expert_layout(64, 128, bits, torch.bfloat16, 64), silu)
    assert kernels.supports(expert_layout(64, 128, 4, torch.bfloat16, 64), F.silu)
    assert not kernels.supports(expert_layout(64, 128, 3, torch.bfloat16, 64), silu)
    assert not kernels.supports(expert_layout(64, 128, 4, torch.bfloat16, 64), nn.GELU())
    assert not kernels.supports(expert_layout(64, 96, 4, torch.bfloat16, 64), silu)  # I % gs


def test_expert_table_holds_addresses_and_zero_for_none():
    a, b = torch.zeros(64, dtype=torch.uint8), torch.zeros(64, dtype=torch.uint8)
    table = kernels.expert_table([a, None, b])
    assert table.dtype == torch.int64 and table.tolist() == [a.data_ptr(), 0, b.data_ptr()]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixtral_size_4bit_expert_on_cuda():
    layout, buf = make_expert(4096, 14336, 4, torch.bfloat16, 64, seed=0, device="cuda", optimize=False)
    x = torch.randn(2, 4096, device="cuda").to(torch.bfloat16)
    got = kernels.moe_experts(x, kernels.expert_table([buf, buf]), torch.ones(2, device="cuda"), layout)
    torch.testing.assert_close(got, reference(layout, buf, x), rtol=2e-2, atol=2e-2)
