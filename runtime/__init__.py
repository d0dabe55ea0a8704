"""The serving runtime: the request loop and controller, and the Ray actor around them.

The names below are imported on first use (`from runtime import Controller` brings no torch); the
Ray actor is its own module, `from runtime import ray_actor` (it imports ray)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "Controller": "runtime.controller", "Desired": "runtime.controller", "World": "runtime.controller",
    "Executor": "runtime.executor", "Request": "runtime.executor",
    "Limits": "runtime.limits", "Rejected": "runtime.limits",
    "SimulatedMemory": "runtime.memory",
    "Server": "runtime.server",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from runtime.controller import Controller, Desired, World
    from runtime.executor import Executor, Request
    from runtime.limits import Limits, Rejected
    from runtime.memory import SimulatedMemory
    from runtime.server import Server


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
