"""Sweep the slot kernels' block sizes on this GPU, at the two Mixtral experts of one decode token
(batch 1, top-2: the slots decode runs), and keep the fastest per precision in
placement/kernel_blocks.json under the GPU's name (read by placement.kernels at its first launch on
that GPU: tuned once per GPU model, never at start). With --slots n other than 2 it sweeps calls of n
slots (n experts of one token) and keeps the winner as "bits@n", used for calls of exactly n slots.

    python -m experiments.tune_kernels --out experiments/results/tune_kernels_h200.csv

A coordinate search: gate_up's (rows, K chunk, warps) with down at its current blocks, then down's
with the best gate_up. (Not the launch's pipeline stages: they pipeline only loads that feed a
tl.dot, and these kernels have none, so they compile the same at any.) Every candidate is checked against the
default blocks' output before it is timed (kernels.bench's CUDA-graph timer over copies of the
expert that exceed the L2 cache). Prints each precision's table and the bandwidth of the winner;
writes every timing to --out.
"""

from __future__ import annotations

import argparse
import itertools
import json

import pandas as pd
import torch

from placement import kernels
from placement.packed import expert_layout

# (4 rows: more programs at one slot; a program's threads then need 2,048 columns of groups to fill)
GATE_UP = list(itertools.product((4, 8, 16, 32, 64), (256, 512, 1024, 2048), (4, 8)))
DOWN = list(itertools.product((4, 8, 16, 32), (256, 512, 1024), (4, 8)))
# a candidate replaces the incumbent only if it is this much faster: timings of equal blocks differ by
# about 1%, and a choice won by noise at two slots can be 20% slower at other slot counts (H100,
# 16-bit: 0.6% faster at two slots, 21% slower at four tokens of one expert)
MARGIN = 0.02


def sweep(bits: int, hidden: int, inter: int, group_size: int, iters: int, slots: int = 2,
          dtype=torch.bfloat16) -> list[dict]:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    layout = expert_layout(hidden, inter, bits, dtype, group_size)
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    copies = max(2, -(-2 * l2 // layout.nbytes) + 1)
    buffers = [kernels.random_expert(layout, dev, gen) for _ in range(copies)]  # (alive: the tables hold addresses)
    # the slots of one token (top-2 at decode: two different experts), each call the next experts
    tables = [kernels.expert_table([buffers[(i + s) % copies] for s in range(slots)]) for i in range(copies)]
    x = torch.randn(1, hidden, device=dev, dtype=dtype, generator=gen)
    ones = torch.ones(slots, device=dev)
    token = torch.zeros(slots, dtype=torch.int64, device=dev)
    name = torch.cuda.get_device_name(dev)
    current = kernels.tuned_blocks(name)
    default = current.get((bits, slots), current[bits])  # where the search starts: this GPU's current choice
    blocks = dict(kernels._GPU_BLOCKS)

    # the launch reads _device_blocks(index): point it at the candidate
    original = kernels._device_blocks
    kernels._device_blocks = lambda index: blocks
    try:
        blocks[bits] = default
        reference = kernels.moe_experts(x, tables[0], ones, layout, slot_token=token)
        rows = []

        def timed(cfg, stage):
            blocks[bits] = cfg
            try:
                out = kernels.moe_experts(x, tables[0], ones, layout, slot_token=token)
            except Exception as e:  # a block that does not compile (too many registers, shared memory)
                rows.append(dict(gpu=name, bits=bits, slots=slots, stage=stage, blocks=list(cfg), ms=None,
                                 error=str(e)[:120]))
                return None
            err = ((out - reference).abs().max() / reference.abs().max()).item()
            if err > 1e-3:
                raise AssertionError(f"{bits}-bit blocks {cfg}: output differs from the default's by {err:.2e}")
            it = iter(range(1 << 62))
            out = torch.zeros(1, hidden, dtype=torch.float32, device=dev)
            ms = kernels.gpu_time_ms(lambda: kernels.moe_experts(x, tables[next(it) % copies], ones, layout,
                                                                 slot_token=token, out=out), iters)
            rows.append(dict(gpu=name, bits=bits, slots=slots, stage=stage, blocks=list(cfg), ms=ms,
                             gbps=slots * layout.nbytes / ms / 1e6, error=""))
            return ms

        best = default
        best_ms = timed(default, "default")
        for gu in GATE_UP:
            cfg = gu + best[3:]
            ms = timed(cfg, "gate_up")
            if ms is not None and ms < best_ms * (1 - MARGIN):
                best, best_ms = cfg, ms
        for dn in DOWN:
            cfg = best[:3] + dn
            ms = timed(cfg, "down")
            if ms is not None and ms < best_ms * (1 - MARGIN):
                best, best_ms = cfg, ms
        rows.append(dict(gpu=name, bits=bits, slots=slots, stage="best", blocks=list(best), ms=best_ms,
                         gbps=slots * layout.nbytes / best_ms / 1e6, error=""))
        return rows
    finally:
        kernels._device_blocks = original


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.tune_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", default="4,2,8,16", help="precisions to sweep (default 4,2,8,16)")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--slots", type=int, default=2,
                        help="slots per call (default 2, decode's; others are kept as bits@slots)")
    parser.add_argument("--out", help="CSV of every timing")
    parser.add_argument("--json", default=str(kernels.TUNED_BLOCKS), help="where the winners go (merged)")
    args = parser.parse_args(argv)
    if args.slots < 1:
        parser.error(f"--slots must be at least 1, got {args.slots}")
    if not torch.cuda.is_available():
        raise SystemExit("tune_kernels sweeps the CUDA kernels; this machine has no CUDA GPU")
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        rows += sweep(bits, 4096, 14336, 64, args.iters, args.slots)
        best = rows[-1]
        print(f"{bits:2d}-bit: best {best['blocks']} {best['ms']:.4f} ms {best['gbps']:.0f} GB/s "
              f"(default {next(r['ms'] for r in rows if r['bits'] == bits and r['stage'] == 'default'):.4f} ms)",
              flush=True)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    if args.out:
        table.to_csv(args.out, index=False)
    try:
        tuned = json.loads(open(args.json).read())
    except (OSError, ValueError):
        tuned = {}
    name = torch.cuda.get_device_name()
    entry = tuned.setdefault(name, {})
    for r in rows:
        if r["stage"] == "best":
            entry[str(r["bits"]) if args.slots == 2 else f"{r['bits']}@{args.slots}"] = r["blocks"]
    with open(args.json, "w") as f:
        json.dump(tuned, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {args.json} [{name}]")


if __name__ == "__main__":
    main()
