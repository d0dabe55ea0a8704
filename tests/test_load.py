"""Load tests. Over Ray Serve (marked ray): three tenants send 1,000 short requests through handles to
two replicas while the simulated free memory flips over a hundred times, and one replica is killed
mid-load; every request is resolved (answered, or told that its replica died: ReplicaLost), none
hangs, and the replacement comes back on the plan its rank served. The serving core alone (no
Ray): 1,000 requests from three tenants across over a hundred plan switches, every one answered."""

import threading
import time

import pandas as pd
import pytest
import yaml

from tests.test_faults import front, replaced, kill_replica  # noqa: F401 (front: the fixture)
from tests.test_profiler import needs_data

REQUESTS = 1000
RATE = 50  # requests a second
MIN_FLIPS = 100
TENANTS = ("interactive", "batch", "bulk")


def three_tenants() -> dict:
    """No tenant allows a perplexity increase (only the 16-bit plan meets that: a release of memory
    moves the plan back up whoever is active)."""
    return {"tenants": [
        {"name": "interactive", "max_ppl_increase": 0.0, "priority": 2, "api_keys": ["sk-load-interactive-0001"]},
        {"name": "batch", "max_ppl_increase": 0.0, "priority": 1, "api_keys": ["sk-load-batch-000000001"]},
        {"name": "bulk", "max_ppl_increase": 0.0, "priority": 0, "api_keys": ["sk-load-bulk-0000000001"]},
    ], "prefer": "quality"}


class Flipper(threading.Thread):
    """Flips the simulated free memory of every replica between a squeeze (only the smallest plan
    fits) and none, through the registry, until stopped (pausable): each flip once the replicas
    reporting have applied the last (or after settle_s)."""

    def __init__(self, registry, squeeze: int, settle_s: float = 1.0):
        super().__init__(daemon=True)
        self.registry, self.squeeze, self.settle_s = registry, squeeze, settle_s
        self.flips = 0
        self.run_flag, self.done = threading.Event(), threading.Event()
        self.run_flag.set()

    def run(self):
        import ray

        while not self.done.is_set():
            if not self.run_flag.wait(0.1):
                continue
            squeeze = self.flips % 2 == 0
            version = ray.get(self.registry.set_free_memory.remote(self.squeeze if squeeze else None))
            self.flips += 1
            until = time.time() + self.settle_s
            while time.time() < until and not self.done.is_set():
                live = ray.get(self.registry.statuses.remote(max_age_s=1.0))
                if live and all(s["free_memory_version"] >= version for s in live):
                    break
                time.sleep(0.03)


@needs_data
def test_1000_requests_from_three_tenants_across_100_plan_switches_in_the_serving_core(front):
    from runtime.limits import Limits
    from runtime.server import Server

    server = Server(str(front), {"slos": three_tenants()}, device="cpu", tick_s=3600,  # ticks by hand
                    limits=Limits(max_queue=2 * REQUESTS))
    try:
        small, big = (min(server.plans, key=lambda p: server.plans[p].gpu_bytes(server.engine.spec)),
                      max(server.plans, key=lambda p: server.plans[p].gpu_bytes(server.engine.spec)))
        spec = server.engine.spec
        squeeze = server.plans[small].gpu_bytes(spec) - server.plans[big].gpu_bytes(spec) + 1
        start, reqs, flips = time.perf_counter(), [], 0
        while len(reqs) < REQUESTS or flips < MIN_FLIPS + 10:
            reqs += [server.submit(TENANTS[i % 3], f"request {i} on the market", 2 + i % 3)
                     for i in range(len(reqs), min(REQUESTS, len(reqs) + 10))]
            server.set_free_memory(squeeze if flips % 2 == 0 else None)  # a squeeze, a release, ...
            server.tick()
            flips += 1
            with server.executor.wake:
                server.executor.wake.notify()
            deadline = time.time() + 5
            while not server.executor.settled() and time.time() < deadline:  # the switch, between two steps
                time.sleep(0.002)
        results = [r.result(timeout=120) for r in reqs]
        took = time.perf_counter() - start
        assert [(r["tenant"], r["new_tokens"]) for r in results] == [(TENANTS[i % 3], 2 + i % 3) for i in
                                                                       range(REQUESTS)]
        status = server.status()
        assert status["reconfigurations"] >= MIN_FLIPS and status["reconcile_errors_total"] == 0
        served_by = {p for r in results for p in r["plan_ids"]}
        assert served_by == {small, big}
        print(f"\ncore load: {REQUESTS} requests from {len(TENANTS)} tenants answered across {flips} memory flips, "
              f"{status['reconfigurations']} plan switches, in {took:.1f} s")
    finally:
        server.stop()


@needs_data
@pytest.mark.ray
def test_1000_requests_from_three_tenants_with_memory_flips_and_a_replica_killed_are_all_resolved(
        front, tmp_path, monkeypatch, request):
    from runtime import ray_app

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    slo_file = tmp_path / "slos.yaml"
    slo_file.write_text(yaml.safe_dump(three_tenants()))
    plans = pd.read_csv(front).sort_values("gpu_bytes")
    ppl = plans[[c for c in plans.columns if c.startswith("ppl_") and c != "ppl_note"]].mean(axis=1)
    assert ppl.iloc[0] > ppl.iloc[-1], "the 4-bit plan must be (slightly) worse, or a release moves nothing"
    start = time.perf_counter()
    with ray_app.local_cluster(num_cpus=4):
        ray_app.write_config(tmp_path / "serve.yaml", front=str(front), slos=str(slo_file), app="load",
                             device="cpu", tick_s=0.1, port=ray_app.free_port(), replicas=2,
                             limits={"max_queue": 2 * REQUESTS, "max_seqs": 16})
        ray_app.deploy(tmp_path / "serve.yaml")
        assert len(ray_app.statuses("load")) == 2
        squeeze = int(plans["gpu_bytes"].iloc[0]) - int(plans["gpu_bytes"].iloc[-1]) + 1
        flipper = Flipper(ray_app._registry("load"), squeeze)
        flipper.start()
        request.addfinalizer(flipper.done.set)
        handle = ray_app.handle("load")
        calls, submitted = [], time.perf_counter()
        for i in range(REQUESTS):
            calls.append(handle.generate.remote(TENANTS[i % 3], f"request {i} on the market", 2 + i % 3))
            if i % 50 == 49:  # bursts of 50, one a second: tenants stay active while the memory flips
                time.sleep(max(0.0, submitted + (i + 1) / RATE - time.perf_counter()))
            if i == 2 * REQUESTS // 5:  # mid-load: the memory settled, so the victim's plan stays put
                flipper.run_flag.clear()
                time.sleep(0.3)
                settled = ray_app.statuses("load", free_bytes=None, set_free=True)  # the same state everywhere
                flipper.flips += 1
            if i == 2 * REQUESTS // 5 + 24:  # and in the middle of a burst, killed
                victim_id = max(settled, key=lambda s: s["rank"])["replica"]
                time.sleep(0.1)  # the burst routed and running
                kill_replica("load", victim_id)
                # its last report, which the registry keeps for its rank: the plan it served
                victim = next(s for s in ray_app.statuses("load") if s["replica"] == victim_id)
                flipper.run_flag.set()  # (the flips go on: the dead replica's plan is kept)
        submit_s = time.perf_counter() - submitted

        outcomes = []
        deadline = time.time() + 120
        for c in calls:
            try:
                outcomes.append(ray_app.result(c, timeout_s=max(1.0, deadline - time.time())))
            except ray_app.ReplicaLost as err:
                outcomes.append(err)
        resolved_s = time.perf_counter() - submitted
        answered = [o for o in outcomes if isinstance(o, dict)]
        lost = len(outcomes) - len(answered)
        assert len(outcomes) == REQUESTS
        assert all((o["tenant"], o["new_tokens"]) == (TENANTS[i % 3], 2 + i % 3)
                   for i, o in enumerate(outcomes) if isinstance(o, dict))
        assert {o["tenant"] for o in answered} == set(TENANTS)
        assert lost < REQUESTS // 4  # only those the victim held when it died

        # the replacement: the victim's rank, started on the plan the victim served, then serving on
        now = replaced(ray_app, "load", {victim["replica"]}, 2)  # (the replacement forgot its report)
        back = next(s for s in now if s["rank"] == victim["rank"])
        assert back["restored"]["plan_id"] == victim["plan_id"]
        assert back["history"][0]["from"] is None and back["history"][0]["reason"].startswith("restored")
        while flipper.flips < MIN_FLIPS and time.perf_counter() - start < 150:
            time.sleep(0.2)
        flipper.done.set()
        flipper.join(10)
        statuses = ray_app.statuses("load")
        switches = victim["reconfigurations"] + sum(s["reconfigurations"] for s in statuses)
        applied = victim["free_memory_changes"] + sum(s["free_memory_changes"] for s in statuses)
        # every flip is a live reconfiguration of each replica reporting; a release moves the plan up
        # only when a tenant is active at that replica's next tick, so not every one switches
        assert flipper.flips >= MIN_FLIPS and applied >= MIN_FLIPS and switches >= 20, (flipper.flips, applied,
                                                                                         switches)
        assert ray_app.result(handle.generate.remote("bulk", "after the storm", 3))["new_tokens"] == 3
        took = time.perf_counter() - start
        print(f"\nload: {REQUESTS} requests from {len(TENANTS)} tenants ({len(answered)} answered, {lost} told their "
              f"replica died) submitted in {submit_s:.1f} s, resolved in {resolved_s:.1f} s; {flipper.flips} memory "
              f"flips, applied {applied} times by the replicas, {switches} plan switches; {took:.0f} s in all")
        ray_app.stop("load")
