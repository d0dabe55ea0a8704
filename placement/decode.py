"""Timed generation: time to first token and decode tokens per second on real generation."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
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


class _EveryStep(StoppingCriteria):
    """Never stops generation; calls `fn()` after each step, between two forward passes."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, input_ids, scores, **kwargs):
        self.fn()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclass(frozen=True)
class Generation:
    ids: list[int]  # new tokens of the first sequence
    prompt_tokens: int  # over the batch
    ttft_s: float  # prefill plus the first sampled token
    decode_tok_s: float | None  # tokens after the first (over the batch) per second; None with fewer than 2
    total_s: float

    @property
    def new_tokens(self) -> int:
        return len(self.ids)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.ttft_s


@torch.no_grad()
def timed_generate(model, prompt_ids: list[int], max_new_tokens: int, *, eos_token_id=None,
                   warmup_tokens: int | None = None, after_warmup=None, batch_size: int = 1,
                   fixed_length: bool = False, between_steps=None) -> Generation:
    """Greedy generation of up to `max_new_tokens` after `prompt_ids` (the same prompt `batch_size`
    times), timed token by token; `fixed_length` ignores end-of-sequence for fixed-size runs.

    An untimed generation of `warmup_tokens` (default: as many as the timed one) runs first: first
    calls pick GPU kernels for every new shape (each cache length), which would otherwise be charged
    to the measured run. `after_warmup()` runs between the two (to reset counters, say);
    `between_steps()` runs after every decode step of the timed run (to reconfigure, say).
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty after tokenization")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    input_ids = torch.tensor([prompt_ids] * batch_size, device=device)  # [B, T]
    clock = _Clock(device)
    kwargs = dict(attention_mask=torch.ones_like(input_ids), do_sample=False, eos_token_id=eos_token_id,
                  pad_token_id=eos_token_id if eos_token_id is not None else 0)
    warmup_tokens = max_new_tokens if warmup_tokens is None else warmup_tokens
    if warmup_tokens:  # fixed length: the warm-up's own length, never a minimum above its maximum
        model.generate(input_ids, max_new_tokens=warmup_tokens,
                       **kwargs, **({"min_new_tokens": warmup_tokens} if fixed_length else {}))
    if fixed_length:
        kwargs["min_new_tokens"] = max_new_tokens
    if after_warmup is not None:
        after_warmup()
    if between_steps is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_EveryStep(between_steps)])
    out = model.generate(input_ids, max_new_tokens=max_new_tokens, streamer=clock, **kwargs)
    new = out[0, input_ids.shape[1]:].tolist()
    t = clock.times  # [prompt, token 1, token 2, ...]
    decode = batch_size * (len(t) - 2) / (t[-1] - t[1]) if len(t) > 2 else None
    return Generation(new, len(prompt_ids) * batch_size, t[1] - t[0], decode, t[-1] - t[0])


class GraphDecoder:
    """Greedy batch-1 decode with a static KV cache where each decode step is one CUDA graph replay.

    A decode step of a Hugging Face model launches hundreds of small kernels (about 1.6 ms per
    Mixtral layer on an H100, far above the bytes it reads), so graphs pay where the engine can be
    captured: every expert runs in a fused kernel, no host sync (`engine.capturable`). Otherwise the
    steps run eagerly on the same static cache and `reason` says why. The graph is captured on the
    first call and again when the engine's kernel layout changes (after a reconfiguration).
    """

    def __init__(self, model, engine, max_len: int):
        from transformers import StaticCache

        self.model, self.engine, self.max_len = model, engine, max_len
        self.device = next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.tok = torch.zeros(1, 1, dtype=torch.long, device=self.device)  # the token fed next
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)  # its position
        self.produced = torch.zeros(max_len + 1, dtype=torch.long, device=self.device)  # by position
        self.graph = None
        self.signature = None
        self.capture_s = None
        self.reason = None
        self.decode_stats: dict = {}  # the engine's counters over the decode steps of the last call

    def _step(self):
        logits = self.model(input_ids=self.tok, past_key_values=self.cache, cache_position=self.pos,
                            position_ids=self.pos[None], use_cache=True).logits
        nxt = logits[:, -1].argmax(-1)  # [1]
        self.tok.copy_(nxt[:, None])
        self.pos.add_(1)
        self.produced.index_copy_(0, self.pos, nxt)

    def _capture(self, warm_steps: int) -> int:
        """Warm up on a side stream (real steps: they advance the decode), then capture one step."""
        t = time.perf_counter()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warm_steps):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        self.signature = self.engine.kernel_signature
        self.capture_s = time.perf_counter() - t
        return warm_steps

    def _use_graph(self) -> bool:
        if self.device.type != "cuda":
            self.reason = "no CUDA device"
        elif not self.engine.capturable:
            self.reason = "the plan has experts outside the fused kernels (host experts or 3-bit)"
        else:
            self.reason = None
        return self.reason is None

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> Generation:
        """Decode `max_new_tokens` after the prompt (no early stop), timed like timed_generate."""
        P = len(prompt_ids)
        if not prompt_ids:
            raise ValueError("the prompt is empty after tokenization")
        if P + max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({P}) plus new tokens ({max_new_tokens}) exceed the cache ({self.max_len})")
        sync = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else (lambda: None)
        self.cache.reset()
        sync()
        t0 = time.perf_counter()
        ids = torch.tensor([prompt_ids], device=self.device)
        logits = self.model(input_ids=ids, past_key_values=self.cache, cache_position=torch.arange(P, device=self.device),
                            use_cache=True).logits
        first = logits[:, -1].argmax(-1)
        self.tok.copy_(first[:, None])
        self.pos.fill_(P)
        self.produced[P] = first[0]
        sync()
        t1 = time.perf_counter()
        before = asdict(self.engine.stats)
        steps = max_new_tokens - 1
        if steps and self._use_graph():
            if self.graph is None or self.signature != self.engine.kernel_signature:
                steps -= self._capture(min(2, steps))
            for _ in range(steps):
                self.graph.replay()
        else:
            for _ in range(steps):
                self._step()
        sync()
        t2 = time.perf_counter()
        self.decode_stats = {k: v - before[k] for k, v in asdict(self.engine.stats).items()}
        ids = self.produced[P : P + max_new_tokens].tolist()
        decode = (max_new_tokens - 1) / (t2 - t1) if max_new_tokens > 1 else None
        return Generation(ids, P, t1 - t0, decode, t2 - t0)
