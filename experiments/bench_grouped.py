"""Try a dequantize-then-dot form of the grouped 4-bit expert kernels against placement.kernels' own.

The grouped kernels (moe_experts_grouped) read a 4-bit expert at about 1 TB/s, half the slot
kernels' rate, and that caps batched decode (issue 14: 16 sequences at 4.1x batch 1). They take one
quantization group (64 columns) per K step: a tensor-core dot on the integer codes, then the group's
scale and zero applied to the [rows, tokens] product in fp32, so every step is a short dot whose
result is needed at once, on a 4 KB tile.

The form tried here takes several groups per K step: the codes become weights q * s in the model's
dtype in registers (bf16: one fma per pair of codes, fma(128 + q, s, -128 s), exact but for the one
rounding of q * s), one dot of the whole [rows, K] tile accumulates over K, and the zeros come off
once per step as sum_g z_g s_g sum(x over group g) in fp32 (group sums of x and of the down
projection's input precomputed once per call).

    python -m experiments.bench_grouped --out experiments/results/bench_grouped_h200.csv

Checks every candidate's output against moe_experts_grouped before timing it (kernels.gpu_time_ms,
copies of the expert beyond twice the L2 cache); prints a table per token count and the best.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from placement import kernels
from placement.kernels import _codes4, _jit, _mma, _put, _rsum, tl, triton
from placement.packed import expert_layout


@_jit
def _dequant(c, s, FAST: tl.constexpr):
    """Weights q * s [BJ, NG, GS] from codes c (FAST: bf16 128 + q, by one fma.rn.bf16x2 per pair,
    128 s - 128 s exact, so q * s is rounded once; else q itself) and scales s [BJ, NG]."""
    s3 = tl.broadcast_to(s[:, :, None], c.shape)
    if FAST:
        m3 = (s3.to(tl.float32) * -128.0).to(tl.bfloat16)
        return tl.inline_asm_elementwise("fma.rn.bf16x2 $0, $1, $2, $3;", "=r,r,r,r", [c, s3, m3],
                                         dtype=tl.bfloat16, is_pure=True, pack=2)
    else:
        return c * s3.to(c.dtype)


@_jit
def _zero_term(s, z, gsum):
    """sum_g z_g s_g gsum[g, m] per row [BJ, BM]: what the zeros take off q * s @ x (s, z [BJ, NG],
    gsum [NG, BM] fp32)."""
    zs = z.to(tl.float32) * s.to(tl.float32)
    return _rsum(zs[:, :, None] * gsum[None, :, :], 1)


@_jit
def _gate_up_dq_kernel(
    x_ptr, xsum_ptr, table_ptr, order_ptr, bounds_ptr, gu_ptr,
    H: tl.constexpr, I: tl.constexpr, GS: tl.constexpr, DTYPE: tl.constexpr,
    W_OFF: tl.constexpr, S_OFF: tl.constexpr, Z_OFF: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr, FAST: tl.constexpr,
):
    e = tl.program_id(1)
    addr = tl.load(table_ptr + e)
    if addr != 0:
        base = tl.multiple_of(addr.to(tl.pointer_type(tl.uint8)), 64)
        start = tl.load(bounds_ptr + e).to(tl.int32)
        end = tl.load(bounds_ptr + e + 1).to(tl.int32)
        NG: tl.constexpr = BLOCK_K // GS
        ROWG: tl.constexpr = H // GS
        KS: tl.constexpr = H // SPLIT_K
        j = (tl.program_id(2) // SPLIT_K) * BLOCK_J + tl.arange(0, BLOCK_J)
        jm = j < I
        kstart = (tl.program_id(2) % SPLIT_K) * KS
        kk = tl.arange(0, BLOCK_K)
        gi = tl.arange(0, NG)
        cols = gi[:, None] * GS + tl.arange(0, GS)[None, :]  # [NG, GS]
        wq = base + W_OFF
        sc = (base + S_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
        zr = (base + Z_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
        for m0 in range(start + tl.program_id(0) * BLOCK_M, end, tl.num_programs(0) * BLOCK_M):
            p = m0 + tl.arange(0, BLOCK_M)
            pm = p < end
            tok = tl.load(order_ptr + p, mask=pm, other=0) // TOP_K
            g = tl.full([BLOCK_J, BLOCK_M], 0.0, tl.float32)
            u = tl.full([BLOCK_J, BLOCK_M], 0.0, tl.float32)
            for k0 in range(kstart, kstart + KS, BLOCK_K):
                xt = tl.load(x_ptr + tok[None, :] * H + k0 + kk[:, None], mask=pm[None, :], other=0.0).to(DOT)
                gsum = tl.load(xsum_ptr + tok[None, :] * ROWG + k0 // GS + gi[:, None], mask=pm[None, :], other=0.0)
                b = tl.load(wq + j[:, None, None] * H + k0 + cols[None, :, :], mask=jm[:, None, None], other=0)
                grp = j[:, None] * ROWG + k0 // GS + gi[None, :]  # [BJ, NG]
                sg = tl.load(sc + grp, mask=jm[:, None], other=0.0)
                zg = tl.load(zr + grp, mask=jm[:, None], other=0.0)
                su = tl.load(sc + grp + I * ROWG, mask=jm[:, None], other=0.0)
                zu = tl.load(zr + grp + I * ROWG, mask=jm[:, None], other=0.0)
                cg, cu = _codes4(b, DOT, FAST)
                wg = tl.reshape(_dequant(cg, sg, FAST), (BLOCK_J, BLOCK_K))
                wu = tl.reshape(_dequant(cu, su, FAST), (BLOCK_J, BLOCK_K))
                g += _mma(wg, xt, IEEE) - _zero_term(sg, zg, gsum)
                u += _mma(wu, xt, IEEE) - _zero_term(su, zu, gsum)
            grow = gu_ptr + p[None, :] * (2 * I) + j[:, None]
            gmask = jm[:, None] & pm[None, :]
            _put(grow, g, gmask, SPLIT_K > 1)
            _put(grow + I, u, gmask, SPLIT_K > 1)


@_jit
def _down_dq_kernel(
    h_ptr, hsum_ptr, table_ptr, order_ptr, bounds_ptr, wt_ptr, out_ptr,
    H: tl.constexpr, I: tl.constexpr, GS: tl.constexpr, DTYPE: tl.constexpr,
    W_OFF: tl.constexpr, S_OFF: tl.constexpr, Z_OFF: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr, FAST: tl.constexpr,
):
    e = tl.program_id(1)
    addr = tl.load(table_ptr + e)
    if addr != 0:
        base = tl.multiple_of(addr.to(tl.pointer_type(tl.uint8)), 64)
        start = tl.load(bounds_ptr + e).to(tl.int32)
        end = tl.load(bounds_ptr + e + 1).to(tl.int32)
        R: tl.constexpr = H // 2  # byte [r, k] = down[r, k] << 4 | down[r + H/2, k]
        NG: tl.constexpr = BLOCK_K // GS
        ROWG: tl.constexpr = I // GS
        KS: tl.constexpr = I // SPLIT_K
        j = (tl.program_id(2) // SPLIT_K) * BLOCK_J + tl.arange(0, BLOCK_J)
        jm = j < R
        kstart = (tl.program_id(2) % SPLIT_K) * KS
        kk = tl.arange(0, BLOCK_K)
        gi = tl.arange(0, NG)
        cols = gi[:, None] * GS + tl.arange(0, GS)[None, :]
        wq = base + W_OFF
        sc = (base + S_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
        zr = (base + Z_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
        for m0 in range(start + tl.program_id(0) * BLOCK_M, end, tl.num_programs(0) * BLOCK_M):
            p = m0 + tl.arange(0, BLOCK_M)
            pm = p < end
            slot = tl.load(order_ptr + p, mask=pm, other=0)
            tok = slot // TOP_K
            wt = tl.load(wt_ptr + slot, mask=pm, other=0.0).to(tl.float32)
            a0 = tl.full([BLOCK_J, BLOCK_M], 0.0, tl.float32)
            a1 = tl.full([BLOCK_J, BLOCK_M], 0.0, tl.float32)
            for k0 in range(kstart, kstart + KS, BLOCK_K):
                ht = tl.load(h_ptr + p[None, :] * I + k0 + kk[:, None], mask=pm[None, :], other=0.0).to(DOT)
                gsum = tl.load(hsum_ptr + p[None, :] * ROWG + k0 // GS + gi[:, None], mask=pm[None, :], other=0.0)
                b = tl.load(wq + j[:, None, None] * I + k0 + cols[None, :, :], mask=jm[:, None, None], other=0)
                grp = j[:, None] * ROWG + k0 // GS + gi[None, :]
                s0 = tl.load(sc + grp, mask=jm[:, None], other=0.0)
                z0 = tl.load(zr + grp, mask=jm[:, None], other=0.0)
                s1 = tl.load(sc + grp + R * ROWG, mask=jm[:, None], other=0.0)
                z1 = tl.load(zr + grp + R * ROWG, mask=jm[:, None], other=0.0)
                c0, c1 = _codes4(b, DOT, FAST)
                w0 = tl.reshape(_dequant(c0, s0, FAST), (BLOCK_J, BLOCK_K))
                w1 = tl.reshape(_dequant(c1, s1, FAST), (BLOCK_J, BLOCK_K))
                a0 += _mma(w0, ht, IEEE) - _zero_term(s0, z0, gsum)
                a1 += _mma(w1, ht, IEEE) - _zero_term(s1, z1, gsum)
            orow = out_ptr + tok[None, :] * H + j[:, None]
            omask = jm[:, None] & pm[None, :]
            tl.atomic_add(orow, wt[None, :] * a0, mask=omask, sem="relaxed")
            tl.atomic_add(orow + R, wt[None, :] * a1, mask=omask, sem="relaxed")


def moe_experts_grouped_dq(x, table, top_k_index, top_k_weights, layout, cfg, *, out=None):
    """moe_experts_grouped for 4-bit experts in the dequantize-then-dot form; cfg: bm, gu_j, gu_k,
    gu_split, dn_j, dn_k, dn_split, warps, stages."""
    T, H = x.shape
    _, I = kernels._dims(layout)
    gs = layout.group_size
    E, k = table.numel(), top_k_index.shape[1]
    if out is None:
        out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    groups = kernels.group_tokens(top_k_index, E)
    weights = top_k_weights.reshape(-1).contiguous()
    on_gpu = x.device.type == "cuda"
    dtype = kernels._TL_DTYPES[layout.dtype]
    dot = dtype if on_gpu else tl.float32
    fast = on_gpu and dot == tl.bfloat16
    offs = kernels._offsets(layout)
    launch = {"num_warps": cfg["warps"], "num_stages": cfg["stages"]} if on_gpu else {}
    common = dict(H=H, I=I, GS=gs, DTYPE=dtype, TOP_K=k, BLOCK_M=cfg["bm"], DOT=dot, IEEE=dot == tl.float32,
                  FAST=fast, **launch)
    xsum = x.float().view(T, H // gs, gs).sum(-1)  # [T, H/gs]: each token's group sums
    gu = (torch.zeros if cfg["gu_split"] > 1 else torch.empty)(T * k, 2 * I, dtype=torch.float32, device=x.device)
    blocks = triton.cdiv(T, cfg["bm"])
    _gate_up_dq_kernel[(blocks, E, triton.cdiv(I, cfg["gu_j"]) * cfg["gu_split"])](
        x, xsum, table, groups.order, groups.bounds, gu, W_OFF=offs[0][0], S_OFF=offs[0][1], Z_OFF=offs[0][2],
        BLOCK_J=cfg["gu_j"], BLOCK_K=cfg["gu_k"], SPLIT_K=cfg["gu_split"], **common)
    # the down projection's input, rounded to the model's dtype as in the eager expert, and its group sums
    h = (F.silu(gu[:, :I]) * gu[:, I:]).to(x.dtype)
    hsum = h.float().view(T * k, I // gs, gs).sum(-1)
    _down_dq_kernel[(blocks, E, triton.cdiv(H // 2, cfg["dn_j"]) * cfg["dn_split"])](
        h, hsum, table, groups.order, groups.bounds, weights, out, W_OFF=offs[1][0], S_OFF=offs[1][1],
        Z_OFF=offs[1][2], BLOCK_J=cfg["dn_j"], BLOCK_K=cfg["dn_k"], SPLIT_K=cfg["dn_split"], **common)
    return out


def split_for(programs: int, k: int, chunk: int, sms: int, most: int = 16) -> int:
    """K splits until about 4 programs per SM could be busy (as kernels._grouped_config)."""
    n = 1
    while programs * n < 4 * sms and n < most and k % (chunk * n * 2) == 0:
        n *= 2
    return n


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_grouped", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_grouped.csv", help="CSV of every timing")
    parser.add_argument("--tokens", default="1,4,16", help="tokens routed to the one expert")
    parser.add_argument("--iters", type=int, default=100)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_grouped times CUDA kernels; this machine has none")
    import pandas as pd

    dev = torch.device("cuda")
    hidden, inter, gs, dtype = 4096, 14336, 64, torch.bfloat16
    layout = expert_layout(hidden, inter, 4, dtype, gs)
    gen = torch.Generator(device=dev).manual_seed(0)
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    copies = max(2, -(-2 * l2 // layout.nbytes) + 1)
    bufs = [kernels.random_expert(layout, dev, gen) for _ in range(copies)]
    tables = [kernels.expert_table([b]) for b in bufs]
    sms = kernels._sm_count(0)
    rows = []
    for n in [int(t) for t in args.tokens.split(",")]:
        x = torch.randn(n, hidden, device=dev, dtype=dtype, generator=gen)
        routed = torch.zeros(n, 1, dtype=torch.int64, device=dev)
        weights = torch.ones(n, 1, device=dev)
        out = torch.zeros(n, hidden, dtype=torch.float32, device=dev)
        ref = kernels.moe_experts_grouped(x, tables[0], routed, weights, layout)
        it = iter(range(1 << 62))

        def record(name, cfg, fn):
            ms = kernels.gpu_time_ms(fn, args.iters)
            rows.append(dict(tokens=n, path=name, cfg=str(cfg), ms=ms, gbps=layout.nbytes / ms / 1e6))
            print(f"{n:3d} {name:10s} {ms:8.4f} ms {layout.nbytes / ms / 1e6:7.0f} GB/s  {cfg}", flush=True)

        record("grouped", {}, lambda: kernels.moe_experts_grouped(x, tables[next(it) % copies], routed, weights,
                                                                  layout, out=out))
        record("slots", {}, lambda: kernels.moe_experts(x, tables[next(it) % copies].repeat(n), torch.ones(n, device=dev),
                                                        layout, slot_token=torch.arange(n, device=dev), out=out))
        for bj, bk, warps, stages in itertools.product((64, 128), (128, 256, 512), (4, 8), (2, 3, 4)):
            cfg = dict(bm=16 if n <= 16 else 32, gu_j=bj, gu_k=bk, dn_j=bj, dn_k=bk, warps=warps, stages=stages)
            cfg["gu_split"] = split_for(-(-inter // bj), hidden, bk, sms)
            cfg["dn_split"] = split_for(-(-hidden // 2 // bj), inter, bk, sms)
            try:
                got = moe_experts_grouped_dq(x, tables[0], routed, weights, layout, cfg)
            except Exception as e:  # too many registers or too much shared memory
                rows.append(dict(tokens=n, path="dq", cfg=str(cfg), ms=None, error=str(e)[:160]))
                print(f"{n:3d} dq         failed {cfg}: {str(e)[:160]}", flush=True)
                continue
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            if err > 2e-2:
                rows.append(dict(tokens=n, path="dq", cfg=str(cfg), ms=None, error=f"differs by {err:.3e}"))
                print(f"{n:3d} dq         WRONG by {err:.3e} {cfg}", flush=True)
                continue
            record("dq", cfg, lambda: moe_experts_grouped_dq(x, tables[next(it) % copies], routed, weights, layout,
                                                             cfg, out=out))
    df = pd.DataFrame(rows)
    df.to_csv(args.out, index=False)
    ok = df.dropna(subset=["ms"])
    print("\nbest per token count:")
    for n, g in ok.groupby("tokens"):
        for path, gp in g.groupby("path"):
            best = gp.loc[gp.ms.idxmin()]
            print(f"{n:3d} {path:10s} {best.ms:8.4f} ms {best.gbps:7.0f} GB/s  {best.cfg}")


if __name__ == "__main__":
    main()
