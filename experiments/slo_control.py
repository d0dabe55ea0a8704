"""Open loop against closed loop on one trace: three tenants whose load changes over time, served by
the same front twice, once deciding from the profile alone and once correcting it with what the
server measures (catalog.feedback, admission control).

    python -m experiments.slo_control --out-prefix experiments/results/slo_control_cpu      # tiny-random, ~3 min
    python -m experiments.slo_control --model mixtral-8x7b-shape --layers 8 \\
        --out-prefix experiments/results/slo_control_h200                                    # GPU

Tenants: `chat` (priority 2) has a latency SLO, time per output token at p50 below a limit set from
the front (`--tpot-factor` x the slowest plan's batch-1 time, so every plan meets it alone and none
need meet it with a full decoder); `docs` (priority 1) a time-to-first-token SLO; `bulk` (priority
1) none. The trace, in phases of `--phase-s`: chat alone; bulk and docs join with many concurrent
clients; chat alone again. Each client sends a request, waits for its answer, sends the next.

Reported per mode and tenant: the fraction of one-second windows in which the tenant's SLO held
(its requests finished in the window, at the SLO's percentile), goodput (tokens of requests that
met their tenant's SLO, per second), requests, and for the mode the reconfigurations and the
perplexity paid (time-weighted increase over the best plan's). Outputs: {prefix}_summary.csv,
{prefix}_requests.csv, {prefix}_timeline.csv, {prefix}_timeline.png.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd

PROMPTS = ["The company said", "Stocks fell sharply as", "In the first quarter", "The new law will",
           "Analysts expect the bank to", "The report found that"]
# tenant -> concurrent clients in each phase
TRACE = {"chat": (1, 1, 1), "docs": (0, 2, 0), "bulk": (0, 10, 0)}


def build_front(args, work: Path) -> Path:
    from qos.cli import main as qos

    out = work / "front.csv"
    argv = ["profile", "--model", args.model, "--grid", args.grid, "--batch-sizes", "1,4,8", "--out", str(out),
            "--datasets", "wikitext2", "--max-windows", "1", "--seqlen", "64", "--new-tokens", "16",
            "--repeats", str(args.repeats), "--quiet"] + (["--layers", str(args.layers)] if args.layers else []) + \
        (["--device", args.device] if args.device else []) + (["--data", args.data] if args.data else [])
    if qos(argv) != 0:
        raise SystemExit("profiling failed")
    return out


def slos_for(front: Path, tpot_factor: float, ttft_factor: float,
             budget: int | None) -> tuple[dict, float, float]:
    """Limits set from the plan a quality preference serves when nobody is busy (the best perplexity
    that fits the budget): it meets them alone, and with a full decoder its profiled batched time
    should not."""
    from catalog.rows import read_front

    rows = [m for m in read_front(front) if budget is None or m.gpu_bytes <= budget]
    best = min(rows, key=lambda m: m.ppl)
    tpot_limit, ttft_limit = tpot_factor * best.curve[0][1], ttft_factor * best.ttft_s[0]
    if best.curve[-1][1] <= tpot_limit:
        print(f"warning: the best plan's profiled {best.curve[-1][1]:.1f} ms per token at batch {best.curve[-1][0]} "
              f"is within chat's limit: load alone will not break the SLO")
    slos = {"tenants": [
        {"name": "chat", "max_tpot_ms": round(tpot_limit, 3), "p": 50, "priority": 2},
        {"name": "docs", "max_ttft_s": round(ttft_limit, 4), "p": 50, "priority": 1},
        {"name": "bulk", "priority": 1},
    ], "prefer": "quality"}
    return slos, tpot_limit, ttft_limit


def run_mode(args, front: Path, slos: dict, closed: bool) -> tuple[list[dict], list[dict], dict]:
    from runtime.limits import Limits, Rejected
    from runtime.server import Server

    server = Server(str(front), {"slos": slos}, device=args.device, tick_s=args.tick_s, data=args.data,
                    limits=Limits(max_seqs=args.max_seqs), closed_loop=closed, free_bytes=args.free_bytes)
    ppl = {o.plan_id: o.ppl for o in server.controller.options}
    base = min(ppl.values())
    requests, timeline, lock = [], [], threading.Lock()
    t0 = time.time()
    end = t0 + 3 * args.phase_s

    def phase(now: float) -> int:
        return min(2, int((now - t0) // args.phase_s))

    def client(tenant: str, index: int, seed: int) -> None:
        rng = random.Random(seed)
        while (now := time.time()) < end:
            if index >= TRACE[tenant][phase(now)]:
                time.sleep(0.05)
                continue
            try:
                req = server.submit(tenant, rng.choice(PROMPTS), args.new_tokens)
                r = req.result(timeout=600)
            except Rejected:
                time.sleep(0.05)
                continue
            with lock:
                requests.append({"tenant": tenant, "t": r.get("latency_s", 0) + req.accepted_at - t0,
                                 "phase": phase(req.accepted_at), "ttft_s": r["ttft_s"], "tpot_ms": r["tpot_ms"],
                                 "new_tokens": r["new_tokens"], "plans": len(set(r["plan_ids"]))})

    def sample() -> None:
        while (now := time.time()) < end:
            d = server.controller.desired
            plan = server.engine.plan.plan_id if server.engine.plan else None
            timeline.append({"t": now - t0, "plan_id": plan, "ppl_increase": ppl.get(plan, base) / base - 1,
                             "hold": ",".join(sorted(d.hold)) if d else "", "running": server.executor.running_count(),
                             "waiting": server.executor.queue_depth()})
            time.sleep(0.25)

    threads = [threading.Thread(target=client, args=(t, i, 1000 * k + i), daemon=True)
               for k, t in enumerate(TRACE) for i in range(max(TRACE[t]))] + [threading.Thread(target=sample, daemon=True)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    status = server.status()
    server.stop()
    return requests, timeline, {"reconfigurations": status["reconfigurations"],
                                "decisions": [h["reason"] for h in status["history"]]}


def held(group: pd.DataFrame, tenant: dict) -> bool:
    p = tenant.get("p", 95) / 100
    ok = True
    if tenant.get("max_tpot_ms") is not None and group["tpot_ms"].notna().any():
        ok &= group["tpot_ms"].quantile(p) <= tenant["max_tpot_ms"]
    if tenant.get("max_ttft_s") is not None:
        ok &= group["ttft_s"].quantile(p) <= tenant["max_ttft_s"]
    return bool(ok)


def met(row, tenant: dict) -> bool:
    return not ((tenant.get("max_tpot_ms") is not None and (row["tpot_ms"] or 0) > tenant["max_tpot_ms"]) or
                (tenant.get("max_ttft_s") is not None and row["ttft_s"] > tenant["max_ttft_s"]))


def summarize(mode: str, requests: pd.DataFrame, timeline: pd.DataFrame, extra: dict, slos: dict,
              duration: float) -> list[dict]:
    rows = []
    for tenant in slos["tenants"]:
        mine = requests[requests["tenant"] == tenant["name"]].copy()
        windows = [held(g, tenant) for _, g in mine.groupby(mine["t"].astype(int))] if len(mine) else []
        good = mine[mine.apply(lambda r: met(r, tenant), axis=1)] if len(mine) else mine
        rows.append({"mode": mode, "tenant": tenant["name"], "requests": len(mine),
                     "slo_held": sum(windows) / len(windows) if windows else float("nan"),
                     "goodput_tok_s": good["new_tokens"].sum() / duration if len(mine) else 0.0,
                     "tok_s": mine["new_tokens"].sum() / duration if len(mine) else 0.0,
                     "reconfigurations": extra["reconfigurations"],
                     "ppl_paid": float(timeline["ppl_increase"].mean()) if len(timeline) else float("nan"),
                     "held_back_s": 0.25 * int((timeline["hold"] != "").sum()) if len(timeline) else 0.0})
    return rows


def plot(requests: pd.DataFrame, timeline: pd.DataFrame, slos: dict, tpot_limit: float, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(requests["mode"]))
    fig, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 6), sharex=True, squeeze=False)
    for col, mode in enumerate(modes):
        r, tl = requests[requests["mode"] == mode], timeline[timeline["mode"] == mode]
        ax = axes[0][col]
        for tenant, marker in zip(("chat", "docs", "bulk"), "o^."):
            mine = r[r["tenant"] == tenant]
            ax.scatter(mine["t"], mine["tpot_ms"], s=10, marker=marker, label=tenant)
        ax.axhline(tpot_limit, color="red", linestyle="--", label="chat's limit")
        ax.set_title(f"{mode} loop: time per output token per request")
        ax.set_ylabel("ms")
        ax.legend(fontsize=8)
        ax = axes[1][col]
        ax.step(tl["t"], 100 * tl["ppl_increase"], where="post", label="perplexity paid (%)")
        ax.step(tl["t"], tl["running"] + tl["waiting"], where="post", label="sequences running + waiting")
        for t in tl[tl["hold"] != ""]["t"]:
            ax.axvspan(t, t + 0.25, color="orange", alpha=0.2, lw=0)
        ax.set_xlabel("s (orange: low priorities held back)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--layers", type=int)
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--front", help="a profile with --batch-sizes 1,4,8 (default: profiled here)")
    p.add_argument("--grid", default="quantized=0,50%,100%;bits=4,2;gpu_experts=100%")
    p.add_argument("--data", help="data folder (default: $QOS_DATA_DIR or ../shared/data)")
    p.add_argument("--phase-s", type=float, default=20.0, help="length of each of the trace's three phases")
    p.add_argument("--tick-s", type=float, default=0.5)
    p.add_argument("--max-seqs", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--tpot-factor", type=float, default=2.0,
                   help="chat's limit: this x the best plan's batch-1 time per output token")
    p.add_argument("--ttft-factor", type=float, default=4.0,
                   help="docs' limit: this x the best plan's time to first token")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per plan when profiling")
    p.add_argument("--free-memory", default=None,
                   help="simulated free accelerator memory in bytes, or 'auto': just too little for the largest "
                        "plan, so the best quality that fits offloads experts (default: no simulation)")
    p.add_argument("--out-prefix", default="runs/slo_control")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="slo-control-"))
    front = Path(args.front) if args.front else build_front(args, work)
    args.free_bytes = None
    if args.free_memory == "auto":
        args.free_bytes = int(pd.read_csv(front)["gpu_bytes"].max()) - 1
    elif args.free_memory is not None:
        args.free_bytes = int(float(args.free_memory))
    slos, tpot_limit, ttft_limit = slos_for(front, args.tpot_factor, args.ttft_factor, args.free_bytes)
    print(f"chat: time per output token p50 <= {tpot_limit:.2f} ms; docs: TTFT p50 <= {ttft_limit:.3f} s")
    summary, all_requests, all_timeline = [], [], []
    for mode, closed in (("open", False), ("closed", True)):
        requests, timeline, extra = run_mode(args, front, slos, closed)
        req, tl = pd.DataFrame(requests), pd.DataFrame(timeline)
        summary += summarize(mode, req, tl, extra, slos, 3 * args.phase_s)
        all_requests.append(req.assign(mode=mode))
        all_timeline.append(tl.assign(mode=mode))
        print(f"{mode} loop: {len(req)} requests, {extra['reconfigurations']} reconfigurations; decisions:")
        for reason in extra["decisions"][-6:]:
            print(f"   {reason[:160]}")
    out = pd.DataFrame(summary)
    prefix = Path(args.out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(f"{prefix}_summary.csv", index=False)
    requests, timeline = pd.concat(all_requests), pd.concat(all_timeline)
    requests.to_csv(f"{prefix}_requests.csv", index=False)
    timeline.to_csv(f"{prefix}_timeline.csv", index=False)
    print(out.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"wrote {prefix}_summary.csv, _requests.csv, _timeline.csv, "
          f"{plot(requests, timeline, slos, tpot_limit, f'{prefix}_timeline.png')}")
    return out


if __name__ == "__main__":
    main()
