"""The executor: owns the model session and its one decoder, schedules requests onto it with
continuous batching, and applies the desired plan between two decode steps (or when idle).

One thread (`serve_forever`) runs the loop: reconcile the plan, admit waiting requests into free
decoder slots (tenants by priority with weighted fairness, FIFO within a tenant), prefill them in
chunks within a per-step token budget (the chunks of several prompts packed into one forward), then
one decode step for every running sequence. Requests join and leave between steps; a
reconfiguration only swaps experts, whose state the KV cache does not depend on, so running
sequences carry on under the new plan.

A request accepted is always answered: with its tokens, with its error, or, once cancelled or when
the server stops, with what it had. Limits are checked at submit with errors that name them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from contextlib import contextmanager

import torch

from placement.decode import Decoder, Sampling, eos_ids, pack_chunks
from placement.plan import Plan
from placement.session import Session
from runtime.controller import RECENT_S, Desired, World
from runtime.limits import Limits, QueueFull, Rejected, Stopping
from runtime.window import Window

log = logging.getLogger(__name__)
HISTORY = 500  # reconfigurations kept for status (all are counted)


class IncrementalText:
    """A token sequence's text as it grows, decoding only the tokens since the last whole character
    each time (what a token adds is the text of the tokens from an earlier offset on, less the text
    of those before it: tokenizers that drop a leading space or merge bytes agree with a whole
    decode), so the work per token does not grow with the text."""

    def __init__(self, tokenizer, patience: int | None = None):
        self.tokenizer = tokenizer
        self.patience = patience  # tokens without a whole new character before moving on anyway
        self.prefix = self.read = 0  # tokens [prefix, read) decode to the end of the text so far

    def add(self, tokens: list[int]) -> str:
        """The text that `tokens` (the whole sequence so far) adds since the last call: whole
        characters only, "" while a character is incomplete (partial UTF-8, skipped ids), unless
        that has lasted `patience` tokens."""
        decode = self.tokenizer.decode
        before = decode(tokens[self.prefix:self.read]) if self.read > self.prefix else ""
        text = decode(tokens[self.prefix:])
        if (len(text) <= len(before) or text.endswith("\ufffd")) and (
                self.patience is None or len(tokens) - self.prefix < self.patience):
            return ""
        self.prefix, self.read = self.read, len(tokens)
        return text[len(before):]


class StopText:
    """Finds stop strings in a request's text as its tokens come, incrementally: a stop string of
    any length is found, and the work per token does not grow with the text."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.text = IncrementalText(tokenizer, patience=16)
        self.stops = stops
        self.keep = max(map(len, stops)) - 1  # characters a stop string can reach back from new text
        self.tail = ""  # the last `keep` characters checked

    def hit(self, tokens: list[int]) -> bool:
        """Whether the text of `tokens` (all of the request's, one more than the last call) now
        holds a stop string."""
        new = self.text.add(tokens)
        if not new:
            return False
        window = self.tail + new
        self.tail = window[-self.keep:] if self.keep else ""
        return any(s in window for s in self.stops)


def streamable(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` (a request's unsent text, after text already streamed that holds no stop
    string nor the beginning of one) may be streamed now: up to the first stop string in it, else all
    but the longest tail that could be the beginning of one (held back until the next characters
    decide, so a client never sees text the final answer cuts off)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return cut
    keep = 0
    for s in stops:
        keep = max(keep, next((j for j in range(min(len(s) - 1, len(text)), keep, -1) if text.endswith(s[:j])), 0))
    return len(text) - keep


class Request:
    """An accepted request: wait for its result, stream its tokens, or cancel it (any thread)."""

    def __init__(self, rid: int, tenant: str, prompt: str, prompt_ids: list[int], max_new_tokens: int,
                 sampling: Sampling, stop: tuple[str, ...], timeout_s: float | None = None):
        self.id, self.tenant, self.prompt, self.prompt_ids = rid, tenant, prompt, prompt_ids
        self.max_new_tokens, self.sampling, self.stop = max_new_tokens, sampling, stop
        self.accepted_at = time.time()
        self.deadline = None if timeout_s is None else self.accepted_at + timeout_s
        self.tokens: list[int] = []
        self.slot: int | None = None
        self.prefilled = 0  # prompt tokens in the cache so far
        self.first_token_at: float | None = None
        self.plan_ids: list[str] = []
        self._events: queue.SimpleQueue = queue.SimpleQueue()  # token ids, then None at the end
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._result: dict | None = None
        self._error: BaseException | None = None
        self._callbacks: list = []
        self._stop_text: StopText | None = None  # made by the executor at the first token, with stop strings

    # --- the client's side ----------------------------------------------------------------------
    def result(self, timeout: float | None = None) -> dict:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not done after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result

    def done(self) -> bool:
        return self._done.is_set()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The request's error once it is done (None when it succeeded)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not done after {timeout} s")
        return self._error

    def add_done_callback(self, fn) -> None:
        """fn(request) when the request is done (at once if it is; else on the serving thread)."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def cancel(self) -> None:
        """Stop generating (between two steps); the result keeps the tokens made so far."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def stream(self, timeout: float | None = None):
        """Token ids in the order they are made; ends when the request does (raising its error)."""
        while True:
            tok = self._events.get(timeout=timeout)
            if tok is None:
                if self._error is not None:
                    raise self._error
                return
            yield tok

    # --- the executor's side --------------------------------------------------------------------
    def _finish(self, result: dict | None = None, error: BaseException | None = None) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self._result, self._error = result, error
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        self._events.put(None)
        for fn in callbacks:  # a failing callback is the client's problem, never the server's
            try:
                fn(self)
            except Exception:
                log.exception("a done-callback of request %s failed", self.id)


@contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to `n` (0: left as they are) for the block, then put back: the
    setting is also what threads that start using torch later pick up."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(before)


class Executor:
    def __init__(self, session: Session, plans: dict[str, Plan], check_tenant=lambda name: None, *,
                 limits: Limits = Limits(), priority=lambda tenant: 1):
        self.session, self.plans, self.limits = session, plans, limits
        self.engine = session.engine
        self.tokenizer = session.tokenizer
        self.check_tenant = check_tenant  # raises for a tenant the SLOs do not name
        self.priority = priority  # tenant -> its SLO priority (higher is served first)
        context = getattr(session.model.config, "max_position_embeddings", limits.max_len)
        self.max_len = min(limits.max_len, context)
        self.decoder = Decoder(session.model, self.engine, max_seqs=limits.max_seqs, max_len=self.max_len)
        self.lock = threading.RLock()
        self.wake = threading.Condition(self.lock)
        self.waiting: dict[str, deque[Request]] = {}  # tenant -> requests without a slot, FIFO
        self.running: dict[int, Request] = {}  # slot -> request (prefilling or decoding)
        self.served_share: dict[str, float] = {}  # tenant -> admitted tokens / weight (fair queuing)
        self.windows: dict[tuple[str, str], Window] = {}  # ("tenant"|"plan", name) -> recent requests
        self.desired: Desired | None = None
        self.history: deque[dict] = deque(maxlen=HISTORY)  # the latest reconfigurations
        self.reconfigurations = 0  # all of them
        self.serving = True
        self.warmed = threading.Event()  # set once warm-up (kernels compiled, graphs captured) is over
        self.steps = 0
        self.hook_failures = 0  # serve_forever's between_steps() raised
        # measured since the controller last looked (world()): (plan_id, batch, seconds) per decode
        # step, (plan_id, seconds) per first token
        self.measured_steps: deque[tuple[str | None, int, float]] = deque(maxlen=10_000)
        self.measured_ttfts: deque[tuple[str | None, float]] = deque(maxlen=10_000)
        self._ids = 0
        self._tok_lock = threading.Lock()  # the tokenizer is called from client threads
        self._plan_memo: tuple = (None, None)  # (plan, its plan_id): a plan_id hashes the whole plan
        self._noted_plan = None  # the plan _note_plan last saw
        # where the serving loop's time goes (busy iterations only; see loop_counters)
        self.counters = {"iterations": 0, "busy_s": 0.0, "prefill_forwards": 0, "prefill_tokens": 0,
                         "prefill_s": 0.0, "decode_steps": 0, "decode_tokens": 0, "decode_s": 0.0}

    # --- state the controller reads -------------------------------------------------------------
    def held_bytes(self) -> int:
        return self.engine.memory()["gpu_bytes"] if self.engine.plan is not None else 0

    def world(self) -> World:
        """The state the controller decides on, with what was measured since the last call under the
        plan served now (its decode steps (batch, seconds) and the median time to first token) and
        what each tenant's requests finished in the last RECENT_S seconds got."""
        with self.lock:
            plan_id = self._plan_id(self.engine.plan)
            load: dict[str, int] = {}
            for r in self.running.values():
                load[r.tenant] = load.get(r.tenant, 0) + 1
            for t, q in self.waiting.items():
                if q:
                    load[t] = load.get(t, 0) + len(q)
            steps = tuple((b, s) for p, b, s in self.measured_steps if p == plan_id)
            ttfts = sorted(v for p, v in self.measured_ttfts if p == plan_id)
            self.measured_steps.clear()
            self.measured_ttfts.clear()
            windows = {name: w.copy() for (kind, name), w in self.windows.items() if kind == "tenant"}
            held = self.held_bytes()
        now = time.time()  # (percentiles sorted without holding up the serving loop)
        recent = tuple((name, summary) for name, w in sorted(windows.items())
                       if (summary := w.summary(now, RECENT_S))["requests"])
        return World(plan_id, held, frozenset(load), tuple(sorted(load.items())), self.limits.max_seqs, steps,
                     ttfts[len(ttfts) // 2] if ttfts else None, recent)

    def _held(self) -> frozenset[str]:
        """The tenants the controller holds back (admission control)."""
        return self.desired.hold if self.desired is not None else frozenset()

    def _plan_id(self, plan: Plan | None) -> str | None:
        """plan.plan_id, hashed once per plan served (plans are immutable; the hash is not cheap)."""
        if plan is None:
            return None
        if self._plan_memo[0] is not plan:
            self._plan_memo = (plan, plan.plan_id)
        return self._plan_memo[1]

    def loop_counters(self) -> dict:
        """Where the serving loop's busy time went, since it started: prefill forwards (with the
        first tokens' sampling), decode steps (the forward and its sampling) and the rest, host
        work (scheduling, bookkeeping, answering requests, reconciling)."""
        with self.lock:
            c = dict(self.counters)
        c["host_s"] = c["busy_s"] - c["prefill_s"] - c["decode_s"]
        return c

    def active_tenants(self) -> set[str]:
        with self.lock:
            return {t for t, q in self.waiting.items() if q} | {r.tenant for r in self.running.values()}

    def delivered(self, kind: str, name: str) -> dict:
        """What requests of a tenant (kind "tenant") or served by a plan ("plan") got lately:
        TTFT, time per output token and decode speed percentiles, tokens delivered per second."""
        with self.lock:  # (a copy: the summary's sorting is done without holding up the serving loop)
            window = self.windows.get((kind, name))
            window = window.copy() if window else None
        return window.summary() if window else {"requests": 0}

    def delivered_by_plan(self) -> dict[str, dict]:
        with self.lock:
            windows = {name: w.copy() for (kind, name), w in self.windows.items() if kind == "plan"}
        return {name: w.summary() for name, w in windows.items()}

    def measured_tok_s(self, tenant: str) -> float | None:
        """Median decode speed of the tenant's recent requests."""
        return (self.delivered("tenant", tenant).get("decode_tok_s") or {}).get("p50")

    def queued(self) -> int:
        """Requests accepted and not yet answered (waiting or running)."""
        with self.lock:
            return sum(len(q) for q in self.waiting.values()) + len(self.running)

    def queue_depth(self, tenant: str | None = None) -> int:
        with self.lock:
            return sum(len(q) for t, q in self.waiting.items() if tenant in (None, t))

    def running_count(self, tenant: str | None = None) -> int:
        with self.lock:
            return sum(1 for r in self.running.values() if tenant in (None, r.tenant))

    # --- reconciling toward the desired plan -----------------------------------------------------
    def want(self, desired: Desired | None) -> None:
        """The plan to move to at the next step boundary."""
        with self.lock:
            self.desired = desired

    def settled(self) -> bool:
        with self.lock:
            return self.desired is None or self._plan_id(self.engine.plan) == self.desired.plan_id

    def reconcile(self, budget_bytes: int | None = None) -> None:
        """Apply the desired plan if it is not the one served (between two decode steps)."""
        with self.lock:
            if self.settled():
                return
            desired = self.desired
            before = self._plan_id(self.engine.plan)
            report = self.engine.apply(self.plans[desired.plan_id])
            self.reconfigurations += 1
            self.history.append({"at": time.time(), "from": before, "to": desired.plan_id, "reason": desired.reason,
                                 "experts_moved": report.moves, "bytes_to_accel": report.bytes_to_accel,
                                 "requantized": report.requantized, "seconds": report.seconds,
                                 "budget_bytes": budget_bytes, "running": len(self.running)})

    # --- requests ------------------------------------------------------------------------------
    def submit(self, tenant: str, prompt: str, max_new_tokens: int = 32, *, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, stop: str | list[str] | None = None,
               timeout_s: float | None = None) -> Request:
        """Accept a request or refuse it at once (Rejected, naming the limit or the bad field).
        `timeout_s`: past it the request ends (finish_reason "timeout") with what it has."""
        self.check_tenant(tenant)  # unknown tenant: a clear error for this request
        if not isinstance(prompt, str) or not prompt:
            raise Rejected("prompt must be a non-empty string")
        if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                      or not 0 < timeout_s < float("inf")):
            raise Rejected(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        lim = self.limits
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise Rejected(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if max_new_tokens > lim.max_new_tokens:
            raise Rejected(f"max_new_tokens={max_new_tokens} is above this server's limit of {lim.max_new_tokens}")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
            raise Rejected(f"stop must be a non-empty string or a list of up to 4 of them, got {stop!r}")
        try:
            sampling = Sampling(temperature, top_p, seed, tuple(eos_ids(self.tokenizer.eos_token_id)))
        except ValueError as err:
            raise Rejected(str(err)) from None
        with self._tok_lock:
            ids = self.tokenizer.encode(prompt)
        if not ids:
            raise Rejected("the prompt is empty after tokenization")
        room = self.decoder.scratch  # positions a sequence may use
        if len(ids) + max_new_tokens > room:
            raise Rejected(f"the prompt is {len(ids)} tokens and max_new_tokens is {max_new_tokens}: together "
                           f"above the {room} positions of this server's context; shorten the prompt or ask "
                           f"for fewer tokens")
        with self.lock:
            if not self.serving:
                raise Stopping("the server is stopping; no new requests are accepted")
            if self.queue_depth() >= lim.max_queue:
                raise QueueFull(f"queue full: {lim.max_queue} requests are waiting; retry later")
            self._ids += 1
            req = Request(self._ids, tenant, prompt, ids, max_new_tokens, sampling, stops, timeout_s)
            if not self.waiting.get(tenant) and tenant not in {r.tenant for r in self.running.values()}:
                # a tenant coming back starts level with the others (no credit for idle time)
                shares = [self.served_share.get(t, 0.0) for t in self.active_tenants()]
                self.served_share[tenant] = max(self.served_share.get(tenant, 0.0), min(shares, default=0.0))
            self.waiting.setdefault(tenant, deque()).append(req)
            self.wake.notify()
        return req

    # --- the loop ------------------------------------------------------------------------------
    def serve_forever(self, between_steps) -> None:
        """Serve until stopped; `between_steps()` runs before every step (where the plan may change).
        Before the first request is served, the first plan's kernels are compiled at every prefill
        size and its decode graphs captured (Decoder.warm_up). With the model on the CPU, torch runs
        `limits.cpu_threads` threads meanwhile."""
        with torch_threads(self.limits.cpu_threads if self.engine.accel.type == "cpu" else 0):
            self._serve(between_steps)

    def _serve(self, between_steps) -> None:
        try:
            between_steps()
            t = time.perf_counter()
            if n := self.decoder.warm_up():
                log.info("captured %d decode graphs in %.1f s", n, time.perf_counter() - t)
        except Exception:  # serving eagerly (or compiling and capturing lazily) still works
            log.exception("warming up (compiling kernels, capturing decode graphs) failed")
        self.warmed.set()
        while self.serving:
            try:
                start = time.perf_counter()
                try:
                    between_steps()
                except Exception:  # (a failing reconfiguration) serving goes on with the plan held
                    self.hook_failures += 1
                    if self.hook_failures & (self.hook_failures - 1) == 0:  # logged at 1, 2, 4, 8, ... failures
                        log.exception("the between-steps hook failed (%d times); serving on", self.hook_failures)
                with self.lock:
                    self._note_plan()
                    self._drop_cancelled()
                    self._admit()
                    busy = bool(self.running)
                    if not busy:
                        self.wake.wait(0.05)
                        continue
                self._prefill_chunks()
                self._decode_step()
                with self.lock:
                    self.counters["iterations"] += 1
                    self.counters["busy_s"] += time.perf_counter() - start
            except Exception as err:  # answer what was running with the error; keep serving
                log.exception("serving step failed")
                with self.lock:
                    for slot in list(self.running):
                        self._end(slot, error=err)
        self._answer_all("the server stopped")

    def _note_plan(self) -> None:
        """Running requests record a plan they are served by when it changes (admission records
        the plan of the moment)."""
        plan = self.engine.plan
        if plan is None or plan is self._noted_plan:
            return
        self._noted_plan = plan
        plan_id = self._plan_id(plan)
        for r in self.running.values():
            if not r.plan_ids or r.plan_ids[-1] != plan_id:
                r.plan_ids.append(plan_id)

    def _pick_tenant(self) -> str | None:
        """The waiting tenant furthest behind its fair share (tokens admitted over its weight,
        2^priority: a priority-2 tenant gets twice a priority-1's), the higher priority on a tie.
        A flood raises only the flooding tenant's share, so it cannot starve another."""
        candidates = [t for t, q in self.waiting.items() if q]
        # admission control: tenants the controller holds back wait while they run `admit` sequences
        # between them (it lifts the hold once the tenants it protects are idle or safe)
        held = self._held()
        if held and sum(r.tenant in held for r in self.running.values()) >= self.desired.admit:
            candidates = [t for t in candidates if t not in held]
        if not candidates:
            return None
        return min(candidates, key=lambda t: (self.served_share.get(t, 0.0), -self.priority(t)))

    def _admit(self) -> None:
        free = self.decoder.free_slots()
        while free:
            tenant = self._pick_tenant()
            if tenant is None:
                return
            req = self.waiting[tenant].popleft()
            weight = 2.0 ** self.priority(tenant)
            self.served_share[tenant] = self.served_share.get(tenant, 0.0) + \
                (len(req.prompt_ids) + req.max_new_tokens) / weight
            slot = free.pop(0)  # the lowest: keeps decode batches small
            self.decoder.open(slot, req.sampling)
            req.slot = slot
            self.running[slot] = req
            if self.engine.plan is not None:
                req.plan_ids.append(self._plan_id(self.engine.plan))

    def _prefill_chunks(self) -> None:
        """Prefill waiting prompts, oldest first, within this step's token budget (what the decode
        step leaves of max_batched_tokens): a long prompt is prefilled over several steps. The
        chunks are packed into forwards of up to prefill_chunk rows, several prompts each, since a
        forward reads every expert once however many prompts it carries; requests that arrive
        meanwhile are admitted and prefilled while budget is left, so a burst gets its first
        tokens before the next decode step."""
        with self.lock:
            budget = self.limits.max_batched_tokens - len(self.decoder.decoding)
        rows = self.decoder.prefill_chunk
        while budget > 0:
            with self.lock:
                self._admit()
                # tenants held back come last, in forwards of their own: a protected tenant's first
                # token never waits for a held one's long prompt
                held = self._held()
                prefilling = sorted((r for r in self.running.values()
                                     if r.first_token_at is None and r.prefilled < len(r.prompt_ids)),
                                    key=lambda r: (r.tenant in held, r.id))
            chunks = []  # (request, start, end): this round's share of the budget, oldest first
            for req in prefilling:
                if budget <= 0:
                    break
                n = min(budget, len(req.prompt_ids) - req.prefilled)
                chunks.append((req, req.prefilled, req.prefilled + n))
                budget -= n
            if not chunks:
                return
            # a chunk that overflows a forward goes on in the next one; held tenants' chunks (sorted
            # last) go in forwards of their own
            for group in ([c for c in chunks if c[0].tenant not in held], [c for c in chunks if c[0].tenant in held]):
                for pack in pack_chunks(group, rows):
                    self._prefill_pack(pack)

    def _prefill_pack(self, pack: list[tuple[Request, int, int]]) -> None:
        """One prefill forward of the chunks (request, start, end) of `pack`; the requests whose
        prompts it completes get their first tokens (one host sync for all of them). When a packed
        forward fails, its chunks are prefilled one by one, so a request fails alone."""
        dec = self.decoder
        t = time.perf_counter()
        with self.lock:  # (a request that failed in an earlier forward of this step is gone)
            pack = [c for c in pack if self.running.get(c[0].slot) is c[0]]
        if not pack:
            return

        def forward(items):
            return dec.prefill_many([(r.slot, r.prompt_ids[a:b], a) for r, a, b in items])

        try:
            done = list(zip(pack, forward(pack)))
            forwards = 1
        except Exception as err:
            if len(pack) == 1:
                log.exception("prefill failed")
                with self.lock:
                    self._end(pack[0][0].slot, error=err)
                return
            log.exception("a prefill of %d packed prompts failed; prefilling them one by one", len(pack))
            done, forwards = [], 1 + len(pack)
            for item in pack:
                try:
                    done.append((item, forward([item])[0]))
                except Exception as one:  # this request fails alone
                    log.exception("prefill failed")
                    with self.lock:
                        self._end(item[0].slot, error=one)
        for (req, _, end), _ in done:
            req.prefilled = end
        firsts = [(req, row) for (req, _, end), row in done if end == len(req.prompt_ids)]
        tokens = self._first_tokens(firsts)
        now = time.time()
        with self.lock:
            for (req, _), tok in zip(firsts, tokens):
                if tok is None:
                    continue
                req.first_token_at = now
                if req.tenant not in self._held():  # (a held one's wait is imposed)
                    self.measured_ttfts.append((self._plan_id(self.engine.plan), now - req.accepted_at))
                try:
                    if not self._take(req, tok):
                        dec.feed(req.slot, tok, len(req.prompt_ids))
                except Exception as err:  # this request fails alone
                    log.exception("taking the first token failed")
                    if self.running.get(req.slot) is req:
                        self._end(req.slot, error=err)
            c = self.counters
            c["prefill_forwards"] += forwards
            c["prefill_tokens"] += sum(b - a for (_, a, b), _ in done)
            c["prefill_s"] += time.perf_counter() - t

    def _first_tokens(self, firsts: list[tuple[Request, torch.Tensor]]) -> list[int | None]:
        """The first token of each (request, its logits [V]), one host sync for all; None for a
        request whose sampling failed (it ends with the error, alone)."""
        if not firsts:
            return []
        try:
            return self.decoder.sample_many([r.slot for r, _ in firsts], torch.stack([row for _, row in firsts]))
        except Exception as err:
            if len(firsts) == 1:
                log.exception("sampling the first token failed")
                with self.lock:
                    self._end(firsts[0][0].slot, error=err)
                return [None]
            log.exception("sampling %d first tokens failed; sampling them one by one", len(firsts))
        out = []
        for req, row in firsts:
            try:
                out.append(int(self.decoder.sample(req.slot, row)))
            except Exception as err:
                log.exception("sampling the first token failed")
                with self.lock:
                    self._end(req.slot, error=err)
                out.append(None)
        return out

    def _decode_step(self) -> None:
        if not self.decoder.decoding:
            return
        t = time.perf_counter()
        new = self.decoder.step()
        took = time.perf_counter() - t
        self.steps += 1
        with self.lock:
            self.measured_steps.append((self._plan_id(self.engine.plan), len(new), took))
            for slot, tok in new.items():
                self._take(self.running[slot], tok)
            c = self.counters
            c["decode_steps"] += 1
            c["decode_tokens"] += len(new)
            c["decode_s"] += took

    def _take(self, req: Request, tok: int) -> bool:
        """Give `req` its next token; end it if that was its last. Whether it ended."""
        req.tokens.append(tok)
        req._events.put(tok)
        reason = None
        if tok in req.sampling.stop_token_ids or (req.stop and self._hits_stop(req)):
            reason = "stop"
        elif len(req.tokens) >= req.max_new_tokens:
            reason = "length"
        if reason is not None:
            self._end(req.slot, reason)
        return reason is not None

    def _hits_stop(self, req: Request) -> bool:
        if req._stop_text is None:
            req._stop_text = StopText(self.tokenizer, req.stop)
        return req._stop_text.hit(req.tokens)

    def _drop_cancelled(self) -> None:
        """End cancelled requests and those past their deadline, running or waiting."""
        now = time.time()

        def why(req: Request) -> str | None:
            if req.cancelled:
                return "cancelled"
            return "timeout" if req.deadline is not None and now > req.deadline else None

        for slot, req in list(self.running.items()):
            if reason := why(req):
                self._end(slot, reason)
        for q in self.waiting.values():
            for req in [r for r in q if why(r)]:
                q.remove(req)
                req._finish(self._result(req, why(req)))

    def _end(self, slot: int, reason: str = "error", error: BaseException | None = None) -> None:
        req = self.running.pop(slot)
        self.decoder.close(slot)
        if error is not None:
            req._finish(error=error)
            return
        result = self._result(req, reason)
        if reason in ("stop", "length"):  # what a finished request got (a cancelled one says little)
            for key in (("tenant", req.tenant), ("plan", result["plan_id"])):
                self.windows.setdefault(key, Window()).add(result)
        req._finish(result)

    def _result(self, req: Request, reason: str) -> dict:
        now = time.time()
        text = self.tokenizer.decode(req.tokens)
        if reason == "stop" and req.stop:  # the text ends before the stop string
            cut = min((text.find(s) for s in req.stop if s in text), default=-1)
            text = text[:cut] if cut >= 0 else text
        n = len(req.tokens)
        decode_s = now - req.first_token_at if req.first_token_at else None
        return {
            "id": req.id, "tenant": req.tenant, "prompt": req.prompt, "text": text, "finish_reason": reason,
            "prompt_tokens": len(req.prompt_ids), "new_tokens": n, "latency_s": now - req.accepted_at,
            "ttft_s": req.first_token_at - req.accepted_at if req.first_token_at else None,
            "decode_tok_s": (n - 1) / decode_s if n > 1 and decode_s else None,
            "tpot_ms": 1000 * decode_s / (n - 1) if n > 1 and decode_s else None,
            "plan_id": req.plan_ids[-1] if req.plan_ids else None, "plan_ids": list(req.plan_ids),
        }

    def _answer_all(self, why: str) -> None:
        with self.lock:
            for slot in list(self.running):
                self._end(slot, "aborted")
            for q in self.waiting.values():
                while q:
                    req = q.popleft()
                    req._finish(error=Rejected(f"{why} before request {req.id} was served"))

    def stop(self) -> None:
        """Stop serving: nothing new is accepted; what was accepted is answered (running requests
        with what they have, waiting ones with an error)."""
        with self.lock:
            self.serving = False
            self.wake.notify_all()
