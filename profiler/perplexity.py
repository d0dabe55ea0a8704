"""Perplexity from a model's logits on real text, with the windowing of the GPTQ/HQQ papers."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Perplexity:
    dataset: str
    ppl: float
    tokens: int  # tokens scored
    windows: int
    note: str = ""


def windows_consecutive(ids: list[int], seqlen: int, max_windows: int | None) -> list[list[int]]:
    """Consecutive non-overlapping windows of `seqlen` tokens (a short tail is dropped)."""
    n = len(ids) // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    return [ids[i * seqlen : (i + 1) * seqlen] for i in range(n)]


def windows_random(docs: list[list[int]], seqlen: int, count: int, seed: int = 0) -> list[list[int]]:
    """`count` windows, each from a random document longer than `seqlen`, at a random offset."""
    rng = random.Random(seed)
    long_docs = [d for d in docs if len(d) > seqlen]
    if not long_docs:
        return []
    out = []
    for _ in range(count):
        doc = rng.choice(long_docs)
        start = rng.randint(0, len(doc) - seqlen - 1)
        out.append(doc[start : start + seqlen])
    return out


@torch.no_grad()
def mean_nll(model, windows: list[list[int]], *, batch_size: int = 1, progress=None) -> tuple[float, int]:
    """Mean next-token negative log-likelihood over all windows, and the number of tokens scored."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = torch.tensor(windows[i : i + batch_size], device=device)  # [B, T]
        logits = model(batch).logits.float()  # [B, T, V]
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                              reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
        if progress is not None:
            progress(len(batch))
    return total / count, count


def eval_windows(tokenizer, dataset: str, text, *, seqlen: int, max_windows: int | None = None,
                 c4_windows: int = 256, seed: int = 0) -> tuple[list[list[int]], str]:
    """The token windows a dataset is scored on (tokenized once), and a note when they are fewer
    than the protocol asks for. `text` is what catalog.data.eval_text returned."""
    if dataset == "c4":
        docs = [tokenizer.encode(d) for d in text]
        want = c4_windows if max_windows is None else min(c4_windows, max_windows)
        windows = windows_random(docs, seqlen, want, seed)
        if not windows:
            raise ValueError(f"no C4 document is longer than seqlen={seqlen} tokens")
        note = f"{want} of {c4_windows} random windows (--max-windows)" if want < c4_windows else ""
        return windows, note
    ids = tokenizer.encode(text)
    windows = windows_consecutive(ids, seqlen, max_windows)
    if not windows:
        raise ValueError(f"{dataset} has {len(ids)} tokens, fewer than one window of {seqlen}")
    full = len(ids) // seqlen
    note = f"{len(windows)} of {full} windows (--max-windows)" if len(windows) < full else ""
    return windows, note


def perplexity(model, dataset: str, windows: list[list[int]], *, note: str = "", batch_size: int = 1,
               progress=None) -> Perplexity:
    nll, tokens = mean_nll(model, windows, batch_size=batch_size, progress=progress)
    return Perplexity(dataset, math.exp(nll), tokens, len(windows), note)
