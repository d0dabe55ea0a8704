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
