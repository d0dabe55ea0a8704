"""Serving benchmark: what users get from the server core (runtime.executor, no Ray) against what
the engine can do, side by side in one process, per plan.

For each plan (all experts on the GPU at 16 and 4 bits; 4-bit with 1/4 of the experts on the GPU,
the rest fetched from host memory):
- `engine, back to back`: batch-1 decode steps replayed with no host in the loop
  (`Decoder.time_steps`, what the old bench-only GraphDecoder measured), the yardstick;
- `decoder, batch 1` and `decoder, batch N`: `Decoder.generate`, what `qos generate` and
  `qos profile` run (per-step sampling and bookkeeping included);
- `server, one at a time`: requests sent one after another through the executor;
- `server, N at once`: N requests submitted together (with the serving loop's breakdown: prefill
  forwards and their seconds, decode steps and theirs, the rest host work; `--clients stream`: each
  client a thread streaming its text as `Server.pieces` does);
- `server, Poisson R/s`: a stream of requests at several rates (multiples of the plan's measured
  capacity), prompts cut from WikiText-2, reporting throughput, TTFT and time per output token.
Before the engine takes the model over, stock transformers `generate` runs at batch 1 and at
`--batch` (the same prompts as a static batch, left-padded) as the baseline. Batches take different
prompts: identical ones would all route to the same two experts per layer and flatter batching.

    python -m experiments.bench_serve --layers 16 --out experiments/results/bench_serve_h200.csv
    python -m experiments.bench_serve --model tiny-random --device cpu --layers 4 --max-prompt 128 \
        --new-tokens 32 --plans 0 --no-transformers --threads 1 --out /tmp/b.csv

Memory bound of the decoder rows of all-GPU plans (the ceiling any batching or kernel could reach):
the bytes a decode step must read from accelerator memory (every dense weight, each distinct expert
the step routes to at its precision, counted per step on a second, untimed run of the same batch,
and the KV cache), over the read bandwidth measured at the start of the same run
(experiments/bandwidth.py). Columns `experts_read_per_step`, `hbm_gb_per_step`, `bound_tok_s`,
`ratio_to_bound`; the summary puts the targets' ratios beside what the bound allows.

`throughput_tok_s` of the decoder rows counts decode steps only (prefill excluded), of the server
rows every token over the wall time from submit to the last answer; `e2e_tok_s` is the latter for
both (the decoder's from the start of `generate`, prefill included).

Random weights (mixtral-8x7b-shape); quantized experts are rounded to nearest in HQQ's format, as
in bench_decode.py (the same bytes and kernels as HQQ's solver gives).
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import statistics
import threading
import time
import types
from pathlib import Path

import pandas as pd
import torch

from catalog.data import eval_text
from catalog.knobs import Knobs
from catalog.rows import ModelIdentity
from catalog.stats import percentile
from experiments.baselines import timed_generate
from experiments import bandwidth
from experiments.bench_decode import FAST_QUANTIZER, dense_bytes_per_token, kv_bytes_per_token
from placement.decode import Decoder
from placement.engine import Engine
from placement.models import load_model
from placement.planner import Planner
from placement.session import Session
from runtime.executor import Executor
from runtime.limits import Limits
from runtime.server import Server

TENANT = "bench"


def wikitext_prompts(tokenizer, count: int, lo: int, hi: int, data: str | None, seed: int = 0) -> list[str]:
    """`count` prompts of lo..hi tokens cut from WikiText-2 at random places."""
    text = eval_text("wikitext2", data)
    rng = random.Random(seed)
    prompts = []
    while len(prompts) < count:
        start = rng.randrange(0, len(text) - 8 * hi)
        ids = tokenizer.encode(text[start:start + 8 * hi])[: rng.randint(lo, hi)]
        if len(ids) >= lo:
            prompts.append(tokenizer.decode(ids))
    return prompts


def plans(total: int) -> list[tuple[str, Knobs]]:
    return [
        ("16-bit, all on GPU", Knobs()),
        ("4-bit, all on GPU", Knobs(quantized=total, bits=4)),
        ("4-bit, 1/4 on GPU, fetch", Knobs(quantized=total, bits=4, gpu_experts=total // 4)),
    ]


def serve(executor: Executor, prompts: list[str], arrivals: list[float], new_tokens: int,
          stream: bool = False) -> dict:
    """Submit prompts[i] at arrivals[i] seconds from now; wait for every answer (`stream`: each
    client a thread reading its text piece by piece, as the server's streaming call does); what the
    clients saw."""
    start = time.perf_counter()
    reqs, clients = [], []
    owner = types.SimpleNamespace(session=executor.session)  # what Server.pieces reads

    def read(req):
        for _ in Server.pieces(owner, req):
            pass

    for prompt, at in zip(prompts, arrivals):
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        reqs.append(executor.submit(TENANT, prompt, new_tokens))
        if stream:
            clients.append(threading.Thread(target=read, args=(reqs[-1],), daemon=True))
            clients[-1].start()
    results = [r.result(timeout=3600) for r in reqs]
    for c in clients:
        c.join(60)
    wall = time.perf_counter() - start
    tokens = sum(r["new_tokens"] for r in results)
    return {"requests": len(results), "throughput_tok_s": tokens / wall, "e2e_tok_s": tokens / wall,
            "per_seq_tok_s": statistics.median(r["decode_tok_s"] for r in results if r["decode_tok_s"]),
            "ttft_p50_s": percentile([r["ttft_s"] for r in results], 50),
            "ttft_p95_s": percentile([r["ttft_s"] for r in results], 95),
            "tpot_p50_ms": percentile([r["tpot_ms"] for r in results], 50),
            "tpot_p95_ms": percentile([r["tpot_ms"] for r in results], 95),
            "wall_s": wall}


def loop_delta(before: dict, after: dict) -> dict:
    """The serving loop's breakdown between two Executor.loop_counters() readings."""
    d = {k: after[k] - before[k] for k in after}
    return {"prefill_forwards": d["prefill_forwards"], "prefill_tokens": d["prefill_tokens"],
            "prefill_s": d["prefill_s"], "decode_steps": d["decode_steps"], "decode_s": d["decode_s"],
            "loop_host_s": d["host_s"], "loop_busy_s": d["busy_s"]}


def bench(args) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    loaded = load_model(args.model, layers=args.layers, dtype=getattr(torch, dtype), device=device)
    model, tok = loaded.model, loaded.tokenizer
    texts = wikitext_prompts(tok, max(args.requests, args.batch), args.min_prompt, args.max_prompt, args.data)
    # closed batches take different prompts: identical ones would all route to the same experts
    batch_ids = [tok.encode(t) for t in texts[:args.batch]]
    rows: list[dict] = []
    layers = model.config.num_hidden_layers

    def row(plan: str, system: str, concurrency: int, **values):
        r = {"model": args.model, "layers": layers, "plan": plan, "system": system, "concurrency": concurrency,
             "new_tokens": args.new_tokens, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
             else "cpu", **values}
        rows.append(r)
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
                          if v is not None)
        print(f"  {plan:28s} {system:34s} x{concurrency:<3d} {shown}", flush=True)

    print(f"{args.model}, {layers} layers, {dtype}, {args.new_tokens} new tokens, on {device}", flush=True)
    bw = bandwidth.measure(device, **({} if device.type == "cuda" else {"nbytes": 256 << 20, "repeats": 3}))
    print(bw.describe(), flush=True)
    for b in (1, args.batch) if args.transformers else ():  # stock transformers, before the engine takes over
        g = timed_generate(model, batch_ids[:b], args.new_tokens, fixed_length=True)
        row("16-bit, all on GPU", "transformers generate", b, throughput_tok_s=g.decode_tok_s,
            per_seq_tok_s=g.decode_tok_s / b)
    engine = Engine(model, accel=device, quantizer=FAST_QUANTIZER)
    session = Session(ModelIdentity(args.model, args.layers, dtype), loaded, engine,
                      Planner(engine, args.model, lambda: []))
    total = engine.spec.num_layers * engine.spec.num_experts
    chosen = plans(total)
    for name, knobs in [chosen[i] for i in args.plans] if args.plans else chosen:
        plan = session.plan(knobs)
        session.apply(plan)
        new = args.new_tokens if engine.plan.host_experts == 0 else max(16, args.new_tokens // args.host_divisor)
        decoder = Decoder(model, engine, max_seqs=args.batch, max_len=args.max_prompt + args.new_tokens + 2)
        # the yardstick at batch 1 (free slots in a batch would all route alike: no yardstick there)
        kv = min(decoder.max_len, 1 << math.ceil(math.log2(len(batch_ids[0]) + new)))
        step_s = decoder.time_steps(1, kv, 32 if engine.plan.host_experts else 128)
        row(name, "engine, back to back", 1, throughput_tok_s=1 / step_s, per_seq_tok_s=1 / step_s,
            graphs=decoder.reason or "on")
        for b in (1, args.batch):
            decoder.generate(batch_ids[:b], new, fixed_length=True)  # warm-up (graphs of every bucket)
            run = decoder.generate(batch_ids[:b], new, fixed_length=True)
            bound = step_bytes(decoder, batch_ids[:b], new, bw) if engine.plan.host_experts == 0 else {}
            row(name, f"decoder, batch {'1' if b == 1 else 'N'}", b, throughput_tok_s=run.decode_tok_s,
                per_seq_tok_s=1 / statistics.median(run.step_s),
                tpot_p50_ms=percentile([1000 * s for s in run.step_s], 50),
                tpot_p95_ms=percentile([1000 * s for s in run.step_s], 95),
                ttft_p50_s=percentile([g.ttft_s for g in run.sequences], 50),
                ttft_p95_s=percentile([g.ttft_s for g in run.sequences], 95),
                e2e_tok_s=sum(g.new_tokens for g in run.sequences) / max(g.total_s for g in run.sequences),
                **bound, **({"ratio_to_bound": run.decode_tok_s / bound["bound_tok_s"]} if bound else {}))
        del decoder

        executor = Executor(session, {plan.plan_id: plan}, limits=Limits(
            max_seqs=args.batch, max_batched_tokens=max(args.batch, args.max_batched_tokens),
            max_len=args.max_prompt + new + 2, max_queue=max(256, args.requests)))
        if args.quantized_prefill_rows:
            executor.decoder.quantized_prefill_rows = args.quantized_prefill_rows
        thread = threading.Thread(target=executor.serve_forever, args=(lambda: None,), daemon=True)
        thread.start()
        try:
            serve(executor, texts[:2], [0, 0], new)  # warm-up
            one = [serve(executor, [t], [0], new) for t in texts[:3]]
            row(name, "server, one at a time", 1, throughput_tok_s=statistics.median(o["throughput_tok_s"] for o in one),
                per_seq_tok_s=statistics.median(o["per_seq_tok_s"] for o in one),
                ttft_p50_s=statistics.median(o["ttft_p50_s"] for o in one),
                tpot_p50_ms=statistics.median(o["tpot_p50_ms"] for o in one))
            before = executor.loop_counters()
            burst = serve(executor, texts[:args.batch], [0] * args.batch, new, stream=args.clients == "stream")
            row(name, "server, N at once", args.batch, **burst, **loop_delta(before, executor.loop_counters()))
            capacity = burst["throughput_tok_s"] / new  # requests per second the plan sustains
            n = args.requests if engine.plan.host_experts == 0 else max(args.batch, args.requests // args.host_divisor)
            for frac in args.rates:
                rate = frac * capacity
                rng = random.Random(1)
                arrivals = [0.0, *itertools.accumulate(rng.expovariate(rate) for _ in range(n - 1))]
                stats = serve(executor, texts[:n], arrivals, new)
                row(name, f"server, Poisson {frac:g} x capacity", args.batch, rate_rps=rate, **stats)
        finally:
            executor.stop()
            thread.join(60)
        pd.DataFrame(rows).to_csv(args.out, index=False)  # so far (a long run cut short keeps its rows)
    return rows


def step_bytes(decoder: Decoder, prompts: list[list[int]], new: int, bw) -> dict:
    """What a decode step of these prompts must read from accelerator memory, and the throughput that
    allows at the read bandwidth `bw` measured in this run: the decoder runs the batch again (untimed)
    and the engine's routing counts, cloned on the device after every step, give the distinct experts
    each step reads (each at its precision in the plan); plus every dense weight and the KV cache."""
    engine, model = decoder.engine, decoder.model
    counts = []
    decoder.generate(prompts, new, fixed_length=True, between_steps=lambda: counts.append(engine.routed.clone()))
    steps = [(after - before) > 0 for before, after in zip(counts, counts[1:])]  # [L, E] experts read per step
    if not steps:
        return {}
    nbytes = torch.tensor([[engine.plan.expert_nbytes(engine.spec, state.bits) for state in layer]
                           for layer in engine.plan.states], dtype=torch.float64)
    experts = sum(float((s.cpu() * nbytes).sum()) for s in steps) / len(steps)
    read = sum(int(s.sum()) for s in steps) / len(steps)
    contexts = [len(p) + i for p in prompts for i in range(1, new)]
    kv = kv_bytes_per_token(model.config, contexts, engine.spec.dtype.itemsize) * len(prompts)
    total = dense_bytes_per_token(model) + experts + kv
    return {"experts_read_per_step": read, "hbm_gb_per_step": total / 1e9, "hbm_read_gbps": bw.accel_read_gbps,
            "bound_tok_s": len(prompts) / (total / (bw.accel_read_gbps * 1e9))}


def summarize(df: pd.DataFrame, batch: int) -> pd.DataFrame:
    """The issue's targets as ratios, per plan."""
    out = []
    for plan, rows in df.groupby("plan", sort=False):
        def get(system, conc, col="throughput_tok_s"):
            hit = rows[(rows["system"] == system) & (rows["concurrency"] == conc)]
            return float(hit[col].iloc[0]) if len(hit) and col in hit else float("nan")

        ref1 = get("engine, back to back", 1)
        decoder_n, server_n = get("decoder, batch N", batch), get("server, N at once", batch)
        out.append({
            "plan": plan,
            "engine_b1_tok_s": ref1,
            "decoder_b1_over_engine": get("decoder, batch 1", 1) / ref1,
            "server_b1_over_engine": get("server, one at a time", 1, "per_seq_tok_s") / ref1,
            f"decoder_b{batch}_over_b1": get("decoder, batch N", batch) / get("decoder, batch 1", 1),
            f"server_b{batch}_over_b1": get("server, N at once", batch) / get("server, one at a time", 1),
            f"decoder_b{batch}_over_transformers_b{batch}": get("decoder, batch N", batch)
            / get("transformers generate", batch) if plan.startswith("16-bit, all") else float("nan"),
            # the targets of the burst: server over decoder at batch N (throughput as each row counts it,
            # end to end for both, and time to first token at p50)
            f"server_over_decoder_b{batch}": server_n / decoder_n,
            f"server_over_decoder_b{batch}_e2e": get("server, N at once", batch, "e2e_tok_s")
            / get("decoder, batch N", batch, "e2e_tok_s"),
            f"server_over_decoder_b{batch}_ttft_p50": get("server, N at once", batch, "ttft_p50_s")
            / get("decoder, batch N", batch, "ttft_p50_s"),
            # what the memory bound allows: batch N over batch 1 if both ran at the bound, and the most
            # any system could gain over transformers' batch N (its throughput over the bound)
            f"bound_b{batch}_over_b1": get("decoder, batch N", batch, "bound_tok_s")
            / get("decoder, batch 1", 1, "bound_tok_s"),
            f"bound_b{batch}_over_transformers_b{batch}": get("decoder, batch N", batch, "bound_tok_s")
            / get("transformers generate", batch) if plan.startswith("16-bit, all") else float("nan"),
            "decoder_b1_ratio_to_bound": get("decoder, batch 1", 1, "ratio_to_bound"),
            f"decoder_b{batch}_ratio_to_bound": get("decoder, batch N", batch, "ratio_to_bound"),
        })
    return pd.DataFrame(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mixtral-8x7b-shape")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--data", help="data folder (default: $QOS_DATA_DIR or ../shared/data)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="concurrent sequences (default: %(default)s)")
    p.add_argument("--requests", type=int, default=48, help="requests per Poisson rate")
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 1.0, 2.0],
                   help="arrival rates as multiples of the plan's measured capacity (default: 0.5,1,2)")
    p.add_argument("--min-prompt", type=int, default=64)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--max-batched-tokens", type=int, default=512)
    p.add_argument("--plans", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="which plans, by index: 0 16-bit, 1 4-bit, 2 4-bit with 1/4 on the GPU (default: all)")
    p.add_argument("--no-transformers", dest="transformers", action="store_false",
                   help="skip the stock transformers baseline")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own)")
    p.add_argument("--clients", choices=["wait", "stream"], default="wait",
                   help="burst clients wait for their answers, or stream them in threads (default: %(default)s)")
    p.add_argument("--quantized-prefill-rows", type=int, default=0,
                   help="rows per prefill forward of quantized plans in the server (default: the fused "
                        "kernels' limit; larger ones dequantize experts whole for the forward)")
    p.add_argument("--host-divisor", type=int, default=4,
                   help="host plans are slow: new tokens and requests divided by this (default: %(default)s)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = pd.DataFrame(bench(args))
    rows.to_csv(args.out, index=False)
    summary = summarize(rows, args.batch)
    summary.to_csv(args.out.with_name(args.out.stem + "_summary.csv"), index=False)
    cols = ["plan", "system", "concurrency", "rate_rps", "throughput_tok_s", "e2e_tok_s", "per_seq_tok_s",
            "ttft_p50_s", "ttft_p95_s", "tpot_p50_ms", "tpot_p95_ms", "prefill_forwards", "prefill_s",
            "decode_steps", "decode_s", "loop_host_s", "experts_read_per_step", "hbm_gb_per_step", "bound_tok_s",
            "ratio_to_bound"]
    with pd.option_context("display.width", 250, "display.max_colwidth", 40):
        print(rows[[c for c in cols if c in rows]].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print("\ntargets (ratios):")
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
