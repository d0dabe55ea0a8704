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
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class Desired:
    """The goal state: the plan to serve and why."""

    plan_id: str
    reason: str
    at: float


class Controller:
    def __init__(self, front: list[Measured], slos: str | Path | SLOSpec, *, hysteresis: float = 0.05,
                 switch_bytes: Callable[[str], int] = lambda plan_id: 0):
        if not front:
            raise ValueError("the front has no measured plans")
        self.rejections: deque[dict] = deque(maxlen=KEPT)  # the latest; rejected_total counts them all
        self.rejected_total = 0
        self.use_slos(slos)
        self.options = [Option(m.plan_id, m.decode_tok_s, m.ppl, m.gpu_bytes, m.ttft_s, m.tpot_ms) for m in front]
        # the quality reference: the best 16-bit plan's perplexity (any plan's, if none is 16-bit)
        quality = [m.ppl for m in front if m.knobs.quantized == 0] or [min(m.ppl for m in front)]
        self.base_ppl = min(quality)
        self.hysteresis = hysteresis
        self.switch_bytes = switch_bytes  # plan_id -> bytes a switch to it would move
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
        decision = choose(self.options, self.slos, active, self.budget_bytes, world.plan_id,
                          base_ppl=self.base_ppl, switch_bytes=self.switch_bytes, hysteresis=self.hysteresis)
        self.last_decision = decision
        self.ticks += 1
        if self.desired is None or decision.plan_id != self.desired.plan_id:
            self.desired = Desired(decision.plan_id, decision.reason, time.time())
        return decision
