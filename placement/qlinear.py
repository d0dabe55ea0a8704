"""Quantized linear layers for the attention projections: y = x @ W.T (+ b), W [N, K] at 8 or 4 bits.

W is quantized by HQQ (hqq_backend.quantize, as the experts are) with asymmetric groups of
`group_size` values along K, and lives in one contiguous uint8 buffer laid out by packed.py's
machinery (`linear_layout`): the codes, then one scale and one zero per group in the model's dtype.
hqq packs the [G, group_size] code matrix (G = N*K/group_size groups, row n's groups n*K/gs ...) so
that, viewed as bytes [N/P, K] (P codes per byte): 8-bit byte [n, k] is W[n, k]; 4-bit byte [j, k]
holds W[j, k] in its high nibble and W[j + N/2, k] in its low one. One byte load feeds P rows.

Two Triton kernels, fp32 accumulation, both reading the packed buffer, with the group-sum trick
sum((q - z) * s * x) = s * (sum(q * x) - z * sum(x)) (scale and zero cost one multiply per group, not
per weight), and both taking up to three matrices of one input (a layer's q, k and v: `QuantGroup`,
`qlinear_many`) in one launch:
- `_int_kernel`, for one or two tokens (decode): the expert slot kernels' integer form (kernels.py:
  x quantized per group to int16 once per call, codes times activations in dp2a, each thread
  holding whole groups), grid (row block, token, K split);
- `_mma_kernel`, for more tokens (continuous batching, prefill chunks): grid (token block, row
  block, K split), the codes of one group times a token block with tl.dot (transposed, rows x
  tokens, as the grouped expert kernels do), so W is read once per block of BLOCK_M tokens.
H200, Mixtral-8x7B's projections at one token (`python -m placement.qlinear`,
experiments/results/qlinear_h200.csv): 4-bit q/k/v in one launch 0.0081 ms against F.linear's
0.0160 on the fused 16-bit weight, o 0.0075 against 0.0126. The float-code kernel these replaced took
0.0214 (q/k/v, three launches) and 0.0088 (o) (qlinear_h200_float_codes.csv).
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
# Up to these many rows the integer kernel (it reads W once per token), above them tl.dot. H200,
# 4-bit (qlinear_h200.csv), ms: o at 2 tokens 0.0088 against tl.dot's 0.0122, at 4 tokens 0.0169
# against 0.0123; q/k/v in one launch at 2 tokens 0.0109 against 0.0174, at 4 0.0192 against 0.0174.
INT_MAX_TOKENS = 2

# Triton, its CPU interpreter and the helpers the expert kernels use (reductions that work in the
# interpreter, the integer group products and their tiles, tl.dot with a per-group scale): shared.
from placement.kernels import (  # noqa: E402
    _MAGIC_OFF, _TL_DTYPES, TUNED_BLOCKS, _can_overlap, _codes4, _gdc_launch, _gdc_wait, _group_mma, _int_group_dot,
    _jit, _load_act, _pow2_block, _put, _row_sums, _rsum, _sm_count, _tile, available, gpu_entry,
    quantize_activations, tl, triton,
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
# Both kernels take up to three matrices of one input (a layer's q, k, v) in one launch: matrix i has
# R_i byte rows (4-bit: rows j and j + R_i in one byte; 0: absent), its codes, scales and zeros at the
# addresses of tab_ptr[i] (int64 [3], field_table) and its columns of out after those of the
# matrices before it (out's rows OUT_N long). A program's row block picks its matrix (_block). One
# matrix (TABLE off) comes as the pointers wq_ptr, sc_ptr, zr_ptr, as kernel arguments.


@_jit
def _block(b, R0, R1, R2, tab_ptr, wq_ptr, sc_ptr, zr_ptr, BLOCK: tl.constexpr, P: tl.constexpr,
           DTYPE: tl.constexpr, TABLE: tl.constexpr):
    """Row block b of the matrices' blocks laid end to end: (its matrix's byte rows R, the block's
    byte rows j [BLOCK], the matrix's first column of out, its codes (uint8), scales, zeros)."""
    if TABLE:
        b1 = (R0 + BLOCK - 1) // BLOCK  # the first block of matrix 1, then of matrix 2
        b2 = b1 + (R1 + BLOCK - 1) // BLOCK
        mi = (b >= b1).to(tl.int32) + (b >= b2).to(tl.int32)
        R = tl.where(mi == 0, R0, tl.where(mi == 1, R1, R2))
        j = (b - tl.where(mi == 0, 0, tl.where(mi == 1, b1, b2))) * BLOCK + tl.arange(0, BLOCK)
        col0 = P * tl.where(mi == 0, 0, tl.where(mi == 1, R0, R0 + R1))
        wq = tl.multiple_of(tl.load(tab_ptr + 3 * mi).to(tl.pointer_type(tl.uint8)), 16)
        sc = tl.load(tab_ptr + 3 * mi + 1).to(tl.pointer_type(DTYPE))
        zr = tl.load(tab_ptr + 3 * mi + 2).to(tl.pointer_type(DTYPE))
        return R, j, col0, wq, sc, zr
    else:
        return R0, b * BLOCK + tl.arange(0, BLOCK), 0, wq_ptr, sc_ptr, zr_ptr


@_jit
def _int_kernel(
    qa_ptr, qb_ptr, qs_ptr, qn_ptr, tab_ptr, wq_ptr, sc_ptr, zr_ptr, out_ptr, R0, R1, R2,
    K: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, DTYPE: tl.constexpr, OUT_N: tl.constexpr,
    TABLE: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, FAST: tl.constexpr,
    PDL: tl.constexpr,
):
    """out[m, cols] (+)= x[m] @ W.T, x as kernels._quantize_kernel wrote it, in the expert kernels'
    integer form (_int_group_dot: int16 activations, dp2a). Grid (row blocks, token, K split)."""
    _gdc_wait(PDL)
    _gdc_launch(PDL)
    P: tl.constexpr = 8 // BITS
    ROWG: tl.constexpr = K // GS
    NG: tl.constexpr = BLOCK_K // GS
    GW: tl.constexpr = GS // 4
    KS: tl.constexpr = K // SPLIT_K
    R, j, col0, wb, sc, zr = _block(tl.program_id(0), R0, R1, R2, tab_ptr, wq_ptr, sc_ptr, zr_ptr, BLOCK_J, P, DTYPE,
                                    TABLE)
    wq = wb.to(tl.pointer_type(tl.int32), bitcast=True)
    m = tl.program_id(1)
    jm = j < R
    rows, gi, wi = _tile(j, NG, GS)
    rmask = rows < R
    a0 = (rows + gi) * 0.0  # per-group terms, summed per row after the loop
    a1 = (rows + gi) * 0.0
    kstart = tl.program_id(2) * KS
    for k0 in range(kstart, kstart + KS, BLOCK_K):
        xa, xb, sx, xn = _load_act(qa_ptr, qb_ptr, qs_ptr, qn_ptr, m, K, k0, gi, wi, GS)
        codes = tl.load(wq + rows * (K // 4) + k0 // 4 + gi * GW + wi, mask=rmask, other=0)
        grp = rows * ROWG + k0 // GS + gi
        a0 += _int_group_dot(codes, BITS, 0, xa, xb, sx, xn, sc, zr, grp, rmask, GS, FAST)
        if P == 2:  # byte [j, k] = W[j, k] << 4 | W[j + R, k]
            a1 += _int_group_dot(codes, BITS, 1, xa, xb, sx, xn, sc, zr, grp + R * ROWG, rmask, GS, FAST)
    orow = out_ptr + m * OUT_N + col0 + j
    _put(orow, _row_sums(a0), jm, SPLIT_K > 1)
    if P == 2:
        _put(orow + R, _row_sums(a1), jm, SPLIT_K > 1)


@_jit
def _mma_kernel(
    x_ptr, tab_ptr, wq_ptr, sc_ptr, zr_ptr, out_ptr, M, R0, R1, R2,
    K: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, DTYPE: tl.constexpr, OUT_N: tl.constexpr,
    TABLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr, FAST: tl.constexpr, OFF: tl.constexpr,
):
    """out[tokens, cols] (+)= x[tokens] @ W.T for token block program_id(0), row block program_id(1),
    K split program_id(2); one group per K step. The product is computed transposed (rows x tokens):
    the unpacked weight tile is tl.dot's left operand."""
    P: tl.constexpr = 8 // BITS
    ROWG: tl.constexpr = K // GS
    KS: tl.constexpr = K // SPLIT_K
    R, j, col0, wq, sc, zr = _block(tl.program_id(1), R0, R1, R2, tab_ptr, wq_ptr, sc_ptr, zr_ptr, BLOCK_N, P, DTYPE,
                                    TABLE)
    t = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] tokens
    tm = t < M
    jm = j < R
    kk = tl.arange(0, GS)
    a0 = tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32)
    a1 = tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32)
    kstart = tl.program_id(2) * KS
    for k0 in range(kstart, kstart + KS, GS):
        xt = tl.load(x_ptr + t[None, :] * K + k0 + kk[:, None], mask=tm[None, :], other=0.0).to(DOT)  # [GS, BM]
        xs = _rsum(xt.to(tl.float32), 0)  # [BM]
        b = tl.load(wq + j[:, None] * K + k0 + kk[None, :], mask=jm[:, None], other=0)  # [BN, GS] uint8
        grp = j * ROWG + k0 // GS  # [BN]
        if BITS == 8:
            a0 += _group_mma(b.to(DOT), xt, xs, sc, zr, grp, jm, 0.0, IEEE)
        else:
            hi, lo = _codes4(b, DOT, FAST)
            a0 += _group_mma(hi, xt, xs, sc, zr, grp, jm, OFF, IEEE)
            a1 += _group_mma(lo, xt, xs, sc, zr, grp + R * ROWG, jm, OFF, IEEE)
    orow = out_ptr + t[None, :] * OUT_N + col0 + j[:, None]  # [BN, BM]
    omask = jm[:, None] & tm[None, :]
    _put(orow, a0, omask, SPLIT_K > 1)
    if P == 2:
        _put(orow + R, a1, omask, SPLIT_K > 1)


# --- launch -----------------------------------------------------------------------------------------
# The integer kernel's GPU blocks per precision: (rows per program, K chunk cap, warps, programs per SM
# that K splits aim for), first guesses; `python -m placement.qlinear --sweep --write` times SWEEP's
# and records the fastest per GPU in kernel_blocks.json (read once, as the expert kernels' blocks).
_INT_GPU = {8: (8, 512, 4, 4), 4: (16, 512, 4, 4)}
# tl.dot kernel: 64 rows, one warpgroup, after the grouped expert kernels' tuning
_MMA_GPU = dict(rows=64, warps=4, stages=3)


def int_blocks(device_name: str) -> dict[int, tuple[int, ...]]:
    """The integer kernel's blocks per precision for a GPU: kernel_blocks.json's "qlinear" entry for
    `device_name` over _INT_GPU (malformed entries are ignored)."""
    blocks = dict(_INT_GPU)
    entry = gpu_entry(TUNED_BLOCKS, device_name, "kernel blocks").get("qlinear", {})
    for bits, v in (entry.items() if isinstance(entry, dict) else ()):
        if bits.isdigit() and int(bits) in blocks and isinstance(v, list) and len(v) == 4 and all(
                isinstance(b, int) and b > 0 for b in v):
            blocks[int(bits)] = tuple(v)
    return blocks


@functools.lru_cache(maxsize=None)
def _device_int_blocks(index: int) -> dict[int, tuple[int, ...]]:
    return int_blocks(torch.cuda.get_device_name(index))


def _byte_rows(layout: Layout) -> int:
    """Rows of a packed matrix's bytes (4-bit: two weight rows per byte, j and j + N/2)."""
    return layout.matrices[0][1][0] // (8 // layout.bits)


def _split_until(programs: int, per_sm: int, sms: int, K: int, chunk: int) -> int:
    """K splits (atomic adds; powers of two up to 16, whole chunks each) until `programs` times the
    split keep about `per_sm` programs busy on each of `sms` SMs."""
    split = 1
    while programs * split < per_sm * sms and split < 16 and K % (chunk * split * 2) == 0:
        split *= 2
    return split


@functools.lru_cache(maxsize=4096)  # asked for on every call: prefill runs it per projection and layer
def _int_config(layouts, M: int, interpret: bool, sms: int, blocks=None) -> tuple[int, int, int, int]:
    """(rows per program, K chunk, warps, K split) of _int_kernel for these matrices and M tokens:
    shapes only. `blocks`: (rows, K chunk cap, warps, programs per SM), default _INT_GPU's. The
    interpreter takes the biggest blocks (each program is Python overhead) and no split."""
    (_, (_, K)), = layouts[0].matrices
    gs, bits = layouts[0].group_size, layouts[0].bits
    R = [_byte_rows(lay) for lay in layouts]
    if interpret:
        return min(triton.next_power_of_2(max(R)), 64), max(_pow2_block(K, 1024), gs), 4, 1
    bj, cap, warps, per_sm = blocks or _INT_GPU[bits]
    bk = max(_pow2_block(K, cap), gs)
    return bj, bk, warps, _split_until(sum(triton.cdiv(r, bj) for r in R) * M, per_sm, sms, K, bk)


@functools.lru_cache(maxsize=4096)
def _mma_config(layouts, M: int, interpret: bool, sms: int) -> tuple[int, int, int]:
    """(tokens per program, byte rows per program, K split) of _mma_kernel: shapes only."""
    (_, (_, K)), = layouts[0].matrices
    R = [_byte_rows(lay) for lay in layouts]
    bm = 16 if M <= 16 or interpret else 32
    if interpret:
        return bm, min(triton.next_power_of_2(max(R)), 256), 1
    bn = _MMA_GPU["rows"]
    programs = sum(triton.cdiv(r, bn) for r in R) * triton.cdiv(M, bm)
    return bm, bn, _split_until(programs, 4, sms, K, layouts[0].group_size)


def _output(x: torch.Tensor, M: int, N: int, split: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Where a kernel writes [M, N]. A K split adds atomically: fp32 zeros, cast afterwards. Without
    one the kernel stores in the output's dtype (rounding to nearest), except in the interpreter,
    whose store to bf16 truncates: fp32 there, rounded by torch."""
    if split > 1:
        return torch.zeros(M, N, dtype=torch.float32, device=x.device)
    return torch.empty(M, N, dtype=out_dtype if x.device.type == "cuda" else torch.float32, device=x.device)


def _check_split(split: int | None, K: int, group_size: int) -> None:
    if split is not None and (split < 1 or K % (group_size * split)):
        raise ValueError(f"split={split} does not cut K={K} into whole groups of {group_size}")


def supports_int(layout: Layout) -> bool:
    """Whether the integer kernel runs matrices of `layout` (else tl.dot's): a group's sum of codes
    times int16 activations must fit int32 (8-bit: groups of up to 256)."""
    return supports(layout) and ((1 << layout.bits) - 1) * 32767 * layout.group_size < 2 ** 31


def field_table(mats, device) -> torch.Tensor:
    """int64 [n, 3] on `device`: the addresses of the codes, scales and zeros of each packed matrix
    in `mats` ((buf, layout) pairs), as the kernels read them. Made once per place of the buffers
    (a host-to-device copy: not during CUDA-graph capture)."""
    addrs = []
    for buf, layout in mats:
        v = layout.views(buf)
        addrs.append([v[f"weight.{f}"].data_ptr() for f in ("W_q", "scale", "zero")])
        if addrs[-1][0] % 16:
            raise ValueError("a packed matrix's codes must start 16-byte aligned")
    return torch.tensor(addrs, dtype=torch.int64, device=device)


def qlinear_many(x: torch.Tensor, layouts, table: torch.Tensor | None = None, *, fields=None,
                 path: str | None = None, out_dtype: torch.dtype | None = None, split: int | None = None,
                 blocks=None) -> torch.Tensor:
    """x [M, K] times one to three packed matrices of the same K, bits, groups and dtype (a layer's
    q, k and v) in one kernel launch: [M, N_1 + N_2 + ...], the matrices' outputs side by side.
    table: field_table of their buffers; or, for one matrix, `fields`: its codes, scales and zeros
    (layout.views' tensors), passed to the kernel as they are. `path`: "int" (integer activations,
    per token: x quantized once for all) or "mma" (tl.dot over token blocks); default "int" up to
    INT_MAX_TOKENS rows (where the layout has it), else "mma". `out_dtype`: of the result (default
    x's). `split`: K splits instead of the configured ones (tests: the interpreter never splits by
    itself); `blocks`: the integer kernel's, as _int_config takes them (benchmarks). No host syncs;
    the grid depends on shapes only."""
    if fields is not None:
        ok = table is None and len(layouts) == 1
    else:
        ok = table is not None and 1 <= len(layouts) <= 3 and len(table) == len(layouts)
    if not ok:
        raise ValueError(f"qlinear_many takes one to three matrices and a table row for each, or one matrix and "
                         f"its fields (got {len(layouts)} matrices)")
    first = layouts[0]
    (_, (N, K)), = first.matrices
    if any((lay.bits, lay.group_size, lay.dtype, lay.matrices[0][1][1]) != (first.bits, first.group_size, first.dtype, K)
           for lay in layouts):
        raise ValueError("qlinear_many's matrices must share K, bits, group size and dtype")
    M, k_in = x.shape
    if k_in != K:
        what = f"quantized matrix is {N}x{K}" if len(layouts) == 1 else f"quantized matrices have {K}"
        raise ValueError(f"x has {k_in} columns but the {what}")
    if not supports(first):
        raise ValueError(f"no kernel for a {N}x{K} matrix at {first.bits} bits, group size {first.group_size}, "
                         f"{first.dtype}")
    if path is None:
        path = "int" if M <= INT_MAX_TOKENS and supports_int(first) else "mma"
    if path not in ("int", "mma"):
        raise ValueError(f"path={path!r} is not a kernel; choose int or mma")
    if path == "int" and not supports_int(first):
        raise ValueError(f"no integer kernel for {first.bits}-bit groups of {first.group_size} (int32 sums)")
    _check_split(split, K, first.group_size)
    Ns = [lay.matrices[0][1][0] for lay in layouts]
    out_dtype = out_dtype or x.dtype
    if M == 0:
        return torch.empty(0, sum(Ns), dtype=out_dtype, device=x.device)
    on_gpu = x.device.type == "cuda"
    index = x.device.index or 0
    sms = _sm_count(index) if on_gpu else 132
    R = [_byte_rows(lay) for lay in layouts] + [0] * (3 - len(layouts))  # (0: no matrix)
    common = dict(K=K, BITS=first.bits, GS=first.group_size, DTYPE=_TL_DTYPES[first.dtype], OUT_N=sum(Ns),
                  TABLE=fields is None)
    x = x.contiguous()
    # the kernels' matrices: from the table, or one as pointers (the unused ones: any tensor)
    mats = (table, table, table, table) if fields is None else (fields[0], *fields)
    if path == "int":
        if on_gpu and blocks is None:
            blocks = _device_int_blocks(index)[first.bits]
        bj, bk, warps, auto = _int_config(tuple(layouts), M, not on_gpu, sms, blocks)
        if split is not None:
            bk = math.gcd(bk, K // split)  # a chunk holds whole groups and fits in one split
        split = auto if split is None else split
        out = _output(x, M, sum(Ns), split, out_dtype)
        pdl = on_gpu and _can_overlap(index)
        _int_kernel[(sum(triton.cdiv(r, bj) for r in R), M, split)](
            *quantize_activations(x, first.group_size, pdl=pdl), *mats, out, *R, BLOCK_J=bj, BLOCK_K=bk,
            SPLIT_K=split, FAST=on_gpu, PDL=pdl, **common, **(dict(num_warps=warps) if on_gpu else {}),
            **({"launch_pdl": True} if pdl else {}))
    else:
        bm, bn, auto = _mma_config(tuple(layouts), M, not on_gpu, sms)
        split = auto if split is None else split
        out = _output(x, M, sum(Ns), split, out_dtype)
        dot = _TL_DTYPES[first.dtype] if on_gpu else tl.float32  # (the interpreter's dot: fp32)
        fast = on_gpu and dot == tl.bfloat16 and first.bits == 4  # bf16 codes by inline PTX (kernels._codes4)
        _mma_kernel[(triton.cdiv(M, bm), sum(triton.cdiv(r, bn) for r in R), split)](
            x, *mats, out, M, *R, BLOCK_M=bm, BLOCK_N=bn, SPLIT_K=split, DOT=dot, IEEE=dot == tl.float32, FAST=fast,
            OFF=_MAGIC_OFF if fast else 0.0, **common,
            **(dict(num_warps=_MMA_GPU["warps"], num_stages=_MMA_GPU["stages"]) if on_gpu else {}))
    return out if out.dtype == out_dtype else out.to(out_dtype)


def qlinear(x: torch.Tensor, buf: torch.Tensor, layout: Layout, *, path: str | None = None,
            out_dtype: torch.dtype | None = None, split: int | None = None, views: dict | None = None) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N] for W packed in `buf` (uint8, `layout`): qlinear_many of one matrix,
    its fields passed as pointers. `views`: layout.views(buf), if the caller keeps them."""
    v = layout.views(buf) if views is None else views
    return qlinear_many(x, [layout], fields=(v["weight.W_q"], v["weight.scale"], v["weight.zero"]), path=path,
                        out_dtype=out_dtype, split=split)


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


class QuantGroup:
    """Quantized projections of one input called as one (a layer's q, k and v): up to
    KERNEL_MAX_TOKENS rows one kernel launch for all of them (qlinear_many: up to INT_MAX_TOKENS the
    integer kernel after one quantization of x, above it tl.dot's), in place of a launch or two
    each; more rows, each module as it is (dequantize and F.linear). `of` makes one where the
    modules allow it; `current` says whether it still describes them (the engine swaps and moves
    projections)."""

    def __init__(self, mods):
        self.mods = tuple(mods)
        self.layouts = [m.layout for m in self.mods]
        self.key = self._key(self.mods)
        # (a host-to-device copy: made outside CUDA-graph capture, in FastLayers.ready())
        self.table = field_table([(m.packed, m.layout) for m in self.mods], self.mods[0].packed.device)
        biases = [m.bias for m in self.mods]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b if b is not None else torch.zeros(m.out_features, dtype=m.layout.dtype, device=m.packed.device)
             for b, m in zip(biases, self.mods)])
        self.sizes = [m.out_features for m in self.mods]

    @staticmethod
    def _key(mods):
        return tuple((id(m), m.packed.data_ptr(), m.use_kernel) for m in mods)

    @classmethod
    def of(cls, mods) -> "QuantGroup | None":
        """A group of `mods` (QuantLinear modules of one input), or None where one launch cannot run
        them: other modules, modules without kernels, or different K, bits, groups or dtype."""
        if not 1 <= len(mods) <= 3 or not all(isinstance(m, QuantLinear) and m.use_kernel and m.kernel_ok
                                               for m in mods):
            return None
        first = mods[0].layout
        if any((m.layout.bits, m.layout.group_size, m.layout.dtype, m.in_features, m.packed.device)
               != (first.bits, first.group_size, first.dtype, mods[0].in_features, mods[0].packed.device)
               for m in mods):
            return None
        return cls(mods)

    def current(self, mods) -> bool:
        return self._key(tuple(mods)) == self.key

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each module's output for x [..., K] (views of one tensor where the kernel ran)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.mods[0].in_features)
        if x2.shape[0] > KERNEL_MAX_TOKENS:
            return [m(x) for m in self.mods]
        y = qlinear_many(x2, self.layouts, self.table)
        if self.bias is not None:
            y = y + self.bias
        return [part.reshape(*lead, n) for part, n in zip(y.split(self.sizes, dim=-1), self.sizes)]


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


# Mixtral-8x7B's attention projections (hidden 4096, 8 KV heads of 128): a layer's q, k and v (one
# input: one group), then o
BENCH_GROUPS = (((4096, 4096), (1024, 4096), (1024, 4096)), ((4096, 4096),))
BENCH_TOKENS = (1, 4, 16, 64)


def _copies(dev, nbytes: int) -> int:
    """How many copies of `nbytes` of weights exceed twice the L2 cache: calls cycling through them
    read their weights from HBM, as at decode."""
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    return max(2, -(-2 * l2 // nbytes) + 1)


def _bench_sets(dims, bits, group_size, dtype, dev, gen):
    """_copies sets of packed matrices `dims`, each with its field table."""
    layouts = [linear_layout(N, K, bits, dtype, group_size) for N, K in dims]
    nbytes = sum(lay.nbytes for lay in layouts)
    sets = []
    for _ in range(_copies(dev, nbytes)):
        bufs = [random_packed(lay, dev, gen) for lay in layouts]
        sets.append((bufs, field_table(list(zip(bufs, layouts)), dev)))
    return layouts, nbytes, sets


def bench(groups=BENCH_GROUPS, tokens=BENCH_TOKENS, group_size: int = 64, iters: int = 200,
          dtype=torch.bfloat16, csv_path: str | None = None, device="cuda") -> list[dict]:
    """Time each group of projections (matrices of one input: q/k/v, then o) at 16 bits (F.linear of
    their concatenated weight, as fast layers call it) and at 8 and 4 bits: each kernel over the
    whole group in one launch ("int group", "mma group"), and per matrix ("int", "mma"), and
    dequantize-then-F.linear, for M tokens in `tokens` (the integer kernel up to 4, past where it
    gives way). Prints a table (GB/s: the matrices' bytes over the time, as if read once; ratio: time
    over F.linear's at the same M) and returns it, also written to `csv_path` if given. Each call
    reads its weights from HBM (copies cycling past twice the L2 cache: _copies)."""
    from placement.kernels import gpu_time_ms, write_rows  # (the expert kernels' timer: one CUDA graph of `iters` calls)

    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    it = iter(range(1 << 62))  # each call (captured ones too) takes the next set

    for dims in groups:
        K = dims[0][1]
        name = "+".join(f"{N}" for N, _ in dims) + f"x{K}"
        for M in tokens:
            x = torch.randn(M, K, device=dev, dtype=dtype, generator=gen)

            def record(path, bits, nbytes, fn):  # (F.linear's row first: the others' ratios are to it)
                ms = gpu_time_ms(fn, iters)
                base = ms if path == "F.linear" else rows[-1]["ms"] / rows[-1]["ratio"]
                rows.append(dict(path=path, matrices=name, bits=bits, tokens=M, mb=nbytes / 1e6, ms=ms,
                                 gbps=nbytes / ms / 1e6, ratio=ms / base))

            nbytes = sum(N * K for N, _ in dims) * dtype.itemsize
            copies = _copies(dev, nbytes)
            ws = [torch.randn(sum(N for N, _ in dims), K, device=dev, dtype=dtype, generator=gen) * 0.02
                  for _ in range(copies)]
            record("F.linear", 16, nbytes, lambda: F.linear(x, ws[next(it) % copies]))
            ws = None
            paths = ("int", "mma") if M <= 4 else ("mma",)
            for bits in QLINEAR_BITS:
                layouts, nbytes, sets = _bench_sets(dims, bits, group_size, dtype, dev, gen)
                n = len(sets)
                for path in paths:  # (one matrix: its pointers from a table, against "int"/"mma" below)
                    record(f"{path} group", bits, nbytes,
                           lambda: qlinear_many(x, layouts, sets[next(it) % n][1], path=path))
                for path in paths:
                    record(path, bits, nbytes, lambda: [
                        qlinear(x, b, lay, path=path) for bufs, _ in [sets[next(it) % n]]
                        for b, lay in zip(bufs, layouts)])
                record("dequantize+F.linear", bits, nbytes, lambda: [
                    F.linear(x, dequantize(lay, b)) for bufs, _ in [sets[next(it) % n]] for b, lay in zip(bufs, layouts)])
                sets = None
            torch.cuda.empty_cache()
    print(f"attention projections, gs={group_size} {dtype}, {torch.cuda.get_device_name(dev)}")
    print(f"{'path':20s} {'matrices':>20s} {'bits':>4s} {'tokens':>6s} {'MB':>7s} {'ms':>8s} {'GB/s':>7s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['path']:20s} {r['matrices']:>20s} {r['bits']:4d} {r['tokens']:6d} {r['mb']:7.2f} {r['ms']:8.4f} "
              f"{r['gbps']:7.0f} {r['ratio']:6.3f}")
    if csv_path:
        write_rows(rows, csv_path)
    return rows


# the integer kernel's blocks swept by --sweep: rows per program, K chunk cap, warps, programs per SM
SWEEP = dict(rows=(4, 8, 16, 32), chunk=(256, 512, 1024), warps=(2, 4, 8), per_sm=(1, 2, 4, 8))


def sweep(groups=BENCH_GROUPS, group_size: int = 64, iters: int = 200, dtype=torch.bfloat16,
          csv_path: str | None = None, write: bool = False, device="cuda") -> dict[int, tuple[int, ...]]:
    """Time the integer kernel at one token over SWEEP's blocks (those giving each thread 4 to 32
    words of codes per K chunk) for each precision, a layer's calls as decode makes them (each group
    of `groups`, one launch each), and return the fastest blocks per precision by the layer's total
    time; `write`: also record them for this GPU in kernel_blocks.json ("qlinear"), which
    _int_config reads at start."""
    from placement.kernels import gpu_time_ms, write_rows

    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)
    it = iter(range(1 << 62))
    rows, best = [], {}
    for bits in QLINEAR_BITS:
        data = []
        for dims in groups:
            layouts, _, sets = _bench_sets(dims, bits, group_size, dtype, dev, gen)
            data.append((layouts, sets, torch.randn(1, dims[0][1], device=dev, dtype=dtype, generator=gen)))
        totals = {}
        for bj in SWEEP["rows"]:
            for cap in SWEEP["chunk"]:
                for warps in SWEEP["warps"]:
                    words = bj * cap // 4 // (32 * warps)  # per thread, at K chunks of `cap`
                    if not 4 <= words <= 32:
                        continue
                    for per_sm in SWEEP["per_sm"]:
                        blocks = (bj, cap, warps, per_sm)
                        total = 0.0
                        for layouts, sets, x in data:
                            n = len(sets)
                            ms = gpu_time_ms(lambda: qlinear_many(x, layouts, sets[next(it) % n][1], blocks=blocks),
                                             iters)
                            split = _int_config(tuple(layouts), 1, False, _sm_count(dev.index or 0), blocks)[3]
                            rows.append(dict(bits=bits, matrices=len(layouts), rows=bj, chunk=cap, warps=warps,
                                             per_sm=per_sm, split=split, ms=ms))
                            total += ms
                        totals[blocks] = total
        best[bits] = min(totals, key=totals.get)
        first = _INT_GPU[bits]
        print(f"{bits}-bit: fastest blocks {best[bits]} ({totals[best[bits]] * 1e3:.1f} us a layer); "
              f"first guess {first} ({totals.get(first, float('nan')) * 1e3:.1f} us)")
        del data
        torch.cuda.empty_cache()
    if csv_path:
        write_rows(rows, csv_path)
    if write:
        import json
        name = torch.cuda.get_device_name(dev)
        table = json.loads(TUNED_BLOCKS.read_text()) if TUNED_BLOCKS.exists() else {}
        table.setdefault(name, {})["qlinear"] = {str(b): list(v) for b, v in best.items()}
        TUNED_BLOCKS.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")  # (as tune_kernels writes it)
        print(f"wrote the blocks for {name} to {TUNED_BLOCKS}")
    return best


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m placement.qlinear",
                                     description="Time the quantized attention-projection kernels against F.linear (CUDA).")
    parser.add_argument("--csv", metavar="PATH", help="also write the table to PATH")
    parser.add_argument("--iters", type=int, default=200, help="calls timed per row (default 200)")
    parser.add_argument("--tokens", default=",".join(map(str, BENCH_TOKENS)), metavar="M,M,...",
                        help="rows of x to time (default %(default)s)")
    parser.add_argument("--sweep", action="store_true",
                        help="time the integer kernel's blocks at one token instead, and report the fastest")
    parser.add_argument("--write", action="store_true", help="with --sweep: record the fastest blocks for this GPU "
                        "in placement/kernel_blocks.json")
    args = parser.parse_args(argv)
    try:
        tokens = tuple(int(t) for t in args.tokens.split(","))
    except ValueError:
        parser.error(f"--tokens {args.tokens!r} is not a comma-separated list of integers")
    if args.write and not args.sweep:
        parser.error("--write records what --sweep finds; give both")
    if not torch.cuda.is_available():
        raise SystemExit("python -m placement.qlinear times the kernels on a CUDA GPU; this machine has none")
    if args.sweep:
        sweep(iters=args.iters, csv_path=args.csv, write=args.write)
    else:
        bench(tokens=tokens, iters=args.iters, csv_path=args.csv)


if __name__ == "__main__":
    main()
