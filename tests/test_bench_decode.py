"""experiments/bench_decode.py's memory bound on the CPU: bytes per decoded token against hand counts
for tiny-random (64 hidden, 128 per expert, 8 experts, top-2, 2 layers, fp32), the decode window's
routing counts, the bandwidths measured in the run, and the CSV's columns."""

import math

import pandas as pd
import pytest
import torch

from catalog.knobs import Knobs
from experiments import bench_decode
from experiments.bandwidth import MiB, Bandwidths, measure
from experiments.bench_decode import (BOUND_COLUMNS, DecodeWindow, TokenBytes, dense_bytes_per_token,
                                      expert_bytes_per_token, kv_bytes_per_token, plan_token_bytes)
from placement.decode import Decoder
from placement.engine import Engine
from placement.plan import ExpertState, Plan, build_plan
from placement.spec import ModelSpec

H, I, F32 = 64, 128, 4
# One expert's buffer, by hand: gate_up [256, 64] and down [64, 128].
E16 = (2 * I * H + H * I) * F32  # 98304
# 4-bit: codes two per byte in rows of 64 (hqq packs groups of 64 as rows), a scale and a zero per group
E4 = (2 * I * H // 2 + 2 * (2 * I * H // 64) * F32) + (H * I // 2 + 2 * (H * I // 64) * F32)  # 15360
E2 = (2 * I * H // 4 + 2 * (2 * I * H // 64) * F32) + (H * I // 4 + 2 * (H * I // 64) * F32)  # 9216
SPEC = ModelSpec("mixtral", num_layers=2, num_experts=8, top_k=2, hidden=H, intermediate=I, dtype=torch.float32,
                 nonexpert_bytes=0)


def test_expert_bytes_against_a_hand_count():
    a16, a4, h4, h16, a2 = (ExpertState(16, "accel"), ExpertState(4, "accel"), ExpertState(4, "host"),
                            ExpertState(16, "host"), ExpertState(2, "accel"))
    states = ((a16, a4, h4, h16, a16, a16, a16, a16), (a2,) * 8)
    # 4 decode steps, top-2: 8 routed slots per layer
    routed = [[3, 2, 1, 2, 0, 0, 0, 0], [0, 0, 0, 0, 0, 8, 0, 0]]
    cpu = Plan(states, "cpu", 0, 64, False)
    accel, host = expert_bytes_per_token(cpu, SPEC, routed, steps=4)
    assert accel == (3 * E16 + 2 * E4 + 8 * E2) / 4
    assert host == (1 + 2) * E16 / 4  # the host computes a 4-bit expert from its dequantized 16-bit matrices
    # fetched experts are read from their slot at their packed precision; the host reads nothing
    fetch = Plan(states, "fetch", 4, 64, False)
    accel, host = expert_bytes_per_token(fetch, SPEC, routed, steps=4)
    assert (accel, host) == ((3 * E16 + 2 * E4 + 1 * E4 + 2 * E16 + 8 * E2) / 4, 0)
    with pytest.raises(ValueError, match="steps"):
        expert_bytes_per_token(cpu, SPEC, routed, steps=0)


def test_bound_adds_each_kind_of_bytes_at_its_bandwidth():
    bw = Bandwidths("x", accel_copy_gbps=4000, accel_sum_gbps=3000, h2d_gbps=50, host_copy_gbps=10,
                    host_sum_gbps=20, nbytes=MiB, h2d_bytes=MiB)
    assert (bw.accel_read_gbps, bw.accel_read_basis, bw.host_read_gbps) == (4000, "copy (read+write)", 20)
    tb = TokenBytes(dense=1e9, experts=2e9, kv=1e9, fetched=1e9, host=2e9)
    s = 4e9 / 4000e9 + 1e9 / 50e9 + 2e9 / 20e9
    assert tb.bound_seconds(bw) == pytest.approx(s)
    cols = tb.columns(bw, tok_s=2.0)
    assert list(cols) == BOUND_COLUMNS
    assert cols["mem_bound_tok_s"] == pytest.approx(1 / s) and cols["ratio_to_mem_bound"] == pytest.approx(2 * s)
    assert cols["hbm_gb_per_token"] == 4.0


def test_dense_and_kv_bytes_against_a_hand_count(fresh):
    model, _ = fresh()
    Engine(model)  # takes the routed experts over: what remains is read by every token
    # per layer: q [64, 64], k and v [32, 64] (2 kv heads of 16), o [64, 64], two norms, the router [8, 64]
    layer = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 2 * 64 + 8 * 64
    # + final norm + LM head + one embedding row + rotary's inv_freq and original_inv_freq (8 each)
    dense = (2 * layer + 64 + 512 * 64 + 64 + 2 * 8) * F32
    assert dense_bytes_per_token(model) == dense == 235072
    # 2 layers x (key + value) x 2 kv heads x 16 x fp32 = 512 bytes per position
    assert kv_bytes_per_token(model.config, [10, 11], F32) == 512 * 10.5


def test_decode_window_counts_the_routed_experts_of_each_step(fresh):
    model, _ = fresh()
    engine = Engine(model, quantizer=bench_decode.FAST_QUANTIZER)
    decoder = Decoder(model, engine, max_seqs=1, max_len=32)
    prompt = list(range(5, 13))
    for knobs, reads in ((Knobs(), 2 * 2 * E16), (Knobs(quantized=16, bits=4, gpu_experts=4), 2 * 2 * E4)):
        plan = build_plan(engine.spec, knobs)
        engine.apply(plan)
        window = DecodeWindow(engine)
        run = decoder.generate([prompt], 6, fixed_length=True, between_steps=window)
        assert window.steps == 4 == run.steps - 1
        routed = window.routed()
        assert [sum(row) for row in routed] == [2 * 4, 2 * 4]  # top-2 of each layer at each of the 4 steps
        tb = plan_token_bytes(plan, engine, model, window, len(prompt))
        assert tb.experts + tb.host == reads  # 4-bit host experts: fetched, then read from the slot
        assert tb.kv == kv_bytes_per_token(model.config, [10, 11, 12, 13], F32)
        host_reads = sum(n for eid, s in plan.items() if s.tier == "host" for n in [routed[eid.layer][eid.expert]])
        # each read of a host expert copies it at most once (a slot may still hold it)
        assert tb.fetched * 4 % E4 == 0 and tb.fetched * 4 <= host_reads * E4
        if plan.host_experts:
            assert tb.fetched > 0  # 12 of 16 experts on the host: some step misses


def test_bandwidths_measured_on_the_host():
    bw = measure("cpu", nbytes=4 * MiB, h2d_bytes=MiB, repeats=2)
    assert bw.device == "cpu" and min(bw.accel_copy_gbps, bw.accel_sum_gbps, bw.h2d_gbps) > 0
    assert bw.accel_read_gbps == max(bw.accel_copy_gbps, bw.accel_sum_gbps)
    assert "host-to-host copy (no CUDA)" in bw.describe()
    with pytest.raises(ValueError, match="at least 1 MiB"):
        measure("cpu", nbytes=1000)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_main_writes_the_bound_columns(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    bench_decode.main(["--model", "tiny-random", "--layers", "2", "--prompt-tokens", "8", "--new-tokens", "5",
                       "--bandwidth-mib", "4", "--only", "transformers", "--only", "16-bit, all on GPU",
                       "--only", "4-bit, 1/4 on GPU, cpu", "--only", "4-bit, 1/4 on GPU, fetch", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "bandwidth measured in this run on cpu" in printed and "memory bound per decoded token" in printed
    rows = pd.read_csv(out)
    assert set(BOUND_COLUMNS) <= set(rows.columns)
    assert len(rows) == 7  # transformers, 16-bit (with and without kernels, and half 4-bit), cpu, fetch (and prefetch)
    for _, r in rows.iterrows():
        s = (r["hbm_gb_per_token"] / r["hbm_read_gbps"] + r["fetched_gb_per_token"] / r["h2d_gbps"]
             + r["host_read_gb_per_token"] / r["host_read_gbps"])
        assert r["bound_ms_per_token"] == pytest.approx(s * 1e3)
        assert r["ratio_to_mem_bound"] == pytest.approx(r["decode_tok_s"] / r["mem_bound_tok_s"])
        assert r["hbm_gb_per_token"] == pytest.approx(r["dense_gb_per_token"] + r["expert_gb_per_token"]
                                                      + r["kv_gb_per_token"])
        assert r["dense_gb_per_token"] == pytest.approx(235072 / 1e9)
    by = rows.set_index("system")
    all16 = by.loc["moe-qos: 16-bit, all on GPU"]
    assert all16["expert_gb_per_token"] == pytest.approx(4 * E16 / 1e9)
    assert all16["expert_gb_per_token"] == by.loc["transformers, bf16, all on GPU", "expert_gb_per_token"]
    cpu = by.loc["moe-qos: 4-bit, 1/4 on GPU, cpu"]
    assert cpu["fetched_gb_per_token"] == 0 and cpu["host_read_gb_per_token"] > 0
    # 4 reads per token, each either of a 4-bit expert on the accelerator or of a host expert's 16-bit matrices
    on_accel = cpu["expert_gb_per_token"] * 1e9 / E4
    assert math.isclose(on_accel + cpu["host_read_gb_per_token"] * 1e9 / E16, 4)
    fetch = by.loc["moe-qos: 4-bit, 1/4 on GPU, fetch"]
    assert fetch["expert_gb_per_token"] == pytest.approx(4 * E4 / 1e9) and fetch["host_read_gb_per_token"] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_main_refuses_bad_input(tmp_path, capsys):
    for argv, words in ((["--model", "tiny-random", "--new-tokens", "2"], "--new-tokens must be >= 3"),
                        ([], "needs a CUDA GPU"),
                        (["--model", "tiny-random", "--bandwidth-mib", "0"], "at least 1 MiB")):
        with pytest.raises(SystemExit):
            bench_decode.main([*argv, "--out", str(tmp_path / "x.csv")])
        assert words in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_window_counts_routing_inside_cuda_graphs_and_cuda_bandwidths():
    """Graph replays run no Python: the routing counts must still come from the device."""
    from placement.models import load_model

    loaded = load_model("tiny-random", device="cuda", dtype=torch.float32)
    model = loaded.model
    engine = Engine(model, quantizer=bench_decode.FAST_QUANTIZER)
    decoder = Decoder(model, engine, max_seqs=1, max_len=64)
    prompt = list(range(5, 13))
    for knobs, each in ((Knobs(), E16), (Knobs(quantized=16, bits=4), E4)):
        plan = build_plan(engine.spec, knobs)
        engine.apply(plan)
        decoder.generate([prompt], 12, fixed_length=True)  # captures
        window = DecodeWindow(engine)
        decoder.generate([prompt], 12, fixed_length=True, between_steps=window)
        assert decoder.reason is None and decoder.graphs  # the steps were graph replays
        assert window.steps == 10 and [sum(row) for row in window.routed()] == [2 * 10, 2 * 10]
        tb = plan_token_bytes(plan, engine, model, window, len(prompt))
        assert (tb.experts, tb.fetched, tb.host) == (2 * 2 * each, 0, 0)
    bw = measure("cuda", nbytes=64 * MiB, h2d_bytes=16 * MiB, repeats=3)
    assert bw.device == torch.cuda.get_device_name() and bw.accel_read_gbps > bw.h2d_gbps > 0
    assert bw.host_read_gbps > 0 and "pinned host-to-GPU copy" in bw.describe()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_the_4_bit_attention_row_counts_its_projections_at_4_bits_in_the_bound(tmp_path):
    out = tmp_path / "bench.csv"
    bench_decode.main(["--model", "tiny-random", "--layers", "2", "--prompt-tokens", "8", "--new-tokens", "5",
                       "--bandwidth-mib", "4", "--only", "4-bit, all on GPU", "--out", str(out)])
    by = pd.read_csv(out).set_index("system")
    bf16_attn, attn4 = by.loc["moe-qos: 4-bit, all on GPU"], by.loc["moe-qos: 4-bit, all on GPU, 4-bit attention"]
    assert attn4["decode_tok_s"] > 0
    assert bf16_attn["dense_gb_per_token"] == pytest.approx(235072 / 1e9)
    assert attn4["dense_gb_per_token"] < bf16_attn["dense_gb_per_token"]  # q, k, v, o packed at 4 bits
    assert attn4["expert_gb_per_token"] == pytest.approx(bf16_attn["expert_gb_per_token"])
