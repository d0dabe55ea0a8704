"""experiments/memory_pressure.py: its squeeze is sized from the plans (the same on an 80 GB and a
141 GB GPU), its tenant starts on a plan the squeeze must shrink, a run without a shrink or a
grow-back fails, and end to end on the CPU a simulated co-tenant makes the server shrink without
ever holding more than the simulated device leaves it, and grow back."""

from pathlib import Path

import pandas as pd
import pytest

from catalog.rows import read_front
from catalog.slo import parse_slos
from experiments.memory_pressure import (COTENANT_COLUMNS, GIB, RECONFIG_COLUMNS, SLOS, TENANT, TIMELINE_COLUMNS,
                                         budgets, failures, main, schedule, squeeze_margin, verdict)
from runtime.controller import Controller, World
from tests.test_profiler import needs_data

H100_PROFILE = Path(__file__).parent.parent / "experiments/results/memory_pressure_h100_profile.csv"


def test_schedule_ends_with_the_smallest_plan_plus_the_margin_and_releases_everything():
    total, start, smallest, reserve, margin = 10_000, 4_000, 1_000, 400, 100
    up, down = schedule(total, start, smallest, reserve, margin, steps=3)
    assert up == [5_500, 6_566, 7_533, 8_500]
    budgets = [total - reserve - x for x in up]
    assert budgets[0] == start + margin  # the slack: no pressure yet
    assert budgets[1] < start  # every step asks for a shrink
    assert budgets[-1] == smallest + margin  # the top leaves room for the smallest plan only
    assert down == [7_533, 6_566, 5_500, 0]


def test_the_squeeze_is_the_same_on_an_80_and_a_141_gb_gpu():
    start, smallest, reserve, margin = 6_329_377_280, 1_484_956_160, 2 * GIB, GIB
    h100, h200 = (schedule(total, start, smallest, reserve, margin, steps=4)[0] for total in (80e9, 141e9))
    # the device's size only changes the slack; each step after it takes the same bytes
    assert [b - a for a, b in zip(h100, h100[1:])] == [b - a for a, b in zip(h200, h200[1:])]
    assert h200[0] - h100[0] == 61e9
    assert [int(141e9) - reserve - x for x in h200] == budgets(start, smallest, margin, 4)


def test_the_margin_leaves_the_plan_served_no_room_at_the_last_step():
    reserve = 2 * GIB
    # an H200's all-4-bit plan (2.28 GB) against the smallest (1.48 GB): half the reserve would
    # leave it room, so the margin shrinks to a quarter of the span
    margin = squeeze_margin(2_277_679_616, 1_484_956_160, reserve)
    assert margin == (2_277_679_616 - 1_484_956_160) // 4
    assert budgets(2_277_679_616, 1_484_956_160, margin, 4)[-1] < 2_277_679_616
    assert squeeze_margin(6_329_377_280, 1_484_956_160, reserve) == GIB  # half the reserve when it fits
    with pytest.raises(SystemExit, match="already the front's smallest"):
        squeeze_margin(1_484_956_160, 1_484_956_160, reserve)
    with pytest.raises(SystemExit, match="at least 0 bytes"):
        squeeze_margin(6_329_377_280, 1_484_956_160, reserve, margin=-1)
    with pytest.raises(SystemExit, match="below the reserve"):
        squeeze_margin(6_329_377_280, 1_484_956_160, reserve, margin=reserve)
    with pytest.raises(SystemExit, match="below the span"):
        squeeze_margin(2_277_679_616, 1_484_956_160, reserve, margin=GIB)
    with pytest.raises(ValueError, match="leaves room for the plan served"):
        budgets(2_000, 1_000, 1_000, 4)


def _h200_like_front(tmp_path) -> Path:
    """The H100 profile with the all-4-bit plan made the fastest, as it is on the H200."""
    df = pd.read_csv(H100_PROFILE, dtype={"plan_id": str})
    all4 = (df["quantized"] == df["experts_total"]) & (df["gpu_experts"] == df["experts_total"])
    df.loc[all4, "decode_tok_s"] = df["decode_tok_s"].max() * 1.5
    path = tmp_path / "front.csv"
    df.to_csv(path, index=False)
    return path


def _walk(front: Path, slos: str, total: int, steps: int = 4) -> tuple[str, list[tuple[int, int]]]:
    """The plans an open-loop controller serves through the experiment's squeeze: (start, [(from, to)])."""
    rows = read_front(front)
    size = {m.plan_id: m.gpu_bytes for m in rows}
    spec = parse_slos(slos)
    controller = Controller(rows, spec, closed_loop=False)
    world = lambda pid: World(pid, size[pid] if pid else 0, frozenset({TENANT}))  # noqa: E731
    plan = controller.tick(world(None), total).plan_id
    start, smallest = size[plan], min(size.values())
    margin = squeeze_margin(start, smallest, spec.reserve_bytes)
    up, down = schedule(total, start, smallest, spec.reserve_bytes, margin, steps)
    moves = []
    for cotenant in up + down:
        # free = total - co-tenant - plan; a shrink frees what the co-tenant then takes (it waits)
        new = controller.tick(world(plan), total - cotenant - size[plan]).plan_id
        if new != plan:
            moves.append((size[plan], size[new]))
        plan = new
    return plan, moves


@pytest.mark.parametrize("total", [80e9, 141e9])
def test_on_an_h200_like_front_the_tenant_starts_on_16_bit_and_is_squeezed_through_shrinks_and_grows(tmp_path,
                                                                                                       total):
    front = _h200_like_front(tmp_path)
    slos = SLOS.format(tenant=TENANT, reserve_gib=2)
    rows = {m.plan_id: m for m in read_front(front)}
    start = Controller(list(rows.values()), parse_slos(slos), closed_loop=False).tick(
        World(None, 0, frozenset({TENANT})), int(total)).plan_id
    assert rows[start].knobs.quantized == 0 and rows[start].gpu_bytes == max(m.gpu_bytes for m in rows.values())
    final, moves = _walk(front, slos, int(total))
    shrinks = [m for m in moves if m[1] < m[0]]
    grows = [m for m in moves if m[1] > m[0]]
    assert len(shrinks) >= 2 and len(grows) >= 2  # gradual: more than one step each way
    assert final == start
    # the scenario the H200 ran: a tenant with no quality bound starts on the fastest plan, all 4-bit
    old = slos.replace("max_ppl_increase: 0 ", "max_ppl_increase: 1000 ")
    assert old != slos
    first = Controller(list(rows.values()), parse_slos(old), closed_loop=False).tick(
        World(None, 0, frozenset({TENANT})), int(total)).plan_id
    assert rows[first].knobs.quantized == rows[first].knobs.gpu_experts == 16


def _summary(**changes) -> dict:
    summary = {"shrinks": 2, "grows": 2, "grew_back": True, "cotenant_up_steps": 5, "cotenant_up_steps_reached": 5,
               "requests_submitted": 10, "requests_answered": 10, "requests_failed": 0, "server_ooms": 0,
               "plan_before": "a (6035.9 MiB)", "plan_after": "a (6035.9 MiB)", "plans_served": "6035.9 > 1416.2 MiB"}
    summary.update(changes)
    summary["failures"] = failures(summary)
    return summary


def test_a_run_without_a_shrink_or_a_grow_back_fails_in_one_line():
    assert _summary()["failures"] == [] and verdict(_summary()).startswith("memory_pressure ok: 2 shrinks and 2 grows")
    none = _summary(shrinks=0, grows=0)
    assert [f.split(":")[0] for f in none["failures"]] == ["no shrink", "no grow-back"]
    line = verdict(none)
    assert line.startswith("memory_pressure FAILED: no shrink") and "no grow-back" in line and "\n" not in line
    assert failures(_summary(grew_back=False))[0].startswith("no grow-back: the server ended on a (6035.9 MiB)")
    assert failures(_summary(requests_answered=9)) == ["1 of 10 requests unanswered"]
    assert failures(_summary(cotenant_up_steps_reached=4))[0].startswith("1 of 5 co-tenant steps never got")


@needs_data
def test_simulated_cotenant_makes_the_server_shrink_and_grow_back(tmp_path):
    prefix = tmp_path / "mp"
    summary = main(["--simulate", "--out-prefix", str(prefix), "--tick-s", "0.1", "--steps", "2",
                    "--step-s", "0.5", "--hold-s", "0.5", "--settle-s", "10", "--seqlen", "32",
                    "--profile-tokens", "3", "--new-tokens", "4", "--no-plot"])

    assert summary["failures"] == []
    assert summary["requests_submitted"] > 0
    assert summary["requests_answered"] == summary["requests_submitted"]
    assert summary["requests_failed"] == 0 and summary["server_ooms"] == 0 and summary["cotenant_ooms"] == 0
    assert summary["shrinks"] >= 1 and summary["grows"] >= 1
    assert summary["grew_back"] and summary["final_plan"] == summary["initial_plan"]
    assert summary["smallest_plan_served"] != summary["initial_plan"]
    assert summary["steps_waiting_for_room"] >= 1 and summary["shrank_before_cotenant_allocation"]

    timeline = pd.read_csv(f"{prefix}_timeline.csv")
    reconfig = pd.read_csv(f"{prefix}_reconfig.csv")
    cotenant = pd.read_csv(f"{prefix}_cotenant.csv")
    recorded = pd.read_csv(f"{prefix}_summary.csv")
    assert list(timeline.columns) == TIMELINE_COLUMNS
    assert list(reconfig.columns) == RECONFIG_COLUMNS
    assert list(cotenant.columns) == COTENANT_COLUMNS
    assert recorded["shrinks"].iloc[0] == summary["shrinks"] and recorded["grows"].iloc[0] == summary["grows"]
    # the tenant keeps 16-bit experts: it starts on the 16-bit plan with every expert on the accelerator
    assert reconfig["to_knobs"].iloc[0].startswith("0/16 experts") and "16/16 on the accelerator" in \
        reconfig["to_knobs"].iloc[0]
    # the server never held more than the simulated device left it, and the co-tenant did press
    assert (timeline["server_bytes"] <= timeline["capacity_bytes"]).all()
    assert timeline["cotenant_bytes"].max() > 0
    assert timeline["server_bytes"].min() < timeline["server_bytes"].iloc[0]
    assert timeline["cotenant_bytes"].iloc[-1] == 0  # released, and the server back where it started
    assert timeline["server_bytes"].iloc[-1] == timeline["server_bytes"].iloc[0]
    # the bound is the bytes over 54.6 GB/s, the ratio the measured seconds over it
    moved = reconfig[reconfig["bytes_to_accel"] > 0]
    assert moved["bound_s"].to_numpy() == pytest.approx(moved["bytes_to_accel"].to_numpy() / 54.6e9)
    assert moved["ratio"].to_numpy() == pytest.approx(moved["seconds"].to_numpy() / moved["bound_s"].to_numpy())
    assert set(reconfig["kind"]) >= {"initial", "shrink", "grow"}
