"""The shape facts about a model that plans are costed with (no weights needed)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelSpec:
    family: str  # the adapter's model_type
    num_layers: int  # MoE layers (dense layers of mixed models are not counted)
    num_experts: int  # routed experts per MoE layer
    top_k: int
    hidden: int
    intermediate: int  # of one routed expert
    dtype: torch.dtype
    nonexpert_bytes: int  # everything but the routed experts: always on the accelerator
    # [out, in] of every attention projection (q, k, v, o of each layer), counted in nonexpert_bytes at
    # the model's dtype; what Plan.attn_bits quantizes (empty: unknown, attention stays as it is)
    attn_linears: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        for name in ("num_layers", "num_experts", "top_k", "hidden", "intermediate"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelSpec.{name} must be positive, got {getattr(self, name)}")
