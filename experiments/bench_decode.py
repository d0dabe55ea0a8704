"""Batch-1 decode on the GPU, side by side in one process: transformers + accelerate offloading,
transformers with every weight on the GPU, and moe-qos plans (all experts on the GPU at 16 or 4 bits,
mixed, most experts on the host served by `fetch` (with and without speculative prefetch, a knob of
the plan) or `cpu`), on `mixtral-8x7b-shape`.

    python -m experiments.bench_decode --layers 4 --out experiments/results/bench_decode_h100.csv
    python -m experiments.bench_decode --layers 8 --no-accelerate --out experiments/results/bench_decode_h100.csv
    python -m experiments.bench_decode --layers 32 --no-accelerate --out experiments/results/bench_decode_h200.csv

The model's routed experts are never all in host memory: they are regenerated per expert from a
seed on the GPU (`load_model(..., seeded_experts=True)`), and the engine pins only the host-tier
experts of each plan. So the full 32 layers run on a host with 128 GB of RAM (the transformers
all-GPU row gets its experts filled on the GPU, 93 GB on an H200, then dropped). The accelerate
rows need a whole bf16 copy of the model in host memory: leave them out beyond a few layers
(--no-accelerate). Rows of one CSV with two layer counts still give each system's time per layer
and per-token overhead, extrapolated to 32 layers (printed) where 32 were not measured directly.

The weights are random. Quantized variants are rounded to nearest in HQQ's packed format (its
zero-point solver would take about 11 minutes for 256 full-size experts, and accuracy is not
measured here): the same bytes and the same kernels as with HQQ's solver. Variants are not kept
(in memory or on disk: 38 GB at 32 layers); rounding to nearest on the GPU takes seconds.

Host memory per row: `host_peak_gb`, the peak of RssAnon + RssShmem (anonymous plus pinned/shared
memory of the process; file-backed page cache does not count) sampled every 20 ms while the plan
is applied and decoded; `pinned_gb`, the bytes the engine pinned (the plan's host tier), and
`host_gb`, what the plan keeps resident on the host (Plan.host_bytes, with dequantized matrices
for `cpu` offload). The issue's target: host_peak_gb <= 1.1 x (host_gb + 8).

Columns: decode tok/s (128 new tokens after a 64-token prompt, after an untimed warm-up run), GPU
GB held by weights and slots (`gpu_gb`) and peak allocated (`peak_gb`), the fetch cache's hit rate,
prefetch accuracy, bytes fetched per token, the bound (on-GPU time of the same precision with every
expert resident plus fetched bytes over the measured pinned host-to-GPU bandwidth) and the ratio to
accelerate at the same GPU budget.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import random
import threading
import time
import types
from pathlib import Path

import pandas as pd
import torch

from placement import hqq_backend
from placement.engine import Engine
from placement.masters import drop_experts, fill_experts
from placement.models import load_model
from catalog.knobs import Knobs, parse_bytes
from placement.plan import build_plan
from experiments.baselines import timed_generate
from placement.decode import Decoder

GiB = 1 << 30
# Round-to-nearest in HQQ's format (see the module docstring).
FAST_QUANTIZER = types.SimpleNamespace(quantize=functools.partial(hqq_backend.quantize, optimize=False),
                                       dequantize=hqq_backend.dequantize, cache_tag="hqq-rtn")


def host_anon_bytes() -> int:
    """RssAnon + RssShmem of this process: anonymous plus shared (pinned) memory, no page cache."""
    total = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssShmem:")):
                total += int(line.split()[1]) * 1024
    return total


class PeakHostMemory:
    """The peak of host_anon_bytes() within a `with` block, sampled every `every` seconds."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak = every, 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, host_anon_bytes())
            self._stop.wait(self.every)

    def __enter__(self):
        self.peak = host_anon_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, host_anon_bytes())


def moe_qos_plans(total: int) -> list[tuple[str, Knobs, dict]]:
    """(name, knobs, engine options) of the moe-qos rows; `total` experts in the model."""
    quarter, half = total // 4, total // 2
    return [
        ("16-bit, all on GPU", Knobs(), {}),
        ("16-bit, all on GPU, no fused kernels / graphs", Knobs(), {"use_kernels": False}),
        ("4-bit, all on GPU", Knobs(quantized=total, bits=4), {}),
        ("4-bit, all on GPU, HQQ dequantize + matmul", Knobs(quantized=total, bits=4), {"use_kernels": False}),
        ("2-bit, all on GPU", Knobs(quantized=total, bits=2), {}),
        ("half 4-bit half 16-bit, all on GPU", Knobs(quantized=half, bits=4), {}),
        ("16-bit, 1/4 on GPU, fetch", Knobs(gpu_experts=quarter), {}),
        ("16-bit, 1/4 on GPU, fetch, prefetch", Knobs(gpu_experts=quarter, prefetch=True), {}),
        ("16-bit, 1/4 on GPU, cpu", Knobs(gpu_experts=quarter, offload="cpu"), {}),
        ("4-bit, 1/4 on GPU, fetch", Knobs(quantized=total, bits=4, gpu_experts=quarter), {}),
        ("4-bit, 1/4 on GPU, fetch, prefetch", Knobs(quantized=total, bits=4, gpu_experts=quarter, prefetch=True),
         {}),
        ("4-bit, 1/4 on GPU, cpu", Knobs(quantized=total, bits=4, gpu_experts=quarter, offload="cpu"),
         {"new_tokens": 32}),
        ("4-bit on GPU, 16-bit on host, fetch", Knobs(quantized=half, bits=4, gpu_experts=half), {}),
    ]


def bench_layers(layers: int, args) -> list[dict]:
    device = torch.device("cuda")
    loaded = load_model("mixtral-8x7b-shape", layers=layers, dtype=torch.bfloat16, device=device, seeded_experts=True)
    model = loaded.model
    prompt = random.Random(0).choices(range(model.config.vocab_size), k=args.prompt_tokens)
    rows = []

    def row(system: str, tok_s: float, gpu_bytes: int, new_tokens: int, **extra):
        r = {"layers": layers, "system": system, "decode_tok_s": tok_s, "ms_per_token": 1e3 / tok_s,
             "gpu_gb": gpu_bytes / 1e9, "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
             "new_tokens": new_tokens, **extra}
        rows.append(r)
        host = f"  host peak {r['host_peak_gb']:6.2f} GB" if "host_peak_gb" in r else ""
        print(f"  {system:52s} {tok_s:8.2f} tok/s  {r['gpu_gb']:6.2f} GB{host}", flush=True)

    print(f"{layers} layers of mixtral-8x7b-shape, bf16, {args.prompt_tokens}-token prompt", flush=True)
    blocks = [block for _, block in _moe_blocks(model)]
    host_copy = None
    if not args.only or any("transformers" in o for o in args.only) or args.accelerate:
        with PeakHostMemory() as peak:
            fill_experts(blocks, loaded.masters, device)  # the stock model, every weight on the GPU
            torch.cuda.reset_peak_memory_stats()
            g = timed_generate(model, prompt, args.new_tokens, fixed_length=True)
        row("transformers, bf16, all on GPU", g.decode_tok_s, torch.cuda.memory_allocated(), args.new_tokens,
            host_peak_gb=peak.peak / 1e9)
        host_copy = copy.deepcopy(model).to("cpu") if args.accelerate else None
        drop_experts(blocks)
        gc.collect()
        torch.cuda.empty_cache()

    with PeakHostMemory() as peak:
        t = time.perf_counter()
        engine = Engine(model, quantizer=FAST_QUANTIZER, masters=loaded.masters, variant_cache=False,
                        keep_variants=False, host_budget=args.host_budget)
    print(f"  engine built in {time.perf_counter() - t:.1f}s, host peak {peak.peak / 1e9:.2f} GB", flush=True)
    total = engine.spec.num_layers * engine.spec.num_experts
    decoder = Decoder(model, engine, max_seqs=1, max_len=args.prompt_tokens + args.new_tokens + 1)
    gpu_time = {}  # bits -> seconds per token with every expert on the GPU (fused kernels)
    budgets = {}
    for name, knobs, opts in moe_qos_plans(total):
        if args.only and not any(o in name for o in args.only):
            continue
        opts = dict(opts)
        new_tokens = min(opts.pop("new_tokens", args.new_tokens), args.new_tokens)  # (a slow row's cap; the cache
        # is sized for --new-tokens)
        plan = build_plan(engine.spec, knobs)
        with PeakHostMemory() as peak:
            report = engine.apply(plan)
            engine.configure(use_kernels=opts.get("use_kernels", True))
            torch.cuda.reset_peak_memory_stats()
            decoder.generate([prompt], new_tokens, fixed_length=True)  # warm-up: kernel choice, graph capture
            t = time.perf_counter()
            run = decoder.generate([prompt], new_tokens, fixed_length=True)
            wall = time.perf_counter() - t
        g, s = run.sequences[0], run.stats
        steps = new_tokens - 1
        lookups = s["fetch_hits"] + s["fetch_misses"]
        fetched = s["bytes_fetched"] / steps
        mem = engine.memory()
        extra = {"plan_id": plan.plan_id, "quantized": plan.quantized, "bits": knobs.bits if plan.quantized else 16,
                 "gpu_experts": plan.gpu_experts, "offload": plan.offload if plan.host_experts else "",
                 "prefetch": plan.prefetch,
                 "cuda_graph": decoder.reason is None, "why_not_graph": decoder.reason or "",
                 "apply_s": report.seconds, "wall_s": wall,
                 "hit_rate": s["fetch_hits"] / lookups if lookups else None,
                 "prefetch_issued_per_token": s["prefetch_issued"] / steps,
                 "prefetch_accuracy": s["prefetch_hits"] / s["prefetch_issued"] if s["prefetch_issued"] else None,
                 "fetched_gb_per_token": fetched / 1e9,
                 "host_peak_gb": peak.peak / 1e9, "pinned_gb": mem["host_pinned_bytes"] / 1e9,
                 "host_gb": plan.host_bytes(engine.spec) / 1e9, "host_resident_gb": mem["host_bytes"] / 1e9,
                 "host_target_gb": 1.1 * (plan.host_bytes(engine.spec) / 1e9 + 8)}
        bits = extra["bits"]
        if not plan.host_experts and not opts and plan.quantized in (0, total):
            gpu_time[bits] = 1 / g.decode_tok_s
        if plan.host_experts and plan.offload == "fetch" and bits in gpu_time and plan.quantized in (0, total):
            bound_s = gpu_time[bits] + fetched / (args.pcie_gbps * 1e9)
            extra.update(bound_tok_s=1 / bound_s, ratio_to_bound=g.decode_tok_s * bound_s)
        if plan.host_experts:
            budgets[name] = plan.gpu_bytes(engine.spec)
        row(f"moe-qos: {name}", g.decode_tok_s, mem["gpu_bytes"], new_tokens, **extra)
    del engine, decoder, model, loaded
    gc.collect()
    torch.cuda.empty_cache()

    if host_copy is not None:
        accelerate_rows(host_copy, prompt, budgets, args, row)
    return rows


def _moe_blocks(model):
    from placement.adapters import adapter_for

    return adapter_for(model.config).moe_blocks(model)


def accelerate_rows(model, prompt, budgets: dict[str, int], args, row) -> None:
    """transformers + accelerate (`device_map="auto"` with `max_memory`) at the budgets of the
    moe-qos plans that keep experts on the host: what a user would pick today."""
    from accelerate import dispatch_model, infer_auto_device_map

    for name in ("16-bit, 1/4 on GPU, fetch", "4-bit, 1/4 on GPU, fetch"):
        if name not in budgets:
            continue
        budget = budgets[name]
        device_map = infer_auto_device_map(model, max_memory={0: budget, "cpu": 200 * GiB},
                                           no_split_module_classes=model._no_split_modules)
        # a fresh copy each time: dispatching moves offloaded weights out of the module
        dispatched = dispatch_model(copy.deepcopy(model), device_map, main_device=0)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        g = timed_generate(dispatched, prompt, args.accelerate_tokens, warmup_tokens=2, fixed_length=True)
        on_gpu = sum(1 for d in device_map.values() if d == 0)
        row(f"accelerate at the budget of '{name}'", g.decode_tok_s, before, args.accelerate_tokens,
            budget_gb=budget / 1e9, matched=name, modules_on_gpu=f"{on_gpu} of {len(device_map)}")
        del dispatched
        gc.collect()
        torch.cuda.empty_cache()


def summarize(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Ratios to accelerate (same layer count and budget) and the 32-layer extrapolation."""
    table = table.copy()
    for layers, rows in table.groupby("layers"):
        acc = rows[rows["system"].str.startswith("accelerate")]
        for _, a in acc.iterrows():
            mask = (table["layers"] == layers) & table["system"].str.startswith("moe-qos") & \
                (table["gpu_gb"] <= a["budget_gb"] * 1.001) & (table["offload"].fillna("") != "")
            table.loc[mask, "ratio_to_accelerate"] = table.loc[mask, "decode_tok_s"] / a["decode_tok_s"]
    out = []
    for system, rows in table.groupby("system", sort=False):
        if rows["layers"].nunique() < 2:
            continue
        lo, hi = rows.sort_values("layers").iloc[[0, -1]].to_dict(orient="records")
        per_layer = (hi["ms_per_token"] - lo["ms_per_token"]) / (hi["layers"] - lo["layers"])
        fixed = lo["ms_per_token"] - per_layer * lo["layers"]
        out.append({"system": system, "ms_per_layer": per_layer, "ms_fixed": fixed,
                    "tok_s_at_32_layers": 1e3 / (fixed + 32 * per_layer)})
    return table, pd.DataFrame(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--accelerate-tokens", type=int, default=8, help="accelerate takes about a second per token")
    p.add_argument("--no-accelerate", dest="accelerate", action="store_false")
    p.add_argument("--pcie-gbps", type=float, default=54.6, help="measured pinned host-to-GPU bandwidth")
    p.add_argument("--host-budget", type=parse_bytes, help="the engine's host budget, e.g. 100GiB (default: none)")
    p.add_argument("--only", action="append",
                   help="run only the rows whose name contains this (repeatable; 'transformers' for the all-GPU "
                        "baseline): split a 32-layer run over several commands; rows of --out not run now are kept")
    p.add_argument("--out", type=Path, required=True, help="CSV; rows of other layer counts in it are kept")
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("this benchmark needs a CUDA GPU")

    rows = pd.DataFrame(bench_layers(args.layers, args))
    if args.out.exists():  # keep other layer counts (for the extrapolation) and rows not measured now (--only)
        old = pd.read_csv(args.out)
        measured = set(zip(rows["layers"], rows["system"]))
        keep = [(l, sys_) not in measured for l, sys_ in zip(old["layers"], old["system"])]
        rows = pd.concat([old[keep], rows], ignore_index=True)
    rows, extrapolated = summarize(rows)
    rows.to_csv(args.out, index=False)
    cols = ["layers", "system", "decode_tok_s", "gpu_gb", "host_peak_gb", "pinned_gb", "host_gb", "host_target_gb",
            "ratio_to_accelerate", "ratio_to_bound", "hit_rate", "prefetch_accuracy", "fetched_gb_per_token",
            "cuda_graph"]
    with pd.option_context("display.width", 250, "display.max_colwidth", 60):
        print(rows[[c for c in cols if c in rows]].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        if len(extrapolated):
            print("\nper-layer extrapolation to 32 layers:")
            print(extrapolated.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
