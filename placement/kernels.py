"""Fused dequantize-and-multiply Triton kernels for routed experts at decode.

At decode a layer runs a few (token, expert) pairs, each a matrix-vector product, so an expert costs
the time to read its bytes. These kernels read each expert straight from its packed buffer (see
packed.py), so a lower precision costs less time. One launch pair covers every slot of a layer at
one precision; expert addresses come from a device table, so nothing syncs with the host and a
decode step can be captured in a CUDA graph.

- 16-bit: the weights are multiplied in fp32 as they are read.
- 8/4/2-bit: the activations are quantized per quantization group to int16 (exact to about 5e-5 of
  the output; a small kernel, once per call) and meet the codes as integers: a 32-bit word of 4
  codes and two words of int16 activations in one dp2a.lo and one dp2a.hi. Turning every code into
  a float and multiplying it had cost about three instructions per weight and bound these kernels.
  Measured on an H200 (experiments/bench_dp4a.py at ec88c02, one Mixtral expert, one slot / the two
  slots of a decode token, ms): 4-bit 0.048 -> 0.041 / 0.087 -> 0.066, 2-bit 0.043 -> 0.041 /
  0.071 -> 0.054, against bf16 0.088 / 0.172. Each thread holds whole quantization groups of a K
  chunk (_tile), so the K loop sums and scales them without shuffles, shared memory or barriers.

- kernel 1, grid (slot, row block): h = silu(x @ gate.T) * (x @ up.T) for a block of I rows, into
  an fp32 scratch [S, I]. hqq's 4-bit packing puts gate row j and up row j in the two nibbles of
  one byte (2-bit: gate rows j, j+I/2 and up rows j, j+I/2), so one load feeds both products.
- kernel 2, grid (slot, row block, K split): y = down @ h, out[token] += weight * y (atomic adds,
  so the K dimension can be split to fill the GPU when H is small).

With more tokens (continuous batching) an expert chosen by n tokens would be read n times, once per
slot. `moe_experts_grouped` groups the (token, expert) slots by expert on the device (a sort, no
host sync, a grid from shapes only) and reads each expert once per block of up to 32 of its tokens,
multiplying with tl.dot (tensor cores) on the integer codes. Measured on an H200 (one Mixtral
expert, bf16), at 1 / 4 / 16 / 32 tokens: 16-bit 0.100 / 0.111 / 0.115 / 0.130 ms (slot kernels
0.088 / 0.201 / 0.756 / 1.53), 4-bit 0.089 / 0.095 / 0.096 / 0.151 (slots, float codes: 0.058 /
0.186 / 0.685 / 1.35), 2-bit 0.083 / 0.089 / 0.090 / 0.134. Quantized, they read about 1 TB/s
(unpacking codes for tl.dot costs instructions; dequantizing whole [rows, K] tiles to bf16 before
one dot was slower still, experiments/bench_grouped.py at ec88c02), so one token per expert stays
with the slot kernels (the engine's GROUPED_MIN_TOKENS_PER_EXPERT). 4-bit calls of DEQ_MIN_TOKENS
tokens or more (prefill chunks) take grouped kernels that dequantize each group's codes in bf16 before
an accumulating dot, about 0.78 of these at 32-256 tokens of a layer.

Accumulation is fp32 (int32 within a group). Within a quantization group,
sum((q - z) * s * x) = s * (sum(q * x) - z * sum(x)), so scale and zero cost one multiply per group,
not per weight.

Without CUDA the same kernels run in Triton's interpreter (slow; for tests).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from placement.experts import expert_forward
from placement.packed import Layout, expert_layout
from placement.tiers import in_kernels, leaves_kernels

log = logging.getLogger(__name__)

BITS = (16, 8, 4, 2)  # precisions with a kernel; 3-bit (10 values per int32) falls back to eager

try:
    import triton
    import triton.language as tl

    # The interpreter is chosen when the kernels are defined (as triton.jit does from the env var);
    # without CUDA nothing else could run them, so no CUDA implies the interpreter, env var or not.
    _INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()
    if _INTERPRET:
        from triton.runtime.interpreter import InterpretedFunction as _jit
    else:
        _jit = triton.jit
    _constexpr = tl.constexpr  # globals a kernel reads must be constexpr
except ImportError:  # the module still imports; available() says False
    triton = None
    _INTERPRET = False

    class tl:  # noqa: N801 - stands in for triton.language in the kernels' annotations
        constexpr = None

    def _jit(fn):
        return fn

    def _constexpr(value):
        return value


def available(device) -> bool:
    """Whether the kernels can run on `device`: triton is installed and the device is CUDA, or the
    kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, or no CUDA at all)."""
    if triton is None:
        return False
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available()
    return _INTERPRET


def _dims(layout: Layout) -> tuple[int, int]:
    (_, (two_i, hidden)), _ = layout.matrices
    return hidden, two_i // 2


def _is_silu(act_fn) -> bool:
    if "SiLU" in type(act_fn).__name__ or act_fn is F.silu:
        return True
    try:  # any other callable that computes SiLU (e.g. a wrapper) is fine too
        v = torch.linspace(-6, 6, 25)
        return bool(torch.allclose(act_fn(v), F.silu(v), atol=1e-6))
    except Exception:
        return False


def supports(layout: Layout, act_fn) -> bool:
    """Whether moe_experts can run experts of `layout` with activation `act_fn` (else: eager path)."""
    hidden, inter = _dims(layout)
    gs = layout.group_size
    if layout.bits not in BITS or layout.dtype not in _TL_DTYPES or not _is_silu(act_fn):
        return False
    if layout.bits == 16:
        return hidden % 16 == 0 and inter % 16 == 0
    # groups must tile both K dimensions; 2-bit packs quarters of rows, so the quarter boundaries
    # must fall on whole rows (gate_up has 2I rows, down H); a group's sum of codes times int16
    # activations must fit in int32 (8-bit: groups of up to 256)
    return (gs >= 16 and gs & (gs - 1) == 0 and hidden % gs == 0 and inter % gs == 0
            and ((1 << layout.bits) - 1) * 32767 * gs < 2 ** 31
            and (layout.bits != 2 or (inter % 2 == 0 and hidden % 4 == 0)))


def expert_table(buffers, device=None) -> torch.Tensor:
    """int64 addresses of `buffers` (0 for None), on `device` (default: the first buffer's)."""
    if device is None:
        device = next((b.device for b in buffers if b is not None), "cpu")
    return torch.tensor([0 if b is None else b.data_ptr() for b in buffers], dtype=torch.int64, device=device)


class KernelTables:
    """What the kernels run at decode, per MoE layer, under the current plan: per precision an
    [L, E] table of expert addresses (0: not at that precision), an [L, E] mask of the experts left
    to the per-expert loop, the precisions each layer launches (`fast_bits`) and whether it leaves
    the kernels (`layer_eager`). The tensors are updated in place, so captured CUDA graphs that read
    them stay valid.

    `act_fns`: per layer, its experts' activation; `layout(bits, group_size)`: an expert's Layout.
    """

    def __init__(self, act_fns, layout, num_experts: int, device, *, enabled: bool):
        self.act_fns, self.layout, self.enabled = act_fns, layout, enabled
        L, E = len(act_fns), num_experts
        self.tables = {b: torch.zeros(L, E, dtype=torch.int64, device=device) for b in BITS}
        self.eager_mask = torch.ones(L, E, dtype=torch.bool, device=device)
        self.fast_bits: list[tuple[int, ...]] = [()] * L
        self.layer_eager = [True] * L
        self._supported: dict[tuple, bool] = {}

    def enable(self, enabled: bool) -> None:
        self.enabled = enabled
        self._supported.clear()

    def supported(self, layout: Layout, layer: int) -> bool:
        """Whether experts of `layout` in MoE layer `layer` run in the kernels."""
        key = (layout, layer)
        if key not in self._supported:
            self._supported[key] = self.enabled and supports(layout, self.act_fns[layer])
        return self._supported[key]

    def fused_bits(self, layer: int, group_size: int) -> tuple[int, ...]:
        """The precisions that run in the kernels in MoE layer `layer`."""
        return tuple(b for b in BITS if self.supported(self.layout(b, group_size), layer))

    def refresh(self, plan, address) -> None:
        """Point the tables at the accelerator experts of `plan` that the kernels run;
        `address(eid)`: the data pointer of a resident expert's buffer."""
        L, E = self.eager_mask.shape
        fused = [self.fused_bits(l, plan.group_size) for l in range(L)]
        ptrs = {b: torch.zeros(L, E, dtype=torch.int64) for b in self.tables}
        eager = torch.ones(L, E, dtype=torch.bool)
        for eid, state in plan.items():
            if in_kernels(state, fused[eid.layer]):
                ptrs[state.bits][eid.layer, eid.expert] = address(eid)
                eager[eid.layer, eid.expert] = False
        for b, table in self.tables.items():
            table.copy_(ptrs[b])  # in place: captured graphs read these tensors
        self.eager_mask.copy_(eager)
        self.fast_bits = [tuple(b for b in ptrs if ptrs[b][l].any()) for l in range(L)]
        self.layer_eager = [leaves_kernels(row, fused[l]) for l, row in enumerate(plan.states)]


# --- kernels ------------------------------------------------------------------------------------
# Shapes inside: a block of rows [BJ] times a K chunk viewed as [NG, GS] (NG groups of GS columns),
# so a weight tile is [BJ, NG, GS] and per-group scale/zero tiles are [BJ, NG].


# triton.language's own jitted helpers (tl.sum, tl.sigmoid, tl.zeros) are compiled or interpreted as
# decided when triton was first imported, often before this module (torch imports it), so calling
# them breaks the interpreter; the kernels use only builtins and these. _sum_combine as the reduce's
# combine function keeps the interpreter's numpy fast path (it checks for that function).
@_jit
def _rsum(x, axis: tl.constexpr, keep_dims: tl.constexpr = False):
    return tl.reduce(x, axis, tl.standard._sum_combine, keep_dims=keep_dims)


@_jit
def _silu_mul(g, u):
    return g / (1.0 + tl.exp(-g)) * u


# A slot kernel's slot s reads its expert's address from ptr_tab[s], or with INDEXED from the
# layer's table of addresses ptr_tab[idx_tab[s]] (idx_tab: the router's top-k index, flattened),
# and its token from tok_tab[s], or with TOKEN_DIV > 0 as s // TOKEN_DIV (top-k slots in token
# order). A decode layer so launches no gather or arange of its own; the gate_up kernels may also
# count the routing (COUNT: cnt_ptr[idx_tab[s]] += 1) and zero the output rows the down kernels add
# into (ZERO_BLOCK > 0), the small kernels a layer call would otherwise launch around the experts
# (several µs each in a CUDA graph at batch 1).


@_jit
def _slot_addr(ptr_tab, idx_tab, s, INDEXED: tl.constexpr):
    if INDEXED:
        addr = tl.load(ptr_tab + tl.load(idx_tab + s))
    else:
        addr = tl.load(ptr_tab + s)
    return addr


@_jit
def _slot_token(tok_tab, s, TOKEN_DIV: tl.constexpr):
    if TOKEN_DIV > 0:
        t = s // TOKEN_DIV
    else:
        t = tl.load(tok_tab + s)
    return t


@_jit
def _slot_side_work(idx_tab, cnt_ptr, out_ptr, s, t, H: tl.constexpr, COUNT: tl.constexpr,
                    ZERO_BLOCK: tl.constexpr):
    """Before a gate_up program's expert work, empty slot or not: the routing count of slot s (by its
    first program) and, ZERO_BLOCK > 0, its share of token t's output row set to zero (the programs
    of a slot cover the row; the down kernels, launched after, add into it)."""
    if COUNT:
        if tl.program_id(1) == 0:
            tl.atomic_add(cnt_ptr + tl.load(idx_tab + s), 1, sem="relaxed")
    if ZERO_BLOCK > 0:
        c = tl.program_id(1) * ZERO_BLOCK + tl.arange(0, ZERO_BLOCK)
        tl.store(out_ptr + t * H + c, tl.full([ZERO_BLOCK], 0.0, tl.float32), mask=c < H)


# --- overlapping a call's kernels (Hopper and later) ---------------------------------------------
# At one or two slots each kernel of a call is about one wave, so its launch and ramp are a share of
# its time. With programmatic dependent launch (PDL) a kernel's programs may be placed while the
# kernel before it still runs; they wait (griddepcontrol.wait) before any global access, so none
# reads or writes anything early and none completes before the kernel it follows (each wait covers
# everything launched before). A kernel says when its successor may launch
# (griddepcontrol.launch_dependents) right at its start.
@_jit
def _gdc_wait(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()


@_jit
def _gdc_launch(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@_jit
def _gate_up_kernel(
    x_ptr, ptr_tab, idx_tab, tok_tab, cnt_ptr, out_ptr, h_ptr,
    H: tl.constexpr, I: tl.constexpr, DTYPE: tl.constexpr, W_OFF: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    INDEXED: tl.constexpr, TOKEN_DIV: tl.constexpr, COUNT: tl.constexpr, ZERO_BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    """16-bit experts: h[s] = silu(x[t] @ gate.T) * (x[t] @ up.T) for a block of rows, t slot s's token."""
    _gdc_wait(PDL)
    _gdc_launch(PDL)
    s = tl.program_id(0)
    t = _slot_token(tok_tab, s, TOKEN_DIV)
    _slot_side_work(idx_tab, cnt_ptr, out_ptr, s, t, H, COUNT, ZERO_BLOCK)
    addr = _slot_addr(ptr_tab, idx_tab, s, INDEXED)
    if addr != 0:  # 0: an empty slot
        # fields are 64-byte aligned; said on the pointer itself (a hint on the integer is lost in the
        # cast), or every load is a single byte
        base = tl.multiple_of(addr.to(tl.pointer_type(tl.uint8)), 64)
        w = (base + W_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
        j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        jm = j < I
        kk = tl.arange(0, BLOCK_K)
        g = tl.full([BLOCK_J], 0.0, tl.float32)
        u = tl.full([BLOCK_J], 0.0, tl.float32)
        for k0 in range(0, H, BLOCK_K):
            x = tl.load(x_ptr + t * H + k0 + kk).to(tl.float32)
            offs = j[:, None] * H + k0 + kk[None, :]
            g += _rsum(tl.load(w + offs, mask=jm[:, None], other=0.0).to(tl.float32) * x[None, :], 1)
            u += _rsum(tl.load(w + I * H + offs, mask=jm[:, None], other=0.0).to(tl.float32) * x[None, :], 1)
        tl.store(h_ptr + s * I + j, _silu_mul(g, u), mask=jm)


@_jit
def _down_kernel(
    h_ptr, ptr_tab, idx_tab, tok_tab, wt_tab, out_ptr,
    H: tl.constexpr, I: tl.constexpr, DTYPE: tl.constexpr, W_OFF: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    INDEXED: tl.constexpr, TOKEN_DIV: tl.constexpr, PDL: tl.constexpr,
):
    """16-bit experts: out[t] += weight * (down @ h[s]) for a block of rows and a K split (atomic
    adds, so K can be split to fill the GPU when H is small)."""
    _gdc_wait(PDL)
    _gdc_launch(PDL)
    s = tl.program_id(0)
    addr = _slot_addr(ptr_tab, idx_tab, s, INDEXED)
    if addr != 0:
        t = _slot_token(tok_tab, s, TOKEN_DIV)
        weight = tl.load(wt_tab + s).to(tl.float32)
        base = tl.multiple_of(addr.to(tl.pointer_type(tl.uint8)), 64)
        w = (base + W_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
        KS: tl.constexpr = I // SPLIT_K
        j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        jm = j < H
        kk = tl.arange(0, BLOCK_K)
        a = tl.full([BLOCK_J], 0.0, tl.float32)
        kstart = tl.program_id(2) * KS
        for k0 in range(kstart, kstart + KS, BLOCK_K):
            hv = tl.load(h_ptr + s * I + k0 + kk)
            wv = tl.load(w + j[:, None] * I + k0 + kk[None, :], mask=jm[:, None], other=0.0).to(tl.float32)
            a += _rsum(wv * hv[None, :], 1)
        tl.atomic_add(out_ptr + t * H + j, weight * a, mask=jm, sem="relaxed")


# --- quantized slot kernels: integer activations ------------------------------------------------
# The activations are quantized per quantization group to int16 (scale max|x| / 32767, by
# _quantize_kernel once per call: quantizing inside every program made the L1 the bottleneck), and a
# 32-bit word of 4 codes (bytes) meets two words of two int16 activations in one dp2a.lo and one
# dp2a.hi. A word of 4-bit codes holds 8 weights (the gate's in the high nibbles, the up's in the
# low): a shift, two ands and four dp2a. Per group and row: s * sx * (sum(q * xq) - z * sum(xq)), in
# int32 then fp32. int8 activations (dp4a, as llama.cpp's q8_1) were no faster on the H200 and
# 1-2% off. In the interpreter, dp2a is emulated by integer ops.


@_jit
def _rmax(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@_jit
def _ubyte(w, i: tl.constexpr):
    """Unsigned byte i of int32 words w."""
    return (w >> (8 * i)) & 0xFF


@_jit
def _idot(codes, xa, xb):
    """Per int32 word of 4 codes (unsigned bytes; column 4w + i in byte i): the codes times their
    columns' int16 activations (xa: columns 4w, 4w + 1 in its low and high half; xb: 4w + 2, 4w + 3),
    summed in int32, by integer ops (the interpreter's form of a dp2a.lo and a dp2a.hi)."""
    return (_ubyte(codes, 0) * ((xa << 16) >> 16) + _ubyte(codes, 1) * (xa >> 16)
            + _ubyte(codes, 2) * ((xb << 16) >> 16) + _ubyte(codes, 3) * (xb >> 16))


# _idot of four words summed (inputs xa, xb, codes of word 0, then of 1, 2, 3) in one chain of
# dp2a, each accumulating into the next: no adds of the words' sums
_ASM_IDOT4 = _constexpr("{.reg .s32 t; mov.s32 t, 0; " + " ".join(
    f"dp2a.lo.s32.u32 t, ${3 * i + 1}, ${3 * i + 3}, t; dp2a.hi.s32.u32 {'$0' if i == 3 else 't'}, ${3 * i + 2}, "
    f"${3 * i + 3}, t;" for i in range(4)) + "}")


@_jit
def _quarters(w):
    """The four slices of w along its last dim (size 4, a thread's vector: free to split)."""
    a, b = tl.split(tl.reshape(w, w.shape[:-1] + [2, 2]))
    w0, w2 = tl.split(a)
    w1, w3 = tl.split(b)
    return w0, w1, w2, w3


@_jit
def _idot4(codes, xa, xb, FAST: tl.constexpr):
    """_idot summed over a tile's last dim (a thread's 4 words): codes.shape[:-1]. FAST: one dp2a
    chain (GPU); else integer ops."""
    if FAST:
        c0, c1, c2, c3 = _quarters(codes)
        a0, a1, a2, a3 = _quarters(xa)
        b0, b1, b2, b3 = _quarters(xb)
        return tl.inline_asm_elementwise(_ASM_IDOT4, "=r" + ",r" * 12,
                                         [a0, b0, c0, a1, b1, c1, a2, b2, c2, a3, b3, c3],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        return _rsum(_idot(codes, xa, xb), 3)


@_jit
def _round(v):
    return tl.where(v >= 0, v + 0.5, v - 0.5).to(tl.int32)


@_jit
def _quantize_kernel(x_ptr, skip_ptr, idx_ptr, qa_ptr, qb_ptr, qs_ptr, qn_ptr, K: tl.constexpr, GS: tl.constexpr,
                     BLOCK_K: tl.constexpr, SKIP: tl.constexpr, INDEXED: tl.constexpr, PDL: tl.constexpr):
    """Row program_id(0) of x [rows, K], columns program_id(1) * BLOCK_K + [0, BLOCK_K), quantized per
    group of GS to int16 (scale max|x| / 32767): the words _idot takes (qa, qb int32 [rows, K/4]),
    the groups' scales (qs fp32 [rows, K/GS]) and sums of their integers (qn int32). SKIP: rows
    whose slot address (int64, skip_ptr[r], or INDEXED skip_ptr[idx_ptr[r]]) is 0 are left alone
    (empty slots: nothing wrote them)."""
    _gdc_wait(PDL)
    _gdc_launch(PDL)
    r = tl.program_id(0)
    if SKIP:
        if _slot_addr(skip_ptr, idx_ptr, r, INDEXED) == 0:
            return
    k0 = tl.program_id(1) * BLOCK_K
    NG: tl.constexpr = BLOCK_K // GS
    GW: tl.constexpr = GS // 4
    gi = tl.arange(0, NG)
    wi = tl.arange(0, GW)
    c = r * K + k0 + gi[:, None, None] * GS + wi[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]
    v = tl.load(x_ptr + c).to(tl.float32)  # [NG, GW, 4]: column 4w + i at [g, w, i]
    a, b = tl.split(tl.reshape(v, (NG, GW, 2, 2)))  # a: columns 4w, 4w + 2; b: 4w + 1, 4w + 3
    v0, v2 = tl.split(a)
    v1, v3 = tl.split(b)
    amax = _rmax(tl.maximum(tl.maximum(tl.abs(v0), tl.abs(v1)), tl.maximum(tl.abs(v2), tl.abs(v3))), 1)
    amax = tl.maximum(amax, 1e-30)  # (a group of zeros stays zeros)
    inv = (32767.0 / amax)[:, None]
    q0 = _round(v0 * inv)
    q1 = _round(v1 * inv)
    q2 = _round(v2 * inv)
    q3 = _round(v3 * inv)
    w = r * (K // 4) + k0 // 4 + gi[:, None] * GW + wi[None, :]
    tl.store(qa_ptr + w, (q0 & 0xFFFF) | (q1 << 16))
    tl.store(qb_ptr + w, (q2 & 0xFFFF) | (q3 << 16))
    g = r * (K // GS) + k0 // GS + gi
    tl.store(qs_ptr + g, amax / 32767.0)
    tl.store(qn_ptr + g, _rsum(q0 + q1 + q2 + q3, 1))


@_jit
def _int_group_dot(words, BITS: tl.constexpr, IDX: tl.constexpr, xa, xb, sx, xn, scale_ptr, zero_ptr, grp, rmask,
                   GS: tl.constexpr, FAST: tl.constexpr):
    """Per row and group of a tile (_tile): s * sx * (sum(q * xq) - z * sum(xq)) for the codes q at
    IDX (0: the high bits) of each byte of the int32 words, xa, xb from _quantize_kernel as words of
    the tile, sx, xn and grp one per group. A field is masked in place where its group's sum fits
    int32 (codes of up to 255 at group sizes up to 256): the sum is then 2^shift too large, taken
    off in float (exactly), which saves a shift per word."""
    SHIFT: tl.constexpr = 8 - BITS * (IDX + 1)
    FIELD: tl.constexpr = ((1 << BITS) - 1) * 0x01010101  # one code's bits in every byte
    IN_PLACE: tl.constexpr = (((1 << BITS) - 1) << SHIFT) * 32767 * GS < 2**31
    if BITS == 8:
        codes = words
    elif IN_PLACE:
        codes = (words.to(tl.uint32, bitcast=True) & (FIELD << SHIFT)).to(tl.int32, bitcast=True)
    else:
        codes = (words >> SHIFT) & FIELD
    qx = _group_sums(_idot4(codes, xa, xb, FAST)).to(tl.float32)
    if IN_PLACE and SHIFT > 0:
        qx = qx * (1.0 / (1 << SHIFT))
    s = tl.load(scale_ptr + grp, mask=rmask, other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + grp, mask=rmask, other=0.0).to(tl.float32)
    return s * sx * (qx - z * xn.to(tl.float32))


# A K chunk of the quantized slot kernels: rows x NG groups x GS/4 int32 words, as a 4D tile whose
# words are (q, v), word 4q + v of its group. A load's 16-byte vectors run along v, and Triton
# spreads threads over the other dims in an order it picks among equals: by index up to 3.6,
# reversed from 3.7. The dims are placed so that q comes last and the groups first: q then repeats in
# each thread's registers, which hold whole groups, and the threads run along the groups as in the
# loads of the groups' scales. A group's words sum in-thread and its scale applies in the load's own
# layout: no shuffles, and shared memory only to broadcast the activations (_load_act); for sm_90
# about a third fewer instructions per weight than words spread over threads, with either order.
_Q_FIRST = _constexpr(triton is not None and tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 7))


@_jit
def _tile(j, NG: tl.constexpr, GS: tl.constexpr):
    """Index tensors of a tile for rows j: rows, groups, words in the group, broadcast to
    [GS/16, BJ, NG, 4] (_Q_FIRST: q, rows, groups, v) or [NG, BJ, GS/16, 4] (groups, rows, q, v)."""
    q = tl.arange(0, GS // 16)
    v = tl.arange(0, 4)[None, None, None, :]
    g = tl.arange(0, NG)
    if _Q_FIRST:
        return j[None, :, None, None], g[None, None, :, None], q[:, None, None, None] * 4 + v
    else:
        return j[None, :, None, None], g[:, None, None, None], q[None, None, :, None] * 4 + v


@_jit
def _group_sums(vectors):
    """A tile's sums per 16-byte vector (the tile less its last dim, v) summed over their group: one
    per group, [1, BJ, NG, 1] or [NG, BJ, 1, 1]."""
    return _rsum(vectors[:, :, :, None], 0 if _Q_FIRST else 2, True)


@_jit
def _row_sums(acc):
    """Per-group terms summed per row: [BJ]."""
    return _rsum(_rsum(_rsum(acc, 3), 2), 0)


@_jit
def _load_act(qa_ptr, qb_ptr, qs_ptr, qn_ptr, row, K: tl.constexpr, k0, gi, wi, GS: tl.constexpr):
    """_quantize_kernel's output for row `row`, columns k0 + [0, NG * GS): words at (group gi, word wi
    of the group), scales and sums at gi. Loaded once and broadcast over the tile's rows through
    shared memory (a barrier each K chunk): on the H200 3-9% faster than each row's threads loading
    their own copy from L1 in the codes' layout (experiments/results/ab_kernels_h200.csv)."""
    GW: tl.constexpr = GS // 4
    w = row * (K // 4) + k0 // 4 + gi * GW + wi
    g = row * (K // GS) + k0 // GS + gi
    return tl.load(qa_ptr + w), tl.load(qb_ptr + w), tl.load(qs_ptr + g), tl.load(qn_ptr + g)


@_jit
def _int_fields(addr, W_OFF: tl.constexpr, S_OFF: tl.constexpr, Z_OFF: tl.constexpr, DTYPE: tl.constexpr):
    """A quantized expert's codes (as int32 words of 4 bytes), scales and zeros in the buffer at addr
    (fields 64-byte aligned, said on the pointer so the loads are wide)."""
    base = tl.multiple_of(addr.to(tl.pointer_type(tl.uint8)), 64)
    return ((base + W_OFF).to(tl.pointer_type(tl.int32), bitcast=True),
            (base + S_OFF).to(tl.pointer_type(DTYPE), bitcast=True),
            (base + Z_OFF).to(tl.pointer_type(DTYPE), bitcast=True))


@_jit
def _gate_up_int_kernel(
    qa_ptr, qb_ptr, qs_ptr, qn_ptr, ptr_tab, idx_tab, tok_tab, cnt_ptr, out_ptr, h_ptr,
    H: tl.constexpr, I: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, DTYPE: tl.constexpr,
    W_OFF: tl.constexpr, S_OFF: tl.constexpr, Z_OFF: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, FAST: tl.constexpr,
    INDEXED: tl.constexpr, TOKEN_DIV: tl.constexpr, COUNT: tl.constexpr, ZERO_BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    """Quantized experts: h[s] = silu(x[t] @ gate.T) * (x[t] @ up.T) for a block of I rows, x[t] as
    _quantize_kernel wrote it. hqq's 4-bit packing puts gate row j and up row j in the two nibbles of
    one byte (2-bit: gate rows j, j + I/2 and up rows j, j + I/2), so one word feeds both."""
    _gdc_wait(PDL)
    _gdc_launch(PDL)
    s = tl.program_id(0)
    t = _slot_token(tok_tab, s, TOKEN_DIV)
    _slot_side_work(idx_tab, cnt_ptr, out_ptr, s, t, H, COUNT, ZERO_BLOCK)
    addr = _slot_addr(ptr_tab, idx_tab, s, INDEXED)
    if addr != 0:
        wq, sc, zr = _int_fields(addr, W_OFF, S_OFF, Z_OFF, DTYPE)
        NG: tl.constexpr = BLOCK_K // GS
        GW: tl.constexpr = GS // 4
        HALF: tl.constexpr = I // 2
        ROWG: tl.constexpr = H // GS  # groups per row
        ROWS: tl.constexpr = HALF if BITS == 2 else I  # programs cover these rows (2-bit: two per code)
        j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)  # gate rows (2-bit: also j + I/2)
        jm = j < ROWS
        rows, gi, wi = _tile(j, NG, GS)
        rmask = rows < ROWS
        g0 = (rows + gi) * 0.0  # per-group terms, summed per row after the loop
        u0 = (rows + gi) * 0.0
        g1 = (rows + gi) * 0.0  # 2-bit: rows j + I/2
        u1 = (rows + gi) * 0.0
        for k0 in range(0, H, BLOCK_K):
            xa, xb, sx, xn = _load_act(qa_ptr, qb_ptr, qs_ptr, qn_ptr, t, H, k0, gi, wi, GS)
            words = rows * (H // 4) + k0 // 4 + gi * GW + wi
            codes = tl.load(wq + words, mask=rmask, other=0)
            grp = rows * ROWG + k0 // GS + gi
            if BITS == 8:  # a byte per weight; up rows start at row I
                up = tl.load(wq + I * (H // 4) + words, mask=rmask, other=0)
                g0 += _int_group_dot(codes, 8, 0, xa, xb, sx, xn, sc, zr, grp, rmask, GS, FAST)
                u0 += _int_group_dot(up, 8, 0, xa, xb, sx, xn, sc, zr, grp + I * ROWG, rmask, GS, FAST)
            elif BITS == 4:  # byte [j, k] = gate[j, k] << 4 | up[j, k]
                g0 += _int_group_dot(codes, 4, 0, xa, xb, sx, xn, sc, zr, grp, rmask, GS, FAST)
                u0 += _int_group_dot(codes, 4, 1, xa, xb, sx, xn, sc, zr, grp + I * ROWG, rmask, GS, FAST)
            else:  # byte [j, k] = gate[j] << 6 | gate[j + I/2] << 4 | up[j] << 2 | up[j + I/2]
                g0 += _int_group_dot(codes, 2, 0, xa, xb, sx, xn, sc, zr, grp, rmask, GS, FAST)
                g1 += _int_group_dot(codes, 2, 1, xa, xb, sx, xn, sc, zr, grp + HALF * ROWG, rmask, GS, FAST)
                u0 += _int_group_dot(codes, 2, 2, xa, xb, sx, xn, sc, zr, grp + I * ROWG, rmask, GS, FAST)
                u1 += _int_group_dot(codes, 2, 3, xa, xb, sx, xn, sc, zr, grp + (I + HALF) * ROWG, rmask, GS, FAST)
        g0 = _row_sums(g0)
        u0 = _row_sums(u0)
        g1 = _row_sums(g1)
        u1 = _row_sums(u1)
        hrow = h_ptr + s * I
        tl.store(hrow + j, _silu_mul(g0, u0), mask=jm)
        if BITS == 2:
            tl.store(hrow + HALF + j, _silu_mul(g1, u1), mask=jm)


@_jit
def _down_int_kernel(
    qa_ptr, qb_ptr, qs_ptr, qn_ptr, ptr_tab, idx_tab, tok_tab, wt_tab, out_ptr,
    H: tl.constexpr, I: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, DTYPE: tl.constexpr,
    W_OFF: tl.constexpr, S_OFF: tl.constexpr, Z_OFF: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, FAST: tl.constexpr,
    INDEXED: tl.constexpr, TOKEN_DIV: tl.constexpr, PDL: tl.constexpr,
):
    """Quantized experts: out[t] += weight * (down @ h[s]), h[s] as _quantize_kernel wrote it, for a
    block of rows and a K split (atomic adds)."""
    _gdc_wait(PDL)
    _gdc_launch(PDL)
    s = tl.program_id(0)
    addr = _slot_addr(ptr_tab, idx_tab, s, INDEXED)
    if addr != 0:
        t = _slot_token(tok_tab, s, TOKEN_DIV)
        weight = tl.load(wt_tab + s).to(tl.float32)
        wq, sc, zr = _int_fields(addr, W_OFF, S_OFF, Z_OFF, DTYPE)
        NG: tl.constexpr = BLOCK_K // GS
        GW: tl.constexpr = GS // 4
        # a byte holds P weights, of rows r, r + H/P, ... (high bits first): programs cover H/P rows
        P: tl.constexpr = 8 // BITS
        R: tl.constexpr = H // P
        ROWG: tl.constexpr = I // GS
        KS: tl.constexpr = I // SPLIT_K
        j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        jm = j < R
        rows, gi, wi = _tile(j, NG, GS)
        rmask = rows < R
        a0 = (rows + gi) * 0.0  # per-group terms, summed per row after the loop
        a1 = (rows + gi) * 0.0
        a2 = (rows + gi) * 0.0
        a3 = (rows + gi) * 0.0
        kstart = tl.program_id(2) * KS
        for k0 in range(kstart, kstart + KS, BLOCK_K):
            ha, hb, sh, hn = _load_act(qa_ptr, qb_ptr, qs_ptr, qn_ptr, s, I, k0, gi, wi, GS)
            codes = tl.load(wq + rows * (I // 4) + k0 // 4 + gi * GW + wi, mask=rmask, other=0)
            grp = rows * ROWG + k0 // GS + gi
            # byte [r, k] holds rows r, r + R, ... (high bits first); 8-bit: row r
            a0 += _int_group_dot(codes, BITS, 0, ha, hb, sh, hn, sc, zr, grp, rmask, GS, FAST)
            if P >= 2:
                a1 += _int_group_dot(codes, BITS, 1, ha, hb, sh, hn, sc, zr, grp + R * ROWG, rmask, GS, FAST)
            if P == 4:
                a2 += _int_group_dot(codes, BITS, 2, ha, hb, sh, hn, sc, zr, grp + 2 * R * ROWG, rmask, GS, FAST)
                a3 += _int_group_dot(codes, BITS, 3, ha, hb, sh, hn, sc, zr, grp + 3 * R * ROWG, rmask, GS, FAST)
        a0 = _row_sums(a0)
        a1 = _row_sums(a1)
        a2 = _row_sums(a2)
        a3 = _row_sums(a3)
        orow = out_ptr + t * H + j
        tl.atomic_add(orow, weight * a0, mask=jm, sem="relaxed")
        if P >= 2:
            tl.atomic_add(orow + R, weight * a1, mask=jm, sem="relaxed")
        if P == 4:
            tl.atomic_add(orow + 2 * R, weight * a2, mask=jm, sem="relaxed")
            tl.atomic_add(orow + 3 * R, weight * a3, mask=jm, sem="relaxed")


# --- grouped kernels: tokens grouped by expert, one weight read per block of tokens -------------
# At batch T with top-k routing an expert chosen by n tokens would be read n times by the slot
# kernels above. These read it once per BLOCK_M of its tokens: the (token, choice) slots are sorted
# by expert on the device (group_tokens), and a program takes one expert, one block of its sorted
# slots and one block of output rows, multiplying with tl.dot (fp32 accumulation).
# - Products are computed transposed, rows x tokens: the weight tile [BJ, BK] is the dot's left
#   operand, which stays in registers as it is unpacked (Hopper's wgmma reads only the right one
#   from shared memory; its M is 64 rows), and the token block [BK, BM] the right one, padded to
#   16 tokens for tl.dot and masked.
# - Quantized weights go into the dot as their integer codes (exact in bf16/fp16 up to 255), one
#   quantization group per K step; scale and zero apply per group and row:
#   sum((q - z) * s * x) = s * (q @ x - z * sum(x)).
# - gate_up writes gate and up before the activation into an fp32 scratch [T*k, 2I], so its K (H)
#   can be split over programs that add atomically; down applies silu(gate) * up as it reads them.
# - Dot operands are DOT: the model's dtype on a GPU (fp32 ones multiplied as fp32, not TF32); fp32
#   in the interpreter, whose dot reads bf16 as raw integers (bf16 values and their products are
#   exact in fp32).


@_jit
def _unpack(b, BITS: tl.constexpr, IDX: tl.constexpr):
    """Code IDX (0: the high bits) of bytes b (int32) that hold 8 // BITS codes each."""
    SHIFT: tl.constexpr = 8 - BITS * (IDX + 1)
    return (b >> SHIFT) & ((1 << BITS) - 1)


@_jit
def _mma(a, b, IEEE: tl.constexpr):
    """a [M, K] @ b [K, N] in fp32; IEEE: fp32 operands multiplied as fp32 (no TF32)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


# Codes to bf16 cheaply (GPU, bf16 models): the bits 0x4300 | q read as a bf16 are 128 + q exactly
# (q < 128), so four bytes become their 8 (4-bit) or 16 (2-bit) codes in bf16 pairs with a byte
# permute and one lop3 ((a & b) | c) per pair, about one instruction per weight instead of the
# ~5 of shift, mask, int->float, float->bf16 and packing, which bound these kernels; the 128 is
# taken off with the zero (_group_mma's OFF). Outputs: the codes from the high bits down.
_ASM_CODES4 = _constexpr("""{
    .reg .b32 t0, t1, u0, u1;
    prmt.b32 t0, $4, 0, 0x4140;
    prmt.b32 t1, $4, 0, 0x4342;
    shr.b32 u0, t0, 4;
    shr.b32 u1, t1, 4;
    lop3.b32 $0, u0, 0x000F000F, 0x43004300, 0xEA;
    lop3.b32 $1, u1, 0x000F000F, 0x43004300, 0xEA;
    lop3.b32 $2, t0, 0x000F000F, 0x43004300, 0xEA;
    lop3.b32 $3, t1, 0x000F000F, 0x43004300, 0xEA;
    }""")
_ASM_CODES2 = _constexpr("""{
    .reg .b32 t0, t1, u0, u1;
    prmt.b32 t0, $8, 0, 0x4140;
    prmt.b32 t1, $8, 0, 0x4342;
    shr.b32 u0, t0, 6;
    shr.b32 u1, t1, 6;
    lop3.b32 $0, u0, 0x00030003, 0x43004300, 0xEA;
    lop3.b32 $1, u1, 0x00030003, 0x43004300, 0xEA;
    shr.b32 u0, t0, 4;
    shr.b32 u1, t1, 4;
    lop3.b32 $2, u0, 0x00030003, 0x43004300, 0xEA;
    lop3.b32 $3, u1, 0x00030003, 0x43004300, 0xEA;
    shr.b32 u0, t0, 2;
    shr.b32 u1, t1, 2;
    lop3.b32 $4, u0, 0x00030003, 0x43004300, 0xEA;
    lop3.b32 $5, u1, 0x00030003, 0x43004300, 0xEA;
    lop3.b32 $6, t0, 0x00030003, 0x43004300, 0xEA;
    lop3.b32 $7, t1, 0x00030003, 0x43004300, 0xEA;
    }""")
_MAGIC_OFF = 128.0  # what the fast codes carry on top of q


@_jit
def _codes4(b, DOT: tl.constexpr, FAST: tl.constexpr):
    """(high, low) nibbles of bytes b (uint8) in DOT; FAST: bf16 with 128 added (see _ASM_CODES4)."""
    if FAST:
        return tl.inline_asm_elementwise(_ASM_CODES4, "=r,=r,=r,=r,r", [b], dtype=(tl.bfloat16, tl.bfloat16),
                                         is_pure=True, pack=4)
    else:
        b = b.to(tl.int32)
        return _unpack(b, 4, 0).to(DOT), _unpack(b, 4, 1).to(DOT)


@_jit
def _codes2(b, DOT: tl.constexpr, FAST: tl.constexpr):
    """The four 2-bit codes of bytes b (uint8), high bits first, in DOT; FAST as in _codes4."""
    if FAST:
        return tl.inline_asm_elementwise(_ASM_CODES2, "=r,=r,=r,=r,=r,=r,=r,=r,r", [b],
                                         dtype=(tl.bfloat16,) * 4, is_pure=True, pack=4)
    else:
        b = b.to(tl.int32)
        return (_unpack(b, 2, 0).to(DOT), _unpack(b, 2, 1).to(DOT), _unpack(b, 2, 2).to(DOT),
                _unpack(b, 2, 3).to(DOT))


@_jit
def _group_mma(q, xt, xs, scale_ptr, zero_ptr, grp, jm, OFF: tl.constexpr, IEEE: tl.constexpr):
    """One quantization group of each output row: scale * (q @ xt - (zero + OFF) * sum(xt)) [BJ, BM],
    from codes q [BJ, GS] (DOT, each OFF too high), the tokens' chunk xt [GS, BM] (DOT), its column
    sums xs [BM] (fp32) and the rows' groups grp [BJ]."""
    s = tl.load(scale_ptr + grp, mask=jm, other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + grp, mask=jm, other=0.0).to(tl.float32) + OFF
    qx = _mma(q, xt, IEEE)
    return s[:, None] * (qx - z[:, None] * xs[None, :])


@_jit
def _put(ptr, val, mask, ADD: tl.constexpr):
    """Store val, or add it atomically (ADD: other programs add to the same place)."""
    if ADD:
        tl.atomic_add(ptr, val, mask=mask, sem="relaxed")
    else:
        tl.store(ptr, val, mask=mask)


@_jit
def _gate_up_grouped_kernel(
    x_ptr, table_ptr, order_ptr, bounds_ptr, gu_ptr,
    H: tl.constexpr, I: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, DTYPE: tl.constexpr,
    W_OFF: tl.constexpr, S_OFF: tl.constexpr, Z_OFF: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr, FAST: tl.constexpr, OFF: tl.constexpr,
):
    """gu[p] = [x[t] @ gate.T, x[t] @ up.T] (before the activation, which the down kernel applies)
    for the sorted slots p of expert program_id(1) (slot order[p] is token t = order[p] // TOP_K);
    program_id(2) is (block of BLOCK_J gate/up rows, K split). K splits add atomically into gu
    (zeroed): they give one expert enough programs to keep HBM busy."""
    e = tl.program_id(1)
    addr = tl.load(table_ptr + e)
    if addr != 0:  # 0: the expert is not at this precision
        base = tl.multiple_of(addr.to(tl.pointer_type(tl.uint8)), 64)
        start = tl.load(bounds_ptr + e).to(tl.int32)
        end = tl.load(bounds_ptr + e + 1).to(tl.int32)
        HALF: tl.constexpr = I // 2
        ROWG: tl.constexpr = H // GS  # groups per row
        KS: tl.constexpr = H // SPLIT_K
        j = (tl.program_id(2) // SPLIT_K) * BLOCK_J + tl.arange(0, BLOCK_J)  # [BJ] gate rows (2-bit: also j + I/2)
        if BITS == 2:
            jm = j < HALF
        else:
            jm = j < I
        kstart = (tl.program_id(2) % SPLIT_K) * KS
        kk = tl.arange(0, BLOCK_K)
        wmask = jm[:, None]
        # token blocks of this expert: program_id(0) and every num_programs(0)-th after it (the grid
        # has room for T tokens per expert; more only if a row repeats an expert). None: exit.
        for m0 in range(start + tl.program_id(0) * BLOCK_M, end, tl.num_programs(0) * BLOCK_M):
            p = m0 + tl.arange(0, BLOCK_M)  # [BM] positions in the expert-sorted slots
            pm = p < end
            tok = tl.load(order_ptr + p, mask=pm, other=0) // TOP_K
            g0 = tl.full([BLOCK_J, BLOCK_M], 0.0, tl.float32)
            u0 = tl.full([BLOCK_J, BLOCK_M], 0.0, tl.float32)
            g1 = tl.full([BLOCK_J, BLOCK_M], 0.0, tl.float32)  # 2-bit: rows j + I/2
            u1 = tl.full([BLOCK_J, BLOCK_M], 0.0, tl.float32)
            for k0 in range(kstart, kstart + KS, BLOCK_K):
                xt = tl.load(x_ptr + tok[None, :] * H + k0 + kk[:, None], mask=pm[None, :], other=0.0)
                xt = xt.to(DOT)  # [BK, BM]
                offs = j[:, None] * H + k0 + kk[None, :]  # [BJ, BK]
                if BITS == 16:
                    w = (base + W_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
                    g0 += _mma(tl.load(w + offs, mask=wmask, other=0.0).to(DOT), xt, IEEE)
                    u0 += _mma(tl.load(w + I * H + offs, mask=wmask, other=0.0).to(DOT), xt, IEEE)
                else:  # BLOCK_K == GS: one group per row
                    wq = base + W_OFF
                    sc = (base + S_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
                    zr = (base + Z_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
                    xs = _rsum(xt.to(tl.float32), 0)  # [BM]
                    grp = j * ROWG + k0 // GS  # [BJ]
                    b = tl.load(wq + offs, mask=wmask, other=0)  # [BJ, BK] uint8
                    if BITS == 8:  # one byte per weight; up rows start at row I
                        bu = tl.load(wq + I * H + offs, mask=wmask, other=0)
                        g0 += _group_mma(b.to(DOT), xt, xs, sc, zr, grp, jm, 0.0, IEEE)
                        u0 += _group_mma(bu.to(DOT), xt, xs, sc, zr, grp + I * ROWG, jm, 0.0, IEEE)
                    elif BITS == 4:  # byte [j, k] = gate[j, k] << 4 | up[j, k]
                        cg, cu = _codes4(b, DOT, FAST)
                        g0 += _group_mma(cg, xt, xs, sc, zr, grp, jm, OFF, IEEE)
                        u0 += _group_mma(cu, xt, xs, sc, zr, grp + I * ROWG, jm, OFF, IEEE)
                    else:  # 2-bit, byte [j, k] = gate[j] << 6 | gate[j + I/2] << 4 | up[j] << 2 | up[j + I/2]
                        c0, c1, c2, c3 = _codes2(b, DOT, FAST)
                        g0 += _group_mma(c0, xt, xs, sc, zr, grp, jm, OFF, IEEE)
                        g1 += _group_mma(c1, xt, xs, sc, zr, grp + HALF * ROWG, jm, OFF, IEEE)
                        u0 += _group_mma(c2, xt, xs, sc, zr, grp + I * ROWG, jm, OFF, IEEE)
                        u1 += _group_mma(c3, xt, xs, sc, zr, grp + (I + HALF) * ROWG, jm, OFF, IEEE)
            grow = gu_ptr + p[None, :] * (2 * I) + j[:, None]  # [BJ, BM]; gate at [p, j], up at [p, I + j]
            gmask = jm[:, None] & pm[None, :]
            _put(grow, g0, gmask, SPLIT_K > 1)
            _put(grow + I, u0, gmask, SPLIT_K > 1)
            if BITS == 2:
                _put(grow + HALF, g1, gmask, SPLIT_K > 1)
                _put(grow + I + HALF, u1, gmask, SPLIT_K > 1)


@_jit
def _down_grouped_kernel(
    gu_ptr, table_ptr, order_ptr, bounds_ptr, wt_ptr, out_ptr,
    H: tl.constexpr, I: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, DTYPE: tl.constexpr,
    W_OFF: tl.constexpr, S_OFF: tl.constexpr, Z_OFF: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr, FAST: tl.constexpr, OFF: tl.constexpr,
):
    """out[t] += w * (silu(g) * u) @ down.T, [g, u] = gu[p], for the sorted slots p of expert
    program_id(1); program_id(2) is (row block, K split): atomic adds, as other experts (and K
    splits) add to the same rows."""
    e = tl.program_id(1)
    addr = tl.load(table_ptr + e)
    if addr != 0:
        base = tl.multiple_of(addr.to(tl.pointer_type(tl.uint8)), 64)
        start = tl.load(bounds_ptr + e).to(tl.int32)
        end = tl.load(bounds_ptr + e + 1).to(tl.int32)
        # a byte holds P weights, of rows j, j + H/P, ...: programs cover the first H/P rows
        P: tl.constexpr = 1 if BITS >= 8 else 8 // BITS
        R: tl.constexpr = H // P
        ROWG: tl.constexpr = I // GS
        KS: tl.constexpr = I // SPLIT_K
        j = (tl.program_id(2) // SPLIT_K) * BLOCK_J + tl.arange(0, BLOCK_J)  # [BJ]
        jm = j < R
        kstart = (tl.program_id(2) % SPLIT_K) * KS
        kk = tl.arange(0, BLOCK_K)
        wmask = jm[:, None]
        for m0 in range(start + tl.program_id(0) * BLOCK_M, end, tl.num_programs(0) * BLOCK_M):
            p = m0 + tl.arange(0, BLOCK_M)  # [BM]
            pm = p < end
            slot = tl.load(order_ptr + p, mask=pm, other=0)
            tok = slot // TOP_K
            wt = tl.load(wt_ptr + slot, mask=pm, other=0.0).to(tl.float32)  # [BM] routing weights
            a0 = tl.full([BLOCK_J, BLOCK_M], 0.0, tl.float32)
            a1 = tl.full([BLOCK_J, BLOCK_M], 0.0, tl.float32)
            a2 = tl.full([BLOCK_J, BLOCK_M], 0.0, tl.float32)
            a3 = tl.full([BLOCK_J, BLOCK_M], 0.0, tl.float32)
            for k0 in range(kstart, kstart + KS, BLOCK_K):
                gp = gu_ptr + p[None, :] * (2 * I) + k0 + kk[:, None]  # [BK, BM]
                ht = _silu_mul(tl.load(gp, mask=pm[None, :], other=0.0),
                               tl.load(gp + I, mask=pm[None, :], other=0.0))
                ht = ht.to(DTYPE).to(DOT)  # rounded to the model's dtype, as in the eager expert
                offs = j[:, None] * I + k0 + kk[None, :]  # [BJ, BK]
                if BITS == 16:
                    w = (base + W_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
                    a0 += _mma(tl.load(w + offs, mask=wmask, other=0.0).to(DOT), ht, IEEE)
                else:  # BLOCK_K == GS; rows r, r + H/P, ... from high bits to low
                    b = tl.load(base + W_OFF + offs, mask=wmask, other=0)  # [BJ, BK] uint8
                    sc = (base + S_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
                    zr = (base + Z_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
                    hs = _rsum(ht.to(tl.float32), 0)  # [BM]
                    grp = j * ROWG + k0 // GS
                    if BITS == 8:
                        a0 += _group_mma(b.to(DOT), ht, hs, sc, zr, grp, jm, 0.0, IEEE)
                    elif BITS == 4:
                        c0, c1 = _codes4(b, DOT, FAST)
                        a0 += _group_mma(c0, ht, hs, sc, zr, grp, jm, OFF, IEEE)
                        a1 += _group_mma(c1, ht, hs, sc, zr, grp + R * ROWG, jm, OFF, IEEE)
                    else:
                        c0, c1, c2, c3 = _codes2(b, DOT, FAST)
                        a0 += _group_mma(c0, ht, hs, sc, zr, grp, jm, OFF, IEEE)
                        a1 += _group_mma(c1, ht, hs, sc, zr, grp + R * ROWG, jm, OFF, IEEE)
                        a2 += _group_mma(c2, ht, hs, sc, zr, grp + 2 * R * ROWG, jm, OFF, IEEE)
                        a3 += _group_mma(c3, ht, hs, sc, zr, grp + 3 * R * ROWG, jm, OFF, IEEE)
            orow = out_ptr + tok[None, :] * H + j[:, None]  # [BJ, BM]
            omask = jm[:, None] & pm[None, :]
            tl.atomic_add(orow, wt[None, :] * a0, mask=omask, sem="relaxed")
            if P >= 2:
                tl.atomic_add(orow + R, wt[None, :] * a1, mask=omask, sem="relaxed")
            if P == 4:
                tl.atomic_add(orow + 2 * R, wt[None, :] * a2, mask=omask, sem="relaxed")
                tl.atomic_add(orow + 3 * R, wt[None, :] * a3, mask=omask, sem="relaxed")


# --- 4-bit grouped kernels that dequantize per group: long calls (prefill chunks) ---------------
# The kernels above apply each group's scale and zero to that step's product, so every K step waits
# for its tensor-core dot before the next (wgmma waits with 0 in flight in the sm_90 TTGIR). These
# turn each group's codes into weights first, (q - z) * s in bf16 (three packed instructions per two
# weights: `sub.rn.bf16x2` takes the magic number's 128 off, `fma.rn.bf16x2` scales and adds -z * s,
# `add.rn.bf16x2` its remainder), so the dots accumulate across the whole K range with several in
# flight (3 with Triton 3.9, 7 with 3.6), as Marlin-style kernels do. down reads
# h = silu(gate) * up ready-made in bf16 (a small pass between the kernels): a tile computed in
# registers would go to shared memory at every step and make each dot wait for the one before.
# Measured (`python -m experiments.bench_grouped_deq`, a Mixtral layer, 8 experts,
# top-2, random routing; time over the kernels above) on an H100: 0.98 at 16 tokens, 0.75 at 32,
# 0.77 at 64, 0.75 at 128, 0.72 at 256; on an H200 1.03 at 16, 0.76-0.79 at 32-256; one expert at
# 1-16 tokens 1.07-1.24. So they serve 4-bit calls of DEQ_MIN_TOKENS tokens or more (prefill chunks),
# not decode.


# (q - z) * s for two weights a word: the codes come from _codes4 as bf16 128 + q (0x4300 | q); -z * s
# comes as bf16 hi + lo, lo added after the fused multiply-add: where q is near z the weight is small
# and a rounded -z * s alone would be most of it (the same error for every weight of a group and row,
# so it adds up over the group: 1.9% of the largest output on a small layer, against 0.5% for the
# kernels above; with lo, as little as theirs)
_ASM_DEQ = _constexpr("""{
    .reg .b32 m, t;
    mov.b32 m, 0x43004300;
    sub.rn.bf16x2 t, $1, m;
    fma.rn.bf16x2 t, t, $2, $3;
    add.rn.bf16x2 $0, t, $4;
    }""")


@_jit
def _deq(c, s, hi, lo, FAST: tl.constexpr):
    """Weights (q - z) * s in the dot's type: codes c [BJ, GS] (FAST: bf16 128 + q; else q in DOT),
    the rows' scales s and -z * s = hi + lo [BJ] (model dtype)."""
    s2 = tl.broadcast_to(s[:, None], c.shape)
    hi2 = tl.broadcast_to(hi[:, None], c.shape)
    lo2 = tl.broadcast_to(lo[:, None], c.shape)
    if FAST:
        return tl.inline_asm_elementwise(_ASM_DEQ, "=r,r,r,r,r", [c, s2, hi2, lo2], dtype=tl.bfloat16,
                                         is_pure=True, pack=2)
    else:
        return c * s2.to(c.dtype) + hi2.to(c.dtype) + lo2.to(c.dtype)


@_jit
def _scale_zero(sc, zr, grp, jm, DTYPE: tl.constexpr):
    """The rows' scale and -zero * scale as hi + lo, for group index grp [BJ], in the model's dtype."""
    s = tl.load(sc + grp, mask=jm, other=0.0)
    z = tl.load(zr + grp, mask=jm, other=0.0)
    nzs = -(z.to(tl.float32) * s.to(tl.float32))
    hi = nzs.to(DTYPE)
    return s, hi, (nzs - hi.to(tl.float32)).to(DTYPE)


@_jit
def _grouped_fields(addr, bounds_ptr, e, S_OFF: tl.constexpr, Z_OFF: tl.constexpr, DTYPE: tl.constexpr):
    """Expert e's buffer at addr (fields 64-byte aligned), its scales and zeros, and the range
    [start, end) of its slots in the expert-sorted order."""
    base = tl.multiple_of(addr.to(tl.pointer_type(tl.uint8)), 64)
    sc = (base + S_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
    zr = (base + Z_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
    return base, sc, zr, tl.load(bounds_ptr + e).to(tl.int32), tl.load(bounds_ptr + e + 1).to(tl.int32)


@_jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b (fp32 acc); IEEE as in _mma."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@_jit
def _gate_up_deq_kernel(
    x_ptr, table_ptr, order_ptr, bounds_ptr, gu_ptr,
    H: tl.constexpr, I: tl.constexpr, GS: tl.constexpr, DTYPE: tl.constexpr,
    W_OFF: tl.constexpr, S_OFF: tl.constexpr, Z_OFF: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr, FAST: tl.constexpr,
):
    """As _gate_up_grouped_kernel at 4 bits (same grid and outputs), with the
    weights dequantized per group before one accumulating dot."""
    e = tl.program_id(1)
    addr = tl.load(table_ptr + e)
    if addr != 0:
        base, sc, zr, start, end = _grouped_fields(addr, bounds_ptr, e, S_OFF, Z_OFF, DTYPE)
        ROWG: tl.constexpr = H // GS
        KS: tl.constexpr = H // SPLIT_K
        j = (tl.program_id(2) // SPLIT_K) * BLOCK_J + tl.arange(0, BLOCK_J)
        jm = j < I
        kstart = (tl.program_id(2) % SPLIT_K) * KS
        kk = tl.arange(0, GS)
        for m0 in range(start + tl.program_id(0) * BLOCK_M, end, tl.num_programs(0) * BLOCK_M):
            p = m0 + tl.arange(0, BLOCK_M)
            pm = p < end
            tok = tl.load(order_ptr + p, mask=pm, other=0) // TOP_K
            g = tl.full([BLOCK_J, BLOCK_M], 0.0, tl.float32)
            u = tl.full([BLOCK_J, BLOCK_M], 0.0, tl.float32)
            for k0 in range(kstart, kstart + KS, GS):
                xt = tl.load(x_ptr + tok[None, :] * H + k0 + kk[:, None], mask=pm[None, :], other=0.0).to(DOT)
                b = tl.load(base + W_OFF + j[:, None] * H + k0 + kk[None, :], mask=jm[:, None], other=0)
                grp = j * ROWG + k0 // GS
                cg, cu = _codes4(b, DOT, FAST)  # byte [j, k] = gate[j, k] << 4 | up[j, k]
                sg, hg, lg = _scale_zero(sc, zr, grp, jm, DTYPE)
                su, hu, lu = _scale_zero(sc, zr, grp + I * ROWG, jm, DTYPE)
                g = _dot(_deq(cg, sg, hg, lg, FAST), xt, g, IEEE)
                u = _dot(_deq(cu, su, hu, lu, FAST), xt, u, IEEE)
            grow = gu_ptr + p[None, :] * (2 * I) + j[:, None]
            gmask = jm[:, None] & pm[None, :]
            _put(grow, g, gmask, SPLIT_K > 1)
            _put(grow + I, u, gmask, SPLIT_K > 1)


@_jit
def _down_deq_kernel(
    h_ptr, table_ptr, order_ptr, bounds_ptr, wt_ptr, out_ptr,
    H: tl.constexpr, I: tl.constexpr, GS: tl.constexpr, DTYPE: tl.constexpr,
    W_OFF: tl.constexpr, S_OFF: tl.constexpr, Z_OFF: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr, FAST: tl.constexpr,
):
    """As _down_grouped_kernel at 4 bits, with the weights dequantized per group
    before one accumulating dot, and h = silu(gate) * up read ready-made ([T*k, I] in the model's
    dtype, by sorted position): a tile computed in registers would go to shared memory for the
    dot at every step and make each dot wait for the one before."""
    e = tl.program_id(1)
    addr = tl.load(table_ptr + e)
    if addr != 0:
        base, sc, zr, start, end = _grouped_fields(addr, bounds_ptr, e, S_OFF, Z_OFF, DTYPE)
        R: tl.constexpr = H // 2  # byte [r, k] = down[r, k] << 4 | down[r + H/2, k]
        ROWG: tl.constexpr = I // GS
        KS: tl.constexpr = I // SPLIT_K
        j = (tl.program_id(2) // SPLIT_K) * BLOCK_J + tl.arange(0, BLOCK_J)
        jm = j < R
        kstart = (tl.program_id(2) % SPLIT_K) * KS
        kk = tl.arange(0, GS)
        for m0 in range(start + tl.program_id(0) * BLOCK_M, end, tl.num_programs(0) * BLOCK_M):
            p = m0 + tl.arange(0, BLOCK_M)
            pm = p < end
            slot = tl.load(order_ptr + p, mask=pm, other=0)
            tok = slot // TOP_K
            wt = tl.load(wt_ptr + slot, mask=pm, other=0.0).to(tl.float32)
            a0 = tl.full([BLOCK_J, BLOCK_M], 0.0, tl.float32)
            a1 = tl.full([BLOCK_J, BLOCK_M], 0.0, tl.float32)
            for k0 in range(kstart, kstart + KS, GS):
                ht = tl.load(h_ptr + p[None, :] * I + k0 + kk[:, None], mask=pm[None, :], other=0.0).to(DOT)
                b = tl.load(base + W_OFF + j[:, None] * I + k0 + kk[None, :], mask=jm[:, None], other=0)
                grp = j * ROWG + k0 // GS
                c0, c1 = _codes4(b, DOT, FAST)
                s0, h0, l0 = _scale_zero(sc, zr, grp, jm, DTYPE)
                s1, h1, l1 = _scale_zero(sc, zr, grp + R * ROWG, jm, DTYPE)
                a0 = _dot(_deq(c0, s0, h0, l0, FAST), ht, a0, IEEE)
                a1 = _dot(_deq(c1, s1, h1, l1, FAST), ht, a1, IEEE)
            orow = out_ptr + tok[None, :] * H + j[:, None]
            omask = jm[:, None] & pm[None, :]
            tl.atomic_add(orow, wt[None, :] * a0, mask=omask, sem="relaxed")
            tl.atomic_add(orow + R, wt[None, :] * a1, mask=omask, sem="relaxed")


# --- launch -------------------------------------------------------------------------------------

if triton is not None:
    _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
else:
    _TL_DTYPES = {torch.float32: None, torch.bfloat16: None, torch.float16: None}


def _pow2_block(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


# GPU blocks per precision: (gate_up rows, K chunk cap, warps, down rows, K chunk cap, warps[, pipeline
# stages, 3 if not given: Triton pipelines only loads feeding a tl.dot, so these kernels compile the
# same at any; kept for the format]) for a Mixtral expert (H=4096, I=14336, gs=64) at batch 1: 16-bit tuned on
# an H100, the integer-activation kernels (8, 4, 2) on an H200 at two slots (experiments/bench_dp4a.py).
# GPUs swept by `python -m experiments.tune_kernels` have their own in kernel_blocks.json (by device
# name), read once per device: no autotuning at start. An entry "bits@n" there applies to calls of
# exactly n slots (a top-1 model's token at batch 1 is one slot; few programs then fill the GPU).
_GPU_BLOCKS = {
    16: (8, 256, 8, 8, 512, 4),
    8: (64, 512, 4, 32, 512, 4, 3),
    4: (16, 512, 4, 16, 512, 4, 2),
    2: (64, 512, 8, 16, 512, 4, 2),
}
TUNED_BLOCKS = Path(__file__).with_name("kernel_blocks.json")


def gpu_entry(path: Path, device_name: str, what: str) -> dict:
    """The entry for `device_name` in a JSON file of per-GPU choices (tuned once per GPU model, read
    at start): {} where the file or the entry is missing; a file that cannot be read is reported
    (naming what falls back to its defaults) and ignored."""
    try:
        entry = json.loads(path.read_text()).get(device_name, {})
        if not isinstance(entry, dict):
            raise ValueError(f"the entry for {device_name!r} is not an object")
        return entry
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as e:
        log.warning("ignoring %s (%s): the default %s apply", path, e, what)
        return {}


def tuned_blocks(device_name: str) -> dict[int | tuple[int, int], tuple[int, ...]]:
    """The slot kernels' blocks for a GPU: kernel_blocks.json's entry for `device_name` over the
    defaults (precisions it lacks keep theirs); its "bits@n" keys as (bits, n): blocks for calls of
    n slots."""
    blocks: dict = dict(_GPU_BLOCKS)
    entry = gpu_entry(TUNED_BLOCKS, device_name, "kernel blocks")
    for key, v in entry.items():
        bits, at, slots = key.partition("@")
        if (bits.isdigit() and int(bits) in _GPU_BLOCKS and (not at or slots.isdigit()) and isinstance(v, list)
                and len(v) in (6, 7) and all(isinstance(b, int) and b > 0 for b in v)):
            blocks[(int(bits), int(slots)) if slots else int(bits)] = tuple(v)
    return blocks


@functools.lru_cache(maxsize=None)
def _device_blocks(index: int) -> dict:
    return tuned_blocks(torch.cuda.get_device_name(index))


def _offsets(layout: Layout) -> list[tuple[int, int, int]]:
    """(weights, scale, zero) byte offsets of gate_up and down in an expert's buffer (16-bit: the
    weights only; 0 for the others)."""
    fields = {f.name: f.offset for f in layout.fields}
    if layout.bits == 16:
        return [(fields["gate_up"], 0, 0), (fields["down"], 0, 0)]
    return [(fields[f"{m}.W_q"], fields[f"{m}.scale"], fields[f"{m}.zero"]) for m in ("gate_up", "down")]


# Precisions whose calls launch their kernels to overlap (programmatic dependent launch) where the GPU
# and Triton allow it (_can_overlap). A module setting, so a benchmark can time the forms side by side
# (experiments/bench_overlap.py). H200, one Mixtral expert at one / two slots, µs: 4-bit 41.3 -> 39.3 /
# 66.3 -> 63.8, 2-bit 41.9 -> 39.4 / 54.1 -> 52.1; 16-bit 88.9 -> 90.4 / 168.9 -> 168.1, so not 16-bit.
PDL_BITS = {8, 4, 2}


@functools.lru_cache(maxsize=None)
def _can_overlap(index: int) -> bool:
    """Programmatic dependent launch needs compute capability 9.0 and a Triton that launches with it."""
    try:
        import dataclasses

        from triton.backends.nvidia.compiler import CUDAOptions
        fields = {f.name for f in dataclasses.fields(CUDAOptions)}
    except (ImportError, TypeError):
        return False
    return "launch_pdl" in fields and torch.cuda.get_device_capability(index)[0] >= 9


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _config(layout: Layout, interpret: bool, sms: int = 132, blocks: dict | None = None, slots: int = 2) -> dict:
    """Block sizes: pure functions of the layout and the number of slots (and GPU: `blocks`, default
    _GPU_BLOCKS, see tuned_blocks), so the grid never depends on data. Interpreter: big blocks, few
    programs (each one is Python overhead)."""
    hidden, inter = _dims(layout)
    bits, gs = layout.bits, layout.group_size
    kmin = 1 if bits == 16 else gs  # a K chunk holds whole groups
    if interpret:
        return dict(gu_j=64, gu_k=max(_pow2_block(hidden, 1024), kmin), gu_warps=4,
                    dn_j=64, dn_k=max(_pow2_block(inter, 1024), kmin), dn_split=1, dn_warps=4)
    blocks = blocks or _GPU_BLOCKS
    gu_j, gu_cap, gu_warps, dn_j, dn_cap, dn_warps, *stages = blocks.get((bits, slots), blocks[bits])
    gu_k = max(_pow2_block(hidden, gu_cap), kmin)
    dn_k = max(_pow2_block(inter, dn_cap), kmin)
    # down has only H (or H/2, H/4 packed) rows per slot: split its K (atomic adds) until one slot
    # has ~4 programs per SM (a call's other slots may be empty: another precision's experts), in
    # whole K chunks (I = 14336 is 28 chunks of 512: splits of 7 and 14, not only powers of two; a
    # 2-bit slot of 4096 rows has 64 programs of 16 packed rows)
    programs = -(-hidden // (1 if bits >= 8 else 8 // bits) // dn_j)
    chunks = inter // dn_k
    dn_split = next(d for d in range(1, chunks + 1) if chunks % d == 0 and (programs * d >= 4 * sms or d == chunks))
    return dict(gu_j=gu_j, gu_k=gu_k, gu_warps=gu_warps, dn_j=dn_j, dn_k=dn_k, dn_split=dn_split,
                dn_warps=dn_warps, stages=stages[0] if stages else 3)


def moe_experts(x: torch.Tensor, slot_ptrs: torch.Tensor, slot_weights: torch.Tensor, layout: Layout, *,
                slot_token: torch.Tensor | None = None, out: torch.Tensor | None = None,
                slot_index: torch.Tensor | None = None, count: torch.Tensor | None = None,
                zero_out: bool = False) -> torch.Tensor:
    """out[t] += w_s * expert_s(x[t]) for every slot s of token t with a non-zero address; experts
    are read from the packed buffers (layout `layout`) at the slots' addresses.

    x [T, H]; slot_ptrs int64: an address per slot [S] (0: skip), or with slot_index int64 [S] a
    table of addresses it indexes (a layer's expert table and the router's flattened top-k index);
    slot_weights [S]; slot_token int64 [S] (default: slots in token order, S a multiple of T, slot s
    of token s // (S / T)); out fp32 [T, H] (default: a new one). zero_out: out is set to zero
    first (a new one always is). count int64 [E]: count[slot_index[s]] += 1 for every slot (the
    routing statistics; needs slot_index). Zeroing and counting happen in the gate_up kernel, with
    no launch of their own (with the default slot_token). Returns out. No host syncs."""
    T, hidden = x.shape
    H, I = _dims(layout)
    assert hidden == H, (x.shape, layout.matrices)
    S = (slot_ptrs if slot_index is None else slot_index).numel()
    if slot_token is None and (T == 0 or S % T):
        raise ValueError(f"slot_token is needed when slots ({S}) are not a multiple of tokens ({T})")
    if count is not None and slot_index is None:
        raise ValueError("count needs slot_index (the experts to count)")
    if out is None:
        out, zero_out = torch.empty(T, H, dtype=torch.float32, device=x.device), True
    assert out.dtype == torch.float32 and out.shape == (T, H) and out.is_contiguous()
    if zero_out and (slot_token is not None or S == 0):  # (tokens without slots: the kernels cannot tell)
        out.zero_()
        zero_out = False
    if count is not None and S:
        assert count.dtype == torch.int64 and count.is_contiguous()
    if S == 0:
        return out
    # (expanded or strided index tensors: the kernels index them densely; unused pointers are slot_ptrs)
    x, slot_ptrs, slot_weights = x.contiguous(), slot_ptrs.contiguous(), slot_weights.contiguous()
    idx = slot_ptrs if slot_index is None else slot_index.contiguous()
    tok = slot_ptrs if slot_token is None else slot_token.contiguous()
    slots = dict(INDEXED=slot_index is not None, TOKEN_DIV=0 if slot_token is not None else S // T)
    on_gpu = x.device.type == "cuda"
    index = x.device.index or 0
    cfg = _config(layout, not on_gpu, *((_sm_count(index), _device_blocks(index), S) if on_gpu else ()))
    bits = layout.bits
    offs = _offsets(layout)
    dtype = _TL_DTYPES[layout.dtype]
    pdl = on_gpu and bits in PDL_BITS and _can_overlap(index)
    launch = lambda warps: (dict(num_warps=warps, num_stages=cfg["stages"], launch_pdl=pdl)  # noqa: E731
                            if on_gpu else {})
    h = torch.empty(S, I, dtype=torch.float32, device=x.device)
    rows = I if bits >= 4 else I // 2  # gate_up's programs cover rows (2-bit: two per code)
    gu_grid = (S, triton.cdiv(rows, cfg["gu_j"]))
    # the programs of a slot zero its token's row in blocks of ZERO_BLOCK (one block each)
    zero_block = triton.next_power_of_2(triton.cdiv(H, gu_grid[1])) if zero_out else 0
    side = dict(COUNT=count is not None, ZERO_BLOCK=zero_block)
    side_ptrs = (count if count is not None else slot_ptrs, out)
    if bits == 16:
        _gate_up_kernel[gu_grid](
            x, slot_ptrs, idx, tok, *side_ptrs, h, H=H, I=I, DTYPE=dtype, W_OFF=offs[0][0], BLOCK_J=cfg["gu_j"],
            BLOCK_K=cfg["gu_k"], **slots, **side, PDL=pdl, **launch(cfg["gu_warps"]))
        _down_kernel[(S, triton.cdiv(H, cfg["dn_j"]), cfg["dn_split"])](
            h, slot_ptrs, idx, tok, slot_weights, out, H=H, I=I, DTYPE=dtype, W_OFF=offs[1][0],
            BLOCK_J=cfg["dn_j"], BLOCK_K=cfg["dn_k"], SPLIT_K=cfg["dn_split"], **slots, PDL=pdl,
            **launch(cfg["dn_warps"]))
        return out
    gs = layout.group_size
    common = dict(H=H, I=I, BITS=bits, GS=gs, DTYPE=dtype, FAST=on_gpu, PDL=pdl)  # FAST: dp2a in inline PTX
    _gate_up_int_kernel[gu_grid](
        *quantize_activations(x, gs, pdl=pdl), slot_ptrs, idx, tok, *side_ptrs, h, W_OFF=offs[0][0],
        S_OFF=offs[0][1], Z_OFF=offs[0][2], BLOCK_J=cfg["gu_j"], BLOCK_K=cfg["gu_k"], **common, **slots, **side,
        **launch(cfg["gu_warps"]))
    _down_int_kernel[(S, triton.cdiv(H // (8 // bits), cfg["dn_j"]), cfg["dn_split"])](
        *quantize_activations(h, gs, skip=slot_ptrs, skip_index=slot_index, pdl=pdl), slot_ptrs, idx, tok,
        slot_weights, out, W_OFF=offs[1][0], S_OFF=offs[1][1], Z_OFF=offs[1][2], BLOCK_J=cfg["dn_j"],
        BLOCK_K=cfg["dn_k"], SPLIT_K=cfg["dn_split"], **common, **slots, **launch(cfg["dn_warps"]))
    return out


def quantize_activations(x: torch.Tensor, group_size: int, skip: torch.Tensor | None = None,
                         skip_index: torch.Tensor | None = None, pdl: bool = False) -> tuple[torch.Tensor, ...]:
    """x [rows, K] quantized per group of `group_size` to int16 for the quantized slot kernels:
    (words int32 [rows, K/4] twice, scales fp32 [rows, K/group_size], sums int32 [rows, K/group_size]).
    skip: int64 [rows] (or a table indexed by skip_index [rows]); rows where it is 0 are not read
    (their outputs are left unset). pdl: launched to overlap the kernel before it (see _gdc_wait)."""
    R, K = x.shape
    qa = torch.empty(R, K // 4, dtype=torch.int32, device=x.device)
    qb = torch.empty_like(qa)
    qs = torch.empty(R, K // group_size, dtype=torch.float32, device=x.device)
    qn = torch.empty(R, K // group_size, dtype=torch.int32, device=x.device)
    block = max(_pow2_block(K, 512 if x.device.type == "cuda" else 4096), group_size)
    skip_ptr = x if skip is None else skip
    _quantize_kernel[(R, K // block)](x, skip_ptr, skip_ptr if skip_index is None else skip_index, qa, qb, qs, qn,
                                      K=K, GS=group_size, BLOCK_K=block, SKIP=skip is not None,
                                      INDEXED=skip_index is not None, PDL=pdl,
                                      **({"launch_pdl": True} if pdl else {}))
    return qa, qb, qs, qn


class TokenGroups(NamedTuple):
    """A layer call's (token, choice) slots grouped by expert, on the device."""

    order: torch.Tensor  # int64 [T*k]: flat slot ids (token * k + choice) sorted by expert, stable
    bounds: torch.Tensor  # int64 [E+1]: expert e's slots are order[bounds[e]:bounds[e+1]]


def group_tokens(top_k_index: torch.Tensor, num_experts: int) -> TokenGroups:
    """Group the slots of top_k_index [T, k] by expert without a host sync: every output's shape
    depends only on T, k and E, so a CUDA graph can capture it (a stable sort, then one
    searchsorted for all experts' bounds, in place of counts and a cumsum)."""
    flat = top_k_index.reshape(-1)  # [T*k]
    ids, order = torch.sort(flat, stable=True)  # (stable: each expert's tokens in ascending order)
    experts = torch.arange(num_experts + 1, device=flat.device, dtype=ids.dtype)
    return TokenGroups(order, torch.searchsorted(ids, experts))


# GPU blocks of the grouped kernels, from a short sweep on an H200 (one Mixtral expert, bf16, 1-32
# tokens): 64 output rows per program (wgmma's M, one warpgroup of 4 warps) beat 32 or 128 rows
# and 8 warps; 4 pipeline stages beat 2, 3 and 5, except at 4 bits (3: 0.088 ms against 0.098 at one
# token). K splits (_grouped_config) fill the GPU when few experts are routed.
_GROUPED_GPU = dict(gu_j=64, dn_j=64, warps=4, stages={16: 4, 8: 4, 4: 3, 2: 4})  # stages by bits (8: untried)


def _grouped_config(layout: Layout, tokens: int, experts: int, interpret: bool, sms: int = 132) -> dict:
    """Block sizes of the grouped kernels, from shapes only (`tokens` T, `experts` the most experts a
    call can reach, min(E, T*k)), so the grid never depends on the routing. Quantized K steps are one
    group; 16-bit ones a chunk of up to 64 (interpreter: one chunk, as few steps as possible)."""
    hidden, inter = _dims(layout)
    bits, gs = layout.bits, layout.group_size
    if interpret:  # each program and loop step is Python overhead: as few as the shapes allow
        k_cap, bm = 1024, 16
        gu_j = min(triton.next_power_of_2(inter // 2 if bits == 2 else inter), 256)
        dn_j = min(triton.next_power_of_2(hidden // (1 if bits >= 8 else 8 // bits)), 256)
    else:
        k_cap = 64
        gu_j, dn_j = _GROUPED_GPU["gu_j"], _GROUPED_GPU["dn_j"]
        # tokens per expert are at most T: a 16-token block (tl.dot's least) up to 16 tokens, then 32
        # (at 32 tokens one block of 32 beat two of 16 and one of 64 on the H200)
        bm = 16 if tokens <= 16 else 32
    gu_k = _pow2_block(hidden, k_cap) if bits == 16 else gs
    dn_k = _pow2_block(inter, k_cap) if bits == 16 else gs
    # split K (atomic adds) up to 16 ways until about 4 programs per SM could be busy: one expert has
    # only I/BJ gate_up row blocks (2-bit: I/2) and H/P down ones (P weights per byte); on the H200
    # this took one 4-bit expert from 0.145 to 0.11 ms

    def split(programs, k, chunk):
        n = 1
        while not interpret and programs * n < 4 * sms and n < 16 and k % (chunk * n * 2) == 0:
            n *= 2
        return n

    gu_rows = inter // 2 if bits == 2 else inter
    gu_split = split(experts * -(-gu_rows // gu_j), hidden, gu_k)
    dn_split = split(experts * -(-hidden // (1 if bits >= 8 else 8 // bits) // dn_j), inter, dn_k)
    return dict(bm=bm, gu_j=gu_j, gu_k=gu_k, gu_split=gu_split, dn_j=dn_j, dn_k=dn_k, dn_split=dn_split)


DEQ_MIN_TOKENS = 128  # 4-bit grouped calls of this many tokens take the dequantize-per-group kernels


def moe_experts_grouped(x: torch.Tensor, table: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor, layout: Layout, *, out: torch.Tensor | None = None,
                        groups: TokenGroups | None = None, dequantize: bool | None = None) -> torch.Tensor:
    """out[t] += w[t, c] * expert(x[t]) for every routed slot (t, c), expert = top_k_index[t, c],
    whose address table[expert] is not 0; tokens are grouped by expert on the device, so each expert
    is read once per block of its tokens (not once per token). No host syncs; the grid depends on
    shapes only.

    x [T, H] (the model's dtype); table int64 [E] (this layer's experts at this precision, 0: not
    here); top_k_index int64 [T, k]; top_k_weights [T, k]; out fp32 [T, H] (default: zeros);
    groups: group_tokens(top_k_index, E), to share one grouping between precisions; dequantize: run
    4-bit experts on the kernels that dequantize per group (default: from DEQ_MIN_TOKENS tokens on a
    GPU with bf16). Returns out."""
    T, hidden = x.shape
    H, I = _dims(layout)
    assert hidden == H, (x.shape, layout.matrices)
    assert top_k_index.shape == top_k_weights.shape and top_k_index.shape[0] == T, (top_k_index.shape, T)
    E, k = table.numel(), top_k_index.shape[1]
    if out is None:
        out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    assert out.dtype == torch.float32 and out.shape == (T, H) and out.is_contiguous()
    if T * k == 0 or E == 0:
        return out
    if groups is None:
        groups = group_tokens(top_k_index, E)
    x, table = x.contiguous(), table.contiguous()
    weights = top_k_weights.reshape(-1).contiguous()  # [T*k], by flat slot id
    on_gpu = x.device.type == "cuda"
    cfg = _grouped_config(layout, T, min(E, T * k), not on_gpu, _sm_count(x.device.index or 0) if on_gpu else 132)
    bits = layout.bits
    offs = _offsets(layout)
    gs_gu, gs_dn = (cfg["gu_k"], cfg["dn_k"]) if bits == 16 else (layout.group_size,) * 2
    dtype = _TL_DTYPES[layout.dtype]
    dot = dtype if on_gpu else tl.float32
    fast = on_gpu and dot == tl.bfloat16 and bits in (4, 2)  # see _ASM_CODES4
    launch = {"num_warps": _GROUPED_GPU["warps"], "num_stages": _GROUPED_GPU["stages"][bits]} if on_gpu else {}
    if dequantize is None:
        dequantize = bits == 4 and fast and T >= DEQ_MIN_TOKENS
    if dequantize:
        if bits != 4:
            raise ValueError(f"the dequantize-per-group kernels take 4-bit experts, not {bits}-bit")
        return _grouped_deq(x, table, groups, weights, out, layout, cfg, dtype, dot, fast, k, launch)
    common = dict(H=H, I=I, BITS=bits, DTYPE=dtype, TOP_K=k, BLOCK_M=cfg["bm"], DOT=dot, IEEE=dot == tl.float32,
                  FAST=fast, OFF=_MAGIC_OFF if fast else 0.0, **launch)
    # [T*k, 2I] by sorted position: gate and up before the activation (K splits add into zeros)
    gu = (torch.zeros if cfg["gu_split"] > 1 else torch.empty)(T * k, 2 * I, dtype=torch.float32, device=x.device)
    # token blocks per expert: room for T tokens (an expert is in a row's top-k at most once; a
    # repeated one is still run, by the kernels' loop over further blocks)
    blocks = triton.cdiv(T, cfg["bm"])
    rows = I // 2 if bits == 2 else I
    _gate_up_grouped_kernel[(blocks, E, triton.cdiv(rows, cfg["gu_j"]) * cfg["gu_split"])](
        x, table, groups.order, groups.bounds, gu, GS=gs_gu, W_OFF=offs[0][0], S_OFF=offs[0][1], Z_OFF=offs[0][2],
        BLOCK_J=cfg["gu_j"], BLOCK_K=cfg["gu_k"], SPLIT_K=cfg["gu_split"], **common,
    )
    vals = 1 if bits >= 8 else 8 // bits
    _down_grouped_kernel[(blocks, E, triton.cdiv(H // vals, cfg["dn_j"]) * cfg["dn_split"])](
        gu, table, groups.order, groups.bounds, weights, out, GS=gs_dn, W_OFF=offs[1][0], S_OFF=offs[1][1],
        Z_OFF=offs[1][2], BLOCK_J=cfg["dn_j"], BLOCK_K=cfg["dn_k"], SPLIT_K=cfg["dn_split"], **common,
    )
    return out


def _grouped_deq(x, table, groups, weights, out, layout, cfg, dtype, dot, fast, k, launch) -> torch.Tensor:
    """moe_experts_grouped's 4-bit work on the dequantize-per-group kernels (same grid and blocks)."""
    T = x.shape[0]
    H, I = _dims(layout)
    offs = _offsets(layout)
    common = dict(H=H, I=I, GS=layout.group_size, DTYPE=dtype, TOP_K=k, BLOCK_M=cfg["bm"], DOT=dot,
                  IEEE=dot == tl.float32, FAST=fast, **launch)
    gu = (torch.zeros if cfg["gu_split"] > 1 else torch.empty)(T * k, 2 * I, dtype=torch.float32, device=x.device)
    blocks = triton.cdiv(T, cfg["bm"])
    _gate_up_deq_kernel[(blocks, table.numel(), triton.cdiv(I, cfg["gu_j"]) * cfg["gu_split"])](
        x, table, groups.order, groups.bounds, gu, W_OFF=offs[0][0], S_OFF=offs[0][1], Z_OFF=offs[0][2],
        BLOCK_J=cfg["gu_j"], SPLIT_K=cfg["gu_split"], **common)
    # h rounded to the model's dtype, as in the eager expert and the kernels above
    h = (torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]).to(x.dtype)
    _down_deq_kernel[(blocks, table.numel(), triton.cdiv(H // 2, cfg["dn_j"]) * cfg["dn_split"])](
        h, table, groups.order, groups.bounds, weights, out, W_OFF=offs[1][0], S_OFF=offs[1][1],
        Z_OFF=offs[1][2], BLOCK_J=cfg["dn_j"], SPLIT_K=cfg["dn_split"], **common)
    return out


# --- benchmark (GPU) ----------------------------------------------------------------------------


def random_expert(layout: Layout, device, generator=None) -> torch.Tensor:
    """A buffer of `layout` with random weights drawn straight in the packed format: the same bytes
    and the same compute as a quantized real expert (scales small, zeros mid-range)."""
    buf = torch.randint(0, 256, (layout.nbytes,), dtype=torch.uint8, device=device, generator=generator)
    views = layout.views(buf)
    for f in layout.fields:
        v = views[f.name]
        if layout.bits == 16:
            v.copy_(torch.randn(v.shape, device=device, generator=generator) * 0.02)
        elif f.name.endswith(".scale"):
            v.copy_(torch.rand(v.shape, device=device, generator=generator) * 0.01 + 0.005)
        elif f.name.endswith(".zero"):
            v.fill_(2 ** (layout.bits - 1) - 0.5)
    return buf


def write_rows(rows: list[dict], path: str) -> None:
    """A benchmark's rows as a CSV (columns: the first row's keys)."""
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def gpu_time_ms(fn, iters: int) -> float:
    """Mean GPU time of fn() in ms, from `iters` calls captured in one CUDA graph (launch overhead
    excluded, as in a captured decode step); plain back-to-back calls if capture fails."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        start.record()
        graph.replay()
        end.record()
    except RuntimeError:
        start.record()
        for _ in range(iters):
            fn()
        end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


# tokens per expert at which the benchmark times the grouped kernels (and the slot kernels beside them)
BENCH_TOKENS = (1, 4, 16, 32)
BENCH_GROUPED_BITS = (16, 4, 2)


def bench(hidden: int = 4096, intermediate: int = 14336, group_size: int = 64, iters: int = 200,
          dtype=torch.bfloat16, csv_path: str | None = None) -> list[dict]:
    """Time one expert through moe_experts at batch 1 at each precision and through the eager path
    (16-bit F.linear; hqq dequantize-then-matmul); at 16, 4 and 2 bits also n = BENCH_TOKENS
    tokens routed to it, through moe_experts_grouped (grouping included) and through moe_experts
    (n slots). Prints a table (GB/s: the expert's bytes over the time, as if read once) and returns
    it, also written to `csv_path` if given.

    Each variant cycles through enough copies of the expert to exceed twice the L2 cache, so every
    call reads its weights from HBM as at decode."""
    dev = torch.device("cuda")
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    gen = torch.Generator(device=dev).manual_seed(0)
    n_max = max(BENCH_TOKENS)
    xs = torch.randn(n_max, hidden, device=dev, dtype=dtype, generator=gen)  # [n_max, H]
    outs = torch.zeros(n_max, hidden, dtype=torch.float32, device=dev)
    rows = []

    def record(name, layout, n, fn):
        ms = gpu_time_ms(fn, iters)
        rows.append(dict(path=name, bits=layout.bits, tokens=n, ms=ms, gbps=layout.nbytes / ms / 1e6,
                         ms_per_token=ms / n, mb=layout.nbytes / 1e6))

    try:
        from placement.hqq_backend import dequantize
    except ImportError:  # no hqq: no eager quantized row
        dequantize = None

    def run(bits):
        layout = expert_layout(hidden, intermediate, bits, dtype, group_size)
        copies = max(2, -(-2 * l2 // layout.nbytes) + 1)
        bufs = [random_expert(layout, dev, gen) for _ in range(copies)]
        tables = [expert_table([b]) for b in bufs]  # [1] each
        views = [layout.views(b) for b in bufs]
        it = iter(range(1 << 62))  # each call (captured ones too) takes the next copy
        for n in BENCH_TOKENS if bits in BENCH_GROUPED_BITS else (1,):
            x, out = xs[:n], outs[:n]
            slot_tables = [t.repeat(n) for t in tables]  # [n]: n slots of the one expert
            ones, tokens = torch.ones(n, device=dev), torch.arange(n, device=dev)
            record("fused", layout, n, lambda: moe_experts(x, slot_tables[next(it) % copies], ones, layout,
                                                           slot_token=tokens, out=out))
            if bits in BENCH_GROUPED_BITS:
                routed = torch.zeros(n, 1, dtype=torch.int64, device=dev)
                weights = torch.ones(n, 1, device=dev)
                record("fused grouped", layout, n, lambda: moe_experts_grouped(
                    x, tables[next(it) % copies], routed, weights, layout, out=out))
        if bits == 16 or (bits == 4 and dequantize is not None):
            name = "eager F.linear" if bits == 16 else "eager hqq dequantize+matmul"
            record(name, layout, 1, lambda: expert_forward(layout, views[next(it) % copies], xs[:1], F.silu,
                                                           dequantize))

    for bits in BITS:
        run(bits)
        torch.cuda.empty_cache()
    print(f"one expert, H={hidden} I={intermediate} gs={group_size} {dtype}, {torch.cuda.get_device_name(dev)}")
    print(f"{'path':30s} {'bits':>4s} {'tokens':>6s} {'MB':>8s} {'ms':>8s} {'GB/s':>8s} {'ms/token':>9s}")
    for r in rows:
        print(f"{r['path']:30s} {r['bits']:4d} {r['tokens']:6d} {r['mb']:8.1f} {r['ms']:8.4f} {r['gbps']:8.0f} "
              f"{r['ms_per_token']:9.4f}")
    if csv_path:
        write_rows(rows, csv_path)
    return rows


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m placement.kernels",
                                     description="Time the fused expert kernels on one Mixtral-size expert (CUDA).")
    parser.add_argument("--csv", metavar="PATH", help="also write the table to PATH")
    parser.add_argument("--iters", type=int, default=200, help="calls timed per row (default 200)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("python -m placement.kernels times the fused kernels on a CUDA GPU; this machine has none")
    bench(iters=args.iters, csv_path=args.csv)


if __name__ == "__main__":
    main()
