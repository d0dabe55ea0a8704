"""The scheduler's limits and the errors of refused requests: no heavy imports, so the command
line can show the defaults without loading torch."""

from __future__ import annotations

from dataclasses import dataclass


class Rejected(ValueError):
    """A request refused at submit (queue full, too long, bad parameters, stopping)."""


class QueueFull(Rejected):
    """Refused for now: the queue is full (HTTP 429; retry later)."""


class Stopping(Rejected):
    """Refused: the server is stopping (HTTP 503)."""


@dataclass(frozen=True)
class Limits:
    """The scheduler's knobs."""

    max_seqs: int = 16  # sequences decoded at once (decoder slots)
    max_batched_tokens: int = 512  # tokens per step: one per running sequence plus prefill chunks
    max_queue: int = 256  # requests waiting for a slot, all tenants together
    max_len: int = 2048  # positions per sequence: prompt plus new tokens
    max_new_tokens: int = 1024
    # torch's threads while a server whose model is on the CPU serves (0: torch's default). One: on a
    # 2-core CPU the serving thread ran the reference model at 20.3 ms a token with torch's default
    # and at 5.9 ms with one (tiny-random after an in-process profile: 3.8 against 1.6 ms), a
    # thread other than the main one being slow with several (README, "Serving under SLOs")
    cpu_threads: int = 1

    def __post_init__(self):
        for name, low in (("max_seqs", 1), ("max_batched_tokens", 1), ("max_queue", 1), ("max_len", 2),
                          ("max_new_tokens", 1), ("cpu_threads", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name.replace('_', '-')} must be an integer >= {low}, got {v!r}")
        if self.max_batched_tokens < self.max_seqs:
            raise ValueError(f"max-batched-tokens ({self.max_batched_tokens}) must be >= max-seqs "
                             f"({self.max_seqs}): every running sequence takes one token per step")
