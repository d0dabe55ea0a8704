"""Baselines the benchmarks compare the decoder with: stock transformers `generate`, timed token
by token (also used on models dispatched by accelerate). moe-qos itself decodes through
placement.decode.Decoder; this is only the yardstick."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers.generation.streamers import BaseStreamer


class _Clock(BaseStreamer):
    """Records when `generate` hands out the prompt and each new token (after a device sync)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def put(self, value):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())

    def end(self):
        pass


@dataclass(frozen=True)
class Timed:
    ids: list[int]  # new tokens of the first sequence
    prompt_tokens: int  # over the batch
    ttft_s: float  # prefill plus the first sampled token
    decode_tok_s: float | None  # tokens after the first (over the batch) per second; None with fewer than 2
    total_s: float

    @property
    def new_tokens(self) -> int:
        return len(self.ids)


@torch.no_grad()
def timed_generate(model, prompt_ids: list[int], max_new_tokens: int, *, eos_token_id=None,
                   warmup_tokens: int | None = None, after_warmup=None, batch_size: int = 1,
                   fixed_length: bool = False) -> Timed:
    """Greedy generation of up to `max_new_tokens` after `prompt_ids` (the same prompt `batch_size`
    times, or a list of prompts: a static batch, left-padded), timed token by token; `fixed_length` ignores end-of-sequence for fixed-size runs.

    An untimed generation of `warmup_tokens` (default: as many as the timed one) runs first: first
    calls pick GPU kernels for every new shape (each cache length), which would otherwise be charged
    to the measured run. `after_warmup()` runs between the two (to reset counters, say).
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty after tokenization")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = prompt_ids if isinstance(prompt_ids[0], list) else [prompt_ids] * batch_size
    batch_size, width = len(prompts), max(map(len, prompts))
    # a static batch: shorter prompts left-padded, masked out
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)  # [B, T]
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    clock = _Clock(device)
    kwargs = dict(attention_mask=mask, do_sample=False, eos_token_id=eos_token_id,
                  pad_token_id=eos_token_id if eos_token_id is not None else 0)
    warmup_tokens = max_new_tokens if warmup_tokens is None else warmup_tokens
    if warmup_tokens:  # fixed length: the warm-up's own length, never a minimum above its maximum
        model.generate(input_ids, max_new_tokens=warmup_tokens,
                       **kwargs, **({"min_new_tokens": warmup_tokens} if fixed_length else {}))
    if fixed_length:
        kwargs["min_new_tokens"] = max_new_tokens
    if after_warmup is not None:
        after_warmup()
    out = model.generate(input_ids, max_new_tokens=max_new_tokens, streamer=clock, **kwargs)
    new = out[0, width:].tolist()
    t = clock.times  # [prompt, token 1, token 2, ...]
    decode = batch_size * (len(t) - 2) / (t[-1] - t[1]) if len(t) > 2 else None
    return Timed(new, sum(map(len, prompts)), t[1] - t[0], decode, t[-1] - t[0])
