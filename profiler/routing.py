"""Router statistics on calibration text: how often each expert is chosen."""

from __future__ import annotations

import torch


@torch.no_grad()
def router_frequencies(engine, token_ids: list[int], *, window: int = 512, max_tokens: int = 8192):
    """Share of routed token slots per expert, per MoE layer, over consecutive windows of text.

    Run under a 16-bit plan: quantization noise would perturb the routing being measured.
    """
    if engine.plan is None or engine.plan.quantized:
        raise ValueError("router statistics need the engine on an all-16-bit plan")
    ids = token_ids[:max_tokens]
    window = min(window, engine.model.config.max_position_embeddings)
    if not ids:
        raise ValueError("calibration text is empty after tokenization")
    device = next(engine.model.parameters()).device
    engine.reset_stats()
    for start in range(0, len(ids), window):
        engine.model(torch.tensor([ids[start : start + window]], device=device))
    return engine.router_frequencies()
