"""What the server delivers, measured online: per tenant and per plan, over a sliding window of the
last requests, time to first token, time per output token and decode speed as percentiles, and the
tokens delivered per second. No torch, no Ray: plain numbers from finished requests."""

from __future__ import annotations

import time
from collections import deque

from catalog.stats import percentile

WINDOW_S = 60.0  # seconds of requests a summary covers
MAX_SAMPLES = 1000  # requests kept per key, whatever the window


class Window:
    """Finished requests of the last `seconds` (at most `size` of them): (finished at, ttft s,
    tpot ms, decode tok/s, new tokens)."""

    def __init__(self, seconds: float = WINDOW_S, size: int = MAX_SAMPLES):
        self.seconds = seconds
        self.samples: deque[tuple] = deque(maxlen=size)

    def add(self, result: dict, at: float | None = None) -> None:
        self.samples.append((time.time() if at is None else at, result.get("ttft_s"), result.get("tpot_ms"),
                             result.get("decode_tok_s"), result.get("new_tokens") or 0))

    def copy(self) -> Window:
        """The same samples in a new window (so a summary can be computed without the owner's lock)."""
        other = Window(self.seconds, self.samples.maxlen)
        other.samples.extend(self.samples)
        return other

    def summary(self, now: float | None = None, seconds: float | None = None) -> dict:
        """Percentiles of the requests finished in the last `seconds` (default: the window's)."""
        now = time.time() if now is None else now
        seconds = self.seconds if seconds is None else seconds
        recent = [s for s in self.samples if now - s[0] <= seconds]
        if not recent:
            return {"requests": 0}

        def pct(i: int) -> dict:
            values = [s[i] for s in recent]
            return {"p50": percentile(values, 50), "p95": percentile(values, 95)}

        span = max(now - min(s[0] for s in recent), 1e-9)
        return {"requests": len(recent), "ttft_s": pct(1), "tpot_ms": pct(2), "decode_tok_s": pct(3),
                # tokens of the requests finished in the window over the time they span (up to the window)
                "delivered_tok_s": sum(s[4] for s in recent) / min(seconds, max(span, 1.0))}
