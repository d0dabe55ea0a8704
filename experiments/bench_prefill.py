"""Prefill of a burst of prompts with quantized experts: rows per forward and which kernels run them.

A server prefills a burst of prompts packed into forwards (`Decoder.prefill_prompts`). Quantized
accelerator experts run in the fused kernels only up to a number of tokens per layer call; past it
every routed expert is dequantized whole, at every forward. This times the burst's prefill
(`Decoder.generate(prompts, 1)`: the prefill and one sampled token per prompt) side by side, per plan:

- `64-row chunks, kernels`: what the engine did before (the kernels' limit was decode's 64 tokens);
- `one forward, dequantized`: the whole burst in one forward, every expert dequantized whole;
- `N-row chunks, kernels` for N = 128 ... 1024, with the 4-bit experts on the grouped kernels that
  scale each group's product and, as `+ dequantize per group`, on the ones that dequantize per
  group (kernels.DEQ_MIN_TOKENS);
- `engine default`: the decoder's own chunk and kernel choices.

Each row is the last of --reps runs (the first compile and warm up). Prompts are cut from
WikiText-2 (`--data` or $QOS_DATA_DIR), different per sequence; random weights, quantized by
rounding as in bench_decode.

    python -m experiments.bench_prefill --layers 16 --out experiments/results/bench_prefill_h200.csv
    python -m experiments.bench_prefill --model tiny-random --layers 2 --prompts 4 --min-prompt 16 \\
        --max-prompt 48 --reps 1 --out /tmp/p.csv   # no CUDA: the machinery only (no fused kernels on the CPU)
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch

import placement.engine as engine_module
from catalog.knobs import Knobs
from catalog.rows import ModelIdentity
from experiments.bench_decode import FAST_QUANTIZER
from experiments.bench_serve import wikitext_prompts
from placement import kernels
from placement.decode import Decoder
from placement.engine import Engine
from placement.models import load_model
from placement.planner import Planner
from placement.session import Session

CHUNKS = (128, 256, 512, 1024)
NEVER = 1 << 30  # a DEQ_MIN_TOKENS no call reaches


@contextmanager
def limits(quantized_max: int, deq_min: int):
    """The engine's kernel limit for quantized experts and the dequantizing kernels' threshold, for
    the duration (both are read at each call)."""
    saved = engine_module.QUANTIZED_KERNEL_MAX_TOKENS, kernels.DEQ_MIN_TOKENS
    engine_module.QUANTIZED_KERNEL_MAX_TOKENS, kernels.DEQ_MIN_TOKENS = quantized_max, deq_min
    try:
        yield
    finally:
        engine_module.QUANTIZED_KERNEL_MAX_TOKENS, kernels.DEQ_MIN_TOKENS = saved


def variants(burst: int) -> list[tuple[str, int | None, int, int]]:
    """(name, rows per forward or None for the decoder's own, quantized kernel limit, DEQ_MIN_TOKENS)."""
    default = (engine_module.QUANTIZED_KERNEL_MAX_TOKENS, kernels.DEQ_MIN_TOKENS)
    rows = [("64-row chunks, kernels", 64, 64, NEVER), ("one forward, dequantized", burst, 64, NEVER)]
    for n in CHUNKS:
        rows.append((f"{n}-row chunks, kernels", n, n, NEVER))
        rows.append((f"{n}-row chunks, kernels + dequantize per group", n, n, kernels.DEQ_MIN_TOKENS))
    rows.append(("engine default", None, *default))
    return rows


def plans(total: int) -> dict[str, Knobs]:
    return {"4-bit": Knobs(quantized=total, bits=4), "half 4-bit": Knobs(quantized=total // 2, bits=4)}


def setup(model_name: str, layers: int, device_name: str = "auto"):
    """(model, tokenizer, engine, session, device) for a benchmark: the model in bf16 on a GPU (fp32
    on the CPU), an engine with bench_decode's fast quantizer and a session to apply plans through."""
    device = torch.device(device_name if device_name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loaded = load_model(model_name, layers=layers, dtype=dtype, device=device)
    engine = Engine(loaded.model, accel=device, quantizer=FAST_QUANTIZER)
    session = Session(ModelIdentity(model_name, layers, str(dtype).removeprefix("torch.")), loaded, engine,
                      Planner(engine, model_name, lambda: []))
    return loaded.model, loaded.tokenizer, engine, session, device


def bench(args) -> list[dict]:
    model, tok, engine, session, device = setup(args.model, args.layers, args.device)
    ids = [tok.encode(t) for t in wikitext_prompts(tok, args.prompts, args.min_prompt, args.max_prompt, args.data)]
    burst = sum(map(len, ids))
    total = engine.spec.num_layers * engine.spec.num_experts
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.model}, {model.config.num_hidden_layers} layers, {len(ids)} prompts, {burst} tokens, on {gpu}",
          flush=True)
    rows = []
    for plan_name in args.plans:
        session.apply(session.plan(plans(total)[plan_name]))
        decoder = Decoder(model, engine, max_seqs=len(ids), max_len=args.max_prompt + 2)
        default_rows = decoder.quantized_prefill_rows
        for name, chunk, quantized_max, deq_min in variants(burst):
            decoder.quantized_prefill_rows = default_rows if chunk is None else chunk
            with limits(quantized_max, deq_min):
                for _ in range(args.reps):
                    sync()
                    t0 = time.perf_counter()
                    run = decoder.generate(ids, 1, fixed_length=True)
                    sync()
                    seconds = time.perf_counter() - t0
            row = dict(model=args.model, layers=model.config.num_hidden_layers, device=gpu, plan=plan_name,
                       prompts=len(ids), prompt_tokens=burst, variant=name, rows_per_forward=decoder.prefill_chunk,
                       prefill_s=seconds, prefill_tok_s=burst / seconds,
                       ttft_p50_s=sorted(g.ttft_s for g in run.sequences)[len(ids) // 2])
            decoder.quantized_prefill_rows = default_rows
            rows.append(row)
            print(f"  {plan_name:10s} {name:48s} {seconds:7.3f} s  {burst / seconds:9.0f} tok/s", flush=True)
        del decoder
    return rows


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per plan, each variant's time over the 64-row chunks' (what the engine did before)."""
    before = table[table.variant == "64-row chunks, kernels"].set_index("plan").prefill_s
    return table.assign(over_64_row_chunks=table.prefill_s / table.plan.map(before))[
        ["plan", "variant", "rows_per_forward", "prefill_s", "prefill_tok_s", "over_64_row_chunks"]]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_prefill", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mixtral-8x7b-shape")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--data", help="data folder (default: $QOS_DATA_DIR or ../shared/data)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--min-prompt", type=int, default=64)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--reps", type=int, default=3, help="runs per row, the last one kept")
    p.add_argument("--plans", type=lambda s: s.split(","), default=["4-bit", "half 4-bit"],
                   help="comma-separated, of: 4-bit, half 4-bit")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    unknown = [name for name in args.plans if name not in plans(8)]
    if unknown:
        p.error(f"unknown plan(s) {unknown}: choose from {list(plans(8))}")
    if args.reps < 1 or args.prompts < 1:
        p.error("--reps and --prompts must be at least 1")
    if not 1 <= args.min_prompt <= args.max_prompt:
        p.error(f"need 1 <= --min-prompt <= --max-prompt, got {args.min_prompt} and {args.max_prompt}")
    table = pd.DataFrame(bench(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(summarize(table).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
