"""The expert engine: serves every routed expert of a Hugging Face MoE model at the precision and
on the tier a Plan gives it, and moves experts when the plan changes.

Storage, per expert:
- host: the 16-bit master (always) and every quantized variant derived so far, one packed buffer
  each (pinned when there is CUDA), so any precision can be re-derived and returning to an earlier
  plan quantizes nothing;
- accelerator: one packed buffer for each accelerator-tier expert, plus, for `fetch` offloading,
  `cache_slots` buffers that hold recently used host experts (an LRU).
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

from placement.adapters import adapter_for
from placement.packed import Layout, expert_layout, pack
from placement.plan import ExpertId, ExpertState, Plan, diff

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    expert_calls: int = 0
    fetch_hits: int = 0
    fetch_misses: int = 0
    bytes_fetched: int = 0
    cpu_calls: int = 0

    @property
    def hit_rate(self) -> float | None:
        lookups = self.fetch_hits + self.fetch_misses
        return self.fetch_hits / lookups if lookups else None

    def as_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate}


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
        out = torch.zeros_like(hidden_states)
        counts = torch.bincount(top_k_index.flatten(), minlength=self.num_experts)  # [E]
        if self.engine.trace is not None:  # routing per token, for cache simulations
            self.engine.trace.append((self.layer, top_k_index.detach().cpu()))
        self.engine.routed[self.layer] += counts.to(self.engine.routed.device)
        for e in counts.nonzero().flatten().tolist():  # the one host sync per layer
            # (k, T) order as in transformers, so per-row GEMMs see the same rows in the same order
            pos, token_idx = torch.where((top_k_index == e).T)
            if self.engine.capture is not None:
                self.engine.record(self.layer, e, hidden_states[token_idx], top_k_weights[token_idx, pos])
            y = self.engine.run_expert(self.layer, e, hidden_states[token_idx])
            y = y * top_k_weights[token_idx, pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}"


def expert_forward(layout: Layout, views: dict, x: torch.Tensor, act_fn, dequantize) -> torch.Tensor:
    """A gated expert on x [n, H] -> [n, H], from its packed views (dequantizing quantized ones)."""
    w = {}
    for name, shape in layout.matrices:
        if layout.bits == 16:
            w[name] = views[name]
        else:
            w[name] = dequantize(
                views[f"{name}.W_q"], views[f"{name}.scale"], views[f"{name}.zero"],
                bits=layout.bits, group_size=layout.group_size, shape=shape, compute_dtype=layout.dtype,
            )
    gate, up = F.linear(x, w["gate_up"]).chunk(2, dim=-1)  # [n, I] each
    return F.linear(act_fn(gate) * up, w["down"])


class Engine:
    """Takes over the routed experts of `model` (in place) and serves them by plan."""

    def __init__(self, model: nn.Module, *, accel=None, quantizer=None, pin: bool | None = None):
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
        self.act_fns = []  # per MoE layer
        # expert -> routed inputs [n, H] and routing weights [n], while capturing (see record)
        self.capture: dict[ExpertId, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self.capture_limit = 0
        self.trace: list[tuple[int, torch.Tensor]] | None = None  # (layer, top_k_index [T, k]) while tracing

        layout16 = self.layout(16, 64)
        for l, (_, block) in enumerate(self.adapter.moe_blocks(model)):
            fused = block.experts
            for e in range(self.spec.num_experts):
                self.masters[ExpertId(l, e)] = pack(
                    layout16, {"gate_up": fused.gate_up_proj[e], "down": fused.down_proj[e]}, pin=self.pin
                )
            block.experts = EngineExperts(self, l, self.spec.num_experts)
            self.act_fns.append(fused.act_fn)
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

    def _to_accel(self, buf: torch.Tensor) -> torch.Tensor:
        dev = torch.empty(buf.numel(), dtype=torch.uint8, device=self.accel)
        return dev.copy_(buf, non_blocking=self.pin)

    # --- serving ------------------------------------------------------------------------------
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
        elif self.plan.offload == "cpu":
            self.stats.cpu_calls += 1
            layout = self.layout(state.bits, gs)
            views = self._host_views_of(eid, state.bits, gs)
            y = expert_forward(layout, views, x.to(self.host), act_fn, self.quantizer.dequantize)
            return y.to(x.device, non_blocking=False)
        else:
            layout, views = self._fetch(eid, state.bits, gs)
        return expert_forward(layout, views, x, act_fn, self.quantizer.dequantize)

    def _fetch(self, eid: ExpertId, bits: int, group_size: int) -> tuple[Layout, dict]:
        key = (eid, bits)
        slot = self.lru.get(key)
        if slot is not None:
            self.lru.move_to_end(key)
            self.stats.fetch_hits += 1
            return self.slot_views[slot]
        if len(self.lru) < len(self.slots):
            slot = next(i for i in range(len(self.slots)) if i not in set(self.lru.values()))
        else:
            _, slot = self.lru.popitem(last=False)
        src, _ = self.host_buffer(eid, bits, group_size)
        dst = self.slots[slot][: src.numel()]
        # Pinned source + non_blocking: the copy is queued on the stream ahead of the compute
        # that reads it, so the host does not wait for it.
        dst.copy_(src, non_blocking=self.pin)
        layout = self.layout(bits, group_size)
        self.slot_views[slot] = (layout, layout.views(dst))
        self.lru[key] = slot
        self.stats.fetch_misses += 1
        self.stats.bytes_fetched += src.numel()
        return self.slot_views[slot]

    # --- reconfiguration ------------------------------------------------------------------------
    def apply(self, plan: Plan) -> ApplyReport:
        """Move to `plan`, touching only experts whose state differs; evict before loading."""
        plan.check_fits(self.spec)
        start = time.perf_counter()
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
        else:  # keep cached slots whose expert is still fetched at the same precision
            for key in [k for k in self.lru if plan.state(k[0]) != ExpertState(k[1], "host")]:
                self.slot_views[self.lru.pop(key)] = None
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
        if self.on_cuda:
            torch.cuda.synchronize(self.accel)
        self.plan = plan
        report = ApplyReport(plan.plan_id, len(moves), loaded, evicted, requantized, bytes_in,
                             time.perf_counter() - start)
        log.info("applied plan %s: %s", plan.plan_id, report)
        return report

    # --- accounting -------------------------------------------------------------------------------
    def memory(self) -> dict:
        """Bytes per tier, summed over the tensors the engine really holds."""
        resident = tensor_bytes(buf for _, buf, _ in self.resident.values())
        slots = tensor_bytes(self.slots)
        host = 0
        if self.plan is not None:
            host = tensor_bytes(
                self.host_buffer(eid, s.bits, self.plan.group_size)[0]
                for eid, s in self.plan.items() if s.tier == "host"
            )
        return {
            "gpu_bytes": self.nonexpert_bytes + resident + slots,
            "gpu_expert_bytes": resident,
            "gpu_slot_bytes": slots,
            "nonexpert_bytes": self.nonexpert_bytes,
            "host_bytes": host,
            "host_store_bytes": tensor_bytes([*self.masters.values(), *self.variants.values()]),
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
