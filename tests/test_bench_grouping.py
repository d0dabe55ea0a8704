"""experiments/bench_grouping.py: its crossover rule on hand-made rows, one small layer through both
paths in Triton's interpreter (the two paths must agree before anything is timed), and the
thresholds it saves per GPU, as the engine reads them."""

import json
import logging

import pytest
import torch

from experiments import bench_grouping
from experiments.bench_grouping import bench, crossover, save_thresholds
from placement.engine import GROUPED_MIN_TOKENS_PER_EXPERT, grouping_thresholds


def _rows(bits, ratios):
    return [dict(bits=bits, tokens=t, tokens_per_expert=float(t), grouped_over_slots=r)
            for t, r in zip((1, 2, 4, 8), ratios)]


def test_the_crossover_is_where_the_grouped_kernels_win_from_then_on():
    assert crossover(_rows(4, (2.0, 1.5, 0.8, 0.5)), 4) == 3.0  # midway between 2 and 4 tokens
    assert crossover(_rows(4, (2.0, 0.9, 1.1, 0.5)), 4) == 6.0  # a win that does not last does not count
    assert crossover(_rows(4, (2.0, 0.9, 1.03, 0.5)), 4) == 1.5  # a tie after it does not undo it
    assert crossover(_rows(4, (2.0, 1.02, 0.9, 0.5)), 4) == 3.0  # nor is a tie a win
    assert crossover(_rows(4, (0.9, 0.8, 0.8, 0.5)), 4) == 1.0
    assert crossover(_rows(4, (2.0, 1.5, 1.2, 1.1)), 4) is None
    assert crossover(_rows(4, (0.5,) * 4), 16) is None  # no rows at that precision


def test_both_paths_agree_on_a_small_layer_in_the_interpreter():
    rows = bench([4, 16], [1, 3], hidden=128, inter=256, routings=2, iters=1)  # (a GPU where there is one)
    assert [(r["bits"], r["tokens"]) for r in rows] == [(4, 1), (4, 3), (16, 1), (16, 3)]
    for r in rows:
        assert r["rel_diff"] < 1e-2, r  # int16 activations and bf16 rounding of h apart, the same sums
        assert r["slots_ms"] > 0 and r["grouped_ms"] > 0
        assert r["grouped_over_slots"] == pytest.approx(r["grouped_ms"] / r["slots_ms"])
    assert rows[0]["tokens_per_expert"] == 1.0


def test_a_gpus_saved_crossovers_are_what_the_engine_reads_for_it(tmp_path, caplog):
    path = tmp_path / "grouping.json"
    path.write_text(json.dumps({"NVIDIA H100 80GB HBM3": {"4": 2.5}}))
    table = save_thresholds(path, "NVIDIA H100 80GB HBM3", {16: 1.2, 4: 3.01234, 2: None})  # 2: none found
    assert table == {"NVIDIA H100 80GB HBM3": {"4": 3.012, "16": 1.2}}
    assert grouping_thresholds("NVIDIA H100 80GB HBM3", path) == {**GROUPED_MIN_TOKENS_PER_EXPERT, 16: 1.2, 4: 3.012}
    # another GPU, no GPU, no file: the defaults (measured on an H200)
    assert grouping_thresholds("NVIDIA A100-SXM4-80GB", path) == GROUPED_MIN_TOKENS_PER_EXPERT
    assert grouping_thresholds(None, path) == GROUPED_MIN_TOKENS_PER_EXPERT
    assert grouping_thresholds("NVIDIA H100 80GB HBM3", tmp_path / "none.json") == GROUPED_MIN_TOKENS_PER_EXPERT
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert grouping_thresholds("NVIDIA H100 80GB HBM3", path) == GROUPED_MIN_TOKENS_PER_EXPERT
    assert "the default grouping thresholds apply" in caplog.text


def test_bad_arguments_name_the_problem(capsys):
    with pytest.raises(SystemExit):
        bench_grouping.main(["--bits", "5"])
    assert "--bits must be among" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_grouping.main(["--tokens", "1,x"])
    assert "comma-separated integers" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA --save would run the benchmark")
def test_only_a_gpus_measurement_is_saved(capsys):
    with pytest.raises(SystemExit):
        bench_grouping.main(["--save"])
    assert "--save keeps a GPU's crossovers" in capsys.readouterr().err
