"""Plans of one engine from knobs, with the selection scores that scored selections need."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from catalog.knobs import Knobs
from placement.plan import Plan, build_plan
from placement.selection import scores_for


class Planner:
    """Builds plans of one engine from knobs, measuring each scored selection's scores once (on
    calibration text, under an all-16-bit plan; the engine's plan is put back afterwards)."""

    def __init__(self, engine, name: str, calib_ids: Callable[[], list[int]]):
        self.engine, self.name, self.calib_ids = engine, name, calib_ids  # calib_ids() -> token ids
        self.scores: dict[tuple, list] = {}  # (selection, score bits, group_size) -> per-expert scores

    def plan(self, knobs: Knobs) -> Plan:
        key = (knobs.selection, knobs.score_bits, knobs.group_size)
        if knobs.selection != "random" and key not in self.scores:
            self.scores[key] = scores_for(self.engine, self.name, knobs, self.calib_ids())
        return build_plan(self.engine.spec, knobs, self.scores.get(key))

    def rebuild(self, knobs: Knobs, plan_id: str) -> Plan:
        """The plan a measured row names, checked by its plan_id."""
        plan = self.plan(knobs)
        if plan.plan_id != plan_id:
            raise ValueError(f"plan {plan_id} does not rebuild on model {self.name!r} (got {plan.plan_id}): "
                             "was it measured on another model, or with other selection scores?")
        return plan


def row_knobs(knobs: Knobs, plan: Plan) -> Knobs:
    """The knobs a measured row records: those that rebuild `plan` alone (an accelerator budget
    resolved into the expert count it gave; slots and prefetch as the plan kept them)."""
    return replace(knobs, gpu_experts=plan.gpu_experts, gpu_budget=None, offload=plan.offload,
                   cache_slots=plan.slots_used() or None, prefetch=plan.prefetch)
