"""The controller: reads the world each tick, decides the plan to serve, and keeps that desired
state apart from what the executor actually serves (the executor reconciles toward it).

A tick re-reads the SLO file when it changes (a bad file is rejected and recorded; the old SLOs
stay), reads free accelerator memory and the executor's state (plan held, active tenants), and asks
the pure policy (catalog.policy.choose) which measured plan to serve. Each step of a tick fails on
its own: the loop that calls tick() never dies.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from catalog.feedback import Feedback
from catalog.policy import Decision, Option, choose
from catalog.rows import Measured
from catalog.slo import SLOError, SLOSpec, load_slos

log = logging.getLogger(__name__)
KEPT = 50  # rejections kept for status (the total is counted)
MAX_ERROR = 500  # characters of an error kept


@dataclass(frozen=True)
class World:
    """What the executor tells the controller each tick."""

    plan_id: str | None  # the plan it serves now
    held_bytes: int  # accelerator bytes it holds
    active: frozenset[str]  # tenants with queued or running requests
    # the load: sequences each active tenant has running or waiting, and the decoder's slots
    load: tuple[tuple[str, int], ...] = ()
    max_seqs: int = 1
    # measured since the last tick under plan_id: decode steps (batch, seconds), and the median
    # time to first token of requests answered lately
    steps: tuple[tuple[int, float], ...] = ()
    ttft_p50_s: float | None = None

    def occupancy(self, without: frozenset[str] = frozenset()) -> int:
        """Sequences a decode step will carry: those running or waiting, up to the slots."""
        return max(1, min(self.max_seqs, sum(n for t, n in self.load if t not in without)))


@dataclass(frozen=True)
class Desired:
    """The goal state: the plan to serve, tenants whose new requests wait (admission control), why."""

    plan_id: str
    reason: str
    at: float
    hold: frozenset[str] = frozenset()


class Controller:
    def __init__(self, front: list[Measured], slos: str | Path | SLOSpec, *, hysteresis: float = 0.05,
                 switch_bytes: Callable[[str], int] = lambda plan_id: 0, closed_loop: bool = True,
                 host_budget: int | None = None):
        """closed_loop: predict plans' latency at the current load and correct the predictions with
        what is measured (catalog.feedback), and hold back low-priority tenants' new requests when
        that lets a higher priority meet its SLO; otherwise decide from the profile alone.
        host_budget: plans whose host_bytes exceed it are never chosen."""
        if not front:
            raise ValueError("the front has no measured plans")
        self.rejections: deque[dict] = deque(maxlen=KEPT)  # the latest; rejected_total counts them all
        self.rejected_total = 0
        self.use_slos(slos)
        self.options = [Option(m.plan_id, m.decode_tok_s, m.ppl, m.gpu_bytes, m.ttft_s, m.tpot_ms, m.host_bytes)
                        for m in front]
        self.host_budget = host_budget
        # the quality reference: the best 16-bit plan's perplexity (any plan's, if none is 16-bit)
        quality = [m.ppl for m in front if m.knobs.quantized == 0] or [min(m.ppl for m in front)]
        self.base_ppl = min(quality)
        self.hysteresis = hysteresis
        self.switch_bytes = switch_bytes  # plan_id -> bytes a switch to it would move
        self.closed_loop = closed_loop
        self.feedback = Feedback(front)
        self.evidence: str | None = None  # the latest measurement that corrected a prediction
        self.desired: Desired | None = None
        self.last_decision: Decision | None = None
        self.budget_bytes: int | None = None  # at the last tick: what its decision was made on
        self.ticks = 0

    def use_slos(self, slos: str | Path | SLOSpec) -> None:
        """Serve these SLOs from now on: a file's (re-read whenever it changes) or given ones (a Serve
        config's user_config). A bad file is recorded as a rejection and raised; the SLOs stay."""
        if isinstance(slos, SLOSpec):
            self.slo_path, self.slo_mtime, self.slos = None, None, slos
            return
        path = Path(slos)
        try:
            spec, mtime = load_slos(path), path.stat().st_mtime
        except Exception as err:
            if hasattr(self, "slos"):  # a running controller records what it refused
                self._reject(str(err))
            raise
        self.slo_path, self.slo_mtime, self.slos = path, mtime, spec

    def reject(self, error: str) -> None:
        """Record SLOs refused elsewhere (a bad user_config): status shows them with the file's."""
        self._reject(error)
        log.warning("rejected SLOs: %s", error[:MAX_ERROR])

    def reload_slos(self) -> None:
        """Re-read the SLO file if it changed; a bad or missing file never replaces good SLOs."""
        if self.slo_path is None:  # given SLOs: nothing to watch
            return
        try:
            mtime = self.slo_path.stat().st_mtime
        except OSError as err:
            if self.slo_mtime is not None:  # recorded once, when it goes missing
                self.slo_mtime = None
                self._reject(f"cannot read SLO file {self.slo_path}: {err.strerror}; keeping the last good SLOs")
            return
        if mtime == self.slo_mtime:
            return
        self.slo_mtime = mtime
        try:
            self.slos = load_slos(self.slo_path)
            log.info("reloaded SLOs from %s", self.slo_path)
        except Exception as err:  # SLOError, or anything else a strange file provokes: the old SLOs stay
            self._reject(str(err) if isinstance(err, SLOError) else f"{self.slo_path}: {type(err).__name__}: {err}")
            log.warning("rejected SLO file: %s", self.rejections[-1]["error"])

    def _reject(self, error: str) -> None:
        self.rejections.append({"at": time.time(), "error": error[:MAX_ERROR]})
        self.rejected_total += 1

    def budget(self, free_bytes: int, held_bytes: int) -> int:
        """What a plan may take: free memory less the reserve, plus what the server holds now."""
        return free_bytes - self.slos.reserve_bytes + held_bytes

    def tick(self, world: World, free_bytes: int) -> Decision:
        """One control step: decide from the world as read now; a changed decision becomes the
        desired state."""
        self.reload_slos()
        self.budget_bytes = self.budget(free_bytes, world.held_bytes)
        # tenants the SLO file no longer names keep being served, with no SLO to meet
        named = {t.name for t in self.slos.tenants}
        active = frozenset(t for t in world.active if t in named)
        now = time.time()
        hold: frozenset[str] = frozenset()
        if not self.closed_loop:
            decision = self._choose(self.options, active, world.plan_id)
        else:
            if world.plan_id is not None:
                self.evidence = self.feedback.observe(world.plan_id, list(world.steps), world.ttft_p50_s, now) \
                    or self.evidence
            decision = self._choose(self.feedback.options_at(self.options, world.occupancy(), now), active,
                                    world.plan_id)
            if not decision.all_met:
                decision, hold = self._admission(decision, world, active, now)
            if self.evidence and (decision.switch or hold):
                decision = replace(decision, reason=f"{decision.reason}; measured: {self.evidence}")
        self.last_decision = decision
        self.ticks += 1
        if self.desired is None or decision.plan_id != self.desired.plan_id or hold != self.desired.hold:
            self.desired = Desired(decision.plan_id, decision.reason, now, hold)
        return decision

    def _choose(self, options: list[Option], active: frozenset[str], current: str | None) -> Decision:
        return choose(options, self.slos, active, self.budget_bytes, current, base_ppl=self.base_ppl,
                      switch_bytes=self.switch_bytes, hysteresis=self.hysteresis, host_budget=self.host_budget)

    def _admission(self, decision: Decision, world: World, active: frozenset[str],
                   now: float) -> tuple[Decision, frozenset[str]]:
        """When no plan meets every active SLO at this load: hold back new requests of the lowest
        priorities, one priority level at a time, while that lets more of the higher priorities
        meet theirs (their running requests finish; waiting ones are admitted when the hold ends)."""
        tenants = sorted((self.slos.tenant(n) for n in active), key=lambda t: t.priority)
        levels = sorted({t.priority for t in tenants})
        best, hold = decision, frozenset()
        for level in levels[:-1]:  # never hold the highest priority
            held = frozenset(t.name for t in tenants if t.priority <= level)
            kept = active - held
            trial = self._choose(self.feedback.options_at(self.options, world.occupancy(without=held), now), kept,
                                 world.plan_id)
            if sum(s.met for s in trial.tenants) > sum(s.met for s in best.tenants if s.tenant in kept):
                best, hold = trial, held
                if trial.all_met:
                    break
        if hold:
            best = replace(best, reason=f"admission control: new requests of {', '.join(sorted(hold))} wait so "
                                        f"{', '.join(sorted(s.tenant for s in best.tenants if s.met))} meet their "
                                        f"SLOs; {best.reason}")
        return best, hold
