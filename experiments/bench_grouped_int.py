"""Try grouped 4-bit expert kernels on integer activations against moe_experts_grouped.

moe_experts_grouped reads a 4-bit expert once per block of its tokens with tensor-core dots on the
codes, at about 1 TB/s, which caps batched decode (issue 14). Here a program takes one expert, a
block of BLOCK_M of its tokens and a block of rows, and multiplies each word of codes with every
token's int16 activations by dp2a (as the slot kernels do for one token): the codes are loaded and
unpacked once for the block, the dp2a cost grows with the tokens.

    python -m experiments.bench_grouped_int --out bench_grouped_int.csv
"""

from __future__ import annotations

import argparse
import itertools

import torch

from placement import kernels
from placement.kernels import _idot, _jit, _rsum, tl, triton
from placement.packed import expert_layout


@_jit
def _int_group_dot_m(codes, xa, xb, sx, xn, scale_ptr, zero_ptr, grp, rmask, FAST: tl.constexpr):
    """[BJ, BM]: per row and token, sum over the chunk's groups of s * sx * (sum(q * xq) - z * sum(xq));
    codes [BJ, NG, GW], xa, xb [NG, GW, BM], sx, xn [NG, BM], grp [BJ, NG]."""
    qx = _rsum(_idot(codes[:, :, :, None], xa[None, :, :, :], xb[None, :, :, :], FAST), 2).to(tl.float32)
    s = tl.load(scale_ptr + grp, mask=rmask, other=0.0).to(tl.float32)[:, :, None]
    z = tl.load(zero_ptr + grp, mask=rmask, other=0.0).to(tl.float32)[:, :, None]
    return _rsum(s * sx[None, :, :] * (qx - z * xn.to(tl.float32)[None, :, :]), 1)


@_jit
def _load_act_m(qa_ptr, qb_ptr, qs_ptr, qn_ptr, rows, pm, K: tl.constexpr, k0, gi, wi, GS: tl.constexpr):
    """quantize_activations' output for rows `rows` [BM] (masked by pm): xa, xb [NG, GW, BM], sx, xn [NG, BM]."""
    GW: tl.constexpr = GS // 4
    w = rows[None, None, :] * (K // 4) + k0 // 4 + gi[:, None, None] * GW + wi[None, :, None]
    g = rows[None, :] * (K // GS) + k0 // GS + gi[:, None]
    m3 = pm[None, None, :]
    return (tl.load(qa_ptr + w, mask=m3, other=0), tl.load(qb_ptr + w, mask=m3, other=0),
            tl.load(qs_ptr + g, mask=pm[None, :], other=0.0), tl.load(qn_ptr + g, mask=pm[None, :], other=0))


@_jit
def _gate_up_kernel(
    qa_ptr, qb_ptr, qs_ptr, qn_ptr, table_ptr, order_ptr, bounds_ptr, h_ptr,
    H: tl.constexpr, I: tl.constexpr, GS: tl.constexpr, DTYPE: tl.constexpr,
    W_OFF: tl.constexpr, S_OFF: tl.constexpr, Z_OFF: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, FAST: tl.constexpr,
):
    """4-bit: h[p] = silu(x[t] @ gate.T) * (x[t] @ up.T) for the sorted slots p of expert program_id(1)."""
    e = tl.program_id(1)
    addr = tl.load(table_ptr + e)
    if addr != 0:
        base = tl.multiple_of(addr.to(tl.pointer_type(tl.uint8)), 64)
        wq = (base + W_OFF).to(tl.pointer_type(tl.int32), bitcast=True)
        sc = (base + S_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
        zr = (base + Z_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
        start = tl.load(bounds_ptr + e).to(tl.int32)
        end = tl.load(bounds_ptr + e + 1).to(tl.int32)
        NG: tl.constexpr = BLOCK_K // GS
        GW: tl.constexpr = GS // 4
        ROWG: tl.constexpr = H // GS
        j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
        jm = j < I
        rmask = jm[:, None]
        gi = tl.arange(0, NG)
        wi = tl.arange(0, GW)
        for m0 in range(start + tl.program_id(0) * BLOCK_M, end, tl.num_programs(0) * BLOCK_M):
            p = m0 + tl.arange(0, BLOCK_M)
            pm = p < end
            tok = tl.load(order_ptr + p, mask=pm, other=0) // TOP_K
            g = tl.full([BLOCK_J, BLOCK_M], 0.0, tl.float32)
            u = tl.full([BLOCK_J, BLOCK_M], 0.0, tl.float32)
            for k0 in range(0, H, BLOCK_K):
                xa, xb, sx, xn = _load_act_m(qa_ptr, qb_ptr, qs_ptr, qn_ptr, tok, pm, H, k0, gi, wi, GS)
                codes = tl.load(wq + j[:, None, None] * (H // 4) + k0 // 4 + gi[None, :, None] * GW + wi[None, None, :],
                                mask=rmask[:, :, None], other=0)
                grp = j[:, None] * ROWG + k0 // GS + gi[None, :]
                g += _int_group_dot_m((codes >> 4) & 0x0F0F0F0F, xa, xb, sx, xn, sc, zr, grp, rmask, FAST)
                u += _int_group_dot_m(codes & 0x0F0F0F0F, xa, xb, sx, xn, sc, zr, grp + I * ROWG, rmask, FAST)
            tl.store(h_ptr + p[None, :] * I + j[:, None], g / (1.0 + tl.exp(-g)) * u, mask=rmask & pm[None, :])


@_jit
def _down_kernel(
    qa_ptr, qb_ptr, qs_ptr, qn_ptr, table_ptr, order_ptr, bounds_ptr, wt_ptr, out_ptr,
    H: tl.constexpr, I: tl.constexpr, GS: tl.constexpr, DTYPE: tl.constexpr,
    W_OFF: tl.constexpr, S_OFF: tl.constexpr, Z_OFF: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    FAST: tl.constexpr,
):
    """4-bit: out[t] += w * (down @ h[p]) for the sorted slots p of expert program_id(1); program_id(2)
    is (row block, K split), atomic adds."""
    e = tl.program_id(1)
    addr = tl.load(table_ptr + e)
    if addr != 0:
        base = tl.multiple_of(addr.to(tl.pointer_type(tl.uint8)), 64)
        wq = (base + W_OFF).to(tl.pointer_type(tl.int32), bitcast=True)
        sc = (base + S_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
        zr = (base + Z_OFF).to(tl.pointer_type(DTYPE), bitcast=True)
        start = tl.load(bounds_ptr + e).to(tl.int32)
        end = tl.load(bounds_ptr + e + 1).to(tl.int32)
        NG: tl.constexpr = BLOCK_K // GS
        GW: tl.constexpr = GS // 4
        R: tl.constexpr = H // 2
        ROWG: tl.constexpr = I // GS
        KS: tl.constexpr = I // SPLIT_K
        j = (tl.program_id(2) // SPLIT_K) * BLOCK_J + tl.arange(0, BLOCK_J)
        jm = j < R
        rmask = jm[:, None]
        kstart = (tl.program_id(2) % SPLIT_K) * KS
        gi = tl.arange(0, NG)
        wi = tl.arange(0, GW)
        for m0 in range(start + tl.program_id(0) * BLOCK_M, end, tl.num_programs(0) * BLOCK_M):
            p = m0 + tl.arange(0, BLOCK_M)
            pm = p < end
            slot = tl.load(order_ptr + p, mask=pm, other=0)
            tok = slot // TOP_K
            wt = tl.load(wt_ptr + slot, mask=pm, other=0.0).to(tl.float32)
            a0 = tl.full([BLOCK_J, BLOCK_M], 0.0, tl.float32)
            a1 = tl.full([BLOCK_J, BLOCK_M], 0.0, tl.float32)
            for k0 in range(kstart, kstart + KS, BLOCK_K):
                ha, hb, sh, hn = _load_act_m(qa_ptr, qb_ptr, qs_ptr, qn_ptr, p, pm, I, k0, gi, wi, GS)
                codes = tl.load(wq + j[:, None, None] * (I // 4) + k0 // 4 + gi[None, :, None] * GW + wi[None, None, :],
                                mask=rmask[:, :, None], other=0)
                grp = j[:, None] * ROWG + k0 // GS + gi[None, :]
                a0 += _int_group_dot_m((codes >> 4) & 0x0F0F0F0F, ha, hb, sh, hn, sc, zr, grp, rmask, FAST)
                a1 += _int_group_dot_m(codes & 0x0F0F0F0F, ha, hb, sh, hn, sc, zr, grp + R * ROWG, rmask, FAST)
            orow = out_ptr + tok[None, :] * H + j[:, None]
            omask = rmask & pm[None, :]
            tl.atomic_add(orow, wt[None, :] * a0, mask=omask, sem="relaxed")
            tl.atomic_add(orow + R, wt[None, :] * a1, mask=omask, sem="relaxed")


def grouped_int(x, table, top_k_index, top_k_weights, layout, cfg, *, out=None):
    """moe_experts_grouped for 4-bit experts on int16 activations; cfg: bm, gu_j, gu_k, dn_j, dn_k,
    dn_split, warps, stages."""
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
    common = dict(GS=gs, DTYPE=kernels._TL_DTYPES[layout.dtype], TOP_K=k, BLOCK_M=cfg["bm"], FAST=on_gpu,
                  **({"num_warps": cfg["warps"], "num_stages": cfg["stages"]} if on_gpu else {}))
    h = torch.empty(T * k, I, dtype=torch.float32, device=x.device)
    blocks = triton.cdiv(T, cfg["bm"])
    _gate_up_kernel[(blocks, E, triton.cdiv(I, cfg["gu_j"]))](
        *kernels.quantize_activations(x, gs), table, groups.order, groups.bounds, h, H=H, I=I, W_OFF=offs[0][0],
        S_OFF=offs[0][1], Z_OFF=offs[0][2], BLOCK_J=cfg["gu_j"], BLOCK_K=cfg["gu_k"], **common)
    _down_kernel[(blocks, E, triton.cdiv(H // 2, cfg["dn_j"]) * cfg["dn_split"])](
        *kernels.quantize_activations(h, gs), table, groups.order, groups.bounds, weights, out, H=H, I=I,
        W_OFF=offs[1][0], S_OFF=offs[1][1], Z_OFF=offs[1][2], BLOCK_J=cfg["dn_j"], BLOCK_K=cfg["dn_k"],
        SPLIT_K=cfg["dn_split"], **common)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_grouped_int", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_grouped_int.csv")
    parser.add_argument("--tokens", default="1,4,8")
    parser.add_argument("--iters", type=int, default=100)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_grouped_int times CUDA kernels; this machine has none")
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
            return ms

        record("grouped", "", lambda: kernels.moe_experts_grouped(x, tables[next(it) % copies], routed, weights,
                                                                  layout, out=out))
        record("slots", "", lambda: kernels.moe_experts(x, tables[next(it) % copies].repeat(n), torch.ones(n, device=dev),
                                                        layout, slot_token=torch.arange(n, device=dev), out=out))
        bm = max(triton.next_power_of_2(n), 1)
        for bj, bk, dn_j, split, warps in itertools.product((16, 32), (512,), (16, 32), (4,), (4, 8)):
            cfg = dict(bm=bm, gu_j=bj, gu_k=bk, dn_j=dn_j, dn_k=bk, dn_split=split, warps=warps, stages=2)
            try:
                got = grouped_int(x, tables[0], routed, weights, layout, cfg)
            except Exception as e:
                print(f"{n} failed {cfg}: {str(e)[:160]}", flush=True)
                continue
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            if not err < 2e-2:
                print(f"{n} WRONG by {err:.2e} {cfg}", flush=True)
                continue
            record("int grouped", cfg, lambda: grouped_int(x, tables[next(it) % copies], routed, weights, layout,
                                                           cfg, out=out))
    df = pd.DataFrame(rows)
    df.to_csv(args.out, index=False)
    for n, g in df.groupby("tokens"):
        for path, gp in g.groupby("path"):
            b = gp.loc[gp.ms.idxmin()]
            print(f"{n:3d} {path:12s} {b.ms:8.4f} ms {b.gbps:6.0f} GB/s {b.cfg}")


if __name__ == "__main__":
    main()
