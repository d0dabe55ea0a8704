"""How a plan's expert is served at decode: the one table the engine and the cost model both read.

A plan gives each expert a precision and a tier; with the plan's offload mode that makes one path:
- "accel": resident on the accelerator;
- "cpu": a host expert computed on the host (`offload="cpu"`);
- "fetch": a host expert copied into an accelerator fetch slot (an LRU) and run there.
On the decode path an accelerator expert runs in its layer's fused kernels when its precision has a
kernel there (`fused_bits`); a layer with any other expert leaves the kernels: it syncs with the
host and loops over its routed experts (so it cannot be captured in a CUDA graph).
"""

from __future__ import annotations

from collections.abc import Iterable

from placement.plan import ExpertState

ACCEL, CPU, FETCH = "accel", "cpu", "fetch"
PATHS = (ACCEL, CPU, FETCH)


def serving_path(state: ExpertState, offload: str) -> str:
    """Where an expert in `state` runs under a plan offloading host experts by `offload`."""
    if state.tier == "accel":
        return ACCEL
    return CPU if offload == "cpu" else FETCH


def in_kernels(state: ExpertState, fused_bits: Iterable[int]) -> bool:
    """Whether an expert in `state` runs in its layer's fused kernels (precisions `fused_bits`)."""
    return state.tier == "accel" and state.bits in fused_bits


def leaves_kernels(row: Iterable[ExpertState], fused_bits: Iterable[int]) -> bool:
    """Whether a layer whose experts are in states `row` runs any of them outside the kernels."""
    fused_bits = tuple(fused_bits)
    return not all(in_kernels(s, fused_bits) for s in row)
