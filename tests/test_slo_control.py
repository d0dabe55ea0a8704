"""The SLO-control experiment's accounting, without a model: which one-second windows count as
feasible (a plan meets the tenant's SLO at its own load on the machine as fast as it measured), and
the targets' verdict."""

import pandas as pd

from experiments.slo_control import feasible, summarize, verdict
from tests.test_feedback import FAST, SLOW

CHAT = {"name": "chat", "max_tpot_ms": 8.0, "p": 50}
DOCS = {"name": "docs", "max_ttft_s": 0.1, "p": 50}
SLOS = {"tenants": [CHAT, DOCS, {"name": "bulk"}]}


def test_a_window_is_feasible_when_some_plan_meets_the_slo_at_the_tenant_s_own_load_on_the_machine_as_measured():
    assert feasible(CHAT, 1, 1.0, [SLOW, FAST])  # fast: 6 ms alone
    assert not feasible(CHAT, 1, 1.0, [SLOW])  # slow: 10 ms alone, whatever admission control does
    assert not feasible(CHAT, 1, 1.5, [SLOW, FAST])  # the machine 1.5x slower: 9 ms
    assert feasible(DOCS, 2, 1.0, [SLOW]) and not feasible(DOCS, 2, 3.0, [SLOW])  # 0.05 s profiled


def test_windows_held_over_all_and_over_the_feasible_ones_and_the_verdict():
    requests = pd.DataFrame(
        [{"tenant": "chat", "t": t + 0.5, "ttft_s": 0.01, "tpot_ms": tpot, "new_tokens": 10}
         for t, tpot in enumerate([5.0, 9.0, 9.0])] +
        [{"tenant": "bulk", "t": 1.5, "ttft_s": 1.0, "tpot_ms": 20.0, "new_tokens": 10}])
    # second 2: the machine 2x slower than profiled, so no plan could have met chat's 8 ms
    timeline = pd.DataFrame({"t": [0.2, 1.2, 2.2], "slowdown": [1.0, 1.0, 2.0], "ppl_increase": 0.0, "hold": ""})
    rows = summarize("closed", requests, timeline, {"reconfigurations": 0}, SLOS, duration=3.0, phase_s=10.0,
                     fronts=[FAST])
    chat = next(r for r in rows if r["tenant"] == "chat")
    assert (chat["windows"], chat["feasible_windows"]) == (3, 2)
    assert chat["slo_held"] == 1 / 3 and chat["slo_held_feasible"] == 1 / 2
    assert chat["goodput_tok_s"] == 10 / 3 and next(r for r in rows if r["tenant"] == "bulk")["goodput_tok_s"] == 10 / 3
    summary = pd.DataFrame(rows + [dict(r, mode="open", goodput_tok_s=0.0) for r in rows])
    lines = verdict(summary, SLOS, ["kept: no measurement"]).splitlines()
    assert lines[0].startswith("target: every tenant's SLO held in >= 95% of the windows where a plan meets it: "
                               "NOT MET (closed loop: chat 0.50 of 2 feasible windows (0.33 of all 3)")
    assert "beats open loop's: MET (6.7 against 0.0 tok/s, all tenants" in lines[1]
    assert lines[2].startswith("target: every closed-loop decision names its measurement: NOT MET (1 do not")
