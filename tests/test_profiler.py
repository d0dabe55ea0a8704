import json
import math

import pandas as pd
import pytest
import torch

from placement.engine import Engine
from catalog.knobs import Knobs
from catalog.data import DATASETS, data_dir, eval_text
from catalog.knobs import parse_grid
from profiler.perplexity import mean_nll, windows_consecutive, windows_random
from catalog.rows import COLUMNS, ModelIdentity, read_front, read_profile
from placement.session import open_session
from profiler.profile import Profiler, Settings
from qos.cli import main

HAVE_DATA = all((data_dir() / f).is_file() for f in DATASETS.values())
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="evaluation text not found (set QOS_DATA_DIR)")


def test_grid_expands_every_combination_with_percentages():
    combos = parse_grid("quantized=0,50%,100%;bits=4,2;gpu_experts=25%;selection=random,sensitivity", 16)
    assert len(combos) == 12
    assert {c["quantized"] for c in combos} == {0, 8, 16} and {c["gpu_experts"] for c in combos} == {4}
    assert parse_grid("gpu_experts=4;prefetch=0,1,true,False", 16) == [
        {"gpu_experts": 4, "prefetch": False}, {"gpu_experts": 4, "prefetch": True}]


@pytest.mark.parametrize("grid, message", [
    ("quantized=1;colour=red", "unknown knob 'colour'"),
    ("bits=50%", "bits does not take percentages"),
    ("quantized=abc", "quantized='abc' is not an integer"),
    ("quantized=150%", "outside 0%..100%"),
    ("quantized", "should look like key=v1,v2"),
    ("gpu_experts=1;gpu_budget=2", "not both"),
    ("bits=4;bits=2", "bits is given twice"),
    ("prefetch=maybe", "prefetch='maybe' is not a boolean"),
])
def test_bad_grids_name_the_problem(grid, message):
    with pytest.raises(ValueError, match=message):
        parse_grid(grid, 16)


def test_windows():
    ids = list(range(10))
    assert windows_consecutive(ids, 4, None) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert windows_consecutive(ids, 4, 1) == [[0, 1, 2, 3]]
    docs = [list(range(3)), list(range(100, 120))]
    w = windows_random(docs, 5, 10, seed=3)
    assert len(w) == 10 and all(len(x) == 5 and x[0] >= 100 for x in w)
    assert w == windows_random(docs, 5, 10, seed=3)


def test_mean_nll_matches_cross_entropy_by_hand(fresh):
    model, _ = fresh()
    windows = [[1, 2, 3, 4, 5], [9, 8, 7, 6, 5]]
    nll, count = mean_nll(model, windows, batch_size=2)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor(windows)).logits, -1)
    by_hand = -sum(logp[b, t, windows[b][t + 1]] for b in range(2) for t in range(4)) / 8
    assert count == 8 and nll == pytest.approx(by_hand.item(), rel=1e-5)


def test_missing_dataset_names_the_folder_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=f"dataset ptb not found: looked for ptb/ptb.test.txt in {tmp_path}"):
        eval_text("ptb", tmp_path)


@needs_data
def test_profile_rows_resume_and_cache_perplexity_by_precision(tmp_path, capsys):
    out = tmp_path / "p.csv"
    args = ["profile", "--model", "tiny-random", "--grid", "quantized=0,8;bits=4;gpu_experts=8,16;prefetch=0,1",
            "--out", str(out), "--max-windows", "2", "--seqlen", "64", "--new-tokens", "4",
            "--repeats", "1", "--batch-sizes", "1,3", "--quiet"]
    assert main(args) == 0
    df = read_profile(out)
    # prefetch only acts with host experts: with all 16 on the accelerator both values are one plan
    assert list(df.columns) == [*COLUMNS, "agg_tok_s_b3", "seq_tok_s_b3", "tpot_p95_ms_b3"] and len(df) == 6
    assert (df["batch_sizes"] == "1,3").all() and (df["decoder"] == "slots-1").all()
    assert (df["tpot_p50_ms"] <= df["tpot_p95_ms"]).all() and (df["tpot_p50_ms"] > 0).all()
    assert (df["agg_tok_s_b3"] > 0).all() and (df["seq_tok_s_b3"] * 3 - df["agg_tok_s_b3"]).abs().max() < 1e-6
    assert (df["tpot_p95_ms_b3"] > 0).all()
    assert sorted(df.loc[df["gpu_experts"] == 8, "prefetch"]) == [False, False, True, True]
    assert not df.loc[df["gpu_experts"] == 16, "prefetch"].any()
    with_prefetch = df[df["prefetch"]]
    assert (with_prefetch["plan_id"] != df.loc[~df["prefetch"] & (df["gpu_experts"] == 8), "plan_id"].values).all()
    df = df[~df["prefetch"]]  # the rest of the test is about plans without it
    assert df["plan_id"].is_unique and (df["decode_tok_s"] > 0).all()
    for _, group in df.groupby("precision_id"):  # placement does not change perplexity
        assert group["ppl_wikitext2"].nunique() == 1 and len(group) == 2
    assert (df["ppl_ptb"] > 1).all() and df["ppl_note"].str.contains("2 of").all()
    host = df[df["gpu_experts"] == 8]
    assert (host["hit_rate"].between(0, 1)).all() and (host["fetched_bytes_per_token"] > 0).all()
    capsys.readouterr()
    assert main(args[:4] + ["quantized=0,8,16;bits=4;gpu_experts=8,16"] + args[5:]) == 0
    assert "measured: 2" in capsys.readouterr().out and len(read_profile(out)) == 8


def test_rows_rebuild_their_plans_and_files_from_before_the_prefetch_column_read_as_without_it(fresh, tmp_path):
    from catalog.knobs import knob_cells, knobs_from_row
    from catalog.rows import append_row
    from placement.plan import build_plan
    from placement.planner import Planner, row_knobs

    model, _ = fresh()
    engine = Engine(model)
    planner = Planner(engine, "tiny-random", lambda: [])

    def row(knobs):
        plan = build_plan(engine.spec, knobs)
        return {"model": "tiny-random", "plan_id": plan.plan_id, "precision_id": plan.precision_id,
                **knob_cells(row_knobs(knobs, plan))}

    old, new = row(Knobs(quantized=4, gpu_experts=8)), row(Knobs(quantized=4, gpu_experts=8, prefetch=True))
    assert new["prefetch"] is True and new["plan_id"] != old["plan_id"]
    path = tmp_path / "old.csv"
    # a profile written before the knob, with a search's extra column: no prefetch column at all
    pd.DataFrame([{**{k: v for k, v in old.items() if k != "prefetch"}, "source": "sweep"}]).to_csv(path, index=False)
    assert read_profile(path)["prefetch"].tolist() == [False]
    append_row(path, new)
    df = read_profile(path)
    assert list(df.columns) == [*COLUMNS, "source"] and df["prefetch"].tolist() == [False, True]
    assert df["source"].fillna("").tolist() == ["sweep", ""]
    for r in df.to_dict(orient="records"):
        assert planner.rebuild(knobs_from_row(r), r["plan_id"]).plan_id == r["plan_id"]
    legacy = {k: v for k, v in old.items() if k != "prefetch"}  # e.g. a front read with pd.read_csv
    assert not knobs_from_row(legacy).prefetch
    assert planner.rebuild(knobs_from_row(legacy), old["plan_id"]).plan_id == old["plan_id"]
    assert knobs_from_row({**new, "prefetch": "True"}).prefetch


def test_profile_rejects_a_file_that_is_not_a_profile(tmp_path):
    bad = tmp_path / "x.csv"
    pd.DataFrame({"a": [1]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="is not a moe-qos profile"):
        read_profile(bad)


@needs_data
def test_sensitivity_scores_rank_plans_and_are_cached(fresh, tmp_path, monkeypatch):
    monkeypatch.setenv("QOS_CACHE_DIR", str(tmp_path))
    session = open_session(ModelIdentity("tiny-random"), "cpu")
    prof = Profiler(session, Settings(datasets=(), prompt_tokens=8, new_tokens=2, repeats=1))
    plan = prof.plan(Knobs(quantized=4, bits=2, selection="sensitivity"))
    scores = session.planner.scores[("sensitivity", 2, 64)]
    chosen = sorted(scores[e.layer][e.expert] for e, s in plan.items() if s.bits != 16)
    rest = sorted(scores[e.layer][e.expert] for e, s in plan.items() if s.bits == 16)
    assert chosen[-1] <= rest[0] and rest[-1] > 0
    assert len(list((tmp_path / "sensitivity").glob("*.json"))) == 1
    assert all(math.isfinite(v) for row in scores for v in row)


def test_missing_local_file_reads_the_same_rows_from_the_hub(tmp_path, monkeypatch):
    """Online with `datasets`, a dataset missing locally comes from the hub (the GPTQ loaders) and
    gets the same protocol; a fake `datasets` module stands in for the network."""
    import sys
    import types

    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return {"sentence": ["no it was n't black monday", "but the market fell"]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert eval_text("ptb", tmp_path) == "no it was n't black monday\n\nbut the market fell"
    assert calls == [(("ptb_text_only", "penn_treebank"), {"split": "test"})]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="dataset ptb not found"):
        eval_text("ptb", tmp_path)


@needs_data
def test_local_rows_follow_the_hub_layout():
    wiki = eval_text("wikitext2")
    assert wiki.startswith("\n\n = Robert Boulter = \n\n\n\n\n")  # "" and " = ... = \n" rows
    assert eval_text("ptb").startswith("no it was n't black monday\n\nbut while")
    docs = eval_text("c4")
    assert isinstance(docs, list) and len(docs) == 1025


@needs_data
def test_rows_whose_timed_runs_disagree_are_flagged_left_out_and_measured_again(tmp_path, capsys):
    """A spread limit no two real timings meet flags every row (after the retries); fronts refuse
    flagged rows; --remeasure replaces them in place."""
    out = tmp_path / "p.csv"
    base = ["profile", "--model", "tiny-random", "--grid", "quantized=0,16;bits=4", "--out", str(out),
            "--max-windows", "1", "--seqlen", "32", "--new-tokens", "4", "--datasets", "wikitext2", "--quiet", "--json"]
    assert main(base + ["--repeats", "2", "--max-spread", "1e-9", "--retries", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["measured"] == 2 and summary["flagged"] == 2
    df = read_profile(out)
    assert df["flagged"].all() and (df["attempts"] == 2).all() and (df["spread"] > 0).all()
    assert (df["decode_tok_s_min"] <= df["decode_tok_s"]).all() and (df["decode_tok_s"] <= df["decode_tok_s_max"]).all()
    assert main(["front", str(out)]) == 2
    assert "every plan" in capsys.readouterr().err
    with pytest.raises(ValueError, match="every plan of .* is flagged"):
        read_front(out)

    first, other = df["plan_id"].tolist()
    assert main(base + ["--repeats", "1", "--remeasure", first]) == 0  # one run: nothing to disagree
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["remeasured"] == 1 and summary["skipped"] == 1 and summary["flagged"] == 0
    df = read_profile(out)
    assert len(df) == 2 and df.set_index("plan_id")["flagged"].to_dict() == {first: False, other: True}
    assert main(["front", str(out)]) == 0
    assert "1 flagged plan(s) left out" in capsys.readouterr().err
    assert [m.plan_id for m in read_front(out)] == [first]
    assert main(base + ["--repeats", "1", "--remeasure", "flagged"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["remeasured"] == 1
    assert not read_profile(out)["flagged"].any()
