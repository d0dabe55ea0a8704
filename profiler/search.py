"""Pareto search over plans with optuna's NSGA-II: maximise decode tok/s (at batch 1, or with N
sequences at once: `speed`), minimise perplexity and
accelerator bytes, under an optional accelerator budget (a constraint, not a filter afterwards)
and an optional host budget (a constraint too: plans over it are never measured).

The paper's one-dimensional sweep (random selection, quantized count stepping over the whole
range, as many experts on the accelerator as fit) is enqueued first, so the front can only improve
on it. Measurements are cached by plan_id and shared with `qos profile` files: a plan measured
before is never measured again, and samplers do propose duplicates.
"""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
import pandas as pd
from tqdm.auto import tqdm

from catalog.knobs import Knobs, suggest
from catalog.rows import COLUMNS, batch_columns, check_speed, row_ppl
from placement.plan import build_plan
from profiler.profile import Measurements, Profiler

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial drowns the progress bar


def open_storage(storage: str | None):
    """None: in memory. A URL (sqlite:///x.db): optuna's RDB storage. Anything else: a journal
    file, which parallel writers cannot corrupt and optuna-dashboard opens too."""
    if storage is None:
        return None
    if "://" in storage:
        return storage
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    Path(storage).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(storage))


def population_for(trials: int) -> int:
    """About five generations for the trials asked, between 4 and optuna's default of 50."""
    return max(4, min(50, trials // 5))


def sweep_points(total: int, steps: int) -> list[int]:
    return sorted({round(total * i / steps) for i in range(steps + 1)})


def check_search_speed(speed: str, batch_sizes, *, screened: bool) -> None:
    """The throughput objective must be measured by the profile (its batch size timed) and, with
    cost-model screening, be the batch-1 speed the cost model predicts."""
    batch = check_speed(speed)
    if batch != 1 and batch not in batch_sizes:
        raise ValueError(f"the search maximises {speed}: time batch {batch} too (--batch-sizes 1,{batch})")
    if screened and speed != "decode_tok_s":
        raise ValueError("the cost model predicts batch-1 decode_tok_s: --screen only a search of decode_tok_s")


class Search:
    def __init__(self, profiler: Profiler, out: Path, *, gpu_budget: int | None = None,
                 known: list[Path] = (), selection_seed: int = 0, cost=None, margin: float = 0.15,
                 speed: str = "decode_tok_s", remeasure: str | None = None, host_budget: int | None = None):
        check_search_speed(speed, profiler.settings.batch_sizes, screened=cost is not None)
        self.speed = speed  # the throughput objective: batch 1, or N sequences at once
        self.profiler, self.out, self.budget = profiler, Path(out), gpu_budget
        self.host_budget = host_budget
        self.over_host_budget = 0
        self.selection_seed = selection_seed
        self.cost, self.margin = cost, margin  # a profiler.costmodel.CostModel screens candidates
        self.screened_out = 0
        spec = profiler.engine.spec
        self.total, self.top_k = spec.num_layers * spec.num_experts, spec.top_k
        # every plan measured before, here or by `qos profile`, on this model, hardware and window
        self.measurements = Measurements(profiler, self.out, known, remeasure=remeasure)
        self.rows = self.measurements.rows  # plan_id -> row
        self.source: dict[str, str] = {}

    @property
    def measured_here(self) -> int:
        return self.measurements.measured

    # --- one trial ------------------------------------------------------------------------------
    def knobs(self, trial: optuna.Trial) -> Knobs:
        return suggest(trial, self.total, self.top_k, seed=self.selection_seed)

    def measure(self, knobs: Knobs) -> dict:
        return self.measurements.get(knobs)[0]

    def _ppl(self, row: dict) -> float:
        return row_ppl(row, self.profiler.settings.datasets)

    def screened(self, plan) -> tuple[float, float] | None:
        """With a cost model: (predicted tok/s, optimistic ppl) when a measured plan beats this one
        even so (faster by the margin, no more bytes, no worse perplexity); None: worth measuring."""
        if self.cost is None or not self.rows:
            return None
        tok_s = self.cost.predict_tok_s(plan)
        cached = self.profiler.ppl_cache.get(plan.precision_id)
        measured = [(float(r["decode_tok_s"]), self._ppl(r), int(r["gpu_bytes"])) for r in self.rows.values()
                    if not r.get("flagged")]
        if not measured:
            return None
        # without its perplexity, assume the best any measured plan reached
        ppl = self._ppl(cached) if cached else min(p for _, p, _ in measured)
        bytes_ = plan.gpu_bytes(self.profiler.engine.spec)
        for t, p, b in measured:
            if t >= tok_s * (1 + self.margin) and p <= ppl and b <= bytes_:
                return tok_s, ppl
        return None

    def objective(self, trial: optuna.Trial):
        knobs = self.knobs(trial)
        plan = self.profiler.plan(knobs)
        if self.host_budget is not None:  # feasible when <= 0; a plan over it cannot even be applied
            over = plan.host_bytes(self.profiler.engine.spec) - self.host_budget
            trial.set_constraint("host_budget", float(over))
            if over > 0:
                trial.set_user_attr("over_host_budget", True)
                self.over_host_budget += 1
                raise optuna.TrialPruned(f"plan {plan.plan_id} needs {over} bytes more host memory than the budget")
        if plan.plan_id not in self.rows and trial.user_attrs.get("source") != "sweep":
            guess = self.screened(plan)
            if guess is not None:  # told to the sampler, never written as a measurement
                trial.set_user_attr("screened", True)
                self.screened_out += 1
                if self.budget is not None:
                    trial.set_constraint("gpu_budget", float(plan.gpu_bytes(self.profiler.engine.spec) - self.budget))
                return guess[0], guess[1], float(plan.gpu_bytes(self.profiler.engine.spec))
        row = self.measure(knobs)
        trial.set_user_attr("plan_id", str(row["plan_id"]))
        if row.get("flagged"):  # its timed runs never agreed: not a measurement to rank
            trial.set_user_attr("flagged", True)
            raise optuna.TrialPruned(f"plan {row['plan_id']} is flagged: its timed runs disagree")
        if self.budget is not None:  # feasible when <= 0: NSGA-II ranks infeasible trials last
            trial.set_constraint("gpu_budget", float(row["gpu_bytes"] - self.budget))
        self.source.setdefault(str(row["plan_id"]), trial.user_attrs.get("source", "search"))
        return float(row[self.speed]), self._ppl(row), float(row["gpu_bytes"])

    # --- the study ------------------------------------------------------------------------------
    def sweep(self, steps: int) -> list[dict]:
        """The paper's sweep as trial parameters: accelerator experts fill the budget (or all)."""
        params = []
        for q in sweep_points(self.total, steps):
            knobs = Knobs(quantized=q, bits=4, gpu_budget=self.budget)
            gpu = build_plan(self.profiler.engine.spec, knobs).gpu_experts
            params.append({"quantized": q, "bits": 4, "selection": "random", "gpu_experts": gpu,
                           "offload": "fetch", "cache_slots": 2 * self.profiler.engine.spec.top_k,
                           "prefetch": False, "attn_bits": 16})
        return params

    def run(self, trials: int, *, seed: int = 0, storage: str | None = None, study_name: str = "moe-qos",
            sweep_steps: int = 8, progress: bool = True) -> optuna.Study:
        """The sweep's points first, then `trials` trials of the sampler beyond them (a resumed
        study runs what is missing of both)."""
        sampler = optuna.samplers.NSGAIISampler(population_size=population_for(trials), seed=seed)
        study = optuna.create_study(directions=["maximize", "minimize", "minimize"], sampler=sampler,
                                    storage=open_storage(storage), study_name=study_name, load_if_exists=True)
        sweep = self.sweep(sweep_steps)
        if not study.trials:  # a resumed study already ran its sweep
            for params in sweep:
                study.enqueue_trial(params, user_attrs={"source": "sweep"})
        done = len([t for t in study.trials if t.state.is_finished()])
        todo = max(0, len(sweep) + trials - done)
        with tqdm(total=todo, desc=f"search ({len(sweep)} sweep points, then {trials} sampler trials)", unit="trial",
                  disable=not progress) as bar:
            study.optimize(self.objective, n_trials=todo, callbacks=[lambda study, trial: bar.update()])
        return study

    @staticmethod
    def counts(study: optuna.Study) -> dict:
        """Trials by where they came from (the sweep or the sampler) and how they ended."""
        finished = [t for t in study.trials if t.state.is_finished()]
        sweep = [t for t in finished if t.user_attrs.get("source") == "sweep"]
        return {"sweep_trials": len(sweep), "search_trials": len(finished) - len(sweep),
                "flagged_trials": sum(1 for t in finished if t.user_attrs.get("flagged"))}

    def write_front(self, study: optuna.Study) -> pd.DataFrame:
        """Every row the study measured or reused, its source, and whether it is Pareto-optimal
        (among the feasible ones, as optuna's best_trials)."""
        best = {t.user_attrs["plan_id"] for t in study.best_trials if "plan_id" in t.user_attrs}
        ids = [t.user_attrs["plan_id"] for t in study.trials if "plan_id" in t.user_attrs]
        for t in study.trials:  # sources of a resumed study come from its trials
            if "plan_id" in t.user_attrs:
                self.source.setdefault(t.user_attrs["plan_id"], t.user_attrs.get("source", "search"))
        rows = [self.rows[i] for i in dict.fromkeys(ids) if i in self.rows]
        df = pd.DataFrame(rows, columns=[*COLUMNS, *batch_columns(c for r in rows for c in r)])
        df["source"] = [self.source.get(str(i), "search") for i in df["plan_id"]]
        df["pareto"] = df["plan_id"].astype(str).isin(best)
        df.to_csv(self.out, index=False)
        return df
