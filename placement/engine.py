"""The expert engine: serves every routed expert of a Hugging Face MoE model at the precision and
on the tier a Plan gives it, and moves experts when the plan changes.

Storage, per expert:
- host: the 16-bit master (always) and every quantized variant derived so far, one packed buffer
  each (pinned when there is CUDA), so any precision can be re-derived and returning to an earlier
  plan quantizes nothing;
- accelerator: one packed buffer for each accelerator-tier expert, plus, for `fetch` offloading,
  `cache_slots` buffers that hold recently used host experts (an LRU);
- host, for `cpu` offloading: each quantized host expert's matrices, dequantized on first use and
  kept while the plan serves it so.
Without CUDA the accelerator is the CPU: the same code paths run and bytes are still kept per tier.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from placement import kernels
from placement.adapters import adapter_for
from placement.packed import Layout, expert_layout, pack
from placement.plan import BITS, PREFETCH_SLOTS_PER_TOP_K, ExpertId, ExpertState, Plan, diff

log = logging.getLogger(__name__)

# Up to this many tokens per forward (decode, small batches) accelerator experts run as fused
# dequantize-and-multiply kernels; longer inputs (prefill, perplexity) use dequantize-then-matmul.
KERNEL_MAX_TOKENS = 8


@dataclass
class EngineStats:
    expert_calls: int = 0
    fetch_hits: int = 0
    fetch_misses: int = 0
    bytes_fetched: int = 0  # demand misses and prefetches
    cpu_calls: int = 0
    prefetch_issued: int = 0  # experts copied ahead on the next layer's router applied early
    prefetch_hits: int = 0  # ... that were then routed to before being evicted
    kernel_layers: int = 0  # layer calls that ran accelerator experts as fused kernels

    @property
    def hit_rate(self) -> float | None:
        lookups = self.fetch_hits + self.fetch_misses
        return self.fetch_hits / lookups if lookups else None

    @property
    def prefetch_accuracy(self) -> float | None:
        return self.prefetch_hits / self.prefetch_issued if self.prefetch_issued else None

    def as_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate, "prefetch_accuracy": self.prefetch_accuracy}


@dataclass(frozen=True)
class ApplyReport:
    plan_id: str
    moves: int  # experts whose state changed
    loaded: int  # experts copied onto the accelerator
    evicted: int  # experts dropped from the accelerator
    requantized: int  # variants derived from the 16-bit master (the rest came from the host cache)
    bytes_to_accel: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (shared ones, like tied embeddings, counted once)."""
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


class EngineExperts(nn.Module):
    """Drop-in replacement for a family's fused experts module (same call signature).

    Holds no parameters, so moving the model between devices never touches the experts.
    """

    def __init__(self, engine: Engine, layer: int, num_experts: int):
        super().__init__()
        self.engine = engine
        self.layer = layer
        self.num_experts = num_experts

    def forward(self, hidden_states, top_k_index, top_k_weights):
        # hidden_states [T, H]; top_k_index, top_k_weights [T, k]
        eng, layer = self.engine, self.layer
        flat = top_k_index.flatten()
        eng.routed[layer].index_add_(0, flat, torch.ones_like(flat))  # no host sync (CUDA-graph safe)
        if eng.trace is not None:  # routing per token, for cache simulations
            eng.trace.append((layer, top_k_index.detach().cpu()))
        if not eng.kernel_path(hidden_states.shape[0]):
            out = torch.zeros_like(hidden_states)
            self._per_expert(hidden_states, top_k_index, top_k_weights, out, None)
            return out
        # Decode: accelerator experts run as fused kernels over all (token, expert) slots at once,
        # one launch pair per precision present in the layer, reading expert addresses from a
        # device table (no host sync, so the step can be a CUDA graph); only host experts and
        # precisions without a kernel go through the per-expert loop.
        eng.stats.kernel_layers += 1
        T, k = top_k_index.shape
        out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        tokens = torch.arange(T, device=flat.device).repeat_interleave(k)
        for bits in eng.fast_bits[layer]:
            kernels.moe_experts(hidden_states, eng.tables[bits][layer][flat], top_k_weights.flatten(),
                                eng.layout(bits, eng.plan.group_size), slot_token=tokens, out=out)
        if eng.layer_eager[layer]:
            self._per_expert(hidden_states, top_k_index, top_k_weights, out, eng.eager_mask[layer])
        else:
            guesses = eng.guess_next(layer, hidden_states)
            if guesses is not None:
                eng.prefetch(layer + 1, guesses.tolist())
        return out.to(hidden_states.dtype)

    def _per_expert(self, hidden_states, top_k_index, top_k_weights, out, only):
        """Run each routed expert (those in the mask `only`, if given) on its rows, adding into out."""
        eng, layer = self.engine, self.layer
        hit = torch.zeros(self.num_experts, dtype=torch.bool, device=top_k_index.device)
        hit[top_k_index.flatten()] = True
        if only is not None:
            hit &= only
        experts = hit.nonzero().flatten()
        guesses = eng.guess_next(layer, hidden_states)
        if guesses is not None:  # one host sync for both lists
            both = torch.cat([experts, experts.new_full((1,), -1), guesses]).tolist()
            cut = both.index(-1)
            experts, guesses = both[:cut], both[cut + 1:]
        else:
            experts = experts.tolist()  # the one host sync per layer
        for e in experts:
            # (k, T) order as in transformers, so per-row GEMMs see the same rows in the same order
            pos, token_idx = torch.where((top_k_index == e).T)
            if eng.capture is not None:
                eng.record(layer, e, hidden_states[token_idx], top_k_weights[token_idx, pos])
            y = eng.run_expert(layer, e, hidden_states[token_idx])
            y = y * top_k_weights[token_idx, pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        if guesses:  # after this layer's own copies and compute are queued
            eng.prefetch(layer + 1, guesses)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}"


def expert_weights(layout: Layout, views: dict, dequantize) -> dict[str, torch.Tensor]:
    """An expert's matrices by name ([2I, H] gate_up, [H, I] down) from its packed views,
    dequantizing quantized ones."""
    w = {}
    for name, shape in layout.matrices:
        if layout.bits == 16:
            w[name] = views[name]
        else:
            w[name] = dequantize(
                views[f"{name}.W_q"], views[f"{name}.scale"], views[f"{name}.zero"],
                bits=layout.bits, group_size=layout.group_size, shape=shape, compute_dtype=layout.dtype,
            )
    return w


def gated_forward(w: dict[str, torch.Tensor], x: torch.Tensor, act_fn) -> torch.Tensor:
    """A gated expert with matrices `w` on x [n, H] -> [n, H]."""
    gate, up = F.linear(x, w["gate_up"]).chunk(2, dim=-1)  # [n, I] each
    return F.linear(act_fn(gate) * up, w["down"])


def expert_forward(layout: Layout, views: dict, x: torch.Tensor, act_fn, dequantize) -> torch.Tensor:
    """A gated expert on x [n, H] -> [n, H], from its packed views (dequantizing quantized ones)."""
    return gated_forward(expert_weights(layout, views, dequantize), x, act_fn)


class Engine:
    """Takes over the routed experts of `model` (in place) and serves them by plan."""

    def __init__(self, model: nn.Module, *, accel=None, quantizer=None, pin: bool | None = None,
                 use_kernels: bool | None = None):
        if quantizer is None:
            from placement import hqq_backend as quantizer
        self.quantizer = quantizer
        self.adapter = adapter_for(model.config)
        self.spec = self.adapter.spec(model)
        self.accel = torch.device(accel if accel is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.on_cuda = self.accel.type == "cuda"
        self.pin = self.on_cuda if pin is None else pin
        self.host = torch.device("cpu")
        self.dtype = self.spec.dtype
        self.model = model
        self.plan: Plan | None = None
        self.stats = EngineStats()
        self.routed = torch.zeros(self.spec.num_layers, self.spec.num_experts, dtype=torch.long, device=self.accel)

        self.masters: dict[ExpertId, torch.Tensor] = {}  # 16-bit packed buffers, host
        self.variants: dict[tuple[ExpertId, int, int], torch.Tensor] = {}  # (eid, bits, group) -> host buffer
        self.resident: dict[ExpertId, tuple[Layout, torch.Tensor, dict]] = {}  # accelerator tier
        self.slots: list[torch.Tensor] = []  # fetch slots on the accelerator
        self.slot_views: list[tuple[Layout, dict] | None] = []
        self.lru: OrderedDict[tuple[ExpertId, int], int] = OrderedDict()  # (eid, bits) -> slot
        self._host_views: dict[tuple[ExpertId, int, int], dict] = {}
        # `cpu` offload: dequantized matrices of quantized host experts, (eid, bits, group) ->
        # {name: matrix}, filled on first use and kept while the plan serves them so from the host
        # (hqq's CPU dequantization of a whole expert on every call costs far more than the matmuls)
        self.host_weights: dict[tuple[ExpertId, int, int], dict[str, torch.Tensor]] = {}
        self.act_fns = []  # per MoE layer
        # expert -> routed inputs [n, H] and routing weights [n], while capturing (see record)
        self.capture: dict[ExpertId, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self.capture_limit = 0
        self.trace: list[tuple[int, torch.Tensor]] | None = None  # (layer, top_k_index [T, k]) while tracing
        # Fused kernels by default on CUDA only (on the CPU they run in Triton's slow interpreter).
        self.use_kernels = (self.on_cuda if use_kernels is None else use_kernels) and kernels.available(self.accel)
        if use_kernels and not self.use_kernels:
            log.warning("fused expert kernels are not available on %s (is triton installed?)", self.accel)
        self.prefetched: set[tuple[ExpertId, int]] = set()  # in a slot ahead of use, not used yet
        # fetches run on a side stream so they overlap compute; per slot, "ready" orders compute
        # after its copy and "free" orders the next copy into the slot after that compute
        self.copy_stream = torch.cuda.Stream(self.accel) if self.on_cuda else None
        self.slot_ready: list = []
        self.slot_free: list = []
        self.slot_table = torch.zeros(0, dtype=torch.int64, device=self.accel)  # slot buffer addresses
        # per precision, [layers, experts] addresses of accelerator experts run by the fused kernels
        # (0: not at that precision); updated in place so captured CUDA graphs stay valid
        L, E = self.spec.num_layers, self.spec.num_experts
        self.tables = {b: torch.zeros(L, E, dtype=torch.int64, device=self.accel) for b in kernels.BITS}
        self.eager_mask = torch.ones(L, E, dtype=torch.bool, device=self.accel)  # not run by the kernels
        self.fast_bits: list[tuple[int, ...]] = [()] * L
        self.layer_eager = [True] * L
        self._supported: dict[tuple, bool] = {}
        self.gates = []  # per MoE layer, the router (its weight guesses the next layer's experts)
        self.host_layers = [False] * L  # MoE layers with host experts under the current plan

        layout16 = self.layout(16, 64)
        for l, (_, block) in enumerate(self.adapter.moe_blocks(model)):
            fused = block.experts
            for e in range(self.spec.num_experts):
                self.masters[ExpertId(l, e)] = pack(
                    layout16, {"gate_up": fused.gate_up_proj[e], "down": fused.down_proj[e]}, pin=self.pin
                )
            block.experts = EngineExperts(self, l, self.spec.num_experts)
            self.act_fns.append(fused.act_fn)
            self.gates.append(getattr(block, "gate", None))
            del fused
        model.to(self.accel)
        self.nonexpert_bytes = tensor_bytes([*model.parameters(), *model.buffers()])
        if self.on_cuda:
            torch.cuda.empty_cache()

    # --- storage ------------------------------------------------------------------------------
    def layout(self, bits: int, group_size: int) -> Layout:
        return expert_layout(self.spec.hidden, self.spec.intermediate, bits, self.dtype, group_size)

    def host_buffer(self, eid: ExpertId, bits: int, group_size: int) -> tuple[torch.Tensor, bool]:
        """The host buffer of `eid` at `bits`, quantizing from the master if it is not cached yet.
        Returns (buffer, whether it was quantized now)."""
        if bits == 16:
            return self.masters[eid], False
        key = (eid, bits, group_size)
        if key in self.variants:
            return self.variants[key], False
        master = self.layout(16, group_size).views(self.masters[eid])
        device = self.accel if self.on_cuda else self.host
        tensors = {}
        for name, _ in self.layout(bits, group_size).matrices:
            q = self.quantizer.quantize(master[name], bits, group_size, self.dtype, device)
            tensors.update({f"{name}.{k}": v for k, v in q.items()})
        self.variants[key] = pack(self.layout(bits, group_size), tensors, pin=self.pin)
        return self.variants[key], True

    def _host_views_of(self, eid: ExpertId, bits: int, group_size: int) -> dict:
        key = (eid, bits, group_size)
        if key not in self._host_views:
            buf, _ = self.host_buffer(eid, bits, group_size)
            self._host_views[key] = self.layout(bits, group_size).views(buf)
        return self._host_views[key]

    def _host_weights_of(self, eid: ExpertId, bits: int, group_size: int) -> dict[str, torch.Tensor]:
        """The matrices a `cpu`-offloaded host expert computes with: views of its 16-bit buffer, or
        its quantized variant dequantized once (exactly what dequantizing on every call gives)."""
        views = self._host_views_of(eid, bits, group_size)
        if bits == 16:
            return views
        key = (eid, bits, group_size)
        if key not in self.host_weights:
            self.host_weights[key] = expert_weights(self.layout(bits, group_size), views, self.quantizer.dequantize)
        return self.host_weights[key]

    def _to_accel(self, buf: torch.Tensor) -> torch.Tensor:
        dev = torch.empty(buf.numel(), dtype=torch.uint8, device=self.accel)
        return dev.copy_(buf, non_blocking=self.pin)

    # --- serving ------------------------------------------------------------------------------
    def configure(self, *, use_kernels: bool | None = None) -> None:
        """Switch the fused kernels on or off (for side-by-side comparisons); speculative prefetch
        is a knob of the plan (`Plan.prefetch`)."""
        if use_kernels is not None:
            self.use_kernels = use_kernels and kernels.available(self.accel)
            self._supported.clear()
            if self.plan is not None:
                self._refresh_tables()

    def kernel_path(self, tokens: int) -> bool:
        """Whether a layer call on `tokens` rows runs its accelerator experts as fused kernels."""
        return self.use_kernels and self.plan is not None and self.capture is None and tokens <= KERNEL_MAX_TOKENS

    def kernel_supported(self, layout: Layout, layer: int) -> bool:
        """Whether experts of `layout` in MoE layer `layer` run in the fused kernels at decode."""
        key = (layout, layer)
        if key not in self._supported:
            self._supported[key] = self.use_kernels and kernels.supports(layout, self.act_fns[layer])
        return self._supported[key]

    @property
    def capturable(self) -> bool:
        """A decode step never syncs with the host (every expert runs in a fused kernel), so it can
        be captured in a CUDA graph; `kernel_signature` changes when a new capture is needed."""
        return self.on_cuda and self.use_kernels and self.plan is not None and not any(self.layer_eager)

    @property
    def kernel_signature(self) -> tuple:
        return self.plan.group_size if self.plan else None, tuple(self.fast_bits), tuple(self.layer_eager)

    def run_expert(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Expert `expert` of MoE layer `layer` on x [n, H], served as the current plan says."""
        if self.plan is None:
            raise RuntimeError("the engine has no plan yet: call engine.apply(plan) before running the model")
        eid = ExpertId(layer, expert)
        state = self.plan.states[layer][expert]
        gs = self.plan.group_size
        act_fn = self.act_fns[layer]
        self.stats.expert_calls += 1
        if state.tier == "accel":
            layout, _, views = self.resident[eid]
            return expert_forward(layout, views, x, act_fn, self.quantizer.dequantize)
        if self.plan.offload == "cpu":
            self.stats.cpu_calls += 1
            y = gated_forward(self._host_weights_of(eid, state.bits, gs), x.to(self.host), act_fn)
            return y.to(x.device, non_blocking=False)
        slot = self._fetch(eid, state.bits, gs)
        layout, views = self.slot_views[slot]
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.accel).wait_event(self.slot_ready[slot])
        n = x.shape[0]
        if n <= KERNEL_MAX_TOKENS and self.kernel_supported(layout, layer):
            y = kernels.moe_experts(x, self.slot_table[slot : slot + 1].expand(n), x.new_ones(n), layout,
                                    slot_token=torch.arange(n, device=x.device)).to(x.dtype)
        else:
            y = expert_forward(layout, views, x, act_fn, self.quantizer.dequantize)
        if self.copy_stream is not None:
            self.slot_free[slot].record(torch.cuda.current_stream(self.accel))
        return y

    def _fetch(self, eid: ExpertId, bits: int, group_size: int, *, ahead: bool = False) -> int:
        """The slot holding `eid` at `bits`, copying it in (over the least recently used) if missing;
        `ahead`: a prefetch, counted apart from demand lookups."""
        key = (eid, bits)
        slot = self.lru.get(key)
        if slot is not None:
            self.lru.move_to_end(key)
            if not ahead:
                self.stats.fetch_hits += 1
                if key in self.prefetched:
                    self.prefetched.discard(key)
                    self.stats.prefetch_hits += 1
            return slot
        if len(self.lru) < len(self.slots):
            used = set(self.lru.values())
            slot = next(i for i in range(len(self.slots)) if i not in used)
        else:
            old, slot = self.lru.popitem(last=False)
            self.prefetched.discard(old)
        src, _ = self.host_buffer(eid, bits, group_size)
        dst = self.slots[slot][: src.numel()]
        if self.copy_stream is not None:
            # pinned source, side stream: the copy overlaps compute already queued and waits only
            # for the last compute that read this slot
            self.copy_stream.wait_event(self.slot_free[slot])
            with torch.cuda.stream(self.copy_stream):
                dst.copy_(src, non_blocking=self.pin)
            self.slot_ready[slot].record(self.copy_stream)
        else:
            dst.copy_(src)
        layout = self.layout(bits, group_size)
        self.slot_views[slot] = (layout, layout.views(dst))
        self.lru[key] = slot
        self.stats.bytes_fetched += src.numel()
        if ahead:
            self.prefetched.add(key)
            self.stats.prefetch_issued += 1
        else:
            self.stats.fetch_misses += 1
        return slot

    def guess_next(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Experts the next MoE layer will likely route to (the mixtral-offloading trick: its router
        applied to this layer's input), when the plan prefetches and that layer has experts to
        fetch; None otherwise."""
        plan = self.plan
        if (plan is None or not plan.prefetch or plan.offload != "fetch" or layer + 1 >= len(self.gates)
                or hidden.shape[0] > KERNEL_MAX_TOKENS
                or len(self.slots) < PREFETCH_SLOTS_PER_TOP_K * self.spec.top_k
                or not self.host_layers[layer + 1]):
            return None
        weight = getattr(self.gates[layer + 1], "weight", None)
        if weight is None:
            return None
        logits = F.linear(hidden.to(weight.dtype), weight)  # [T, E]
        return logits.topk(self.spec.top_k, dim=-1).indices.flatten().unique()

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Start copying the host experts among `experts` of `layer` into slots."""
        gs = self.plan.group_size
        for e in experts:
            state = self.plan.states[layer][e]
            if state.tier == "host":
                self._fetch(ExpertId(layer, e), state.bits, gs, ahead=True)

    # --- reconfiguration ------------------------------------------------------------------------
    def apply(self, plan: Plan) -> ApplyReport:
        """Move to `plan`, touching only experts whose state differs; evict before loading."""
        plan.check_fits(self.spec)
        start = time.perf_counter()
        if self.on_cuda:  # queued compute and copies may still read buffers this frees or overwrites
            torch.cuda.synchronize(self.accel)
        gs = plan.group_size
        base = self.plan if self.plan is not None and self.plan.group_size == gs else None
        moves = diff(plan, base, have_variant=lambda eid, bits: (eid, bits, gs) in self.variants)

        # Phase 1: free accelerator memory (experts leaving it, slots that no longer fit the plan).
        evicted = 0
        for eid in list(self.resident) if base is None else [m.expert for m in moves if m.frees_accel]:
            del self.resident[eid]
            evicted += 1
        n_slots, slot_bytes = plan.slots_used(), plan.slot_nbytes(self.spec)
        # cached slots hold (expert, bits) at the old group size: keep them only if that is unchanged
        if base is None or len(self.slots) != n_slots or (self.slots and self.slots[0].numel() != slot_bytes):
            self.slots, self.slot_views = [], []
            self.lru.clear()
            self.prefetched.clear()
        else:  # keep cached slots whose expert is still fetched at the same precision
            for key in [k for k in self.lru if plan.state(k[0]) != ExpertState(k[1], "host")]:
                self.slot_views[self.lru.pop(key)] = None
                self.prefetched.discard(key)
        if self.on_cuda:
            torch.cuda.empty_cache()  # hand freed memory back to co-tenants, not just to our allocator

        # Phase 2: derive missing variants, load accelerator experts, allocate slots.
        loaded = requantized = bytes_in = 0
        for m in moves:
            buf, quantized_now = self.host_buffer(m.expert, m.dst.bits, gs)
            requantized += quantized_now
            if m.loads_accel:
                dev = self._to_accel(buf)
                layout = self.layout(m.dst.bits, gs)
                self.resident[m.expert] = (layout, dev, layout.views(dev))
                loaded += 1
                bytes_in += buf.numel()
        if not self.slots and n_slots:
            self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.accel) for _ in range(n_slots)]
            self.slot_views = [None] * n_slots
            self.slot_table = kernels.expert_table(self.slots, device=self.accel)
            if self.on_cuda:
                self.slot_ready = [torch.cuda.Event() for _ in self.slots]
                self.slot_free = [torch.cuda.Event() for _ in self.slots]
        if self.on_cuda:
            torch.cuda.synchronize(self.accel)
        self.plan = plan
        # dequantized host experts stay only while the plan still computes them on the host as is
        for key in [k for k in self.host_weights
                    if plan.offload != "cpu" or k[2] != gs or plan.state(k[0]) != ExpertState(k[1], "host")]:
            del self.host_weights[key]
        self._refresh_tables()
        report = ApplyReport(plan.plan_id, len(moves), loaded, evicted, requantized, bytes_in,
                             time.perf_counter() - start)
        log.info("applied plan %s: %s", plan.plan_id, report)
        return report

    def _refresh_tables(self) -> None:
        """Point the kernels' address tables at the experts the new plan keeps on the accelerator."""
        plan, gs = self.plan, self.plan.group_size
        L, E = self.spec.num_layers, self.spec.num_experts
        self.host_layers = [any(s.tier == "host" for s in layer) for layer in plan.states]
        ptrs = {b: torch.zeros(L, E, dtype=torch.int64) for b in self.tables}
        eager = torch.ones(L, E, dtype=torch.bool)
        for eid, state in plan.items():
            if state.tier == "accel" and self.kernel_supported(self.layout(state.bits, gs), eid.layer):
                ptrs[state.bits][eid.layer, eid.expert] = self.resident[eid][1].data_ptr()
                eager[eid.layer, eid.expert] = False
        for b, table in self.tables.items():
            table.copy_(ptrs[b])  # in place: captured graphs read these tensors
        self.eager_mask.copy_(eager)
        self.fast_bits = [tuple(b for b in ptrs if ptrs[b][l].any()) for l in range(L)]
        self.layer_eager = [bool(eager[l].any()) for l in range(L)]

    # --- accounting -------------------------------------------------------------------------------
    def memory(self) -> dict:
        """Bytes per tier, summed over the tensors the engine really holds. `host_bytes` is the
        plan's host tier (packed experts, as Plan.host_bytes); `host_store_bytes` everything kept in
        host memory: masters, derived variants and, for `cpu` offload, dequantized host experts
        (`host_dequant_bytes`)."""
        resident = tensor_bytes(buf for _, buf, _ in self.resident.values())
        slots = tensor_bytes(self.slots)
        host = 0
        if self.plan is not None:
            host = tensor_bytes(
                self.host_buffer(eid, s.bits, self.plan.group_size)[0]
                for eid, s in self.plan.items() if s.tier == "host"
            )
        dequantized = tensor_bytes(t for w in self.host_weights.values() for t in w.values())
        return {
            "gpu_bytes": self.nonexpert_bytes + resident + slots,
            "gpu_expert_bytes": resident,
            "gpu_slot_bytes": slots,
            "nonexpert_bytes": self.nonexpert_bytes,
            "host_bytes": host,
            "host_dequant_bytes": dequantized,
            "host_store_bytes": tensor_bytes([*self.masters.values(), *self.variants.values()]) + dequantized,
        }

    def router_frequencies(self) -> list[list[float]]:
        """Share of routed token slots each expert got since the last reset, per MoE layer."""
        counts = self.routed.double().cpu()
        totals = counts.sum(dim=1, keepdim=True).clamp(min=1)
        return (counts / totals).tolist()

    def record(self, layer: int, expert: int, x: torch.Tensor, weights: torch.Tensor) -> None:
        """Keep up to `capture_limit` routed inputs per expert (for sensitivity measurements)."""
        kept = self.capture.setdefault(ExpertId(layer, expert), [])
        room = self.capture_limit - sum(len(w) for _, w in kept)
        if room > 0:
            kept.append((x[:room].detach().clone(), weights[:room].detach().float().clone()))

    def expert_output(self, eid: ExpertId, bits: int, group_size: int, x: torch.Tensor) -> torch.Tensor:
        """`eid` at `bits` on inputs x [n, H] (on the accelerator), whatever the current plan."""
        buf, _ = self.host_buffer(eid, bits, group_size)
        layout = self.layout(bits, group_size)
        dev = buf.to(self.accel, non_blocking=self.pin)
        return expert_forward(layout, layout.views(dev), x, self.act_fns[eid.layer], self.quantizer.dequantize)

    def reset_stats(self) -> None:
        self.stats = EngineStats()
        self.routed.zero_()
