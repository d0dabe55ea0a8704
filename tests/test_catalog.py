"""The plan catalog: one knob schema behind the flags, the grid, the search space and the columns;
rows that carry the model they were measured on; committed profiles whose plans rebuild to the
same plan_id; a front served only on its own model."""

import argparse
import dataclasses
from pathlib import Path

import optuna
import pandas as pd
import pytest

from catalog.knobs import KNOB_COLUMNS, KNOBS, Knobs, add_flags, knob_cells, knobs_from_args, knobs_from_row, suggest
from catalog.rows import COLUMNS, IDENTITY_COLUMNS, ModelIdentity, read_front, read_profile
from placement.plan import build_plan
from placement.session import identity_for, model_spec, open_session
from tests.test_profiler import needs_data

RESULTS = Path(__file__).resolve().parent.parent / "experiments" / "results"


def test_the_schema_names_every_knob_once():
    names = [k.name for k in KNOBS]
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(Knobs)) and len(set(names)) == len(names)
    assert KNOB_COLUMNS == [k.name for k in KNOBS if k.name not in ("gpu_budget", "host_budget")]  # constraints
    assert COLUMNS[: len(IDENTITY_COLUMNS)] == IDENTITY_COLUMNS and set(KNOB_COLUMNS) <= set(COLUMNS)


def test_flags_are_generated_from_the_schema_with_their_defaults_and_shares():
    parser = argparse.ArgumentParser()
    add_flags(parser)
    help_ = parser.format_help()
    assert all(k.option in help_ for k in KNOBS if k.flag) and "(default: 64)" in help_
    args = parser.parse_args(["--quantized", "50%", "--bits", "2", "--gpu-experts", "4", "--prefetch"])
    args.seed = 3
    assert knobs_from_args(args, total=16) == Knobs(quantized=8, bits=2, gpu_experts=4, prefetch=True, seed=3)
    with pytest.raises(ValueError, match="as a share needs the model's expert count"):
        knobs_from_args(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["--gpu-experts", "1", "--gpu-budget", "1GB"])  # one or the other


def test_search_space_comes_from_the_schema():
    study = optuna.create_study(directions=["maximize"], sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    knobs = suggest(trial, total=16, top_k=2, seed=5)
    assert set(trial.params) == {k.name for k in KNOBS if k.space} and knobs.seed == 5
    assert trial.distributions["cache_slots"].high == 8 and 16 not in trial.distributions["bits"].choices


def test_an_unquantized_plan_has_one_spelling_and_round_trips_through_a_row():
    assert Knobs(quantized=0, bits=2) == Knobs(quantized=0, bits=16) == Knobs()
    assert Knobs().bits == 16 and Knobs().score_bits == 4
    knobs = Knobs(quantized=3, bits=2, gpu_experts=5, cache_slots=None)
    cells = knob_cells(knobs)
    assert cells["cache_slots"] == 0 and "gpu_budget" not in cells
    assert knobs_from_row(cells) == knobs


def test_identity_round_trips_and_rows_from_before_it_take_the_defaults():
    ident = ModelIdentity("mixtral-8x7b-shape", 2, "bfloat16", 1, None, "abc")
    assert ModelIdentity.from_row(ident.cells()) == ident
    old = ModelIdentity.from_row({"model": "reference", "seed": 4})  # the old --seed seeded both
    assert old == ModelIdentity("reference", model_seed=4) and old.mismatch(ident)


def _committed():
    for path in sorted(RESULTS.glob("*.csv")):
        if {"model", "plan_id", *KNOB_COLUMNS} - {"prefetch"} <= set(pd.read_csv(path, nrows=0).columns):
            yield path


@pytest.mark.parametrize("path", list(_committed()), ids=lambda p: p.name)
def test_committed_profiles_rebuild_to_the_same_plan_ids(path):
    """Every random-selection row; scored selections need the scores measured on its machine."""
    df = read_profile(path)
    specs = {}
    rebuilt = 0
    for row in df.to_dict(orient="records"):
        knobs = knobs_from_row(row)
        if knobs.selection != "random":
            continue
        ident = ModelIdentity.from_row(row)
        if ident not in specs:
            specs[ident] = model_spec(ident, "cpu")
        assert build_plan(specs[ident], knobs).plan_id == row["plan_id"], row
        rebuilt += 1
    assert rebuilt >= 9


@needs_data
def test_scored_plans_of_the_reference_profiles_rebuild(tmp_path, monkeypatch):
    """Sensitivity scores measured here order the experts as they did when the profiles were taken
    (on this CPU and on the H100)."""
    monkeypatch.setenv("QOS_CACHE_DIR", str(tmp_path))
    session = open_session(ModelIdentity("reference", dtype="float32"), "cpu")
    for name in ("profile_reference_cpu.csv", "profile_reference_h100.csv"):
        scored = [r for r in read_profile(RESULTS / name).to_dict(orient="records") if r["selection"] != "random"]
        assert len(scored) == 24
        for row in scored:
            assert session.plan(knobs_from_row(row)).plan_id == row["plan_id"], (name, row["plan_id"])


def _front(tmp_path, **identity) -> Path:
    ident = ModelIdentity("mixtral-8x7b-shape", **identity)
    rows = [{**ident.cells(), "plan_id": "p1", "precision_id": "x", **knob_cells(Knobs()), "decode_tok_s": 10.0,
             "ppl_wikitext2": 5.0, "gpu_bytes": 100, "host_bytes": 0}]
    path = tmp_path / "front.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_a_front_names_its_model_and_refuses_another(tmp_path, capsys):
    from qos.cli import main

    path = _front(tmp_path, layers=2)
    front = read_front(path)[0].identity
    assert identity_for(front) == front and identity_for(front, model="mixtral-8x7b-shape", layers=2) == front
    with pytest.raises(ValueError, match=r"measured on mixtral-8x7b-shape \(2 layers.*not on all layers"):
        identity_for(front, model="mixtral-8x7b-shape")
    slos = tmp_path / "slos.yaml"
    slos.write_text("tenants: [{name: a}]\n")
    code = main(["serve", "--model", "mixtral-8x7b-shape", "--front", str(path), "--slos", str(slos)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "was measured on mixtral-8x7b-shape (2 layers" in err and "not on all layers" in err
    assert main(["serve", "--front", str(path), "--slos", str(slos), "--speed", "seq_tok_s_b16"]) == 2
    assert "no seq_tok_s_b16 column; measured speeds: decode_tok_s" in capsys.readouterr().err


def test_a_front_of_two_models_is_refused(tmp_path):
    df = pd.read_csv(_front(tmp_path, layers=2))
    pd.concat([df, df.assign(layers=4, plan_id="p2")]).to_csv(tmp_path / "mixed.csv", index=False)
    with pytest.raises(ValueError, match="mixes plans of several models"):
        read_front(tmp_path / "mixed.csv")


def test_a_front_read_by_a_batched_speed_takes_that_column_or_names_the_ones_it_has(tmp_path):
    from catalog.rows import check_speed

    path = tmp_path / "p.csv"
    rows = pd.read_csv(Path(__file__).parent.parent / "experiments/results/profile_reference_cpu.csv").head(2)
    rows.to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"no seq_tok_s_b8 column; measured speeds: decode_tok_s \(profile with"):
        read_front(path, speed="seq_tok_s_b8")
    rows.assign(seq_tok_s_b8=[3.0, 4.0]).to_csv(path, index=False)
    assert [m.decode_tok_s for m in read_front(path, speed="seq_tok_s_b8")] == [3.0, 4.0]
    rows.assign(seq_tok_s_b8=[3.0, None]).to_csv(path, index=False)
    with pytest.raises(ValueError, match="1 plan\\(s\\) have no seq_tok_s_b8"):
        read_front(path, speed="seq_tok_s_b8")
    for bad in ("ppl", "tpot_p95_ms_b8", "agg_tok_s_bx"):
        with pytest.raises(ValueError, match="unknown speed column"):
            check_speed(bad)


def test_measured_rows_carry_latency_percentiles_with_fallbacks_for_older_rows(tmp_path):
    path = tmp_path / "p.csv"
    rows = pd.read_csv(Path(__file__).parent.parent / "experiments/results/profile_reference_cpu.csv").head(1)
    rows.to_csv(path, index=False)
    old = read_front(path)[0]  # written before the percentiles: the median TTFT for both, tpot from speed
    assert old.ttft_s == (rows["ttft_s"][0], rows["ttft_s"][0]) and old.tpot_ms == (None, None)
    rows.assign(ttft_p95_s=0.9, tpot_p50_ms=5.0, tpot_p95_ms=7.0, seq_tok_s_b4=50.0, tpot_p95_ms_b4=30.0,
                agg_tok_s_b4=200.0).to_csv(path, index=False)
    new = read_front(path)[0]
    assert new.ttft_s == (rows["ttft_s"][0], 0.9) and new.tpot_ms == (5.0, 7.0)
    busy = read_front(path, speed="seq_tok_s_b4")[0]  # 4 running: 20 ms a token at the median, 30 at p95
    assert busy.decode_tok_s == 50.0 and busy.tpot_ms == (20.0, 30.0)
