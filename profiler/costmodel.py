"""A throughput model: predicts batch-1 decode tok/s of any plan in milliseconds (2.8 ms measured on a
Mixtral-shaped plan: a router trace replayed through the plan's fetch LRU).

Calibrated once per model and machine from a few real decodes of uniform plans (see calibrate), and
shaped like the engine's decode path:
- non-expert time per token (attention, router, norms, sampling);
- accelerator experts: without fused kernels, a cost per routed call at each precision; with them
  (CUDA), each layer launches one kernel pair per precision its plan keeps on the accelerator, so
  the cost is a launch per precision present plus a per-call term for the experts routed to it;
- a layer whose plan has any expert outside the kernels (host experts, precisions without a
  kernel) syncs with the host and loops over its routed experts: a fixed cost per such layer;
- host experts: a cost per call computed on the host (`cpu`), or per call on a fetch slot plus,
  on a miss, one copy (a fixed cost plus bytes over the measured host-to-accelerator bandwidth);
- a router trace (which experts each token picks in each layer) from calibration text, on which
  each plan's LRU of fetch slots is simulated to count misses;
- attention projections at 8 or 4 bits (Plan.attn_bits): what a decode with them takes beside
  one with the 16-bit ones, per token (faster or slower: their own kernels, or dequantizing).

Which path serves each expert and which layers leave the kernels come from `placement.tiers`, the
table the engine serves by. Speculative prefetch is not modelled: a plan with it is predicted as the
same plan without.
"""

from __future__ import annotations

import statistics
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import torch

from catalog.knobs import ATTN_BITS
from placement import kernels
from placement.decode import Decoder
from placement.plan import BITS, ExpertId, ExpertState, Plan
from placement.tiers import ACCEL, CPU, in_kernels, leaves_kernels, serving_path


@dataclass(frozen=True)
class CostModel:
    nonexpert_s: float  # per decoded token
    accel_s: dict  # bits -> seconds per routed accelerator call (fused bits: per call beyond the launch)
    host_s: dict  # bits -> seconds per expert call on the host, activations moved included
    copy_bytes_per_s: float  # host -> fetch slot
    trace: tuple  # per token: per MoE layer, the routed expert ids
    expert_bytes: dict  # bits -> packed bytes of one expert
    fetch_s: dict = field(default_factory=dict)  # bits -> per call on a fetch slot (default: accel_s)
    copy_fixed_s: float = 0.0  # per copy, beside its bytes
    fused_bits: tuple = ()  # precisions run as fused kernels on the accelerator (CUDA)
    launch_s: float = 0.0  # per (layer, fused precision the layer's plan holds)
    eager_layer_s: float = 0.0  # per layer whose plan holds experts outside the fused kernels
    attn_s: dict = field(default_factory=dict)  # attention bits -> seconds per token beside 16-bit attention

    def copy_s(self, bits: int) -> float:
        return self.copy_fixed_s + self.expert_bytes[bits] / self.copy_bytes_per_s

    def predict_s(self, plan: Plan) -> float:
        """Seconds per decoded token under `plan`, from the trace."""
        fused = set(self.fused_bits)
        # per layer, what the engine launches whatever the routing: a kernel pair per fused
        # precision on the accelerator, and the host sync when anything runs outside the kernels
        # (without kernels every call is in the per-call terms: no layer "leaves" them)
        fixed = 0.0
        for row in plan.states:
            present = {s.bits for s in row if in_kernels(s, fused)}
            eager = bool(fused) and leaves_kernels(row, fused)
            fixed += self.launch_s * len(present) + (self.eager_layer_s if eager else 0.0)
        lru: OrderedDict = OrderedDict()
        slots = plan.slots_used()
        total = 0.0
        for token in self.trace:
            for layer, experts in enumerate(token):
                for e in experts:
                    s = plan.states[layer][e]
                    path = serving_path(s, plan.offload)
                    if path == ACCEL:
                        total += self.accel_s[s.bits]
                    elif path == CPU:
                        total += self.host_s[s.bits]
                    else:  # FETCH
                        key = (layer, e)
                        if key in lru:
                            lru.move_to_end(key)
                        else:
                            total += self.copy_s(s.bits)
                            lru[key] = True
                            if len(lru) > slots:
                                lru.popitem(last=False)
                        total += self.fetch_s.get(s.bits, self.accel_s[s.bits])
        return self.nonexpert_s + self.attn_s.get(plan.attn_bits, 0.0) + fixed + total / len(self.trace)

    def predict_tok_s(self, plan: Plan) -> float:
        return 1.0 / self.predict_s(plan)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["trace_tokens"] = len(self.trace)
        del d["trace"]
        return d


def decode_s(engine, plan: Plan, prompt: list[int], new_tokens: int, repeats: int = 3) -> tuple[float, float]:
    """Median seconds per decoded token under `plan` through the serving decoder at batch 1 (after a
    warm-up), and fetch misses per token."""
    engine.apply(plan)
    decoder = Decoder(engine.model, engine, max_seqs=1, max_len=len(prompt) + new_tokens + 1)
    decoder.generate([prompt], new_tokens, fixed_length=True)
    engine.reset_stats()
    runs = [decoder.generate([prompt], new_tokens, fixed_length=True).sequences[0] for _ in range(repeats)]
    return statistics.median(1.0 / r.decode_tok_s for r in runs), engine.stats.fetch_misses / (repeats * new_tokens)


def uniform_plan(spec, bits: int, tier: str, offload: str = "fetch", cache_slots: int = 0, attn_bits: int = 16
                 ) -> Plan:
    states = tuple(tuple(ExpertState(bits, tier) for _ in range(spec.num_experts)) for _ in range(spec.num_layers))
    return Plan(states, offload, cache_slots, attn_bits=attn_bits)


@torch.no_grad()
def calibrate(engine, prompt: list[int], trace_ids: list[int], *, bits=BITS, new_tokens: int = 32,
              group_size: int = 64, trace_tokens: int = 256, attn_bits=ATTN_BITS) -> CostModel:
    """Fit the constants from real decodes of uniform plans (every expert at each precision on the
    accelerator; every expert on the host, computed there or fetched through slots that always hit
    or through one slot that always misses) and from timing the expert calls alone, which splits
    a decode into its non-expert and expert parts. Costs are decode-time differences divided by
    the calls (or layers) per token. Each quantized precision in `attn_bits` costs a decode of the
    all-16-bit plan with its attention projections at that precision."""
    spec = engine.spec
    L, calls = spec.num_layers, spec.num_layers * spec.top_k  # routed calls per decoded token at batch 1
    sizes = {b: engine.layout(b, group_size).nbytes for b in bits}
    fused = tuple(b for b in bits if b in engine.kernel_precisions(group_size, layer=0))
    sync = (lambda: torch.cuda.synchronize(engine.accel)) if engine.on_cuda else (lambda: None)

    def decode(b: int, tier: str, offload: str = "fetch", slots: int = 0) -> tuple[float, float]:
        return decode_s(engine, uniform_plan(spec, b, tier, offload, slots), prompt, new_tokens)

    base, _ = decode(16, "accel")
    attn_s = {b: decode_s(engine, uniform_plan(spec, 16, "accel", attn_bits=b), prompt, new_tokens)[0] - base
              for b in attn_bits if b != 16}
    if not fused:
        # Non-expert time: the all-16-bit decode less its expert calls, timed alone (two GEMMs each).
        call16 = _time(_eager_call(engine, group_size), 50, sync)
        nonexpert = max(base - calls * call16, 0.0)
        accel_s = {b: max(call16 + ((base if b == 16 else decode(b, "accel")[0]) - base) / calls, 0.0) for b in bits}
        host_s = {b: max((decode(b, "host", "cpu")[0] - nonexpert) / calls, 0.0) for b in bits}
        t, misses = decode(16, "host", "fetch", 1)
        copy_s = max((t - base) / max(misses, 1e-9), 1e-9)  # each miss adds one copy of a 16-bit expert
        trace = router_trace(engine, trace_ids[:trace_tokens])
        return CostModel(nonexpert, accel_s, host_s, sizes[16] / copy_s, trace, sizes, attn_s=attn_s)

    # Fused kernels: a layer's accelerator experts at one precision cost a launch plus a term per
    # routed call; both come from timing the layer's kernels alone, on the experts the uniform plan
    # made resident (launch: every slot empty).
    n = 200 if engine.on_cuda else 3  # (off CUDA the kernels run in Triton's slow interpreter)
    layer16 = _time(_fused_call(engine, 16, group_size, live=True), n, sync)
    launch = _time(_fused_call(engine, 16, group_size, live=False), n, sync)
    nonexpert = max(base - L * layer16, 0.0)
    k = spec.top_k
    accel_s = {16: max((layer16 - launch) / k, 0.0)}
    for b in fused:
        if b != 16:
            accel_s[b] = max(((decode(b, "accel")[0] - nonexpert) / L - launch) / k, 0.0)
    # Host experts: fetch slots that always hit (as many as experts) and one slot that always
    # misses give the per-layer cost of leaving the kernels, the per-call cost on a slot and the
    # cost of a copy, at 16 bits and at the smallest fused precision (two sizes: fixed + per byte).
    total = L * spec.num_experts
    small = min(fused)
    fetch_s, copy = {}, {}
    eager_layer = 0.0
    for b in dict.fromkeys((16, small)):
        hit, m_hit = decode(b, "host", "fetch", total)
        miss, m_miss = decode(b, "host", "fetch", 1)
        copy[b] = max((miss - hit) / max(m_miss - m_hit, 1e-9), 1e-9)
        layer_part = hit - nonexpert - m_hit * copy[b]  # L * eager_layer + calls * fetch_s[b]
        if b == 16:  # a call on a slot is one single-slot launch of the kernels
            fetch_s[16] = launch + accel_s[16]
            eager_layer = max((layer_part - calls * fetch_s[16]) / L, 0.0)
        else:
            fetch_s[b] = max((layer_part - L * eager_layer) / calls, 0.0)
    for b in fused:
        fetch_s.setdefault(b, fetch_s[16] + accel_s[b] - accel_s[16])
    if len(copy) == 2 and copy[16] > copy[small]:
        bw = (sizes[16] - sizes[small]) / (copy[16] - copy[small])
        fixed = max(copy[16] - sizes[16] / bw, 0.0)
    else:
        bw, fixed = sizes[16] / copy[16], 0.0
    # precisions without a kernel run in the per-expert loop, on the accelerator and the host alike
    for b in bits:
        if b not in fused:
            accel_s[b] = max((decode(b, "accel")[0] - nonexpert - L * eager_layer) / calls, 0.0)
    host_s = {b: max((decode(b, "host", "cpu")[0] - nonexpert - L * eager_layer) / calls, 0.0) for b in bits}
    return CostModel(nonexpert, accel_s, host_s, bw, router_trace(engine, trace_ids[:trace_tokens]), sizes,
                     fetch_s=fetch_s, copy_fixed_s=fixed, fused_bits=fused, launch_s=launch,
                     eager_layer_s=eager_layer, attn_s=attn_s)


def _eager_call(engine, group_size: int):
    """One 16-bit expert call through the per-expert path, on the accelerator (batch 1)."""
    x = torch.randn(1, engine.spec.hidden, dtype=engine.dtype, device=engine.accel)
    call = engine.expert_call(ExpertId(0, 0), 16, group_size)
    return lambda: call(x)


def _fused_call(engine, bits: int, group_size: int, live: bool):
    """Layer 0's fused kernels at batch 1 over top-k experts the current plan holds resident at
    `bits` (live), or over empty slots (the launch alone)."""
    spec = engine.spec
    k = spec.top_k
    x = torch.randn(1, spec.hidden, dtype=engine.dtype, device=engine.accel)
    bufs = [engine.resident_buffer(ExpertId(0, e)) if live else None for e in range(k)]
    table = kernels.expert_table(bufs, device=engine.accel)
    weights = torch.full((k,), 1.0 / k, device=engine.accel)
    tokens = torch.zeros(k, dtype=torch.int64, device=engine.accel)
    out = torch.zeros(1, spec.hidden, dtype=torch.float32, device=engine.accel)
    layout = engine.layout(bits, group_size)
    return lambda: kernels.moe_experts(x, table, weights, layout, slot_token=tokens, out=out)


def _time(fn, repeats: int, sync) -> float:
    """Seconds per call of fn() over `repeats` back-to-back calls after a warm-up (launches
    pipelined as in a decode; one sync at the end)."""
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t) / repeats


@torch.no_grad()
def router_trace(engine, ids: list[int]) -> tuple:
    """Which experts each token picks in each MoE layer: per token, per layer, the expert ids.
    Leaves the engine on the all-16-bit, all-accelerator plan."""
    engine.apply(uniform_plan(engine.spec, 16, "accel"))
    with engine.tracing() as trace:
        engine.model(torch.tensor([ids], device=next(engine.model.parameters()).device))
    per_layer = dict(trace)
    return tuple(tuple(tuple(per_layer[l][t].tolist()) for l in range(engine.spec.num_layers))
                 for t in range(len(ids)))
