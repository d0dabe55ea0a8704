"""bench_grouping_decode's machinery on the CPU (tiny-random; no fused kernels here): both sets of
thresholds timed per plan and batch, clear errors."""

import pandas as pd
import pytest

from experiments import bench_grouping_decode


def test_both_threshold_sets_are_timed_per_plan_and_batch(tmp_path):
    out = tmp_path / "g.csv"
    bench_grouping_decode.main(["--model", "tiny-random", "--layers", "2", "--plans", "4-bit", "--batches", "1,2",
                                "--rounds", "1", "--new-tokens", "3", "--min-prompt", "8", "--max-prompt", "16",
                                "--out", str(out)])
    table = pd.read_csv(out)
    assert table[["batch", "thresholds"]].values.tolist() == [[1, "single"], [1, "engine"], [2, "single"],
                                                              [2, "engine"]]
    assert (table.tok_s > 0).all() and (table.plan == "4-bit").all()
    summary = bench_grouping_decode.summarize(table)
    assert list(summary.columns) == ["engine", "single", "engine_over_single"]


@pytest.mark.parametrize("args, message", [
    (["--plans", "3-bit"], "unknown plan"),
    (["--batches", "0,4"], "at least 1"),
    (["--min-prompt", "9", "--max-prompt", "4"], "--min-prompt <= --max-prompt"),
])
def test_bad_arguments_are_named(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_grouping_decode.main([*args, "--out", str(tmp_path / "g.csv")])
    assert message in capsys.readouterr().err
