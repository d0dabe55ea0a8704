"""Where a decode step's time goes on the GPU: every kernel of one step, grouped by what it does,
beside the step's time as a CUDA graph replay (what serving runs).

    python -m experiments.profile_step --layers 16 --bits 4 --batch 1 --out experiments/results/profile_step_h200.csv

The model is `mixtral-8x7b-shape` (random weights, experts rounded to nearest in HQQ's format as in
bench_decode), every expert on the GPU at --bits. One step is run eagerly under torch.profiler to list
its kernels with their device times; the gap between the sum of those and the graph step is the
time the GPU spends between kernels.
"""

from __future__ import annotations

import argparse
import re

import pandas as pd
import torch

from catalog.knobs import Knobs
from experiments.bench_decode import FAST_QUANTIZER
from placement.decode import Decoder
from placement.engine import Engine
from placement.models import load_model
from placement.plan import build_plan

# kernel name -> what it does (first match wins)
KINDS = [
    ("experts", r"gate_up|down_kernel|_down_grouped|grouped_kernel"),
    ("expert grouping", r"sort|searchsorted|radix|Sort"),
    ("matmul (attention, router, LM head)", r"gemm|gemv|cutlass|sm90_xmma|nvjet|cublas|Gemm|splitK"),
    ("attention core", r"flash|fmha|attention|sdpa|softmax_warp"),
    ("copies and indexing", r"copy|index|scatter|gather|cat|Copy|fill"),
    ("reductions (norms, top-k)", r"reduce|topk|Reduce|bitonic|mbtopk|gatherTopK"),
    ("elementwise", r"elementwise|vectorized|unrolled"),
]


def kind_of(name: str) -> str:
    return next((k for k, pattern in KINDS if re.search(pattern, name)), "other")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.profile_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--bits", type=int, default=4, choices=(16, 8, 4, 2))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--kv-len", type=int, default=256)
    parser.add_argument("--out", help="CSV of the kernels of one step")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_step profiles GPU kernels; this machine has no CUDA GPU")
    loaded = load_model("mixtral-8x7b-shape", layers=args.layers, dtype=torch.bfloat16, device="cuda",
                        seeded_experts=True)
    engine = Engine(loaded.model, quantizer=FAST_QUANTIZER, masters=loaded.masters, variant_cache=False,
                    keep_variants=False)
    total = engine.spec.num_layers * engine.spec.num_experts
    knobs = Knobs() if args.bits == 16 else Knobs(quantized=total, bits=args.bits)
    engine.apply(build_plan(engine.spec, knobs))
    decoder = Decoder(loaded.model, engine, max_seqs=args.batch, max_len=args.kv_len)
    graph_s = decoder.time_steps(args.batch, args.kv_len, 50)
    decoder.use_graphs = False
    eager_s = decoder.time_steps(args.batch, args.kv_len, 10)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        decoder._decode_forward(args.batch, args.kv_len)
        torch.cuda.synchronize()
    rows = [dict(kernel=e.name, kind=kind_of(e.name), us=e.device_time_total)
            for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    table = pd.DataFrame(rows)
    by_kind = table.groupby("kind").agg(kernels=("us", "size"), us=("us", "sum")).sort_values("us", ascending=False)
    by_kind["us_per_layer"] = by_kind["us"] / args.layers
    kernel_us = table["us"].sum()
    print(f"{args.layers} layers, {args.bits}-bit experts, batch {args.batch}, kv {args.kv_len}: "
          f"graph step {graph_s * 1e3:.3f} ms, eager step {eager_s * 1e3:.3f} ms, "
          f"{len(table)} kernels ({len(table) / args.layers:.1f} per layer) taking {kernel_us / 1e3:.3f} ms; "
          f"between kernels in the graph {graph_s * 1e3 - kernel_us / 1e3:.3f} ms")
    print(by_kind.to_string())
    top = table.groupby("kernel").agg(calls=("us", "size"), us=("us", "sum")).sort_values("us", ascending=False)
    print(top.head(25).to_string())
    if args.out:
        table.assign(layers=args.layers, bits=args.bits, batch=args.batch, graph_step_ms=graph_s * 1e3,
                     eager_step_ms=eager_s * 1e3).to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
