"""Evaluate the bundled reference MoE (placement/reference/) and write the model card's tables.

Tables (printed and written as markdown + JSON next to the checkpoint):
  1. perplexity on WikiText-2 test, PTB test and C4 validation, with the stored weights (fp32
     compute) and with ALL experts quantized by HQQ to 8/4/3/2 bits (group size 64; attention,
     router, norms and embeddings untouched), served by the placement engine under `qos profile`'s
     perplexity protocol;
  2. expert usage on PTB test: share of the routed top-2 slots each expert receives, per layer;
  3. the tokenizer's unigram baseline on PTB test versus the model.

Usage (CPU; about 6.5 minutes for the full tables on 2 cores, --max-windows 8 for a quick look):
    python -m experiments.reference_card --data ../shared/data
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
BITS = (16, 8, 4, 3, 2)
DATASETS = {"WikiText-2": "wikitext2", "PTB": "ptb", "C4": "c4"}  # card name -> profiler name


def unigram_perplexity(train: torch.Tensor, targets: torch.Tensor, vocab: int) -> float:
    """Add-one smoothed unigram model fit on the training tokens, scored on targets."""
    counts = torch.bincount(train, minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[targets.flatten()].mean().item())


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def ppl_table(ppl: dict) -> str:
    lines = ["| experts | " + " | ".join(DATASETS) + " |", "|---|" + "---:|" * len(DATASETS)]
    for bits in ppl:
        cells = []
        for name in DATASETS:
            base, value = ppl[16][name], ppl[bits][name]
            rel = "" if bits == 16 else f" ({100 * (value / base - 1):+.1f}%)"
            cells.append(f"{value:.2f}{rel}")
        label = "16-bit (stored bf16, fp32 compute)" if bits == 16 else f"HQQ {bits}-bit, g64"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def usage_table(usage: np.ndarray) -> str:
    n_exp = usage.shape[1]
    lines = [
        "| layer | " + " | ".join(f"E{e}" for e in range(n_exp)) + " | min |",
        "|---|" + "---:|" * (n_exp + 1),
    ]
    for layer, row in enumerate(usage):
        lines.append(f"| {layer} | " + " | ".join(f"{100 * v:.1f}" for v in row) + f" | {100 * row.min():.1f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(args) -> None:
    from placement.engine import Engine
    from placement.models import load_model
    from catalog.knobs import Knobs
    from placement.plan import build_plan
    from catalog.data import data_dir, eval_text
    from profiler.perplexity import eval_windows, mean_nll

    from experiments.train_reference_moe import encode_stream, load_training_text

    t0 = time.time()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = data_dir(args.data)
    model_dir = Path(args.model)
    loaded = load_model(str(model_dir), dtype=torch.float32, device=device)
    model, tokenizer = loaded.model, loaded.tokenizer
    seqlen = model.config.max_position_embeddings
    n_params = sum(p.numel() for p in model.parameters())
    engine = Engine(model, accel=device)  # every expert on the accelerator; plans set precisions
    spec = engine.spec
    total = spec.num_layers * spec.num_experts

    # The profiler's protocol (profiler/perplexity.py), so `qos profile` reproduces these numbers.
    windows, notes = {}, {}
    for name, key in DATASETS.items():
        windows[name], notes[name] = eval_windows(tokenizer, key, eval_text(key, data), seqlen=seqlen,
                                                  max_windows=args.max_windows or None,
                                                  c4_windows=args.c4_windows, seed=args.seed)
    counts = {k: len(v) for k, v in windows.items()}
    print(f"{model_dir}: {n_params / 1e6:.2f}M parameters ({total} experts), seqlen {seqlen}; "
          f"windows {counts}", flush=True)

    ppl = {}
    for bits in args.bits:
        knobs = Knobs() if bits == 16 else Knobs(quantized=total, bits=bits)
        report = engine.apply(build_plan(spec, knobs))
        ppl[bits] = {name: math.exp(mean_nll(model, w, batch_size=args.batch)[0]) for name, w in windows.items()}
        print(f"{bits:2d} bits ({report.requantized} experts quantized): "
              + "  ".join(f"{k} {v:.2f}" for k, v in ppl[bits].items()) + f"   [{time.time() - t0:.0f}s]", flush=True)

    engine.apply(build_plan(spec, Knobs()))
    engine.reset_stats()
    mean_nll(model, windows["PTB"], batch_size=args.batch)  # the engine counts routed slots
    usage = np.array(engine.router_frequencies())
    ptb_train, c4_docs, _ = load_training_text(data)
    train = encode_stream(tokenizer.tok, ptb_train, c4_docs)  # the stream the model was trained on
    ptb_targets = torch.tensor(windows["PTB"])[:, 1:]
    uni = unigram_perplexity(train, ptb_targets, len(tokenizer.tok))
    model_ptb = ppl[16]["PTB"] if 16 in ppl else math.exp(mean_nll(model, windows["PTB"], batch_size=args.batch)[0])

    note = (
        f"Windows of {seqlen} tokens (the model context), as `qos profile` cuts them: WikiText-2 test "
        f"{counts['WikiText-2']} and PTB test {counts['PTB']} (rows joined with blank lines, consecutive, "
        f"non-overlapping), C4 validation {counts['C4']} (seed {args.seed}, random windows of documents "
        f"longer than {seqlen} tokens)."
    )
    capped = "; ".join(f"{k}: {v}" for k, v in notes.items() if v)
    if capped:
        note += f" Capped: {capped}."
    md = "\n\n".join([
        "### Perplexity (relative increase vs 16-bit in parentheses)",
        note,
        ppl_table(ppl),
        "### Expert usage on PTB test (% of routed top-2 slots)",
        usage_table(usage),
        f"Minimum over all layers and experts: {100 * usage.min():.1f}% (uniform would be "
        f"{100 / usage.shape[1]:.1f}%).",
        "### Unigram baseline on PTB test (same tokens)",
        "| model | PTB test perplexity per token |\n|---|---:|\n"
        f"| unigram, add-one, fit on the {train.numel():,} training tokens | {uni:.1f} |\n"
        f"| reference MoE (16-bit) | {model_ptb:.2f} |",
    ])
    print("\n" + md + "\n", flush=True)
    if not args.no_write:
        out = Path(args.out or model_dir)
        (out / "card_tables.md").write_text(md + "\n")
        results = {
            "model": model_dir.name, "seqlen": seqlen, "windows": counts,
            "perplexity": {str(b): v for b, v in ppl.items()},
            "expert_usage_ptb": usage.tolist(), "min_expert_usage": float(usage.min()),
            "unigram_ptb_ppl": uni, "model_ptb_ppl": model_ptb, "max_windows": args.max_windows,
        }
        (out / "card_tables.json").write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {out / 'card_tables.md'} and card_tables.json", flush=True)
    print(f"done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO_ROOT / "placement" / "reference"))
    p.add_argument("--data", help="data folder (default: $QOS_DATA_DIR or ../shared/data)")
    p.add_argument("--bits", type=int, nargs="+", default=list(BITS))
    p.add_argument("--max-windows", type=int, default=0, help="cap windows per dataset (0 = all)")
    p.add_argument("--c4-windows", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--out", help="folder for card_tables.md/.json (default: the model folder)")
    p.add_argument("--no-write", action="store_true", help="only print the tables")
    main(p.parse_args())
