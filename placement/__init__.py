"""The expert placement engine: per-expert precision and accelerator/host placement."""

from placement.plan import ExpertId, ExpertState, Move, Plan, build_plan, diff
from placement.spec import ModelSpec

__all__ = ["ExpertId", "ExpertState", "ModelSpec", "Move", "Plan", "build_plan", "diff"]
