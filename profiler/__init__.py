"""Measurement: data sets, throughput and latency of generation, router statistics.

The names below are imported on first use (`from profiler import Profiler` loads profiler.profile,
not optuna)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from catalog.lazy import lazy_exports

_EXPORTS = {
    "Profiler": "profiler.profile", "Settings": "profiler.profile", "Measurements": "profiler.profile",
    "profile_grid": "profiler.profile",
    "Search": "profiler.search",
    "CostModel": "profiler.costmodel", "calibrate": "profiler.costmodel",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from profiler.costmodel import CostModel, calibrate
    from profiler.profile import Measurements, Profiler, Settings, profile_grid
    from profiler.search import Search


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
