"""The serving core without Ray (runtime/ray_app.py makes it a Ray Serve deployment): a controller
and an executor over one model session, and the control loop between them.

The front names the model it was measured on, so a server needs no model flags; given ones must
agree with it. Every plan of the front is rebuilt (and checked by its plan_id) before serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import asdict, replace
from pathlib import Path

from catalog.rows import read_front
from catalog.slo import SLOError, SLOSpec, slos_from_mapping
from placement.session import identity_for, open_session
from runtime.controller import KEPT, MAX_ERROR, Controller, Desired, measured_latency
from runtime.executor import Executor, IncrementalText, streamable
from runtime.limits import Limits, Rejected
from runtime.memory import CudaMemory, SimulatedMemory, Unlimited

log = logging.getLogger(__name__)
STATUS_DECISIONS = 20  # the latest changes of the desired state that status() shows (all are counted)


def latency_met(tenant, delivered: dict) -> bool | None:
    """Whether the latency percentiles the tenant's requests got lately are within its SLO (None:
    no latency SLO, or nothing measured yet)."""
    checks = [value <= limit for limit, value, _, _ in measured_latency(tenant, delivered)]
    return all(checks) if checks else None


def _error_line(err: Exception, where: str, limit: int = 280) -> str:
    """An error as one line of at most `limit` characters (an SLOError names its source; another
    error is said to come from `where`)."""
    text = " ".join(str(err).split())
    text = text if isinstance(err, SLOError) else f"{where}: {type(err).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 1] + "…"


def slos_of(config: dict) -> str | SLOSpec:
    """The SLOs a live configuration (a Serve deployment's user_config) names: `slo_file: PATH`
    (re-read whenever it changes) or `slos: {tenants: ...}` inline."""
    keys = {"slo_file", "slos"}
    if not isinstance(config, dict) or len(set(config) & keys) != 1 or set(config) - keys:
        raise SLOError("user_config: must be a mapping with exactly one of 'slo_file' (a path) or 'slos' "
                       "(the SLOs inline)")
    if "slo_file" in config:
        if not isinstance(config["slo_file"], str) or not config["slo_file"]:
            raise SLOError("user_config.slo_file: must be a path")
        return config["slo_file"]
    return slos_from_mapping(config["slos"], "user_config.slos")


class Server:
    def __init__(self, front: str | Path, slos: str | Path | SLOSpec | dict, *, model: str | None = None,
                 layers: int | None = None, dtype: str | None = None, device: str | None = None,
                 tick_s: float = 1.0, free_bytes: int | None = None, data: str | None = None,
                 hysteresis: float = 0.05, limits: Limits = Limits(), speed: str = "decode_tok_s",
                 metrics=None, start_plan: str | None = None, closed_loop: bool = True,
                 host_budget: int | None = None):
        """slos: a file, SLOs, or a live configuration (see slos_of); metrics: a runtime.metrics.Metrics
        to feed (None: none); start_plan: a plan_id to serve first (a restarted replica's plan), which
        the controller then keeps unless it decides otherwise (an unknown one is ignored); closed_loop:
        correct the profile with what is measured (else decide from the profile alone, see
        runtime.controller); host_budget: bytes the plans' host tier may hold (the engine refuses a
        plan over it, and the controller never chooses one)."""
        if isinstance(slos, dict):
            slos = slos_of(slos)
        rows = read_front(front, speed=speed)  # speed: the column SLO floors are checked against
        identity = identity_for(rows[0].identity, model=model, layers=layers, dtype=dtype, source=str(front))
        self.session = open_session(identity, device, data=data, host_budget=host_budget)
        self.engine = self.session.engine
        self.plans = {m.plan_id: self.session.planner.rebuild(m.knobs, m.plan_id) for m in rows}
        if host_budget is not None:  # judge plans by the bound the engine enforces, not the bytes measured
            rows = [replace(m, host_bytes=self.plans[m.plan_id].host_bytes(self.engine.spec)) for m in rows]
            if min(m.host_bytes for m in rows) > host_budget:
                raise ValueError(f"no plan of {front} fits the host budget of {host_budget / 1e9:.4g} GB: the "
                                 f"smallest host tier is {min(m.host_bytes for m in rows) / 1e9:.4g} GB")
        self.controller = Controller(rows, slos, hysteresis=hysteresis, switch_bytes=self._switch_bytes,
                                     closed_loop=closed_loop, host_budget=host_budget)
        self.executor = Executor(self.session, self.plans, check_tenant=lambda name: self.slos.tenant(name),
                                 limits=limits, priority=self._priority)
        self.lock = self.executor.lock  # one lock: a tick never sees a half-applied plan
        self.metrics = metrics
        self.tick_s = tick_s
        self.reconcile_errors: deque[dict] = deque(maxlen=KEPT)  # plans that failed to apply, the latest
        self.reconcile_errors_total = 0
        self.set_free_memory(free_bytes)
        if start_plan in self.plans:
            self.executor.want(Desired(start_plan, "restored: the plan served before a restart", time.time()))
            self._reconcile()  # (a failure is recorded; the controller's choice comes next)
        elif start_plan is not None:
            log.warning("start_plan %s is not a plan of the front; the controller chooses", start_plan)
        self.tick()  # choose and apply the first plan before serving (a failure here fails the server)
        self.executor.reconcile(self.controller.budget_bytes)
        self.serve_thread = threading.Thread(target=self.executor.serve_forever, args=(self._reconcile,),
                                             daemon=True, name="serve")
        self.serve_thread.start()
        threading.Thread(target=self._control, daemon=True, name="control").start()

    @property
    def slos(self):
        return self.controller.slos

    def _priority(self, tenant: str) -> int:
        """A tenant's SLO priority; 0 for one the SLO file no longer names (its queued requests are
        still served, last)."""
        return next((t.priority for t in self.slos.tenants if t.name == tenant), 0)

    @property
    def history(self) -> list[dict]:
        return self.executor.history

    # --- the loop between controller and executor ------------------------------------------------
    def held_bytes(self) -> int:
        return self.executor.held_bytes()

    def free_bytes(self) -> int:
        return self.memory.free_bytes()

    def budget(self, free_bytes: int | None = None) -> int:
        """What a plan may take now: free memory less the reserve, plus what the server holds."""
        return self.controller.budget(self.free_bytes() if free_bytes is None else free_bytes, self.held_bytes())

    def tick(self) -> dict:
        """One control step: read the world, decide, hand the desired plan to the executor."""
        with self.lock:
            decision = self.controller.tick(self.executor.world(), self.free_bytes())
            self.executor.want(self.controller.desired)
            return {"plan_id": decision.plan_id, "switch": decision.switch, "reason": decision.reason}

    def _reconcile(self) -> None:
        """Move to the desired plan, recording the budget the decision was made on; run by the serving
        thread between two steps (or when idle), so the engine changes under no running step; no memory
        reading on this per-step path. A plan that fails to apply is recorded (status:
        reconcile_errors) and the server serves on with the plan it holds until the next tick asks
        again: a failing switch neither fails every step nor keeps waiting requests from a slot."""
        try:
            self.executor.reconcile(self.controller.budget_bytes)
        except Exception as err:
            desired = self.executor.desired
            log.exception("applying plan %s failed; serving on with the plan held", desired and desired.plan_id)
            with self.lock:
                self.reconcile_errors.append({"at": time.time(), "plan_id": desired and desired.plan_id,
                                              "error": f"{type(err).__name__}: {err}"[:MAX_ERROR]})
                self.reconcile_errors_total += 1
                self.executor.want(None)  # settled until the next tick hands the desired plan again

    def _control(self) -> None:
        while self.executor.serving:
            time.sleep(self.tick_s)
            if not self.executor.serving:  # stopped while asleep
                break
            try:
                self.tick()
                with self.executor.wake:  # an idle serving loop reconciles at once
                    self.executor.wake.notify()
            except Exception:  # the controller must outlive a bad tick
                log.exception("controller tick failed")
            if self.metrics is not None:
                try:
                    self.metrics.observe(self.status())
                except Exception:  # nor a metrics problem
                    log.exception("updating metrics failed")

    def _switch_bytes(self, plan_id: str) -> int:
        plan, now = self.plans[plan_id], self.engine.plan
        if now is None:
            return 0
        spec = self.engine.spec
        experts = sum(plan.expert_nbytes(spec, s.bits) for eid, s in plan.items() if s.tier == "accel" and now.state(eid) != s)
        # a change of attention precision swaps every layer's projections: their bytes move too
        return experts + (plan.attn_nbytes(spec) if plan.attn_bits != now.attn_bits else 0)

    def reconfigure(self, config: dict) -> dict:
        """Live configuration (a Serve deployment's user_config, see slos_of): serve these SLOs from
        now on and decide at once. Bad SLOs raise SLOError, one line (recorded in status); the served
        ones stay."""
        try:
            slos = slos_of(config)
        except Exception as err:  # SLOError, or what a hostile value provokes (an int too large for a float)
            line = _error_line(err, "user_config")
            self.controller.reject(line)
            raise SLOError(line) from None
        with self.lock:
            try:
                self.controller.use_slos(slos)  # (a file it refuses, it records)
            except Exception as err:
                raise SLOError(_error_line(err, str(slos))) from None
        decision = self.tick()
        with self.executor.wake:
            self.executor.wake.notify()
        return decision

    def tenant_for_key(self, key: str) -> str | None:
        """The tenant an API key names in the SLOs served now."""
        return self.slos.tenant_for_key(key)

    # --- RPC ----------------------------------------------------------------------------------
    def submit(self, tenant: str, prompt: str, max_new_tokens: int = 32, **sampling):
        """Accept a request (sampling: temperature, top_p, seed, stop, timeout_s); a Request to wait
        on, stream or cancel."""
        try:
            req = self.executor.submit(tenant, prompt, max_new_tokens, **sampling)
        except Rejected:
            if self.metrics is not None:
                self.metrics.request_rejected(tenant)
            raise
        if self.metrics is not None:
            req.add_done_callback(self._count)
        return req

    def _count(self, req) -> None:
        limits = next((t for t in self.slos.tenants if t.name == req.tenant), None)
        self.metrics.request_done(None if req.exception(0) else req.result(0), req.tenant, limits)

    def generate(self, tenant: str, prompt: str, max_new_tokens: int = 32, **sampling) -> dict:
        return self.submit(tenant, prompt, max_new_tokens, **sampling).result()

    def stream(self, tenant: str, prompt: str, max_new_tokens: int = 32, **sampling):
        """The request's text as it is made, piece by piece (a generator; over Ray, a streaming call)."""
        yield from self.pieces(self.submit(tenant, prompt, max_new_tokens, **sampling))

    def pieces(self, req):
        """An accepted request's text as it is made, piece by piece; leaving early cancels it. Text
        that could begin a stop string is held back until it is known not to (the final text cuts a
        stop string off, and what was streamed is always the start of it)."""
        text, ids, shown, held = IncrementalText(self.session.tokenizer), [], "", ""  # whole characters only
        try:
            for t in req.stream():
                ids.append(t)
                if piece := text.add(ids):  # (decodes only the latest tokens, not the whole text)
                    held += piece
                    n = streamable(held, req.stop)
                    if n:
                        yield held[:n]
                        shown, held = shown + held[:n], held[n:]
        finally:  # the consumer left early: stop generating for it
            req.cancel()
        text = req.result()["text"]  # the final text (a stop string cut off)
        if text.startswith(shown) and len(text) > len(shown):
            yield text[len(shown):]

    def set_free_memory(self, free_bytes: int | None) -> None:
        """Simulate (None: stop simulating) a device with `free_bytes` free now."""
        with self.lock:
            if free_bytes is not None:
                self.memory = SimulatedMemory(self.held_bytes, free_bytes)
            elif self.engine.on_cuda:
                self.memory = CudaMemory(self.engine.accel)
            else:
                self.memory = Unlimited(2 * max(o.gpu_bytes for o in self.controller.options))

    def status(self) -> dict:
        with self.lock:
            plan, c, d = self.engine.plan, self.controller, self.controller.last_decision
            free = self.free_bytes()
            active = self.executor.active_tenants()
            tenants = []
            for t in c.slos.tenants:
                measured = self.executor.measured_tok_s(t.name)
                slo_status = next((s for s in d.tenants if s.tenant == t.name), None) if d else None
                delivered = self.executor.delivered("tenant", t.name)
                tenants.append({
                    "name": t.name, "priority": t.priority, "active": t.name in active,
                    "waiting": self.executor.queue_depth(t.name), "running": self.executor.running_count(t.name),
                    "min_decode_tok_s": t.min_decode_tok_s, "max_ppl_increase": t.max_ppl_increase,
                    "max_ttft_s": t.max_ttft_s, "max_tpot_ms": t.max_tpot_ms, "p": t.p,
                    "measured_decode_tok_s": measured,
                    "floor_met": None if measured is None or t.min_decode_tok_s is None else measured >= t.min_decode_tok_s,
                    "plan_meets_slo": None if slo_status is None else slo_status.met,
                    "delivered": delivered, "latency_met": latency_met(t, delivered),
                    "problems": [] if slo_status is None else list(slo_status.problems),
                })
            return {
                "model": self.session.identity.describe(),
                "plan_id": plan.plan_id if plan else None, "plan": plan.summary(self.engine.spec) if plan else None,
                "desired_plan_id": c.desired.plan_id if c.desired else None,
                # closed loop: tenants whose new requests wait (admission control) while they run
                # `admitted` sequences between them, the latest measurement that corrected the
                # profile's predictions, the latest changes of the desired state with their reasons
                "held_back": sorted(c.desired.hold) if c.desired else [], "closed_loop": c.closed_loop,
                "admitted": c.desired.admit if c.desired and c.desired.hold else None,
                "measured": c.evidence, "decisions": list(c.decisions)[-STATUS_DECISIONS:],
                "decisions_total": c.decisions_total, "ready": self.executor.warmed.is_set(),
                "free_bytes": free, "budget_bytes": self.budget(free),
                "reserve_bytes": c.slos.reserve_bytes, "prefer": c.slos.prefer, "tenants": tenants,
                "queued": self.executor.queued(), "waiting": self.executor.queue_depth(),
                "running": self.executor.running_count(), "decode_steps": self.executor.steps,
                "limits": asdict(self.executor.limits) | {"max_len": self.executor.max_len}, "ticks": c.ticks, "last_decision": d.reason if d else None,
                "delivered_by_plan": self.executor.delivered_by_plan(),
                "history": list(self.history), "reconfigurations": self.executor.reconfigurations,
                "slo_source": str(c.slo_path) if c.slo_path else "user_config",
                "slo_rejections": list(c.rejections), "slo_rejections_total": c.rejected_total,
                "reconcile_errors": list(self.reconcile_errors), "reconcile_errors_total": self.reconcile_errors_total,
                "memory": self.engine.memory() | {"kv_cache_bytes": self.executor.decoder.cache.nbytes()},
            }

    def ready(self, timeout: float | None = 0.0) -> bool:
        """Whether the first plan's warm-up is over (on a GPU: kernels compiled at every prefill size,
        decode graphs captured: seconds to a minute), waiting up to `timeout` seconds (None: until
        it is). Requests accepted before are answered after it."""
        return self.executor.warmed.wait(timeout)

    def healthy(self) -> bool:
        """Serving: the serving thread is alive and not stopped."""
        return self.executor.serving and self.serve_thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving; returns once every accepted request is answered (or after `timeout`)."""
        self.executor.stop()
        self.serve_thread.join(timeout)
