"""Plans: which precision and which tier every expert has, and the moves between two plans.

Pure data and arithmetic: nothing here touches tensors, so plans are built, compared and costed in
microseconds (the profiler and the policy build thousands of them).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from catalog.knobs import ATTN_BITS, BITS, OFFLOAD_MODES, Knobs, check_group_size, choice_error
from placement.packed import expert_layout
from placement.packed import check_shape, linear_layout
from placement.spec import ModelSpec

TIERS = ("accel", "host")
# The engine prefetches only with room for two layers' routed experts (this many slots per top-k):
# the next layer's guesses are copied while this layer's experts are still in use.
PREFETCH_SLOTS_PER_TOP_K = 2
# What the non-random selections rank experts by (lowest quantized first); the profiler measures it.
SCORED_BY = {"frequency": "router statistics from calibration text",
             "sensitivity": "per-expert quantization sensitivity scores"}


@dataclass(frozen=True, order=True)
class ExpertId:
    layer: int  # ordinal among the model's MoE layers
    expert: int

    def __post_init__(self):
        if self.layer < 0 or self.expert < 0:
            raise ValueError(f"ExpertId needs non-negative layer and expert, got {self}")


@dataclass(frozen=True)
class ExpertState:
    bits: int = 16
    tier: str = "accel"

    def __post_init__(self):
        if self.bits not in BITS:
            raise choice_error("bits", self.bits, BITS)
        if self.tier not in TIERS:
            raise choice_error("tier", self.tier, TIERS)


@dataclass(frozen=True)
class Plan:
    """Every expert's state, plus how host experts are served.

    `states[l][e]` is the state of expert e of MoE layer l. `offload` says how host-tier experts run:
    `fetch` copies them into one of `cache_slots` accelerator slots (an LRU) and computes there;
    `cpu` computes them on the host and moves activations instead. `prefetch` (fetch only) also
    applies the next MoE layer's router to each layer's input and copies the host experts it picks
    into slots ahead of use: it pays when the guesses are right and wastes copy bandwidth when not.
    `attn_bits` is the precision of every layer's attention projections: 16 keeps the model's own
    (dtype) weights, 8 or 4 serves them HQQ-quantized with `group_size` groups (placement/qlinear.py).
    """

    states: tuple[tuple[ExpertState, ...], ...]
    offload: str = "fetch"
    cache_slots: int = 0
    group_size: int = 64
    prefetch: bool = False
    attn_bits: int = 16

    def __post_init__(self):
        if self.offload not in OFFLOAD_MODES:
            raise choice_error("offload", self.offload, OFFLOAD_MODES)
        if self.cache_slots < 0:
            raise ValueError(f"cache_slots={self.cache_slots} must be >= 0")
        check_group_size(self.group_size)
        if not self.states or len({len(row) for row in self.states}) != 1:
            raise ValueError("a plan needs the same, non-zero number of experts in every layer")
        if self.offload == "fetch" and self.host_experts and self.cache_slots < 1:
            raise ValueError("offload='fetch' with host experts needs cache_slots >= 1")
        if not isinstance(self.prefetch, bool):
            raise ValueError(f"prefetch={self.prefetch!r} must be True or False")
        if self.prefetch and not (self.offload == "fetch" and self.host_experts):
            raise ValueError("prefetch=True needs offload='fetch' and host experts: it copies host experts "
                             "into fetch slots ahead of use")
        if self.attn_bits not in ATTN_BITS or isinstance(self.attn_bits, bool):
            raise choice_error("attn_bits", self.attn_bits, ATTN_BITS)

    # --- identity -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {
            "states": [[[s.bits, s.tier] for s in row] for row in self.states],
            "offload": self.offload,
            "cache_slots": self.cache_slots,
            "group_size": self.group_size,
        }
        if self.prefetch:  # only when on, so plans from before the knob keep their plan_id
            d["prefetch"] = True
        if self.attn_bits != 16:  # likewise: plans from before the knob had 16-bit attention
            d["attn_bits"] = self.attn_bits
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> Plan:
        states = tuple(tuple(ExpertState(int(b), str(t)) for b, t in row) for row in d["states"])
        return cls(states, d["offload"], int(d["cache_slots"]), int(d["group_size"]), bool(d.get("prefetch", False)),
                   int(d.get("attn_bits", 16)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    @property
    def plan_id(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    @property
    def precision_id(self) -> str:
        """A hash of the precisions alone: what perplexity depends on (placement does not)."""
        key = {"bits": [[s.bits for s in row] for row in self.states], "group_size": self.group_size}
        if self.attn_bits != 16:  # (absent at 16, so ids from before the knob still match)
            key["attn_bits"] = self.attn_bits
        key = json.dumps(key)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    # --- derived counts ---------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.states)

    @property
    def num_experts(self) -> int:
        return len(self.states[0])

    def items(self):
        for l, row in enumerate(self.states):
            for e, s in enumerate(row):
                yield ExpertId(l, e), s

    def state(self, eid: ExpertId) -> ExpertState:
        return self.states[eid.layer][eid.expert]

    @property
    def experts_total(self) -> int:
        return self.num_layers * self.num_experts

    @property
    def quantized(self) -> int:
        return sum(s.bits != 16 for _, s in self.items())

    @property
    def bits_used(self) -> list[int]:
        """Distinct precisions of quantized experts, highest first."""
        return sorted({s.bits for _, s in self.items() if s.bits != 16}, reverse=True)

    @property
    def gpu_experts(self) -> int:
        return sum(s.tier == "accel" for _, s in self.items())

    @property
    def host_experts(self) -> int:
        return self.experts_total - self.gpu_experts

    # --- bytes --------------------------------------------------------------------------------
    def expert_nbytes(self, spec: ModelSpec, bits: int) -> int:
        return expert_layout(spec.hidden, spec.intermediate, bits, spec.dtype, self.group_size).nbytes

    def slot_nbytes(self, spec: ModelSpec) -> int:
        """Size of one fetch slot: the largest host-tier expert (0 when nothing is fetched)."""
        if self.offload != "fetch":
            return 0
        sizes = [self.expert_nbytes(spec, s.bits) for _, s in self.items() if s.tier == "host"]
        return max(sizes, default=0)

    def slots_used(self) -> int:
        return self.cache_slots if self.offload == "fetch" and self.host_experts else 0

    def attn_nbytes(self, spec: ModelSpec, bits: int | None = None) -> int:
        """Accelerator bytes of the attention projections' weights at `bits` (default: the plan's)."""
        bits = self.attn_bits if bits is None else bits
        if bits == 16:
            return sum(n * k for n, k in spec.attn_linears) * spec.dtype.itemsize
        return sum(linear_layout(n, k, bits, spec.dtype, self.group_size).nbytes for n, k in spec.attn_linears)

    def nonexpert_nbytes(self, spec: ModelSpec) -> int:
        """The model's non-expert weights with the attention projections at the plan's precision."""
        if self.attn_bits == 16:
            return spec.nonexpert_bytes
        return spec.nonexpert_bytes - self.attn_nbytes(spec, 16) + self.attn_nbytes(spec)

    def gpu_bytes(self, spec: ModelSpec) -> int:
        experts = sum(self.expert_nbytes(spec, s.bits) for _, s in self.items() if s.tier == "accel")
        return self.nonexpert_nbytes(spec) + experts + self.slots_used() * self.slot_nbytes(spec)

    def host_bytes(self, spec: ModelSpec) -> int:
        """Host memory the plan keeps resident: its host-tier experts at their precision (the
        fetch source, pinned), with `cpu` offload quantized host experts' dequantized 16-bit
        matrices (made on first use: a bound), and with quantized attention the 16-bit projections
        set aside (to go back exactly) and their packed variants (to return without quantizing)."""
        return self.host_packed_bytes(spec) + self.host_dequant_bytes(spec) + self.host_attn_bytes(spec)

    def host_attn_bytes(self, spec: ModelSpec) -> int:
        return 0 if self.attn_bits == 16 else self.attn_nbytes(spec, 16) + self.attn_nbytes(spec)

    def host_packed_bytes(self, spec: ModelSpec) -> int:
        return sum(self.expert_nbytes(spec, s.bits) for _, s in self.items() if s.tier == "host")

    def host_dequant_bytes(self, spec: ModelSpec) -> int:
        if self.offload != "cpu":
            return 0
        matrices = 3 * spec.hidden * spec.intermediate * spec.dtype.itemsize  # gate_up [2I, H] and down [H, I]
        return matrices * sum(1 for _, s in self.items() if s.tier == "host" and s.bits != 16)

    def check_fits(self, spec: ModelSpec) -> None:
        if (self.num_layers, self.num_experts) != (spec.num_layers, spec.num_experts):
            raise ValueError(
                f"plan has {self.num_layers}x{self.num_experts} experts but the model has "
                f"{spec.num_layers} MoE layers x {spec.num_experts} experts"
            )
        for name, (out_f, in_f) in (("gate_up", (2 * spec.intermediate, spec.hidden)),
                                     ("down", (spec.hidden, spec.intermediate))):
            if self.quantized and (out_f * in_f) % self.group_size:
                raise ValueError(
                    f"group_size={self.group_size} does not divide the {name} matrix "
                    f"({out_f}x{in_f}) of this model"
                )
        if self.attn_bits != 16:
            if not spec.attn_linears:
                raise ValueError(f"attn_bits={self.attn_bits} needs the model's attention projections, and this "
                                 f"{spec.family} model has none the adapter knows (self_attn.q_proj ...)")
            for out_f, in_f in sorted(set(spec.attn_linears)):
                check_shape(out_f, in_f, self.attn_bits, self.group_size)

    def summary(self, spec: ModelSpec) -> dict:
        bits = self.bits_used
        return {
            "plan_id": self.plan_id,
            "experts_total": self.experts_total,
            "quantized": self.quantized,
            "bits": bits[0] if len(bits) == 1 else (16 if not bits else bits),
            "gpu_experts": self.gpu_experts,
            "host_experts": self.host_experts,
            "offload": self.offload,
            "cache_slots": self.slots_used(),
            "prefetch": self.prefetch,
            "attn_bits": self.attn_bits,
            "group_size": self.group_size,
            "gpu_bytes": self.gpu_bytes(spec),
            "host_bytes": self.host_bytes(spec),
            "nonexpert_bytes": self.nonexpert_nbytes(spec),
        }


# --- moves between plans --------------------------------------------------------------------
@dataclass(frozen=True)
class Move:
    """One expert changing state. `src` is None when the engine holds nothing for it yet."""

    expert: ExpertId
    src: ExpertState | None
    dst: ExpertState
    requantize: bool = False  # the dst variant is not cached and must be derived from the master

    @property
    def frees_accel(self) -> bool:
        return self.src is not None and self.src.tier == "accel"

    @property
    def loads_accel(self) -> bool:
        return self.dst.tier == "accel"

    @property
    def cost(self) -> str:
        """Cheapest first: a tier change copies bytes; a precision change may also quantize."""
        if self.requantize:
            return "requantize"
        if self.src is not None and self.src.bits != self.dst.bits:
            return "precision"
        return "tier"


def diff(desired: Plan, actual: Plan | None, have_variant=lambda eid, bits: True) -> list[Move]:
    """Moves that turn `actual` into `desired`, evictions first.

    Only expert states count: plans that differ in offload mode, slots or prefetch alone need no
    moves (the engine resizes its slots in `apply`).

    Evicting every expert that leaves the accelerator (or changes precision there) before loading
    any keeps accelerator memory at or below max(old footprint, new footprint) throughout.
    `have_variant(eid, bits)` says whether the host already holds that precision.
    """
    moves = []
    for eid, dst in desired.items():
        src = actual.state(eid) if actual is not None else None
        if src == dst:
            continue
        moves.append(Move(eid, src, dst, requantize=dst.bits != 16 and not have_variant(eid, dst.bits)))
    return sorted(moves, key=lambda m: (not m.frees_accel, m.expert))


# --- building plans from knobs ----------------------------------------------------------------
def _order(spec: ModelSpec, selection: str, seed: int, scores: Sequence[Sequence[float]] | None):
    """Experts in the order they are quantized: a seeded shuffle, or lowest score first (least
    routed for `frequency`, least harmed by quantization for `sensitivity`)."""
    ids = [ExpertId(l, e) for l in range(spec.num_layers) for e in range(spec.num_experts)]
    if selection == "random":
        random.Random(seed).shuffle(ids)
        return ids
    if scores is None:
        raise ValueError(f"selection={selection!r} needs {SCORED_BY[selection]}")
    if (len(scores), len(scores[0])) != (spec.num_layers, spec.num_experts):
        raise ValueError(f"{SCORED_BY[selection]} do not match the model's MoE layers and experts")
    return sorted(ids, key=lambda i: (scores[i.layer][i.expert], i))


def build_plan(spec: ModelSpec, knobs: Knobs, scores=None) -> Plan:
    """The paper's recipe: quantize `knobs.quantized` experts in selection order, then give
    accelerator room to quantized experts first (they are smaller), then to 16-bit ones."""
    total = spec.num_layers * spec.num_experts
    if knobs.quantized > total:
        raise ValueError(
            f"quantized={knobs.quantized} exceeds the model's {total} experts "
            f"({spec.num_layers} MoE layers x {spec.num_experts})"
        )
    if knobs.gpu_experts is not None and knobs.gpu_experts > total:
        raise ValueError(f"gpu_experts={knobs.gpu_experts} exceeds the model's {total} experts")
    order = _order(spec, knobs.selection, knobs.seed, scores)
    bits = {eid: (knobs.bits if i < knobs.quantized else 16) for i, eid in enumerate(order)}
    # Quantized experts first; 16-bit ones in reverse selection order, so that with scores the
    # highest-scored (most routed, most sensitive) 16-bit experts stay on the accelerator.
    accel_order = order[: knobs.quantized] + order[knobs.quantized :][::-1]
    slots = knobs.cache_slots if knobs.cache_slots is not None else min(2 * spec.top_k, total)

    def make(n_accel: int) -> Plan:
        on_accel = set(accel_order[:n_accel])
        states = tuple(
            tuple(ExpertState(bits[ExpertId(l, e)], "accel" if ExpertId(l, e) in on_accel else "host")
                  for e in range(spec.num_experts))
            for l in range(spec.num_layers)
        )
        # Slots only exist when something is fetched, so equal behaviour hashes to one plan_id;
        # likewise prefetch, which also needs room for two layers' experts (as the engine does).
        fetching = knobs.offload == "fetch" and n_accel < total
        prefetch = knobs.prefetch and fetching and slots >= PREFETCH_SLOTS_PER_TOP_K * spec.top_k
        return Plan(states, knobs.offload, slots if fetching else 0, knobs.group_size, prefetch, knobs.attn_bits)

    if knobs.gpu_budget is None:
        plan = make(total if knobs.gpu_experts is None else knobs.gpu_experts)
    else:
        plan = _fit_budget(spec, knobs.gpu_budget, make, total)
    plan.check_fits(spec)
    check_host_budget(plan, spec, knobs.host_budget)
    return plan


def check_host_budget(plan: Plan, spec: ModelSpec, host_budget: int | None) -> None:
    """A one-line ValueError when `plan`'s host tier needs more than `host_budget` bytes."""
    if host_budget is None:
        return
    need = plan.host_bytes(spec)
    if need > host_budget:
        attn = (f", and the 16-bit attention projections set aside for {plan.attn_bits}-bit ones"
                if plan.host_attn_bytes(spec) else "")
        raise ValueError(
            f"the plan keeps {need / 1e9:.4g} GB in host memory ({plan.host_experts} host experts"
            f"{', dequantized for --offload cpu' if plan.host_dequant_bytes(spec) else ''}{attn}), over the host "
            f"budget of {host_budget / 1e9:.4g} GB: put more experts on the accelerator, quantize more, keep attention "
            f"at 16 bits, or raise --host-budget")


def _fit_budget(spec: ModelSpec, budget: int, make, total: int) -> Plan:
    """The plan with the most accelerator experts whose accelerator bytes fit `budget`."""
    nonexpert = make(0).nonexpert_nbytes(spec)  # (attention at the plan's precision)
    if budget < nonexpert:
        raise ValueError(
            f"gpu_budget={budget} bytes is smaller than the model's non-expert weights "
            f"({nonexpert} bytes), which always live on the accelerator"
        )
    best = None
    for n in range(total + 1):  # bytes grow with n except where the fetch slots disappear
        plan = make(n)
        if plan.gpu_bytes(spec) <= budget:
            best = plan
    if best is None:
        smallest = make(0)
        raise ValueError(
            f"gpu_budget={budget} bytes cannot hold the non-expert weights ({nonexpert}) "
            f"plus {smallest.slots_used()} fetch slots of {smallest.slot_nbytes(spec)} bytes; "
            "raise the budget, lower cache_slots or use offload='cpu'"
        )
    return best
