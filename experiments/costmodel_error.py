"""How well does the cost model predict measured decode throughput? Calibrates it on this machine
for a model, then for every plan of a profile measures decode tok/s again in the same process (these
machines are noisy: compare side by side) and predicts it; prints the errors, over all plans and
over the profile's Pareto-optimal ones (decode tok/s up; mean perplexity, accelerator bytes down),
and writes a CSV.

    python -m experiments.costmodel_error --model reference --profile experiments/results/profile_reference_cpu.csv
    python -m experiments.costmodel_error --model mixtral-8x7b-shape --layers 2 --profile PROFILE.csv
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from catalog.knobs import knobs_from_row
from catalog.pareto import pareto_mask
from catalog.rows import ModelIdentity, read_profile, with_ppl
from placement.session import identity_for, open_session
from profiler.costmodel import calibrate, decode_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", type=Path, required=True)
    p.add_argument("--model", help="default: the model the profile was measured on")
    p.add_argument("--layers", type=int, help="with --model: decoder layers, as the profile was measured")
    p.add_argument("--out", type=Path, help="default: PROFILE with _costmodel.csv")
    args = p.parse_args()

    profile = read_profile(args.profile)
    front_ids = set(profile.loc[pareto_mask(with_ppl(profile)), "plan_id"].astype(str))
    identity = identity_for(ModelIdentity.from_row(profile.iloc[0]), model=args.model, layers=args.layers,
                            source=str(args.profile))
    session = open_session(identity)
    engine = session.engine
    calib = session.planner.calib_ids()
    prompt = profile["prompt_tokens"].iloc[0]
    new = int(profile["new_tokens"].iloc[0])

    t = time.perf_counter()
    bits = tuple(sorted({16, *profile["bits"].astype(int)}, reverse=True))  # the precisions the plans use
    model = calibrate(engine, calib[:prompt], calib, bits=bits, new_tokens=new)
    print(f"calibrated in {time.perf_counter() - t:.1f}s: {model.as_dict()}")

    rows = []
    for r in profile.to_dict(orient="records"):
        plan = session.planner.rebuild(knobs_from_row(r), str(r["plan_id"]))
        t = time.perf_counter()
        predicted = model.predict_tok_s(plan)
        predict_us = 1e6 * (time.perf_counter() - t)
        measured = 1 / decode_s(engine, plan, calib[:prompt], new)[0]
        rows.append({"plan_id": plan.plan_id, "quantized": plan.quantized, "bits": r["bits"],
                     "gpu_experts": plan.gpu_experts, "offload": plan.offload, "pareto": plan.plan_id in front_ids,
                     "measured_tok_s": measured,
                     "profile_tok_s": r["decode_tok_s"], "predicted_tok_s": predicted,
                     "error_%": 100 * (predicted / measured - 1), "predict_us": predict_us})
    table = pd.DataFrame(rows)
    print(table.round(2).to_string(index=False))
    for name, rows in (("all plans", table), ("Pareto-optimal plans", table[table["pareto"]])):
        err = rows["error_%"].abs()
        print(f"{name}: |error| median {err.median():.1f}%, 90th percentile {err.quantile(0.9):.1f}%, "
              f"within 15%: {(err <= 15).mean():.0%} of {len(rows)}")
    print(f"prediction: {table['predict_us'].median():.0f} us median")
    out = args.out or args.profile.with_name(args.profile.stem + "_costmodel.csv")
    table.to_csv(out, index=False)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
