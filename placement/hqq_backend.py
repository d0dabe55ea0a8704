"""The one module that imports hqq: quantize a matrix with HQQ and dequantize it back.

Only hqq's quantizer and its bit-unpacking are used; the packed tensors live in our own per-expert
buffers (see packed.py), because hqq 0.2.8's HQQLinear does not move between devices by itself.
"""

from __future__ import annotations

import logging

import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear, Quantizer

# hqq prints a colored warning through `print` for deprecated options we never use; keep logs clean.
logging.getLogger("hqq").setLevel(logging.ERROR)


def hqq_linear(weight: torch.Tensor, bits: int, group_size: int, compute_dtype, device) -> HQQLinear:
    """hqq's own quantized linear layer on `weight` [out, in] (groups along the input dimension,
    hqq's default axis=1). Also the oracle the engine's outputs are tested against."""
    return HQQLinear.from_weights(
        weight.detach().to(device=device, copy=True),
        None,
        BaseQuantizeConfig(nbits=bits, group_size=group_size),
        compute_dtype=compute_dtype,
        device=str(device),
    )


def quantize(
    weight: torch.Tensor, bits: int, group_size: int, compute_dtype: torch.dtype, device, *, optimize: bool = True
) -> dict[str, torch.Tensor]:
    """The packed weight and per-group scale and zero, as hqq's HQQLinear holds them.

    `optimize=False` skips HQQ's zero-point solver (round to nearest from each group's min and max,
    in the same packed format): seconds instead of minutes for a full-size random-weight model whose
    accuracy nobody measures; the bytes and the compute are the same."""
    if not optimize:
        W_q, meta = Quantizer.quantize(weight.detach().to(device=device, copy=True), nbits=bits, group_size=group_size,
                                       optimize=False, axis=1, compute_dtype=compute_dtype, device=str(device))
        return {"W_q": W_q, "scale": meta["scale"].to(compute_dtype), "zero": meta["zero"].to(compute_dtype)}
    layer = hqq_linear(weight, bits, group_size, compute_dtype, device)
    return {"W_q": layer.W_q, "scale": layer.meta["scale"], "zero": layer.meta["zero"]}


# hqq 0.2.8's defaults for HQQLinear (hqq_base_quant_config) and its solver
# (optimize_weights_proximal_legacy), which quantize_many repeats with a batch dimension
_LP_NORM, _BETA, _ITERS = 0.7, 1e1, 20


def _shrink(x: torch.Tensor) -> torch.Tensor:
    """hqq's shrink_lp_op for lp_norm < 1."""
    out = torch.abs(x)
    out.sub_((1.0 / _BETA) * out.pow(_LP_NORM - 1)).clamp_min_(0.0)
    return out.mul_(torch.sign(x))


@torch.inference_mode()
def quantize_many(weights: list[torch.Tensor], bits: int, group_size: int, compute_dtype: torch.dtype, device,
                  *, optimize: bool = True) -> list[dict[str, torch.Tensor]]:
    """`[quantize(w, ...) for w in weights]` (matrices of one shape) with HQQ's solver run on all of
    them at once: the same operations in the same order per matrix, on a stack [B, groups,
    group_size], each matrix stopping at its own iteration as hqq's early stop does. One set of
    kernel launches and one host sync per iteration serve the whole batch instead of one matrix.
    The result equals the one-at-a-time quantization (tests/test_checkpoint.py checks it)."""
    if not weights:
        return []
    shape = tuple(weights[0].shape)
    if any(tuple(w.shape) != shape for w in weights):
        raise ValueError(f"quantize_many needs matrices of one shape, got {sorted({tuple(w.shape) for w in weights})}")
    if not optimize:
        return [quantize(w, bits, group_size, compute_dtype, device, optimize=False) for w in weights]
    device = torch.device(device)
    B = len(weights)
    # Quantizer.quantize(axis=1): groups of `group_size` along the input dimension, in float32
    W = torch.stack([w.detach().to(device=device) for w in weights]).float().reshape(B, -1, group_size)
    _min = W.min(dim=2, keepdim=True)[0]
    _max = W.max(dim=2, keepdim=True)[0]
    max_v = round(2**bits - 1)
    denom = _max - _min
    scale = max_v / denom
    scale = torch.where(denom.abs() <= 1e-4, torch.full_like(scale, 1.0), scale).clamp(max=2e4)
    zero = -_min * scale
    if bits == 4:  # round_zero: hqq_base_quant_config sets it for 4 bits only
        zero = torch.round(zero)
    del _min, _max, denom

    # optimize_weights_proximal_legacy, per matrix: iterate until its own error stops falling
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    W_f, scale, zero = W.to(dtype), scale.to(dtype), zero.to(dtype)
    # the matrices still iterating: their rows of the batch (`rows`) and working copies, compacted
    # only when one stops, so an iteration copies nothing
    rows = torch.arange(B, device=device)
    Wf, sc, z = W_f, scale, zero
    best = torch.full((B,), torch.inf, dtype=torch.float32, device=device)
    for _ in range(_ITERS):
        W_q = torch.round(Wf * sc + z).clamp_(0, max_v)
        W_r = (W_q - z) / sc
        W_e = _shrink(Wf - W_r)
        z = torch.mean(W_q - (Wf - W_e) * sc, dim=2, keepdim=True)  # hqq updates even on its last step
        diff = torch.abs(Wf - W_r)
        # each matrix's error reduced on its own, as hqq reduces one matrix (the same summation order)
        error = torch.stack([d.mean() for d in diff]).float()
        del W_q, W_r, W_e, diff
        better = error < best
        best = torch.where(better, error, best)
        if not bool(better.all()):  # these stop here, with the zero of this step
            done = ~better
            zero[rows[done]] = z[done]
            rows, Wf, sc, z, best = rows[better], Wf[better], sc[better], z[better], best[better]
            if rows.numel() == 0:
                break
    else:
        zero[rows] = z  # the iterations ran out
    del Wf, sc, z
    del W_f
    W_q = torch.round(W * scale + zero).clamp_(0, max_v)
    del W
    scale = 1.0 / scale
    packing = Quantizer.bit_to_packing[bits]
    # HQQLinear keeps scale and zero in compute_dtype
    return [{"W_q": Quantizer.pack[packing](W_q[b]).contiguous(), "scale": scale[b].to(compute_dtype).contiguous(),
             "zero": zero[b].to(compute_dtype).contiguous()} for b in range(B)]


def dequantize(
    W_q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    shape: tuple[int, int],
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """The [out, in] matrix in `compute_dtype`, exactly as HQQLinear.dequantize computes it."""
    meta = {
        "nbits": bits,
        "group_size": group_size,
        "shape": torch.Size(shape),
        "axis": 1,
        "packing": Quantizer.bit_to_packing[bits],
        "view_as_float": False,
        "unpack_view_dtype": Quantizer.unpack_view_dtype[Quantizer.bit_to_packing[bits]],
        "compute_dtype": compute_dtype,
        "scale": scale,
        "zero": zero,
    }
    return Quantizer.dequantize(W_q, meta)
