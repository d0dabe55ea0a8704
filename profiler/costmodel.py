"""A throughput model: predicts batch-1 decode tok/s of any plan in well under a millisecond.

Calibrated once per model and machine from a few real decodes of uniform plans (see calibrate):
- non-expert time per token: the all-16-bit decode minus its expert calls;
- per-call expert time at each precision on the accelerator and on the host (`cpu` offload);
- the time of one fetch (a copy of an expert into a slot), from a decode that misses on every call;
- a router trace (which experts each token picks in each layer) from calibration text, on which
  each plan's LRU of fetch slots is simulated to count misses.

    time/token = non-expert + sum over routed calls of the call's time (+ a copy on a miss)
"""

from __future__ import annotations

import statistics
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch

from placement.engine import expert_forward
from placement.plan import BITS, ExpertId, ExpertState, Plan
from profiler.throughput import timed_generate


@dataclass(frozen=True)
class CostModel:
    nonexpert_s: float  # per decoded token
    accel_s: dict  # bits -> seconds per expert call on the accelerator (batch 1)
    host_s: dict  # bits -> seconds per expert call on the host, activations moved included
    copy_bytes_per_s: float  # host -> fetch slot
    trace: tuple  # per token: per MoE layer, the routed expert ids
    expert_bytes: dict  # bits -> packed bytes of one expert

    def predict_s(self, plan: Plan) -> float:
        """Seconds per decoded token under `plan`, from the trace."""
        lru: OrderedDict = OrderedDict()
        slots = plan.slots_used()
        total = 0.0
        for token in self.trace:
            for layer, experts in enumerate(token):
                for e in experts:
                    s = plan.states[layer][e]
                    if s.tier == "accel":
                        total += self.accel_s[s.bits]
                    elif plan.offload == "cpu":
                        total += self.host_s[s.bits]
                    else:
                        key = (layer, e)
                        if key in lru:
                            lru.move_to_end(key)
                        else:
                            total += self.expert_bytes[s.bits] / self.copy_bytes_per_s
                            lru[key] = True
                            if len(lru) > slots:
                                lru.popitem(last=False)
                        total += self.accel_s[s.bits]
        return self.nonexpert_s + total / len(self.trace)

    def predict_tok_s(self, plan: Plan) -> float:
        return 1.0 / self.predict_s(plan)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["trace_tokens"] = len(self.trace)
        del d["trace"]
        return d


def decode_s(engine, plan: Plan, prompt: list[int], new_tokens: int, repeats: int = 3) -> tuple[float, float]:
    """Median seconds per decoded token under `plan` (after a warm-up), and fetch misses per token."""
    engine.apply(plan)
    runs = [timed_generate(engine.model, prompt, new_tokens, fixed_length=True,
                           warmup_tokens=None if i == 0 else 0,
                           after_warmup=engine.reset_stats if i == 0 else None) for i in range(repeats)]
    return statistics.median(1.0 / r.decode_tok_s for r in runs), engine.stats.fetch_misses / (repeats * new_tokens)


def uniform_plan(spec, bits: int, tier: str, offload: str = "fetch", cache_slots: int = 0) -> Plan:
    states = tuple(tuple(ExpertState(bits, tier) for _ in range(spec.num_experts)) for _ in range(spec.num_layers))
    return Plan(states, offload, cache_slots)


@torch.no_grad()
def calibrate(engine, prompt: list[int], trace_ids: list[int], *, bits=BITS, new_tokens: int = 32,
              group_size: int = 64, trace_tokens: int = 256) -> CostModel:
    """Fit the constants from a few real decodes of uniform plans: every expert at each precision
    on the accelerator, every expert on the host (cpu), every expert fetched through one slot.
    Per-call costs are the decode-time differences divided by the routed calls per token."""
    spec = engine.spec
    calls = spec.num_layers * spec.top_k  # routed expert calls per decoded token at batch 1
    base, _ = decode_s(engine, uniform_plan(spec, 16, "accel"), prompt, new_tokens)
    # Non-expert time: the all-16-bit decode less its expert calls, timed alone (two GEMMs each).
    eid, x = ExpertId(0, 0), torch.randn(1, spec.hidden, dtype=engine.dtype, device=engine.accel)
    layout = engine.layout(16, group_size)
    views = layout.views(engine.masters[eid].to(engine.accel, copy=True))
    sync = (lambda: torch.cuda.synchronize(engine.accel)) if engine.on_cuda else (lambda: None)
    call16 = _time(lambda: expert_forward(layout, views, x, engine.act_fns[0], engine.quantizer.dequantize), 50, sync)
    nonexpert = max(base - calls * call16, 0.0)
    accel_s, host_s, sizes = {}, {}, {}
    for b in bits:
        sizes[b] = engine.layout(b, group_size).nbytes
        t = base if b == 16 else decode_s(engine, uniform_plan(spec, b, "accel"), prompt, new_tokens)[0]
        # timing noise can make a difference negative on tiny models: a call never costs less than 0
        accel_s[b] = max(call16 + (t - base) / calls, 0.0)
        t, _ = decode_s(engine, uniform_plan(spec, b, "host", "cpu"), prompt, new_tokens)
        host_s[b] = max((t - nonexpert) / calls, 0.0)
    t, misses = decode_s(engine, uniform_plan(spec, 16, "host", "fetch", 1), prompt, new_tokens)
    copy_s = max((t - base) / max(misses, 1e-9), 1e-9)  # each miss adds one copy of a 16-bit expert
    trace = router_trace(engine, trace_ids[:trace_tokens])
    engine.apply(uniform_plan(spec, 16, "accel"))
    return CostModel(nonexpert, accel_s, host_s, sizes[16] / copy_s, trace, sizes)


def _time(fn, repeats: int, sync) -> float:
    fn()  # warm
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def router_trace(engine, ids: list[int]) -> tuple:
    """Which experts each token picks in each MoE layer: per token, per layer, the expert ids."""
    engine.apply(uniform_plan(engine.spec, 16, "accel"))
    engine.trace = []
    try:
        engine.model(torch.tensor([ids], device=next(engine.model.parameters()).device))
        per_layer = dict(engine.trace)
    finally:
        engine.trace = None
    return tuple(tuple(tuple(per_layer[l][t].tolist()) for l in range(engine.spec.num_layers))
                 for t in range(len(ids)))
