"""Grouped 4-bit experts with the scales applied to the codes before the dot, so the dot accumulates
across quantization groups, against the grouped kernels the engine runs (placement.kernels).

Why (README, "Why the grouped 4-bit kernels stay near 1 TB/s"): the engine's grouped kernels take
one quantization group (64 columns) per K step and apply its scale and zero to that step's product,
s * (q @ x - z * sum(x)). Each step's wgmma must finish before that scaling, so the tensor cores
and the loads never overlap across steps. Here each step turns its codes into weights in bf16,
(q - z) * s, with two packed instructions per two weights (`sub.rn.bf16x2` takes the magic
number's 128 off, `fma.rn.bf16x2` scales), and the dot adds into one accumulator over the whole
K range, as Marlin-style kernels do. down reads h = silu(gate) * up ready-made in bf16 (a small
pass between the kernels), so its dots chain too. -z * s is rounded to bf16 once per group and row, which is
about the rounding of HQQ's own bf16 dequantization.

    python -m experiments.bench_grouped_deq --out experiments/results/bench_grouped_deq_h200.csv

Times one Mixtral expert at 1, 4, 16 and 32 tokens and a layer of 8 experts at 16 and 32 tokens
(top-2), each in a CUDA graph over copies that exceed the L2 cache, both forms side by side, after
checking that they agree. Without CUDA it checks the kernels in Triton's interpreter on a small
expert and prints the agreement only.

Not run on a GPU yet (written 2026-12-02, when the session's device time was spent): the next
session measures it, and either it replaces the engine's 4-bit grouped kernels or this script goes.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from placement import kernels as K
from placement.packed import expert_layout

# (q - z) * s for two weights a word: the codes come from _codes4 as bf16 128 + q (0x4300 | q)
_ASM_DEQ = K._constexpr("""{
    .reg .b32 m, t;
    mov.b32 m, 0x43004300;
    sub.rn.bf16x2 t, $1, m;
    fma.rn.bf16x2 $0, t, $2, $3;
    }""")


@K._jit
def _deq(c, s, nzs, FAST: tl.constexpr):
    """Weights (q - z) * s in the dot's type: codes c [BJ, GS] (FAST: bf16 128 + q; else q in DOT),
    the rows' scales s and -z * s [BJ] (model dtype)."""
    s2 = tl.broadcast_to(s[:, None], c.shape)
    n2 = tl.broadcast_to(nzs[:, None], c.shape)
    if FAST:
        return tl.inline_asm_elementwise(_ASM_DEQ, "=r,r,r,r", [c, s2, n2], dtype=tl.bfloat16, is_pure=True, pack=2)
    else:
        return c * s2.to(c.dtype) + n2.to(c.dtype)


@K._jit
def _scale_zero(sc, zr, grp, jm, DTYPE: tl.constexpr):
    """The rows' scale and -zero * scale for group index grp [BJ], in the model's dtype."""
    s = tl.load(sc + grp, mask=jm, other=0.0)
    z = tl.load(zr + grp, mask=jm, other=0.0)
    return s, (-(z.to(tl.float32) * s.to(tl.float32))).to(DTYPE)


@K._jit
def _expert(addr, bounds_ptr, e, S_OFF: tl.constexpr, Z_OFF: tl.constexpr, DTYPE: tl.constexpr):
    """Expert e's buffer at addr (fields 64-byte aligned), its scales and zeros, and the range
    [start, end) of its slots in the expert-sorted order."""
    base = tl.multiple_of(addr.to(tl.pointer_type(tl.uint8)), 64)
    sc = (base + S_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
    zr = (base + Z_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
    return base, sc, zr, tl.load(bounds_ptr + e).to(tl.int32), tl.load(bounds_ptr + e + 1).to(tl.int32)


@K._jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@K._jit
def _gate_up_deq_kernel(
    x_ptr, table_ptr, order_ptr, bounds_ptr, gu_ptr,
    H: tl.constexpr, I: tl.constexpr, GS: tl.constexpr, DTYPE: tl.constexpr,
    W_OFF: tl.constexpr, S_OFF: tl.constexpr, Z_OFF: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr, FAST: tl.constexpr,
):
    """As placement.kernels._gate_up_grouped_kernel at 4 bits (same grid and outputs), with the
    weights dequantized per group before one accumulating dot."""
    e = tl.program_id(1)
    addr = tl.load(table_ptr + e)
    if addr != 0:
        base, sc, zr, start, end = _expert(addr, bounds_ptr, e, S_OFF, Z_OFF, DTYPE)
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
                cg, cu = K._codes4(b, DOT, FAST)  # byte [j, k] = gate[j, k] << 4 | up[j, k]
                sg, ng = _scale_zero(sc, zr, grp, jm, DTYPE)
                su, nu = _scale_zero(sc, zr, grp + I * ROWG, jm, DTYPE)
                g = _dot(_deq(cg, sg, ng, FAST), xt, g, IEEE)
                u = _dot(_deq(cu, su, nu, FAST), xt, u, IEEE)
            grow = gu_ptr + p[None, :] * (2 * I) + j[:, None]
            gmask = jm[:, None] & pm[None, :]
            K._put(grow, g, gmask, SPLIT_K > 1)
            K._put(grow + I, u, gmask, SPLIT_K > 1)


@K._jit
def _down_deq_kernel(
    h_ptr, table_ptr, order_ptr, bounds_ptr, wt_ptr, out_ptr,
    H: tl.constexpr, I: tl.constexpr, GS: tl.constexpr, DTYPE: tl.constexpr,
    W_OFF: tl.constexpr, S_OFF: tl.constexpr, Z_OFF: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr, FAST: tl.constexpr,
):
    """As placement.kernels._down_grouped_kernel at 4 bits, with the weights dequantized per group
    before one accumulating dot, and h = silu(gate) * up read ready-made ([T*k, I] in the model's
    dtype, by sorted position): a tile computed in registers would go to shared memory for the
    dot at every step and make each dot wait for the one before."""
    e = tl.program_id(1)
    addr = tl.load(table_ptr + e)
    if addr != 0:
        base, sc, zr, start, end = _expert(addr, bounds_ptr, e, S_OFF, Z_OFF, DTYPE)
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
                c0, c1 = K._codes4(b, DOT, FAST)
                s0, n0 = _scale_zero(sc, zr, grp, jm, DTYPE)
                s1, n1 = _scale_zero(sc, zr, grp + R * ROWG, jm, DTYPE)
                a0 = _dot(_deq(c0, s0, n0, FAST), ht, a0, IEEE)
                a1 = _dot(_deq(c1, s1, n1, FAST), ht, a1, IEEE)
            orow = out_ptr + tok[None, :] * H + j[:, None]
            omask = jm[:, None] & pm[None, :]
            tl.atomic_add(orow, wt[None, :] * a0, mask=omask, sem="relaxed")
            tl.atomic_add(orow + R, wt[None, :] * a1, mask=omask, sem="relaxed")


def moe_experts_grouped_deq(x: torch.Tensor, table: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor, layout, out: torch.Tensor | None = None,
                            blocks: dict | None = None) -> torch.Tensor:
    """placement.kernels.moe_experts_grouped for 4-bit layouts, on the dequantize-per-group kernels
    (the same blocks, grid and outputs; `blocks` overrides gu_j, dn_j, warps, stages, and
    split_scale multiplies both K splits, on a GPU)."""
    assert layout.bits == 4, "the experiment covers 4-bit experts"
    T, _ = x.shape
    H, I = K._dims(layout)
    E, k = table.numel(), top_k_index.shape[1]
    if out is None:
        out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    groups = K.group_tokens(top_k_index, E)
    on_gpu = x.device.type == "cuda"
    cfg = K._grouped_config(layout, T, min(E, T * k), not on_gpu, K._sm_count(x.device.index or 0) if on_gpu else 132)
    offs = K._offsets(layout)
    dtype = K._TL_DTYPES[layout.dtype]
    dot = dtype if on_gpu else tl.float32
    fast = on_gpu and dot == tl.bfloat16
    launch = {"num_warps": K._GROUPED_GPU["warps"], "num_stages": K._GROUPED_GPU["stages"][4]} if on_gpu else {}
    if blocks and on_gpu:
        cfg.update({key: blocks[key] for key in ("gu_j", "dn_j") if key in blocks})
        scale = blocks.get("split_scale", 1)
        cfg["gu_split"] = max(1, int(cfg["gu_split"] * scale))
        cfg["dn_split"] = max(1, int(cfg["dn_split"] * scale))
        launch = {"num_warps": blocks.get("warps", launch["num_warps"]),
                  "num_stages": blocks.get("stages", launch["num_stages"])}
    common = dict(H=H, I=I, GS=layout.group_size, DTYPE=dtype, TOP_K=k, BLOCK_M=cfg["bm"], DOT=dot,
                  IEEE=dot == tl.float32, FAST=fast, **launch)
    gu = (torch.zeros if cfg["gu_split"] > 1 else torch.empty)(T * k, 2 * I, dtype=torch.float32, device=x.device)
    blocks = triton.cdiv(T, cfg["bm"])
    _gate_up_deq_kernel[(blocks, E, triton.cdiv(I, cfg["gu_j"]) * cfg["gu_split"])](
        x.contiguous(), table.contiguous(), groups.order, groups.bounds, gu, W_OFF=offs[0][0], S_OFF=offs[0][1],
        Z_OFF=offs[0][2], BLOCK_J=cfg["gu_j"], SPLIT_K=cfg["gu_split"], **common)
    # h rounded to the model's dtype, as in the eager expert and the engine's grouped kernels
    h = (torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]).to(x.dtype)
    _down_deq_kernel[(blocks, E, triton.cdiv(H // 2, cfg["dn_j"]) * cfg["dn_split"])](
        h, table.contiguous(), groups.order, groups.bounds, top_k_weights.reshape(-1).contiguous(), out,
        W_OFF=offs[1][0], S_OFF=offs[1][1], Z_OFF=offs[1][2], BLOCK_J=cfg["dn_j"], SPLIT_K=cfg["dn_split"], **common)
    return out


def _case(layout, experts: int, tokens: int, device, gen) -> tuple:
    """x [T, H], random top-2 routing over `experts` (top-1 for one expert), routing weights."""
    x = torch.randn(tokens, K._dims(layout)[0], device=device, generator=gen).to(layout.dtype)
    k = min(2, experts)
    idx = torch.rand(tokens, experts, device=device, generator=gen).topk(k, dim=1).indices.contiguous()
    wts = torch.softmax(torch.rand(tokens, k, device=device, generator=gen), dim=1).contiguous()
    return x, idx, wts


def compare(hidden: int, inter: int, cases, iters: int, device) -> list[dict]:
    """For each (experts, tokens): the two forms' outputs compared and, on a GPU, timed."""
    gen = torch.Generator(device=device).manual_seed(0)
    layout = expert_layout(hidden, inter, 4, torch.bfloat16 if device.type == "cuda" else torch.float32, 64)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    rows = []
    for experts, tokens in cases:
        copies = max(2, -(-2 * l2 // (experts * layout.nbytes)) + 1)
        bufs = [[K.random_expert(layout, device, gen) for _ in range(experts)] for _ in range(copies)]
        tables = [K.expert_table(b) for b in bufs]
        x, idx, wts = _case(layout, experts, tokens, device, gen)
        ref = K.moe_experts_grouped(x, tables[0], idx, wts, layout)
        got = moe_experts_grouped_deq(x, tables[0], idx, wts, layout)
        diff = ((got - ref).abs().max() / ref.abs().max()).item()
        row = dict(experts=experts, tokens=tokens, rel_diff=diff)
        if device.type == "cuda":
            for name, fn in (("engine_ms", K.moe_experts_grouped), ("deq_ms", moe_experts_grouped_deq)):
                it = iter(range(1 << 62))
                row[name] = K.gpu_time_ms(lambda: fn(x, tables[next(it) % copies], idx, wts, layout), iters)
            row["deq_over_engine"] = row["deq_ms"] / row["engine_ms"]
            row["deq_gbps"] = len(set(idx.flatten().tolist())) * layout.nbytes / row["deq_ms"] / 1e6
        rows.append(row)
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
    return rows


# blocks tried by --sweep: the engine's (gate_up and down rows 64, 4 warps, 3 stages) first
SWEEP = [{}, {"stages": 2}, {"stages": 4}, {"stages": 5}, {"warps": 8}, {"warps": 8, "stages": 4},
         {"gu_j": 128, "dn_j": 128}, {"gu_j": 128, "dn_j": 128, "stages": 4},
         {"gu_j": 128, "dn_j": 128, "warps": 8}, {"gu_j": 128, "dn_j": 128, "warps": 8, "stages": 4},
         {"gu_j": 32, "dn_j": 32}, {"gu_j": 32, "dn_j": 32, "stages": 4},
         {"split_scale": 0.5}, {"split_scale": 2}, {"split_scale": 0.5, "stages": 4}]


def sweep(hidden: int, inter: int, cases, iters: int, device) -> list[dict]:
    """The dequantizing kernels' time at each of SWEEP's blocks, per (experts, tokens) case, after
    checking each against the engine's output."""
    gen = torch.Generator(device=device).manual_seed(0)
    layout = expert_layout(hidden, inter, 4, torch.bfloat16, 64)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    rows = []
    for experts, tokens in cases:
        copies = max(2, -(-2 * l2 // (experts * layout.nbytes)) + 1)
        bufs = [[K.random_expert(layout, device, gen) for _ in range(experts)] for _ in range(copies)]
        tables = [K.expert_table(b) for b in bufs]
        x, idx, wts = _case(layout, experts, tokens, device, gen)
        ref = K.moe_experts_grouped(x, tables[0], idx, wts, layout)
        it = iter(range(1 << 62))
        engine_ms = K.gpu_time_ms(lambda: K.moe_experts_grouped(x, tables[next(it) % copies], idx, wts, layout),
                                  iters)
        for blocks in SWEEP:
            row = dict(experts=experts, tokens=tokens, blocks=str(blocks), engine_ms=engine_ms)
            try:
                got = moe_experts_grouped_deq(x, tables[0], idx, wts, layout, blocks=blocks)
            except Exception as e:  # too many registers or too much shared memory for these blocks
                row["error"] = str(e)[:100]
            else:
                row["rel_diff"] = ((got - ref).abs().max() / ref.abs().max()).item()
                row["deq_ms"] = K.gpu_time_ms(lambda: moe_experts_grouped_deq(
                    x, tables[next(it) % copies], idx, wts, layout, blocks=blocks), iters)
                row["deq_over_engine"] = row["deq_ms"] / engine_ms
            rows.append(row)
            print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_grouped_deq",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--out", help="CSV of the rows (GPU)")
    parser.add_argument("--sweep", action="store_true", help="time the dequantizing kernels at several blocks (GPU)")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    if args.sweep:
        if not gpu:
            parser.error("--sweep needs CUDA")
        rows = sweep(4096, 14336, [(8, 16), (8, 64), (1, 8)], args.iters, device)
    elif gpu:
        rows = compare(4096, 14336, [(1, 1), (1, 4), (1, 16), (1, 32), (8, 16), (8, 32)], args.iters, device)
    else:
        print("no CUDA: the two forms compared in Triton's interpreter on a small expert (no timing)")
        rows = compare(128, 256, [(1, 1), (3, 5)], 1, device)
    if args.out:
        K.write_rows(rows, args.out)


if __name__ == "__main__":
    main()
