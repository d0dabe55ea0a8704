"""The executor: owns the model session (engine), serves requests, and applies the desired plan
between two decode steps (or at once when idle).

One thread decodes requests in arrival order at batch 1. A request accepted is always answered:
reconfiguration only swaps experts, whose state the KV cache does not depend on, and a request that
fails is answered with its error.
"""

from __future__ import annotations

import logging
import queue
import statistics
import threading
import time
from collections import deque
from concurrent.futures import Future

from placement.decode import timed_generate
from placement.plan import Plan
from placement.session import Session
from runtime.controller import Desired, World

log = logging.getLogger(__name__)


class Executor:
    def __init__(self, session: Session, plans: dict[str, Plan], check_tenant=lambda name: None):
        self.session, self.plans = session, plans
        self.engine = session.engine
        self.check_tenant = check_tenant  # raises for a tenant the SLOs do not name
        self.lock = threading.RLock()
        self.requests: queue.Queue = queue.Queue()
        self.waiting: dict[str, int] = {}  # tenant -> queued or running requests
        self.served: dict[str, deque] = {}  # tenant -> recent decode tok/s
        self.desired: Desired | None = None
        self.history: list[dict] = []
        self.running = True

    # --- state the controller reads -------------------------------------------------------------
    def held_bytes(self) -> int:
        return self.engine.memory()["gpu_bytes"] if self.engine.plan is not None else 0

    def world(self) -> World:
        with self.lock:
            plan = self.engine.plan
            return World(plan.plan_id if plan else None, self.held_bytes(),
                         frozenset(t for t, n in self.waiting.items() if n > 0))

    def measured_tok_s(self, tenant: str) -> float | None:
        """Median decode speed of the tenant's recent requests."""
        recent = self.served.get(tenant)
        return statistics.median(recent) if recent else None

    def queued(self) -> int:
        with self.lock:
            return sum(self.waiting.values())

    # --- reconciling toward the desired plan -----------------------------------------------------
    def want(self, desired: Desired | None) -> None:
        """The plan to move to at the next step boundary."""
        with self.lock:
            self.desired = desired

    def settled(self) -> bool:
        with self.lock:
            plan = self.engine.plan
            return self.desired is None or (plan is not None and plan.plan_id == self.desired.plan_id)

    def reconcile(self, budget_bytes: int | None = None) -> None:
        """Apply the desired plan if it is not the one served (between two decode steps)."""
        with self.lock:
            if self.settled():
                return
            desired = self.desired
            before = self.engine.plan.plan_id if self.engine.plan is not None else None
            report = self.engine.apply(self.plans[desired.plan_id])
            self.history.append({"at": time.time(), "from": before, "to": desired.plan_id, "reason": desired.reason,
                                 "experts_moved": report.moves, "bytes_to_accel": report.bytes_to_accel,
                                 "requantized": report.requantized, "seconds": report.seconds,
                                 "budget_bytes": budget_bytes})

    # --- requests ------------------------------------------------------------------------------
    def submit(self, tenant: str, prompt: str, max_new_tokens: int = 32) -> Future:
        self.check_tenant(tenant)  # unknown tenant: a clear error for this request
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt must be a non-empty string")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        future: Future = Future()
        with self.lock:
            self.waiting[tenant] = self.waiting.get(tenant, 0) + 1
        self.requests.put((tenant, prompt, max_new_tokens, future, time.time()))
        return future

    def serve_forever(self, between_steps) -> None:
        """Decode requests until stopped; `between_steps()` runs before a request and after each
        decode step (where the plan may change)."""
        tok = self.session.tokenizer
        while self.running:
            try:
                tenant, prompt, n, future, accepted = self.requests.get(timeout=0.1)
            except queue.Empty:
                continue
            served_by = []

            def step():
                between_steps()
                pid = self.engine.plan.plan_id
                if not served_by or served_by[-1] != pid:
                    served_by.append(pid)

            try:
                step()
                gen = timed_generate(self.session.model, tok.encode(prompt), n, warmup_tokens=0,
                                     eos_token_id=tok.eos_token_id, between_steps=step)
                result = {"tenant": tenant, "prompt": prompt, "text": tok.decode(gen.ids),
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

    def stop(self) -> None:
        self.running = False
