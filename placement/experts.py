"""Expert math shared by the engine, the kernels' benchmark and the cost model: a gated expert's
matrices from its packed views, and the expert on a batch of rows. No state, no device choices."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from placement.packed import Layout


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (shared ones, like tied embeddings, counted once)."""
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


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
