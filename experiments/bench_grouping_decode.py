"""The grouping thresholds end to end: decode throughput of `Decoder.generate` at several batch sizes
with the engine's per-precision thresholds (`Engine.grouping`, from bench_grouping) against one
threshold for every precision (default 1.6 tokens per routed expert, the engine's rule before the
per-precision ones), alternated --rounds times in one process, per plan (all experts on the GPU at
4, 2 and 16 bits).

bench_grouping times one layer's kernels; this checks that the choice pays in whole decode steps
(CUDA graphs, attention and the rest included). Each (plan, batch, thresholds) cell re-captures the
decoder's graphs, warms up on 16 tokens, then times --new-tokens steps. Prompts are cut from
WikiText-2 (`--data` or $QOS_DATA_DIR), different per sequence.

    python -m experiments.bench_grouping_decode --layers 16 \\
        --out experiments/results/grouping_decoder_h100.csv

Without CUDA it runs the tiny model (no fused kernels there: the machinery only).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import pandas as pd

from catalog.knobs import Knobs
from experiments.bench_prefill import setup
from experiments.bench_serve import wikitext_prompts
from placement.decode import Decoder

PLANS = ("4-bit", "2-bit", "16-bit")


def plan_knobs(name: str, total: int) -> Knobs:
    return Knobs() if name == "16-bit" else Knobs(quantized=total, bits=int(name.split("-")[0]))


def alternate(args, model, tok, engine, session, variants: dict):
    """Decode side by side: for each plan in args.plans (all experts on the GPU, plan_knobs) and batch
    in args.batches, args.rounds times, each variant in turn (a name and a function that applies it),
    re-capturing the decoder's graphs, warming up on 16 tokens and timing args.new_tokens steps.
    Prompts are cut from WikiText-2, different per sequence. Yields (plan, batch, round, name, run)."""
    ids = [tok.encode(t) for t in wikitext_prompts(tok, max(args.batches), args.min_prompt, args.max_prompt, args.data)]
    total = engine.spec.num_layers * engine.spec.num_experts
    for plan in args.plans:
        session.apply(session.plan(plan_knobs(plan, total)))
        decoder = Decoder(model, engine, max_seqs=max(args.batches), max_len=args.max_prompt + args.new_tokens + 18)
        for batch in args.batches:
            for rnd in range(args.rounds):
                for name, apply in variants.items():
                    apply()
                    decoder.graphs.clear()  # captured with the other variant's kernels
                    decoder.pool = None
                    decoder.generate(ids[:batch], 16, fixed_length=True)  # warm-up: this bucket's graphs
                    run = decoder.generate(ids[:batch], args.new_tokens, fixed_length=True)
                    print(f"  {plan:7s} batch {batch:3d} {name:18s} round {rnd}: {run.decode_tok_s:8.1f} tok/s",
                          flush=True)
                    yield plan, batch, rnd, name, run
        del decoder


def bench(args) -> list[dict]:
    model, tok, engine, session, device = setup(args.model, args.layers, args.device)
    tuned = dict(engine.grouping)
    other = {bits: args.other for bits in tuned}
    print(f"engine thresholds {tuned}, against {args.other} for every precision", flush=True)

    def use(thresholds):
        return lambda: setattr(engine, "grouping", thresholds)

    rows = [dict(model=args.model, layers=args.layers, plan=plan, batch=batch, thresholds=name, round=rnd,
                 tok_s=run.decode_tok_s, step_ms=1000 * statistics.median(run.step_s))
            for plan, batch, rnd, name, run in alternate(args, model, tok, engine, session,
                                                         {"single": use(other), "engine": use(tuned)})]
    engine.grouping = tuned
    return rows


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Median tok/s per (plan, batch) under each set of thresholds, and the engine's over the single one."""
    med = table.groupby(["plan", "batch", "thresholds"]).tok_s.median().unstack()
    return med.assign(engine_over_single=med.engine / med.single)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_grouping_decode",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mixtral-8x7b-shape")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--data", help="data folder (default: $QOS_DATA_DIR or ../shared/data)")
    p.add_argument("--plans", type=lambda s: s.split(","), default=list(PLANS), help="of: " + ", ".join(PLANS))
    p.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8, 12, 16])
    p.add_argument("--other", type=float, default=1.6, help="the single threshold compared (tokens per expert)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--min-prompt", type=int, default=64)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if any(name not in PLANS for name in args.plans):
        p.error(f"unknown plan in {args.plans}: choose from {list(PLANS)}")
    if min(args.batches) < 1 or args.rounds < 1 or args.new_tokens < 2:
        p.error("batches and --rounds must be at least 1, --new-tokens at least 2")
    if not 1 <= args.min_prompt <= args.max_prompt:
        p.error(f"need 1 <= --min-prompt <= --max-prompt, got {args.min_prompt} and {args.max_prompt}")
    table = pd.DataFrame(bench(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(summarize(table).to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
