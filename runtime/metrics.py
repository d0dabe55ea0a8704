"""The server's metrics, defined through the metric classes it is given (Ray's: `ray.serve.metrics`
inside a Serve replica, which adds the deployment, replica and application tags; Ray exports them
in Prometheus' format at each node's metrics port). This module imports neither Ray nor torch, so
the serving core keeps running without them and tests pass in-memory classes.

Two feeds: every finished request (`request_done`), every refused one (`request_rejected`), and
the server's status once per controller tick (`observe`), which sets the gauges and counts the
reconfigurations made since the last tick.
"""

from __future__ import annotations

# Prometheus-style bucket bounds: seconds to first token, seconds per output token.
TTFT_BOUNDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
TPOT_BOUNDS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5]
FINISHED = ("stop", "length", "timeout", "cancelled", "aborted", "error")

# name -> (kind, description, tag keys): the metrics list of the README comes from this table.
METRICS = {
    "qos_requests_total": ("counter", "requests answered, by tenant and finish reason", ("tenant", "finish_reason")),
    "qos_requests_rejected_total": ("counter", "requests refused at submit (queue full, too long, bad "
                                    "parameters, stopping), by tenant", ("tenant",)),
    "qos_prompt_tokens_total": ("counter", "prompt tokens of answered requests", ("tenant",)),
    "qos_generation_tokens_total": ("counter", "tokens generated for answered requests", ("tenant",)),
    "qos_time_to_first_token_seconds": ("histogram", "time from accepting a request to its first token",
                                        ("tenant",)),
    "qos_time_per_output_token_seconds": ("histogram", "a request's mean time per output token after the "
                                          "first", ("tenant",)),
    "qos_slo_violations_total": ("counter", "answered requests whose TTFT or time per output token broke the "
                                 "tenant's limit (slo: ttft or tpot)", ("tenant", "slo")),
    "qos_tenant_slo_met": ("gauge", "1 when the tenant's plan and its recent latency percentiles meet its "
                           "SLOs, 0 when not (absent until known)", ("tenant",)),
    "qos_queue_depth": ("gauge", "requests waiting for a decoder slot", ("tenant",)),
    "qos_running_requests": ("gauge", "requests being decoded", ("tenant",)),
    "qos_plan_info": ("gauge", "1 for the plan served now (plan_id label), 0 for one served before",
                      ("plan_id",)),
    "qos_accelerator_bytes": ("gauge", "bytes the server holds on the accelerator (weights, expert "
                              "slots; the KV cache is qos_kv_cache_bytes)", ()),
    "qos_kv_cache_bytes": ("gauge", "bytes of the decoder's KV cache", ()),
    "qos_host_bytes": ("gauge", "bytes of the plan's host tier (experts served from host memory)", ()),
    "qos_free_accelerator_bytes": ("gauge", "free accelerator memory as the controller last read it", ()),
    "qos_budget_bytes": ("gauge", "what a plan may take: free memory less the reserve, plus what is held", ()),
    "qos_reconfigurations_total": ("counter", "plan switches applied", ()),
    "qos_reconfiguration_bytes_total": ("counter", "bytes moved to the accelerator by plan switches", ()),
    "qos_reconfiguration_seconds_total": ("counter", "seconds spent applying plan switches", ()),
}


class Metrics:
    def __init__(self, counter, gauge, histogram):
        """counter/gauge/histogram: classes with Ray's signature, (name, description=, tag_keys=) and
        histogram's boundaries=; their instances' inc/set/observe take (value, tags=)."""
        self.m = {}
        for name, (kind, description, tags) in METRICS.items():
            if kind == "histogram":
                bounds = TTFT_BOUNDS if "first_token" in name else TPOT_BOUNDS
                self.m[name] = histogram(name, description=description, boundaries=bounds, tag_keys=tags)
            else:
                self.m[name] = (counter if kind == "counter" else gauge)(name, description=description, tag_keys=tags)
        self.seen_reconfigurations = 0
        self.last_switch_at = 0.0
        self.plans_shown: set[str] = set()

    def request_done(self, result: dict | None, tenant: str, limits=None) -> None:
        """A finished request's result (None when it ended in an error); `limits`: its tenant's SLO."""
        if result is None:
            self.m["qos_requests_total"].inc(1, tags={"tenant": tenant, "finish_reason": "error"})
            return
        tags = {"tenant": tenant}
        self.m["qos_requests_total"].inc(1, tags=tags | {"finish_reason": result["finish_reason"]})
        self.m["qos_prompt_tokens_total"].inc(result["prompt_tokens"], tags=tags)
        if result["new_tokens"]:
            self.m["qos_generation_tokens_total"].inc(result["new_tokens"], tags=tags)
        ttft, tpot_ms = result.get("ttft_s"), result.get("tpot_ms")
        if ttft is not None:
            self.m["qos_time_to_first_token_seconds"].observe(ttft, tags=tags)
        if tpot_ms is not None:
            self.m["qos_time_per_output_token_seconds"].observe(tpot_ms / 1000, tags=tags)
        if limits is not None:
            for slo, value, limit in (("ttft", ttft, limits.max_ttft_s), ("tpot", tpot_ms, limits.max_tpot_ms)):
                if value is not None and limit is not None and value > limit:
                    self.m["qos_slo_violations_total"].inc(1, tags=tags | {"slo": slo})

    def request_rejected(self, tenant: str) -> None:
        self.m["qos_requests_rejected_total"].inc(1, tags={"tenant": tenant})

    def observe(self, status: dict) -> None:
        """Gauges from the server's status; counters for the reconfigurations made since the last call."""
        mem = status["memory"]
        self.m["qos_accelerator_bytes"].set(mem["gpu_bytes"])
        self.m["qos_kv_cache_bytes"].set(mem["kv_cache_bytes"])
        self.m["qos_host_bytes"].set(mem["host_bytes"])
        self.m["qos_free_accelerator_bytes"].set(status["free_bytes"])
        self.m["qos_budget_bytes"].set(status["budget_bytes"])
        for t in status["tenants"]:
            tags = {"tenant": t["name"]}
            self.m["qos_queue_depth"].set(t["waiting"], tags=tags)
            self.m["qos_running_requests"].set(t["running"], tags=tags)
            met = [v for v in (t["plan_meets_slo"], t["floor_met"], t["latency_met"]) if v is not None]
            if met:
                self.m["qos_tenant_slo_met"].set(float(all(met)), tags=tags)
        if status["plan_id"] is not None:
            for plan_id in self.plans_shown - {status["plan_id"]}:
                self.m["qos_plan_info"].set(0, tags={"plan_id": plan_id})
            self.m["qos_plan_info"].set(1, tags={"plan_id": status["plan_id"]})
            self.plans_shown = {status["plan_id"]}
        new = status["reconfigurations"] - self.seen_reconfigurations
        if new > 0:
            self.m["qos_reconfigurations_total"].inc(new)
            # bytes and seconds of the switches still in the history (all of them unless more than it
            # keeps were made within one tick)
            fresh = [h for h in status["history"] if h["at"] > self.last_switch_at]
            moved = sum(h["bytes_to_accel"] for h in fresh)
            if moved:
                self.m["qos_reconfiguration_bytes_total"].inc(moved)
            seconds = sum(h["seconds"] for h in fresh)
            if seconds > 0:
                self.m["qos_reconfiguration_seconds_total"].inc(seconds)
            if fresh:
                self.last_switch_at = max(h["at"] for h in fresh)
        self.seen_reconfigurations = status["reconfigurations"]
