"""Where should a layer's experts switch from the slot kernels to the grouped ones? One MoE layer
(8 experts of Mixtral-8x7B's shape, top-2) at each precision, T tokens routed at random, timed
through both paths as `EngineExperts` calls them:

- slots: `moe_experts` over the T*k (token, expert) slots, reading the layer's expert table through
  the flattened top-k index; it zeroes the output and counts the routing in its own kernels;
- grouped: `zeros`, the routing count (`index_add_`), `group_tokens` and `moe_experts_grouped`,
  which reads each routed expert once per block of its tokens.

Each call takes the next of several random routings and the next of two copies of the layer, all
inside one CUDA graph (kernels.gpu_time_ms), so the weights come from HBM as at decode. Both paths'
outputs are compared before timing. Prints a table per precision and the crossover in expected
tokens per routed expert (engine.tokens_per_expert, what the engine decides by), and writes every
timing to --out.

    python -m experiments.bench_grouping --out experiments/results/bench_grouping_h200.csv [--save]

--save merges this GPU's crossovers into placement/grouping_thresholds.json under its name, which
the engine reads at start (engine.grouping_thresholds): measured once per GPU model, never at start.

Without CUDA it runs a small layer in Triton's interpreter (a check of the machinery: the times
are the interpreter's).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from placement import kernels
from placement.engine import TUNED_GROUPING, grouping_thresholds, tokens_per_expert
from placement.packed import expert_layout

TOKENS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32)


def _timer(device: torch.device, iters: int):
    if device.type == "cuda":
        return lambda fn: kernels.gpu_time_ms(fn, iters)

    def cpu_ms(fn):
        fn()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) * 1000 / iters

    return cpu_ms


def bench(bits_list, tokens, hidden: int, inter: int, experts: int = 8, top_k: int = 2, group_size: int = 64,
          routings: int = 8, iters: int = 100, device: str | None = None) -> list[dict]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator(device=dev).manual_seed(0)
    timed = _timer(dev, iters)
    rows = []
    for bits in bits_list:
        layout = expert_layout(hidden, inter, bits, torch.bfloat16, group_size)
        bufs = [[kernels.random_expert(layout, dev, gen) for _ in range(experts)] for _ in range(2)]
        tables = [kernels.expert_table(b) for b in bufs]  # two copies of the layer
        for T in tokens:
            x = torch.randn(T, hidden, device=dev, dtype=torch.bfloat16, generator=gen)
            picks = [torch.rand(T, experts, device=dev, generator=gen).topk(top_k, dim=1) for _ in range(routings)]
            idx = [p.indices.contiguous() for p in picks]  # [T, k] each
            wts = [torch.softmax(p.values, dim=1).contiguous() for p in picks]
            count = torch.zeros(experts, dtype=torch.int64, device=dev)
            out = torch.empty(T, hidden, dtype=torch.float32, device=dev)

            def slots(i):
                r = i % routings
                return kernels.moe_experts(x, tables[i % 2], wts[r].flatten(), layout, slot_index=idx[r].flatten(),
                                           out=out, count=count, zero_out=True)

            def grouped(i):
                r = i % routings
                flat = idx[r].flatten()
                count.index_add_(0, flat, torch.ones_like(flat))
                o = torch.zeros(T, hidden, dtype=torch.float32, device=dev)
                groups = kernels.group_tokens(idx[r], experts)
                return kernels.moe_experts_grouped(x, tables[i % 2], idx[r], wts[r], layout, out=o, groups=groups)

            a, b = slots(0).clone(), grouped(0)
            err = ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()
            ms = {}
            for name, fn in (("slots", slots), ("grouped", grouped)):
                it = iter(range(1 << 62))
                ms[name] = timed(lambda: fn(next(it)))
            rows.append(dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)",
                             bits=bits, tokens=T, tokens_per_expert=round(tokens_per_expert(T, top_k, experts), 3),
                             slots_ms=ms["slots"], grouped_ms=ms["grouped"],
                             grouped_over_slots=ms["grouped"] / ms["slots"], rel_diff=err))
        bufs = tables = None  # (freed before the next precision allocates its layer)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# grouped within this fraction of the slots' time counts as a tie, not a loss (the machines are noisy)
TIE = 0.05


def crossover(rows: list[dict], bits: int) -> float | None:
    """Expected tokens per expert midway between the batch before the first where the grouped kernels
    win and from which they never lose by more than TIE, and that batch (None: no such batch)."""
    mine = sorted((r for r in rows if r["bits"] == bits), key=lambda r: r["tokens"])
    first = None
    for i, r in enumerate(mine):
        if r["grouped_over_slots"] < 1 and all(s["grouped_over_slots"] <= 1 + TIE for s in mine[i:]):
            first = i
            break
    if first is None:
        return None
    if first == 0:
        return mine[0]["tokens_per_expert"]
    return (mine[first - 1]["tokens_per_expert"] + mine[first]["tokens_per_expert"]) / 2


def save_thresholds(path: Path, device_name: str, crossovers: dict[int, float | None]) -> dict:
    """Merge a GPU's crossovers (those found: None is left out, the default stays) into the JSON at
    `path`, by GPU name and precision; returns what the file holds now."""
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        table = {}
    entry = table.setdefault(device_name, {})
    entry.update({str(bits): round(c, 3) for bits, c in sorted(crossovers.items()) if c is not None})
    path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_grouping", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", default="16,8,4,2", help="precisions, comma-separated (default 16,8,4,2)")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="batch sizes (tokens per layer call)")
    parser.add_argument("--hidden", type=int, help="default: 4096 on a GPU, 128 in the interpreter")
    parser.add_argument("--inter", type=int, help="default: 14336 on a GPU, 256 in the interpreter")
    parser.add_argument("--iters", type=int, help="calls timed per row (default 100 on a GPU, 2 on the CPU)")
    parser.add_argument("--out", help="CSV of every timing")
    parser.add_argument("--save", nargs="?", const=str(TUNED_GROUPING), metavar="JSON",
                        help="merge this GPU's crossovers into JSON (default: the engine's, %(const)s)")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    if args.save and not gpu:
        parser.error("--save keeps a GPU's crossovers; without CUDA the kernels run in the interpreter")
    try:
        bits_list = [int(b) for b in args.bits.split(",")]
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        parser.error(f"--bits and --tokens take comma-separated integers, got {args.bits!r} and {args.tokens!r}")
    bad = [b for b in bits_list if b not in kernels.BITS]
    if bad or min(tokens) < 1:
        parser.error(f"--bits must be among {kernels.BITS} and --tokens at least 1 (got {args.bits}, {args.tokens})")
    rows = bench(bits_list, tokens, args.hidden or (4096 if gpu else 128), args.inter or (14336 if gpu else 256),
                 iters=args.iters or (100 if gpu else 2))
    print(f"one layer of 8 experts, top-2, random routing: {rows[0]['device']}")
    print(f"{'bits':>4s} {'tokens':>6s} {'per expert':>10s} {'slots ms':>9s} {'grouped ms':>10s} "
          f"{'grouped/slots':>13s}")
    for r in rows:
        print(f"{r['bits']:4d} {r['tokens']:6d} {r['tokens_per_expert']:10.2f} {r['slots_ms']:9.4f} "
              f"{r['grouped_ms']:10.4f} {r['grouped_over_slots']:13.2f}")
    name = rows[0]["device"]
    engine = grouping_thresholds(name if gpu else None)
    crossovers = {bits: crossover(rows, bits) for bits in bits_list}
    for bits, c in crossovers.items():
        where = "no batch where grouped wins for good" if c is None else f"grouped from {c:.2f} tokens per expert"
        print(f"{bits:2d}-bit: {where} (engine now: {engine[bits]})")
    worst = max(r["rel_diff"] for r in rows)
    print(f"largest difference between the paths' outputs, relative to the largest output: {worst:.1e}")
    if args.out:
        kernels.write_rows(rows, args.out)
    if args.save:
        print(f"{args.save}: {name}: {save_thresholds(Path(args.save), name, crossovers)[name]}")


if __name__ == "__main__":
    main()
