"""Time to first token of a fresh process, with a cold and then a warm variant cache: the second
start with the same plan should quantize nothing and reach its first token much sooner.

    python -m experiments.cold_start --layers 8 --out experiments/results/cold_start_h200_8.csv
    python -m experiments.cold_start --model /path/to/checkpoint --plan 4bit-quarter

Each start is its own process (nothing shared in memory; the operating system's page cache is
shared, as between two real starts): load the model, build the engine, apply the plan (quantizing
with HQQ's solver, or reading the variants back from `$QOS_CACHE_DIR`), decode one token. The first
start gets an empty cache folder, the second the one the first filled. Printed and written per
start: seconds per phase (python: the interpreter and this script's imports; import: torch, hqq,
transformers and the engine; cuda_init: the CUDA context; load: the model's non-expert weights;
engine; apply, with the part of it spent quantizing, writing variant files, and reading and
verifying them (read and verify are summed over the reader threads, which overlap); first_token;
to_first_token: cuda_init to first_token), experts quantized, variants read from disk, peak
RssAnon + RssShmem; then both starts side by side, one phase a line.

Then, untimed, whether the two starts hold the same bytes (a digest of every accelerator expert's
checksum: the run exits 1 if not) and how far apart their logits are, beside how far the same
forward run twice in one start is (on a GPU the kernels' atomic adds sum in a varying order, which
can flip a near tie in some token's routing on random weights: the noise to read the difference
against).

    python -m experiments.cold_start --layers 32 --out experiments/results/cold_start_h200_32.csv
    python -m experiments.cold_start --layers 8 --quantizer hqq-single   # the solver unbatched
    python -m experiments.cold_start --layers 1 --compare 8              # batched vs one at a time

`--compare N` times HQQ's solver on the model's first N experts in one process, one matrix at a
time and batched (quantize_many), the best of `--repeats` runs after a warm-up, and checks that
both give the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
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
    """One start, timed by phase (runs in its own process)."""
    started = float(os.environ.get("QOS_COLD_START_T0", time.time()))
    imported = time.perf_counter()
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
    elif args.quantizer == "hqq-single":  # hqq's solver one matrix at a time (as before quantize_many)
        import types

        from placement import hqq_backend

        quantizer = types.SimpleNamespace(quantize=hqq_backend.quantize, dequantize=hqq_backend.dequantize,
                                          cache_tag="hqq-single")
    # the interpreter's start and this module's imports, then torch's and the engine's
    times = {"python_s": imported - (time.perf_counter() - (time.time() - started)),
             "import_s": time.perf_counter() - imported}
    with PeakHostMemory() as peak:
        t0 = t = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.init()
            torch.empty(1, device=device)  # the CUDA context, which any first use pays
        times["cuda_init_s"] = time.perf_counter() - t
        t = time.perf_counter()
        loaded = load_model(args.model, layers=args.layers, device=device)
        times["load_s"] = time.perf_counter() - t
        t = time.perf_counter()
        engine = Engine(loaded.model, quantizer=quantizer, masters=loaded.masters, fingerprint=loaded.fingerprint)
        times["engine_s"] = time.perf_counter() - t
        total = engine.spec.num_layers * engine.spec.num_experts
        plan = build_plan(engine.spec, Knobs(**PLANS[args.plan](total)))
        t = time.perf_counter()
        report = engine.apply(plan, progress=True)
        times["apply_s"] = time.perf_counter() - t
        store, cache = engine.store, engine.variant_cache
        times["apply_quantize_s"] = store.quantize_s  # masters, the solver, packing
        if cache is not None:  # reads are summed over reader threads: they overlap one another
            times.update(apply_write_s=cache.write_s, apply_read_s=cache.read_s, apply_verify_s=cache.verify_s)
        t = time.perf_counter()
        with torch.no_grad():
            ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], device=device)
            logits = loaded.model(ids).logits[0, -1].float()
            first = logits.argmax().item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times["first_token_s"] = time.perf_counter() - t
        times["to_first_token_s"] = time.perf_counter() - t0
        # untimed checks: the bytes of every expert on the accelerator (a cold and a warm start must
        # agree) and the same forward again (its logits differ from the first only by the order of
        # the kernels' atomic adds: the noise a cold/warm difference is to be read against)
        from placement.variants import checksum

        sums = [f"{eid.layer}.{eid.expert}:{checksum(engine.resident_buffer(eid))}" for eid in sorted(engine.resident)]
        variants_digest = hashlib.sha256("\n".join(sums).encode()).hexdigest()[:16]
        with torch.no_grad():
            again = loaded.model(ids).logits[0, -1].float()
        repeat_diff = float((again - logits).abs().max())
    if args.logits_out:  # the parent compares the two starts' logits
        torch.save(logits.cpu(), args.logits_out)
    counts = {k: v for k, v in (cache.counts() if cache else {}).items() if not k.endswith("_s")}
    return {"model": args.model, "layers": engine.spec.num_layers, "plan": args.plan, "plan_id": plan.plan_id,
            "quantizer": args.quantizer, **times, "quantized": report.requantized, **counts,
            "first_token": first, "host_peak_gb": peak.peak / 1e9, "device": str(device),
            "variants_digest": variants_digest, "resident_experts": len(sums), "logits_repeat_diff": repeat_diff}


def compare_quantizers(args) -> None:
    """HQQ's solver on `--compare N` experts of the model, one matrix at a time and batched: seconds
    each (after a warm-up) and whether the bytes agree."""
    import torch

    from placement import hqq_backend
    from placement.models import load_model
    from placement.plan import ExpertId

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(args.model, layers=args.layers, device=device)
    from placement.engine import Engine

    engine = Engine(loaded.model, masters=loaded.masters, variant_cache=False)
    spec = engine.spec
    eids = [ExpertId(i // spec.num_experts, i % spec.num_experts) for i in range(args.compare)]
    if len(eids) > spec.num_layers * spec.num_experts:
        raise SystemExit(f"--compare {args.compare}: the model has {spec.num_layers * spec.num_experts} experts")
    masters = [engine.store.master(eid) for eid in eids]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def single():
        return [[hqq_backend.quantize(m[name], 4, 64, spec.dtype, device) for m in masters] for name in ("gate_up", "down")]

    def batched():
        return [hqq_backend.quantize_many([m[name] for m in masters], 4, 64, spec.dtype, device)
                for name in ("gate_up", "down")]

    seconds = {"single": float("inf"), "batched": float("inf")}
    for f in (single, batched) * (1 + args.repeats):  # the first of each warms up; the best of the rest
        sync()
        t = time.perf_counter()
        out = f()
        sync()
        if f.__name__ + "_out" in seconds:
            seconds[f.__name__] = min(seconds[f.__name__], time.perf_counter() - t)
        seconds[f.__name__ + "_out"] = out
    pairs = [(a, b) for xs, ys in zip(seconds["single_out"], seconds["batched_out"]) for a, b in zip(xs, ys)]
    same = all(torch.equal(a[k], b[k]) for a, b in pairs for k in a)
    # where they differ: the share of packed bytes that do, and the largest difference of zero points
    # in quantization steps (HQQ's tolerance: a step either way changes a few codes, not the error)
    codes = sum(int((a["W_q"] != b["W_q"]).sum()) for a, b in pairs) / sum(a["W_q"].numel() for a, _ in pairs)
    zero_steps = max(float((a["zero"].float() - b["zero"].float()).abs().max()) for a, b in pairs)
    print(json.dumps({"model": args.model, "experts": len(eids), "device": str(device), "dtype": str(spec.dtype),
                      "single_s": seconds["single"], "batched_s": seconds["batched"],
                      "speedup": seconds["single"] / seconds["batched"], "identical": same,
                      "packed_bytes_differing": codes, "max_zero_difference": zero_steps}))


def logits_difference(cold_path: Path, warm_path: Path) -> dict:
    """How far the warm start's last logits are from the cold start's."""
    import torch

    cold, warm = torch.load(cold_path), torch.load(warm_path)
    return {"logits_max_diff": float((cold - warm).abs().max()), "logits_std": float(cold.std()),
            "same_first_token": bool(cold.argmax() == warm.argmax())}


def breakdown(cold: dict, warm: dict) -> str:
    """The two starts side by side, one phase a line."""
    rows = [k for k in cold if k.endswith("_s") and k != "process_s"] + ["process_s"]
    lines = [f"{'phase':<20}{'cold':>10}{'warm':>10}"]
    for k in rows:
        lines.append(f"{k.removesuffix('_s'):<20}{cold.get(k, 0):>10.2f}{warm.get(k, 0):>10.2f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mixtral-8x7b-shape", help="a built-in or a local checkpoint folder")
    p.add_argument("--layers", type=int, help="keep only the first N decoder layers (e.g. 8, or 32: all of "
                   "Mixtral-8x7B)")
    p.add_argument("--plan", choices=sorted(PLANS), default="4bit-gpu")
    p.add_argument("--quantizer", choices=["hqq", "hqq-single", "rtn"], default="hqq",
                   help="hqq: HQQ's solver on batches of experts (what serving uses); hqq-single: the same "
                        "solver one matrix at a time; rtn: round to nearest (seconds)")
    p.add_argument("--compare", type=int, metavar="N",
                   help="instead of the two starts: time HQQ on the first N experts one matrix at a time and "
                        "batched, in this process, and check that the bytes agree")
    p.add_argument("--repeats", type=int, default=3, help="with --compare: timed runs of each, the best kept")
    p.add_argument("--cache-dir", type=Path, help="the variant cache folder to start cold in (default: a new "
                   "temporary folder, removed afterwards)")
    p.add_argument("--out", type=Path, help="CSV to append the two starts to")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--logits-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.layers is not None and args.layers < 1:
        p.error(f"--layers must be >= 1, got {args.layers}")
    if args.compare is not None:
        if args.compare < 1:
            p.error(f"--compare must be >= 1, got {args.compare}")
        compare_quantizers(args)
        return
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
            env["QOS_COLD_START_T0"] = repr(time.time())
            logits_out = str(Path(tmp) / f"logits-{label}.pt")
            out = subprocess.run(cmd + ["--logits-out", logits_out], env=env, stdout=subprocess.PIPE, text=True,
                                 check=True).stdout
            result = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
            result.update(start=label, process_s=time.perf_counter() - t)
            starts.append(result)
            print(json.dumps(result), flush=True)
        cold, warm = starts
        diff = logits_difference(Path(tmp) / "logits-cold.pt", Path(tmp) / "logits-warm.pt")
    for start in starts:
        start.update(diff)
    print(breakdown(cold, warm))
    ratio = cold["to_first_token_s"] / warm["to_first_token_s"]
    same_bytes = cold["variants_digest"] == warm["variants_digest"]
    print(f"experts on the accelerator: {warm['resident_experts']}, the same bytes in both starts: {same_bytes}; "
          f"logits of the warm start against the cold one: max |difference| {diff['logits_max_diff']:.3g} "
          f"(the same forward twice in one start: {cold['logits_repeat_diff']:.3g} and "
          f"{warm['logits_repeat_diff']:.3g}; logits' std {diff['logits_std']:.3g}); same first token: "
          f"{diff['same_first_token']}")
    print(f"first token: cold {cold['to_first_token_s']:.1f}s ({cold['quantized']} experts quantized), "
          f"warm {warm['to_first_token_s']:.1f}s ({warm['quantized']} quantized, "
          f"{warm.get('variants_loaded', 0)} read from disk): {ratio:.1f}x sooner; from the process's start "
          f"{cold['process_s']:.1f}s against {warm['process_s']:.1f}s: "
          f"{cold['process_s'] / warm['process_s']:.1f}x")
    if args.out:
        import pandas as pd

        df = pd.DataFrame(starts).assign(speedup=ratio)
        df.to_csv(args.out, mode="a", header=not args.out.exists(), index=False)
        print(f"wrote {args.out}")
    if not same_bytes:
        raise SystemExit("the warm start's experts are not the bytes the cold start quantized: the cache is wrong")


if __name__ == "__main__":
    main()
