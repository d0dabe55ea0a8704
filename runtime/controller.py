"""The controller: reads the world each tick, decides the plan to serve, and keeps that desired
state apart from what the executor actually serves (the executor reconciles toward it).

A tick re-reads the SLO file when it changes (a bad file is rejected and recorded; the old SLOs
stay), reads free accelerator memory and the executor's state (plan held, active tenants), and asks
the pure policy (catalog.policy.choose) which measured plan to serve; closed loop, it also sets
admission control from each tenant's measured latency. Each step of a tick fails on its own: the
loop that calls tick() never dies.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from catalog.feedback import Feedback
from catalog.policy import Decision, Option, choose
from catalog.rows import Measured
from catalog.slo import SLOError, SLOSpec, TenantSLO, load_slos

log = logging.getLogger(__name__)
KEPT = 50  # rejections kept for status (the total is counted)
MAX_ERROR = 500  # characters of an error kept
DECISIONS = 200  # changes of the desired state kept for status (all are counted)
RECENT_S = 2.0  # a tenant's measured latency: percentiles of its requests finished this long ago
# admission is cut while a protected tenant's measured percentile is within CUT of its SLO (or over
# it), and grows while all are GROW inside theirs: per-second percentiles are noisy, the band keeps
# them inside
CUT, GROW = 0.05, 0.2
RELEASE_S = 2.0  # a hold ends once the tenants it protects have been idle this long
CEILING_S = 10.0  # admission that broke an SLO is tried again after this long (one more per period)


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
    # per tenant, what its requests finished in the last RECENT_S seconds got (Window.summary)
    recent: tuple[tuple[str, dict], ...] = ()

    def occupancy(self, without: frozenset[str] = frozenset()) -> int:
        """Sequences a decode step will carry: those running or waiting, up to the slots."""
        return max(1, min(self.max_seqs, sum(n for t, n in self.load if t not in without)))


@dataclass(frozen=True)
class Desired:
    """The goal state: the plan to serve, tenants whose new requests wait while they run `admit`
    sequences between them (admission control), why."""

    plan_id: str
    reason: str
    at: float
    hold: frozenset[str] = frozenset()
    admit: int = 0


def rank(tenant: TenantSLO) -> tuple[int, bool]:
    """Who waits first under admission control: the lowest priority, and within a priority the
    tenants without a latency SLO (waiting costs them nothing they were promised)."""
    return tenant.priority, tenant.has_latency_slo


def measured_latency(tenant: TenantSLO, delivered: dict | None) -> list[tuple[float, float, str, str]]:
    """(limit, measured percentile, unit, in words) of each latency SLO of the tenant that `delivered`
    (a Window.summary) has a measurement for."""
    out = []
    for key, limit, unit, what in tenant.latency_limits():
        value = ((delivered or {}).get(key) or {}).get(f"p{tenant.p}")
        if value is not None:
            out.append((limit, value, unit, what))
    return out


def measured_breaks(tenant: TenantSLO, recent: dict | None, margin: float = 0.0) -> list[str]:
    """The tenant's latency SLOs its recent requests broke (or came within `margin` of), in words."""
    out = []
    for limit, value, unit, what in measured_latency(tenant, recent):
        if value > limit * (1 - margin):
            how = "exceeds" if value > limit else f"is within {margin:.0%} of"
            out.append(f"{tenant.name}'s {what} p{tenant.p} {value:.3g} {unit} over the last {RECENT_S:g} s {how} "
                       f"{limit:g} {unit}")
    return out


class Controller:
    def __init__(self, front: list[Measured], slos: str | Path | SLOSpec, *, hysteresis: float = 0.05,
                 switch_bytes: Callable[[str], int] = lambda plan_id: 0, closed_loop: bool = True,
                 host_budget: int | None = None, clock: Callable[[], float] = time.time):
        """closed_loop: predict plans' latency at the current load and correct the predictions with
        what is measured (catalog.feedback), and limit how many sequences lower-ranked tenants run
        by what the tenants with latency SLOs are measured to get (`_admission`); otherwise decide
        from the profile alone.
        host_budget: plans whose host_bytes exceed it are never chosen. clock: the time (tests pass
        their own)."""
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
        self.clock = clock
        self.feedback = Feedback(front)
        self.evidence: str | None = None  # the latest measurement that corrected a prediction
        self.desired: Desired | None = None
        self.decisions: deque[dict] = deque(maxlen=DECISIONS)  # the latest changes of the desired state
        self.decisions_total = 0
        self.last_decision: Decision | None = None
        # admission control's state: when each tenant was last active, the load of the last ticks,
        # the tenants held and the sequences they may run
        self.seen: dict[str, float] = {}
        self.loads: deque[tuple[float, dict[str, int]]] = deque()
        self.hold_state: tuple[frozenset[str], int] | None = None
        self.changed_at = 0.0  # when admission last changed
        self.ceiling = (0.0, 0.0)  # (admitted sequences, when): the admission that last broke an SLO
        self.protected: frozenset[str] = frozenset()  # the tenants it protected
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
        desired state (and is recorded in `decisions`)."""
        self.reload_slos()
        self.budget_bytes = self.budget(free_bytes, world.held_bytes)
        # tenants the SLO file no longer names keep being served, with no SLO to meet
        named = {t.name for t in self.slos.tenants}
        active = frozenset(t for t in world.active if t in named)
        now = self.clock()
        hold, admit = frozenset(), 0
        if not self.closed_loop:
            decision = self._choose(self.options, active, world.plan_id)
        else:
            if world.plan_id is not None:
                self.evidence = self.feedback.observe(world.plan_id, list(world.steps), world.ttft_p50_s, now) \
                    or self.evidence
            decision = self._choose(self.feedback.options_at(self.options, world.occupancy(), now), active,
                                    world.plan_id)
            decision, hold, admit = self._admission(decision, world, active, now)
            # every decision names the measurement behind it (before any: the profile's alone)
            decision = replace(decision, reason=f"{decision.reason}; measured: "
                                                f"{self.evidence or 'nothing yet, the profile alone'}")
        self.last_decision = decision
        self.ticks += 1
        d = self.desired
        if d is None or (decision.plan_id, hold, admit) != (d.plan_id, d.hold, d.admit):
            self.desired = Desired(decision.plan_id, decision.reason, now, hold, admit)
            self.decisions.append({"at": now, "plan_id": decision.plan_id, "hold": sorted(hold), "admit": admit,
                                   "reason": decision.reason})
            self.decisions_total += 1
        return decision

    def _choose(self, options: list[Option], active: frozenset[str], current: str | None) -> Decision:
        return choose(options, self.slos, active, self.budget_bytes, current, base_ppl=self.base_ppl,
                      switch_bytes=self.switch_bytes, hysteresis=self.hysteresis, host_budget=self.host_budget)

    def _admission(self, decision: Decision, world: World, active: frozenset[str],
                   now: float) -> tuple[Decision, frozenset[str], int]:
        """Admission control, while tenants with a latency SLO share the server with lower-ranked
        ones (see `rank`), or when the profile's prediction at this load says an SLO breaks: the
        lowest-ranked tenants may run only `admit` sequences between them, never more than the
        slots the others used lately (so a protected tenant's request finds a slot), nor more than
        the corrected prediction allows. `admit` starts at none (slow start), halves when a protected
        tenant's measured percentile comes within CUT of its SLO, grows by one while all are GROW
        inside theirs, each change waiting for the measurement to see the last one, and not past
        the admission that last broke an SLO (one more every CEILING_S); the hold ends once the
        tenants it protects have been idle for RELEASE_S. The next rank is held too only when the
        prediction says holding this one entirely leaves a higher rank's SLO broken."""
        for name in active:
            self.seen[name] = now
        tenants = sorted((t for t in self.slos.tenants if now - self.seen.get(t.name, -math.inf) <= RELEASE_S),
                         key=rank)  # active lately
        ranks = sorted({rank(t) for t in tenants})
        recent, load = dict(world.recent), dict(world.load)
        self.loads.append((now, load))
        while now - self.loads[0][0] > RELEASE_S:
            self.loads.popleft()
        groups = [frozenset(t.name for t in tenants if rank(t) <= r) for r in ranks[:-1]]  # never the top rank
        if not groups:
            self.hold_state = None
            return decision, frozenset(), 0
        held, admit = self.hold_state if self.hold_state and self.hold_state[0] in groups else (groups[0], None)
        if self.protected != (protected := frozenset(t.name for t in tenants) - held):
            self.protected, self.ceiling = protected, (float(world.max_seqs), now)  # another mix: learn anew
        group, bound = self._predicted_bound(groups, held, world, now)
        if group != held:  # holding `held` entirely would not do: the next rank waits too, from scratch
            held, admit = group, None
        # the prediction asks for a hold when a tenant not held breaks its SLO at this load and some
        # admission would meet it (else it limits nothing)
        unmet = [p for st in decision.tenants if st.tenant not in held for p in st.problems]
        predicted = bound is not None and bool(unmet)
        bound = world.max_seqs if bound is None else bound
        kept = [t for t in tenants if t.name not in held]
        breaks = [why for t in kept for why in measured_breaks(t, recent.get(t.name), CUT)]
        near = breaks or [why for t in kept for why in measured_breaks(t, recent.get(t.name), GROW)]
        # the slots the protected tenants used lately stay theirs
        slots = max(0, world.max_seqs - sum(max(seen.get(t.name, 0) for _, seen in self.loads) for t in kept))
        running = sum(load.get(n, 0) for n in held)  # (running or waiting: an upper bound of what runs)
        settled = now - self.changed_at >= RECENT_S  # (before, the measurement shows requests from before it)
        ceiling = self.ceiling[0] + (now - self.ceiling[1]) / CEILING_S  # below the last break; +1 per CEILING_S
        latency = any(t.has_latency_slo for t in kept)
        if not latency and not predicted and (admit is None or admit >= min(bound, slots)):
            self.hold_state = None  # nothing measured to protect, nothing predicted to break
            return decision, frozenset(), 0
        if admit is None:
            # slow start: none, more as measurements of the protected tenants with them held allow
            admit, why = 0, ("measured: " + "; ".join(breaks) if breaks else "predicted: " + (
                "; ".join(unmet) or "every SLO met at this load") +
                f", started at none as {', '.join(sorted(held))} joined {', '.join(t.name for t in kept)}")
            self.changed_at = now
        elif breaks and settled:
            self.ceiling = (admit - 1.0, now)
            admit, why, self.changed_at = min(admit, running) // 2, "measured: " + "; ".join(breaks), now
        elif not near and settled and admit + 1 <= min(bound, slots, ceiling):
            admit, why = admit + 1, f"measured: every protected tenant within its SLO by {GROW:.0%}"
            self.changed_at = now
        else:
            why = "measured: " + ("; ".join(near) if near else "within the SLOs, growing no further yet")
        admit = max(0, min(admit, bound, slots))
        self.hold_state = (held, admit)
        trial = self._trial(held, admit, world, now)
        return replace(trial, reason=f"admission control: {', '.join(sorted(held))} may run {admit} sequences "
                                     f"(new requests wait) so {', '.join(t.name for t in reversed(kept))} meet "
                                     f"their SLOs ({why}); {trial.reason}"), held, admit

    def _trial(self, held: frozenset[str], admit: int, world: World, now: float) -> Decision:
        """The plan for the tenants not held, at the load they and `admit` held sequences make."""
        kept = frozenset(n for n, _ in world.load if n not in held) & world.active
        batch = max(1, min(world.max_seqs, sum(n for t, n in world.load if t not in held) + admit))
        return self._choose(self.feedback.options_at(self.options, batch, now), kept, world.plan_id)

    def _predicted_bound(self, groups: list[frozenset[str]], held: frozenset[str], world: World,
                         now: float) -> tuple[frozenset[str], int | None]:
        """The group to hold and the most sequences it may run by the prediction (None: no admission
        meets the others' SLOs, as for a perplexity SLO the memory left cannot meet): this group, or
        the next when holding this one entirely leaves a tenant ranked above the next one predicted
        to break an SLO that holding the next one too would meet (a tenant is never held for its
        own sake, nor for its equals')."""
        i = groups.index(held)
        while True:
            group = groups[i]
            bound = next((k for k in range(world.max_seqs, -1, -1) if self._trial(group, k, world, now).all_met), None)
            if bound is not None or i + 1 == len(groups):
                return group, bound
            above = {s.tenant for s in self._trial(group, 0, world, now).tenants if not s.met} - groups[i + 1]
            if not above & {s.tenant for s in self._trial(groups[i + 1], 0, world, now).tenants if s.met}:
                return group, None
            i += 1
