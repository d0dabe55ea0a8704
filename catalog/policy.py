"""Which plan to serve: the pure decision the controller makes every tick (no Ray, no tensors).

From the measured plans whose accelerator bytes fit the budget, choose one that meets every active
tenant's SLO; when none does, meet them in priority order and say which SLO is violated and by how
much. Between plans that serve the tenants equally, `prefer` (quality or throughput) decides, and a
switch away from the current plan must pay for itself: the gain has to beat a hysteresis margin
plus a charge for the bytes the switch moves, so memory jitter does not make the plan flap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from catalog.slo import SLOSpec, TenantSLO


@dataclass(frozen=True)
class Option:
    plan_id: str
    decode_tok_s: float
    ppl: float
    gpu_bytes: int
    # profiled latency at p50 and p95 (None: not measured; time per output token then follows from
    # decode_tok_s, time to first token goes unchecked)
    ttft_s: tuple[float | None, float | None] = (None, None)
    tpot_ms: tuple[float | None, float | None] = (None, None)
    host_bytes: int = 0  # host memory the plan keeps resident (Plan.host_bytes)

    def latency(self, which: str, p: int) -> float | None:
        """Profiled time to first token (s) or time per output token (ms) at percentile p (50 or 95)."""
        value = getattr(self, which)[0 if p == 50 else 1]
        if value is None and which == "tpot_ms" and self.decode_tok_s > 0:
            return 1000 / self.decode_tok_s
        return value


@dataclass(frozen=True)
class TenantStatus:
    tenant: str
    met: bool
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    option: Option
    tenants: tuple[TenantStatus, ...]
    fits: bool  # the chosen plan fits the budget
    switch: bool  # differs from the current plan
    reason: str

    @property
    def plan_id(self) -> str:
        return self.option.plan_id

    @property
    def all_met(self) -> bool:
        return all(t.met for t in self.tenants)


def options_from_rows(rows: Iterable[dict]) -> list[Option]:
    """Options from front/profile rows (`ppl` is the mean perplexity, see catalog.pareto.with_ppl)."""
    return [Option(str(r["plan_id"]), float(r["decode_tok_s"]), float(r["ppl"]), int(r["gpu_bytes"]),
                   host_bytes=int(r.get("host_bytes") or 0)) for r in rows]


def tenant_status(option: Option, tenant: TenantSLO, base_ppl: float) -> TenantStatus:
    problems = []
    if tenant.min_decode_tok_s is not None and option.decode_tok_s < tenant.min_decode_tok_s:
        short = option.decode_tok_s / tenant.min_decode_tok_s - 1
        problems.append(f"decode {option.decode_tok_s:.1f} tok/s is below {tenant.min_decode_tok_s:g} ({100 * short:+.0f}%)")
    if tenant.max_ppl_increase is not None:
        increase = option.ppl / base_ppl - 1
        if increase > tenant.max_ppl_increase + 1e-12:
            problems.append(f"perplexity {100 * increase:+.1f}% over 16-bit exceeds the allowed "
                            f"{100 * tenant.max_ppl_increase:+.1f}%")
    for which, limit, unit, what in tenant.latency_limits():
        value = option.latency(which, tenant.p)
        if value is not None and value > limit:
            problems.append(f"{what} p{tenant.p} {value:.3g} {unit} exceeds {limit:g} {unit}")
    return TenantStatus(tenant.name, not problems, tuple(problems))


def choose(options: list[Option], slos: SLOSpec, active: Iterable[str], budget_bytes: int,
           current: str | None = None, *, base_ppl: float,
           switch_bytes: Callable[[str], int] = lambda plan_id: 0,
           hysteresis: float = 0.05, bytes_weight: float = 0.05, host_budget: int | None = None) -> Decision:
    """The plan to serve. `active`: tenants with queued or running requests; `switch_bytes(plan_id)`:
    bytes a switch to that plan would move; a switch must gain more than `hysteresis` (relative,
    in the preferred metric) plus `bytes_weight` x moved bytes / budget. `host_budget`: plans whose
    host tier needs more host memory are never chosen (the host cannot be squeezed like the GPU)."""
    if not options:
        raise ValueError("no plans to choose from: the front is empty")
    if host_budget is not None:
        options = [o for o in options if o.host_bytes <= host_budget]
        if not options:
            raise ValueError(f"no plan of the front fits the host budget of {host_budget} bytes")
    tenants = sorted((slos.tenant(n) for n in set(active)), key=lambda t: (-t.priority, t.name))
    fitting = [o for o in options if o.gpu_bytes <= budget_bytes]
    if not fitting:
        smallest = min(options, key=lambda o: o.gpu_bytes)
        return Decision(smallest, tuple(tenant_status(smallest, t, base_ppl) for t in tenants), False,
                        smallest.plan_id != current,
                        f"no plan fits the budget of {budget_bytes} bytes; the smallest needs {smallest.gpu_bytes}")

    def met(o: Option) -> tuple[bool, ...]:  # highest priority first: lexicographic order ranks them
        return tuple(tenant_status(o, t, base_ppl).met for t in tenants)

    def preference(o: Option) -> tuple[float, float]:
        return (-o.ppl, o.decode_tok_s) if slos.prefer == "quality" else (o.decode_tok_s, -o.ppl)

    best = max(fitting, key=lambda o: (met(o), preference(o), -o.gpu_bytes))
    now = next((o for o in fitting if o.plan_id == current), None)
    if now is not None and now.plan_id != best.plan_id and met(now) == met(best):
        if slos.prefer == "quality":
            gain = (now.ppl - best.ppl) / now.ppl
        else:
            gain = (best.decode_tok_s - now.decode_tok_s) / now.decode_tok_s
        charge = hysteresis + bytes_weight * switch_bytes(best.plan_id) / max(budget_bytes, 1)
        if gain <= charge:
            best, why = now, f"kept: switching would gain {100 * gain:.1f}% for a cost of {100 * charge:.1f}%"
        else:
            why = f"{slos.prefer} gain {100 * gain:.1f}% beats the switching cost {100 * charge:.1f}%"
    elif now is not None and now.plan_id == best.plan_id:
        why = "current plan is still the best"
    else:
        why = "meets every active SLO" if all(met(best)) else "best effort, by tenant priority"
    status = tuple(tenant_status(best, t, base_ppl) for t in tenants)
    return Decision(best, status, True, best.plan_id != current, why)
