"""Try 4- and 2-bit slot kernels on int8 activations and dp4a against placement.kernels' own.

The slot kernels turn every 4-bit code into an fp32 (a lop3 and a subtraction) and multiply it
(an FMA): about three instructions per weight, and a 4-bit expert reads at 0.57 of the bf16 one's
bandwidth on the H200, a 2-bit one no faster (issue 16). Here the activations are quantized to int8
per quantization group (scale max|x| / 127, as llama.cpp's q8_1), and a 32-bit word of codes meets
a word of four int8 activations in one dp4a: for 8 4-bit weights (one word: the gate's codes in the
high nibbles, the up's in the low) a shift, two ands and two dp4a. Per group and row:
s * sx * (sum(q * xq) - z * sum(xq)).

    python -m experiments.bench_dp4a --out bench_dp4a.csv

Checks each candidate against moe_experts (error printed: int8 activations are not exact), times it
(kernels.gpu_time_ms over copies of the expert beyond twice the L2 cache) and prints the best
blocks per precision beside the current kernels and the bf16 one.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from placement import kernels
from placement.kernels import _jit, _rsum, tl, triton
from placement.packed import expert_layout


@_jit
def _rmax(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@_jit
def _sbyte(w, i: tl.constexpr):
    """Signed byte i of int32 words w."""
    return (w << (24 - 8 * i)) >> 24


@_jit
def _ubyte(w, i: tl.constexpr):
    """Unsigned byte i of int32 words w."""
    return (w >> (8 * i)) & 0xFF


@_jit
def _idot(codes, xa, xb, XBITS: tl.constexpr, FAST: tl.constexpr):
    """Per int32 word of 4 codes (bytes, unsigned; column 4w + i in byte i): the codes times the
    activations of those columns, summed in int32. XBITS 8: xa holds the 4 activations as signed
    bytes (dp4a); 16: xa the first two as signed halves, xb the last two (dp2a.lo, dp2a.hi)."""
    if FAST:
        if XBITS == 8:
            return tl.inline_asm_elementwise("{.reg .s32 t; mov.s32 t, 0; dp4a.u32.s32 $0, $1, $2, t;}", "=r,r,r",
                                             [codes, xa], dtype=tl.int32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(
                "{.reg .s32 t; mov.s32 t, 0; dp2a.lo.s32.u32 t, $1, $3, t; dp2a.hi.s32.u32 $0, $2, $3, t;}",
                "=r,r,r,r", [xa, xb, codes], dtype=tl.int32, is_pure=True, pack=1)
    else:
        if XBITS == 8:
            return (_ubyte(codes, 0) * _sbyte(xa, 0) + _ubyte(codes, 1) * _sbyte(xa, 1)
                    + _ubyte(codes, 2) * _sbyte(xa, 2) + _ubyte(codes, 3) * _sbyte(xa, 3))
        else:
            return (_ubyte(codes, 0) * ((xa << 16) >> 16) + _ubyte(codes, 1) * (xa >> 16)
                    + _ubyte(codes, 2) * ((xb << 16) >> 16) + _ubyte(codes, 3) * (xb >> 16))


@_jit
def _round(v):
    return tl.where(v >= 0, v + 0.5, v - 0.5).to(tl.int32)


@_jit
def _quant_x(ptr, row, k0, gi, wi, GS: tl.constexpr, XBITS: tl.constexpr):
    """Columns k0 + [0, NG * GS) of row `row` at ptr, quantized per group of GS to XBITS-bit integers
    (scale max|x| / (2^(XBITS-1) - 1)): the words xa, xb [NG, GS/4] as _idot takes them, the groups'
    scales [NG] and the sums of their integers [NG]."""
    c = row + k0 + gi[:, None, None] * GS + wi[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]
    v = tl.load(ptr + c).to(tl.float32)  # [NG, GW, 4]: column 4w + i at [g, w, i]
    a, b = tl.split(tl.reshape(v, (v.shape[0], v.shape[1], 2, 2)))  # a: columns 4w, 4w + 2; b: 4w + 1, 4w + 3
    v0, v2 = tl.split(a)
    v1, v3 = tl.split(b)
    amax = _rmax(tl.maximum(tl.maximum(tl.abs(v0), tl.abs(v1)), tl.maximum(tl.abs(v2), tl.abs(v3))), 1)
    LIM: tl.constexpr = (1 << (XBITS - 1)) - 1
    inv = tl.where(amax > 0, LIM / amax, 0.0)[:, None]
    q0 = _round(v0 * inv)
    q1 = _round(v1 * inv)
    q2 = _round(v2 * inv)
    q3 = _round(v3 * inv)
    if XBITS == 8:
        xa = (q0 & 0xFF) | ((q1 & 0xFF) << 8) | ((q2 & 0xFF) << 16) | (q3 << 24)
        xb = xa
    else:
        xa = (q0 & 0xFFFF) | (q1 << 16)
        xb = (q2 & 0xFFFF) | (q3 << 16)
    return xa, xb, amax / LIM, _rsum(q0 + q1 + q2 + q3, 1)


@_jit
def _act(x_ptr, qa_ptr, qb_ptr, qs_ptr, qn_ptr, row, K: tl.constexpr, k0, gi, wi, GS: tl.constexpr,
         XBITS: tl.constexpr, PRE: tl.constexpr):
    """_quant_x's outputs for row `row` of a [rows, K] input, columns k0 + [0, NG * GS): computed here
    (PRE false) or read from what _quant_kernel wrote (xa, xb int32 [rows, K/4], scales fp32 and
    sums int32 [rows, K/GS])."""
    if PRE:
        GW: tl.constexpr = GS // 4
        w = row * (K // 4) + k0 // 4 + gi[:, None] * GW + wi[None, :]
        g = row * (K // GS) + k0 // GS + gi
        return tl.load(qa_ptr + w), tl.load(qb_ptr + w), tl.load(qs_ptr + g), tl.load(qn_ptr + g)
    else:
        return _quant_x(x_ptr, row * K, k0, gi, wi, GS, XBITS)


@_jit
def _quant_kernel(x_ptr, qa_ptr, qb_ptr, qs_ptr, qn_ptr, K: tl.constexpr, GS: tl.constexpr, XBITS: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """Quantize row program_id(0) of x [rows, K], columns program_id(1) * BLOCK_K + [0, BLOCK_K), for _act."""
    r = tl.program_id(0)
    k0 = tl.program_id(1) * BLOCK_K
    NG: tl.constexpr = BLOCK_K // GS
    GW: tl.constexpr = GS // 4
    gi = tl.arange(0, NG)
    wi = tl.arange(0, GW)
    xa, xb, sx, n = _quant_x(x_ptr, r * K, k0, gi, wi, GS, XBITS)
    w = r * (K // 4) + k0 // 4 + gi[:, None] * GW + wi[None, :]
    tl.store(qa_ptr + w, xa)
    tl.store(qb_ptr + w, xb)
    g = r * (K // GS) + k0 // GS + gi
    tl.store(qs_ptr + g, sx)
    tl.store(qn_ptr + g, n)


@_jit
def _group_dot(codes, xa, xb, sx, xq_sum, scale_ptr, zero_ptr, grp, rmask, XBITS: tl.constexpr, FAST: tl.constexpr):
    """Per row: sum over the chunk's groups of s * sx * (sum(q * xq) - z * sum(xq)), codes
    [BJ, NG, GW] (words of 4 codes in bytes), xa, xb [NG, GW] from _quant_x, grp [BJ, NG]."""
    qx = _rsum(_idot(codes, xa[None, :, :], xb[None, :, :], XBITS, FAST), 2).to(tl.float32)  # [BJ, NG]
    s = tl.load(scale_ptr + grp, mask=rmask, other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + grp, mask=rmask, other=0.0).to(tl.float32)
    return _rsum(s * sx[None, :] * (qx - z * xq_sum.to(tl.float32)[None, :]), 1)


@_jit
def _gate_up_i8_kernel(
    x_ptr, qa_ptr, qb_ptr, qs_ptr, qn_ptr, ptr_tab, tok_tab, h_ptr,
    H: tl.constexpr, I: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, DTYPE: tl.constexpr,
    W_OFF: tl.constexpr, S_OFF: tl.constexpr, Z_OFF: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, XBITS: tl.constexpr, FAST: tl.constexpr, PRE: tl.constexpr,
):
    s = tl.program_id(0)
    addr = tl.load(ptr_tab + s)
    if addr != 0:
        t = tl.load(tok_tab + s)
        base = tl.multiple_of(addr.to(tl.pointer_type(tl.uint8)), 64)
        wq = (base + W_OFF).to(tl.pointer_type(tl.int32), bitcast=True)
        sc = (base + S_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
        zr = (base + Z_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
        NG: tl.constexpr = BLOCK_K // GS
        GW: tl.constexpr = GS // 4
        HALF: tl.constexpr = I // 2
        ROWG: tl.constexpr = H // GS
        j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        if BITS == 2:
            jm = j < HALF
        else:
            jm = j < I
        rmask = jm[:, None]
        gi = tl.arange(0, NG)
        wi = tl.arange(0, GW)
        g0 = tl.full([BLOCK_J], 0.0, tl.float32)
        u0 = tl.full([BLOCK_J], 0.0, tl.float32)
        g1 = tl.full([BLOCK_J], 0.0, tl.float32)
        u1 = tl.full([BLOCK_J], 0.0, tl.float32)
        for k0 in range(0, H, BLOCK_K):
            xa, xb, sx, xq_sum = _act(x_ptr, qa_ptr, qb_ptr, qs_ptr, qn_ptr, t, H, k0, gi, wi, GS, XBITS, PRE)
            words = tl.load(wq + j[:, None, None] * (H // 4) + k0 // 4 + gi[None, :, None] * GW + wi[None, None, :],
                            mask=rmask[:, :, None], other=0)  # [BJ, NG, GW]
            grp = j[:, None] * ROWG + k0 // GS + gi[None, :]
            if BITS == 8:  # a byte per weight; up rows start at row I
                up = tl.load(wq + (I + j[:, None, None]) * (H // 4) + k0 // 4 + gi[None, :, None] * GW
                             + wi[None, None, :], mask=rmask[:, :, None], other=0)
                g0 += _group_dot(words, xa, xb, sx, xq_sum, sc, zr, grp, rmask, XBITS, FAST)
                u0 += _group_dot(up, xa, xb, sx, xq_sum, sc, zr, grp + I * ROWG, rmask, XBITS, FAST)
            elif BITS == 4:  # byte [j, k] = gate[j, k] << 4 | up[j, k]
                g0 += _group_dot((words >> 4) & 0x0F0F0F0F, xa, xb, sx, xq_sum, sc, zr, grp, rmask, XBITS, FAST)
                u0 += _group_dot(words & 0x0F0F0F0F, xa, xb, sx, xq_sum, sc, zr, grp + I * ROWG, rmask, XBITS, FAST)
            else:  # byte [j, k] = gate[j] << 6 | gate[j + I/2] << 4 | up[j] << 2 | up[j + I/2]
                g0 += _group_dot((words >> 6) & 0x03030303, xa, xb, sx, xq_sum, sc, zr, grp, rmask, XBITS, FAST)
                g1 += _group_dot((words >> 4) & 0x03030303, xa, xb, sx, xq_sum, sc, zr, grp + HALF * ROWG, rmask, XBITS, FAST)
                u0 += _group_dot((words >> 2) & 0x03030303, xa, xb, sx, xq_sum, sc, zr, grp + I * ROWG, rmask, XBITS, FAST)
                u1 += _group_dot(words & 0x03030303, xa, xb, sx, xq_sum, sc, zr, grp + (I + HALF) * ROWG, rmask, XBITS, FAST)
        hrow = h_ptr + s * I
        tl.store(hrow + j, g0 / (1.0 + tl.exp(-g0)) * u0, mask=jm)
        if BITS == 2:
            tl.store(hrow + HALF + j, g1 / (1.0 + tl.exp(-g1)) * u1, mask=jm)


@_jit
def _down_i8_kernel(
    h_ptr, qa_ptr, qb_ptr, qs_ptr, qn_ptr, ptr_tab, tok_tab, wt_tab, out_ptr,
    H: tl.constexpr, I: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, DTYPE: tl.constexpr,
    W_OFF: tl.constexpr, S_OFF: tl.constexpr, Z_OFF: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, XBITS: tl.constexpr,
    FAST: tl.constexpr, PRE: tl.constexpr,
):
    s = tl.program_id(0)
    addr = tl.load(ptr_tab + s)
    if addr != 0:
        t = tl.load(tok_tab + s)
        weight = tl.load(wt_tab + s).to(tl.float32)
        base = tl.multiple_of(addr.to(tl.pointer_type(tl.uint8)), 64)
        wq = (base + W_OFF).to(tl.pointer_type(tl.int32), bitcast=True)
        sc = (base + S_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
        zr = (base + Z_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
        NG: tl.constexpr = BLOCK_K // GS
        GW: tl.constexpr = GS // 4
        P: tl.constexpr = 8 // BITS  # a byte holds rows r, r + H/P, ... (8-bit: one)
        R: tl.constexpr = H // P
        ROWG: tl.constexpr = I // GS
        KS: tl.constexpr = I // SPLIT_K
        j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        jm = j < R
        rmask = jm[:, None]
        gi = tl.arange(0, NG)
        wi = tl.arange(0, GW)
        a0 = tl.full([BLOCK_J], 0.0, tl.float32)
        a1 = tl.full([BLOCK_J], 0.0, tl.float32)
        a2 = tl.full([BLOCK_J], 0.0, tl.float32)
        a3 = tl.full([BLOCK_J], 0.0, tl.float32)
        kstart = tl.program_id(2) * KS
        for k0 in range(kstart, kstart + KS, BLOCK_K):
            ha, hb, sh, hq_sum = _act(h_ptr, qa_ptr, qb_ptr, qs_ptr, qn_ptr, s, I, k0, gi, wi, GS, XBITS, PRE)
            words = tl.load(wq + j[:, None, None] * (I // 4) + k0 // 4 + gi[None, :, None] * GW + wi[None, None, :],
                            mask=rmask[:, :, None], other=0)
            grp = j[:, None] * ROWG + k0 // GS + gi[None, :]
            if BITS == 8:
                a0 += _group_dot(words, ha, hb, sh, hq_sum, sc, zr, grp, rmask, XBITS, FAST)
            elif BITS == 4:
                a0 += _group_dot((words >> 4) & 0x0F0F0F0F, ha, hb, sh, hq_sum, sc, zr, grp, rmask, XBITS, FAST)
                a1 += _group_dot(words & 0x0F0F0F0F, ha, hb, sh, hq_sum, sc, zr, grp + R * ROWG, rmask, XBITS, FAST)
            else:
                a0 += _group_dot((words >> 6) & 0x03030303, ha, hb, sh, hq_sum, sc, zr, grp, rmask, XBITS, FAST)
                a1 += _group_dot((words >> 4) & 0x03030303, ha, hb, sh, hq_sum, sc, zr, grp + R * ROWG, rmask, XBITS, FAST)
                a2 += _group_dot((words >> 2) & 0x03030303, ha, hb, sh, hq_sum, sc, zr, grp + 2 * R * ROWG, rmask, XBITS, FAST)
                a3 += _group_dot(words & 0x03030303, ha, hb, sh, hq_sum, sc, zr, grp + 3 * R * ROWG, rmask, XBITS, FAST)
        orow = out_ptr + t * H + j
        tl.atomic_add(orow, weight * a0, mask=jm, sem="relaxed")
        if P >= 2:
            tl.atomic_add(orow + R, weight * a1, mask=jm, sem="relaxed")
        if P == 4:
            tl.atomic_add(orow + 2 * R, weight * a2, mask=jm, sem="relaxed")
            tl.atomic_add(orow + 3 * R, weight * a3, mask=jm, sem="relaxed")


def quantized(x, gs, xbits, block=512):
    """x [rows, K] quantized per group for _act(PRE=True): (xa, xb, scales, sums)."""
    R, K = x.shape
    qa = torch.empty(R, K // 4, dtype=torch.int32, device=x.device)
    qb = torch.empty_like(qa)
    qs = torch.empty(R, K // gs, dtype=torch.float32, device=x.device)
    qn = torch.empty(R, K // gs, dtype=torch.int32, device=x.device)
    block = kernels._pow2_block(K, block)
    _quant_kernel[(R, K // block)](x, qa, qb, qs, qn, K=K, GS=gs, XBITS=xbits, BLOCK_K=block)
    return qa, qb, qs, qn


def moe_experts_int(x, slot_ptrs, slot_weights, layout, blocks, xbits=16, *, slot_token=None, out=None, pre=False):
    """kernels.moe_experts for 8-, 4- and 2-bit experts on activations quantized to `xbits` (8 or 16);
    blocks: (gate_up rows, K chunk, warps, down rows, K chunk, warps, stages, down K split); pre:
    quantize the activations in kernels of their own, not in every program."""
    T, H = x.shape
    _, I = kernels._dims(layout)
    S = slot_ptrs.numel()
    if slot_token is None:
        slot_token = torch.arange(S, device=x.device)
    if out is None:
        out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    bits, gs = layout.bits, layout.group_size
    on_gpu = x.device.type == "cuda"
    gu_j, gu_k, gu_w, dn_j, dn_k, dn_w, stages, split = blocks
    offs = kernels._offsets(layout)
    dtype = kernels._TL_DTYPES[layout.dtype]
    h = torch.empty(S, I, dtype=torch.float32, device=x.device)
    rows = I // 2 if bits == 2 else I
    launch = (lambda w: {"num_warps": w, "num_stages": stages}) if on_gpu else (lambda w: {})
    qx = quantized(x, gs, xbits) if pre else (x,) * 4
    _gate_up_i8_kernel[(S, triton.cdiv(rows, gu_j))](
        x, *qx, slot_ptrs, slot_token, h, H=H, I=I, BITS=bits, GS=gs, DTYPE=dtype, W_OFF=offs[0][0], S_OFF=offs[0][1],
        Z_OFF=offs[0][2], BLOCK_J=gu_j, BLOCK_K=gu_k, XBITS=xbits, FAST=on_gpu, PRE=pre, **launch(gu_w))
    qh = quantized(h, gs, xbits) if pre else (h,) * 4
    _down_i8_kernel[(S, triton.cdiv(H // (8 // bits), dn_j), split)](
        h, *qh, slot_ptrs, slot_token, slot_weights, out, H=H, I=I, BITS=bits, GS=gs, DTYPE=dtype, W_OFF=offs[1][0],
        S_OFF=offs[1][1], Z_OFF=offs[1][2], BLOCK_J=dn_j, BLOCK_K=dn_k, SPLIT_K=split, XBITS=xbits, FAST=on_gpu,
        PRE=pre, **launch(dn_w))
    return out


GATE_UP = list(itertools.product((16, 32, 64), (256, 512, 1024), (4, 8)))
DOWN = list(itertools.product((16, 32, 64), (256, 512), (4,), (2, 4, 8)))  # rows, K chunk, warps, K split


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_dp4a", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_dp4a.csv", help="CSV of every timing")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--slots", type=int, default=2, choices=(1, 2), help="slots the block search runs at")
    parser.add_argument("--bits", default="4,2", help="precisions searched")
    parser.add_argument("--pre", action="store_true", help="search with the activations quantized by kernels of their own")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_dp4a times CUDA kernels; this machine has none")
    import pandas as pd

    dev = torch.device("cuda")
    hidden, inter, gs, dtype = 4096, 14336, 64, torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    rows = []
    for bits in [16] + [int(b) for b in args.bits.split(",")]:
        layout = expert_layout(hidden, inter, bits, dtype, gs)
        copies = max(2, -(-2 * l2 // layout.nbytes) + 1)
        bufs = [kernels.random_expert(layout, dev, gen) for _ in range(copies)]
        x = torch.randn(1, hidden, device=dev, dtype=dtype, generator=gen)
        out = torch.zeros(1, hidden, dtype=torch.float32, device=dev)
        it = iter(range(1 << 62))
        # slots: one expert, or two for one token (top-2 decode)
        tables = {n: [kernels.expert_table([bufs[i], bufs[(i + 1) % copies]][:n]) for i in range(copies)] for n in (1, 2)}
        ones = {n: torch.ones(n, device=dev) for n in (1, 2)}
        tok = {n: torch.zeros(n, dtype=torch.int64, device=dev) for n in (1, 2)}
        ref = {n: kernels.moe_experts(x, tables[n][0], ones[n], layout, slot_token=tok[n]) for n in (1, 2)}

        def record(path, n, cfg, fn, err=0.0):
            ms = kernels.gpu_time_ms(fn, args.iters)
            rows.append(dict(bits=bits, slots=n, path=path, cfg=str(cfg), ms=ms, gbps=n * layout.nbytes / ms / 1e6,
                             err=err))
            return ms

        def timed(cfg, xbits, n=args.slots, pre=args.pre):
            try:
                got = moe_experts_int(x, tables[n][0], ones[n], layout, cfg, xbits, slot_token=tok[n], pre=pre)
            except Exception as e:
                print(f"{bits:2d} int{xbits} failed {cfg}: {str(e)[:200]}", flush=True)
                return None
            err = ((got - ref[n]).abs().max() / ref[n].abs().max()).item()
            if not err < (5e-2 if xbits == 8 else 1e-3):
                print(f"{bits:2d} int{xbits} WRONG by {err:.3e} {cfg}", flush=True)
                return None
            return record(f"int{xbits}" + ("pre" if pre else ""), n, cfg, lambda: moe_experts_int(
                x, tables[n][next(it) % copies], ones[n], layout, cfg, xbits, slot_token=tok[n], out=out, pre=pre), err)

        for n in (1, 2):
            record("slots", n, "", lambda: kernels.moe_experts(x, tables[n][next(it) % copies], ones[n], layout,
                                                               slot_token=tok[n], out=out))
        if bits == 16:
            continue
        # coordinate search at --slots slots with 16-bit activations: gate_up, then down, then stages
        best, best_ms = (16, 512, 4, 32, 512, 4, 1, 4), float("inf")
        for gu in GATE_UP:
            cfg = gu + best[3:]
            ms = timed(cfg, 16)
            if ms is not None and ms < best_ms:
                best, best_ms = cfg, ms
        for rows_, k, warps, split in DOWN:
            if inter % (k * split):
                continue  # the K splits must hold whole chunks
            cfg = best[:3] + (rows_, k, warps, best[6], split)
            ms = timed(cfg, 16)
            if ms is not None and ms < best_ms:
                best, best_ms = cfg, ms
        for stages in (2, 3):
            cfg = best[:6] + (stages, best[7])
            ms = timed(cfg, 16)
            if ms is not None and ms < best_ms:
                best, best_ms = cfg, ms
        other = 3 - args.slots
        timed(best, 16, n=other)
        timed(best, 8, n=1)
        timed(best, 8, n=2)
        timed(best, 16, pre=not args.pre)
        timed(best, 16, n=other, pre=not args.pre)
    df = pd.DataFrame(rows)
    df.to_csv(args.out, index=False)
    print("best per precision and slots (GB/s: bytes of the experts read over the time):")
    for (bits, slots), g in df.groupby(["bits", "slots"]):
        for path, gp in g.groupby("path"):
            b = gp.loc[gp.ms.idxmin()]
            print(f"{bits:2d} bits {slots} slot(s) {path:6s} {b.ms:8.4f} ms {b.gbps:6.0f} GB/s err {b.err:.2e} {b.cfg}")


if __name__ == "__main__":
    main()
