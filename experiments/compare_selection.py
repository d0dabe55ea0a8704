"""Does `sensitivity` selection beat `random` at equal quantized count? Reads a `qos profile` CSV,
prints, per (quantized, bits), each dataset's perplexity increase over the 16-bit plan under both
selections, and writes the table as CSV next to the profile.

    python -m experiments.compare_selection experiments/results/profile_reference_h100.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

DATASETS = ("wikitext2", "ptb", "c4")


def compare(df: pd.DataFrame) -> pd.DataFrame:
    ppl_cols = [f"ppl_{d}" for d in DATASETS if f"ppl_{d}" in df and df[f"ppl_{d}"].notna().any()]
    base = df[df["quantized"] == 0][ppl_cols].iloc[0]
    # perplexity depends on precisions only: one value per (quantized, bits, selection)
    per = df[df["quantized"] > 0].groupby(["quantized", "bits", "selection"])[ppl_cols].first()
    rows = []
    for (q, bits), g in per.groupby(level=[0, 1]):
        g = g.droplevel([0, 1])
        if not {"random", "sensitivity"} <= set(g.index):
            continue
        row = {"quantized": q, "bits": bits}
        for c in ppl_cols:
            r, s = g.loc["random", c] / base[c] - 1, g.loc["sensitivity", c] / base[c] - 1
            row[f"{c}_random_%"] = round(100 * r, 2)
            row[f"{c}_sensitivity_%"] = round(100 * s, 2)
        incr_r = sum(row[f"{c}_random_%"] for c in ppl_cols) / len(ppl_cols)
        incr_s = sum(row[f"{c}_sensitivity_%"] for c in ppl_cols) / len(ppl_cols)
        row["mean_increase_random_%"], row["mean_increase_sensitivity_%"] = round(incr_r, 2), round(incr_s, 2)
        # at 100% both selections quantize every expert: the same plan
        row["sensitivity_better"] = "same plan" if incr_s == incr_r else incr_s < incr_r
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profile", type=Path)
    args = p.parse_args()
    table = compare(pd.read_csv(args.profile))
    print(table.to_string(index=False))
    out = args.profile.with_name(args.profile.stem + "_selection.csv")
    table.to_csv(out, index=False)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
