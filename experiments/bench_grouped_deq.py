"""Grouped 4-bit experts on the kernels that dequantize per group (placement.kernels,
`moe_experts_grouped(..., dequantize=True)`) against the grouped kernels that scale each group's
product (`dequantize=False`), side by side.

Why they differ: the second kind applies a group's scale and zero to that K step's product,
s * (q @ x - z * sum(x)), so every step's tensor-core dot must finish before the next; the first
turns the codes into weights, (q - z) * s, with three packed bf16 instructions per two weights, so its
dots accumulate across groups (see placement/kernels.py).

    python -m experiments.bench_grouped_deq --out experiments/results/bench_grouped_deq_h100.csv

Times one Mixtral expert at 1, 4, 16 and 32 tokens and a layer of 8 experts at 16 to 256 tokens
(top-2), each in a CUDA graph over copies that exceed the L2 cache, after checking that both forms
agree. Without CUDA it checks them in Triton's interpreter on a small expert and prints the
agreement only. The engine takes the dequantizing kernels for 4-bit calls of
kernels.DEQ_MIN_TOKENS tokens or more (prefill chunks).

Measured on an H100 (2026-12-02, experiments/results/bench_grouped_deq_h100*.csv): 0.98 of the other
kernels' time at 16 tokens of a layer, 0.72-0.77 at 32-256; one expert at 1-16 tokens 1.07-1.13. On
an H200 (bench_grouped_deq_h200.csv, with -z*s as hi + lo): 1.03 at 16 tokens, 0.76-0.79 at 32-256,
one expert 1.17-1.24 at 1-16 tokens and 0.89 at 32.
A sweep of 15 block settings (rows 32/64/128, 4 or 8 warps, 2-5 stages, half or double the K
splits; `--sweep` at e08b381) found none better than the engine's grouped blocks.
"""

from __future__ import annotations

import argparse

import torch

from placement import kernels as K
from placement.packed import expert_layout

GPU_CASES = [(1, 1), (1, 4), (1, 16), (1, 32), (8, 16), (8, 32), (8, 64), (8, 128), (8, 256)]


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
        ref = K.moe_experts_grouped(x, tables[0], idx, wts, layout, dequantize=False)
        got = K.moe_experts_grouped(x, tables[0], idx, wts, layout, dequantize=True)
        diff = ((got - ref).abs().max() / ref.abs().max()).item()
        row = dict(experts=experts, tokens=tokens, rel_diff=diff)
        if device.type == "cuda":
            for name, deq in (("engine_ms", False), ("deq_ms", True)):
                it = iter(range(1 << 62))
                row[name] = K.gpu_time_ms(lambda: K.moe_experts_grouped(
                    x, tables[next(it) % copies], idx, wts, layout, dequantize=deq), iters)
            row["deq_over_engine"] = row["deq_ms"] / row["engine_ms"]
            row["deq_gbps"] = len(set(idx.flatten().tolist())) * layout.nbytes / row["deq_ms"] / 1e6
        rows.append(row)
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_grouped_deq",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--out", help="CSV of the rows (GPU)")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    if gpu:
        rows = compare(4096, 14336, GPU_CASES, args.iters, device)
    else:
        print("no CUDA: the two forms compared in Triton's interpreter on a small expert (no timing)")
        rows = compare(128, 256, [(1, 1), (3, 5)], 1, device)
    if args.out:
        K.write_rows(rows, args.out)


if __name__ == "__main__":
    main()
