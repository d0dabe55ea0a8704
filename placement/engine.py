"""The expert engine: serves every routed expert of a Hugging Face MoE model at the precision and
on the tier a Plan gives it, and moves experts when the plan changes.

`Engine` is the façade (plan, apply, run_expert, stats, memory, router counts) over three parts
with narrow interfaces:
- `ExpertStore` (store.py), the host side: masters read one expert at a time from a master source
  (masters.py, checkpoint.py: the model's tensors, a per-expert seed or a checkpoint's memory
  maps), variants quantized from them or read back from the on-disk variant cache (variants.py),
  and only the host-tier experts of the plan resident (pinned when there is CUDA); for `cpu`
  offloading, quantized host experts' matrices, dequantized on first use and kept while the plan
  serves them so;
- `FetchCache` (fetch.py), for `fetch` offloading: `cache_slots` accelerator buffers holding
  recently used host experts (an LRU), filled on a copy stream, and what was prefetched;
- `KernelTables` (kernels.py): per precision, the [L, E] addresses of the accelerator experts the
  fused kernels run at decode, and which layers leave the kernels.
Beside the experts, `apply` swaps every layer's attention projections for quantized ones
(qlinear.QuantLinear, Plan.attn_bits 8 or 4) and back to the model's own (16).
The engine itself holds one packed accelerator buffer per accelerator-tier expert (`resident`).
Which path serves an expert is `tiers.serving_path`, the table the cost model reads too.
Without CUDA the accelerator is the CPU: the same code paths run and bytes are still kept per tier.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from placement import kernels
from placement.adapters import adapter_for
from placement.experts import expert_forward, gated_forward, tensor_bytes
from placement.fetch import FetchCache
from placement.packed import Layout, linear_layout, pack_linear
from placement.plan import PREFETCH_SLOTS_PER_TOP_K, ExpertId, ExpertState, Plan, check_host_budget, diff
from placement.qlinear import QuantLinear
from placement.store import ExpertStore
from placement.variants import VariantCache
from placement.tiers import ACCEL, CPU, FETCH, serving_path

log = logging.getLogger(__name__)

# Up to this many tokens per layer call (decode, continuous batching) every accelerator expert runs as
# fused kernels, with no host sync (a CUDA graph); 64 covers the decode batch buckets a server
# captures. Quantized experts keep to their grouped kernels up to QUANTIZED_KERNEL_MAX_TOKENS (prefill
# chunks): dequantizing every routed expert whole for each forward cost more than the kernels'
# reads. On the H200 (`python -m experiments.bench_prefill`), a 16-prompt burst of 2,401 tokens
# prefilled through 16 4-bit layers in 0.78 s as 64-row chunks, 0.28 s as one dequantize-then-matmul
# forward, 0.28 s as 1,024-row chunks in the grouped kernels and 0.21 s with the 4-bit ones
# dequantizing per group (kernels.DEQ_MIN_TOKENS).
# 16-bit experts beyond KERNEL_MAX_TOKENS multiply through cuBLAS (no dequantization to spare), and
# inputs beyond QUANTIZED_KERNEL_MAX_TOKENS (perplexity windows, whole bursts) dequantize whole.
KERNEL_MAX_TOKENS = 64
QUANTIZED_KERNEL_MAX_TOKENS = 1024


def kernel_max_tokens(bits: int) -> int:
    """Tokens per layer call up to which experts at `bits` run in the fused kernels."""
    return KERNEL_MAX_TOKENS if bits == 16 else QUANTIZED_KERNEL_MAX_TOKENS


# By precision: from this many tokens per routed expert (expected, see tokens_per_expert) a layer's
# experts at that precision run grouped by expert (kernels.moe_experts_grouped: an expert read once
# per block of its tokens), below it per (token, expert) slot (kernels.moe_experts: once per token,
# at a higher bandwidth; the grouped kernels spend more instructions per weight unpacking codes for
# tl.dot). The crossovers `python -m experiments.bench_grouping` found on an H200 (a Mixtral layer,
# 8 experts, top-2, random routing; experiments/results/bench_grouping_h200.csv), grouped time over
# slots:
# - 16-bit: 1.06 at 3 tokens (1.30 per expert), 0.99 at 4 (1.46), 0.91 at 5, 0.43 at 16;
# - 8-bit: 1.22 at 8 tokens (2.22), 0.98 at 12 (3.10);
# - 4-bit: 1.95 at 5 tokens, 1.42 at 8, 1.06 at 12, 0.81 at 16 (4.04);
# - 2-bit: 1.16 at 12, 0.92 at 16, 1.02 at 24 (a tie), 0.77 at 32.
# (Until 2026-12-02 one threshold, 1.6, sent quantized experts to the grouped kernels from 5 tokens,
# up to 2x slower; it was measured before the integer-activation slot kernels.) Other GPUs: their
# entry in grouping_thresholds.json (bench_grouping --save), else these.
GROUPED_MIN_TOKENS_PER_EXPERT = {16: 1.38, 8: 2.66, 4: 3.57, 2: 3.57}
TUNED_GROUPING = Path(__file__).with_name("grouping_thresholds.json")


def grouping_thresholds(device_name: str | None, path: Path = TUNED_GROUPING) -> dict[int, float]:
    """GROUPED_MIN_TOKENS_PER_EXPERT with the entry of `path` (a JSON object by GPU name) for
    `device_name` over it; precisions it lacks keep the defaults. No entry, no file, no GPU (None):
    the defaults."""
    thresholds = dict(GROUPED_MIN_TOKENS_PER_EXPERT)
    if device_name is None:
        return thresholds
    entry = kernels.gpu_entry(path, device_name, "grouping thresholds")
    try:
        tuned = {int(bits): float(v) for bits, v in entry.items()}
    except (ValueError, TypeError) as e:
        log.warning("ignoring %s (%s): the default grouping thresholds apply", path, e)
        return thresholds
    thresholds.update({bits: v for bits, v in tuned.items() if bits in thresholds})
    return thresholds


def tokens_per_expert(tokens: int, top_k: int, num_experts: int) -> float:
    """Tokens per routed expert, expected when `tokens` tokens each pick `top_k` of `num_experts`
    experts uniformly: the routed slots over the experts that get at least one."""
    if tokens == 0:
        return 0.0
    return tokens * top_k / (num_experts * (1 - (1 - top_k / num_experts) ** tokens))


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
    requantized: int  # variants derived from the 16-bit master (the rest came from memory or disk)
    bytes_to_accel: int
    seconds: float
    host_loaded: int = 0  # host-tier buffers made (the plan's new host experts)
    attn_swapped: int = 0  # attention projections that changed precision

    def as_dict(self) -> dict:
        return asdict(self)


class EngineExperts(nn.Module):
    """Drop-in replacement for a family's fused experts module (same call signature).

    Holds no parameters, so moving the model between devices never touches the experts.
    """

    def __init__(self, engine: Engine, layer: int, num_experts: int):
        super().__init__()
        self.engine = engine
        self.layer = layer
        self.num_experts = num_experts

    def forward(self, hidden_states, top_k_index, top_k_weights, *, out_dtype=None):
        # hidden_states [T, H]; top_k_index, top_k_weights [T, k]. out_dtype: of the result (default
        # hidden_states'; torch.float32: the kernels' sum as it is, for a caller that casts it in a
        # kernel of its own, as fast_layers' compiled functions do)
        eng, layer = self.engine, self.layer
        flat = top_k_index.flatten()
        if eng._trace is not None:  # routing per token, for cache simulations
            eng._trace.append((layer, top_k_index.detach().cpu()))
        T, k = top_k_index.shape
        tables = eng.kernel_tables
        fast_bits = eng.kernel_bits(layer, T)  # a prefill chunk: its quantized precisions only
        kernel_path = eng.kernel_path(T) or bool(fast_bits)
        # precisions the layer has in the kernels that a call this long runs as matrix products
        unfused = [b for b in tables.fast_bits[layer] if b not in fast_bits] if fast_bits else []
        per_expert = tokens_per_expert(T, k, self.num_experts)  # (from shapes: the same at every step)
        grouped = [bits for bits in fast_bits if per_expert >= eng.grouping[bits]]
        slots = fast_bits and not grouped  # all slot kernels: the first counts and zeroes out itself
        if not slots:
            eng.routed[layer].index_add_(0, flat, torch.ones_like(flat))  # no host sync (CUDA-graph safe)
        if not kernel_path:
            out = torch.zeros_like(hidden_states)
            self._per_expert(hidden_states, top_k_index, top_k_weights, out, None)
            return out if out_dtype is None else out.to(out_dtype)
        # Decode: accelerator experts run as fused kernels, one launch pair per precision present in
        # the layer, reading expert addresses from a device table (no host sync, so the step can be
        # a CUDA graph); only host experts and precisions without a kernel go through the
        # per-expert loop. A few tokens run per (token, expert) slot; more are grouped by expert on
        # the device, so an expert chosen by n tokens is read once per block of them, not n times
        # (where that pays depends on the precision: GROUPED_MIN_TOKENS_PER_EXPERT).
        eng.stats.kernel_layers += 1
        if slots:
            out = torch.empty(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)  # [T, H]
        else:
            out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        groups = kernels.group_tokens(top_k_index, self.num_experts) if grouped else None  # one for all
        for i, bits in enumerate(fast_bits):
            table, layout = tables.tables[bits][layer], eng.layout(bits, eng.plan.group_size)
            if bits in grouped:
                kernels.moe_experts_grouped(hidden_states, table, top_k_index, top_k_weights, layout, out=out,
                                            groups=groups)
            else:
                first = slots and i == 0
                kernels.moe_experts(hidden_states, table, top_k_weights.flatten(), layout, slot_index=flat, out=out,
                                    count=eng.routed[layer] if first else None, zero_out=first)
        if unfused:
            only = tables.eager_mask[layer]
            for bits in unfused:
                only = only | (tables.tables[bits][layer] != 0)
            self._per_expert(hidden_states, top_k_index, top_k_weights, out, only)
        elif tables.layer_eager[layer]:
            self._per_expert(hidden_states, top_k_index, top_k_weights, out, tables.eager_mask[layer])
        else:
            guesses = eng.guess_next(layer, hidden_states)
            if guesses is not None:
                eng.prefetch(layer + 1, guesses.tolist())
        return out.to(hidden_states.dtype if out_dtype is None else out_dtype)

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
            if eng._capture is not None:
                eng.record(layer, e, hidden_states[token_idx], top_k_weights[token_idx, pos])
            y = eng.run_expert(layer, e, hidden_states[token_idx])
            y = y * top_k_weights[token_idx, pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        if guesses:  # after this layer's own copies and compute are queued
            eng.prefetch(layer + 1, guesses)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}"


def quantizer_tag(quantizer) -> str | None:
    """What names a quantizer's output in the variant cache: HQQ's solver with its version, or a
    quantizer's own `cache_tag`; None (no disk cache) for quantizers that give none."""
    from placement import hqq_backend

    if quantizer is hqq_backend:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"hqq-{version('hqq')}"
        except PackageNotFoundError:
            return "hqq"
    return getattr(quantizer, "cache_tag", None)


class Engine:
    """Takes over the routed experts of `model` (in place) and serves them by plan.

    `masters`: where expert masters are read from (default: the source `load_model` attached to
    the model, else the model's own expert tensors). `fingerprint`: of the weights (LoadedModel's);
    with it and a quantizer that has a cache tag, variants are cached on disk under
    `$QOS_CACHE_DIR` (`variant_cache`: a VariantCache to use instead, or False for none).
    `host_budget`: bytes the plan's host tier may hold (a plan over it is refused before anything
    is allocated). `keep_variants`: keep every quantized variant made in host memory (default:
    only without a disk cache and a host budget)."""

    def __init__(self, model: nn.Module, *, accel=None, quantizer=None, pin: bool | None = None,
                 use_kernels: bool | None = None, masters=None, fingerprint: str | None = None,
                 variant_cache=None, host_budget: int | None = None, keep_variants: bool | None = None):
        if quantizer is None:
            from placement import hqq_backend as quantizer
        if host_budget is not None and host_budget < 0:
            raise ValueError(f"host_budget={host_budget} must be >= 0 bytes")
        self.host_budget = host_budget
        self.adapter = adapter_for(model.config)
        self.spec = self.adapter.spec(model)
        self.accel = torch.device(accel if accel is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.on_cuda = self.accel.type == "cuda"
        # tokens per expert from which each precision's kernels run grouped (GROUPED_MIN_TOKENS_PER_EXPERT)
        self.grouping = grouping_thresholds(torch.cuda.get_device_name(self.accel) if self.on_cuda else None)
        self.pin = self.on_cuda if pin is None else pin
        self.host = torch.device("cpu")
        self.dtype = self.spec.dtype
        self.model = model
        self.plan: Plan | None = None
        self.stats = EngineStats()
        self.routed = torch.zeros(self.spec.num_layers, self.spec.num_experts, dtype=torch.long, device=self.accel)

        quantize_on = self.accel if self.on_cuda else self.host
        blocks = self.adapter.moe_blocks(model)
        if masters is None:
            masters = getattr(model, "qos_masters", None)
        if masters is None:
            from placement.masters import ModelMasters

            masters = ModelMasters([block.experts for _, block in blocks])
        if variant_cache is None and fingerprint is not None and quantizer_tag(quantizer) is not None:
            variant_cache = VariantCache(fingerprint, quantizer_tag(quantizer), self.dtype)
        self.variant_cache = variant_cache or None
        # without a disk cache (and a budget), derived variants stay in memory, so returning to an
        # earlier plan quantizes nothing
        keep = self.variant_cache is None and host_budget is None if keep_variants is None else keep_variants
        self.store = ExpertStore(self.spec, quantizer, masters, pin=self.pin, quantize_on=quantize_on,
                                 disk=self.variant_cache, keep_variants=keep)
        self.cache = FetchCache(self.store, self.accel, pin=self.pin)
        self.resident: dict[ExpertId, tuple[Layout, torch.Tensor, dict]] = {}  # accelerator tier
        self.act_fns = []  # per MoE layer
        self.gates = []  # per MoE layer, the router (its weight guesses the next layer's experts)
        self.fetch_layers = [False] * self.spec.num_layers  # MoE layers with fetched experts under the plan
        # expert -> routed inputs [n, H] and routing weights [n], while capturing (see capturing)
        self._capture: dict[ExpertId, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self._capture_limit = 0
        self._trace: list[tuple[int, torch.Tensor]] | None = None  # (layer, top_k_index [T, k]) while tracing

        for l, (_, block) in enumerate(blocks):
            fused = block.experts
            block.experts = EngineExperts(self, l, self.spec.num_experts)
            self.act_fns.append(fused.act_fn)
            self.gates.append(getattr(block, "gate", None))
            del fused
        # Fused kernels by default on CUDA only (on the CPU they run in Triton's slow interpreter).
        enabled = (self.on_cuda if use_kernels is None else use_kernels) and kernels.available(self.accel)
        if use_kernels and not enabled:
            log.warning("fused expert kernels are not available on %s (is triton installed?)", self.accel)
        self.kernel_tables = kernels.KernelTables(self.act_fns, self.layout, self.spec.num_experts, self.accel,
                                                  enabled=enabled)
        # Attention projections (Plan.attn_bits): where they are; while quantized ones serve, the
        # model's own nn.Linear modules, moved to host memory (so going back to 16 bits restores them
        # exactly), and the quantized variants made so far, in host memory (so returning to an
        # earlier precision quantizes nothing).
        self.attn_sites = self.adapter.attention_linears(model)
        self.attn_masters: dict[int, nn.Linear] = {}
        self.attn_variants: dict[tuple[int, int, int], torch.Tensor] = {}  # (site, bits, group) -> packed
        self.attn_key: tuple[int, int | None] = (16, None)  # (bits, group size) served now
        model.to(self.accel)
        self.nonexpert_bytes = tensor_bytes([*model.parameters(), *model.buffers()])
        if self.on_cuda:
            torch.cuda.empty_cache()

    # --- the parts, by the names callers know -------------------------------------------------
    @property
    def masters(self) -> dict[ExpertId, torch.Tensor]:
        return self.store.masters

    @property
    def variants(self) -> dict:
        return self.store.variants

    @property
    def host_weights(self) -> dict:
        return self.store.dequantized

    @property
    def slots(self) -> list[torch.Tensor]:
        return self.cache.slots

    @property
    def lru(self):
        return self.cache.lru

    @property
    def use_kernels(self) -> bool:
        return self.kernel_tables.enabled

    @property
    def fast_bits(self) -> list[tuple[int, ...]]:
        return self.kernel_tables.fast_bits

    @property
    def layer_eager(self) -> list[bool]:
        return self.kernel_tables.layer_eager

    def layout(self, bits: int, group_size: int) -> Layout:
        return self.store.layout(bits, group_size)

    def host_buffer(self, eid: ExpertId, bits: int, group_size: int) -> tuple[torch.Tensor, bool]:
        """The host buffer of `eid` at `bits`, quantizing from the master if it is not cached yet.
        Returns (buffer, whether it was quantized now)."""
        return self.store.buffer(eid, bits, group_size)

    def act_fn(self, layer: int):
        """The activation of MoE layer `layer`'s experts."""
        return self.act_fns[layer]

    def resident_buffer(self, eid: ExpertId) -> torch.Tensor:
        """The accelerator buffer of `eid`, which the current plan keeps on the accelerator."""
        return self.resident[eid][1]

    def _to_accel(self, buf: torch.Tensor) -> torch.Tensor:
        dev = torch.empty(buf.numel(), dtype=torch.uint8, device=self.accel)
        return dev.copy_(buf, non_blocking=self.pin)

    # --- serving ------------------------------------------------------------------------------
    def configure(self, *, use_kernels: bool | None = None) -> None:
        """Switch the fused kernels on or off (for side-by-side comparisons); speculative prefetch
        is a knob of the plan (`Plan.prefetch`)."""
        if use_kernels is not None:
            self.kernel_tables.enable(use_kernels and kernels.available(self.accel))
            for parent, name in self.attn_sites:
                if isinstance(getattr(parent, name), QuantLinear):
                    getattr(parent, name).use_kernel = self.use_kernels
            if self.plan is not None:
                self._refresh_tables()

    def _kernels_live(self) -> bool:
        return self.use_kernels and self.plan is not None and self._capture is None

    def kernel_path(self, tokens: int) -> bool:
        """Whether a layer call on `tokens` rows runs its accelerator experts as fused kernels (all
        of them, with no host sync)."""
        return self._kernels_live() and tokens <= KERNEL_MAX_TOKENS

    def kernel_bits(self, layer: int, tokens: int) -> tuple[int, ...]:
        """The precisions of MoE layer `layer` whose fused kernels run a call on `tokens` rows
        (kernel_max_tokens: past decode's limit the quantized ones only)."""
        if not self._kernels_live():
            return ()
        return tuple(b for b in self.kernel_tables.fast_bits[layer] if tokens <= kernel_max_tokens(b))

    def kernel_supported(self, layout: Layout, layer: int) -> bool:
        """Whether experts of `layout` in MoE layer `layer` run in the fused kernels at decode."""
        return self.kernel_tables.supported(layout, layer)

    def kernel_precisions(self, group_size: int, layer: int = 0) -> tuple[int, ...]:
        """The precisions that run in the fused kernels at decode in MoE layer `layer`."""
        return self.kernel_tables.fused_bits(layer, group_size)

    @property
    def capturable(self) -> bool:
        """A decode step never syncs with the host (every expert runs in a fused kernel), so it can
        be captured in a CUDA graph; `kernel_signature` changes when a new capture is needed."""
        return self.on_cuda and self.use_kernels and self.plan is not None and not any(self.layer_eager)

    @property
    def kernel_signature(self) -> tuple:
        # the attention's key too: a captured graph reads the projections' buffers of its capture
        return (self.plan.group_size if self.plan else None, tuple(self.fast_bits), tuple(self.layer_eager),
                self.attn_key)

    def run_expert(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Expert `expert` of MoE layer `layer` on x [n, H], served as the current plan says."""
        if self.plan is None:
            raise RuntimeError("the engine has no plan yet: call engine.apply(plan) before running the model")
        eid = ExpertId(layer, expert)
        state = self.plan.states[layer][expert]
        gs = self.plan.group_size
        act_fn = self.act_fns[layer]
        self.stats.expert_calls += 1
        path = serving_path(state, self.plan.offload)
        if path == ACCEL:
            layout, _, views = self.resident[eid]
            return expert_forward(layout, views, x, act_fn, self.store.dequantize)
        if path == CPU:
            self.stats.cpu_calls += 1
            y = gated_forward(self.store.host_weights(eid, state.bits, gs), x.to(self.host), act_fn)
            return y.to(x.device, non_blocking=False)
        assert path == FETCH
        slot = self._fetch(eid, state.bits, gs)
        layout, views = self.cache.slot_views[slot]
        self.cache.await_copy(slot)
        n = x.shape[0]
        if n <= kernel_max_tokens(layout.bits) and self.kernel_supported(layout, layer):
            table = self.cache.slot_table[slot : slot + 1]  # [1]: the slot's address
            if n < self.grouping[layout.bits]:  # a few rows: a slot (a weight read) each
                y = kernels.moe_experts(x, table.expand(n), x.new_ones(n), layout)
            else:  # every row as a token routed to the one expert: its weights read once for all n
                routed = torch.zeros(n, 1, dtype=torch.int64, device=x.device)
                y = kernels.moe_experts_grouped(x, table, routed, x.new_ones(n, 1), layout)
            y = y.to(x.dtype)
        else:
            y = expert_forward(layout, views, x, act_fn, self.store.dequantize)
        self.cache.release(slot)
        return y

    def _fetch(self, eid: ExpertId, bits: int, group_size: int, *, ahead: bool = False) -> int:
        """The fetch slot holding `eid` at `bits`, counting the lookup (`ahead`: a prefetch, counted
        apart from demand lookups)."""
        got = self.cache.fetch(eid, bits, group_size, ahead=ahead)
        s = self.stats
        s.bytes_fetched += got.copied
        if ahead:
            if got.copied:
                s.prefetch_issued += 1
        elif got.copied:
            s.fetch_misses += 1
        else:
            s.fetch_hits += 1
            if got.prefetch_hit:
                s.prefetch_hits += 1
        return got.slot

    def guess_next(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Experts the next MoE layer will likely route to (the mixtral-offloading trick: its router
        applied to this layer's input), when the plan prefetches and that layer has experts to
        fetch; None otherwise."""
        plan = self.plan
        if (plan is None or not plan.prefetch or plan.offload != "fetch" or layer + 1 >= len(self.gates)
                or hidden.shape[0] > KERNEL_MAX_TOKENS
                or len(self.slots) < PREFETCH_SLOTS_PER_TOP_K * self.spec.top_k
                or not self.fetch_layers[layer + 1]):
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
            if serving_path(state, self.plan.offload) == FETCH:
                self._fetch(ExpertId(layer, e), state.bits, gs, ahead=True)

    # --- reconfiguration ------------------------------------------------------------------------
    def check_host_budget(self, plan: Plan) -> None:
        """A ValueError (one line) if `plan`'s host tier does not fit the engine's host budget."""
        check_host_budget(plan, self.spec, self.host_budget)

    def apply(self, plan: Plan, *, progress: bool | None = None, stream_host: bool = False) -> ApplyReport:
        """Move to `plan`, touching only experts whose state differs; evict before loading. A plan
        whose host tier is over the host budget is refused before anything changes. `progress`:
        a progress bar while placing experts (default: when many must be quantized, on a terminal).
        `stream_host`: keep no host tier; host experts are made from their masters on each use
        (slow: for measurements such as selection scores under a plan the host budget cannot hold)."""
        plan.check_fits(self.spec)
        if not stream_host:
            self.check_host_budget(plan)
        start = time.perf_counter()
        if self.on_cuda:  # queued compute and copies may still read buffers this frees or overwrites
            torch.cuda.synchronize(self.accel)
        gs = plan.group_size
        base = self.plan if self.plan is not None and self.plan.group_size == gs else None
        moves = diff(plan, base, have_variant=lambda eid, bits: self.store.has_variant(eid, bits, gs))

        # Phase 1: free accelerator memory (experts leaving it, slots that no longer fit the plan).
        evicted = 0
        for eid in list(self.resident) if base is None else [m.expert for m in moves if m.frees_accel]:
            del self.resident[eid]
            evicted += 1
        n_slots, slot_bytes = plan.slots_used(), plan.slot_nbytes(self.spec)
        # cached slots hold (expert, bits) at the old group size: keep them only if that is unchanged
        if base is None or not self.cache.matches(n_slots, slot_bytes):
            self.cache.free()
        else:  # keep cached slots whose expert is still fetched at the same precision
            self.cache.keep_only(lambda eid, bits: plan.state(eid) == ExpertState(bits, "host"))
        # The attention projections change precision here: after the evictions, so going to 16 bits
        # loads only into freed room; going to 8 or 4 frees room before any expert loads.
        attn_swapped = self._set_attention(plan.attn_bits, gs)
        if self.on_cuda:
            torch.cuda.empty_cache()  # hand freed memory back to co-tenants, not just to our allocator

        # Phase 2: the host tier (drop what the plan no longer serves from the host, then make what
        # it does), then load accelerator experts and allocate slots.
        def still_on_cpu(key) -> bool:  # dequantized host experts stay while computed on the host as is
            eid, bits, group = key
            state = plan.state(eid)
            return group == gs and state.bits == bits and serving_path(state, plan.offload) == CPU

        self.store.keep_dequantized(still_on_cpu)  # before making new host buffers: peak host memory
        host_keys = set() if stream_host else {(eid, s.bits, gs) for eid, s in plan.items() if s.tier == "host"}
        new_host = len(host_keys - self.store.host.keys())
        loads = [m for m in moves if m.loads_accel]
        to_quantize = sum(m.requantize for m in moves)
        from tqdm import tqdm

        bar = tqdm(total=new_host + len(loads), desc="placing experts", unit="expert", leave=False,
                   disable=(not progress) if progress is not None else (to_quantize < 16 or None))
        requantized = self.store.set_host(host_keys, progress=bar.update)
        loaded = bytes_in = 0
        made, quantized_now = self.store.to_device_many([(m.expert, m.dst.bits, gs) for m in loads], self.accel,
                                                        progress=bar.update)  # quantized in batches
        requantized += quantized_now
        for m, dev in zip(loads, made):
            layout = self.layout(m.dst.bits, gs)
            self.resident[m.expert] = (layout, dev, layout.views(dev))
            loaded += 1
            bytes_in += dev.numel()
        bar.close()
        self.cache.allocate(n_slots, slot_bytes)
        if self.on_cuda:
            torch.cuda.synchronize(self.accel)
        self.plan = plan

        self._refresh_tables()
        report = ApplyReport(plan.plan_id, len(moves), loaded, evicted, requantized, bytes_in,
                             time.perf_counter() - start, new_host, attn_swapped)
        log.info("applied plan %s: %s", plan.plan_id, report)
        return report

    def _set_attention(self, bits: int, group_size: int) -> int:
        """Serve every attention projection at `bits` (16: the model's own nn.Linear; 8 or 4: a
        QuantLinear of `group_size` groups), one projection at a time, so accelerator memory grows by
        at most one matrix meanwhile. Returns how many projections changed."""
        key = (bits, None if bits == 16 else group_size)
        if key == self.attn_key:
            return 0
        quantizer, on = self.store.quantizer, self.store.quantize_on
        for i, (parent, name) in enumerate(self.attn_sites):
            if self.host_budget is not None:  # under a host budget only the served precision's variants stay
                for other in [k for k in self.attn_variants if k[0] == i and k[1:] != (bits, group_size)]:
                    del self.attn_variants[other]
            master = self.attn_masters.get(i, getattr(parent, name))  # the 16-bit nn.Linear
            if bits == 16:
                setattr(parent, name, master.to(self.accel))  # (the QuantLinear it replaces is freed)
                del self.attn_masters[i]
                continue
            layout = linear_layout(master.out_features, master.in_features, bits, self.dtype, group_size)
            host = self.attn_variants.get((i, bits, group_size))
            if host is None:
                q = quantizer.quantize(master.weight, bits, group_size, self.dtype, on)
                host = self.attn_variants[(i, bits, group_size)] = pack_linear(layout, q, on).to(self.host)
            bias = None if master.bias is None else master.bias.detach().to(self.accel, copy=True)
            setattr(parent, name, QuantLinear(layout, host.to(self.accel, copy=True), bias, use_kernel=self.use_kernels))
            if i not in self.attn_masters:
                self.attn_masters[i] = master.to(self.host)
        self.attn_key = key
        self.nonexpert_bytes = tensor_bytes([*self.model.parameters(), *self.model.buffers()])
        return len(self.attn_sites)

    def _refresh_tables(self) -> None:
        """Point the kernels' address tables at the experts the new plan keeps on the accelerator."""
        plan = self.plan
        self.fetch_layers = [any(serving_path(s, plan.offload) == FETCH for s in row) for row in plan.states]
        self.kernel_tables.refresh(plan, lambda eid: self.resident[eid][1].data_ptr())

    # --- accounting -------------------------------------------------------------------------------
    def memory(self) -> dict:
        """Bytes per tier, summed over the tensors the engine really holds. `host_bytes` is what
        the plan keeps resident in host memory (its host-tier experts, pinned when there is CUDA,
        for `cpu` offload the dequantized matrices made so far, and with quantized attention the
        16-bit projections set aside and the served precision's packed ones; Plan.host_bytes is
        its bound);
        `host_store_bytes` everything the engine holds on the host, with variants kept in memory
        (no disk cache) and the masters' own tensors (none for checkpoints and seeded built-ins)."""
        resident = tensor_bytes(buf for _, buf, _ in self.resident.values())
        slots = self.cache.nbytes()
        masters = [p for m in self.attn_masters.values() for p in m.parameters()]
        bits, gs = self.attn_key
        served = tensor_bytes(v for (_, b, g), v in self.attn_variants.items() if (b, g) == (bits, gs))
        set_aside = tensor_bytes(m.weight for m in self.attn_masters.values())  # (biases, a few kB: host_attn_bytes)
        attn_host = tensor_bytes(masters) + tensor_bytes(self.attn_variants.values())
        return {
            "gpu_bytes": self.nonexpert_bytes + resident + slots,
            "gpu_expert_bytes": resident,
            "gpu_slot_bytes": slots,
            "nonexpert_bytes": self.nonexpert_bytes,
            "host_bytes": self.store.host_bytes() + set_aside + served,
            "host_pinned_bytes": self.store.pinned_bytes(),
            "host_dequant_bytes": self.store.dequantized_bytes(),
            "host_master_bytes": self.store.source.resident_bytes(),
            "host_store_bytes": self.store.nbytes(),
            # the 16-bit attention projections set aside while quantized ones serve, and the
            # quantized variants made so far
            "host_attn_bytes": attn_host,
        }

    def router_frequencies(self) -> list[list[float]]:
        """Share of routed token slots each expert got since the last reset, per MoE layer."""
        counts = self.routed.double().cpu()
        totals = counts.sum(dim=1, keepdim=True).clamp(min=1)
        return (counts / totals).tolist()

    def reset_stats(self) -> None:
        self.stats = EngineStats()
        self.routed.zero_()

    # --- measurement hooks ------------------------------------------------------------------------
    @contextmanager
    def capturing(self, per_expert: int):
        """Within the block, keep up to `per_expert` routed inputs of each expert the model runs
        (on the per-expert path, fused kernels off): yields {ExpertId: [(x [n, H], weights [n])]}."""
        self._capture, self._capture_limit = {}, per_expert
        try:
            yield self._capture
        finally:
            self._capture = None

    @contextmanager
    def tracing(self):
        """Within the block, record each MoE layer call's routing: yields [(layer, top_k_index [T, k])]."""
        self._trace = []
        try:
            yield self._trace
        finally:
            self._trace = None

    def record(self, layer: int, expert: int, x: torch.Tensor, weights: torch.Tensor) -> None:
        """Keep up to the capture limit of routed inputs per expert (for sensitivity measurements)."""
        kept = self._capture.setdefault(ExpertId(layer, expert), [])
        room = self._capture_limit - sum(len(w) for _, w in kept)
        if room > 0:
            kept.append((x[:room].detach().clone(), weights[:room].detach().float().clone()))

    def expert_call(self, eid: ExpertId, bits: int, group_size: int, *, copy: bool = True):
        """`eid` at `bits` as a function of x [n, H] on the accelerator, whatever the current plan;
        its buffer is put on the accelerator once (a copy of it unless `copy` is False)."""
        key = (eid, bits, group_size)
        if not copy and self.host.type == self.accel.type and (key in self.store.host or key in self.store.variants):
            buf = self.store.buffer(eid, bits, group_size)[0]
        else:
            buf = self.store.to_device(eid, bits, group_size, self.accel)[0]
        layout = self.layout(bits, group_size)
        views = layout.views(buf)
        act_fn, dequantize = self.act_fns[eid.layer], self.store.dequantize
        return lambda x: expert_forward(layout, views, x, act_fn, dequantize)

    def expert_output(self, eid: ExpertId, bits: int, group_size: int, x: torch.Tensor) -> torch.Tensor:
        """`eid` at `bits` on inputs x [n, H] (on the accelerator), whatever the current plan."""
        return self.expert_call(eid, bits, group_size, copy=False)(x)
