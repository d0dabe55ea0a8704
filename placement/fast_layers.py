"""A decode step's non-expert work in a few kernels per layer (issue 16, item 2).

Through Hugging Face's modules a decode step of Mixtral-8x7B launches about 58 kernels per layer
besides the routed experts (H200, 4-bit experts, batch 1: 0.138 of 0.266 ms per layer): separate
q/k/v GEMVs with split-K reductions, RMSNorm and rotary as chains of elementwise ops, KV-cache
writes, casts, the router's softmax and top-k. `FastLayers` runs the same math as pure tensor
functions, one call per layer, that `torch.compile` (inductor) fuses:

    residual add + RMSNorm -> one q/k/v GEMV (one concatenated weight) -> [q/k norms] -> rotary ->
    KV-slot write -> attention over the slot cache -> o_proj + residual -> RMSNorm -> router GEMV,
    softmax, top-k, renormalize [-> shared expert]

and leaves the routed experts to the engine: each layer's `EngineExperts` module is called between
two compiled calls exactly as the model's MoE block calls it (fused kernels, host tiers, fetch
slots, prefetch and routing counts all unchanged). The functions take weights as arguments and the
model's shapes as constants, so every layer shares one compiled graph; the batch, the attention
length and the cache's size are dynamic, so a process compiles a handful of graphs (batch 1 and
batch > 1, attending to all of the cache or part of it, MoE and dense layers, the final norm and
LM head), not one per bucket or decoder. Nothing syncs with the host: the decoder captures a
step with these calls in its CUDA graph as it does the Hugging Face one.

q/k/v are fused without a copy of the weights: the three nn.Linear weights (and biases) become views
of one [q+k+v, H] tensor, so the model's own modules (prefill, perplexity) read the same memory.
When the engine swaps the projections (Plan.attn_bits: quantized ones, or the 16-bit ones put
back as separate tensors), `ready()` notices: quantized projections (qlinear.QuantLinear, their own
Triton kernels) are called between three compiled pieces per layer (norm; rotary, cache and
attention; o_proj's residual, norm and router), q/k/v as one launch (qlinear.QuantGroup); 16-bit
ones are fused again.

Modes: "compile" (inductor, extern cuBLAS matrix products but the router's at batch 1, a
reduction inductor writes; the router's top-k as max passes fused with its softmax),
"compile-reduce" (the same, but at batch 1 the projections and the attention are written as
multiply-and-sum reductions, so inductor generates them and fuses their neighbours),
"compile-autotune" (inductor's max-autotune: matrix products may become Triton templates with fused
epilogues; minutes of compiling) and "eager" (the same functions uncompiled: fewer kernels than
Hugging Face's modules, no compile time). Which is fastest is the GPU's to say
(`python -m experiments.profile_step --fast-layers off,compile,compile-reduce,compile-autotune`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from placement.qlinear import QuantGroup

MODES = ("compile", "compile-reduce", "compile-autotune", "eager")
# Module classes whose forward the functions below reproduce (transformers 5.x); anything else
# keeps the Hugging Face path.
ATTENTION = {"MixtralAttention": "none", "Qwen2MoeAttention": "none", "Qwen3MoeAttention": "head",
             "OlmoeAttention": "full"}  # -> where q/k are normalized: not, per head, over the whole width
MOE_BLOCKS = {"MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock", "OlmoeSparseMoeBlock"}
ROUTERS = {"MixtralTopKRouter", "Qwen2MoeTopKRouter", "Qwen3MoeTopKRouter", "OlmoeTopKRouter"}
DENSE_MLPS = {"Qwen2MoeMLP", "Qwen3MoeMLP"}  # layers outside the MoE (mlp_only_layers, sparse steps)
NORMS = {"MixtralRMSNorm", "Qwen2MoeRMSNorm", "Qwen3MoeRMSNorm", "OlmoeRMSNorm"}


def parse_mode(value) -> str | None:
    """A fast-layers setting (True/False, "on"/"off", "1"/"0", or a mode) as a mode or None (off)."""
    if value is None or value is False:
        return None
    if value is True:
        return "compile"
    text = str(value).strip().lower()
    if text in ("0", "off", "false", "no", ""):
        return None
    if text in ("1", "on", "true", "yes"):
        return "compile"
    if text not in MODES:
        raise ValueError(f"fast_layers must be on, off or one of {', '.join(MODES)}; got {value!r}")
    return text


def unsupported(model: nn.Module, max_len: int) -> str | None:
    """Why `model`'s decode steps cannot run through FastLayers, or None when they can."""
    config = model.config
    if model.training:
        return "the model is in training mode"
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager", None):
        return f"attention implementation {impl!r} (only sdpa and eager are reproduced)"
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mixtral" and window is not None and window < max_len:
        return f"sliding-window attention ({window} < max_len {max_len})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(model.model, "rotary_emb") or not hasattr(model.model, "norm"):
        return "not a decoder of the supported shape (model.model.layers, rotary_emb, norm)"
    eps = getattr(config, "rms_norm_eps", None)
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        name = type(attn).__name__
        if name not in ATTENTION:
            return f"layer {i}: attention {name}"
        if getattr(attn, "sliding_window", None) and attn.sliding_window < max_len:
            return f"layer {i}: sliding-window attention"
        if len({getattr(getattr(attn, n, None), "bias", None) is None for n in ("q_proj", "k_proj", "v_proj")}) > 1:
            return f"layer {i}: some of q/k/v have a bias, some not"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm,
                     *([attn.q_norm, attn.k_norm] if ATTENTION[name] != "none" else [])):
            if type(norm).__name__ not in NORMS or norm.variance_epsilon != eps:
                return f"layer {i}: norm {type(norm).__name__} (eps {getattr(norm, 'variance_epsilon', None)})"
        kind = type(mlp).__name__
        if kind in MOE_BLOCKS:
            if type(mlp.gate).__name__ not in ROUTERS:
                return f"layer {i}: router {type(mlp.gate).__name__}"
            if type(mlp.experts).__name__ != "EngineExperts":
                return f"layer {i}: experts not served by the engine"
        elif kind not in DENSE_MLPS:
            return f"layer {i}: MLP {kind}"
    if type(model.model.norm).__name__ not in NORMS or model.model.norm.variance_epsilon != eps:
        return "final norm"
    return None


# --- the pure functions ------------------------------------------------------------------------

def _rms(x, w, eps: float):
    """RMSNorm as transformers computes it: statistics in fp32, the weight applied in x's dtype."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _topk(p, k: int):
    """torch.topk(p, k, -1) for a few experts, as k max passes over the row, each masking the one
    before with a where, so a compiler can fuse them with the softmax (torch.topk is a library call
    of its own; with a gather and a scatter between the passes inductor made four kernels of them on
    the H200). Largest first; ties to the lower index, as torch.argmax."""
    values, indices = [], []
    ids = torch.arange(p.shape[-1], device=p.device)
    for _ in range(k):
        i = p.argmax(-1, keepdim=True)  # [B, 1]
        values.append(p.amax(-1, keepdim=True))
        indices.append(i)
        p = torch.where(ids == i, float("-inf"), p)
    return torch.cat(values, -1), torch.cat(indices, -1)


def _reduce_linear(x, w):
    """x [1, K] @ w.T as a multiply-and-sum that a compiler generates and fuses (nothing materialized),
    in fp32, rounded to x's dtype as a matrix product's output is."""
    return (x[:, None, :].float() * w[None].float()).sum(-1).to(x.dtype)


def _make_functions(*, heads: int, kv_heads: int, head_dim: int, scaling: float, eps: float, qk_norm: str,
                    clip: float | None, top_k: int, router_cast: bool, norm_topk: bool, reduce: bool,
                    fused_topk: bool, reduce_router: bool):
    """The per-layer functions of one model. They close over plain numbers only, so dynamo guards
    them by value and every layer (and every decoder of the same model) shares the compiled code."""
    q_width, kv_width, groups = heads * head_dim, kv_heads * head_dim, heads // kv_heads

    def linear(x, w, b=None):  # x [B, K], w [N, K] -> [B, N]
        if reduce and x.shape[0] == 1:  # (a static branch: batch 1 is specialized)
            y = _reduce_linear(x, w)
            return y if b is None else y + b
        return F.linear(x, w, b)

    def residual(h, d1, d2):
        """h [B, H] the residual stream plus d1 (and d2) [B, H], the previous layer's MLP output(s).
        The routed experts' d1 comes in fp32 (the kernels' sum) and is rounded to h's dtype here, as
        the experts module would have: the same numbers, without a launch of its own."""
        d1 = d1.to(h.dtype)
        return h + (d1 if d2 is None else d1 + d2)

    def pre(h, d1, d2, ln1):
        """The residual stream after the previous layer's MLP output(s) and its norm."""
        h = residual(h, d1, d2)
        return h, _rms(h, ln1, eps)

    def core(q, k, v, qn, kn, cos, sin, kc, vc, rows, pos, allowed):
        """q [B, heads * D], k, v [B, kv_heads * D] projected; cos, sin [B, 1, D]; kc, vc
        [slots, kv_heads, max_len, D] this layer's cache, written at rows, pos [B]; allowed [B, L]
        the positions each token attends to. The attention's output [B, heads * D], before o_proj."""
        B = q.shape[0]
        if qk_norm == "full":
            q, k = _rms(q, qn, eps), _rms(k, kn, eps)
        q, k, v = q.reshape(B, heads, head_dim), k.reshape(B, kv_heads, head_dim), v.reshape(B, kv_heads, head_dim)
        if qk_norm == "head":
            q, k = _rms(q, qn, eps), _rms(k, kn, eps)
        if clip is not None:
            q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
        q = q * cos + _rotate_half(q) * sin  # [B, heads, D]
        k = k * cos + _rotate_half(k) * sin
        kc[rows, :, pos] = k  # [B, kv_heads, D] into the slots
        vc[rows, :, pos] = v
        L = allowed.shape[1]
        keys, values = kc[:B, :, :L], vc[:B, :, :L]  # [B, kv_heads, L, D] (rows are 0..B-1)
        qg = q.reshape(B, kv_heads, groups, head_dim)
        if reduce and B == 1:
            scores = (qg[:, :, :, None, :].float() * keys[:, :, None, :, :].float()).sum(-1)
        else:
            scores = torch.matmul(qg, keys.transpose(-1, -2)).float()  # [B, kv_heads, groups, L]
        scores = torch.where(allowed[:, None, None, :], scores * scaling, float("-inf"))
        p = torch.softmax(scores, dim=-1).to(q.dtype)
        if reduce and B == 1:
            o = (p[..., None].float() * values[:, :, None, :, :].float()).sum(-2).to(q.dtype)
        else:
            o = torch.matmul(p, values)  # [B, kv_heads, groups, D]
        return o.reshape(B, q_width)

    def route(x, wg, s_gate, s_up, s_down, s_w):
        """The router on x [B, H] (and the shared expert, where there is one): top_k_index [B, k],
        top_k_weights [B, k], the shared expert's output [B, H] or None."""
        # [B, E]; at batch 1 compiled, a reduction: a library GEMV of a few rows took two kernels
        # (split K and its reduction), 5.3 µs a layer on the H200 for 64 KB
        logits = _reduce_linear(x, wg) if reduce_router and x.shape[0] == 1 else linear(x, wg)
        topk = _topk if fused_topk else (lambda p, k: torch.topk(p, k, dim=-1))
        if router_cast:  # Qwen / OLMoE: weights in the model's dtype
            top, idx = topk(torch.softmax(logits, dim=-1, dtype=torch.float32), top_k)
            if norm_topk:
                top = top / top.sum(-1, keepdim=True)
            top = top.to(logits.dtype)
        else:  # Mixtral: softmax of fp32 logits, always renormalized, fp32 weights
            top, idx = topk(torch.softmax(logits.float(), dim=-1), top_k)
            top = top / top.sum(-1, keepdim=True)
        shared = None
        if s_gate is not None:  # Qwen2-MoE's shared expert, gated by a sigmoid
            shared = linear(F.silu(linear(x, s_gate)) * linear(x, s_up), s_down)
            shared = torch.sigmoid(linear(x, s_w)) * shared
        return idx, top, shared

    def dense(x, w_gate, w_up, w_down):
        return linear(F.silu(linear(x, w_gate)) * linear(x, w_up), w_down)

    def attention(h, d1, d2, ln1, wqkv, bqkv, qn, kn, cos, sin, kc, vc, rows, pos, allowed, wo, bo, ln2):
        """The attention half of a layer with 16-bit projections (q/k/v as one product): the
        residual stream after it and its post-attention norm, [B, H] each."""
        h, x = pre(h, d1, d2, ln1)
        qkv = linear(x, wqkv, bqkv)  # [B, q + 2 kv]
        q, k, v = qkv[:, :q_width], qkv[:, q_width:q_width + kv_width], qkv[:, q_width + kv_width:]
        h = h + linear(core(q, k, v, qn, kn, cos, sin, kc, vc, rows, pos, allowed), wo, bo)
        return h, _rms(h, ln2, eps)

    def moe_layer(h, d1, d2, ln1, wqkv, bqkv, qn, kn, cos, sin, kc, vc, rows, pos, allowed, wo, bo, ln2,
                  wg, s_gate, s_up, s_down, s_w):
        """A MoE layer up to its routed experts: the residual stream, the experts' input [B, H],
        top_k_index, top_k_weights [B, k] and the shared expert's output (or None)."""
        h, x = attention(h, d1, d2, ln1, wqkv, bqkv, qn, kn, cos, sin, kc, vc, rows, pos, allowed, wo, bo, ln2)
        return h, x, *route(x, wg, s_gate, s_up, s_down, s_w)

    def dense_layer(h, d1, d2, ln1, wqkv, bqkv, qn, kn, cos, sin, kc, vc, rows, pos, allowed, wo, bo, ln2,
                    w_gate, w_up, w_down):
        """A dense layer: the residual stream and the MLP's output, [B, H] each."""
        h, x = attention(h, d1, d2, ln1, wqkv, bqkv, qn, kn, cos, sin, kc, vc, rows, pos, allowed, wo, bo, ln2)
        return h, dense(x, w_gate, w_up, w_down)

    # Layers whose projections are other modules (quantized: Plan.attn_bits) call them between
    # three compiled pieces: pre, core, then one of these.
    def moe_post(h, attn_out, ln2, wg, s_gate, s_up, s_down, s_w):
        h = h + attn_out
        x = _rms(h, ln2, eps)
        return h, x, *route(x, wg, s_gate, s_up, s_down, s_w)

    def dense_post(h, attn_out, ln2, w_gate, w_up, w_down):
        h = h + attn_out
        return h, dense(_rms(h, ln2, eps), w_gate, w_up, w_down)

    def head(h, d1, d2, norm, lm, lm_b):
        """The last residual add, the final norm and the LM head: logits [B, V]."""
        return linear(_rms(residual(h, d1, d2), norm, eps), lm, lm_b)

    return dict(moe_layer=moe_layer, dense_layer=dense_layer, head=head, pre=pre, core=core,
                moe_post=moe_post, dense_post=dense_post)


# --- fused q/k/v weights -----------------------------------------------------------------------

def _adjacent(parts: list[torch.Tensor]) -> bool:
    """Whether the tensors lie one after another, contiguous, in one storage (a fused view)."""
    first = parts[0]
    offset = first.storage_offset()
    for t in parts:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() \
                or t.storage_offset() != offset:
            return False
        offset += t.numel()
    return True


def _fuse(modules: list[nn.Linear], attr: str) -> torch.Tensor | None:
    """One tensor over the modules' `attr` (weight [N_i, K] or bias [N_i]) stacked on dim 0; the
    modules' own parameters become views of it (the first time: one copy, then no extra memory)."""
    parts = [getattr(m, attr) for m in modules]
    if parts[0] is None:  # (unsupported() checked that q, k and v all have a bias or none has)
        return None
    rows = sum(p.shape[0] for p in parts)
    shape, stride = (rows, *parts[0].shape[1:]), parts[0].stride()
    if _adjacent(parts):
        return torch.as_strided(parts[0].detach(), shape, stride, parts[0].storage_offset())
    with torch.no_grad():
        fused = torch.cat([p.detach() for p in parts])
    start = 0
    for m, p in zip(modules, parts):
        setattr(m, attr, nn.Parameter(fused[start:start + p.shape[0]], requires_grad=p.requires_grad))
        start += p.shape[0]
    return fused


class FastLayers:
    """Decode steps of `model` (its routed experts served by an Engine) through the fused per-layer
    functions, reading and writing `cache` (the decoder's SlotCache) as the Hugging Face path does."""

    def __init__(self, model: nn.Module, cache, *, mode: str = "compile"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        why = unsupported(model, cache.max_len)
        if why is not None:
            raise ValueError(f"fast layers do not support this model: {why}")
        self.model, self.cache, self.mode = model, cache, mode
        config, layers = model.config, model.model.layers
        attn0 = layers[0].self_attn
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = attn0.head_dim
        self.qk_norm = ATTENTION[type(attn0).__name__]
        gate = next((layer.mlp.gate for layer in layers if type(layer.mlp).__name__ in MOE_BLOCKS), None)
        fns = _make_functions(
            heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim, scaling=float(attn0.scaling),
            eps=float(config.rms_norm_eps), qk_norm=self.qk_norm, clip=getattr(config, "clip_qkv", None),
            top_k=int(gate.top_k) if gate is not None else 0,
            router_cast=type(gate).__name__ != "MixtralTopKRouter",
            norm_topk=bool(getattr(gate, "norm_topk_prob", True)), reduce=mode == "compile-reduce",
            fused_topk=mode != "eager" and int(getattr(gate, "top_k", 0)) <= 8, reduce_router=mode != "eager")
        if mode == "eager":
            self.fns = fns
        else:
            # dims marked by _mark_dynamic (batch, attention length) stay symbolic, the rest (model
            # shapes) are constants; no CUDA graphs of inductor's own (the decoder captures whole
            # steps), so "max-autotune-no-cudagraphs" for compile-autotune
            kw = dict(mode="max-autotune-no-cudagraphs") if mode == "compile-autotune" else {}
            self.fns = {name: torch.compile(f, fullgraph=True, **kw) for name, f in fns.items()}
            # a graph per (batch 1 or more, cache slots 1 or more, attention over the whole cache or
            # not) and per decoder size can pass dynamo's default of 8 in a process that profiles
            # several decoders and then serves: on the H200 the server's warm-up hit it (a full graph
            # cannot fall back, so a step of a bucket not compiled yet would have failed)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        # per layer: the fused (q/k/v weight, bias), or None where the projections are other modules
        self.qkv: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * len(layers)
        # per layer where the projections are quantized: q/k/v as one kernel launch (qlinear.QuantGroup)
        self.quant_qkv: list[QuantGroup | None] = [None] * len(layers)
        self.reason: str | None = None  # why the last ready() said no

    # --- weights ---------------------------------------------------------------------------
    def ready(self) -> bool:
        """Whether the next step can run here, and how each layer's projections run: the model's
        own nn.Linear weights with q/k/v as one product ((re)fused where the engine put separate
        weights back), or other modules of the same shape (quantized ones, Plan.attn_bits < 16)
        called as they are between compiled pieces. Call it outside CUDA-graph capture (the decoder
        does, before warming a graph up)."""
        for i, layer in enumerate(self.model.model.layers):
            attn = layer.self_attn
            mods = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
            if all(type(m) is nn.Linear for m in mods):
                self.qkv[i], self.quant_qkv[i] = self._fused(attn), None
                continue
            bad = next((type(m).__name__ for m in mods if not hasattr(m, "in_features")), None)
            if bad is not None:  # not a projection we know the shape of
                self.reason = f"layer {i}'s attention projections are {bad}, not linear layers"
                return False
            self.qkv[i] = None
            group = self.quant_qkv[i]
            if group is None or not group.current(mods[:3]):
                self.quant_qkv[i] = QuantGroup.of(mods[:3])
        self.reason = None
        return True

    def _fused(self, attn) -> tuple[torch.Tensor, torch.Tensor | None]:
        mods = [attn.q_proj, attn.k_proj, attn.v_proj]
        weights = [m.weight for m in mods]
        biases = [m.bias for m in mods]
        if _adjacent(weights) and (all(b is None for b in biases) or _adjacent(biases)):
            return _fuse(mods, "weight"), _fuse(mods, "bias")  # views, no copy
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("fast layers: q/k/v need fusing during CUDA-graph capture; call ready() first")
        return _fuse(mods, "weight"), _fuse(mods, "bias")

    def _kv(self, idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer idx's cache tensors, allocated as SlotCache.update would at its first update."""
        c = self.cache
        if idx not in c.k:
            shape = (c.slots, self.kv_heads, c.max_len, self.head_dim)
            c.k[idx], c.v[idx] = like.new_zeros(shape), like.new_zeros(shape)
        return c.k[idx], c.v[idx]

    # --- a step ----------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, tok: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] (the model's dtype) of tokens tok [B] at positions pos [B] in slots rows [B]
        (0..B-1), attending where allowed [B, L]. Needs ready() to have said yes since the last
        change of the attention projections."""
        m = self.model.model
        h = m.embed_tokens(tok)  # [B, H]
        cos, sin = m.rotary_emb(h, pos[:, None])  # [B, 1, D]
        d1, d2 = torch.zeros_like(h), None
        first_moe = next((i for i, layer in enumerate(m.layers) if type(layer.mlp).__name__ in MOE_BLOCKS), None)
        if first_moe is not None and getattr(m.layers[first_moe].mlp, "shared_expert", None) is not None:
            d2 = torch.zeros_like(h)  # models with a shared expert always pass two deltas
        compiled = self.mode != "eager"
        if compiled:
            _mark_dynamic(h, d1, d2, cos, sin, pos, rows, allowed)
        fns = self.fns
        for i, layer in enumerate(m.layers):
            attn, mlp = layer.self_attn, layer.mlp
            kc, vc = self._kv(attn.layer_idx, h)
            if compiled:  # slots and length too: decoders of any size share the graphs
                for t in (kc, vc):
                    torch._dynamo.maybe_mark_dynamic(t, 0)
                    torch._dynamo.maybe_mark_dynamic(t, 2)
            norms = ((attn.q_norm.weight, attn.k_norm.weight) if self.qk_norm != "none" else (None, None))
            cache = (cos, sin, kc, vc, rows, pos, allowed)
            moe = type(mlp).__name__ in MOE_BLOCKS
            if moe:
                shared = getattr(mlp, "shared_expert", None)
                mlp_w = (mlp.gate.weight, *((shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight,
                                             mlp.shared_expert_gate.weight) if shared is not None else (None,) * 4))
            else:
                mlp_w = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
            ln1, ln2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
            if self.qkv[i] is not None:  # one compiled call up to the experts
                args = (h, d1, d2, ln1, *self.qkv[i], *norms, *cache, attn.o_proj.weight, attn.o_proj.bias, ln2, *mlp_w)
                out = fns["moe_layer" if moe else "dense_layer"](*args)
            else:  # the projections' own modules between compiled pieces
                h, x = fns["pre"](h, d1, d2, ln1)
                group = self.quant_qkv[i]
                q, k, v = group(x) if group is not None else (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
                if compiled:
                    _mark_dynamic(q, k, v)
                o = attn.o_proj(fns["core"](q, k, v, *norms, *cache))
                if compiled:
                    _mark_dynamic(o)
                out = fns["moe_post" if moe else "dense_post"](h, o, ln2, *mlp_w)
            if moe:
                h, x, idx, w, s = out
                d1 = mlp.experts(x, idx, w, out_dtype=torch.float32)  # the engine's experts, eagerly: [B, H]
                d2 = s if d2 is not None else None
            else:
                h, d1 = out
                d2 = torch.zeros_like(h) if d2 is not None else None
            if compiled:
                _mark_dynamic(h, d1, d2)
        lm = self.model.get_output_embeddings()
        return fns["head"](h, d1, d2, m.norm.weight, lm.weight, lm.bias)


RECOMPILE_LIMIT = 64


def _mark_dynamic(*tensors) -> None:
    """The batch dim (and an attention mask's length) of the tensors stays symbolic in compiled
    code; a batch of 1 is specialized by dynamo anyway (one graph for 1, one for the rest)."""
    for t in tensors:
        if t is None:
            continue
        if t.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(t, 0)
        if t.dtype == torch.bool and t.dim() == 2:  # allowed [B, L]
            torch._dynamo.maybe_mark_dynamic(t, 1)
