"""Measured rows: one tidy row per measured plan, the one schema that profiles, searches and fronts
share, with the model identity the row was measured on and one definition of
the derived objective `ppl` (every other objective is a column).

Everything downstream (fronts, pictures, the policy, the server) reads these files; a front carries
what is needed to rebuild its plans: the model identity columns and the knob columns.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd

from catalog.data import DATASETS
from catalog.knobs import KNOB_COLUMNS, Knobs, knobs_from_row, parse_bool


# --- what a row was measured on ----------------------------------------------------------------------
@dataclass(frozen=True)
class ModelIdentity:
    """The model a row was measured on: enough to load it again and to tell it from another.

    `layers` None: all of the model's layers; `dtype` None: the device's default; `calib` None: the
    default calibration text (PTB train of the data folder); `fingerprint` a hash of the weights'
    source (see placement.models.fingerprint), None in rows written before it was recorded.
    """

    model: str
    layers: int | None = None
    dtype: str | None = None
    model_seed: int = 0
    calib: str | None = None
    fingerprint: str | None = None

    def __post_init__(self):
        if not self.model:
            raise ValueError("a model identity needs a model name or path")
        if self.layers is not None and self.layers < 1:
            raise ValueError(f"layers={self.layers} must be >= 1")

    def cells(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_row(cls, row: Mapping) -> ModelIdentity:
        """The identity of a row; rows from before these columns existed have the defaults, and
        their model was seeded with the selection seed (one --seed set both)."""
        def cell(name):
            v = row.get(name)
            return None if v is None or (isinstance(v, float) and math.isnan(v)) or v == "" else v

        seed = cell("model_seed")
        return cls(str(row["model"]), None if cell("layers") is None else int(cell("layers")),
                   None if cell("dtype") is None else str(cell("dtype")),
                   int(seed if seed is not None else (cell("seed") or 0)),
                   None if cell("calib") is None else str(cell("calib")),
                   None if cell("fingerprint") is None else str(cell("fingerprint")))

    def describe(self) -> str:
        parts = [f"{self.layers} layer{'s' if self.layers > 1 else ''}" if self.layers else "all layers", self.dtype or "default dtype",
                 f"seed {self.model_seed}"]
        return f"{self.model} ({', '.join(parts)})"

    def mismatch(self, other: ModelIdentity) -> list[str]:
        """The fields where `other` differs (a fingerprint only counts when both have one)."""
        out = []
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "fingerprint" and (a is None or b is None):
                continue
            if a != b:
                out.append(f"{f.name} {a!r} vs {b!r}")
        return out


IDENTITY_COLUMNS = [f.name for f in fields(ModelIdentity)]

# --- the columns -----------------------------------------------------------------------------------
PPL_COLUMNS = [f"ppl_{d}" for d in DATASETS]
COLUMNS = [
    *IDENTITY_COLUMNS, "plan_id", "precision_id", *KNOB_COLUMNS, "experts_total",
    "decode_tok_s", "decode_tok_s_min", "decode_tok_s_max", "spread", "flagged", "attempts",
    "prefill_tok_s", "ttft_s", "ttft_p95_s", "tpot_p50_ms", "tpot_p95_ms", "batch_sizes",
    "gpu_bytes", "host_bytes", "peak_accel_bytes", "hit_rate", "fetched_bytes_per_token",
    *PPL_COLUMNS, "ppl_note", "seqlen",
    "prompt_tokens", "new_tokens", "repeats", "decoder", "decode_graphs", "device", "device_name", "torch", "transformers", "hqq",
    "measured_at",
]


# decode timed at batch b > 1: aggregate tok/s, per-sequence tok/s, p95 time per output token
BATCH_PREFIXES = ("agg_tok_s_b", "seq_tok_s_b", "tpot_p95_ms_b")


def batch_of(column: str) -> int:
    """The batch size N of a per-batch column (..._bN)."""
    return int(column.rsplit("_b", 1)[1])


def batch_columns(columns: Iterable[str]) -> list[str]:
    """The per-batch-size columns among `columns`, by batch size then kind."""
    found = [c for c in columns if any(c.startswith(p) and c[len(p):].isdigit() for p in BATCH_PREFIXES)]
    return sorted(found, key=lambda c: (batch_of(c), c))


def ppl_columns(columns: Iterable[str], datasets: Iterable[str] | None = None) -> list[str]:
    """The perplexity columns that make up `ppl`: those of `datasets`, else every one present."""
    columns = list(columns)
    if datasets:
        chosen = [f"ppl_{d}" for d in datasets]
        missing = [c for c in chosen if c not in columns]
        if missing:
            raise ValueError(f"no column(s) {', '.join(missing)} in the file")
        return chosen
    return [c for c in PPL_COLUMNS if c in columns]


def with_ppl(df: pd.DataFrame, datasets: list[str] | None = None) -> pd.DataFrame:
    """Adds `ppl`, the objective: the mean perplexity over the chosen datasets (all measured ones by
    default). The one definition; `row_ppl` is the same for one row."""
    cols = [c for c in ppl_columns(df.columns, datasets) if df[c].notna().any()]
    if not cols:
        raise ValueError("the file has no perplexity measurements")
    out = df.copy()
    out["ppl"] = out[cols].mean(axis=1)
    return out


def row_ppl(row: Mapping, datasets: Iterable[str]) -> float:
    """`ppl` of one row over `datasets`, as with_ppl computes it."""
    values = [float(row[c]) for c in ppl_columns(row.keys(), datasets)]
    return sum(values) / len(values)


# --- typed rows ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Measured:
    """One measured plan as the policy and the server use it."""

    identity: ModelIdentity
    knobs: Knobs
    plan_id: str
    decode_tok_s: float
    ppl: float
    gpu_bytes: int
    host_bytes: int
    ttft_s: tuple[float | None, float | None] = (None, None)  # p50, p95
    tpot_ms: tuple[float | None, float | None] = (None, None)  # p50, p95
    # time per output token (ms, p50 and p95) at every batch size measured, batch 1 first
    curve: tuple[tuple[int, float, float | None], ...] = ()

    @classmethod
    def from_record(cls, row: Mapping, speed: str = "decode_tok_s") -> Measured:
        """`speed` seq_tok_s_bN: the plan's per-sequence speed and time per output token with N
        running; older rows without latency percentiles take their median TTFT for both."""
        def cell(name):
            v = row.get(name)
            return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

        ttft = (cell("ttft_s"), cell("ttft_p95_s") if cell("ttft_p95_s") is not None else cell("ttft_s"))
        b1 = cell("tpot_p50_ms") or (1000 / float(row["decode_tok_s"]) if cell("decode_tok_s") else None)
        curve = [(1, b1, cell("tpot_p95_ms"))] if b1 else []
        for column in batch_columns(row.keys()):
            n = batch_of(column)
            if column.startswith("seq_tok_s_b") and n > 1 and cell(column):
                curve.append((n, 1000 / cell(column), cell(f"tpot_p95_ms_b{n}")))
        if speed.startswith("seq_tok_s_b"):
            n = batch_of(speed)
            tpot = (1000 / float(row[speed]), cell(f"tpot_p95_ms_b{n}"))
        else:
            tpot = (cell("tpot_p50_ms"), cell("tpot_p95_ms"))
        return cls(ModelIdentity.from_row(row), knobs_from_row(row), str(row["plan_id"]),
                   float(row[speed]), float(row["ppl"]), int(row["gpu_bytes"]), int(row["host_bytes"]), ttft, tpot,
                   tuple(sorted(curve)))


def check_speed(column: str, columns: Iterable[str] | None = None) -> int:
    """The batch size of `column` if it is a decode speed a row records (decode_tok_s at batch 1, or
    agg_/seq_tok_s_bN at batch N) and, given the file's `columns`, one it has; else a ValueError
    naming the choices."""
    if column != "decode_tok_s" and not (column in batch_columns([column]) and "tpot" not in column):
        raise ValueError(f"unknown speed column {column!r}; choose decode_tok_s (batch 1), agg_tok_s_bN "
                         "(N sequences, in aggregate) or seq_tok_s_bN (per sequence at N)")
    if columns is not None and column not in columns:
        measured = [c for c in batch_columns(columns) if "tpot" not in c]
        raise ValueError(f"the file has no {column} column; measured speeds: {', '.join(['decode_tok_s', *measured])} "
                         f"(profile with --batch-sizes to add batched ones)")
    return 1 if column == "decode_tok_s" else batch_of(column)


def read_front(path: str | Path, datasets: list[str] | None = None, speed: str = "decode_tok_s") -> list[Measured]:
    """The measured plans of a front or profile file, all of one model identity; `speed` is the
    column taken as each plan's decode speed (see check_speed)."""
    df = read_profile(path)
    if df.empty:
        raise ValueError(f"{path} has no measured plans")
    if passed(df).empty:
        raise ValueError(f"every plan of {path} is flagged (its timed runs disagree): measure them again "
                         "with qos profile --remeasure flagged")
    df = passed(df)
    check_speed(speed, df.columns)
    if df[speed].isna().any():
        raise ValueError(f"{path}: {int(df[speed].isna().sum())} plan(s) have no {speed}; profile them with the "
                         "same --batch-sizes")
    rows = [Measured.from_record(r, speed) for r in with_ppl(df, datasets).to_dict(orient="records")]
    identities = {r.identity for r in rows}
    if len(identities) > 1:
        raise ValueError(f"{path} mixes plans of several models: "
                         f"{'; '.join(sorted(i.describe() for i in identities))}")
    return rows


# --- the file --------------------------------------------------------------------------------------
def read_profile(path: str | Path) -> pd.DataFrame:
    """A profile's rows; columns added since it was written take their defaults."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=COLUMNS)
    try:
        df = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    missing = {"model", "plan_id"} - set(df.columns)
    if missing:
        raise ValueError(f"{path} is not a moe-qos profile: no column(s) {', '.join(sorted(missing))}")
    if "decode_tok_s_batch" in df.columns:  # profiles from before batch_sizes: one optional batch size
        for b in df["batch_size"].dropna().unique():
            if int(b) > 1:
                df[f"agg_tok_s_b{int(b)}"] = df["decode_tok_s_batch"].where(df["batch_size"] == b)
        df = df.drop(columns=["decode_tok_s_batch", "batch_size"])
    # rows from before `flagged`: their spread was never checked, and they count as passed
    df["flagged"] = df["flagged"].map(parse_bool) if "flagged" in df.columns else False
    if "prefetch" in df.columns:
        df["prefetch"] = df["prefetch"].map(parse_bool)
    else:  # profiles from before the prefetch knob: every plan ran without it
        df.insert(df.columns.get_loc("cache_slots") + 1 if "cache_slots" in df.columns else len(df.columns),
                  "prefetch", False)
    return df


def passed(df: pd.DataFrame) -> pd.DataFrame:
    """The rows whose timed runs agreed (not `flagged`): what fronts, the policy and the search use."""
    return df[~df["flagged"].astype(bool)]


def replace_row(path: str | Path, row: dict) -> None:
    """Put `row` in place of the file's rows of the same plan_id (a re-measurement)."""
    path = Path(path)
    old = read_profile(path)
    old[old["plan_id"].astype(str) != str(row["plan_id"])].to_csv(path, index=False)
    append_row(path, row)


def append_row(path: str | Path, row: dict) -> None:
    """Append one row in the file's own column order; a file written before a column was added
    (or by a search, with its extra columns) is rewritten first with the missing columns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.stat().st_size == 0:
        pd.DataFrame([row], columns=[*COLUMNS, *(c for c in row if c not in COLUMNS)]).to_csv(path, index=False)
        return
    header = list(pd.read_csv(path, nrows=0).columns)
    if any(c not in header for c in [*COLUMNS, *row]):
        old = read_profile(path)
        extra = [c for c in [*old.columns, *row] if c not in COLUMNS]
        old = old.reindex(columns=[*COLUMNS, *dict.fromkeys(extra)])
        old.to_csv(path, index=False)
        header = list(old.columns)
    pd.DataFrame([row]).reindex(columns=header).to_csv(path, mode="a", header=False, index=False)
