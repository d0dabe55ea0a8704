"""`qos demo`: the whole loop on the reference model, on a local Ray cluster started for it.

A small profile, its front, a server under two tenants' SLOs, both tenants' jobs, an SLO change and
a simulated squeeze of accelerator memory, with the server's status after each step.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

SLOS = """\
tenants:
  - name: interactive
    min_decode_tok_s: {floor}
    max_ppl_increase: 0.25
    priority: 2
  - name: batch
    max_ppl_increase: 0.02
    priority: 1
gpu:
  reserve_gib: 0
prefer: {prefer}
"""
PROMPTS = ["The company said", "Stocks fell sharply as", "In the first quarter", "The new law will"]


def _show(step: str, status: dict) -> None:
    plan = status["plan"]
    print(f"\n== {step}")
    print(f"   plan {status['plan_id']}: {plan['quantized']} of {plan['experts_total']} experts quantized "
          f"(bits {plan['bits']}), {plan['gpu_experts']} on the accelerator, {plan['gpu_bytes'] / 2**20:.1f} MiB; "
          f"budget {status['budget_bytes'] / 2**20:.1f} MiB")
    print(f"   decision: {status['last_decision']}")
    for t in status["tenants"]:
        measured = "-" if t["measured_decode_tok_s"] is None else f"{t['measured_decode_tok_s']:.0f} tok/s"
        state = "meets its SLO" if t["plan_meets_slo"] else ("; ".join(t["problems"]) or "idle")
        print(f"   {t['name']:<12} active={t['active']!s:<5} measured {measured:<10} {state}")
    for h in status["history"][-2:]:
        print(f"   moved {h['experts_moved']} experts, {h['bytes_to_accel'] / 2**20:.1f} MiB in {h['seconds']:.3f}s: {h['reason']}")


def run(model: str, device: str | None) -> dict:
    """The demo in a temporary folder of its own, removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix="qos-demo-"))
    try:
        return _run(model, device, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(model: str, device: str | None, work: Path) -> dict:
    from catalog.knobs import Knobs, parse_grid
    from catalog.pareto import front
    from catalog.rows import ModelIdentity, passed, read_profile, with_ppl
    from placement.session import open_session
    from profiler.profile import Profiler, Settings, profile_grid
    from runtime import ray_app

    profile, slos = work / "profile.csv", work / "slos.yaml"
    print(f"[1] profiling {model} (a small grid, 2 perplexity windows per dataset) -> {profile}")
    session = open_session(ModelIdentity(model), device)
    profiler = Profiler(session, Settings(max_windows=2, new_tokens=16, repeats=1))
    total = session.spec.num_layers * session.spec.num_experts
    grid = parse_grid("quantized=0,50%,100%;bits=4,2;gpu_experts=25%,100%", total)
    profile_grid(profiler, [Knobs(**c) for c in grid], profile)
    del profiler, session  # the server loads its own copy of the model

    print("\n[2] the front")
    best = front(with_ppl(passed(read_profile(profile))))
    print(best[["plan_id", "quantized", "bits", "gpu_experts", "decode_tok_s", "ppl", "gpu_bytes"]].to_string(
        index=False, float_format=lambda v: f"{v:.3f}"))

    slos.write_text(SLOS.format(floor=20, prefer="quality"))
    config = work / "serve.yaml"
    with ray_app.local_cluster():
        # the SLO file's path in the config (watch_slos): the server re-reads it when it changes
        ray_app.write_config(config, front=str(profile), slos=str(slos), watch_slos=True, app="qos-demo",
                             port=ray_app.free_port(), device=device, tick_s=0.5)
        ray_app.deploy(config)
        handle = ray_app.handle("qos-demo")

        def status() -> dict:
            return ray_app.statuses("qos-demo")[0]

        def squeeze(free_bytes: int | None) -> None:
            ray_app.statuses("qos-demo", free_bytes=free_bytes, set_free=True)

        _show("[3] serving (nobody active yet: best quality that fits)", status())

        # enough work (about 10 s) that both tenants stay active through the changes below
        calls = [handle.generate.remote(t, p, 48) for _ in range(6) for p in PROMPTS for t in ("interactive", "batch")]
        time.sleep(1.0)
        _show("[4] two tenants' jobs running", status())

        # a co-tenant takes the accelerator: leave room for the second-smallest plan only
        sizes = sorted(pd.read_csv(profile)["gpu_bytes"].unique())
        squeeze(int(sizes[1]) - status()["memory"]["gpu_bytes"] + 2**16)
        time.sleep(1.2)
        _show(f"[5] memory squeeze: the budget holds at most {sizes[1] / 2**20:.1f} MiB", status())

        slos.write_text(SLOS.format(floor=20, prefer="quality").replace("max_ppl_increase: 0.02", "max_ppl_increase: 0.001"))
        time.sleep(1.2)
        _show("[6] SLO change: batch now allows only +0.1% perplexity", status())

        squeeze(None)  # the co-tenant is gone
        time.sleep(1.2)
        _show("[7] memory freed", status())

        results = [ray_app.result(call) for call in calls]
        print(f"\n   {len(results)} of {len(calls)} requests answered, served by plans "
              f"{sorted({pid for r in results for pid in r['plan_ids']})}")
        print(f"   e.g. {results[0]['tenant']}: {results[0]['prompt']!r} -> {results[0]['text']!r}")
        final = status()
        ray_app.stop("qos-demo")
        return {"answered": len(results), "requests": len(calls), "reconfigurations": final["reconfigurations"] - 1}
