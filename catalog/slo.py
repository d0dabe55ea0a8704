"""Tenant SLOs declared in YAML, validated with errors that name the key and the problem.

    tenants:
      - name: interactive
        min_decode_tok_s: 20
        max_ppl_increase: 0.10     # relative to the 16-bit model
        max_tpot_ms: 60            # time per output token at the p-th percentile (p: 50 or 95)
        max_ttft_s: 1.5            # time to first token, likewise
        p: 95
        priority: 2
        api_keys: [sk-interactive-0123456789]   # bearer keys of the HTTP API that name this tenant
      - name: batch
        max_ppl_increase: 0.02
        priority: 1
    gpu:
      reserve_gib: 2               # headroom left for co-tenants of the GPU
    prefer: quality                # or throughput, between feasible plans
"""

from __future__ import annotations

import hmac
import math
import reprlib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PREFERENCES = ("quality", "throughput")
TENANT_KEYS = {"name", "min_decode_tok_s", "max_ppl_increase", "max_ttft_s", "max_tpot_ms", "p", "priority",
               "api_keys"}
PERCENTILES = (50, 95)  # what a profile records of time to first token and time per output token
TOP_KEYS = {"tenants", "gpu", "prefer"}
GPU_KEYS = {"reserve_gib"}
# Limits that keep a hostile or broken file from stalling the controller: size, tenants, values.
MAX_FILE_BYTES = 1 << 20
MAX_TENANTS = 1000
MAX_PRIORITY = 100  # a tenant's fair-queuing weight is 2^priority
MAX_RESERVE_GIB = 1 << 20  # 1 PiB
MIN_KEY_CHARS, MAX_KEY_CHARS, MAX_KEYS = 16, 256, 100  # per API key; keys per tenant

# Errors quote the bad value shortened: a YAML alias bomb of a few hundred bytes expands to gigabytes
# when printed whole.
_repr = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict = 2, 40, 40, 4, 4
_repr.maxlong = 40  # (a 400-digit number is shown shortened too)
_short = _repr.repr
MAX_NAME_CHARS = 100


class SLOError(ValueError):
    """A bad SLO file; the message names the file, the key and the problem."""


# latency SLOs: the key a tenant's limit (max_<key>) and its measured percentiles go by, the unit, in words
LATENCY_SLOS = (("tpot_ms", "ms", "time per output token"), ("ttft_s", "s", "time to first token"))


@dataclass(frozen=True)
class TenantSLO:
    name: str
    min_decode_tok_s: float | None = None
    max_ppl_increase: float | None = None  # 0.10 = at most 10% above the 16-bit perplexity
    max_ttft_s: float | None = None  # time to first token, at percentile p
    max_tpot_ms: float | None = None  # time per output token, at percentile p
    p: int = 95
    priority: int = 1
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # secrets: never printed

    def latency_limits(self) -> list[tuple[str, float, str, str]]:
        """(the key of its percentiles in measurements and profiles, the limit, the unit, in words) of
        each latency SLO the tenant sets."""
        return [(key, getattr(self, f"max_{key}"), unit, what) for key, unit, what in LATENCY_SLOS
                if getattr(self, f"max_{key}") is not None]

    @property
    def has_latency_slo(self) -> bool:
        return bool(self.latency_limits())

    def __post_init__(self):
        if not self.name:
            raise SLOError("tenant name must not be empty")
        who = _short(self.name)  # errors quote values shortened: one short line whatever the file holds
        if self.min_decode_tok_s is not None and self.min_decode_tok_s <= 0:
            raise SLOError(f"{who}: min_decode_tok_s must be > 0, got {_short(self.min_decode_tok_s)}")
        if self.max_ppl_increase is not None and self.max_ppl_increase < 0:
            raise SLOError(f"{who}: max_ppl_increase must be >= 0, got {_short(self.max_ppl_increase)}")
        for key in ("max_ttft_s", "max_tpot_ms"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise SLOError(f"{who}: {key} must be > 0, got {_short(getattr(self, key))}")
        if self.p not in PERCENTILES:
            raise SLOError(f"{who}: p must be one of {', '.join(map(str, PERCENTILES))} (the percentiles a "
                           f"profile records), got {_short(self.p)}")
        if not 0 <= self.priority <= MAX_PRIORITY:
            raise SLOError(f"{who}: priority must be from 0 to {MAX_PRIORITY}, got {_short(self.priority)}")


@dataclass(frozen=True)
class SLOSpec:
    tenants: tuple[TenantSLO, ...]
    reserve_bytes: int = 0
    prefer: str = "quality"

    def tenant(self, name: str) -> TenantSLO:
        for t in self.tenants:
            if t.name == name:
                return t
        names = [t.name for t in self.tenants]
        more = f" and {len(names) - 10} more" if len(names) > 10 else ""
        raise SLOError(f"unknown tenant {_short(name)}; tenants: {', '.join(names[:10])}{more}")

    def tenant_for_key(self, key: str) -> str | None:
        """The tenant an API key names (None: no tenant has it), compared in constant time."""
        found = None
        for t in self.tenants:
            for k in t.api_keys:
                if hmac.compare_digest(k.encode(), key.encode()):
                    found = t.name
        return found

    @property
    def has_keys(self) -> bool:
        return any(t.api_keys for t in self.tenants)


def _number(where: str, value, *, integer: bool = False):
    """The value as an int (integer) or a float, or an SLOError naming the key."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise SLOError(f"{where}: must be {kind}, got {_short(value)}")
    if integer:
        return value
    try:
        value = float(value)
    except OverflowError:  # an integer past float's range
        raise SLOError(f"{where}: must be a finite number, got {_short(value)}") from None
    if not math.isfinite(value):  # NaN would pass every comparison and switch the SLO off
        raise SLOError(f"{where}: must be a finite number, got {value}")
    return value


def _unknown(where: str, got: dict, allowed: set) -> None:
    extra = sorted(set(got) - allowed, key=str)
    if extra:
        shown = ", ".join(_short(k) for k in extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise SLOError(f"{where}: unknown key(s) {shown}; allowed: {', '.join(sorted(allowed))}")


def _api_keys(where: str, value, seen: set) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_KEYS:
        raise SLOError(f"{where}: must be a list of at most {MAX_KEYS} keys")
    for i, key in enumerate(value):
        # a key is never quoted back: it is a secret
        if not isinstance(key, str) or not MIN_KEY_CHARS <= len(key) <= MAX_KEY_CHARS or not key.isprintable() \
                or any(c.isspace() for c in key):
            raise SLOError(f"{where}[{i}]: must be a string of {MIN_KEY_CHARS} to {MAX_KEY_CHARS} printable "
                           f"characters without spaces")
        if key in seen:
            raise SLOError(f"{where}[{i}]: the same key is given twice (keys must name one tenant)")
        seen.add(key)
    return tuple(value)


def parse_slos(text: str, source: str = "SLO file") -> SLOSpec:
    if len(text) > MAX_FILE_BYTES:
        raise SLOError(f"{source}: {len(text)} characters; an SLO file may have at most {MAX_FILE_BYTES}")
    try:
        doc = yaml.safe_load(text)
    except RecursionError:
        raise SLOError(f"{source}: nested too deeply to be an SLO file") from None
    except Exception as err:  # YAMLError, or a value YAML cannot build (a timestamp like 2001-13-45)
        raise SLOError(f"{source}: not valid YAML: {' '.join(str(err).split())[:200]}") from None
    return slos_from_mapping(doc, source)


def slos_from_mapping(doc, source: str = "SLOs") -> SLOSpec:
    """The SLOs of an already parsed document (a YAML file's, or a Serve config's user_config)."""
    if doc is None:
        raise SLOError(f"{source}: the file is empty")
    if not isinstance(doc, dict):
        raise SLOError(f"{source}: must be a mapping with 'tenants', got {type(doc).__name__}")
    if isinstance(doc.get("tenants"), list) and len(doc["tenants"]) > MAX_TENANTS:
        raise SLOError(f"{source}: tenants: {len(doc['tenants'])} of them; at most {MAX_TENANTS}")
    _unknown(source, doc, TOP_KEYS)
    raw = doc.get("tenants")
    if not isinstance(raw, list) or not raw:
        raise SLOError(f"{source}: tenants: must be a non-empty list of tenants")
    tenants, seen, keys = [], set(), set()
    for i, t in enumerate(raw):
        where = f"{source}: tenants[{i}]"
        if not isinstance(t, dict):
            raise SLOError(f"{where}: must be a mapping, got {_short(t)}")
        _unknown(where, t, TENANT_KEYS)
        name = t.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS or not name.isprintable():
            raise SLOError(f"{where}.name: must be a non-empty string of at most {MAX_NAME_CHARS} printable "
                           f"characters, got {_short(name)}")
        if name in seen:
            raise SLOError(f"{where}.name: duplicate tenant name {_short(name)}")
        seen.add(name)
        kwargs = {"name": name}
        for key in ("min_decode_tok_s", "max_ppl_increase", "max_ttft_s", "max_tpot_ms"):
            if t.get(key) is not None:
                kwargs[key] = _number(f"{where}.{key}", t[key])
        for key in ("p", "priority"):
            if key in t:
                kwargs[key] = _number(f"{where}.{key}", t[key], integer=True)
        if t.get("api_keys") is not None:
            kwargs["api_keys"] = _api_keys(f"{where}.api_keys", t["api_keys"], keys)
        try:
            tenants.append(TenantSLO(**kwargs))
        except SLOError as err:
            raise SLOError(f"{where}: {err}") from None
    gpu = doc.get("gpu") or {}
    if not isinstance(gpu, dict):
        raise SLOError(f"{source}: gpu: must be a mapping, got {_short(gpu)}")
    _unknown(f"{source}: gpu", gpu, GPU_KEYS)
    reserve = _number(f"{source}: gpu.reserve_gib", gpu.get("reserve_gib", 0))
    if not 0 <= reserve <= MAX_RESERVE_GIB:
        raise SLOError(f"{source}: gpu.reserve_gib: must be from 0 to {MAX_RESERVE_GIB}, got {reserve:g}")
    prefer = doc.get("prefer", "quality")
    if prefer not in PREFERENCES:
        raise SLOError(f"{source}: prefer: must be one of {', '.join(PREFERENCES)}, got {_short(prefer)}")
    return SLOSpec(tuple(tenants), int(reserve * 2**30), prefer)


def load_slos(path: str | Path) -> SLOSpec:
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:  # refused before it is read
            raise SLOError(f"{path}: {path.stat().st_size} bytes; an SLO file may have at most {MAX_FILE_BYTES}")
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise SLOError(f"cannot read SLO file {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise SLOError(f"{path}: not UTF-8 text (byte {err.start})") from None
    return parse_slos(text, str(path))
