"""Where a decode step's time goes on the GPU: every kernel of one step, grouped by what it does,
beside the step's time as a CUDA graph replay (what serving runs).

    python -m experiments.profile_step --layers 16 --bits 4 --batch 1 --out experiments/results/profile_step_h200.csv

The model is `mixtral-8x7b-shape` (random weights, experts rounded to nearest in HQQ's format as in
bench_decode), every expert on the GPU at --bits. One step is run eagerly under torch.profiler to list
its kernels with their device times; the gap between the sum of those and the graph step is the
time the GPU spends between kernels.

`--fast-layers off,compile` profiles the same step once per setting of the decoder's fast layers
(placement/fast_layers.py: attention, norms and router fused and compiled) and prints them side by
side, with each one's warm-up (compile and capture) time and its logits' largest difference from
the first setting's.

    python -m experiments.profile_step --layers 16 --bits 4 --batch 1 --fast-layers off,compile,compile-reduce
"""

from __future__ import annotations

import argparse
import re
import time

import pandas as pd
import torch

from catalog.knobs import Knobs
from experiments.bench_decode import FAST_QUANTIZER
from placement import fast_layers as fl
from placement.decode import Decoder
from placement.engine import Engine
from placement.models import load_model
from placement.plan import build_plan

# kernel name -> what it does (first match wins)
KINDS = [
    ("experts", r"gate_up|_down_|grouped_kernel|_quantize_kernel"),
    ("fused (inductor)", r"^triton_(poi|red|per|tem)_"),
    ("expert grouping", r"sort|searchsorted|radix|Sort"),
    ("matmul (attention, router, LM head)", r"gemm|gemv|cutlass|sm90_xmma|nvjet|cublas|Gemm|splitK"),
    ("attention core", r"flash|fmha|attention|sdpa|softmax_warp"),
    ("copies and indexing", r"copy|index|scatter|gather|cat|Copy|fill"),
    ("reductions (norms, top-k)", r"reduce|topk|Reduce|bitonic|mbtopk|gatherTopK"),
    ("elementwise", r"elementwise|vectorized|unrolled"),
]


def kind_of(name: str) -> str:
    return next((k for k, pattern in KINDS if re.search(pattern, name)), "other")


def profile(decoder, args) -> tuple[pd.DataFrame, dict]:
    """One decode step's kernels, and the step's times, warm-up and logits, for one decoder."""
    t = time.perf_counter()
    decoder.time_steps(args.batch, args.kv_len, 1)  # compiles (fast layers) and captures the graph
    warm_s = time.perf_counter() - t
    graph_s = decoder.time_steps(args.batch, args.kv_len, 50)
    logits = decoder.logits[:args.batch].clone()
    decoder.use_graphs = False
    eager_s = decoder.time_steps(args.batch, args.kv_len, 10)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        decoder._decode_forward(args.batch, args.kv_len)
        torch.cuda.synchronize()
    rows = [dict(kernel=e.name, kind=kind_of(e.name), us=e.device_time_total)
            for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return pd.DataFrame(rows), dict(graph_s=graph_s, eager_s=eager_s, warm_s=warm_s, logits=logits,
                                    fast=decoder.fast_reason or "on")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.profile_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--bits", type=int, default=4, choices=(16, 8, 4, 2))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--kv-len", type=int, default=256)
    parser.add_argument("--fast-layers", default="off",
                        help="comma-separated settings of the decoder's fast layers, each profiled: off, on, "
                             "or a mode (compile, compile-reduce, eager); default: off")
    parser.add_argument("--out", help="CSV of the kernels of one step (a `fast_layers` column per setting)")
    args = parser.parse_args(argv)
    settings = [s.strip() for s in args.fast_layers.split(",") if s.strip()]
    try:
        modes = [fl.parse_mode(s) or "off" for s in settings]
    except ValueError as err:
        parser.error(str(err))
    if not modes:
        parser.error("--fast-layers names no setting")
    if not torch.cuda.is_available():
        raise SystemExit("profile_step profiles GPU kernels; this machine has no CUDA GPU")
    loaded = load_model("mixtral-8x7b-shape", layers=args.layers, dtype=torch.bfloat16, device="cuda",
                        seeded_experts=True)
    engine = Engine(loaded.model, quantizer=FAST_QUANTIZER, masters=loaded.masters, variant_cache=False,
                    keep_variants=False)
    total = engine.spec.num_layers * engine.spec.num_experts
    knobs = Knobs() if args.bits == 16 else Knobs(quantized=total, bits=args.bits)
    engine.apply(build_plan(engine.spec, knobs))
    tables, summary, first = [], [], None
    for mode in modes:
        decoder = Decoder(loaded.model, engine, max_seqs=args.batch, max_len=args.kv_len,
                          fast_layers=mode != "off" and mode)
        table, r = profile(decoder, args)
        del decoder
        first = r["logits"] if first is None else first
        by_kind = table.groupby("kind").agg(kernels=("us", "size"), us=("us", "sum")).sort_values("us", ascending=False)
        by_kind["us_per_layer"] = by_kind["us"] / args.layers
        kernel_us = table["us"].sum()
        expert_us = table.loc[table["kind"] == "experts", "us"].sum()
        print(f"fast layers {mode} ({r['fast']}): {args.layers} layers, {args.bits}-bit experts, batch {args.batch}, "
              f"kv {args.kv_len}: graph step {r['graph_s'] * 1e3:.3f} ms, eager step {r['eager_s'] * 1e3:.3f} ms, "
              f"{len(table)} kernels ({len(table) / args.layers:.1f} per layer) taking {kernel_us / 1e3:.3f} ms; "
              f"between kernels in the graph {r['graph_s'] * 1e3 - kernel_us / 1e3:.3f} ms")
        print(by_kind.to_string())
        top = table.groupby("kernel").agg(calls=("us", "size"), us=("us", "sum")).sort_values("us", ascending=False)
        print(top.head(25).to_string())
        summary.append(dict(fast_layers=mode, path=r["fast"], graph_step_ms=r["graph_s"] * 1e3,
                            eager_step_ms=r["eager_s"] * 1e3, warm_up_s=r["warm_s"],
                            kernels_per_layer=len(table) / args.layers,
                            expert_us_per_layer=expert_us / args.layers,
                            other_us_per_layer=(kernel_us - expert_us) / args.layers,
                            max_abs_logit_diff=(r["logits"] - first).abs().max().item()))
        tables.append(table.assign(fast_layers=mode, graph_step_ms=r["graph_s"] * 1e3, eager_step_ms=r["eager_s"] * 1e3))
    if len(modes) > 1:
        print(pd.DataFrame(summary).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.out:
        pd.concat(tables).assign(layers=args.layers, bits=args.bits, batch=args.batch).to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
