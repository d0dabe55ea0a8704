"""Per-expert scores that decide which experts are quantized first.

- frequency: the share of routed token slots each expert gets on calibration text (least routed
  experts are quantized first);
- sensitivity: how much quantizing an expert alone changes the layer's output on calibration
  text, weighted by how often and how strongly it is routed (least harmful first).
Both run the model under an all-16-bit plan: quantization noise would perturb what is measured.
Sensitivity scores cost a quantization of every expert, so they are cached on disk by model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from catalog.knobs import Knobs
from placement.plan import ExpertId, build_plan

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("QOS_CACHE_DIR") or Path.home() / ".cache" / "moe-qos")


@torch.no_grad()
def _run_calibration(engine, token_ids: list[int], window: int, max_tokens: int) -> None:
    if engine.plan is None or engine.plan.quantized:
        raise ValueError("calibration needs the engine on an all-16-bit plan")
    ids = token_ids[:max_tokens]
    if not ids:
        raise ValueError("calibration text is empty after tokenization")
    window = min(window, engine.model.config.max_position_embeddings)
    device = next(engine.model.parameters()).device
    engine.reset_stats()
    for start in range(0, len(ids), window):
        engine.model(torch.tensor([ids[start : start + window]], device=device))


def router_frequencies(engine, token_ids: list[int], *, window: int = 512, max_tokens: int = 8192):
    """Share of routed token slots per expert, per MoE layer, over consecutive windows of text."""
    _run_calibration(engine, token_ids, window, max_tokens)
    return engine.router_frequencies()


@torch.no_grad()
def sensitivity_scores(engine, token_ids: list[int], bits: int, group_size: int = 64, *,
                       window: int = 512, max_tokens: int = 8192, per_expert: int = 512):
    """Per expert: sum over its routed calibration tokens of ||w * (f_q(x) - f_16(x))||^2, divided by
    the layer's routed token slots (so rarely routed experts score low), estimated from up to
    `per_expert` captured tokens and scaled up to all the tokens it was routed."""
    with engine.capturing(per_expert) as captured:
        _run_calibration(engine, token_ids, window, max_tokens)
    routed = engine.routed.double().cpu()  # [L, E] token slots
    scores = []
    bar = tqdm(total=engine.spec.num_layers * engine.spec.num_experts, desc=f"sensitivity of {bits}-bit experts",
               unit="expert", leave=False, disable=None)  # (None: no bar when stderr is not a terminal)
    for l in range(engine.spec.num_layers):
        layer_total = max(routed[l].sum().item(), 1.0)
        row = []
        for e in range(engine.spec.num_experts):
            eid = ExpertId(l, e)
            if eid not in captured:
                row.append(0.0)  # never routed on this text: quantizing it costs nothing here
                bar.update()
                continue
            x = torch.cat([x for x, _ in captured[eid]])  # [n, H]
            w = torch.cat([w for _, w in captured[eid]])  # [n]
            diff = engine.expert_output(eid, bits, group_size, x) - engine.expert_output(eid, 16, group_size, x)
            err = ((w[:, None] * diff.float()) ** 2).sum().item()
            row.append(err * (routed[l, e].item() / len(w)) / layer_total)
            bar.update()
        scores.append(row)
    bar.close()
    return scores


def _fingerprint(engine, name: str, token_ids: list[int], **params) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"model": name, "spec": repr(engine.spec), **params}, sort_keys=True).encode())
    h.update(engine.masters[ExpertId(0, 0)][: 1 << 20].numpy().tobytes())  # the weights, not just the name
    h.update(repr(token_ids[:8192]).encode())
    return h.hexdigest()[:20]


def selection_scores(engine, name: str, selection: str, bits: int, group_size: int, token_ids: list[int],
                     *, use_cache: bool = True):
    """Scores for `selection` ('frequency' or 'sensitivity'); sensitivity is cached on disk."""
    if selection == "frequency":
        return router_frequencies(engine, token_ids)
    if selection != "sensitivity":
        raise ValueError(f"selection={selection!r} has no scores")
    key = _fingerprint(engine, name, token_ids, bits=bits, group_size=group_size)
    path = cache_dir() / "sensitivity" / f"{key}.json"
    if use_cache and path.is_file():
        return json.loads(path.read_text())["scores"]
    scores = sensitivity_scores(engine, token_ids, bits, group_size)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"model": name, "bits": bits, "group_size": group_size, "scores": scores}))
    return scores


def scores_for(engine, name: str, knobs: Knobs, token_ids: list[int]):
    """The scores `knobs.selection` needs (None for random), measured under an all-16-bit plan with
    the knobs' placement, so calibration fits wherever the asked-for plan fits. The engine's plan
    is put back afterwards."""
    if knobs.selection == "random":
        return None
    before = engine.plan
    placement = Knobs(gpu_experts=knobs.gpu_experts, gpu_budget=knobs.gpu_budget, offload=knobs.offload,
                      cache_slots=knobs.cache_slots, group_size=knobs.group_size)
    # under a host budget, host experts stream from their masters instead of being held at 16 bits
    engine.apply(build_plan(engine.spec, placement), stream_host=getattr(engine, "host_budget", None) is not None)
    try:
        return selection_scores(engine, name, knobs.selection, knobs.score_bits, knobs.group_size, token_ids)
    finally:
        if before is not None:
            engine.apply(before)
