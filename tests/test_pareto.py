import pandas as pd
import pytest

from catalog.pareto import front, parse_objectives, pareto_mask
from catalog.rows import with_ppl


def rows():
    return pd.DataFrame({
        "plan_id": list("abcde"),
        "decode_tok_s": [10.0, 20.0, 15.0, 20.0, None],
        "ppl_wikitext2": [4.0, 5.0, 6.0, 5.0, 3.0],
        "ppl_ptb": [8.0, 9.0, 10.0, 9.0, 1.0],
        "gpu_bytes": [100, 100, 50, 120, 10],
        "ppl_note": ["", "", "", "", ""],
    })


def test_front_keeps_exactly_the_non_dominated_rows():
    df = with_ppl(rows())
    assert df["ppl"].tolist() == [6.0, 7.0, 8.0, 7.0, 2.0]
    mask = pareto_mask(df)
    # d is dominated by b (same speed and ppl, more bytes); e has no speed measurement
    assert mask.tolist() == [True, True, True, False, False]
    assert front(df)["plan_id"].tolist() == ["b", "c", "a"]  # fastest first
    two = parse_objectives("decode_tok_s:max,ppl:min")
    assert pareto_mask(df, two).tolist() == [True, True, False, True, False]


def test_bad_objectives_and_columns_are_named():
    with pytest.raises(ValueError, match="COLUMN:max or COLUMN:min"):
        parse_objectives("decode_tok_s:up")
    with pytest.raises(ValueError, match="'latency' is not in the file"):
        pareto_mask(rows(), (("latency", "min"),))
    with pytest.raises(ValueError, match="ppl_c4"):
        with_ppl(rows(), ["c4"])


def test_front_and_plot_commands_on_a_profile(tmp_path, capsys):
    from qos.cli import main

    df = rows().dropna()
    df = df.assign(model="m", device_name="cpu", quantized=[0, 4, 8, 8], bits=[16, 4, 4, 2],
                   selection="random", gpu_experts=[8, 8, 4, 8], offload="fetch")
    path = tmp_path / "p.csv"
    df.to_csv(path, index=False)
    assert main(["front", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3 of 4 plans are Pareto-optimal" in out
    assert main(["plot", str(path), "--out-prefix", str(tmp_path / "pic")]) == 0
    for name in ("pic_front.png", "pic_heatmap.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert main(["front", str(tmp_path / "missing.csv")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_hypervolume_in_two_and_three_objectives():
    from catalog.pareto import hypervolume

    df = pd.DataFrame({"decode_tok_s": [10.0, 20.0], "ppl": [1.0, 2.0], "gpu_bytes": [1.0, 1.0]})
    two = (("decode_tok_s", "max"), ("ppl", "min"))
    # reference (0 tok/s, ppl 3): [0,10]x[1,3] united with [0,20]x[2,3] = 20 + 10
    assert hypervolume(df, (0.0, 3.0), two) == pytest.approx(30.0)
    assert hypervolume(df, (0.0, 3.0, 2.0)) == pytest.approx(30.0)  # bytes 1 up to 2: depth 1
    worse = df.assign(decode_tok_s=[5.0, 20.0])
    assert hypervolume(worse, (0.0, 3.0), two) < hypervolume(df, (0.0, 3.0), two)
    assert hypervolume(df.iloc[:0], (0.0, 3.0), two) == 0.0
