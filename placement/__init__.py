"""The expert placement engine: per-expert precision and accelerator/host placement.

Plans are imported with the package; the session, engine, decoder and model loading (which bring
transformers) on first use: `from placement import open_session` loads placement.session."""

from __future__ import annotations

from typing import TYPE_CHECKING

from catalog.lazy import lazy_exports

from placement.plan import ExpertId, ExpertState, Move, Plan, build_plan, diff
from placement.spec import ModelSpec

_EXPORTS = {
    "Session": "placement.session", "open_session": "placement.session",
    "Decoder": "placement.decode", "Sampling": "placement.decode", "Generation": "placement.decode",
    "BatchTiming": "placement.decode",
    "Engine": "placement.engine", "ApplyReport": "placement.engine",
    "LoadedModel": "placement.models", "load_model": "placement.models",
    "Planner": "placement.planner",
}
__all__ = sorted(["ExpertId", "ExpertState", "ModelSpec", "Move", "Plan", "build_plan", "diff", *_EXPORTS])

if TYPE_CHECKING:
    from placement.decode import BatchTiming, Decoder, Generation, Sampling
    from placement.engine import ApplyReport, Engine
    from placement.models import LoadedModel, load_model
    from placement.planner import Planner
    from placement.session import Session, open_session


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
