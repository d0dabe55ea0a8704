"""experiments/bench_grouped_deq.py: the engine's two grouped 4-bit forms agree in Triton's
interpreter, as the experiment checks before it times them."""

import torch

from experiments.bench_grouped_deq import compare


def test_the_two_grouped_4bit_forms_agree():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = compare(128, 256, [(1, 1), (3, 5), (2, 17)], 1, device)  # 17 tokens: two token blocks
    tol = 1e-4 if device.type == "cpu" else 2e-2  # (bf16 on a GPU: rounding of the weights)
    assert [(r["experts"], r["tokens"]) for r in rows] == [(1, 1), (3, 5), (2, 17)]
    assert all(r["rel_diff"] < tol for r in rows), rows
