"""experiments/bench_grouping.py: its crossover rule on hand-made rows, and one small layer through
both paths in Triton's interpreter (the two paths must agree before anything is timed)."""

import pytest

from experiments import bench_grouping
from experiments.bench_grouping import bench, crossover


def _rows(bits, ratios):
    return [dict(bits=bits, tokens=t, tokens_per_expert=float(t), grouped_over_slots=r)
            for t, r in zip((1, 2, 4, 8), ratios)]


def test_the_crossover_is_where_the_grouped_kernels_win_from_then_on():
    assert crossover(_rows(4, (2.0, 1.5, 0.8, 0.5)), 4) == 3.0  # midway between 2 and 4 tokens
    assert crossover(_rows(4, (2.0, 0.9, 1.1, 0.5)), 4) == 6.0  # a win that does not last does not count
    assert crossover(_rows(4, (0.9, 0.8, 0.8, 0.5)), 4) == 1.0
    assert crossover(_rows(4, (2.0, 1.5, 1.2, 1.1)), 4) is None
    assert crossover(_rows(4, (0.5,) * 4), 16) is None  # no rows at that precision


def test_both_paths_agree_on_a_small_layer_in_the_interpreter():
    rows = bench([4, 16], [1, 3], hidden=128, inter=256, routings=2, iters=1, device="cpu")
    assert [(r["bits"], r["tokens"]) for r in rows] == [(4, 1), (4, 3), (16, 1), (16, 3)]
    for r in rows:
        assert r["rel_diff"] < 1e-2, r  # int16 activations and bf16 rounding of h apart, the same sums
        assert r["slots_ms"] > 0 and r["grouped_ms"] > 0
        assert r["grouped_over_slots"] == pytest.approx(r["grouped_ms"] / r["slots_ms"])
    assert rows[0]["tokens_per_expert"] == 1.0


def test_bad_arguments_name_the_problem(capsys):
    with pytest.raises(SystemExit):
        bench_grouping.main(["--bits", "5"])
    assert "--bits must be among" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_grouping.main(["--tokens", "1,x"])
    assert "comma-separated integers" in capsys.readouterr().err
