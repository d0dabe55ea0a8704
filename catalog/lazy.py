"""Package exports loaded on first use, so `import catalog` (or placement, profiler, runtime)
costs nothing until a name is asked for (catalog's must not bring torch, none may bring Ray)."""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str], namespace: dict):
    """The module-level __getattr__ and __dir__ of `package` whose `exports` map names to the
    modules holding them; a name is imported once, then kept in the package's `namespace`."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
