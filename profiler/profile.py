"""Measure plans: decode and prefill throughput, time to first token, memory per tier, expert
cache behaviour, and perplexity on WikiText-2, PTB and C4, one tidy row per plan."""

from __future__ import annotations

import datetime as dt
import logging
import platform
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from catalog.data import DATASETS, calibration_text, eval_text
from catalog.knobs import Knobs, knob_cells
from catalog.rows import COLUMNS, append_row, read_profile
from placement.decode import timed_generate
from placement.plan import Plan
from placement.planner import row_knobs
from placement.session import Session
from profiler.perplexity import eval_windows, perplexity

log = logging.getLogger(__name__)


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
    ppl_batch: int = 1  # windows per forward pass when scoring perplexity

    def __post_init__(self):
        for name in ("prompt_tokens", "new_tokens", "repeats", "batch_size", "ppl_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.new_tokens < 2:
            raise ValueError("new-tokens must be >= 2 to time decoding")
        unknown = set(self.datasets) - set(DATASETS)
        if unknown:
            raise ValueError(f"unknown dataset(s) {sorted(unknown)}; choose from {', '.join(DATASETS)}")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:  # hqq is imported by placement/hqq_backend.py alone
        try:
            return version(name)
        except PackageNotFoundError:
            return "unknown"

    return {"torch": torch.__version__, "transformers": of("transformers"), "hqq": of("hqq")}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


class Profiler:
    """Measures plans of one model session; perplexity is cached by precision map."""

    def __init__(self, session: Session, settings: Settings):
        self.session, self.settings = session, settings
        self.loaded, self.engine = session.loaded, session.engine
        config = self.loaded.model.config
        self.seqlen = settings.seqlen or min(2048, config.max_position_embeddings)
        if self.seqlen > config.max_position_embeddings:
            raise ValueError(f"seqlen={self.seqlen} exceeds the model's context ({config.max_position_embeddings})")
        self.ppl_cache: dict[str, dict] = {}  # precision_id -> {ppl_<dataset>: value, "ppl_note": ...}
        self._windows: dict[str, tuple[list, str]] = {}
        self.fixed = {"device": str(self.engine.accel), "device_name": _device_name(self.engine.accel), **_versions()}
        self.prompt = self._prompt()

    # --- inputs -------------------------------------------------------------------------------
    def _prompt(self) -> list[int]:
        """A fixed prompt of real text: the start of WikiText-2 (or the calibration text)."""
        text = eval_text("wikitext2", self.settings.data) if "wikitext2" in self.settings.datasets else \
            calibration_text(self.session.identity.calib, self.settings.data)
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
        return self.session.planner.calib_ids()

    # --- plans --------------------------------------------------------------------------------
    def plan(self, knobs: Knobs) -> Plan:
        return self.session.plan(knobs)

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
        for r in rows.to_dict(orient="records"):
            if not self.comparable(r):
                continue
            ppl = {f"ppl_{d}": r.get(f"ppl_{d}") for d in self.settings.datasets}
            if all(pd.notna(v) for v in ppl.values()):
                self.ppl_cache.setdefault(r["precision_id"], {**ppl, "ppl_note": r.get("ppl_note") or ""})

    def measure(self, plan: Plan, knobs: Knobs) -> dict:
        """One row: the model identity, the knobs that rebuild `plan`, and what was measured."""
        self.engine.apply(plan)
        summary = plan.summary(self.engine.spec)
        row = {
            **self.session.identity.cells(), "plan_id": plan.plan_id, "precision_id": plan.precision_id,
            **knob_cells(row_knobs(knobs, plan)),
            "experts_total": summary["experts_total"], "gpu_bytes": summary["gpu_bytes"],
            "host_bytes": summary["host_bytes"],
            **self._throughput(), **self._perplexity(plan), "seqlen": self.seqlen,
            "prompt_tokens": len(self.prompt), "new_tokens": self.settings.new_tokens,
            "repeats": self.settings.repeats, **self.fixed,
            "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        return {c: row.get(c) for c in COLUMNS}

    def comparable(self, row: dict) -> bool:
        """Whether an earlier row is a measurement of this profiler's: same model, hardware and
        perplexity window."""
        same = {"model": self.session.identity.model, "device_name": self.fixed["device_name"], "seqlen": self.seqlen}
        return all(row.get(k) == v for k, v in same.items())


class Measurements:
    """Measure or reuse: every plan measured before (in `out` or the `known` files) by this kind of
    profiler is taken from there; a new plan is measured once and appended to `out` at once (an
    interrupted run resumes). The one loop behind `qos profile` and `qos search`."""

    def __init__(self, profiler: Profiler, out: str | Path, known: Iterable[str | Path] = ()):
        self.profiler, self.out = profiler, Path(out)
        self.rows: dict[str, dict] = {}  # plan_id -> row
        for path in [*known, self.out]:
            df = read_profile(path)
            profiler.reuse_perplexity(df)
            for row in df.to_dict(orient="records"):
                if profiler.comparable(row):
                    self.rows.setdefault(str(row["plan_id"]), row)
        self.measured = 0

    def get(self, knobs: Knobs) -> tuple[dict, bool]:
        """The row of the plan `knobs` build, and whether it was measured now."""
        plan = self.profiler.plan(knobs)
        if plan.plan_id in self.rows:
            return self.rows[plan.plan_id], False
        row = self.profiler.measure(plan, knobs)
        append_row(self.out, row)
        self.rows[plan.plan_id] = row
        self.measured += 1
        return row, True


def profile_grid(profiler: Profiler, knob_sets: list[Knobs], out: str | Path, *,
                 progress: Callable[[Iterable], Iterable] = lambda it: it) -> dict:
    """Measure every plan of `knob_sets` not measured yet; rows go to `out` as they finish."""
    measurements = Measurements(profiler, out)
    skipped = 0
    for knobs in progress(knob_sets):
        _, new = measurements.get(knobs)
        skipped += not new
    return {"out": str(out), "combinations": len(knob_sets), "measured": measurements.measured,
            "skipped": skipped}
