"""Tenant SLOs declared in YAML, validated with errors that name the key and the problem.

    tenants:
      - name: interactive
        min_decode_tok_s: 20
        max_ppl_increase: 0.10     # relative to the 16-bit model
        priority: 2
      - name: batch
        max_ppl_increase: 0.02
        priority: 1
    gpu:
      reserve_gib: 2               # headroom left for co-tenants of the GPU
    prefer: quality                # or throughput, between feasible plans
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

PREFERENCES = ("quality", "throughput")
TENANT_KEYS = {"name", "min_decode_tok_s", "max_ppl_increase", "priority"}
TOP_KEYS = {"tenants", "gpu", "prefer"}
GPU_KEYS = {"reserve_gib"}


class SLOError(ValueError):
    """A bad SLO file; the message names the file, the key and the problem."""


@dataclass(frozen=True)
class TenantSLO:
    name: str
    min_decode_tok_s: float | None = None
    max_ppl_increase: float | None = None  # 0.10 = at most 10% above the 16-bit perplexity
    priority: int = 1

    def __post_init__(self):
        if not self.name:
            raise SLOError("tenant name must not be empty")
        if self.min_decode_tok_s is not None and self.min_decode_tok_s <= 0:
            raise SLOError(f"{self.name}: min_decode_tok_s must be > 0, got {self.min_decode_tok_s}")
        if self.max_ppl_increase is not None and self.max_ppl_increase < 0:
            raise SLOError(f"{self.name}: max_ppl_increase must be >= 0, got {self.max_ppl_increase}")
        if self.priority < 0:
            raise SLOError(f"{self.name}: priority must be >= 0, got {self.priority}")


@dataclass(frozen=True)
class SLOSpec:
    tenants: tuple[TenantSLO, ...]
    reserve_bytes: int = 0
    prefer: str = "quality"

    def tenant(self, name: str) -> TenantSLO:
        for t in self.tenants:
            if t.name == name:
                return t
        raise SLOError(f"unknown tenant {name!r}; tenants: {', '.join(t.name for t in self.tenants)}")


def _number(where: str, value, *, integer: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise SLOError(f"{where}: must be {kind}, got {value!r}")
    return value


def _unknown(where: str, got: dict, allowed: set) -> None:
    extra = sorted(set(got) - allowed)
    if extra:
        raise SLOError(f"{where}: unknown key(s) {', '.join(map(repr, extra))}; allowed: {', '.join(sorted(allowed))}")


def parse_slos(text: str, source: str = "SLO file") -> SLOSpec:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SLOError(f"{source}: not valid YAML: {err}") from None
    if doc is None:
        raise SLOError(f"{source}: the file is empty")
    if not isinstance(doc, dict):
        raise SLOError(f"{source}: must be a mapping with 'tenants', got {type(doc).__name__}")
    _unknown(source, doc, TOP_KEYS)
    raw = doc.get("tenants")
    if not isinstance(raw, list) or not raw:
        raise SLOError(f"{source}: tenants: must be a non-empty list of tenants")
    tenants, seen = [], set()
    for i, t in enumerate(raw):
        where = f"{source}: tenants[{i}]"
        if not isinstance(t, dict):
            raise SLOError(f"{where}: must be a mapping, got {t!r}")
        _unknown(where, t, TENANT_KEYS)
        name = t.get("name")
        if not isinstance(name, str) or not name.strip():
            raise SLOError(f"{where}.name: must be a non-empty string, got {name!r}")
        if name in seen:
            raise SLOError(f"{where}.name: duplicate tenant name {name!r}")
        seen.add(name)
        kwargs = {"name": name}
        for key in ("min_decode_tok_s", "max_ppl_increase"):
            if t.get(key) is not None:
                kwargs[key] = float(_number(f"{where}.{key}", t[key]))
        if "priority" in t:
            kwargs["priority"] = _number(f"{where}.priority", t["priority"], integer=True)
        try:
            tenants.append(TenantSLO(**kwargs))
        except SLOError as err:
            raise SLOError(f"{where}: {err}") from None
    gpu = doc.get("gpu") or {}
    if not isinstance(gpu, dict):
        raise SLOError(f"{source}: gpu: must be a mapping, got {gpu!r}")
    _unknown(f"{source}: gpu", gpu, GPU_KEYS)
    reserve = float(_number(f"{source}: gpu.reserve_gib", gpu.get("reserve_gib", 0)))
    if reserve < 0:
        raise SLOError(f"{source}: gpu.reserve_gib: must be >= 0, got {reserve}")
    prefer = doc.get("prefer", "quality")
    if prefer not in PREFERENCES:
        raise SLOError(f"{source}: prefer: must be one of {', '.join(PREFERENCES)}, got {prefer!r}")
    return SLOSpec(tuple(tenants), int(reserve * 2**30), prefer)


def load_slos(path: str | Path) -> SLOSpec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise SLOError(f"cannot read SLO file {path}: {err.strerror}") from None
    return parse_slos(text, str(path))
