"""Overlapping a call's expert kernels (kernels.PDL_BITS), side by side in one process: programmatic
dependent launch (each kernel's programs placed while the kernel before it runs, waiting on the
device), for every precision or the quantized ones only, against the kernels launched one after
another. Earlier forms, slower and dropped: an L2 prefetch of the down kernels' weights before their
wait (02e80fd: 10-40% slower, experiments/results/overlap_prefetch_h200.csv) and software pipelining
of the K loops (2e578d9: 10-17% slower at two slots, experiments/results/overlap_loops_h200.csv).

1. Kernels: one Mixtral expert at one slot (`python -m placement.kernels`' row) and the two slots of
   one decode token, through decode's indexed call (the router's top-k index into a table), per
   precision and form. Every call reads its weights from HBM (copies exceeding twice the L2, as
   kernels.bench), every form's output is checked against the first form's.
   With --breakdown, also each quantized call with its gate_up or its down kernel left out: what
   each kernel costs.
2. Decode: `Decoder.generate` tok/s at --batches per plan (all experts on the GPU at 4, 2 and 16
   bits), the forms alternated --rounds times, each re-capturing the decoder's CUDA graphs.

    python -m experiments.bench_overlap --layers 16 --out experiments/results/overlap_h200.csv

Needs CUDA (compute capability 9.0 for the overlap itself; elsewhere every form runs serially).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import pandas as pd
import torch

from placement import kernels
from placement.packed import expert_layout

# kernels.PDL_BITS compared: the precisions whose calls overlap their kernels; "serial" first (the
# reference)
FORMS = {
    "serial": set(),
    "pdl": {16, 8, 4, 2},
    "pdl quantized": {8, 4, 2},
}


def time_kernels(forms: list[str], bits_list: list[int], iters: int, hidden: int = 4096, inter: int = 14336,
                 group_size: int = 64, dtype=torch.bfloat16) -> list[dict]:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    x = torch.randn(1, hidden, device=dev, dtype=dtype, generator=gen)
    rows = []
    for bits in bits_list:
        layout = expert_layout(hidden, inter, bits, dtype, group_size)
        copies = max(3, -(-2 * l2 // layout.nbytes) + 1)
        buffers = [kernels.random_expert(layout, dev, gen) for _ in range(copies)]
        table = kernels.expert_table(buffers)  # [copies]: a layer's table, as decode indexes it
        for slots in (1, 2):
            # call i routes the token to experts i, i + 1, ... (mod copies): never the last call's
            index = [torch.tensor([(i * slots + s) % copies for s in range(slots)], device=dev) for i in range(copies)]
            weights = torch.full((slots,), 0.5, device=dev)
            out = torch.zeros(1, hidden, dtype=torch.float32, device=dev)
            reference = None
            for form in forms:
                kernels.PDL_BITS = FORMS[form]
                got = kernels.moe_experts(x, table, weights, layout, slot_index=index[0], out=out.clone(),
                                          zero_out=True)
                if reference is None:
                    reference = got
                err = ((got - reference).abs().max() / reference.abs().max()).item()
                if err > 1e-5:
                    raise AssertionError(f"{bits}-bit, {slots} slots, {form}: output differs from {forms[0]}'s by {err:.2e}")
                it = iter(range(1 << 62))
                ms = kernels.gpu_time_ms(lambda: kernels.moe_experts(
                    x, table, weights, layout, slot_index=index[next(it) % copies], out=out, zero_out=True), iters)
                rows.append(dict(part="kernels", form=form, bits=bits, slots=slots, ms=ms,
                                 gbps=slots * layout.nbytes / ms / 1e6))
                print(f"  {bits:2d}-bit {slots} slot(s) {form:18s} {1000 * ms:7.1f} us "
                      f"{slots * layout.nbytes / ms / 1e6:6.0f} GB/s", flush=True)
    return rows


class _Skipped:
    """Stands in for a kernel left out of a call: launching it does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def breakdown(bits_list: list[int], iters: int, hidden: int = 4096, inter: int = 14336, group_size: int = 64,
              dtype=torch.bfloat16) -> list[dict]:
    """A quantized call's time with its gate_up or its down kernel left out (the default form): what
    each costs, and the two quantizing kernels alone. One Mixtral expert, one and two slots."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    x = torch.randn(1, hidden, device=dev, dtype=dtype, generator=gen)
    names = {"_gate_up_int_kernel": "gate_up", "_down_int_kernel": "down"}
    saved = {n: getattr(kernels, n) for n in names}
    rows = []
    try:
        for bits in (b for b in bits_list if b != 16):
            layout = expert_layout(hidden, inter, bits, dtype, group_size)
            copies = max(3, -(-2 * l2 // layout.nbytes) + 1)
            buffers = [kernels.random_expert(layout, dev, gen) for _ in range(copies)]  # (alive: the table holds
            table = kernels.expert_table(buffers)  # their addresses)
            for slots in (1, 2):
                index = [torch.tensor([(i * slots + s) % copies for s in range(slots)], device=dev)
                         for i in range(copies)]
                weights = torch.full((slots,), 0.5, device=dev)
                out = torch.zeros(1, hidden, dtype=torch.float32, device=dev)
                for left_out in ((), ("_down_int_kernel",), ("_gate_up_int_kernel",), tuple(names)):
                    for n in names:
                        setattr(kernels, n, _Skipped() if n in left_out else saved[n])
                    it = iter(range(1 << 62))
                    ms = kernels.gpu_time_ms(lambda: kernels.moe_experts(
                        x, table, weights, layout, slot_index=index[next(it) % copies], out=out, zero_out=True),
                        iters)
                    label = "+".join(names[n] for n in left_out) or "nothing"
                    rows.append(dict(part="breakdown", bits=bits, slots=slots, left_out=label, ms=ms))
                    print(f"  {bits:2d}-bit {slots} slot(s) without {label:14s} {1000 * ms:7.1f} us", flush=True)
    finally:
        for n in names:
            setattr(kernels, n, saved[n])
    return rows


def time_decode(args, forms: list[str]) -> list[dict]:
    from experiments.bench_grouping_decode import alternate
    from experiments.bench_prefill import setup

    def use(form):
        return lambda: setattr(kernels, "PDL_BITS", FORMS[form])

    model, tok, engine, session, device = setup(args.model, args.layers, args.device)
    return [dict(part="decode", form=form, plan=plan, batch=batch, round=rnd, tok_s=run.decode_tok_s,
                 ms=1000 * statistics.median(run.step_s))
            for plan, batch, rnd, form, run in alternate(args, model, tok, engine, session,
                                                         {form: use(form) for form in forms})]


def summarize(table: pd.DataFrame) -> list[pd.DataFrame]:
    """The tables printed: kernel µs per (bits, slots) by form; with --breakdown, what gate_up, down and
    the quantizing kernels cost (µs: the call less the call without each); decode median tok/s per
    (plan, batch) by form. Parts without rows are left out."""
    out = []
    k = table[table.part == "kernels"] if "part" in table else table.iloc[:0]
    if len(k):
        out.append(k.pivot_table(index=["bits", "slots"], columns="form", values="ms") * 1000)
    b = table[table.part == "breakdown"] if "part" in table else table.iloc[:0]
    if len(b):
        us = b.pivot_table(index=["bits", "slots"], columns="left_out", values="ms") * 1000
        out.append(pd.DataFrame({"call": us["nothing"], "gate_up": us["nothing"] - us["gate_up"],
                                 "down": us["nothing"] - us["down"], "quantizing": us["gate_up+down"]}))
    d = table[table.part == "decode"] if "part" in table else table.iloc[:0]
    if len(d):
        out.append(d.pivot_table(index=["plan", "batch"], columns="form", values="tok_s", aggfunc="median"))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_overlap", description=__doc__.split("\n\n")[0])
    p.add_argument("--forms", type=lambda s: s.split(","), default=list(FORMS), help="of: " + ", ".join(FORMS))
    p.add_argument("--decode-forms", type=lambda s: s.split(","), default=list(FORMS))
    p.add_argument("--bits", type=lambda s: [int(b) for b in s.split(",")], default=[16, 4, 2])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--breakdown", action="store_true",
                   help="also time quantized calls with gate_up or down left out (what each kernel costs)")
    p.add_argument("--model", default="mixtral-8x7b-shape")
    p.add_argument("--layers", type=int, default=16, help="decoder layers (0: kernels only)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data", help="data folder (default: $QOS_DATA_DIR or ../shared/data)")
    p.add_argument("--plans", type=lambda s: s.split(","), default=["4-bit", "2-bit", "16-bit"])
    p.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--min-prompt", type=int, default=64)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    unknown = [f for f in args.forms + args.decode_forms if f not in FORMS]
    if unknown:
        p.error(f"unknown forms {unknown}: choose from {list(FORMS)}")
    if not torch.cuda.is_available():
        raise SystemExit("bench_overlap times CUDA kernels; this machine has no CUDA GPU")
    index = torch.cuda.current_device()
    print(f"{torch.cuda.get_device_name(index)}: overlap {'possible' if kernels._can_overlap(index) else 'unavailable'}")
    saved = kernels.PDL_BITS
    try:
        rows = time_kernels(args.forms, args.bits, args.iters)
        if args.breakdown:
            rows += breakdown(args.bits, args.iters)
        if args.layers:
            rows += time_decode(args, args.decode_forms)
    finally:
        kernels.PDL_BITS = saved
    table = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    for part in summarize(table):
        print(part.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
