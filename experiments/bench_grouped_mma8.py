"""Try grouped 4-bit expert kernels on int8 tensor-core dots against moe_experts_grouped.

moe_experts_grouped reads a 4-bit expert at about 1 TB/s on the H200 (issue 14): per quantization
group, its codes become bf16 for tl.dot. Here they stay integers: a nibble is an int8 operand as it
is (a shift or an and per byte), and the activations, quantized per group to int16 as the slot
kernels' are, go in as two int8 halves (q = 256 * hi + lo, |q| <= 32512), so two s8 dots give
the exact sum(code * q) in int32; per group and row then s * sx * (that - z * sum(q)).

Not yet run on a GPU (written when the session had no device time left); checked in Triton's
interpreter against moe_experts_grouped, and compiled for sm_90 on the CPU, where its dots become
wgmma m64n16k32 s8 instructions (tests would belong with the kernels if it wins).

    python -m experiments.bench_grouped_mma8 --out bench_grouped_mma8.csv
"""

from __future__ import annotations

import argparse
import itertools

import torch

from placement import kernels
from placement.kernels import _jit, _rmax, _round, _rsum, tl, triton
from placement.packed import expert_layout

LIM = 32512  # 127 * 256: the high byte of an activation stays within int8


@_jit
def _split_kernel(x_ptr, hi_ptr, lo_ptr, qs_ptr, qn_ptr, K: tl.constexpr, GS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row program_id(0) of x [rows, K], columns program_id(1) * BLOCK_K + [0, BLOCK_K): quantized per
    group to q = round(x * LIM / max|x|), stored as int8 halves hi, lo (q = 256 * hi + lo), with
    the groups' scales and sums of q."""
    r = tl.program_id(0)
    NG: tl.constexpr = BLOCK_K // GS
    gi = tl.arange(0, NG)
    c = r * K + tl.program_id(1) * BLOCK_K + gi[:, None] * GS + tl.arange(0, GS)[None, :]  # [NG, GS]
    v = tl.load(x_ptr + c).to(tl.float32)
    amax = tl.maximum(_rmax(tl.abs(v), 1), 1e-30)
    q = _round(v * (32512.0 / amax)[:, None])
    lo = ((q + 128) & 255) - 128
    tl.store(hi_ptr + c, ((q - lo) >> 8).to(tl.int8))
    tl.store(lo_ptr + c, lo.to(tl.int8))
    g = r * (K // GS) + tl.program_id(1) * NG + gi
    tl.store(qs_ptr + g, amax / 32512.0)
    tl.store(qn_ptr + g, _rsum(q, 1))


def split_activations(x, gs, block=512):
    R, K = x.shape
    hi = torch.empty(R, K, dtype=torch.int8, device=x.device)
    lo = torch.empty_like(hi)
    qs = torch.empty(R, K // gs, dtype=torch.float32, device=x.device)
    qn = torch.empty(R, K // gs, dtype=torch.int32, device=x.device)
    block = max(kernels._pow2_block(K, block), gs)
    _split_kernel[(R, K // block)](x, hi, lo, qs, qn, K=K, GS=gs, BLOCK_K=block)
    return hi, lo, qs, qn


@_jit
def _group_mma8(codes, xh, xl, sx, xn, scale_ptr, zero_ptr, grp, jm):
    """[BJ, BM]: one group of each row, s * sx * (sum(code * q) - z * sum(q)); codes [BJ, GS] int8,
    xh, xl [GS, BM] int8, sx, xn [BM], grp [BJ]."""
    d = tl.dot(codes, xh, out_dtype=tl.int32) * 256 + tl.dot(codes, xl, out_dtype=tl.int32)
    s = tl.load(scale_ptr + grp, mask=jm, other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + grp, mask=jm, other=0.0).to(tl.float32)
    return s[:, None] * sx[None, :] * (d.to(tl.float32) - z[:, None] * xn.to(tl.float32)[None, :])


@_jit
def _gate_up_kernel(
    hi_ptr, lo_ptr, qs_ptr, qn_ptr, table_ptr, order_ptr, bounds_ptr, gu_ptr,
    H: tl.constexpr, I: tl.constexpr, GS: tl.constexpr, DTYPE: tl.constexpr,
    W_OFF: tl.constexpr, S_OFF: tl.constexpr, Z_OFF: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """4-bit: gu[p] = [x[t] @ gate.T, x[t] @ up.T] for the sorted slots p of expert program_id(1);
    program_id(2) is (row block, K split), K splits adding into gu (zeroed)."""
    e = tl.program_id(1)
    addr = tl.load(table_ptr + e)
    if addr != 0:
        base = tl.multiple_of(addr.to(tl.pointer_type(tl.uint8)), 64)
        sc = (base + S_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
        zr = (base + Z_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
        start = tl.load(bounds_ptr + e).to(tl.int32)
        end = tl.load(bounds_ptr + e + 1).to(tl.int32)
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
            for k0 in range(kstart, kstart + KS, GS):  # one group per step
                xo = tok[None, :] * H + k0 + kk[:, None]  # [GS, BM]
                xh = tl.load(hi_ptr + xo, mask=pm[None, :], other=0)
                xl = tl.load(lo_ptr + xo, mask=pm[None, :], other=0)
                sx = tl.load(qs_ptr + tok * ROWG + k0 // GS, mask=pm, other=0.0)
                xn = tl.load(qn_ptr + tok * ROWG + k0 // GS, mask=pm, other=0)
                b = tl.load(base + W_OFF + j[:, None] * H + k0 + kk[None, :], mask=jm[:, None], other=0)
                grp = j * ROWG + k0 // GS
                g += _group_mma8((b >> 4).to(tl.int8), xh, xl, sx, xn, sc, zr, grp, jm)
                u += _group_mma8((b & 15).to(tl.int8), xh, xl, sx, xn, sc, zr, grp + I * ROWG, jm)
            grow = gu_ptr + p[None, :] * (2 * I) + j[:, None]
            gmask = jm[:, None] & pm[None, :]
            if SPLIT_K > 1:
                tl.atomic_add(grow, g, mask=gmask, sem="relaxed")
                tl.atomic_add(grow + I, u, mask=gmask, sem="relaxed")
            else:
                tl.store(grow, g, mask=gmask)
                tl.store(grow + I, u, mask=gmask)


@_jit
def _down_kernel(
    hi_ptr, lo_ptr, qs_ptr, qn_ptr, table_ptr, order_ptr, bounds_ptr, wt_ptr, out_ptr,
    H: tl.constexpr, I: tl.constexpr, GS: tl.constexpr, DTYPE: tl.constexpr,
    W_OFF: tl.constexpr, S_OFF: tl.constexpr, Z_OFF: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """4-bit: out[t] += w * (down @ h[p]) for the sorted slots p of expert program_id(1), h[p] split
    by _split_kernel; program_id(2) is (row block, K split), atomic adds."""
    e = tl.program_id(1)
    addr = tl.load(table_ptr + e)
    if addr != 0:
        base = tl.multiple_of(addr.to(tl.pointer_type(tl.uint8)), 64)
        sc = (base + S_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
        zr = (base + Z_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
        start = tl.load(bounds_ptr + e).to(tl.int32)
        end = tl.load(bounds_ptr + e + 1).to(tl.int32)
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
                ho = p[None, :] * I + k0 + kk[:, None]
                hh = tl.load(hi_ptr + ho, mask=pm[None, :], other=0)
                hl = tl.load(lo_ptr + ho, mask=pm[None, :], other=0)
                sh = tl.load(qs_ptr + p * ROWG + k0 // GS, mask=pm, other=0.0)
                hn = tl.load(qn_ptr + p * ROWG + k0 // GS, mask=pm, other=0)
                b = tl.load(base + W_OFF + j[:, None] * I + k0 + kk[None, :], mask=jm[:, None], other=0)
                grp = j * ROWG + k0 // GS
                a0 += _group_mma8((b >> 4).to(tl.int8), hh, hl, sh, hn, sc, zr, grp, jm)
                a1 += _group_mma8((b & 15).to(tl.int8), hh, hl, sh, hn, sc, zr, grp + R * ROWG, jm)
            orow = out_ptr + tok[None, :] * H + j[:, None]
            omask = jm[:, None] & pm[None, :]
            tl.atomic_add(orow, wt[None, :] * a0, mask=omask, sem="relaxed")
            tl.atomic_add(orow + R, wt[None, :] * a1, mask=omask, sem="relaxed")


def grouped_mma8(x, table, top_k_index, top_k_weights, layout, cfg, *, out=None):
    """moe_experts_grouped for 4-bit experts by int8 dots; cfg: bm, gu_j, gu_split, dn_j, dn_split,
    warps, stages."""
    T, H = x.shape
    _, I = kernels._dims(layout)
    gs = layout.group_size
    E, k = table.numel(), top_k_index.shape[1]
    if out is None:
        out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    groups = kernels.group_tokens(top_k_index, E)
    weights = top_k_weights.reshape(-1).contiguous()
    on_gpu = x.device.type == "cuda"
    offs = kernels._offsets(layout)
    common = dict(GS=gs, DTYPE=kernels._TL_DTYPES[layout.dtype], TOP_K=k, BLOCK_M=cfg["bm"],
                  **({"num_warps": cfg["warps"], "num_stages": cfg["stages"]} if on_gpu else {}))
    gu = (torch.zeros if cfg["gu_split"] > 1 else torch.empty)(T * k, 2 * I, dtype=torch.float32, device=x.device)
    blocks = triton.cdiv(T, cfg["bm"])
    _gate_up_kernel[(blocks, E, triton.cdiv(I, cfg["gu_j"]) * cfg["gu_split"])](
        *split_activations(x, gs), table, groups.order, groups.bounds, gu, H=H, I=I, W_OFF=offs[0][0],
        S_OFF=offs[0][1], Z_OFF=offs[0][2], BLOCK_J=cfg["gu_j"], SPLIT_K=cfg["gu_split"], **common)
    # the down projection's input, rounded to the model's dtype as in the eager expert
    h = (torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]).to(x.dtype)
    _down_kernel[(blocks, E, triton.cdiv(H // 2, cfg["dn_j"]) * cfg["dn_split"])](
        *split_activations(h, gs), table, groups.order, groups.bounds, weights, out, H=H, I=I,
        W_OFF=offs[1][0], S_OFF=offs[1][1], Z_OFF=offs[1][2], BLOCK_J=cfg["dn_j"], SPLIT_K=cfg["dn_split"],
        **common)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_grouped_mma8",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_grouped_mma8.csv")
    parser.add_argument("--tokens", default="1,4,8,16")
    parser.add_argument("--iters", type=int, default=100)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_grouped_mma8 times CUDA kernels; this machine has none")
    import pandas as pd

    dev = torch.device("cuda")
    layout = expert_layout(4096, 14336, 4, torch.bfloat16, 64)
    gen = torch.Generator(device=dev).manual_seed(0)
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    copies = max(2, -(-2 * l2 // layout.nbytes) + 1)
    bufs = [kernels.random_expert(layout, dev, gen) for _ in range(copies)]
    tables = [kernels.expert_table([b]) for b in bufs]
    rows = []
    for n in [int(t) for t in args.tokens.split(",")]:
        x = torch.randn(n, 4096, device=dev, dtype=torch.bfloat16, generator=gen)
        routed = torch.zeros(n, 1, dtype=torch.int64, device=dev)
        weights = torch.ones(n, 1, device=dev)
        out = torch.zeros(n, 4096, dtype=torch.float32, device=dev)
        ref = kernels.moe_experts_grouped(x, tables[0], routed, weights, layout)
        it = iter(range(1 << 62))

        def record(path, cfg, fn):
            ms = kernels.gpu_time_ms(fn, args.iters)
            rows.append(dict(tokens=n, path=path, cfg=str(cfg), ms=ms, gbps=layout.nbytes / ms / 1e6))
            print(f"{n:3d} {path:10s} {ms:8.4f} ms {layout.nbytes / ms / 1e6:6.0f} GB/s {cfg}", flush=True)

        record("grouped", "", lambda: kernels.moe_experts_grouped(x, tables[next(it) % copies], routed, weights,
                                                                  layout, out=out))
        # a short sweep (8 blocks): ptxas gives these 112-208 registers and no spills for sm_90
        for bj, gu_split, dn_split, warps, stages in itertools.product((64, 128), (4,), (4, 8), (4, 8), (3,)):
            cfg = dict(bm=16 if n <= 16 else 32, gu_j=bj, gu_split=gu_split, dn_j=bj, dn_split=dn_split,
                       warps=warps, stages=stages)
            try:
                got = grouped_mma8(x, tables[0], routed, weights, layout, cfg)
            except Exception as e:
                print(f"{n} failed {cfg}: {str(e)[:160]}", flush=True)
                continue
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            if not err < 2e-2:
                print(f"{n} WRONG by {err:.2e} {cfg}", flush=True)
                continue
            record("mma8", cfg, lambda: grouped_mma8(x, tables[next(it) % copies], routed, weights, layout, cfg,
                                                     out=out))
    df = pd.DataFrame(rows)
    df.to_csv(args.out, index=False)
    print("best per token count:")
    for n, g in df.groupby("tokens"):
        for path, gp in g.groupby("path"):
            b = gp.loc[gp.ms.idxmin()]
            print(f"{n:3d} {path:10s} {b.ms:8.4f} ms {b.gbps:6.0f} GB/s {b.cfg}")


if __name__ == "__main__":
    main()
