"""experiments/memory_pressure.py end to end on the CPU: a simulated co-tenant squeezes the server,
which shrinks without ever holding more than the simulated device leaves it, and grows back."""

import pandas as pd
import pytest

from experiments.memory_pressure import COTENANT_COLUMNS, RECONFIG_COLUMNS, TIMELINE_COLUMNS, main, schedule
from tests.test_profiler import needs_data


def test_schedule_ends_with_the_smallest_plan_plus_the_margin_and_releases_everything():
    total, start, smallest, reserve, margin = 10_000, 4_000, 1_000, 400, 100
    up, down = schedule(total, start, smallest, reserve, margin, steps=3)
    assert up == [5_500, 6_566, 7_533, 8_500]
    budgets = [total - reserve - x for x in up]
    assert budgets[0] == start + margin  # the slack: no pressure yet
    assert budgets[1] < start  # every step asks for a shrink
    assert budgets[-1] == smallest + margin  # the top leaves room for the smallest plan only
    assert down == [7_533, 6_566, 5_500, 0]


@needs_data
def test_simulated_cotenant_makes_the_server_shrink_and_grow_back(tmp_path):
    prefix = tmp_path / "mp"
    summary = main(["--simulate", "--out-prefix", str(prefix), "--tick-s", "0.1", "--steps", "2",
                    "--step-s", "0.5", "--hold-s", "0.5", "--settle-s", "10", "--seqlen", "32",
                    "--profile-tokens", "3", "--new-tokens", "4", "--no-plot"])

    assert summary["requests_submitted"] > 0
    assert summary["requests_answered"] == summary["requests_submitted"]
    assert summary["requests_failed"] == 0 and summary["server_ooms"] == 0 and summary["cotenant_ooms"] == 0
    assert summary["shrinks"] >= 1 and summary["grows"] >= 1
    assert summary["grew_back"] and summary["final_plan"] == summary["initial_plan"]
    assert summary["steps_waiting_for_room"] >= 1 and summary["shrank_before_cotenant_allocation"]

    timeline = pd.read_csv(f"{prefix}_timeline.csv")
    reconfig = pd.read_csv(f"{prefix}_reconfig.csv")
    cotenant = pd.read_csv(f"{prefix}_cotenant.csv")
    assert list(timeline.columns) == TIMELINE_COLUMNS
    assert list(reconfig.columns) == RECONFIG_COLUMNS
    assert list(cotenant.columns) == COTENANT_COLUMNS
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
