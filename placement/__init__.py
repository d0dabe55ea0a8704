"""The expert placement engine: per-expert precision and accelerator/host placement."""

from placement.plan import BITS, OFFLOAD_MODES, SELECTIONS, ExpertId, ExpertState, Knobs, Move, Plan, build_plan, diff
from placement.spec import ModelSpec

__all__ = ["BITS", "OFFLOAD_MODES", "SELECTIONS", "ExpertId", "ExpertState", "Knobs", "ModelSpec", "Move",
           "Plan", "build_plan", "diff"]
