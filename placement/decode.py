"""The one decoder: every command that generates (the server, `qos generate`, `qos profile`, the
benchmarks, the cost model's calibration) decodes through `Decoder`, so what is profiled is what is
served.

- A KV cache with one slot per running sequence (`SlotCache`): sequences join and leave between
  steps at their own positions, so one forward pass decodes every running sequence.
- A decode step over the slots [0, B) reads the cache up to a length bucket L (a power of two), and
  runs as one CUDA graph replay per (B, L) bucket when the engine's plan is capturable (every expert
  in the fused kernels, no host sync); eagerly otherwise. Graphs are captured on first use (or all at
  once, `capture_all`) and again after a reconfiguration changes the engine's kernel layout.
- Prefill writes one sequence's prompt (or a chunk of it) into its slot, eagerly; `prefill_many`
  packs chunks of several sequences into one forward (one row of tokens, each attending only to its
  own slot's positions), so a burst of prompts reads the experts once per forward, not per prompt.
- Greedy or sampled decoding per sequence (`Sampling`: temperature, top-p, seed, stop tokens).
- `fast_layers`: a decode step's attention, norms and router run as fused, compiled functions
  (placement/fast_layers.py) around the engine's experts, not through the model's modules.

Free slots in a decode batch compute garbage at the scratch position (the cache's last position,
which no sequence reaches) and are ignored; a sequence's attention sees only its own positions.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from placement import fast_layers as fl
from placement.engine import KERNEL_MAX_TOKENS, QUANTIZED_KERNEL_MAX_TOKENS

log = logging.getLogger(__name__)
FAST_FALLBACK = True  # a fast-layers step that fails (compiling) turns them off for its decoder (tests: False)


def _bucket(n: int, low: int, high: int) -> int:
    """The smallest power of two >= n (and >= low), capped at high."""
    b = low
    while b < n:
        b *= 2
    return min(b, high)


@dataclass(frozen=True)
class Sampling:
    """How a sequence picks its tokens: greedy at temperature 0, else sampled from the softmax at
    `temperature` within the top-p nucleus, reproducibly when `seed` is given."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        t, p = self.temperature, self.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        ids = self.stop_token_ids
        if not isinstance(ids, tuple) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ValueError(f"stop_token_ids must be a tuple of token ids, got {ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


class SlotCache:
    """Keys and values per attention layer as [slots, kv_heads, max_len, head_dim], allocated at a
    layer's first update. Hugging Face attention calls `update(k, v, layer)` and attends over what it
    returns; where those go is set before each forward (`for_decode` / `for_prefill`)."""

    def __init__(self, slots: int, max_len: int):
        self.slots, self.max_len = slots, max_len
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self._target: tuple = ()

    def for_decode(self, rows: torch.Tensor, pos: torch.Tensor, kv_len: int) -> None:
        """Next forward: token b of the batch is slot rows[b] at position pos[b] (both [B], on the device)."""
        self._target = ("decode", rows, pos, kv_len)

    def for_prefill(self, slot: int, start: int, kv_len: int) -> None:
        """Next forward: one sequence's tokens at positions start, start + 1, ... of `slot`."""
        self._target = ("prefill", slot, start, kv_len)

    def for_packed(self, rows: torch.Tensor, pos: torch.Tensor, read_rows: torch.Tensor,
                   read_pos: torch.Tensor) -> None:
        """Next forward: one packed row of several sequences' tokens; token j is slot rows[j] at
        position pos[j] ([N], on the device); attention reads slot read_rows[c] at position
        read_pos[c] for every column c ([K]: each sequence's positions, one sequence after another)."""
        self._target = ("packed", rows, pos, read_rows, read_pos)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # key_states [B, kv_heads, T, head_dim]
        if layer_idx not in self.k:
            B, heads, T, dim = key_states.shape
            shape = (self.slots, heads, self.max_len, dim)
            self.k[layer_idx] = key_states.new_zeros(shape)
            self.v[layer_idx] = value_states.new_zeros(shape)
        k, v = self.k[layer_idx], self.v[layer_idx]
        if self._target[0] == "decode":
            _, rows, pos, kv_len = self._target
            k[rows, :, pos] = key_states[:, :, 0]  # [B, heads, dim] (index tensors: capturable)
            v[rows, :, pos] = value_states[:, :, 0]
            B = rows.shape[0]
            return k[:B, :, :kv_len], v[:B, :, :kv_len]
        if self._target[0] == "packed":
            _, rows, pos, read_rows, read_pos = self._target
            k[rows, :, pos] = key_states[0].transpose(0, 1)  # [N, heads, dim]
            v[rows, :, pos] = value_states[0].transpose(0, 1)
            # [K, heads, dim] -> [1, heads, K, dim]: every packed sequence's positions, side by side
            return k[read_rows, :, read_pos].transpose(0, 1)[None], v[read_rows, :, read_pos].transpose(0, 1)[None]
        _, slot, start, kv_len = self._target
        T = key_states.shape[2]
        k[slot, :, start:start + T] = key_states[0]
        v[slot, :, start:start + T] = value_states[0]
        return k[slot:slot + 1, :, :kv_len], v[slot:slot + 1, :, :kv_len]

    def get_seq_length(self, *args, **kwargs) -> int:  # positions are always passed explicitly
        return 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.k.values(), *self.v.values()])


@dataclass(frozen=True)
class Generation:
    """One sequence decoded by `Decoder.generate`, timed."""

    ids: list[int]  # new tokens
    prompt_tokens: int
    ttft_s: float  # from the start of the call to this sequence's first token
    decode_tok_s: float | None  # this sequence's tokens after its first, per second of decoding
    total_s: float
    finish_reason: str  # "stop" (end-of-sequence or a stop token) or "length"

    @property
    def new_tokens(self) -> int:
        return len(self.ids)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.ttft_s


@dataclass(frozen=True)
class BatchTiming:
    """A `Decoder.generate` call: its sequences and the aggregate decode speed over its steps."""

    sequences: list[Generation]
    decode_tokens: int  # tokens produced by decode steps (all sequences)
    decode_s: float
    step_s: list[float] = field(default_factory=list)  # each decode step's time (its tokens' time per output token)
    stats: dict = field(default_factory=dict)  # the engine's counters over the decode steps

    @property
    def steps(self) -> int:
        return len(self.step_s)

    @property
    def decode_tok_s(self) -> float | None:
        """Aggregate: decode tokens of every sequence per second."""
        return self.decode_tokens / self.decode_s if self.decode_tokens and self.decode_s > 0 else None


class Decoder:
    """Decodes up to `max_seqs` sequences of up to `max_len` positions (prompt and new tokens) at
    once through `engine`'s model. Not thread-safe: one thread drives it (the executor's)."""

    MIN_KV = 64  # smallest attention length bucket
    # most (token, attended position) pairs of a packed prefill forward: its mask (and, with eager
    # attention, its scores per head) is that big; one whole 4096-token prompt's worth
    PACKED_MAX = 1 << 24

    def __init__(self, model, engine, *, max_seqs: int = 16, max_len: int = 2048, graphs: bool = True,
                 fast_layers: bool | str | None = None):
        if max_seqs < 1:
            raise ValueError(f"max_seqs must be >= 1, got {max_seqs}")
        context = getattr(model.config, "max_position_embeddings", None)
        if context is not None and max_len > context:
            raise ValueError(f"max_len={max_len} exceeds the model's context ({context})")
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        self.model, self.engine = model, engine
        self.device = engine.accel
        self.max_seqs, self.max_len = max_seqs, max_len
        self.scratch = max_len - 1  # the position free slots write to; sequences end before it
        self.cache = SlotCache(max_seqs, max_len)
        dev = self.device
        self.tok = torch.zeros(max_seqs, dtype=torch.long, device=dev)  # the token each slot feeds next
        self.pos = torch.full((max_seqs,), self.scratch, dtype=torch.long, device=dev)  # ... at this position
        self.active = torch.zeros(max_seqs, dtype=torch.bool, device=dev)
        self.rows = torch.arange(max_seqs, device=dev)
        self.kv_range = torch.arange(max_len, device=dev)
        self.logits: torch.Tensor | None = None  # [max_seqs, V] fp32, written by every step
        self.next_pos = [self.scratch] * max_seqs  # host mirror of pos
        self.sampling: dict[int, tuple[Sampling, torch.Generator | None]] = {}  # open slot -> ...
        self.decoding: set[int] = set()  # open slots that take part in decode steps
        self.use_graphs = graphs
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.signature = None
        self.pool = None
        self.reason: str | None = None  # why steps run eagerly, when they do
        self.mask_min = torch.finfo(engine.dtype).min
        self.quantized_prefill_rows = QUANTIZED_KERNEL_MAX_TOKENS  # see prefill_chunk
        # transformers renamed the model's cache argument (past_key_values -> cache) in 5.2x
        params = inspect.signature(model.model.forward).parameters if hasattr(model, "model") else {}
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.fast = self._fast_layers(fast_layers)
        self.fast_reason: str | None = None  # why the last decode step did not run fast_layers

    def _fast_layers(self, setting) -> fl.FastLayers | None:
        """Decode steps through fast_layers: `setting` on/off or a mode (fast_layers.MODES); None:
        $QOS_FAST_LAYERS, else on with CUDA. A model it does not support refuses an explicit
        setting and is served by the model's own modules otherwise."""
        env = os.environ.get("QOS_FAST_LAYERS")
        mode = fl.parse_mode(setting if setting is not None else env if env is not None else self.device.type == "cuda")
        if mode is None:
            return None
        why = fl.unsupported(self.model, self.max_len)
        if why is not None:
            if setting is not None:
                raise ValueError(f"fast_layers: {why}")
            log.info("decode steps through the model's modules: %s", why)
            return None
        return fl.FastLayers(self.model, self.cache, mode=mode)

    # --- slots --------------------------------------------------------------------------------
    def free_slots(self) -> list[int]:
        return [s for s in range(self.max_seqs) if s not in self.sampling]

    def open(self, slot: int, sampling: Sampling = GREEDY) -> None:
        """Take `slot` for a sequence that samples by `sampling`; it joins the decode steps at feed()."""
        if slot in self.sampling:
            raise RuntimeError(f"slot {slot} is taken")
        gen = None
        if not sampling.greedy:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(sampling.seed if sampling.seed is not None else int(torch.randint(1 << 62, ()).item()))
        self.sampling[slot] = (sampling, gen)

    def prefill(self, slot: int, ids: list[int], start: int = 0) -> torch.Tensor:
        """Write the keys and values of `ids` at positions start, start + 1, ... of `slot`; the
        logits after the last of them ([V], fp32)."""
        return self.prefill_many([(slot, ids, start)])[0]

    def prefill_many(self, chunks: list[tuple[int, list[int], int]]) -> torch.Tensor:
        """prefill() of several sequences in one forward: chunks are (slot, ids, start), one per
        slot; the logits after each chunk's last token ([len(chunks), V], fp32). The chunks are
        packed into one row of tokens (no padding: the experts see only real tokens), each attending
        to its own slot's positions up to its own length bucket; where that attention (tokens x
        every chunk's positions) would pass PACKED_MAX, the chunks go in several forwards. Callers
        keep the rows of a forward within prefill_chunk (the fused kernels' limit for quantized
        experts)."""
        if not chunks:
            raise ValueError("prefill_many needs at least one chunk")
        if len({slot for slot, _, _ in chunks}) != len(chunks):
            raise ValueError(f"a slot appears twice among {[slot for slot, _, _ in chunks]}")
        for slot, ids, start in chunks:
            end = start + len(ids)
            if not ids or start < 0 or end > self.scratch:
                raise ValueError(f"positions {start}..{end - 1} do not fit the cache ({self.scratch} positions)")
            if not 0 <= slot < self.max_seqs:
                raise ValueError(f"slot {slot} is not one of the {self.max_seqs} slots")
        groups, rows, cols = [[]], 0, 0
        for chunk in chunks:
            n, span = len(chunk[1]), _bucket(chunk[2] + len(chunk[1]), self.MIN_KV, self.max_len)
            if groups[-1] and (rows + n) * (cols + span) > self.PACKED_MAX:
                groups.append([])
                rows = cols = 0
            groups[-1].append(chunk)
            rows, cols = rows + n, cols + span
        with torch.no_grad():
            return torch.cat([self._prefill_packed(g) for g in groups]) if len(groups) > 1 else self._prefill_packed(chunks)

    def _prefill_packed(self, chunks: list[tuple[int, list[int], int]]) -> torch.Tensor:
        """One forward of prefill_many's (checked) chunks: [len(chunks), V]."""
        dev = self.device
        if len(chunks) == 1:  # one sequence: its slot's cache as is
            slot, ids, start = chunks[0]
            end = start + len(ids)
            kv_len = _bucket(end, self.MIN_KV, self.max_len)
            x = torch.tensor([ids], device=dev)  # [1, T]
            positions = torch.arange(start, end, device=dev)
            allowed = self.kv_range[None, :kv_len] <= positions[:, None]  # [T, L]
            self.cache.for_prefill(slot, start, kv_len)
            logits = self._forward(x, positions[None], allowed[None, None])  # [1, 1, V]: the last position
            return logits[0, -1:].float()
        S = len(chunks)
        lengths = [len(ids) for _, ids, _ in chunks]
        spans = [_bucket(start + n, self.MIN_KV, self.max_len) for (_, _, start), n in zip(chunks, lengths)]
        N, K = sum(lengths), sum(spans)
        # one host-to-device copy: the tokens, then per chunk its slot, start, length and span
        flat = [t for _, ids, _ in chunks for t in ids]
        info = torch.tensor(flat + [slot for slot, _, _ in chunks] + [start for _, _, start in chunks]
                            + lengths + spans, device=dev)
        x, slots, starts, lens, span = info[:N], *info[N:].view(4, S)
        seq = torch.arange(S, device=dev)
        tok_seq = seq.repeat_interleave(lens, output_size=N)  # [N]: the chunk of each token
        first_tok = lens.cumsum(0) - lens
        pos = starts[tok_seq] + torch.arange(N, device=dev) - first_tok[tok_seq]  # [N]
        col_seq = seq.repeat_interleave(span, output_size=K)  # [K]: the chunk of each attended column
        col_pos = torch.arange(K, device=dev) - (span.cumsum(0) - span)[col_seq]  # [K]
        allowed = (tok_seq[:, None] == col_seq[None, :]) & (col_pos[None, :] <= pos[:, None])  # [N, K]
        self.cache.for_packed(slots[tok_seq], pos, slots[col_seq], col_pos)
        last = first_tok + lens - 1  # each chunk's last token
        logits = self._forward(x[None], pos[None], allowed[None, None], keep=last)  # [1, S, V]
        return logits[0].float()

    @property
    def prefill_chunk(self) -> int:
        """Prompt tokens per prefill forward (all sequences packed in it together). Quantized
        experts on the accelerator run in the fused kernels only up to the engine's limit for them
        (QUANTIZED_KERNEL_MAX_TOKENS; beyond it they are dequantized whole at every forward), so
        their prompts are prefilled in chunks of that size (`quantized_prefill_rows`, which a
        benchmark may change); 16-bit experts are fastest as whole matrix products: no limit (every
        slot's whole context), a scheduler's token budget bounds those forwards."""
        plan = self.engine.plan
        if plan is not None and self.engine.use_kernels and any(
                s.bits < 16 and s.tier == "accel" for row in plan.states for s in row):
            return self.quantized_prefill_rows
        return self.max_len * self.max_seqs

    def prefill_all(self, slot: int, ids: list[int]) -> torch.Tensor:
        """prefill() of a whole prompt, in chunks of prefill_chunk; the logits after its last token."""
        return self.prefill_prompts({slot: ids})[slot]

    def prefill_prompts(self, prompts: dict[int, list[int]], on_done=None) -> dict[int, torch.Tensor]:
        """prefill() of whole prompts (slot -> ids), as the server prefills a burst: their tokens
        packed into forwards of up to prefill_chunk rows, several prompts each (a forward reads every
        expert once however many prompts it carries), a prompt that overflows a forward going on in
        the next. Returns each slot's logits after its last token; `on_done(slot, logits)` runs as
        soon as the forward that completes a prompt is queued."""
        last = {}
        for pack in pack_chunks([(slot, 0, len(ids)) for slot, ids in prompts.items()], self.prefill_chunk):
            logits = self.prefill_many([(slot, prompts[slot][a:b], a) for slot, a, b in pack])
            for (slot, _, b), row in zip(pack, logits):
                if b == len(prompts[slot]):
                    last[slot] = row
                    if on_done is not None:
                        on_done(slot, row)
        return last

    def feed(self, slot: int, token: int | torch.Tensor, position: int) -> None:
        """The open slot joins the decode steps: the next step feeds `token` at `position`."""
        if position >= self.scratch:
            raise ValueError(f"position {position} is past the cache ({self.scratch} positions)")
        self.tok[slot] = token
        self.pos[slot] = position
        self.active[slot] = True
        self.next_pos[slot] = position
        self.decoding.add(slot)

    def close(self, slot: int) -> None:
        """The slot's sequence is done (its cache is simply overwritten by the next occupant)."""
        self.sampling.pop(slot, None)
        self.decoding.discard(slot)
        self.active[slot] = False
        self.pos[slot] = self.scratch
        self.next_pos[slot] = self.scratch

    # --- sampling -----------------------------------------------------------------------------
    def sample_many(self, slots: list[int], logits: torch.Tensor) -> list[int]:
        """The next token of each open slot in `slots` from its row of logits [len(slots), V], with
        one host sync for all."""
        if not slots:
            return []
        nxt = logits.argmax(-1)
        for i, s in enumerate(slots):
            if not self.sampling[s][0].greedy:
                nxt[i] = self.sample(s, logits[i])
        return nxt.tolist()

    def sample(self, slot: int, logits: torch.Tensor) -> torch.Tensor:
        """The next token of open slot `slot` from its logits [V] (a 0-d tensor on the device)."""
        s, gen = self.sampling[slot]
        if s.greedy:
            return logits.argmax()
        z = logits / s.temperature
        if s.top_p < 1:
            probs, order = torch.softmax(z, -1).sort(descending=True)
            outside = probs.cumsum(-1) - probs > s.top_p  # tokens after the nucleus is full
            z = z.scatter(0, order, torch.where(outside, float("-inf"), z.gather(0, order)))
        return torch.multinomial(torch.softmax(z, -1), 1, generator=gen)[0]

    # --- steps --------------------------------------------------------------------------------
    def _forward(self, input_ids, position_ids, allowed, keep: int | torch.Tensor = 1):
        """The model on input_ids [B, T] at position_ids [B, T] attending where allowed [B, 1, T, L];
        logits of the last position [B, 1, V] (or of the positions `keep`, a 1-d index tensor)."""
        mask = torch.where(allowed, 0.0, self.mask_min).to(self.engine.dtype)  # additive: eager and sdpa
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                         cache_position=position_ids[0], use_cache=True, logits_to_keep=keep,
                         **{self._cache_arg: self.cache})
        return out.logits

    def _decode_forward(self, B: int, kv_len: int) -> None:
        """Slots [0, B) advance one position: logits into self.logits[:B]."""
        pos = self.pos[:B]
        self.cache.for_decode(self.rows[:B], pos, kv_len)
        allowed = self.kv_range[None, :kv_len] <= pos[:, None]  # [B, L]
        self.fast_reason = "off" if self.fast is None else None if self.fast.ready() else self.fast.reason
        if self.fast_reason is None:
            try:
                self.logits[:B].copy_(self.fast.forward(self.tok[:B], pos, self.rows[:B], allowed))
                return
            except Exception as e:  # compiling failed (not in a capture: graphs are warmed up first)
                if not FAST_FALLBACK or (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
                    raise
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                log.warning("fast layers off for this decoder, steps run through the model's modules: %s: %s",
                            type(e).__name__, first)
                self.fast, self.fast_reason = None, f"failed: {type(e).__name__}"
        logits = self._forward(self.tok[:B, None], pos[:, None], allowed[:, None, None])
        self.logits[:B].copy_(logits[:, -1])

    def _graph_for(self, B: int, kv_len: int):
        """The CUDA graph of a decode step of this bucket, captured now if needed; None when the
        engine's plan cannot be captured (self.reason says why)."""
        eng = self.engine
        if not self.use_graphs:
            self.reason = "graphs are off"
        elif self.device.type != "cuda":
            self.reason = "no CUDA device"
        elif not eng.capturable or not eng.kernel_path(B):
            self.reason = "the plan has experts outside the fused kernels (host experts or 3-bit)"
        else:
            self.reason = None
        if self.reason is not None:
            return None
        if self.signature != eng.kernel_signature:  # reconfigured: the old graphs read stale tables
            self.graphs.clear()
            self.pool = None  # freed with its graphs; capturing into its handle again trips the allocator
            self.signature = eng.kernel_signature
        key = (B, kv_len)
        if key not in self.graphs:
            if self.fast is not None:
                self.fast.ready()  # (re)fuse weights here, not on the warm-up stream or in the capture
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm up (kernels compiled, workspaces made): same writes
                self._decode_forward(B, kv_len)
            torch.cuda.current_stream(self.device).wait_stream(side)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):  # graphs run one at a time: one pool
                self._decode_forward(B, kv_len)
            self.graphs[key] = graph
        return self.graphs[key]

    def buckets(self) -> list[tuple[int, int]]:
        """Every (batch, attention length) bucket a decode step can take."""
        def powers(low: int, high: int) -> list[int]:  # what _bucket gives for 1..high
            out = [min(low, high)]
            while out[-1] < high:
                out.append(min(2 * out[-1], high))
            return out

        return [(b, n) for b in powers(1, self.max_seqs) for n in powers(self.MIN_KV, self.max_len)]

    @torch.no_grad()
    def capture_all(self) -> int:
        """Capture the graph of every bucket now (a server does before its first request, so no
        request waits for a capture); graphs are captured lazily otherwise. Needs the decoder idle.
        The number of graphs captured (0 when the plan is not capturable or there is no CUDA)."""
        if self.sampling:
            raise RuntimeError("the decoder is serving sequences; capture_all() needs it idle")
        self._ensure_logits()
        before = len(self.graphs)
        for b, n in self.buckets():
            if self._graph_for(b, n) is None:
                return 0
        return len(self.graphs) - before

    @torch.no_grad()
    def warm_up(self) -> int:
        """Before serving (needs the decoder idle): run a prefill of every size up to the fused
        kernels' limit that picks its own kernel configuration, so no prompt chunk a scheduler cuts
        to such a size waits for Triton to compile (seconds, once per process), then capture every
        decode graph (capture_all). What it routes is not counted. The number of graphs captured."""
        if self.sampling:
            raise RuntimeError("the decoder is serving sequences; warm_up() needs it idle")
        eng = self.engine
        if self.device.type == "cuda" and eng.use_kernels and eng.plan is not None:
            routed, stats = eng.routed.clone(), replace(eng.stats)
            for n in sorted({*range(1, 17), 24, 32, 48, KERNEL_MAX_TOKENS}):
                if n <= min(KERNEL_MAX_TOKENS, self.scratch):
                    self.prefill(0, [0] * n)  # slot 0 is free: its next occupant overwrites this
            self._sync()
            eng.routed.copy_(routed)
            eng.stats = stats
        return self.capture_all()

    def _ensure_logits(self) -> None:
        if self.logits is None:
            V = self.model.get_output_embeddings().weight.shape[0]
            self.logits = torch.zeros(self.max_seqs, V, dtype=torch.float32, device=self.device)

    @torch.no_grad()
    def time_steps(self, batch: int, kv_len: int, steps: int) -> float:
        """Seconds per decode step of `batch` slots over `kv_len` positions, `steps` of them back to
        back with one sync at the end: no sampling, no host in the loop, the engine's own speed (a
        benchmark's yardstick for what serving adds). Needs the decoder idle (free slots only)."""
        if self.sampling:
            raise RuntimeError("the decoder is serving sequences; time_steps() needs it idle")
        self._ensure_logits()
        graph = self._graph_for(batch, kv_len)
        run = graph.replay if graph is not None else (lambda: self._decode_forward(batch, kv_len))
        run()
        self._sync()
        t = time.perf_counter()
        for _ in range(steps):
            run()
        self._sync()
        return (time.perf_counter() - t) / steps

    @torch.no_grad()
    def step(self) -> dict[int, int]:
        """One decode step of every active slot; {slot: its new token}. Each slot then feeds its
        new token at the next position."""
        if not self.decoding:
            return {}
        slots = sorted(self.decoding)
        B = _bucket(slots[-1] + 1, 1, self.max_seqs)
        kv_len = _bucket(max(self.next_pos[s] for s in slots) + 1, self.MIN_KV, self.max_len)
        self._ensure_logits()
        graph = self._graph_for(B, kv_len)
        if graph is not None:
            graph.replay()
        else:
            self._decode_forward(B, kv_len)
        logits = self.logits[:B]
        nxt = logits.argmax(-1)  # [B]
        for s in slots:
            if not self.sampling[s][0].greedy:
                nxt[s] = self.sample(s, logits[s])
        active = self.active[:B]
        self.tok[:B] = torch.where(active, nxt, self.tok[:B])
        self.pos[:B] += active.long()
        for s in slots:
            self.next_pos[s] += 1
        got = nxt.tolist()  # the one host sync of a step
        return {s: got[s] for s in slots}

    # --- a whole batch, timed (generate, profile, benchmarks) -------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, *, sampling: Sampling = GREEDY,
                 eos_token_id: int | list[int] | None = None, fixed_length: bool = False,
                 between_steps=None) -> BatchTiming:
        """Decode every prompt (one slot each, all at once; the prompts prefilled together, packed as
        the server prefills a burst) to `max_new_tokens` or its end of sequence (never with
        `fixed_length`), timed: per sequence its time to first token and decode
        speed, and the batch's aggregate decode speed. `between_steps()` runs after each step."""
        if not prompts or len(prompts) > self.max_seqs:
            raise ValueError(f"give 1 to {self.max_seqs} prompts, got {len(prompts)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        for p in prompts:
            if not p:
                raise ValueError("a prompt is empty after tokenization")
            if len(p) + max_new_tokens > self.scratch:
                raise ValueError(f"prompt ({len(p)}) plus new tokens ({max_new_tokens}) exceed the cache "
                                 f"({self.scratch} positions)")
        if self.sampling:
            raise RuntimeError("the decoder is serving sequences; generate() needs it idle")
        stop = set() if fixed_length else {*eos_ids(eos_token_id), *sampling.stop_token_ids}
        sync = self._sync
        sync()
        t0 = time.perf_counter()
        out: dict[int, list[int]] = {}
        first_at: dict[int, float] = {}
        done_at: dict[int, float] = {}

        def prefilled(slot: int, logits: torch.Tensor) -> None:
            first = int(self.sample(slot, logits))
            first_at[slot] = time.perf_counter()  # (int() synced)
            out[slot] = [first]
            if max_new_tokens > 1 and first not in stop:
                self.feed(slot, first, len(prompts[slot]))
            else:
                self.close(slot)
                done_at[slot] = first_at[slot]

        for slot in range(len(prompts)):
            self.open(slot, sampling)
        self.prefill_prompts(dict(enumerate(prompts)), prefilled)  # packed, as the server prefills
        before = asdict(self.engine.stats)
        t1 = time.perf_counter()
        decode_tokens, step_s, last = 0, [], t1
        while self.decoding:
            new = self.step()
            decode_tokens += len(new)
            now = time.perf_counter()  # (step() synced)
            step_s.append(now - last)
            for s, t in new.items():
                out[s].append(t)
                if len(out[s]) >= max_new_tokens or t in stop:
                    self.close(s)
                    done_at[s] = now
            if between_steps is not None:
                between_steps()
            last = time.perf_counter()
        t2 = time.perf_counter()
        seqs = []
        for s, p in enumerate(prompts):
            n = len(out[s]) - 1
            span = done_at[s] - first_at[s]
            reason = "stop" if out[s][-1] in stop else "length"
            seqs.append(Generation(out[s], len(p), first_at[s] - t0, n / span if n and span > 0 else None,
                                   done_at[s] - t0, reason))
        stats = {k: v - before[k] for k, v in asdict(self.engine.stats).items()}
        return BatchTiming(seqs, decode_tokens, t2 - t1, step_s, stats)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def pack_chunks(chunks: list[tuple], rows: int) -> list[list[tuple]]:
    """Chunks (key, start, end) of token ranges cut into forwards of at most `rows` tokens, in
    order; a chunk that overflows a forward goes on in the next one, so a key appears at most once
    per forward when it appears once among the chunks."""
    packs, pack, room = [], [], rows
    for key, start, end in chunks:
        while start < end:
            n = min(room, end - start)
            pack.append((key, start, start + n))
            start, room = start + n, room - n
            if room == 0:
                packs.append(pack)
                pack, room = [], rows
    if pack:
        packs.append(pack)
    return packs


def eos_ids(eos: int | list[int] | None) -> list[int]:
    """A tokenizer's or config's end-of-sequence id(s) as a list."""
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)
