"""Quantized linear layers for the attention projections: y = x @ W.T (+ b), W [N, K] at 8 or 4 bits.

W is quantized by HQQ (hqq_backend.quantize, as the experts are) with asymmetric groups of
`group_size` values along K, and lives in one contiguous uint8 buffer laid out by packed.py's
machinery (`linear_layout`): the codes, then one scale and one zero per group in the model's dtype.
hqq packs the [G, group_size] code matrix (G = N*K/group_size groups, row n's groups n*K/gs ...) so
that, viewed as bytes [N/P, K] (P codes per byte): 8-bit byte [n, k] is W[n, k]; 4-bit byte [j, k]
holds W[j, k] in its high nibble and W[j + N/2, k] in its low one. One byte load feeds P rows.

Two Triton kernels, fp32 accumulation, both reading the packed buffer and dequantizing in registers
with the group-sum trick sum((q - z) * s * x) = s * (sum(q * x) - z * sum(x)) (scale and zero cost one
multiply per group, not per weight):
- `_rows_kernel`, for a few tokens (decode): grid (row block, token, K split), a matrix-vector
  product per token, as the expert slot kernels (kernels.py) do;
- `_mma_kernel`, for more tokens (continuous batching, prefill chunks): grid (token block, row
  block, K split), the codes of one group times a token block with tl.dot (transposed, rows x
  tokens, as the grouped expert kernels do), so W is read once per block of BLOCK_M tokens.
K splits add atomically into an fp32 output (zeroed); without a split the result is stored in the
output's dtype directly. Longer inputs (prefill past `KERNEL_MAX_TOKENS`, perplexity) dequantize W
and call F.linear: compute-bound there anyway. Without CUDA the kernels run in Triton's interpreter
(tests); without triton only the dequantize path runs.

`python -m placement.qlinear` times the kernels against F.linear on Mixtral-8x7B's projections (CUDA).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from placement.packed import QLINEAR_BITS, Layout, linear_layout, pack_linear

KERNEL_MAX_TOKENS = 64  # rows of x up to which the kernels run (the engine's decode/prefill-chunk limit)
ROWS_MAX_TOKENS = 4  # up to this many rows the matrix-vector kernel, above it the tl.dot one (see bench)

# Triton, its CPU interpreter and the helpers the expert kernels use (reductions that work in the
# interpreter, the code unpacking of kernels._fcodes, tl.dot with a per-group scale): shared.
from placement.kernels import (  # noqa: E402
    _FAST_CODES, _MAGIC_OFF, _TL_DTYPES, _codes4, _fcodes, _group_mma, _jit, _pow2_block, _put, _qdot,
    _rsum, _sm_count, available, tl, triton,
)


# --- the layout -----------------------------------------------------------------------------------
def dequantize(layout: Layout, buf: torch.Tensor) -> torch.Tensor:
    """W [N, K] in the layout's dtype from its packed buffer, as hqq's Quantizer.dequantize computes
    it ((q - zero) * scale in the compute dtype), in plain torch."""
    (_, (N, K)), = layout.matrices
    v = layout.views(buf)
    codes = v["weight.W_q"]  # [G/P, gs] uint8
    if layout.bits == 4:
        codes = torch.cat([codes >> 4, codes & 15], dim=0)  # [G, gs]: high nibbles are the first half
    w = (codes.to(layout.dtype) - v["weight.zero"]) * v["weight.scale"]
    return w.reshape(N, K)


def supports(layout: Layout) -> bool:
    """Whether the kernels run matrices of `layout` (else the dequantize path)."""
    (_, (N, K)), = layout.matrices
    gs = layout.group_size
    return (layout.bits in QLINEAR_BITS and _TL_DTYPES.get(layout.dtype) is not None and gs >= 16 and gs & (gs - 1) == 0
            and K % gs == 0 and N % (8 // layout.bits if layout.bits < 8 else 1) == 0)


# --- kernels ----------------------------------------------------------------------------------------
@_jit
def _rows_kernel(
    x_ptr, wq_ptr, scale_ptr, zero_ptr, out_ptr,
    N: tl.constexpr, K: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, FAST: tl.constexpr,
):
    """out[m, rows] (+)= x[m] @ W[rows].T for byte rows j of program_id(0)'s block (4-bit: W rows j
    and j + N/2), token m = program_id(1), K split program_id(2)."""
    P: tl.constexpr = 8 // BITS if BITS < 8 else 1
    R: tl.constexpr = N // P  # byte rows
    ROWG: tl.constexpr = K // GS  # groups per row
    NG: tl.constexpr = BLOCK_K // GS
    KS: tl.constexpr = K // SPLIT_K
    m = tl.program_id(1)
    j = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    jm = j < R
    rmask = jm[:, None]
    wmask = rmask[:, :, None]
    cols = tl.arange(0, NG)[:, None] * GS + tl.arange(0, GS)[None, :]  # [NG, GS]
    a0 = tl.full([BLOCK_N], 0.0, tl.float32)
    a1 = tl.full([BLOCK_N], 0.0, tl.float32)
    kstart = tl.program_id(2) * KS
    for k0 in range(kstart, kstart + KS, BLOCK_K):
        x = tl.load(x_ptr + m * K + k0 + cols).to(tl.float32)  # [NG, GS]
        xs = _rsum(x, 1)  # [NG]
        b = tl.load(wq_ptr + j[:, None, None] * K + k0 + cols[None, :, :], mask=wmask, other=0)  # uint8
        grp = j[:, None] * ROWG + k0 // GS + tl.arange(0, NG)[None, :]  # [BN, NG]
        if BITS == 8:
            a0 += _qdot(_fcodes(b, 8, FAST), x, xs, scale_ptr, zero_ptr, grp, rmask, BITS, FAST)
        else:  # byte [j, k] = W[j, k] << 4 | W[j + N/2, k]
            hi, lo = _fcodes(b, 4, FAST)
            a0 += _qdot(hi, x, xs, scale_ptr, zero_ptr, grp, rmask, BITS, FAST)
            a1 += _qdot(lo, x, xs, scale_ptr, zero_ptr, grp + R * ROWG, rmask, BITS, FAST)
    orow = out_ptr + m * N + j
    _put(orow, a0, jm, SPLIT_K > 1)
    if P == 2:
        _put(orow + R, a1, jm, SPLIT_K > 1)


@_jit
def _mma_kernel(
    x_ptr, wq_ptr, scale_ptr, zero_ptr, out_ptr, M,
    N: tl.constexpr, K: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr, FAST: tl.constexpr, OFF: tl.constexpr,
):
    """out[tokens, rows] (+)= x[tokens] @ W[rows].T for token block program_id(0), byte-row block
    program_id(1) (4-bit: W rows j and j + N/2), K split program_id(2); one group per K step. The
    product is computed transposed (rows x tokens): the unpacked weight tile is tl.dot's left operand."""
    P: tl.constexpr = 8 // BITS if BITS < 8 else 1
    R: tl.constexpr = N // P
    ROWG: tl.constexpr = K // GS
    KS: tl.constexpr = K // SPLIT_K
    t = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] tokens
    tm = t < M
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] byte rows
    jm = j < R
    kk = tl.arange(0, GS)
    a0 = tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32)
    a1 = tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32)
    kstart = tl.program_id(2) * KS
    for k0 in range(kstart, kstart + KS, GS):
        xt = tl.load(x_ptr + t[None, :] * K + k0 + kk[:, None], mask=tm[None, :], other=0.0).to(DOT)  # [GS, BM]
        xs = _rsum(xt.to(tl.float32), 0)  # [BM]
        b = tl.load(wq_ptr + j[:, None] * K + k0 + kk[None, :], mask=jm[:, None], other=0)  # [BN, GS] uint8
        grp = j * ROWG + k0 // GS  # [BN]
        if BITS == 8:
            a0 += _group_mma(b.to(DOT), xt, xs, scale_ptr, zero_ptr, grp, jm, 0.0, IEEE)
        else:
            hi, lo = _codes4(b, DOT, FAST)
            a0 += _group_mma(hi, xt, xs, scale_ptr, zero_ptr, grp, jm, OFF, IEEE)
            a1 += _group_mma(lo, xt, xs, scale_ptr, zero_ptr, grp + R * ROWG, jm, OFF, IEEE)
    orow = out_ptr + t[None, :] * N + j[:, None]  # [BN, BM]
    omask = jm[:, None] & tm[None, :]
    _put(orow, a0, omask, SPLIT_K > 1)
    if P == 2:
        _put(orow + R, a1, omask, SPLIT_K > 1)


# --- launch -----------------------------------------------------------------------------------------
# GPU blocks, first guesses after the expert kernels' H100/H200 tuning (few rows, long K chunks for
# the matrix-vector kernel; 64 rows, one warpgroup, for tl.dot): `python -m placement.qlinear` checks them.
_GPU = dict(rows_n={8: 8, 4: 16}, rows_k=1024, rows_warps=4, mma_n=64, mma_warps=4, mma_stages=3)


@functools.lru_cache(maxsize=4096)  # asked for on every call: prefill runs it per projection and layer
def _config(layout: Layout, M: int, path: str, interpret: bool, sms: int) -> dict:
    """Block sizes from shapes only (the grid never depends on data). K is split (atomic adds) up to
    16 ways until about 4 programs per SM could be busy; the interpreter takes the biggest blocks
    (each program is Python overhead)."""
    (_, (N, K)), = layout.matrices
    gs = layout.group_size
    R = N // (8 // layout.bits if layout.bits < 8 else 1)
    if path == "rows":
        bn = min(triton.next_power_of_2(R), 256) if interpret else _GPU["rows_n"][layout.bits]
        bk = max(_pow2_block(K, 1024 if interpret else _GPU["rows_k"]), gs)
        programs = triton.cdiv(R, bn) * M
        chunk = bk
    else:
        bm = 16 if M <= 16 or interpret else 32
        bn = min(triton.next_power_of_2(R), 256) if interpret else _GPU["mma_n"]
        programs = triton.cdiv(R, bn) * triton.cdiv(M, bm)
        chunk = gs
    split = 1
    while not interpret and programs * split < 4 * sms and split < 16 and K % (chunk * split * 2) == 0:
        split *= 2
    cfg = dict(bn=bn, split=split)
    if path == "rows":
        cfg["bk"] = bk
    else:
        cfg["bm"] = bm
    return cfg


def qlinear(x: torch.Tensor, buf: torch.Tensor, layout: Layout, *, path: str | None = None,
            out_dtype: torch.dtype | None = None, split: int | None = None, views: dict | None = None) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N] for W packed in `buf` (uint8, `layout`), through the kernels. `path`:
    "rows" (matrix-vector per token) or "mma" (tl.dot over token blocks); default by M (ROWS_MAX_TOKENS).
    `out_dtype`: of the result (default x's). `split`: K splits instead of the configured ones (tests:
    the interpreter never splits by itself). `views`: layout.views(buf), if the caller keeps them. No
    host syncs; the grid depends on shapes only."""
    (_, (N, K)), = layout.matrices
    M, k_in = x.shape
    if k_in != K:
        raise ValueError(f"x has {k_in} columns but the quantized matrix is {N}x{K}")
    if not supports(layout):
        raise ValueError(f"no kernel for a {N}x{K} matrix at {layout.bits} bits, group size {layout.group_size}, "
                         f"{layout.dtype}")
    if path is None:
        path = "rows" if M <= ROWS_MAX_TOKENS else "mma"
    if path not in ("rows", "mma"):
        raise ValueError(f"path={path!r} is not a kernel; choose rows or mma")
    out_dtype = out_dtype or x.dtype
    if M == 0:
        return torch.empty(0, N, dtype=out_dtype, device=x.device)
    on_gpu = x.device.type == "cuda"
    cfg = dict(_config(layout, M, path, not on_gpu, _sm_count(x.device.index or 0) if on_gpu else 132))
    v = layout.views(buf) if views is None else views
    wq, scale, zero = v["weight.W_q"], v["weight.scale"], v["weight.zero"]
    x = x.contiguous()
    if split is not None:
        if split < 1 or K % (layout.group_size * split):
            raise ValueError(f"split={split} does not cut K={K} into whole groups of {layout.group_size}")
        if path == "rows":  # a chunk holds whole groups and fits in one split
            cfg["bk"] = math.gcd(cfg["bk"], K // split)
    split = cfg["split"] if split is None else split
    # A K split adds atomically: an fp32 output of zeros, cast afterwards. Without one the kernel
    # stores in the output's dtype (rounding to nearest), except in the interpreter, whose store to
    # bf16 truncates: fp32 there, rounded by torch.
    if split > 1:
        out = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(M, N, dtype=out_dtype if on_gpu else torch.float32, device=x.device)
    R = N // (8 // layout.bits if layout.bits < 8 else 1)
    common = dict(N=N, K=K, BITS=layout.bits, GS=layout.group_size, BLOCK_N=cfg["bn"], SPLIT_K=split)
    if path == "rows":
        launch = {"num_warps": _GPU["rows_warps"]} if on_gpu else {}
        fast = _FAST_CODES[layout.bits] if on_gpu else 0  # codes unpacked by inline PTX (kernels._fcodes)
        _rows_kernel[(triton.cdiv(R, cfg["bn"]), M, split)](x, wq, scale, zero, out, BLOCK_K=cfg["bk"], FAST=fast,
                                                             **common, **launch)
    else:
        dot = _TL_DTYPES[layout.dtype] if on_gpu else tl.float32  # (the interpreter's dot: fp32)
        launch = {"num_warps": _GPU["mma_warps"], "num_stages": _GPU["mma_stages"]} if on_gpu else {}
        fast = on_gpu and dot == tl.bfloat16 and layout.bits == 4  # bf16 codes by inline PTX (kernels._codes4)
        _mma_kernel[(triton.cdiv(M, cfg["bm"]), triton.cdiv(R, cfg["bn"]), split)](
            x, wq, scale, zero, out, M, BLOCK_M=cfg["bm"], DOT=dot, IEEE=dot == tl.float32, FAST=fast,
            OFF=_MAGIC_OFF if fast else 0.0, **common, **launch)
    return out if out.dtype == out_dtype else out.to(out_dtype)


# --- the module -------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """Drop-in for an nn.Linear whose weight is packed at 8 or 4 bits in one buffer.

    Up to KERNEL_MAX_TOKENS rows (decode, prefill chunks) run through the kernels when `use_kernel`
    is on and the layout has a kernel; longer inputs, or without kernels, dequantize W and call
    F.linear. Nothing syncs with the host either way, so a decode step with it can be a CUDA graph."""

    def __init__(self, layout: Layout, buf: torch.Tensor, bias: torch.Tensor | None = None, *,
                 use_kernel: bool = True):
        super().__init__()
        (_, (self.out_features, self.in_features)), = layout.matrices
        assert buf.dtype == torch.uint8 and buf.numel() == layout.nbytes, (buf.dtype, buf.numel(), layout.nbytes)
        self.layout = layout
        self.register_buffer("packed", buf, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.kernel_ok = supports(layout) and available(buf.device)
        self.use_kernel = use_kernel
        self._views: tuple[int, dict] | None = None  # (data_ptr, views of `packed`): made once per place

    def views(self) -> dict:
        if self._views is None or self._views[0] != self.packed.data_ptr():  # (moved since)
            self._views = (self.packed.data_ptr(), self.layout.views(self.packed))
        return self._views[1]

    @property
    def bits(self) -> int:
        return self.layout.bits

    def weight_dequantized(self) -> torch.Tensor:
        return dequantize(self.layout, self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if self.use_kernel and self.kernel_ok and x2.shape[0] <= KERNEL_MAX_TOKENS:
            y = qlinear(x2, self.packed, self.layout, views=self.views())
        else:
            y = F.linear(x2, self.weight_dequantized())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.layout.group_size}, bias={self.bias is not None}")


def quantize_linear(weight: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype, quantizer, device,
                    *, on=None) -> tuple[Layout, torch.Tensor]:
    """(layout, packed buffer on `device`) of `weight` [N, K] quantized by `quantizer` (hqq_backend or a
    stand-in with its quantize signature), computed on `on` (default: `device`)."""
    N, K = weight.shape
    layout = linear_layout(N, K, bits, dtype, group_size)
    on = device if on is None else on
    buf = pack_linear(layout, quantizer.quantize(weight, bits, group_size, dtype, on), on)
    return layout, buf.to(device)


# --- benchmark (GPU) --------------------------------------------------------------------------------
def random_packed(layout: Layout, device, generator=None) -> torch.Tensor:
    """A buffer of `layout` with random codes, small scales and mid-range zeros: the bytes and the
    compute of a quantized real matrix."""
    buf = torch.randint(0, 256, (layout.nbytes,), dtype=torch.uint8, device=device, generator=generator)
    v = layout.views(buf)
    v["weight.scale"].copy_(torch.rand(v["weight.scale"].shape, device=device, generator=generator) * 0.01 + 0.005)
    v["weight.zero"].fill_(2 ** (layout.bits - 1) - 0.5)
    return buf


# Mixtral-8x7B's attention projections (hidden 4096, 8 KV heads of 128): q and o, then k and v
BENCH_SHAPES = ((4096, 4096), (1024, 4096))
BENCH_TOKENS = (1, 4, 16, 64)


def bench(shapes=BENCH_SHAPES, tokens=BENCH_TOKENS, group_size: int = 64, iters: int = 200,
          dtype=torch.bfloat16, csv_path: str | None = None) -> list[dict]:
    """Time each [N, K] projection at 16 bits (F.linear), and at 8 and 4 bits through qlinear's
    two kernels and the dequantize-then-F.linear path, for M tokens in `tokens`. Prints a table
    (GB/s: the matrix's bytes over the time, as if read once) and returns it, also written to
    `csv_path` if given. Each variant cycles through enough copies to exceed twice the L2 cache, so
    every call reads its weights from HBM, as at decode."""
    from placement.kernels import gpu_time_ms, write_rows  # (the expert kernels' timer: one CUDA graph of `iters` calls)

    dev = torch.device("cuda")
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []

    def record(name, N, K, bits, M, nbytes, fn):
        ms = gpu_time_ms(fn, iters)
        rows.append(dict(path=name, n=N, k=K, bits=bits, tokens=M, mb=nbytes / 1e6, ms=ms, gbps=nbytes / ms / 1e6))

    for N, K in shapes:
        for M in tokens:
            x = torch.randn(M, K, device=dev, dtype=dtype, generator=gen)
            nbytes = N * K * dtype.itemsize
            copies = max(2, -(-2 * l2 // nbytes) + 1)
            ws = [torch.randn(N, K, device=dev, dtype=dtype, generator=gen) * 0.02 for _ in range(copies)]
            it = iter(range(1 << 62))  # each call (captured ones too) takes the next copy
            record("F.linear", N, K, 16, M, nbytes, lambda: F.linear(x, ws[next(it) % copies]))
            del ws
            for bits in QLINEAR_BITS:
                layout = linear_layout(N, K, bits, dtype, group_size)
                copies = max(2, -(-2 * l2 // layout.nbytes) + 1)
                bufs = [random_packed(layout, dev, gen) for _ in range(copies)]
                for path in ("rows", "mma"):
                    record(f"qlinear {path}", N, K, bits, M, layout.nbytes,
                           lambda: qlinear(x, bufs[next(it) % copies], layout, path=path))
                record("dequantize+F.linear", N, K, bits, M, layout.nbytes,
                       lambda: F.linear(x, dequantize(layout, bufs[next(it) % copies])))
                del bufs
            torch.cuda.empty_cache()
    print(f"attention projections, gs={group_size} {dtype}, {torch.cuda.get_device_name(dev)}")
    print(f"{'path':22s} {'N':>5s} {'K':>5s} {'bits':>4s} {'tokens':>6s} {'MB':>7s} {'ms':>8s} {'GB/s':>7s}")
    for r in rows:
        print(f"{r['path']:22s} {r['n']:5d} {r['k']:5d} {r['bits']:4d} {r['tokens']:6d} {r['mb']:7.2f} "
              f"{r['ms']:8.4f} {r['gbps']:7.0f}")
    if csv_path:
        write_rows(rows, csv_path)
    return rows


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m placement.qlinear",
                                     description="Time the quantized attention-projection kernels against F.linear (CUDA).")
    parser.add_argument("--csv", metavar="PATH", help="also write the table to PATH")
    parser.add_argument("--iters", type=int, default=200, help="calls timed per row (default 200)")
    parser.add_argument("--tokens", default=",".join(map(str, BENCH_TOKENS)), metavar="M,M,...",
                        help="rows of x to time (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        tokens = tuple(int(t) for t in args.tokens.split(","))
    except ValueError:
        parser.error(f"--tokens {args.tokens!r} is not a comma-separated list of integers")
    if not torch.cuda.is_available():
        raise SystemExit("python -m placement.qlinear times the kernels on a CUDA GPU; this machine has none")
    bench(tokens=tokens, iters=args.iters, csv_path=args.csv)


if __name__ == "__main__":
    main()
