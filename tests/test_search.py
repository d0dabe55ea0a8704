import json

import pandas as pd
import pytest

from placement import kernels
from catalog.knobs import Knobs
from placement.plan import build_plan
from profiler.search import population_for, sweep_points
from qos.cli import main
from tests.test_profiler import needs_data


def test_population_and_sweep_shapes():
    assert population_for(10) == 4 and population_for(100) == 20 and population_for(10_000) == 50
    assert sweep_points(16, 4) == [0, 4, 8, 12, 16]


@needs_data
def test_search_enqueues_the_sweep_respects_the_budget_marks_the_front_and_resumes(tmp_path, capsys):
    out, journal = tmp_path / "front.csv", tmp_path / "study.journal"
    args = ["search", "--model", "tiny-random", "--out", str(out), "--storage", str(journal),
            "--max-windows", "1", "--seqlen", "32", "--new-tokens", "3", "--repeats", "1",
            "--sweep-steps", "2", "--gpu-budget", "1.2MB", "--quiet"]
    assert main(args + ["--trials", "3", "--json"]) == 0  # the sweep's 3 points, then 3 trials of the sampler
    summary = json.loads(capsys.readouterr().out)
    assert summary["trials"] == 6 and summary["sweep_trials"] == 3 and summary["search_trials"] == 3
    df = pd.read_csv(out)
    sweep = df[df["source"] == "sweep"]
    assert sorted(sweep["quantized"]) == [0, 8, 16] and (sweep["selection"] == "random").all()
    assert not sweep["prefetch"].any()  # the paper's sweep, as published: no prefetch
    assert (sweep["gpu_bytes"] <= 1_200_000).all()  # the sweep fills the budget, never more
    front = df[df["pareto"]]
    assert len(front) >= 1 and (front["gpu_bytes"] <= 1_200_000).all()  # infeasible plans are never on it
    assert df["plan_id"].is_unique
    assert main(args + ["--trials", "6", "--json"]) == 0  # resumes the journal: 3 more trials of the sampler
    summary = json.loads(capsys.readouterr().out)
    assert summary["trials"] == 9 and summary["sweep_trials"] == 3 and summary["search_trials"] == 6


def test_search_never_measures_plans_over_the_host_budget(tmp_path, capsys):
    out = tmp_path / "front.csv"
    args = ["search", "--model", "tiny-random", "--out", str(out), "--max-windows", "1", "--seqlen", "32",
            "--new-tokens", "3", "--repeats", "1", "--sweep-steps", "2", "--gpu-budget", "1.2MB",
            "--host-budget", "600kB", "--trials", "3", "--quiet", "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    df = pd.read_csv(out)
    assert summary["trials"] == 6 and 0 < len(df) < 6  # the 16-bit sweep point (1.18 MB on the host) was not measured
    assert (df["host_bytes"] <= 600_000).all() and 0 not in set(df[df["source"] == "sweep"]["quantized"])


@needs_data
def test_search_can_maximise_batched_throughput_measured_by_the_profile(tmp_path, capsys):
    out = tmp_path / "front.csv"
    args = ["search", "--model", "tiny-random", "--out", str(out), "--max-windows", "1", "--seqlen", "32",
            "--new-tokens", "3", "--repeats", "1", "--sweep-steps", "2", "--trials", "3", "--quiet",
            "--datasets", "wikitext2"]
    for bad, message in [([], "time batch 2 too (--batch-sizes 1,2)"),
                         (["--batch-sizes", "1,2", "--screen"], "--screen only a search of decode_tok_s"),
                         (["--batch-sizes", "1,2", "--speed", "tpot_p95_ms_b2"], "unknown speed column")]:
        speed = [] if "--speed" in bad else ["--speed", "agg_tok_s_b2"]
        assert main(args + speed + bad) == 2
        assert message in capsys.readouterr().err
    assert main(args + ["--speed", "agg_tok_s_b2", "--batch-sizes", "1,2"]) == 0
    df = pd.read_csv(out)
    assert (df["agg_tok_s_b2"] > 0).all() and df["pareto"].any()


def test_search_space_has_prefetch_which_counts_only_with_fetched_host_experts(tmp_path):
    import types

    import optuna
    import torch

    from placement.plan import build_plan
    from placement.spec import ModelSpec
    from profiler.search import Search

    spec = ModelSpec("mixtral", 2, 4, 2, 64, 128, torch.float32, nonexpert_bytes=1000)
    profiler = types.SimpleNamespace(engine=types.SimpleNamespace(spec=spec), fixed={"device_name": "cpu"},
                                     seqlen=32, reuse_perplexity=lambda rows: None,
                                     settings=types.SimpleNamespace(batch_sizes=(1,)),
                                     plan=lambda knobs: build_plan(spec, knobs))
    search = Search(profiler, tmp_path / "out.csv")
    params = {"quantized": 0, "bits": 4, "selection": "random", "gpu_experts": 2, "offload": "fetch",
              "cache_slots": 4, "attn_bits": 16}
    plans = {(offload, prefetch): search.profiler.plan(search.knobs(optuna.trial.FixedTrial(
        {**params, "offload": offload, "prefetch": prefetch}))) for offload in ("fetch", "cpu") for prefetch in (False, True)}
    assert plans["fetch", True].prefetch and plans["fetch", True] != plans["fetch", False]
    assert plans["cpu", True] == plans["cpu", False]  # one plan_id: measured once
    assert all(p["prefetch"] is False for p in search.sweep(2))


def test_search_needs_perplexity(capsys, tmp_path):
    assert main(["search", "--model", "tiny-random", "--trials", "2", "--out", str(tmp_path / "x.csv"),
                 "--datasets", ""]) == 2
    assert "needs perplexity" in capsys.readouterr().err


def test_cost_model_adds_call_costs_and_simulates_the_fetch_lru():
    from placement.plan import ExpertState, Plan
    from profiler.costmodel import CostModel

    trace = (((0, 1),), ((0, 2),), ((0, 1),))  # 3 tokens, 1 layer, top-2
    model = CostModel(nonexpert_s=1.0, accel_s={16: 0.1, 4: 0.2}, host_s={16: 0.5, 4: 0.6},
                      copy_bytes_per_s=100.0, trace=trace, expert_bytes={16: 100, 4: 30})
    s = lambda bits, tier: ExpertState(bits, tier)  # noqa: E731
    all_accel = Plan(((s(16, "accel"),) * 3,))
    assert model.predict_s(all_accel) == pytest.approx(1.0 + 2 * 0.1)
    mixed = Plan(((s(4, "accel"), s(16, "host"), s(16, "host")),), "fetch", 1)
    # expert 0: 0.2 per call; experts 1, 2 share one slot: 1 miss, 2 miss, 1 miss -> 3 copies of 1 s
    assert model.predict_s(mixed) == pytest.approx(1.0 + (3 * 0.2 + 3 * 0.1 + 3 * 1.0) / 3)
    two_slots = Plan(mixed.states, "fetch", 2)  # 1 and 2 both stay: 2 misses
    assert model.predict_s(two_slots) == pytest.approx(1.0 + (3 * 0.2 + 3 * 0.1 + 2 * 1.0) / 3)
    on_cpu = Plan(mixed.states, "cpu")
    assert model.predict_tok_s(on_cpu) == pytest.approx(1 / (1.0 + (3 * 0.2 + 3 * 0.5) / 3))


def test_screening_skips_only_plans_a_measured_plan_beats_by_the_margin(tmp_path):
    import types

    import torch

    from placement.plan import ExpertState, Plan
    from placement.spec import ModelSpec
    from profiler.costmodel import CostModel
    from profiler.search import Search

    spec = ModelSpec("mixtral", 1, 2, 1, 64, 128, torch.float32, nonexpert_bytes=1000)
    profiler = types.SimpleNamespace(engine=types.SimpleNamespace(spec=spec), ppl_cache={},
                                     settings=types.SimpleNamespace(datasets=("ptb",), batch_sizes=(1,)),
                                     fixed={"device_name": "cpu"}, seqlen=32,
                                     reuse_perplexity=lambda rows: None)
    cost = CostModel(nonexpert_s=0.01, accel_s={16: 0.001, 4: 0.002}, host_s={16: 0.05, 4: 0.05},
                     copy_bytes_per_s=1e6, trace=(((0,),), ((1,),)), expert_bytes={16: 98304, 4: 20000})
    search = Search(profiler, tmp_path / "out.csv", cost=cost, margin=0.15)
    slow = Plan(((ExpertState(16, "host"), ExpertState(16, "host")),), "cpu")  # ~16.5 tok/s predicted
    fast = Plan(((ExpertState(16, "accel"), ExpertState(16, "accel")),))  # ~91 tok/s predicted
    search.rows = {"m": {"plan_id": "m", "decode_tok_s": 80.0, "ppl_ptb": 10.0, "gpu_bytes": 1000}}
    assert search.screened(slow) is not None  # a measured plan is faster, as good, no bigger
    assert search.screened(fast) is None  # the prediction beats everything measured: measure it
    profiler.ppl_cache[slow.precision_id] = {"ppl_ptb": 9.5}  # known better perplexity: measure it
    assert search.screened(slow) is None


def test_fused_cost_model_charges_launches_per_precision_and_the_eager_layer_once():
    from placement.plan import ExpertState, Plan
    from profiler.costmodel import CostModel

    trace = (((0, 1), (0, 2)),)  # 1 token, 2 layers, top-2
    model = CostModel(nonexpert_s=1.0, accel_s={16: 0.1, 4: 0.05, 3: 0.4}, host_s={16: 0.5},
                      copy_bytes_per_s=100.0, trace=trace, expert_bytes={16: 100, 4: 30, 3: 25},
                      fetch_s={16: 0.3}, copy_fixed_s=0.2, fused_bits=(16, 4), launch_s=0.01,
                      eager_layer_s=2.0)
    s = lambda bits, tier: ExpertState(bits, tier)  # noqa: E731
    # a launch per layer for its one fused precision, whatever the routing, plus the routed calls
    assert model.predict_s(Plan(((s(16, "accel"),) * 3,) * 2)) == pytest.approx(1.0 + 2 * 0.01 + 4 * 0.1)
    # layer 0 holds 16- and 4-bit experts: two launches; layer 1 only 4-bit ones
    two = Plan(((s(4, "accel"), s(16, "accel"), s(4, "accel")), (s(4, "accel"),) * 3))
    assert model.predict_s(two) == pytest.approx(1.0 + 3 * 0.01 + (0.05 + 0.1) + 2 * 0.05)
    # each layer holds a host expert, so each leaves the kernels once (routed there or not);
    # layer 1 routes to its host expert 2: a miss costs the fixed part plus bytes over bandwidth
    host = Plan(((s(16, "accel"), s(16, "accel"), s(16, "host")), (s(16, "accel"),) * 2 + (s(16, "host"),)),
                "fetch", 1)
    assert model.predict_s(host) == pytest.approx(1.0 + 2 * 0.01 + 2 * 2.0 + 3 * 0.1 + (0.2 + 1.0 + 0.3))
    # a precision without a kernel (3-bit) runs in the loop too: eager layer, per-call cost
    three = Plan(((s(3, "accel"),) * 3, (s(16, "accel"),) * 3))
    assert model.predict_s(three) == pytest.approx(1.0 + 2.0 + 2 * 0.4 + 0.01 + 2 * 0.1)
    # quantized attention adds its own per-token difference (here: faster at 4 bits)
    attn = CostModel(**{**model.__dict__, "attn_s": {4: -0.25, 8: 0.5}})
    plain = Plan(((s(16, "accel"),) * 3,) * 2)
    for bits, extra in ((16, 0.0), (8, 0.5), (4, -0.25)):
        assert attn.predict_s(Plan(plain.states, attn_bits=bits)) == pytest.approx(model.predict_s(plain) + extra)


def test_calibration_fits_every_constant_on_a_real_decode(fresh):
    from placement.engine import Engine
    from profiler.costmodel import calibrate

    model, _ = fresh()
    engine = Engine(model, use_kernels=False)
    ids = list(range(5, 100))
    cost = calibrate(engine, ids[:8], ids, bits=(16, 4), new_tokens=4, trace_tokens=16)
    assert cost.fused_bits == () and cost.launch_s == 0.0 and cost.eager_layer_s == 0.0
    assert set(cost.attn_s) == {8, 4}  # a decode with quantized attention each, against the 16-bit one
    assert engine.plan.attn_bits == 16  # (calibration ends on the router trace's plan)
    assert cost.nonexpert_s > 0 and cost.copy_bytes_per_s > 0
    assert set(cost.accel_s) == set(cost.host_s) == {16, 4} and min(cost.accel_s.values()) >= 0
    assert len(cost.trace) == 16 and all(len(t) == engine.spec.num_layers for t in cost.trace)
    assert cost.predict_tok_s(build_plan(engine.spec, Knobs(gpu_experts=2))) > 0


@pytest.mark.skipif(not kernels.available("cpu"), reason="needs triton (its CPU interpreter)")
def test_calibration_with_fused_kernels_splits_launch_call_and_eager_layer(fresh):
    from placement.engine import Engine
    from profiler.costmodel import calibrate

    model, _ = fresh()
    engine = Engine(model, use_kernels=True)
    ids = list(range(5, 100))
    cost = calibrate(engine, ids[:4], ids, bits=(16, 4, 3), new_tokens=2, trace_tokens=8)
    assert cost.fused_bits == (16, 4)  # 3-bit has no kernel
    assert cost.launch_s > 0 and cost.eager_layer_s >= 0
    assert set(cost.fetch_s) == {16, 4} and set(cost.accel_s) == {16, 4, 3}
    assert all(v >= 0 for v in [*cost.accel_s.values(), *cost.host_s.values(), *cost.fetch_s.values()])
