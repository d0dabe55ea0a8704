"""The knob schema: every knob of a plan, once, with its type, default, range, CSV column, grid
syntax, optuna distribution, command-line flag and help.

The command line's plan flags, `qos profile --grid`, the optuna search space and the knob columns of
a profile are all generated from `KNOBS`: adding a knob is one entry here plus its field in `Knobs`
(a test checks the two agree), and `placement.plan.build_plan` giving it a meaning.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass, fields
from typing import Any, Callable

BITS = (16, 8, 4, 3, 2)  # expert precisions; 16 is unquantized
QUANT_BITS = tuple(b for b in BITS if b != 16)
DEFAULT_BITS = 4
ATTN_BITS = (16, 8, 4)  # attention projections: the model's dtype, or HQQ 8 or 4 bits
OFFLOAD_MODES = ("fetch", "cpu")
SELECTIONS = ("random", "frequency", "sensitivity")
BOOLS = {"0": False, "false": False, "no": False, "off": False, "1": True, "true": True, "yes": True, "on": True}
BYTE_UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
              "tb": 10**12, "b": 1}


def choice_error(what: str, value, allowed) -> ValueError:
    return ValueError(f"{what}={value!r} is not supported; choose one of {', '.join(map(str, allowed))}")


def check_group_size(group_size: int) -> None:
    if group_size <= 0 or group_size % 8:
        raise ValueError(f"group_size={group_size} must be a positive multiple of 8")


def parse_bytes(text: str | int) -> int:
    """'80000000', '6GiB', '512MB' -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    number, scale = t, 1
    for unit, factor in BYTE_UNITS.items():
        if t.endswith(unit):
            number, scale = t[: -len(unit)], factor
            break
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"not a byte count: {text!r} (examples: 8000000000, 6GiB, 512MB)") from None
    if not 0 <= value < 2**63:
        raise ValueError(f"byte count out of range: {text!r}")
    return int(value)


def parse_bool(text) -> bool:
    """A boolean from a grid, a flag or a CSV cell; missing (None, NaN, empty) is False."""
    if text is None or (isinstance(text, float) and text != text):
        return False
    if isinstance(text, str):
        t = text.strip().lower()
        if not t:
            return False
        if t not in BOOLS:
            raise ValueError(f"not a boolean: {text!r}; use 0 or 1 (false or true)")
        return BOOLS[t]
    return bool(text)


@dataclass(frozen=True)
class Knobs:
    """What a person asks for; `placement.plan.build_plan` turns it into a Plan for one model.

    An unquantized plan (quantized=0) has bits 16: its experts keep their precision. A scored
    selection still orders its 16-bit experts (which stay on the accelerator) by the scores of
    DEFAULT_BITS, see `score_bits`.
    """

    quantized: int = 0
    bits: int = DEFAULT_BITS
    selection: str = "random"
    seed: int = 0
    gpu_experts: int | None = None  # None with gpu_budget None: every expert on the accelerator
    gpu_budget: int | None = None  # bytes; the number of accelerator experts follows
    host_budget: int | None = None  # bytes the plan's host tier may hold; a plan over it is an error
    offload: str = "fetch"
    cache_slots: int | None = None  # None: twice the router's top-k
    group_size: int = 64
    prefetch: bool = False  # fetch only; off where it cannot act (see build_plan)
    attn_bits: int = 16  # every layer's attention projections (16: the model's dtype, as before the knob)

    def __post_init__(self):
        if self.bits not in BITS:
            raise choice_error("bits", self.bits, BITS)
        if self.attn_bits not in ATTN_BITS:
            raise choice_error("attn_bits", self.attn_bits, ATTN_BITS)
        if self.selection not in SELECTIONS:
            raise choice_error("selection", self.selection, SELECTIONS)
        if self.offload not in OFFLOAD_MODES:
            raise choice_error("offload", self.offload, OFFLOAD_MODES)
        if self.quantized < 0:
            raise ValueError(f"quantized={self.quantized} must be >= 0")
        if self.quantized and self.bits == 16:
            raise ValueError("bits=16 leaves experts unquantized: pass quantized=0 or bits in 8, 4, 3, 2")
        if self.gpu_experts is not None and self.gpu_budget is not None:
            raise ValueError("give gpu_experts or gpu_budget, not both")
        if self.gpu_experts is not None and self.gpu_experts < 0:
            raise ValueError(f"gpu_experts={self.gpu_experts} must be >= 0")
        if self.gpu_budget is not None and self.gpu_budget < 0:
            raise ValueError(f"gpu_budget={self.gpu_budget} must be >= 0 bytes")
        if self.host_budget is not None and self.host_budget < 0:
            raise ValueError(f"host_budget={self.host_budget} must be >= 0 bytes")
        if self.cache_slots is not None and self.cache_slots < 1:
            raise ValueError(f"cache_slots={self.cache_slots} must be >= 1")
        check_group_size(self.group_size)
        if not isinstance(self.prefetch, bool):
            raise ValueError(f"prefetch={self.prefetch!r} must be True or False")
        if self.quantized == 0:  # nothing is quantized: one spelling, so equal plans compare equal
            object.__setattr__(self, "bits", 16)

    @property
    def score_bits(self) -> int:
        """The precision whose sensitivity scores order the experts."""
        return DEFAULT_BITS if self.bits == 16 else self.bits


# --- the schema ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Knob:
    name: str  # the Knobs field, the grid key, the CSV column and (with dashes) the flag
    kind: str  # int | str | bool | bytes
    help: str
    choices: tuple = ()
    percent: bool = False  # "25%" means that share of the model's experts
    column: bool = True  # a column of measured rows (gpu_budget is not: rows record gpu_experts)
    flag: bool = True  # a plan flag of the command line (seed comes with the model flags)
    exclusive: str | None = None  # flags of one group exclude each other
    blank: Any = None  # the cell that stands for None in a measured row
    # the optuna distribution for a search over a model with `total` experts and `top_k`: None when
    # the search does not vary the knob
    space: Callable[[int, int], tuple] | None = None

    @property
    def default(self):
        return next(f.default for f in fields(Knobs) if f.name == self.name)

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, text: str, total: int | None = None):
        """One value as a person writes it (grid, flag) -> the Knobs field's value. `total` (the
        model's experts) resolves percentages; without it they stay text until `resolve`."""
        text = str(text).strip()
        where = f"{self.name}={text!r}"
        if self.kind == "str":
            if self.choices and text not in self.choices:
                raise choice_error(self.name, text, self.choices)
            return text
        if self.kind == "bool":
            try:
                return parse_bool(text)
            except ValueError:
                raise ValueError(f"{where} is not a boolean; use 0 or 1 (false or true)") from None
        if self.kind == "bytes":
            return parse_bytes(text)
        if text.endswith("%"):
            if not self.percent:
                raise ValueError(f"{self.name} does not take percentages ({text!r}); only "
                                 f"{', '.join(k.name for k in KNOBS if k.percent)} do")
            try:
                share = float(text[:-1])
            except ValueError:
                raise ValueError(f"{where} is not a percentage") from None
            if not 0 <= share <= 100:
                raise ValueError(f"{where} is outside 0%..100%")
            return text if total is None else round(total * share / 100)
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{where} is not an integer") from None
        if self.choices and value not in self.choices:
            raise choice_error(self.name, value, self.choices)
        return value

    def from_cell(self, value):
        """A measured row's cell -> the Knobs field's value (older files: missing is the default)."""
        if self.kind == "bool":
            return parse_bool(value)
        if value is None or (isinstance(value, float) and value != value):
            return self.default
        if self.kind == "str":
            return str(value)
        value = int(value)
        return None if self.blank is not None and value == self.blank else value


def _counts(total: int, top_k: int) -> tuple:
    return ("int", 0, total)


KNOBS = (
    Knob("quantized", "int", "how many experts to quantize (a count or a share, e.g. 50%)", percent=True,
         space=_counts),
    Knob("bits", "int", "precision of quantized experts", choices=BITS,
         space=lambda total, top_k: ("categorical", list(QUANT_BITS))),
    Knob("selection", "str", "which experts are quantized first: random (seeded), frequency (least routed) "
         "or sensitivity (least harmed)", choices=SELECTIONS,
         space=lambda total, top_k: ("categorical", list(SELECTIONS))),
    Knob("seed", "int", "seed of the random selection", flag=False),
    Knob("gpu_experts", "int", "experts on the accelerator, a count or a share", percent=True,
         exclusive="where", space=_counts),
    Knob("gpu_budget", "bytes", "accelerator bytes (e.g. 20GiB); the number of accelerator experts follows",
         column=False, exclusive="where"),
    Knob("host_budget", "bytes", "host memory bytes (e.g. 64GiB) the plan's host-tier experts may hold "
         "(pinned, plus dequantized matrices with --offload cpu); a plan over it is an error", column=False),
    Knob("offload", "str", "how host experts run: fetch (copied into accelerator slots) or cpu (computed on "
         "the host)", choices=OFFLOAD_MODES, space=lambda total, top_k: ("categorical", list(OFFLOAD_MODES))),
    Knob("cache_slots", "int", "accelerator slots for fetched experts", blank=0,
         space=lambda total, top_k: ("int", 1, 4 * top_k)),
    # Like cache_slots, prefetch acts only with fetch offload and host experts; elsewhere build_plan
    # drops it, so both values give one plan_id (measured once). Searched on every trial all the same,
    # so NSGA-II's crossover sees a fixed search space.
    Knob("prefetch", "bool", "copy the host experts the next layer's router picks into fetch slots ahead of "
         "use; dropped with --offload cpu, without host experts or with fewer than 2 x top-k slots",
         space=lambda total, top_k: ("categorical", [False, True])),
    # Its default (16) keeps every plan and row from before the knob as it was (same plan_id; a row
    # without the column reads back as 16); the paper's sweep keeps it at 16.
    Knob("attn_bits", "int", "precision of every layer's attention projections (q, k, v, o): 16 keeps the "
         "model's dtype, 8 or 4 quantizes them with HQQ (--group-size)", choices=ATTN_BITS,
         space=lambda total, top_k: ("categorical", list(ATTN_BITS))),
    Knob("group_size", "int", "HQQ group size"),
)
BY_NAME = {k.name: k for k in KNOBS}
KNOB_COLUMNS = [k.name for k in KNOBS if k.column]


def knob(name: str) -> Knob:
    try:
        return BY_NAME[name.replace("-", "_")]
    except KeyError:
        raise ValueError(f"unknown knob {name!r}; knobs: {', '.join(BY_NAME)}") from None


def resolve(values: dict, total: int) -> dict:
    """Percentages among `values` (as parsed without the model) -> expert counts of a model with
    `total` experts."""
    return {name: BY_NAME[name].parse(v, total) if isinstance(v, str) and v.endswith("%") else v
            for name, v in values.items()}


# --- the grid language of `qos profile` --------------------------------------------------------------
def parse_grid(text: str, total_experts: int) -> list[dict]:
    """'quantized=0,25%,50%;bits=4,2;gpu_experts=50%,100%;prefetch=0,1' -> every combination of the
    values, as keyword arguments of Knobs."""
    axes: dict[str, list] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, values = part.partition("=")
        if not sep or not values.strip():
            raise ValueError(f"grid: {part!r} should look like key=v1,v2")
        try:
            k = knob(key.strip())
        except ValueError as err:
            raise ValueError(f"grid: {err}") from None
        if k.name in axes:
            raise ValueError(f"grid: {k.name} is given twice")
        try:
            axes[k.name] = list(dict.fromkeys(k.parse(v, total_experts) for v in values.split(",")))
        except ValueError as err:
            raise ValueError(f"grid: {err}") from None
    if "gpu_experts" in axes and "gpu_budget" in axes:
        raise ValueError("grid: give gpu_experts or gpu_budget, not both")
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


# --- the command line -------------------------------------------------------------------------------
def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per plan knob, in a group of its own, with every default shown."""
    group = parser.add_argument_group("plan knobs")
    exclusive: dict[str, Any] = {}
    for k in KNOBS:
        if not k.flag:
            continue
        target = group
        if k.exclusive:
            if k.exclusive not in exclusive:
                exclusive[k.exclusive] = group.add_mutually_exclusive_group()
            target = exclusive[k.exclusive]
        if k.kind == "bool":
            target.add_argument(k.option, action="store_true", help=k.help.replace("%", "%%"))
            continue
        shown = {"gpu_experts": "all", "cache_slots": "2 x top-k", "gpu_budget": "none",
                 "host_budget": "none"}.get(k.name, k.default)
        metavar = "{" + ",".join(map(str, k.choices)) + "}" if k.choices else ("BYTES" if k.kind == "bytes" else "N")
        target.add_argument(k.option, type=_flag_type(k), default=k.default, metavar=metavar,
                            help=f"{k.help} (default: {shown})".replace("%", "%%"))


def _flag_type(k: Knob):
    def parse(text: str):
        try:
            return k.parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = k.name  # argparse names the type in its errors
    return parse


def knobs_from_args(args: argparse.Namespace, total: int | None = None) -> Knobs:
    """The Knobs the plan flags (and `--seed`) ask for; `total` resolves percentages."""
    values = {k.name: getattr(args, k.name) for k in KNOBS if k.flag}
    values["seed"] = getattr(args, "seed", 0)
    pending = [n for n, v in values.items() if isinstance(v, str) and v.endswith("%")]
    if pending and total is None:
        raise ValueError(f"{', '.join(pending)} as a share needs the model's expert count")
    return Knobs(**resolve(values, total or 0))


# --- measured rows ---------------------------------------------------------------------------------
def knobs_from_row(row: dict) -> Knobs:
    """The knobs that rebuild a measured row's plan (with the same selection scores)."""
    return Knobs(**{k.name: k.from_cell(row.get(k.name)) for k in KNOBS if k.column})


def knob_cells(knobs: Knobs) -> dict:
    """A row's knob columns."""
    cells = {k.name: getattr(knobs, k.name) for k in KNOBS if k.column}
    return {n: BY_NAME[n].blank if v is None else v for n, v in cells.items()}


# --- the optuna search space ----------------------------------------------------------------------
def suggest(trial, total: int, top_k: int, **fixed) -> Knobs:
    """Knobs for one optuna trial: every knob with a search space is suggested, in schema order (the
    order a seeded sampler draws in), the rest take `fixed` values or their defaults."""
    values = dict(fixed)
    for k in KNOBS:
        if k.space is None or k.name in fixed:
            continue
        kind, *args = k.space(total, top_k)
        if kind == "int":
            values[k.name] = trial.suggest_int(k.name, *args)
        else:
            values[k.name] = trial.suggest_categorical(k.name, *args)
    return Knobs(**values)
