"""Does the NSGA-II search find a better front than the paper's one-dimensional sweep, for the same
number of measured plans? Measures both in one process (these machines are noisy), computes the
hypervolume each dominates (decode tok/s up, mean perplexity down, accelerator bytes down; one
reference point for both), prints a table and writes every measured row to a CSV.

    python -m experiments.compare_search --model reference --trials 24 --max-windows 8 \\
        --out experiments/results/search_vs_sweep_cpu.csv
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd

from catalog.knobs import Knobs
from catalog.pareto import front, hypervolume
from catalog.rows import ModelIdentity, with_ppl
from placement.session import open_session
from profiler.profile import Profiler, Settings
from profiler.search import Search


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="reference")
    p.add_argument("--trials", type=int, default=24, help="plans measured by each side")
    p.add_argument("--gpu-budget", type=int, help="accelerator bytes (a constraint of both)")
    p.add_argument("--max-windows", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    session = open_session(ModelIdentity(args.model, model_seed=args.seed))
    profiler = Profiler(session, Settings(max_windows=args.max_windows, new_tokens=32, repeats=3))
    work = Path(tempfile.mkdtemp(prefix="qos-compare-"))

    # the paper: random selection, quantized count stepping over the range, accelerator filled
    sweep = Search(profiler, work / "sweep.csv", gpu_budget=args.gpu_budget)
    for params in sweep.sweep(args.trials - 1):
        sweep.measure(Knobs(**{k: v for k, v in params.items()}, seed=args.seed))
    swept = pd.DataFrame(list(sweep.rows.values())).assign(side="sweep")

    # the search: a coarser sweep enqueued first, then NSGA-II, the same number of trials
    search = Search(profiler, work / "search.csv", gpu_budget=args.gpu_budget, selection_seed=args.seed)
    study = search.run(args.trials, seed=args.seed, sweep_steps=max(2, args.trials // 4), progress=False)
    found = search.write_front(study).assign(side="search")

    both = with_ppl(pd.concat([swept, found], ignore_index=True))
    if args.gpu_budget is not None:
        both = both[both["gpu_bytes"] <= args.gpu_budget]
    reference = (0.0, both["ppl"].max() * 1.05, both["gpu_bytes"].max() * 1.05)
    table = []
    for side, rows in both.groupby("side"):
        table.append({"side": side, "plans_measured": len(rows), "front_size": len(front(rows)),
                      "hypervolume": hypervolume(rows, reference),
                      "best_tok_s": rows["decode_tok_s"].max(), "best_ppl": rows["ppl"].min(),
                      "least_gpu_bytes": rows["gpu_bytes"].min()})
    table = pd.DataFrame(table).set_index("side")
    print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    ratio = table.loc["search", "hypervolume"] / table.loc["sweep", "hypervolume"]
    print(f"\nsearch / sweep hypervolume: {ratio:.3f} (reference: 0 tok/s, ppl {reference[1]:.2f}, "
          f"{reference[2]:.0f} bytes)")
    both.to_csv(args.out, index=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
