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
from catalog.rows import COLUMNS, append_row, batch_columns, read_profile, replace_row
from catalog.stats import percentile
from placement.decode import Decoder
from placement.plan import Plan
from placement.planner import row_knobs
from placement.session import Session
from profiler.perplexity import eval_windows, perplexity

log = logging.getLogger(__name__)
MAX_BATCH = 256
DECODER = "slots-1"  # rows timed through placement.decode.Decoder (older rows: transformers' generate)


@dataclass(frozen=True)
class Settings:
    datasets: tuple[str, ...] = ("wikitext2", "ptb", "c4")
    data: str | None = None
    seqlen: int | None = None  # default: min(2048, the model's context)
    max_windows: int | None = None
    prompt_tokens: int = 64
    new_tokens: int = 32
    repeats: int = 3
    batch_sizes: tuple[int, ...] = (1,)  # concurrent sequences to time decoding at (batch 1 always)
    ppl_batch: int = 1  # windows per forward pass when scoring perplexity
    max_spread: float = 0.25  # (max - min) / median of a plan's timed runs above this flags the row
    retries: int = 2  # measurements again, at most, of a plan whose runs disagree

    def __post_init__(self):
        if not 0 < self.max_spread:
            raise ValueError(f"max-spread must be > 0 (a ratio: 0.25 = 25%), got {self.max_spread}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        for name in ("prompt_tokens", "new_tokens", "repeats", "ppl_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_BATCH
                                       for b in self.batch_sizes):
            raise ValueError(f"batch-sizes must be integers from 1 to {MAX_BATCH}, got {self.batch_sizes!r}")
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
        self.decoder: Decoder | None = None  # made at the first measurement, kept across plans

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
    def _decoder(self) -> Decoder:
        if self.decoder is None:
            s = self.settings
            self.decoder = Decoder(self.loaded.model, self.engine, max_seqs=max(s.batch_sizes),
                                   max_len=s.prompt_tokens + s.new_tokens + 1)
        return self.decoder

    def _throughput(self) -> dict:
        """Decode timed through the serving decoder: at batch 1 (per-sequence speed, time to first
        token, time per output token) and at every other batch size asked for (aggregate and
        per-sequence speed). An untimed run of each batch size first captures its graphs."""
        s, engine = self.settings, self.engine
        decoder = self._decoder()
        cuda = engine.accel.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(engine.accel)
        out, spread = {}, 0.0
        sizes = sorted({1, *s.batch_sizes})
        for b in sizes:
            prompts = [self.prompt] * b
            decoder.generate(prompts, s.new_tokens, fixed_length=True)  # warm-up
            if b == 1:
                engine.reset_stats()
            runs = [decoder.generate(prompts, s.new_tokens, fixed_length=True) for _ in range(s.repeats)]
            steps_ms = [1000 * t for r in runs for t in r.step_s]
            speeds = [r.sequences[0].decode_tok_s if b == 1 else r.decode_tok_s for r in runs]
            spread = max(spread, (max(speeds) - min(speeds)) / statistics.median(speeds))
            if b == 1:
                seqs = [r.sequences[0] for r in runs]
                stats = engine.stats
                out |= {
                    "decode_tok_s": statistics.median(speeds),
                    "decode_tok_s_min": min(speeds), "decode_tok_s_max": max(speeds),
                    "prefill_tok_s": statistics.median(g.prefill_tok_s for g in seqs),
                    "ttft_s": statistics.median(g.ttft_s for g in seqs),
                    "ttft_p95_s": percentile([g.ttft_s for g in seqs], 95),
                    "tpot_p50_ms": percentile(steps_ms, 50), "tpot_p95_ms": percentile(steps_ms, 95),
                    "hit_rate": stats.hit_rate,
                    "fetched_bytes_per_token": stats.bytes_fetched / (s.repeats * s.new_tokens),
                }
            else:
                agg = statistics.median(r.decode_tok_s for r in runs)
                out |= {  # every sequence runs every step: each gets 1/b of the aggregate
                    f"agg_tok_s_b{b}": agg, f"seq_tok_s_b{b}": agg / b,
                    f"tpot_p95_ms_b{b}": percentile(steps_ms, 95),
                }
        out["peak_accel_bytes"] = torch.cuda.max_memory_allocated(engine.accel) if cuda else None
        out["decode_graphs"] = decoder.reason or "on"
        out["batch_sizes"] = ",".join(map(str, sizes))
        out["spread"] = spread  # the worst over the batch sizes timed
        return out

    def _timed(self, plan: Plan) -> dict:
        """Throughput whose timed runs agree within max_spread, measuring again up to `retries`
        times (a busy moment of the machine is not a property of the plan); a row that never
        agrees is kept, `flagged`, and left out of fronts, the policy and the search."""
        s = self.settings
        for attempt in range(1, s.retries + 2):
            timed = self._throughput()
            if timed["spread"] <= s.max_spread:
                break
            log.warning("plan %s: timed runs disagree by %.0f%% (attempt %d of %d)", plan.plan_id,
                        100 * timed["spread"], attempt, s.retries + 1)
        return timed | {"flagged": timed["spread"] > s.max_spread, "attempts": attempt}

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
            **self._timed(plan), **self._perplexity(plan), "seqlen": self.seqlen,
            "prompt_tokens": len(self.prompt), "new_tokens": self.settings.new_tokens,
            "repeats": self.settings.repeats, "decoder": DECODER, **self.fixed,
            "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        return {c: row.get(c) for c in [*COLUMNS, *batch_columns(row)]}

    def comparable(self, row: dict) -> bool:
        """Whether an earlier row is a measurement of this profiler's: same model, hardware and
        perplexity window."""
        same = {"model": self.session.identity.model, "device_name": self.fixed["device_name"], "seqlen": self.seqlen,
                "decoder": DECODER}
        return all(row.get(k) == v for k, v in same.items())


class Measurements:
    """Measure or reuse: every plan measured before (in `out` or the `known` files) by this kind of
    profiler is taken from there, unless `remeasure` asks for it again ("all", "flagged", or a
    comma-separated list of plan ids); a plan is measured at most once per run and its row goes to
    `out` at once (replacing an earlier row of `out`), so an interrupted run resumes. The one loop
    behind `qos profile` and `qos search`."""

    def __init__(self, profiler: Profiler, out: str | Path, known: Iterable[str | Path] = (),
                 remeasure: str | None = None):
        self.profiler, self.out = profiler, Path(out)
        self.remeasure = remeasure
        self.rows: dict[str, dict] = {}  # plan_id -> row
        for path in [*known, self.out]:
            df = read_profile(path)
            profiler.reuse_perplexity(df)
            for row in df.to_dict(orient="records"):
                if profiler.comparable(row):
                    self.rows[str(row["plan_id"])] = row  # out's own rows last: they win
        self.in_out = set(read_profile(self.out)["plan_id"].astype(str))
        self.done: set[str] = set()  # measured in this run
        self.measured = self.remeasured = self.flagged = 0

    def _again(self, plan_id: str, row: dict) -> bool:
        if plan_id in self.done or self.remeasure is None:
            return False
        if self.remeasure in ("all", "flagged"):
            return self.remeasure == "all" or bool(row.get("flagged"))
        return plan_id in {p.strip() for p in self.remeasure.split(",")}

    def get(self, knobs: Knobs) -> tuple[dict, bool]:
        """The row of the plan `knobs` build, and whether it was measured now."""
        plan = self.profiler.plan(knobs)
        old = self.rows.get(plan.plan_id)
        if old is not None and not self._again(plan.plan_id, old):
            return old, False
        row = self.profiler.measure(plan, knobs)
        if plan.plan_id in self.in_out:
            replace_row(self.out, row)
            self.remeasured += 1
        else:
            append_row(self.out, row)
            self.in_out.add(plan.plan_id)
        self.rows[plan.plan_id] = row
        self.done.add(plan.plan_id)
        self.measured += 1
        self.flagged += bool(row["flagged"])
        return row, True


def profile_grid(profiler: Profiler, knob_sets: list[Knobs], out: str | Path, *, remeasure: str | None = None,
                 progress: Callable[[Iterable], Iterable] = lambda it: it) -> dict:
    """Measure every plan of `knob_sets` not measured yet (or asked for again); rows go to `out` as
    they finish."""
    measurements = Measurements(profiler, out, remeasure=remeasure)
    skipped = 0
    for knobs in progress(knob_sets):
        _, new = measurements.get(knobs)
        skipped += not new
    return {"out": str(out), "combinations": len(knob_sets), "measured": measurements.measured,
            "remeasured": measurements.remeasured, "skipped": skipped,
            "flagged": measurements.flagged}
