"""Is a Triton GEMV worth writing for the 16-bit attention projections at decode? A plain one
(rows x K chunks, fp32 accumulation, bf16 store), its blocks swept per shape, against F.linear
(cuBLAS) on Mixtral-8x7B's fused q/k/v (6144 x 4096), o (4096 x 4096), k or v alone (1024 x 4096)
and the LM head (32000 x 4096), 1, 2 and 4 rows, each timed in a CUDA graph over enough weight
copies to miss the L2 cache (kernels.gpu_time_ms).

    python -m experiments.bench_gemv --out experiments/results/bench_gemv_h200.csv

H200 (experiments/results/bench_gemv_h200.csv): at one row the best Triton blocks take 0.94 of
cuBLAS's time on q/k/v (15.2 against 16.1 us) and 0.88 on o (11.0 against 12.4): 2.3 us of a
layer's ~150 us at 4 bits, so decode keeps cuBLAS; at 2 and 4 rows cuBLAS is faster.
"""
import argparse
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from placement.kernels import gpu_time_ms, write_rows


@triton.jit
def _gemv(x_ptr, w_ptr, out_ptr, N, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACC2D: tl.constexpr):
    m = tl.program_id(1)
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = rows < N
    kk = tl.arange(0, BK)
    if ACC2D:
        acc = tl.zeros([BN, BK], tl.float32)
        for k0 in range(0, K, BK):
            x = tl.load(x_ptr + m * K + k0 + kk).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * K + k0 + kk[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
            acc += w * x[None, :]
        y = tl.sum(acc, 1)
    else:
        y = tl.zeros([BN], tl.float32)
        for k0 in range(0, K, BK):
            x = tl.load(x_ptr + m * K + k0 + kk).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * K + k0 + kk[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
            y += tl.sum(w * x[None, :], 1)
    tl.store(out_ptr + m * N + rows, y.to(out_ptr.dtype.element_ty), mask=rm)


def gemv(x, w, out, bn, bk, warps, stages, acc2d):
    M, K = x.shape
    N = w.shape[0]
    _gemv[(triton.cdiv(N, bn), M)](x, w, out, N, K=K, BN=bn, BK=bk, ACC2D=acc2d, num_warps=warps, num_stages=stages)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_gemv.csv", help="CSV to write")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gemv times kernels on a CUDA GPU; this machine has none")
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    gen = torch.Generator(device=dev).manual_seed(0)
    print(torch.cuda.get_device_name(dev), "L2", l2 >> 20, "MiB")
    shapes = [(6144, 4096), (4096, 4096), (1024, 4096), (32000, 4096)]
    rows = []
    for (N, K), M in itertools.product(shapes, (1, 2, 4)):
        if N == 32000 and M > 1:
            continue
        nbytes = N * K * 2
        copies = max(2, -(-2 * l2 // nbytes) + 1)
        ws = [torch.randn(N, K, device=dev, dtype=dtype, generator=gen) * 0.02 for _ in range(copies)]
        x = torch.randn(M, K, device=dev, dtype=dtype, generator=gen)
        out = torch.empty(M, N, device=dev, dtype=dtype)
        it = iter(range(1 << 62))
        ref = F.linear(x, ws[0])
        base = gpu_time_ms(lambda: F.linear(x, ws[next(it) % copies]), 100)
        best = None
        for bn, bk, warps, stages, acc2d in itertools.product((4, 8, 16), (512, 1024), (4, 8), (1, 3),
                                                               (True, False)):
            if bn * bk > 8192 or bn * bk < 512:
                continue
            try:
                gemv(x, ws[0], out, bn, bk, warps, stages, acc2d)
                err = (out.float() - ref.float()).abs().max().item()
                ms = gpu_time_ms(lambda: gemv(x, ws[next(it) % copies], out, bn, bk, warps, stages, acc2d), 100)
            except Exception as e:  # noqa: BLE001 - a block the compiler refuses is skipped, and said
                print("fail", bn, bk, warps, stages, acc2d, str(e)[:100])
                continue
            if best is None or ms < best[0]:
                best = (ms, bn, bk, warps, stages, acc2d, err)
        ms = best[0]
        print(f"N={N:5d} K={K} M={M}: F.linear {base*1e3:7.2f} us ({nbytes/base/1e6:5.0f} GB/s)  triton {ms*1e3:7.2f} us "
              f"({nbytes/ms/1e6:5.0f} GB/s) ratio {ms/base:.3f}  cfg bn={best[1]} bk={best[2]} w={best[3]} s={best[4]} "
              f"acc2d={best[5]} err={best[6]:.2e}", flush=True)
        rows.append(dict(n=N, k=K, m=M, flinear_us=base * 1e3, triton_us=ms * 1e3, bn=best[1], bk=best[2],
                         warps=best[3], stages=best[4], acc2d=best[5]))
        ws = None  # (freed before the next shape)
        torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_rows(rows, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
