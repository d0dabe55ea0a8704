"""The serving runtime: the request loop and controller, their HTTP API and metrics, and the Ray Serve
application around them.

The names below are imported on first use (`from runtime import Controller` brings no torch); the
Serve application is its own module, `from runtime import ray_app` (it imports ray), and so is the
HTTP API, `runtime.http_api` (it imports FastAPI)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from catalog.lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
