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
prefetch accuracy, bytes fetched per token, the memory bound and the ratio to accelerate at the
same GPU budget.

The memory bound (a second table, and columns of the CSV): bandwidths are measured at the start of
the same run (experiments/bandwidth.py: a 1 GiB device-to-device copy, reported read+write, and a
read-only sum over it; the bound reads at the higher of the two; copies from a 256 MiB pinned host
buffer; host memory copied and summed the same way), each the best of 10 repetitions. Per row, the
bytes one decoded token moves:
- `hbm_gb_per_token`: read from GPU memory: the weights outside the routed experts (`dense_gb`:
  attention at its precision, norms, routers, the LM head, one row of the input embedding) + the
  routed experts at their packed precision (`expert_gb`: fetched ones are read from their slot
  too) + the KV cache (`kv_gb`, the positions each step attends). The routed experts are the
  engine's own routing counts (`Engine.routed`, counted on the device inside CUDA graphs too) over
  the timed run's decode steps after the first: at batch 1 each routed slot is one distinct expert
  read. The transformers row, which has no engine, counts top_k experts per layer (exact at batch 1);
- `fetched_gb_per_token`: copied host-to-GPU (the engine's `bytes_fetched` over the same steps);
- `host_read_gb_per_token`: read by the host, for `cpu` offload: the 16-bit (dequantized)
  matrices of each routed host expert.
`bound_ms_per_token` = hbm / HBM read bandwidth + fetched / pinned H2D bandwidth + host read / host
read bandwidth (the three in sequence, no overlap assumed), `mem_bound_tok_s` its inverse, and
`ratio_to_mem_bound` = measured tok/s / bound tok/s. Paths that read more than the packed weights
(HQQ dequantize + matmul) are held to the same bound. accelerate rows get none.

Without CUDA (`--model tiny-random`, for tests) the rows run on the CPU without the fused kernels,
the bandwidths are host memory measured the same way (the host-to-GPU copy is a host-to-host copy)
and the accelerate rows are left out.
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
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from placement import hqq_backend
from placement.engine import Engine
from placement.masters import drop_experts, fill_experts
from placement.models import default_dtype, load_model
from catalog.knobs import Knobs, parse_bytes
from placement.plan import build_plan
from experiments.bandwidth import MiB, Bandwidths, measure
from experiments.baselines import timed_generate
from placement.decode import Decoder
from placement.tiers import CPU, serving_path

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


# --- bytes per decoded token and the memory bound ---------------------------------------------------
@dataclass(frozen=True)
class TokenBytes:
    """Bytes one decoded token (batch 1) moves: read from accelerator memory (`dense` weights,
    routed `experts` at their precision, the `kv` cache), copied host-to-accelerator (`fetched`),
    and read by the host (`host`: the matrices of `cpu`-offloaded experts)."""

    dense: float
    experts: float
    kv: float
    fetched: float = 0.0
    host: float = 0.0

    @property
    def accel(self) -> float:
        return self.dense + self.experts + self.kv

    def bound_seconds(self, bw: Bandwidths) -> float:
        """Each kind of bytes at its measured bandwidth, one after another."""
        return (self.accel / (bw.accel_read_gbps * 1e9) + self.fetched / (bw.h2d_gbps * 1e9)
                + self.host / (bw.host_read_gbps * 1e9))

    def columns(self, bw: Bandwidths, tok_s: float) -> dict:
        s = self.bound_seconds(bw)
        return {"dense_gb_per_token": self.dense / 1e9, "expert_gb_per_token": self.experts / 1e9,
                "kv_gb_per_token": self.kv / 1e9, "hbm_gb_per_token": self.accel / 1e9,
                "fetched_gb_per_token": self.fetched / 1e9, "host_read_gb_per_token": self.host / 1e9,
                **bandwidth_columns(bw), "bound_ms_per_token": s * 1e3, "mem_bound_tok_s": 1 / s,
                "ratio_to_mem_bound": tok_s * s}


def bandwidth_columns(bw: Bandwidths) -> dict:
    return {"bw_device": bw.device, "hbm_copy_gbps": bw.accel_copy_gbps, "hbm_sum_gbps": bw.accel_sum_gbps,
            "hbm_read_gbps": bw.accel_read_gbps, "hbm_read_basis": bw.accel_read_basis, "h2d_gbps": bw.h2d_gbps,
            "host_read_gbps": bw.host_read_gbps}


BOUND_COLUMNS = ["dense_gb_per_token", "expert_gb_per_token", "kv_gb_per_token", "hbm_gb_per_token",
                 "fetched_gb_per_token", "host_read_gb_per_token", "bw_device", "hbm_copy_gbps", "hbm_sum_gbps",
                 "hbm_read_gbps", "hbm_read_basis", "h2d_gbps", "host_read_gbps", "bound_ms_per_token",
                 "mem_bound_tok_s", "ratio_to_mem_bound"]


def dense_bytes_per_token(model) -> int:
    """Bytes outside the routed experts that one decoded token reads: every parameter and buffer
    on a device (attention at its precision, quantized projections being buffers, norms, routers,
    shared experts, the LM head, rotary frequencies; routed experts the engine took over are none of
    the model's tensors, meta ones are skipped), except the input embedding, of which it reads one
    row (unless the LM head shares it)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if t.device.type != "meta"}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None or head.weight is not embed:
        total -= embed.numel() * embed.element_size() - embed.shape[1] * embed.element_size()
    return total


def kv_bytes_per_token(config, contexts: list[int], itemsize: int) -> float:
    """Keys and values a decode step reads, averaged over steps attending `contexts` positions each."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_position = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * itemsize
    return per_position * sum(contexts) / len(contexts)


def expert_bytes_per_token(plan, spec, routed: list[list[int]], steps: int) -> tuple[float, float]:
    """(accelerator bytes, host bytes) of routed experts per decode step, where routed[l][e] is how
    many of `steps` batch-1 decode steps routed to expert e of MoE layer l (at batch 1 each routed
    slot is one distinct expert read). An expert served on the accelerator or fetched into a slot
    is read there at its packed precision; a `cpu`-offloaded one is read by the host as its 16-bit
    matrices (quantized ones are kept dequantized)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    matrices = 3 * spec.hidden * spec.intermediate * spec.dtype.itemsize  # gate_up [2I, H] and down [H, I]
    accel = host = 0
    for eid, state in plan.items():
        n = routed[eid.layer][eid.expert]
        if serving_path(state, plan.offload) == CPU:
            host += n * matrices
        else:
            accel += n * plan.expert_nbytes(spec, state.bits)
    return accel / steps, host / steps


class DecodeWindow:
    """A `between_steps` hook for Decoder.generate: what the engine counts over the decode steps
    after the first (the hook first runs after it): routing per expert (`Engine.routed`, counted on
    the device, inside CUDA graphs too) and bytes fetched. Only a clone on the device at the first
    step: nothing that syncs with the host while timed."""

    def __init__(self, engine):
        self.engine, self.steps, self._start = engine, 0, None

    def __call__(self) -> None:
        if self._start is None:
            self._start = (self.engine.routed.clone(), self.engine.stats.bytes_fetched)
        else:
            self.steps += 1

    def routed(self) -> list[list[int]]:
        return (self.engine.routed - self._start[0]).tolist()

    def fetched(self) -> int:
        return self.engine.stats.bytes_fetched - self._start[1]


def plan_token_bytes(plan, engine, model, window: DecodeWindow, prompt_tokens: int) -> TokenBytes:
    """TokenBytes of a plan's timed run, from the window's steps (step i attends prompt + i positions)."""
    if window.steps < 1:
        raise ValueError("the timed run needs at least 3 new tokens (a step to open the window, one in it)")
    steps = window.steps
    experts, host = expert_bytes_per_token(plan, engine.spec, window.routed(), steps)
    contexts = list(range(prompt_tokens + 2, prompt_tokens + 2 + steps))
    return TokenBytes(dense_bytes_per_token(model), experts, kv_bytes_per_token(model.config, contexts,
                      engine.spec.dtype.itemsize), window.fetched() / steps, host)


def moe_qos_plans(total: int) -> list[tuple[str, Knobs, dict]]:
    """(name, knobs, engine options) of the moe-qos rows; `total` experts in the model."""
    quarter, half = total // 4, total // 2
    return [
        ("16-bit, all on GPU", Knobs(), {}),
        ("16-bit, all on GPU, no fused kernels / graphs", Knobs(), {"use_kernels": False}),
        ("4-bit, all on GPU", Knobs(quantized=total, bits=4), {}),
        ("4-bit, all on GPU, HQQ dequantize + matmul", Knobs(quantized=total, bits=4), {"use_kernels": False}),
        ("4-bit, all on GPU, 4-bit attention", Knobs(quantized=total, bits=4, attn_bits=4), {}),
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


def _cuda(fn, default=None):
    """fn() with CUDA, `default` without (the CPU runs of tests)."""
    return fn() if torch.cuda.is_available() else default


def bench_layers(layers: int, args, bw: Bandwidths) -> list[dict]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = default_dtype(device)
    loaded = load_model(args.model, layers=layers, dtype=dtype, device=device, seeded_experts=True)
    model = loaded.model
    prompt = random.Random(0).choices(range(model.config.vocab_size), k=args.prompt_tokens)
    rows = []

    def row(system: str, tok_s: float, gpu_bytes: int, new_tokens: int, **extra):
        r = {"layers": layers, "system": system, "decode_tok_s": tok_s, "ms_per_token": 1e3 / tok_s,
             "gpu_gb": gpu_bytes / 1e9, "peak_gb": _cuda(torch.cuda.max_memory_allocated, 0) / 1e9,
             "new_tokens": new_tokens, **extra}
        rows.append(r)
        host = f"  host peak {r['host_peak_gb']:6.2f} GB" if "host_peak_gb" in r else ""
        bound = f"  {r['ratio_to_mem_bound']:5.2f} of the memory bound" if "ratio_to_mem_bound" in r else ""
        print(f"  {system:52s} {tok_s:8.2f} tok/s  {r['gpu_gb']:6.2f} GB{host}{bound}", flush=True)
        return r

    print(f"{layers} layers of {args.model}, {str(dtype).removeprefix('torch.')}, {args.prompt_tokens}-token prompt",
          flush=True)
    blocks = [block for _, block in _moe_blocks(model)]
    host_copy = None
    baseline = None
    if not args.only or any("transformers" in o for o in args.only) or args.accelerate:
        with PeakHostMemory() as peak:
            fill_experts(blocks, loaded.masters, device)  # the stock model, every weight on the GPU
            _cuda(torch.cuda.reset_peak_memory_stats)
            g = timed_generate(model, prompt, args.new_tokens, fixed_length=True)
        baseline = row("transformers, bf16, all on GPU", g.decode_tok_s, _cuda(torch.cuda.memory_allocated, 0),
                       args.new_tokens, host_peak_gb=peak.peak / 1e9)
        host_copy = copy.deepcopy(model).to("cpu") if args.accelerate else None
        drop_experts(blocks)
        gc.collect()
        _cuda(torch.cuda.empty_cache)

    with PeakHostMemory() as peak:
        t = time.perf_counter()
        engine = Engine(model, quantizer=FAST_QUANTIZER, masters=loaded.masters, variant_cache=False,
                        keep_variants=False, host_budget=args.host_budget)
    print(f"  engine built in {time.perf_counter() - t:.1f}s, host peak {peak.peak / 1e9:.2f} GB", flush=True)
    spec = engine.spec
    total = spec.num_layers * spec.num_experts
    if baseline is not None:  # the stock model reads top_k 16-bit experts per layer at batch 1
        experts = spec.num_layers * spec.top_k * 3 * spec.hidden * spec.intermediate * spec.dtype.itemsize
        contexts = list(range(args.prompt_tokens + 1, args.prompt_tokens + args.new_tokens))
        tb = TokenBytes(dense_bytes_per_token(model), experts,
                        kv_bytes_per_token(model.config, contexts, spec.dtype.itemsize))
        baseline.update(tb.columns(bw, baseline["decode_tok_s"]))
    decoder = Decoder(model, engine, max_seqs=1, max_len=args.prompt_tokens + args.new_tokens + 1)
    budgets = {}
    for name, knobs, opts in moe_qos_plans(total):
        if args.only and not any(o in name for o in args.only):
            continue
        opts = dict(opts)
        new_tokens = min(opts.pop("new_tokens", args.new_tokens), args.new_tokens)  # (a slow row's cap; the cache
        # is sized for --new-tokens)
        plan = build_plan(spec, knobs)
        with PeakHostMemory() as peak:
            report = engine.apply(plan)
            # (without CUDA the kernels would run in Triton's interpreter: off)
            engine.configure(use_kernels=opts.get("use_kernels", cuda))
            _cuda(torch.cuda.reset_peak_memory_stats)
            decoder.generate([prompt], new_tokens, fixed_length=True)  # warm-up: kernel choice, graph capture
            window = DecodeWindow(engine)
            t = time.perf_counter()
            run = decoder.generate([prompt], new_tokens, fixed_length=True, between_steps=window)
            wall = time.perf_counter() - t
        g, s = run.sequences[0], run.stats
        steps = new_tokens - 1
        lookups = s["fetch_hits"] + s["fetch_misses"]
        mem = engine.memory()
        extra = {"plan_id": plan.plan_id, "quantized": plan.quantized, "bits": knobs.bits if plan.quantized else 16,
                 "gpu_experts": plan.gpu_experts, "offload": plan.offload if plan.host_experts else "",
                 "prefetch": plan.prefetch,
                 "cuda_graph": decoder.reason is None, "why_not_graph": decoder.reason or "",
                 "apply_s": report.seconds, "wall_s": wall,
                 "hit_rate": s["fetch_hits"] / lookups if lookups else None,
                 "prefetch_issued_per_token": s["prefetch_issued"] / steps,
                 "prefetch_accuracy": s["prefetch_hits"] / s["prefetch_issued"] if s["prefetch_issued"] else None,
                 "host_peak_gb": peak.peak / 1e9, "pinned_gb": mem["host_pinned_bytes"] / 1e9,
                 "host_gb": plan.host_bytes(spec) / 1e9, "host_resident_gb": mem["host_bytes"] / 1e9,
                 "host_target_gb": 1.1 * (plan.host_bytes(spec) / 1e9 + 8),
                 **plan_token_bytes(plan, engine, model, window, args.prompt_tokens).columns(bw, g.decode_tok_s)}
        if plan.host_experts:
            budgets[name] = plan.gpu_bytes(spec)
        row(f"moe-qos: {name}", g.decode_tok_s, mem["gpu_bytes"], new_tokens, **extra)
    del engine, decoder, model, loaded
    gc.collect()
    _cuda(torch.cuda.empty_cache)

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


def print_bound_table(rows: pd.DataFrame, bw: Bandwidths) -> None:
    """The memory-bound table: bytes per token, the bound at the bandwidths measured in the run, the ratio."""
    print("\n" + bw.describe())
    if "mem_bound_tok_s" not in rows:
        return
    table = rows[rows["mem_bound_tok_s"].notna()]
    cols = ["layers", "system", "decode_tok_s", "dense_gb_per_token", "expert_gb_per_token", "kv_gb_per_token",
            "hbm_gb_per_token", "fetched_gb_per_token", "host_read_gb_per_token", "hbm_read_gbps", "h2d_gbps",
            "host_read_gbps", "bound_ms_per_token", "mem_bound_tok_s", "ratio_to_mem_bound"]
    print("memory bound per decoded token: GB read from GPU memory (dense weights + routed experts at their "
          "precision + KV cache) / hbm_read_gbps + GB fetched / h2d_gbps + GB the host reads (cpu offload) / "
          "host_read_gbps; ratio = measured tok/s / bound tok/s (rows of earlier runs keep their own bandwidths)")
    short = {c: c.removesuffix("_per_token").removesuffix("_gb") for c in cols[3:9]}  # (narrower headers)
    with pd.option_context("display.width", 250, "display.max_colwidth", 60):
        print(table[cols].rename(columns=short).to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mixtral-8x7b-shape", choices=["mixtral-8x7b-shape", "tiny-random"],
                   help="a built-in random Mixtral (tiny-random runs on the CPU, for tests)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--accelerate-tokens", type=int, default=8, help="accelerate takes about a second per token")
    p.add_argument("--no-accelerate", dest="accelerate", action="store_false")
    p.add_argument("--bandwidth-mib", type=int, default=1024,
                   help="size of the buffers the bandwidths are measured with (the pinned host copy: up to 256)")
    p.add_argument("--host-budget", type=parse_bytes, help="the engine's host budget, e.g. 100GiB (default: none)")
    p.add_argument("--only", action="append",
                   help="run only the rows whose name contains this (repeatable; 'transformers' for the all-GPU "
                        "baseline): split a 32-layer run over several commands; rows of --out not run now are kept")
    p.add_argument("--out", type=Path, required=True, help="CSV; rows of other layer counts in it are kept")
    args = p.parse_args(argv)
    if args.new_tokens < 3:
        p.error(f"--new-tokens must be >= 3 (the bound counts the decode steps after the first), got {args.new_tokens}")
    if args.prompt_tokens < 1:
        p.error(f"--prompt-tokens must be >= 1, got {args.prompt_tokens}")
    if not torch.cuda.is_available():
        if args.model == "mixtral-8x7b-shape":
            p.error("mixtral-8x7b-shape needs a CUDA GPU (without one, try --model tiny-random)")
        if args.accelerate:
            print("no CUDA: the accelerate rows are left out", flush=True)
            args.accelerate = False

    try:  # before the model is loaded: the accelerator's memory is free
        bw = measure(nbytes=args.bandwidth_mib * MiB, h2d_bytes=min(args.bandwidth_mib, 256) * MiB)
    except ValueError as e:
        p.error(str(e))
    print(bw.describe(), flush=True)
    rows = pd.DataFrame(bench_layers(args.layers, args, bw))
    if args.out.exists():  # keep other layer counts (for the extrapolation) and rows not measured now (--only)
        old = pd.read_csv(args.out)
        measured = set(zip(rows["layers"], rows["system"]))
        keep = [(l, sys_) not in measured for l, sys_ in zip(old["layers"], old["system"])]
        rows = pd.concat([old[keep], rows], ignore_index=True)
    rows, extrapolated = summarize(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(args.out, index=False)
    cols = ["layers", "system", "decode_tok_s", "gpu_gb", "host_peak_gb", "pinned_gb", "host_gb", "host_target_gb",
            "ratio_to_accelerate", "ratio_to_mem_bound", "hit_rate", "prefetch_accuracy", "fetched_gb_per_token",
            "cuda_graph"]
    with pd.option_context("display.width", 250, "display.max_colwidth", 60):
        print(rows[[c for c in cols if c in rows]].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        if len(extrapolated):
            print("\nper-layer extrapolation to 32 layers:")
            print(extrapolated.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print_bound_table(rows, bw)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
