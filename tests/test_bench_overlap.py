"""experiments/bench_overlap.py: its tables from rows, and its refusals (it times CUDA kernels)."""

import argparse

import pandas as pd
import pytest
import torch

from experiments import bench_overlap
from placement import kernels
from placement.decode import Decoder


def test_tables_from_rows():
    rows = [dict(part="kernels", form=f, bits=4, slots=1, ms=ms) for f, ms in (("serial", 0.041), ("pdl", 0.039))]
    rows += [dict(part="breakdown", bits=2, slots=1, left_out=left, ms=ms)
             for left, ms in (("nothing", 0.034), ("down", 0.021), ("gate_up", 0.0157), ("gate_up+down", 0.0024))]
    rows += [dict(part="decode", form="pdl", plan="4-bit", batch=1, round=r, tok_s=t) for r, t in enumerate((480, 490, 500))]
    kern, parts, dec = bench_overlap.summarize(pd.DataFrame(rows))
    assert kern.loc[(4, 1), "serial"] == pytest.approx(41.0) and kern.loc[(4, 1), "pdl"] == pytest.approx(39.0)
    # what each kernel costs: the call less the call without it
    assert parts.loc[(2, 1)].to_dict() == pytest.approx(dict(call=34.0, gate_up=18.3, down=13.0, quantizing=2.4))
    assert dec.loc[("4-bit", 1), "pdl"] == 490  # the median of the rounds
    assert len(bench_overlap.summarize(pd.DataFrame(rows[:2]))) == 1  # parts without rows are left out


def test_unknown_forms_and_no_cuda_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_overlap.main(["--forms", "serial,fast", "--out", str(tmp_path / "o.csv")])
    assert exc.value.code == 2 and "unknown forms ['fast']" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA GPU"):
            bench_overlap.main(["--out", str(tmp_path / "o.csv")])


def test_decode_rows_per_form_on_the_tiny_model(monkeypatch):
    # the decode part through bench_grouping_decode.alternate, on the CPU (no fused kernels, so the
    # forms time the same code): a row per (batch, form), each form applied while it is timed
    seen = []
    monkeypatch.setattr(kernels, "PDL_BITS", kernels.PDL_BITS)  # restored after the test
    generate = Decoder.generate
    monkeypatch.setattr(Decoder, "generate", lambda self, *a, **k: (seen.append(set(kernels.PDL_BITS)),
                                                                    generate(self, *a, **k))[1])
    args = argparse.Namespace(model="tiny-random", layers=2, device="cpu", data=None, plans=["4-bit"], batches=[1, 2],
                              rounds=1, new_tokens=3, min_prompt=8, max_prompt=16)
    rows = bench_overlap.time_decode(args, ["serial", "pdl quantized"])
    assert [(r["batch"], r["form"]) for r in rows] == [(1, "serial"), (1, "pdl quantized"), (2, "serial"),
                                                       (2, "pdl quantized")]
    assert all(r["tok_s"] > 0 and r["plan"] == "4-bit" for r in rows)
    # each row's warm-up and timed run under its form
    assert seen == ([set()] * 2 + [{8, 4, 2}] * 2) * 2
