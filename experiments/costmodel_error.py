"""How well does the cost model predict measured decode throughput? Calibrates it on this machine
for a model, then for every plan of a profile measures decode tok/s again in the same process (these
machines are noisy: compare side by side) and predicts it; prints the errors, over all plans and
over the profile's Pareto-optimal ones (decode tok/s up; mean perplexity, accelerator bytes down),
and writes a CSV.

    python experiments/costmodel_error.py --model reference --profile experiments/results/profile_reference_cpu.csv
    python experiments/costmodel_error.py --model mixtral-8x7b-shape --layers 2 --profile PROFILE.csv
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from placement.engine import Engine
from placement.models import load_model
from profiler.costmodel import decode_s, calibrate
from profiler.data import calibration_text
from profiler.profile import Planner
from qos.pareto import pareto_mask, with_ppl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="reference")
    p.add_argument("--profile", type=Path, required=True)
    p.add_argument("--layers", type=int, help="decoder layers, as the profile was measured (built-in models)")
    p.add_argument("--out", type=Path, help="default: PROFILE with _costmodel.csv")
    args = p.parse_args()

    profile = pd.read_csv(args.profile)
    front_ids = set(profile.loc[pareto_mask(with_ppl(profile)), "plan_id"].astype(str))
    loaded = load_model(args.model, layers=args.layers)
    engine = Engine(loaded.model)
    calib = loaded.tokenizer.encode(calibration_text())
    prompt = profile["prompt_tokens"].iloc[0]
    new = int(profile["new_tokens"].iloc[0])

    t = time.perf_counter()
    bits = tuple(sorted({16, *profile["bits"].astype(int)}, reverse=True))  # the precisions the plans use
    model = calibrate(engine, calib[:prompt], calib, bits=bits, new_tokens=new)
    print(f"calibrated in {time.perf_counter() - t:.1f}s: {model.as_dict()}")

    rows, planner = [], Planner(engine, args.model, lambda: calib)
    for r in profile.to_dict(orient="records"):
        plan = planner.rebuild(r)
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
