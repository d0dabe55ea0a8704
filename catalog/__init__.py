"""The plan catalog: the knob schema, measured rows and the model identity they carry, Pareto
fronts, tenant SLOs and the pure policy. Pure Python and pandas: no tensors, no Ray, and no import
of the project's other packages (every other package builds on this one).

The names below are imported on first use (`from catalog import Knobs` loads catalog.knobs alone)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from catalog.lazy import lazy_exports

_EXPORTS = {
    "Knobs": "catalog.knobs", "parse_bytes": "catalog.knobs", "parse_grid": "catalog.knobs",
    "ModelIdentity": "catalog.rows", "Measured": "catalog.rows", "read_front": "catalog.rows",
    "read_profile": "catalog.rows", "with_ppl": "catalog.rows",
    "front": "catalog.pareto", "parse_objectives": "catalog.pareto",
    "SLOError": "catalog.slo", "SLOSpec": "catalog.slo", "TenantSLO": "catalog.slo", "load_slos": "catalog.slo",
    "parse_slos": "catalog.slo",
    "Decision": "catalog.policy", "choose": "catalog.policy",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from catalog.knobs import Knobs, parse_bytes, parse_grid
    from catalog.pareto import front, parse_objectives
    from catalog.policy import Decision, choose
    from catalog.rows import Measured, ModelIdentity, read_front, read_profile, with_ppl
    from catalog.slo import SLOError, SLOSpec, TenantSLO, load_slos, parse_slos


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
