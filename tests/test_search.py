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
