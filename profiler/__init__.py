"""Measurement: data sets, throughput and latency of generation, router statistics.

The names below are imported on first use (`from profiler import Profiler` loads profiler.profile,
not optuna)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

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


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
