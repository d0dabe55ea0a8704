"""The serving loop and its controller, without Ray (runtime/ray_actor.py makes it a Ray actor).

One thread serves requests in arrival order at batch 1; a second ticks every `tick_s`: re-reads the
SLO file when it changes (a bad file is rejected and the old SLOs stay), reads free accelerator
memory, asks qos.policy which plan to serve, and hands a new plan to the serving thread, which
applies it between two decode steps (or at once when idle). A request accepted is always answered:
reconfiguration only swaps experts, whose state the KV cache does not depend on.
"""

from __future__ import annotations

import logging
import queue
import statistics
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path

import pandas as pd
import torch

from placement.engine import Engine
from placement.models import load_model
from placement.plan import Plan
from profiler.data import calibration_text
from profiler.profile import Planner
from profiler.throughput import timed_generate
from qos.pareto import with_ppl
from qos.policy import choose, options_from_rows
from qos.slo import SLOError, load_slos

log = logging.getLogger(__name__)


class Server:
    def __init__(self, model: str, front: str, slos: str, *, device: str | None = None,
                 tick_s: float = 1.0, free_bytes: int | None = None, data: str | None = None,
                 hysteresis: float = 0.05, layers: int | None = None):
        self.slo_path = Path(slos)
        self.slos = load_slos(self.slo_path)
        self.slo_mtime = self.slo_path.stat().st_mtime
        rows = with_ppl(pd.read_csv(front)).to_dict(orient="records")
        if not rows:
            raise ValueError(f"{front} has no measured plans")
        self.loaded = load_model(model, layers=layers, device=device)  # layers: as the front was profiled
        self.engine = Engine(self.loaded.model, accel=device)
        planner = Planner(self.engine, model, lambda: self.loaded.tokenizer.encode(calibration_text(data=data)))
        self.plans = {str(r["plan_id"]): planner.rebuild(r) for r in rows}
        self.options = options_from_rows(rows)
        quality = [r["ppl"] for r in rows if int(r["quantized"]) == 0] or [min(r["ppl"] for r in rows)]
        self.base_ppl = min(quality)
        self.tick_s, self.hysteresis = tick_s, hysteresis
        # CUDA reports free memory itself; elsewhere (tests, CPU) a simulated device stands in: the
        # memory the server may use in all, of which what it holds is not free
        self.capacity_override = None
        self.lock = threading.RLock()
        self.requests: queue.Queue = queue.Queue()
        self.waiting: dict[str, int] = {}  # tenant -> queued or running requests
        self.served: dict[str, deque] = {}  # tenant -> recent decode tok/s
        self.pending: tuple[Plan, str] | None = None
        self.history: list[dict] = []
        self.rejections: list[dict] = []
        self.last_decision = None
        self.ticks = 0
        self.running = True
        self.set_free_memory(free_bytes)
        self.tick()  # choose and apply the first plan before serving
        self._apply_pending()
        threading.Thread(target=self._serve, daemon=True, name="serve").start()
        threading.Thread(target=self._control, daemon=True, name="control").start()

    # --- the controller -----------------------------------------------------------------------
    def held_bytes(self) -> int:
        return self.engine.memory()["gpu_bytes"] if self.engine.plan is not None else 0

    def free_bytes(self) -> int:
        if self.capacity_override is not None:
            return self.capacity_override - self.held_bytes()
        if self.engine.on_cuda:
            return torch.cuda.mem_get_info(self.engine.accel)[0]
        return 2 * max(o.gpu_bytes for o in self.options)  # no pressure unless told otherwise

    def budget(self) -> int:
        """What a plan may take: free memory less the reserve, plus what the server holds now."""
        return self.free_bytes() - self.slos.reserve_bytes + self.held_bytes()

    def _reload_slos(self) -> None:
        mtime = self.slo_path.stat().st_mtime
        if mtime == self.slo_mtime:
            return
        self.slo_mtime = mtime
        try:
            self.slos = load_slos(self.slo_path)
            log.info("reloaded SLOs from %s", self.slo_path)
        except SLOError as err:  # a bad file never replaces a good one
            self.rejections.append({"at": time.time(), "error": str(err)})
            log.warning("rejected SLO file: %s", err)

    def tick(self) -> dict:
        """One control step: read the world, decide, hand over a new plan if it differs."""
        with self.lock:
            self._reload_slos()
            active = {t for t, n in self.waiting.items() if n > 0}
            current = self.engine.plan.plan_id if self.engine.plan is not None else None
            decision = choose(self.options, self.slos, active, self.budget(), current, base_ppl=self.base_ppl,
                              switch_bytes=self._switch_bytes, hysteresis=self.hysteresis)
            self.last_decision = decision
            self.ticks += 1
            if decision.switch:
                self.pending = (self.plans[decision.plan_id], decision.reason)
            return {"plan_id": decision.plan_id, "switch": decision.switch, "reason": decision.reason}

    def _switch_bytes(self, plan_id: str) -> int:
        plan, now = self.plans[plan_id], self.engine.plan
        if now is None:
            return 0
        return sum(plan.expert_nbytes(self.engine.spec, s.bits) for eid, s in plan.items()
                   if s.tier == "accel" and now.state(eid) != s)

    def _control(self) -> None:
        while self.running:
            time.sleep(self.tick_s)
            try:
                self.tick()
                if self.waiting_total() == 0:
                    self._apply_pending()  # idle: no decode step to wait for
            except Exception:  # the controller must outlive a bad tick
                log.exception("controller tick failed")

    def _apply_pending(self) -> None:
        with self.lock:
            if self.pending is None:
                return
            plan, reason = self.pending
            self.pending = None
            before = self.engine.plan.plan_id if self.engine.plan is not None else None
            report = self.engine.apply(plan)
            self.history.append({"at": time.time(), "from": before, "to": plan.plan_id, "reason": reason,
                                 "experts_moved": report.moves, "bytes_to_accel": report.bytes_to_accel,
                                 "requantized": report.requantized, "seconds": report.seconds,
                                 "budget_bytes": self.budget()})

    # --- serving ------------------------------------------------------------------------------
    def waiting_total(self) -> int:
        with self.lock:
            return sum(self.waiting.values())

    def submit(self, tenant: str, prompt: str, max_new_tokens: int = 32) -> Future:
        self.slos.tenant(tenant)  # unknown tenant: a clear error for this request
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt must be a non-empty string")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        future: Future = Future()
        with self.lock:
            self.waiting[tenant] = self.waiting.get(tenant, 0) + 1
        self.requests.put((tenant, prompt, max_new_tokens, future, time.time()))
        return future

    def generate(self, tenant: str, prompt: str, max_new_tokens: int = 32) -> dict:
        return self.submit(tenant, prompt, max_new_tokens).result()

    def _serve(self) -> None:
        while self.running:
            try:
                tenant, prompt, n, future, accepted = self.requests.get(timeout=0.1)
            except queue.Empty:
                continue
            served_by = []

            def between_steps():
                self._apply_pending()
                pid = self.engine.plan.plan_id
                if not served_by or served_by[-1] != pid:
                    served_by.append(pid)

            try:
                between_steps()
                gen = timed_generate(self.loaded.model, self.loaded.tokenizer.encode(prompt), n, warmup_tokens=0,
                                     eos_token_id=self.loaded.tokenizer.eos_token_id, between_steps=between_steps)
                result = {"tenant": tenant, "prompt": prompt, "text": self.loaded.tokenizer.decode(gen.ids),
                          "new_tokens": gen.new_tokens, "latency_s": time.time() - accepted,
                          "ttft_s": gen.ttft_s, "decode_tok_s": gen.decode_tok_s, "plan_id": served_by[-1],
                          "plan_ids": served_by}
                if gen.decode_tok_s:
                    self.served.setdefault(tenant, deque(maxlen=16)).append(gen.decode_tok_s)
                future.set_result(result)
            except Exception as err:  # answer the request with the error rather than lose it
                log.exception("request failed")
                future.set_exception(err)
            finally:
                with self.lock:
                    self.waiting[tenant] -= 1

    # --- RPC ----------------------------------------------------------------------------------
    def set_free_memory(self, free_bytes: int | None) -> None:
        """Simulate (None: stop simulating) a device with `free_bytes` free now; memory the server
        releases or takes later changes what is free, as on a real device."""
        with self.lock:
            self.capacity_override = None if free_bytes is None else int(free_bytes) + self.held_bytes()

    def status(self) -> dict:
        with self.lock:
            plan = self.engine.plan
            d = self.last_decision
            tenants = []
            for t in self.slos.tenants:
                measured = statistics.median(self.served[t.name]) if self.served.get(t.name) else None
                slo_status = next((s for s in d.tenants if s.tenant == t.name), None) if d else None
                tenants.append({
                    "name": t.name, "priority": t.priority, "active": self.waiting.get(t.name, 0) > 0,
                    "min_decode_tok_s": t.min_decode_tok_s, "max_ppl_increase": t.max_ppl_increase,
                    "measured_decode_tok_s": measured,
                    "floor_met": None if measured is None or t.min_decode_tok_s is None else measured >= t.min_decode_tok_s,
                    "plan_meets_slo": None if slo_status is None else slo_status.met,
                    "problems": [] if slo_status is None else list(slo_status.problems),
                })
            return {
                "plan_id": plan.plan_id if plan else None, "plan": plan.summary(self.engine.spec) if plan else None,
                "free_bytes": self.free_bytes(), "budget_bytes": self.budget(), "reserve_bytes": self.slos.reserve_bytes,
                "prefer": self.slos.prefer, "tenants": tenants, "queued": self.waiting_total(),
                "ticks": self.ticks, "last_decision": d.reason if d else None,
                "history": list(self.history), "slo_rejections": list(self.rejections),
                "memory": self.engine.memory(),
            }

    def ready(self) -> bool:
        return True

    def stop(self) -> None:
        self.running = False
