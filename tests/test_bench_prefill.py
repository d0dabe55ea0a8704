"""bench_prefill's machinery on the CPU (tiny-random; no fused kernels here, so the times are the
per-expert path's): every variant of each plan timed, the engine's limits restored, clear errors."""

import pandas as pd
import pytest

import placement.engine as engine_module
from experiments import bench_prefill
from placement import kernels


def test_every_variant_of_each_plan_is_timed_and_the_limits_restored(tmp_path):
    before = engine_module.QUANTIZED_KERNEL_MAX_TOKENS, kernels.DEQ_MIN_TOKENS
    out = tmp_path / "p.csv"
    bench_prefill.main(["--model", "tiny-random", "--layers", "2", "--prompts", "3", "--min-prompt", "8",
                        "--max-prompt", "24", "--reps", "1", "--out", str(out)])
    table = pd.read_csv(out)
    names = [name for name, *_ in bench_prefill.variants(0)]
    assert table.plan.tolist() == ["4-bit"] * len(names) + ["half 4-bit"] * len(names)
    assert table.variant.tolist() == names * 2
    assert (table.prefill_s > 0).all() and (table.prompt_tokens == table.prompt_tokens[0]).all()
    assert 3 * 8 <= table.prompt_tokens[0] <= 3 * 24
    assert (engine_module.QUANTIZED_KERNEL_MAX_TOKENS, kernels.DEQ_MIN_TOKENS) == before
    summary = bench_prefill.summarize(table)
    assert summary[summary.variant == "64-row chunks, kernels"].over_64_row_chunks.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("args, message", [
    (["--plans", "3-bit"], "unknown plan"),
    (["--min-prompt", "40", "--max-prompt", "20"], "--min-prompt <= --max-prompt"),
    (["--reps", "0"], "at least 1"),
])
def test_bad_arguments_are_named(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_prefill.main([*args, "--out", str(tmp_path / "p.csv")])
    assert message in capsys.readouterr().err
