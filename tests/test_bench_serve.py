"""bench_serve's memory-bound accounting: the distinct experts each decode step reads, against what
the routing must give (tiny-random: 2 layers, 8 experts, top-2, fp32, 64 hidden, 128 per expert)."""

from __future__ import annotations

import types

from catalog.knobs import Knobs
from experiments import bench_decode
from experiments.bench_decode import dense_bytes_per_token, kv_bytes_per_token
from experiments.bench_serve import step_bytes
from placement.decode import Decoder
from placement.engine import Engine
from placement.plan import build_plan

E16 = (2 * 128 * 64 + 64 * 128) * 4  # one fp32 expert: gate_up [256, 64] and down [64, 128]
BW = types.SimpleNamespace(accel_read_gbps=2.0)  # GB/s


def test_step_bytes_count_each_distinct_expert_once_per_step(fresh):
    model, _ = fresh()
    engine = Engine(model, quantizer=bench_decode.FAST_QUANTIZER)
    engine.apply(build_plan(engine.spec, Knobs()))
    decoder = Decoder(model, engine, max_seqs=4, max_len=32)
    one = step_bytes(decoder, [list(range(5, 13))], 6, BW)
    assert one["experts_read_per_step"] == 2 * 2  # batch 1: top-2 of each of 2 layers, all distinct
    kv = kv_bytes_per_token(model.config, list(range(9, 14)), 4)
    total = dense_bytes_per_token(model) + 4 * E16 + kv
    assert abs(one["hbm_gb_per_step"] * 1e9 - total) < 1e-3
    assert abs(one["bound_tok_s"] - 1 / (total / 2e9)) < 1e-6 * one["bound_tok_s"]
    four = step_bytes(decoder, [list(range(5 + i, 13 + 3 * i)) for i in range(4)], 6, BW)
    # 4 sequences: between 2 (all alike) and 8 (top-2 of 8 experts, all taken) experts per layer
    assert 2 * 2 < four["experts_read_per_step"] <= 2 * 8
    assert four["bound_tok_s"] > one["bound_tok_s"]  # an expert read once serves every row routed to it
