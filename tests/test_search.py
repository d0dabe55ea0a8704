import pandas as pd
import pytest

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
    assert main(args + ["--trials", "6"]) == 0
    df = pd.read_csv(out)
    sweep = df[df["source"] == "sweep"]
    assert sorted(sweep["quantized"]) == [0, 8, 16] and (sweep["selection"] == "random").all()
    assert (sweep["gpu_bytes"] <= 1_200_000).all()  # the sweep fills the budget, never more
    front = df[df["pareto"]]
    assert len(front) >= 1 and (front["gpu_bytes"] <= 1_200_000).all()  # infeasible plans are never on it
    assert df["plan_id"].is_unique
    capsys.readouterr()
    assert main(args + ["--trials", "9", "--json"]) == 0  # resumes the journal: 3 more trials
    assert '"trials": 9' in capsys.readouterr().out


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
                                     settings=types.SimpleNamespace(datasets=("ptb",)),
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
