"""Time to first token of a fresh process, with a cold and then a warm variant cache: the second
start with the same plan should quantize nothing and reach its first token much sooner.

    python -m experiments.cold_start --layers 8 --out experiments/results/cold_start_h200.csv
    python -m experiments.cold_start --model /path/to/checkpoint --plan 4bit-quarter

Each start is its own process (nothing shared in memory; the operating system's page cache is
shared, as between two real starts): load the model, build the engine, apply the plan (quantizing
with HQQ's solver, or reading the variants back from `$QOS_CACHE_DIR`), decode one token. The first
start gets an empty cache folder, the second the one the first filled. Printed and written per
start: seconds per stage, experts quantized, variants read from disk, peak RssAnon + RssShmem.

HQQ's solver takes about 2.6 s per full-size Mixtral expert on an H200 (11 minutes for 32 layers);
keep a cold start under the 10-minute limit of one command with --layers 8 (64 experts), or run
32 layers in the background.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLANS = {  # name -> knobs (as keyword arguments), fractions of the model's experts
    "4bit-gpu": lambda total: {"quantized": total, "bits": 4},
    "4bit-quarter": lambda total: {"quantized": total, "bits": 4, "gpu_experts": total // 4},
    "mixed": lambda total: {"quantized": total // 2, "bits": 4},
}


def child(args) -> dict:
    """One start, timed by stage (runs in its own process)."""
    import torch

    from catalog.knobs import Knobs
    from experiments.bench_decode import PeakHostMemory
    from placement.engine import Engine
    from placement.models import load_model
    from placement.plan import build_plan

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quantizer = None
    if args.quantizer == "rtn":
        from experiments.bench_decode import FAST_QUANTIZER as quantizer
    times = {}
    with PeakHostMemory() as peak:
        t0 = t = time.perf_counter()
        loaded = load_model(args.model, layers=args.layers, device=device)
        times["load_s"] = time.perf_counter() - t
        t = time.perf_counter()
        engine = Engine(loaded.model, quantizer=quantizer, masters=loaded.masters, fingerprint=loaded.fingerprint)
        total = engine.spec.num_layers * engine.spec.num_experts
        plan = build_plan(engine.spec, Knobs(**PLANS[args.plan](total)))
        report = engine.apply(plan, progress=True)
        times["engine_s"] = time.perf_counter() - t
        t = time.perf_counter()
        with torch.no_grad():
            ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], device=device)
            first = loaded.model(ids).logits[0, -1].argmax().item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times["first_token_s"] = time.perf_counter() - t
        times["to_first_token_s"] = time.perf_counter() - t0
    cache = engine.variant_cache.counts() if engine.variant_cache else {}
    return {"model": args.model, "layers": engine.spec.num_layers, "plan": args.plan, "plan_id": plan.plan_id,
            "quantizer": args.quantizer, **times, "quantized": report.requantized, **cache,
            "first_token": first, "host_peak_gb": peak.peak / 1e9, "device": str(device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mixtral-8x7b-shape", help="a built-in or a local checkpoint folder")
    p.add_argument("--layers", type=int, help="keep only the first N decoder layers")
    p.add_argument("--plan", choices=sorted(PLANS), default="4bit-gpu")
    p.add_argument("--quantizer", choices=["hqq", "rtn"], default="hqq",
                   help="hqq: HQQ's solver (what serving uses); rtn: round to nearest (seconds)")
    p.add_argument("--cache-dir", type=Path, help="the variant cache folder to start cold in (default: a new "
                   "temporary folder, removed afterwards)")
    p.add_argument("--out", type=Path, help="CSV to append the two starts to")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return

    with tempfile.TemporaryDirectory(prefix="qos-cold-") as tmp:
        cache = args.cache_dir or Path(tmp)
        if cache.exists() and any(cache.iterdir()):
            p.error(f"{cache} is not empty: a cold start needs an empty cache folder")
        env = {**os.environ, "QOS_CACHE_DIR": str(cache)}
        cmd = [sys.executable, "-m", "experiments.cold_start", "--child", "--model", args.model, "--plan", args.plan,
               "--quantizer", args.quantizer] + (["--layers", str(args.layers)] if args.layers else [])
        starts = []
        for label in ("cold", "warm"):
            t = time.perf_counter()
            out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True).stdout
            result = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
            result.update(start=label, process_s=time.perf_counter() - t)
            starts.append(result)
            print(json.dumps(result), flush=True)
    cold, warm = starts
    ratio = cold["to_first_token_s"] / warm["to_first_token_s"]
    print(f"first token: cold {cold['to_first_token_s']:.1f}s ({cold['quantized']} experts quantized), "
          f"warm {warm['to_first_token_s']:.1f}s ({warm['quantized']} quantized, "
          f"{warm.get('variants_loaded', 0)} read from disk): {ratio:.1f}x sooner")
    if args.out:
        import pandas as pd

        df = pd.DataFrame(starts).assign(speedup=ratio)
        df.to_csv(args.out, mode="a", header=not args.out.exists(), index=False)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
