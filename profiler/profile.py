"""Measure plans: decode and prefill throughput, time to first token, memory per tier, expert
cache behaviour, and perplexity on WikiText-2, PTB and C4, one tidy row per plan."""

from __future__ import annotations

import datetime as dt
import logging
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from placement.plan import Knobs, Plan, build_plan
from profiler.grid import BOOLS
from profiler.data import calibration_text, eval_text
from profiler.perplexity import eval_windows, perplexity
from profiler.selection import scores_for
from profiler.throughput import timed_generate

log = logging.getLogger(__name__)

KNOB_COLUMNS = ["quantized", "bits", "selection", "seed", "gpu_experts", "offload", "cache_slots", "prefetch",
                "group_size"]
COLUMNS = [
    "model", "plan_id", "precision_id", *KNOB_COLUMNS, "experts_total",
    "decode_tok_s", "decode_tok_s_batch", "batch_size", "prefill_tok_s", "ttft_s",
    "gpu_bytes", "host_bytes", "peak_accel_bytes", "hit_rate", "fetched_bytes_per_token",
    "ppl_wikitext2", "ppl_ptb", "ppl_c4", "ppl_note", "seqlen",
    "prompt_tokens", "new_tokens", "repeats", "device", "device_name", "torch", "transformers", "hqq",
    "measured_at",
]


@dataclass(frozen=True)
class Settings:
    datasets: tuple[str, ...] = ("wikitext2", "ptb", "c4")
    data: str | None = None
    seqlen: int | None = None  # default: min(2048, the model's context)
    max_windows: int | None = None
    prompt_tokens: int = 64
    new_tokens: int = 32
    repeats: int = 3
    batch_size: int = 1  # a second decode measurement at this batch size when > 1
    calib: str | None = None
    ppl_batch: int = 1  # windows per forward pass when scoring perplexity

    def __post_init__(self):
        for name in ("prompt_tokens", "new_tokens", "repeats", "batch_size", "ppl_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.new_tokens < 2:
            raise ValueError("new-tokens must be >= 2 to time decoding")
        unknown = set(self.datasets) - {"wikitext2", "ptb", "c4"}
        if unknown:
            raise ValueError(f"unknown dataset(s) {sorted(unknown)}; choose from wikitext2, ptb, c4")


def _versions() -> dict:
    import hqq
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "hqq": getattr(hqq, "__version__", "unknown")}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


class Profiler:
    """Measures plans of one loaded model; perplexity is cached by precision map."""

    def __init__(self, name: str, loaded, engine, settings: Settings):
        self.name, self.loaded, self.engine, self.settings = name, loaded, engine, settings
        config = loaded.model.config
        self.seqlen = settings.seqlen or min(2048, config.max_position_embeddings)
        if self.seqlen > config.max_position_embeddings:
            raise ValueError(f"seqlen={self.seqlen} exceeds the model's context ({config.max_position_embeddings})")
        self.ppl_cache: dict[str, dict] = {}  # precision_id -> {ppl_<dataset>: value, "ppl_note": ...}
        self.planner = Planner(engine, name, self.calib_ids)
        self._windows: dict[str, tuple[list, str]] = {}
        self._calib_ids: list[int] | None = None
        self.fixed = {"device": str(engine.accel), "device_name": _device_name(engine.accel), **_versions()}
        self.prompt = self._prompt()

    # --- inputs -------------------------------------------------------------------------------
    def _prompt(self) -> list[int]:
        """A fixed prompt of real text: the start of WikiText-2 (or the calibration text)."""
        text = eval_text("wikitext2", self.settings.data) if "wikitext2" in self.settings.datasets else \
            calibration_text(self.settings.calib, self.settings.data)
        ids = self.loaded.tokenizer.encode(text[: 40 * self.settings.prompt_tokens])[: self.settings.prompt_tokens]
        if len(ids) < self.settings.prompt_tokens:
            raise ValueError(f"the prompt text gives only {len(ids)} of {self.settings.prompt_tokens} tokens")
        return ids

    def windows(self, dataset: str) -> tuple[list, str]:
        if dataset not in self._windows:
            self._windows[dataset] = eval_windows(
                self.loaded.tokenizer, dataset, eval_text(dataset, self.settings.data),
                seqlen=self.seqlen, max_windows=self.settings.max_windows)
        return self._windows[dataset]

    def calib_ids(self) -> list[int]:
        if self._calib_ids is None:
            self._calib_ids = self.loaded.tokenizer.encode(calibration_text(self.settings.calib, self.settings.data))
        return self._calib_ids

    # --- plans --------------------------------------------------------------------------------
    def plan(self, knobs: Knobs) -> Plan:
        return self.planner.plan(knobs)

    # --- measurements -------------------------------------------------------------------------
    def _throughput(self) -> dict:
        s, engine, model = self.settings, self.engine, self.loaded.model
        cuda = engine.accel.type == "cuda"
        runs = []
        if cuda:
            torch.cuda.reset_peak_memory_stats(engine.accel)
        for i in range(s.repeats):
            runs.append(timed_generate(model, self.prompt, s.new_tokens, fixed_length=True,
                                       warmup_tokens=None if i == 0 else 0,
                                       after_warmup=engine.reset_stats if i == 0 else None))
        stats = engine.stats
        out = {
            "decode_tok_s": statistics.median(r.decode_tok_s for r in runs),
            "prefill_tok_s": statistics.median(r.prefill_tok_s for r in runs),
            "ttft_s": statistics.median(r.ttft_s for r in runs),
            "hit_rate": stats.hit_rate,
            "fetched_bytes_per_token": stats.bytes_fetched / (s.repeats * s.new_tokens),
            "peak_accel_bytes": torch.cuda.max_memory_allocated(engine.accel) if cuda else None,
            "batch_size": s.batch_size,
            "decode_tok_s_batch": None,
        }
        if s.batch_size > 1:
            batched = [timed_generate(model, self.prompt, s.new_tokens, fixed_length=True, batch_size=s.batch_size,
                                      warmup_tokens=None if i == 0 else 0) for i in range(s.repeats)]
            out["decode_tok_s_batch"] = statistics.median(r.decode_tok_s for r in batched)
        return out

    def _perplexity(self, plan: Plan) -> dict:
        if plan.precision_id not in self.ppl_cache:
            row, notes = {}, []
            for ds in self.settings.datasets:
                windows, note = self.windows(ds)
                result = perplexity(self.loaded.model, ds, windows, note=note, batch_size=self.settings.ppl_batch)
                row[f"ppl_{ds}"] = result.ppl
                if note:
                    notes.append(f"{ds}: {note}")
            row["ppl_note"] = "; ".join(notes)
            self.ppl_cache[plan.precision_id] = row
        return self.ppl_cache[plan.precision_id]

    def reuse_perplexity(self, rows: pd.DataFrame) -> None:
        """Seed the perplexity cache from earlier rows of this hardware (its compute dtype) with the
        same window length: perplexity depends on the precision map only, whatever the placement."""
        same = (rows["seqlen"] == self.seqlen) & (rows["device_name"] == self.fixed["device_name"])
        for _, r in rows[same].iterrows():
            ppl = {f"ppl_{d}": r.get(f"ppl_{d}") for d in self.settings.datasets}
            if all(pd.notna(v) for v in ppl.values()):
                self.ppl_cache.setdefault(r["precision_id"], {**ppl, "ppl_note": r.get("ppl_note") or ""})

    def measure(self, plan: Plan, knobs: Knobs) -> dict:
        self.engine.apply(plan)
        summary = plan.summary(self.engine.spec)
        row = {
            "model": self.name, "plan_id": plan.plan_id, "precision_id": plan.precision_id,
            "quantized": summary["quantized"], "bits": summary["bits"] if plan.quantized else 16,
            "selection": knobs.selection, "seed": knobs.seed, "gpu_experts": summary["gpu_experts"],
            "offload": plan.offload, "cache_slots": summary["cache_slots"], "prefetch": plan.prefetch,
            "group_size": plan.group_size,
            "experts_total": summary["experts_total"], "gpu_bytes": summary["gpu_bytes"],
            "host_bytes": summary["host_bytes"],
            **self._throughput(), **self._perplexity(plan), "seqlen": self.seqlen,
            "prompt_tokens": len(self.prompt), "new_tokens": self.settings.new_tokens,
            "repeats": self.settings.repeats, **self.fixed,
            "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        return {c: row.get(c) for c in COLUMNS}


# --- plans from knobs and from rows -----------------------------------------------------------------
class Planner:
    """Builds plans of one engine from knobs, measuring each scored selection's scores once."""

    def __init__(self, engine, name: str, calib_ids):
        self.engine, self.name, self.calib_ids = engine, name, calib_ids  # calib_ids() -> token ids
        self.scores: dict[tuple, list] = {}  # (selection, bits, group_size) -> per-expert scores

    def plan(self, knobs: Knobs) -> Plan:
        key = (knobs.selection, knobs.bits, knobs.group_size)
        if knobs.selection != "random" and key not in self.scores:
            self.scores[key] = scores_for(self.engine, self.name, knobs, self.calib_ids())
        return build_plan(self.engine.spec, knobs, self.scores.get(key))

    def rebuild(self, row: dict) -> Plan:
        """The plan a profile row measured, checked by its plan_id."""
        plan = self.plan(knobs_from_row(row))
        if plan.plan_id != str(row["plan_id"]):
            raise ValueError(f"plan {row['plan_id']} does not rebuild on model {self.name!r} (got {plan.plan_id}): "
                             "was it measured on another model, or with other selection scores?")
        return plan


# --- the profile file ------------------------------------------------------------------------------
def flag(value) -> bool:
    """A boolean cell of a profile: missing (older files, NaN, empty) is False; CSV text is parsed
    as the grid parses it."""
    if value is None or (isinstance(value, float) and value != value):
        return False
    if isinstance(value, str):
        text = value.strip().lower()
        if text and text not in BOOLS:
            raise ValueError(f"not a boolean: {value!r}")
        return BOOLS.get(text, False)
    return bool(value)


def knobs_from_row(row: dict) -> Knobs:
    """The knobs that rebuild a row's plan (with the same selection scores)."""
    return Knobs(quantized=int(row["quantized"]), bits=int(row["bits"]) if row["quantized"] else 4,
                 selection=row["selection"], seed=int(row["seed"]), gpu_experts=int(row["gpu_experts"]),
                 offload=row["offload"], cache_slots=int(row["cache_slots"]) or None,
                 prefetch=flag(row.get("prefetch")), group_size=int(row["group_size"]))


def read_profile(path: str | Path) -> pd.DataFrame:
    """A profile's rows; knob columns added since it was written take their defaults."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=COLUMNS)
    df = pd.read_csv(path)
    missing = {"plan_id", "precision_id"} - set(df.columns)
    if missing:
        raise ValueError(f"{path} is not a moe-qos profile: no column(s) {', '.join(sorted(missing))}")
    if "prefetch" in df.columns:
        df["prefetch"] = df["prefetch"].map(flag)
    else:  # profiles from before the prefetch knob: every plan ran without it
        df.insert(df.columns.get_loc("cache_slots") + 1 if "cache_slots" in df.columns else len(df.columns),
                  "prefetch", False)
    return df


def append_row(path: str | Path, row: dict) -> None:
    """Append one row in the file's own column order; a file written before a column was added
    (or by a search, with its extra columns) is rewritten first with the missing columns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.stat().st_size == 0:
        pd.DataFrame([row], columns=COLUMNS).to_csv(path, index=False)
        return
    header = list(pd.read_csv(path, nrows=0).columns)
    if any(c not in header for c in COLUMNS):
        old = read_profile(path)
        old = old.reindex(columns=[*COLUMNS, *(c for c in old.columns if c not in COLUMNS)])
        old.to_csv(path, index=False)
        header = list(old.columns)
    pd.DataFrame([row]).reindex(columns=header).to_csv(path, mode="a", header=False, index=False)
