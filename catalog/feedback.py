"""Closing the loop: each plan's latency predicted at the current load from the profile's batched
measurements, then corrected with what the server measures while it serves the plan.

A profile times decoding at batch 1 and, with `--batch-sizes`, at larger batches (per-sequence speed
and p95 time per output token at N running). `Curve` interpolates those points to the occupancy
the server has now (running plus waiting sequences, up to its slot count). The server measures each
decode step (its batch and its time) and each request's time to first token; `Feedback` keeps, per
plan, the ratio of measured to predicted time per token at the same batch size, smoothed, and
decays it back to 1 when the plan is no longer measured (the profile's word counts again); a plan
never measured is assumed as far off as the least corrected plan measured. Time to
first token under load is mostly waiting (for a slot, for other prompts' prefill), which any plan
would pay: its measured-over-profiled ratio is one factor for every plan, not a mark against the
plan that happened to be served. `options_at` hands the
policy those corrected predictions, and names the measurement behind each correction.

Pure: no tensors, no Ray; the controller feeds it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

from catalog.policy import Option
from catalog.rows import Measured

ALPHA = 0.4  # weight of a tick's measurement in the smoothed ratio
HALF_LIFE_S = 60.0  # a correction not refreshed for this long counts half
MIN_STEPS = 5  # decode steps of one batch size a tick needs before it says anything


@dataclass(frozen=True)
class Curve:
    """A plan's time per output token (ms, p50 and p95) against the number of sequences decoded."""

    points: tuple[tuple[int, float, float | None], ...]  # (batch, p50, p95), by batch

    @classmethod
    def of(cls, m: Measured) -> Curve:
        return cls(m.curve)

    def at(self, batch: float) -> tuple[float | None, float | None]:
        """Interpolated between the measured batch sizes; beyond the largest, the last segment's slope
        (flat with one point). p95 is scaled from p50 where a point lacks it."""
        if not self.points:
            return None, None
        pts = self.points
        if batch <= pts[0][0] or len(pts) == 1:
            lo = hi = pts[0] if batch <= pts[0][0] else pts[-1]
        else:
            i = next((i for i in range(1, len(pts)) if pts[i][0] >= batch), len(pts) - 1)
            lo, hi = pts[i - 1], pts[i]
        if lo is hi:
            return lo[1], lo[2]
        w = (batch - lo[0]) / (hi[0] - lo[0])
        p50 = lo[1] + w * (hi[1] - lo[1])
        ratios = [p[2] / p[1] for p in (lo, hi) if p[2] is not None]
        p95 = p50 * (sum(ratios) / len(ratios)) if ratios else None
        return p50, p95


@dataclass
class Correction:
    factor: float = 1.0  # measured / predicted
    at: float = 0.0  # when last measured
    evidence: str = ""  # the measurement, in words
    measured: bool = False  # factor comes from decode steps (not the default)

    def decayed(self, now: float) -> float:
        return 1 + (self.factor - 1) * 0.5 ** (max(now - self.at, 0.0) / HALF_LIFE_S)


class Feedback:
    def __init__(self, front: Iterable[Measured]):
        self.rows = {m.plan_id: m for m in front}
        self.curves = {pid: Curve.of(m) for pid, m in self.rows.items()}
        self.corrections: dict[str, Correction] = {}  # per plan: time per output token
        self.ttft = Correction()  # every plan: time to first token

    def observe(self, plan_id: str, steps: list[tuple[int, float]], ttft_p50_s: float | None, now: float) -> str | None:
        """A tick's measurements of the plan served: its decode steps (batch, seconds) and the median
        time to first token of requests it answered lately. The evidence, or None if too little."""
        if plan_id not in self.curves:
            return None
        by_batch: dict[int, list[float]] = {}
        for batch, seconds in steps:
            by_batch.setdefault(batch, []).append(seconds)
        ratios, said = [], []
        for batch, times in sorted(by_batch.items()):
            predicted, _ = self.curves[plan_id].at(batch)
            if len(times) < MIN_STEPS or not predicted:
                continue
            measured = 1000 * sorted(times)[len(times) // 2]
            ratios.append((len(times), measured / predicted))
            said.append(f"{measured:.1f} ms per step at batch {batch} vs {predicted:.1f} profiled")
        c = self.corrections.setdefault(plan_id, Correction())
        tpot, ttft = c.decayed(now), self.ttft.decayed(now)
        if ratios:
            ratio = math.exp(sum(n * math.log(r) for n, r in ratios) / sum(n for n, _ in ratios))
            c.factor, c.at, c.measured = (1 - ALPHA) * tpot + ALPHA * ratio, now, True
        profiled = self.rows[plan_id].ttft_s[0]
        if ttft_p50_s is not None and profiled:
            self.ttft.factor, self.ttft.at = (1 - ALPHA) * ttft + ALPHA * ttft_p50_s / profiled, now
            said.append(f"TTFT p50 {ttft_p50_s:.3g} s vs {profiled:.3g} profiled")
        if not said:
            return None
        c.evidence = (f"plan {plan_id}: " + "; ".join(said) +
                      f" (x{c.decayed(now):.2f} its time per token, x{self.ttft.decayed(now):.2f} every plan's TTFT)")
        return c.evidence

    def factors(self, plan_id: str, now: float) -> tuple[float, float]:
        """(time per output token, time to first token) multipliers for the plan now. A plan never
        measured is taken to be as far from its profile as the least corrected plan measured: a
        machine slower than when it was profiled (a co-tenant of the CPU or GPU) slows every plan,
        and blaming it on the plan served alone would send the controller to plans no faster."""
        c = self.corrections.get(plan_id)
        if c is None or not c.measured:
            measured = [k.decayed(now) for k in self.corrections.values() if k.measured]
            return (min(measured) if measured else 1.0), self.ttft.decayed(now)
        return c.decayed(now), self.ttft.decayed(now)

    def option(self, base: Option, batch: float, now: float) -> Option:
        """`base` as predicted at `batch` sequences, corrected by what was measured."""
        p50, p95 = self.curves[base.plan_id].at(batch) if base.plan_id in self.curves else base.tpot_ms
        if p50 is None:
            return base
        k_tpot, k_ttft = self.factors(base.plan_id, now)
        ttft = tuple(None if t is None else t * k_ttft for t in base.ttft_s)
        return replace(base, decode_tok_s=1000 / (p50 * k_tpot), ttft_s=ttft,
                       tpot_ms=(p50 * k_tpot, None if p95 is None else p95 * k_tpot))

    def options_at(self, options: list[Option], batch: float, now: float) -> list[Option]:
        return [self.option(o, batch, now) for o in options]

    def evidence(self, plan_id: str) -> str | None:
        c = self.corrections.get(plan_id)
        return c.evidence if c is not None and c.evidence else None
