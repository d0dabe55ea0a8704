"""A co-tenant takes accelerator memory while the server decodes: the server must shrink its plan
before anything runs out of memory, and grow back once the memory is freed. Each reconfiguration's
seconds are set against its bytes moved over the measured pinned host->device bandwidth. The run
fails (exit 1, one line saying what did not happen) unless the server shrank at least once, grew
back to a plan at least as large as the one it started on, answered every request and never ran
out of memory.

    # GPU: a second process allocates GPU memory (the front is profiled here first, ~ minutes)
    python -m experiments.memory_pressure --model mixtral-8x7b-shape --layers 2 \\
        --out-prefix experiments/results/memory_pressure_h200
    # CPU: the co-tenant is simulated through Server.set_free_memory (tiny-random, < 1 minute)
    python -m experiments.memory_pressure --simulate

The server (runtime.server.Server, in this process) serves one tenant that keeps its experts at 16
bits (`max_ppl_increase: 0`) and, among the plans that do, prefers throughput: it starts on the
16-bit plan with every expert on the accelerator, the front's largest, whichever plan is fastest on
the GPU at hand (on an H200 the all-4-bit plan is the fastest: a tenant preferring throughput alone
started there, and a squeeze with a fixed 1 GiB margin never went below it: 0 shrinks, 0 grows).
A client thread keeps two short generations in flight.

The co-tenant only ever allocates what is free less a safety margin: pressure comes from the
server's reserve (`--reserve-gib` > margin), which the co-tenant eats into and the server restores
by shrinking. Its schedule is sized from the device and the front, so it is the same squeeze on an
80 GB and a 141 GB GPU: first the slack (the device's free memory, measured, less what the server's
plan, its reserve and the margin need: no pressure yet), then `--steps` equal squeezes of the
server's budget from below the plan it serves down to the front's smallest plan plus the margin
(the margin is at most a quarter of that span, so the plan served at the start never fits the last
step), each waiting until the server has made room, a hold, then the same steps back and a full
release. A server already on the front's smallest plan cannot be squeezed: the run stops there.

Without --front the plans are profiled here (quantized 0/50/100% at 4 bits x 25/50/100% of the
experts on the accelerator, fetch offload; few tokens, one short perplexity window). The weights of
the built-in models are random: their perplexity means nothing, but the policy only needs numbers.
On the CPU (--simulate) both tiers are the same memory, so measured decode speed does not depend
on placement (it is noise); the simulated front therefore ranks plans by accelerator bytes
(`decode_tok_s` := accelerator MiB, the measured value kept as `decode_tok_s_measured`), as a GPU
ranks them when host experts cost PCIe traffic, and the controller runs open loop (measured step
times cannot correct a speed that is not one).

Outputs: {prefix}_timeline.csv, {prefix}_reconfig.csv, {prefix}_cotenant.csv, {prefix}_summary.csv,
{prefix}_profile.csv (when profiled here), {prefix}_timeline.png, and a summary on stdout.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import queue
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd

# The CUDA co-tenant is a spawned process that re-imports this module: project modules (and the
# model code they pull in) are imported inside functions, so the child stays light.

GIB = 2**30
MIB = 2**20
TENANT = "client"
SLOS = """\
tenants:
  - name: {tenant}
    max_ppl_increase: 0      # 16-bit experts: the plan to start from is a large one, not the fastest
    priority: 1
gpu:
  reserve_gib: {reserve_gib}
prefer: throughput
"""
GRID = "quantized=0,50%,100%;bits=4;gpu_experts=25%,50%,100%;offload=fetch"
PROMPTS = ["The company said", "Stocks fell sharply as", "In the first quarter", "The new law will"]
TIMELINE_COLUMNS = ["t", "cotenant_bytes", "server_bytes", "free_bytes", "capacity_bytes", "plan_id",
                    "plan_gpu_bytes", "budget_bytes"]
RECONFIG_COLUMNS = ["t_start", "t", "from_plan", "to_plan", "from_gpu_bytes", "to_gpu_bytes", "kind", "reason",
                    "experts_moved", "requantized", "bytes_to_accel", "seconds", "bound_s", "ratio",
                    "budget_bytes", "from_knobs", "to_knobs"]
COTENANT_COLUMNS = ["t", "event", "phase", "step", "target_bytes", "held_bytes", "waited", "reached", "step_s",
                    "total_bytes"]


# --- the co-tenant's schedule, for both the real and the simulated device ---------------------------
class SimOOM(Exception):
    """The simulated device had less free memory than an allocation asked for."""


def squeeze_margin(start: int, smallest: int, reserve: int, margin: int | None = None) -> int:
    """The co-tenant's margin (default: half the reserve, at most a quarter of the span from the
    smallest plan to the plan served at the start), checked: below the reserve, and small enough that
    the squeeze's last step, room for the smallest plan plus the margin, leaves none for that plan."""
    if start <= smallest:
        raise SystemExit(f"no squeeze can make the server shrink: the plan it serves ({start / MIB:.1f} MiB) is "
                         f"already the front's smallest; choose SLOs that hold a larger plan")
    margin = min(reserve // 2, (start - smallest) // 4) if margin is None else margin
    if margin < 0:
        raise SystemExit(f"the margin must be at least 0 bytes, got {margin}")
    if margin >= reserve:
        raise SystemExit(f"the margin ({margin} B) must be below the reserve ({reserve} B): "
                         "pressure on the server comes from the co-tenant eating into its reserve")
    if smallest + margin >= start:
        raise SystemExit(f"the margin ({margin / MIB:.1f} MiB) must be below the span from the smallest plan "
                         f"({smallest / MIB:.1f} MiB) to the plan served ({start / MIB:.1f} MiB), or no step squeezes it")
    return margin


def budgets(start: int, smallest: int, margin: int, steps: int) -> list[int]:
    """The server's budget at each step up: the slack leaves it its plan plus the margin (no
    pressure yet), then each step lowers it, from below its plan down to the smallest plan plus the
    margin, so every step asks for a shrink. Independent of the device's size."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    top = smallest + margin
    if top >= start:
        raise ValueError(f"the smallest plan plus the margin ({top} B) leaves room for the plan served ({start} B)")
    return [start + margin] + [start - (start - top) * k // steps for k in range(1, steps + 1)]


def schedule(total: int, start: int, smallest: int, reserve: int, margin: int, steps: int) -> tuple[list, list]:
    """Co-tenant byte targets going up and coming down. `total`: memory the server and the co-tenant
    share (free, as measured, + the server's plan bytes); `start`: the server's plan bytes before any
    pressure. The server's budget is total - co-tenant - reserve (see budgets): the device's size
    only changes the slack, the squeeze's steps are sized from the plans."""
    up = [max(0, total - reserve - b) for b in budgets(start, smallest, margin, steps)]
    return up, list(reversed(up[:-1])) + [0]


def run_schedule(dev, up: list, down: list, *, margin: int, step_s: float, hold_s: float, poll_s: float,
                 timeout_s: float, report) -> None:
    """Reach each target in turn, allocating only what is free less `margin` (waiting for the
    server to make room), dwell `step_s` after each step (`hold_s` at the top)."""
    for phase, targets in (("up", up), ("down", down)):
        for k, target in enumerate(targets):
            start, waited, reached = time.time(), False, True
            report(event="step_start", phase=phase, step=k, target_bytes=target, held_bytes=dev.held())
            while dev.held() < target:
                room = dev.free() - margin
                if room > 0:
                    try:
                        dev.grow(min(room, target - dev.held()))
                    except Exception as err:  # an OOM here means the margin was not enough
                        if not dev.is_oom(err):
                            raise
                        report(event="oom", phase=phase, step=k, target_bytes=target, held_bytes=dev.held())
                if dev.held() >= target:
                    break
                waited = True
                if time.time() - start > timeout_s:
                    reached = False
                    break
                time.sleep(poll_s)
            if dev.held() > target:
                dev.shrink_to(target)
            report(event="step_done", phase=phase, step=k, target_bytes=target, held_bytes=dev.held(),
                   waited=waited, reached=reached, step_s=time.time() - start)
            time.sleep(hold_s if phase == "up" and k == len(targets) - 1 else step_s)


class CudaDevice:
    """This process's share of the GPU: chunks of bytes held as tensors."""

    def __init__(self, chunk: int, held_value):
        import torch

        self.torch, self.chunk, self.value = torch, chunk, held_value
        self.blocks: list = []
        torch.cuda.init()

    def held(self) -> int:
        return sum(b.numel() for b in self.blocks)

    def free(self) -> int:
        return self.torch.cuda.mem_get_info()[0]

    def grow(self, nbytes: int) -> None:
        nbytes -= nbytes % (2 * MIB)  # the allocator's granularity for large blocks
        while nbytes > 0:
            n = min(nbytes, self.chunk)
            self.blocks.append(self.torch.empty(n, dtype=self.torch.uint8, device="cuda"))
            nbytes -= n
            self.value.value = self.held()

    def shrink_to(self, target: int) -> None:
        while self.blocks and self.held() > target:
            self.blocks.pop()
        self.torch.cuda.empty_cache()  # back to the driver, where the server can see it
        self.value.value = self.held()

    def is_oom(self, err: Exception) -> bool:
        return isinstance(err, self.torch.cuda.OutOfMemoryError)


def cotenant_process(server_bytes: int, smallest: int, reserve: int, margin: int, steps: int, timings: dict,
                     chunk: int, events, held_value) -> None:
    """The CUDA co-tenant (a spawned process): its schedule follows from the free memory it sees."""
    def report(**event):
        events.put({"t": time.time(), **event})

    dev = CudaDevice(chunk, held_value)
    total = dev.free() + server_bytes  # after this process's own CUDA context
    up, down = schedule(total, server_bytes, smallest, reserve, margin, steps)
    up, down = ([t - t % (2 * MIB) for t in ts] for ts in (up, down))  # what CudaDevice.grow can reach
    report(event="schedule", held_bytes=0, target_bytes=max(up), total_bytes=total)
    run_schedule(dev, up, down, margin=margin, report=report, **timings)
    report(event="exit", held_bytes=dev.held())


class CudaCoTenant:
    def __init__(self, server_bytes, smallest, reserve, margin, steps, timings, chunk):
        ctx = mp.get_context("spawn")  # a fresh CUDA context, as a second application would have
        self.events_q, self.value = ctx.Queue(), ctx.Value("q", 0)
        self.proc = ctx.Process(target=cotenant_process, daemon=True, name="cotenant",
                                args=(server_bytes, smallest, reserve, margin, steps, timings, chunk,
                                      self.events_q, self.value))
        self.events: list[dict] = []

    def start(self):
        self.proc.start()

    def alive(self) -> bool:
        self.drain()
        return self.proc.is_alive()

    def drain(self) -> None:
        while True:
            try:
                self.events.append(self.events_q.get_nowait())
            except queue.Empty:
                return

    def held(self) -> int:
        return self.value.value

    def finish(self) -> None:
        self.proc.join(timeout=30)
        self.drain()


class SimDevice:
    """A device shared by the server and a co-tenant, `total` bytes in all: the co-tenant's bytes
    reach the server as Server.set_free_memory, under the server's lock so the two never disagree."""

    def __init__(self, server, total: int):
        self.server, self.total, self.x = server, total, 0

    def held(self) -> int:
        return self.x

    def free(self) -> int:
        with self.server.lock:
            return self.total - self.x - self.server.held_bytes()

    def _set(self, x: int) -> None:
        with self.server.lock:
            if x - self.x > self.total - self.x - self.server.held_bytes():
                raise SimOOM(f"asked for {x - self.x} bytes")
            self.x = x
            self.server.set_free_memory(self.total - x - self.server.held_bytes())

    def grow(self, nbytes: int) -> None:
        self._set(self.x + nbytes)

    def shrink_to(self, target: int) -> None:
        self._set(target)

    def is_oom(self, err: Exception) -> bool:
        return isinstance(err, SimOOM)

    def capacity(self) -> int:
        return self.total - self.x  # what the server may hold


class SimCoTenant:
    def __init__(self, dev: SimDevice, up, down, margin, timings):
        self.dev, self.events = dev, []
        kwargs = dict(margin=margin, report=lambda **e: self.events.append({"t": time.time(), **e}), **timings)
        self.thread = threading.Thread(target=run_schedule, args=(dev, up, down), kwargs=kwargs,
                                       daemon=True, name="cotenant")

    def start(self):
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def held(self) -> int:
        return self.dev.held()

    def finish(self) -> None:
        self.thread.join(timeout=30)


# --- the front -------------------------------------------------------------------------------------
def build_front(args, work: Path) -> Path:
    """Profile a handful of plans with `qos profile` (few tokens, one short perplexity window)."""
    from qos.cli import main as qos

    profile = work / "profile.csv"
    quick = ["--max-windows", "1", "--seqlen", str(args.seqlen), "--datasets", args.datasets,
             "--prompt-tokens", "16", "--new-tokens", str(args.profile_tokens), "--repeats", "1"]
    rc = qos(["profile", "--model", args.model, *(["--layers", str(args.layers)] if args.layers else []),
              "--device", args.device, "--grid", GRID, "--out", str(profile), *quick, "--quiet",
              *(["--data", args.data] if args.data else [])])
    if rc != 0:
        raise SystemExit(f"profiling failed (exit {rc})")
    _release_accelerator()
    df = pd.read_csv(profile)
    if args.simulate:  # see the module docstring: on the CPU placement does not change speed
        df["decode_tok_s_measured"] = df["decode_tok_s"]
        df["decode_tok_s"] = df["gpu_bytes"] / MIB
    df.to_csv(profile, index=False)
    return profile


def _release_accelerator() -> None:
    """Free what profiling left on the GPU (the engine and its model form reference cycles)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- the server side ---------------------------------------------------------------------------------
class OOMCount(logging.Handler):
    """Counts out-of-memory errors the server logs (a failed tick or request)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record):
        if record.exc_info and "OutOfMemory" in type(record.exc_info[1]).__name__:
            self.count += 1


def prewarm(server) -> int:
    """Derive every quantized variant the plans use now: a switch later only moves bytes (on CUDA
    quantization would also take accelerator memory while the co-tenant presses)."""
    n = 0
    with server.lock:
        for plan in server.plans.values():
            for eid, s in plan.items():
                n += server.engine.host_buffer(eid, s.bits, plan.group_size)[1] if s.bits < 16 else 0
    _release_accelerator()
    return n


class Client(threading.Thread):
    """Keeps `depth` short generations in flight and records every answer."""

    def __init__(self, server, new_tokens: int, depth: int = 2):
        super().__init__(daemon=True, name="client")
        self.server, self.new_tokens = server, new_tokens
        self.slots = threading.Semaphore(depth)
        self.stopping = threading.Event()
        self.futures, self.answers = [], []

    def run(self):
        i = 0
        while not self.stopping.is_set():
            if not self.slots.acquire(timeout=0.1):
                continue
            submitted = time.time()
            future = self.server.submit(TENANT, PROMPTS[i % len(PROMPTS)], self.new_tokens)
            future.add_done_callback(lambda f, t=submitted: self._done(f, t))
            self.futures.append(future)
            i += 1

    def _done(self, future, submitted):
        err = future.exception()
        r = {} if err else future.result()
        self.answers.append({"submitted": submitted, "done": time.time(), "error": repr(err) if err else "",
                             "oom": err is not None and "OutOfMemory" in type(err).__name__,
                             "plan_ids": "|".join(r.get("plan_ids", [])), "new_tokens": r.get("new_tokens"),
                             "decode_tok_s": r.get("decode_tok_s")})
        self.slots.release()

    def finish(self, timeout: float = 300) -> None:
        self.stopping.set()
        self.join()
        deadline = time.time() + timeout
        for f in self.futures:
            try:
                f.exception(timeout=max(0.0, deadline - time.time()))
            except Exception:  # a request still unanswered at the deadline: counted as unanswered
                pass


class Sampler(threading.Thread):
    def __init__(self, server, cotenant, sim: SimDevice | None, plan_bytes: dict, every_s: float):
        super().__init__(daemon=True, name="sampler")
        self.server, self.cotenant, self.sim, self.plan_bytes, self.every_s = server, cotenant, sim, plan_bytes, every_s
        self.rows, self.stopping = [], threading.Event()

    def sample(self) -> None:
        s = self.server
        with s.lock:  # one consistent reading (the simulated co-tenant changes only under this lock)
            pid = s.engine.plan.plan_id
            self.rows.append({"t": time.time(), "cotenant_bytes": self.cotenant.held(), "server_bytes": s.held_bytes(),
                              "free_bytes": s.free_bytes(), "capacity_bytes": self.sim.capacity() if self.sim else None,
                              "plan_id": pid, "plan_gpu_bytes": self.plan_bytes[pid], "budget_bytes": s.budget()})

    def run(self):
        while not self.stopping.wait(self.every_s):
            self.sample()


# --- the run -------------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="default: tiny-random with --simulate, else mixtral-8x7b-shape")
    p.add_argument("--layers", type=int, help="decoder layers of the model (mixtral-8x7b-shape: use 4 on an H100)")
    p.add_argument("--front", help="front or profile CSV of the model (default: profile a small grid here)")
    p.add_argument("--simulate", action="store_true", help="simulate the device memory and the co-tenant (CPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present, cpu with --simulate")
    p.add_argument("--out-prefix", help="default: experiments/results/memory_pressure_{cuda,sim}")
    p.add_argument("--tick-s", type=float, default=0.5, help="controller tick")
    p.add_argument("--steps", type=int, default=4, help="squeeze steps up (and back down)")
    p.add_argument("--step-s", type=float, help="dwell after each step (default: 4 ticks)")
    p.add_argument("--hold-s", type=float, help="hold at the top (default: 10 s; simulated: 4 ticks)")
    p.add_argument("--step-timeout-s", type=float, default=60.0, help="give up waiting for room after this")
    p.add_argument("--settle-s", type=float, default=30.0, help="how long to wait for the server to grow back")
    p.add_argument("--reserve-gib", type=float, help="the SLO file's reserve (default: 2 on CUDA; "
                   "simulated: a quarter of the plans' byte span)")
    p.add_argument("--margin-gib", type=float, help="co-tenant's safety margin, below the reserve (default: half the "
                   "reserve, at most a quarter of the span from the smallest plan to the plan served)")
    p.add_argument("--chunk-mib", type=int, default=256, help="co-tenant allocation size")
    p.add_argument("--new-tokens", type=int, default=16, help="per client request")
    p.add_argument("--pcie-gbps", type=float, default=54.6, help="measured pinned host->device GB/s")
    p.add_argument("--sample-s", type=float, default=0.1, help="timeline sampling period")
    p.add_argument("--seqlen", type=int, default=128, help="perplexity window when profiling")
    p.add_argument("--profile-tokens", type=int, default=8, help="decode tokens timed per plan when profiling")
    p.add_argument("--datasets", default="wikitext2", help="perplexity data sets when profiling")
    p.add_argument("--data", help="data folder (default: $QOS_DATA_DIR or ../shared/data)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    import torch

    args.model = args.model or ("tiny-random" if args.simulate else "mixtral-8x7b-shape")
    args.device = args.device or ("cpu" if args.simulate or not torch.cuda.is_available() else "cuda")
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    if not args.simulate and args.device != "cuda":
        p.error("a real co-tenant needs CUDA: run on a GPU or pass --simulate")
    args.step_s = 4 * args.tick_s if args.step_s is None else args.step_s
    args.hold_s = (4 * args.tick_s if args.simulate else 10.0) if args.hold_s is None else args.hold_s
    args.out_prefix = args.out_prefix or f"experiments/results/memory_pressure_{'sim' if args.simulate else 'cuda'}"
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment; the summary it returns says what happened (`failures`: what did not)."""
    from runtime.server import Server

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    prefix = Path(args.out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="memory-pressure-"))

    front = Path(args.front) if args.front else build_front(args, work)
    rows = pd.read_csv(front, dtype={"plan_id": str})  # an all-digit plan_id stays a string
    if not args.front:
        rows.to_csv(f"{prefix}_profile.csv", index=False)
    plans = {str(r["plan_id"]): r for r in rows.to_dict(orient="records")}
    smallest, largest = int(rows["gpu_bytes"].min()), int(rows["gpu_bytes"].max())
    if args.reserve_gib is None:
        args.reserve_gib = (largest - smallest) / 4 / GIB if args.simulate else 2.0
    slos = work / "slos.yaml"
    slos.write_text(SLOS.format(tenant=TENANT, reserve_gib=f"{args.reserve_gib:.12g}"))

    # simulated: room for the largest plan and twice the reserve, so nothing presses at first
    sim_total = largest + 2 * int(args.reserve_gib * GIB) if args.simulate else None
    oom_log = OOMCount()
    logging.getLogger("runtime").addHandler(oom_log)
    # simulated: the front's speeds are accelerator MiB, not times, so nothing measured can correct
    # them; the controller decides from the front alone (open loop)
    server = Server(str(front), str(slos), model=args.model, layers=args.layers, device=args.device,
                    tick_s=args.tick_s, free_bytes=sim_total, data=args.data, closed_loop=not args.simulate)
    try:
        # the plans the server may serve (a flagged row of the front is not one)
        plan_bytes = {o.plan_id: o.gpu_bytes for o in server.controller.options}
        smallest = min(plan_bytes.values())
        reserve = server.slos.reserve_bytes
        quantized_now = prewarm(server)
        for p in PROMPTS[:2]:  # warm kernels and the allocator before measuring anything
            server.generate(TENANT, p, args.new_tokens)
        time.sleep(2 * args.tick_s)  # let the controller settle on its preferred plan
        plan0, held0 = server.engine.plan.plan_id, server.held_bytes()
        print(f"server: {args.model} on {args.device}, {len(plan_bytes)} plans "
              f"({smallest / MIB:.1f}..{max(plan_bytes.values()) / MIB:.1f} MiB), {quantized_now} variants quantized "
              f"up front; serving {describe(plans, plan0)}, reserve {reserve / MIB:.1f} MiB")
        margin = squeeze_margin(held0, smallest, reserve,
                                None if args.margin_gib is None else int(args.margin_gib * GIB))
        squeeze = budgets(held0, smallest, margin, args.steps)
        print(f"co-tenant: margin {margin / MIB:.1f} MiB; it takes the slack (the server's budget: its plan plus the "
              f"margin, {squeeze[0] / MIB:.1f} MiB), then lowers the budget in {args.steps} steps of "
              f"{(held0 - squeeze[-1]) / args.steps / MIB:.1f} MiB down to {squeeze[-1] / MIB:.1f} MiB, and back")

        timings = dict(step_s=args.step_s, hold_s=args.hold_s, poll_s=0.02, timeout_s=args.step_timeout_s)
        if args.simulate:
            sim = SimDevice(server, sim_total)
            up, down = schedule(sim_total, held0, smallest, reserve, margin, args.steps)
            cotenant = SimCoTenant(sim, up, down, margin, timings)
            cotenant.events.append({"t": time.time(), "event": "schedule", "held_bytes": 0, "target_bytes": max(up),
                                    "total_bytes": sim_total})
        else:
            sim = None
            cotenant = CudaCoTenant(held0, smallest, reserve, margin, args.steps, timings, args.chunk_mib * MIB)
        t0 = time.time()
        client = Client(server, args.new_tokens)
        sampler = Sampler(server, cotenant, sim, plan_bytes, args.sample_s)
        sampler.sample()  # before any pressure
        client.start()
        sampler.start()
        cotenant.start()
        while cotenant.alive():
            time.sleep(0.1)
        cotenant.finish()
        deadline = time.time() + args.settle_s  # the co-tenant is gone: the server should grow back
        while time.time() < deadline and (server.engine.plan.plan_id != plan0 or not server.executor.settled()):
            time.sleep(args.tick_s / 2)
        time.sleep(2 * args.tick_s)  # a few samples at the final plan
        client.finish()
        sampler.stopping.set()
        sampler.join()
        history = list(server.history)
        final_plan = server.engine.plan.plan_id
    finally:
        server.stop()
        logging.getLogger("runtime").removeHandler(oom_log)
        shutil.rmtree(work, ignore_errors=True)  # the profile and SLO file (the profile is kept under prefix)

    timeline = pd.DataFrame(sampler.rows, columns=TIMELINE_COLUMNS)
    timeline["t"] -= t0
    reconfig = reconfigurations(history, plans, plan_bytes, t0, args.pcie_gbps)
    events = pd.DataFrame(cotenant.events, columns=COTENANT_COLUMNS)
    events["t"] -= t0
    timeline.to_csv(f"{prefix}_timeline.csv", index=False)
    reconfig.to_csv(f"{prefix}_reconfig.csv", index=False)
    events.to_csv(f"{prefix}_cotenant.csv", index=False)
    summary = summarize(client, timeline, reconfig, events, oom_log.count, plan0, final_plan, plans, plan_bytes)
    summary.update(margin_bytes=margin, budgets_bytes=squeeze)
    summary["failures"] = failures(summary)
    summary["outputs"] = [f"{prefix}_{s}.csv" for s in ("timeline", "reconfig", "cotenant", "summary")]
    pd.DataFrame([{k: "; ".join(map(str, v)) if isinstance(v, list) else v for k, v in summary.items()
                   if k != "outputs"}]).to_csv(f"{prefix}_summary.csv", index=False)
    if not args.no_plot:
        summary["outputs"].append(plot(timeline, reconfig, events, f"{prefix}_timeline.png",
                                       f"{args.model} on {args.device}{' (simulated co-tenant)' if args.simulate else ''}"))
    show(summary, reconfig)
    return summary


def knobs_text(plans: dict, plan_id: str) -> str:
    """A plan's knobs in a few words: `q/E experts at b bits, g/E on the accelerator`."""
    r = plans.get(plan_id)
    if r is None:
        return "not in the front"
    n = int(r["experts_total"])
    return f"{int(r['quantized'])}/{n} experts at {int(r['bits'])} bits, {int(r['gpu_experts'])}/{n} on the accelerator"


def describe(plans: dict, plan_id: str) -> str:
    """`plan_id (knobs, X MiB)`."""
    size = f", {int(plans[plan_id]['gpu_bytes']) / MIB:.1f} MiB" if plan_id in plans else ""
    return f"{plan_id} ({knobs_text(plans, plan_id)}{size})"


def reconfigurations(history: list[dict], plans: dict, plan_bytes: dict, t0: float, pcie_gbps: float) -> pd.DataFrame:
    rows = []
    for h in history:
        before = plan_bytes.get(h["from"]) if h["from"] is not None else None
        after = plan_bytes[h["to"]]
        kind = "initial" if before is None else \
            ("shrink" if after < before else "grow" if after > before else "same-size")
        bound = h["bytes_to_accel"] / (pcie_gbps * 1e9)  # 0 for a shrink that only evicts
        rows.append({"t_start": h["at"] - h["seconds"] - t0, "t": h["at"] - t0, "from_plan": h["from"],
                     "to_plan": h["to"], "from_gpu_bytes": before, "to_gpu_bytes": after, "kind": kind,
                     "reason": h["reason"], "experts_moved": h["experts_moved"], "requantized": h["requantized"],
                     "bytes_to_accel": h["bytes_to_accel"], "seconds": h["seconds"], "bound_s": bound,
                     "ratio": h["seconds"] / bound if bound else None, "budget_bytes": h["budget_bytes"],
                     "from_knobs": knobs_text(plans, h["from"]) if h["from"] is not None else None,
                     "to_knobs": knobs_text(plans, h["to"])})
    return pd.DataFrame(rows, columns=RECONFIG_COLUMNS)


def summarize(client, timeline, reconfig, events, server_ooms, plan0, final_plan, plans, plan_bytes) -> dict:
    answers = pd.DataFrame(client.answers)
    failed = int((answers["error"] != "").sum()) if len(answers) else 0
    during = reconfig[reconfig["t"] >= 0]
    shrinks, grows = during[during["kind"] == "shrink"], during[during["kind"] == "grow"]
    # a step that had to wait for room: did a shrink begin (its evictions come first) between the
    # step's start and the co-tenant's successful allocation?
    starts = events[(events["event"] == "step_start") & (events["phase"] == "up")].set_index("step")["t"]
    done = events[(events["event"] == "step_done") & (events["phase"] == "up")]
    waited = done[done["waited"] == True]  # noqa: E712 (object column: NaN on other events)
    made_room = sum(((shrinks["t_start"] >= starts[r.step]) & (shrinks["t_start"] <= r.t)).any()
                    for r in waited.itertuples())
    capacity = timeline.dropna(subset=["capacity_bytes"])
    over = int((capacity["server_bytes"] > capacity["capacity_bytes"]).sum())
    # the smallest plan served under the squeeze (the plans the server went through, in order)
    served = [plan0] + during["to_plan"].tolist()
    lowest = min(served, key=lambda pid: plan_bytes[pid])
    total = events.loc[events["event"] == "schedule", "total_bytes"]
    return {
        "requests_submitted": len(client.futures), "requests_answered": len(answers), "requests_failed": failed,
        "server_ooms": server_ooms + int(answers["oom"].sum() if len(answers) else 0),
        "cotenant_ooms": int((events["event"] == "oom").sum()),
        "device_total_bytes": int(total.iloc[0]) if len(total) and pd.notna(total.iloc[0]) else None,
        "cotenant_up_steps": len(done), "cotenant_up_steps_reached": int(done["reached"].astype(bool).sum()),
        "cotenant_peak_bytes": int(timeline["cotenant_bytes"].max()) if len(timeline) else 0,
        "shrinks": len(shrinks), "grows": len(grows),
        "steps_waiting_for_room": len(waited), "of_which_made_room_by_a_shrink": int(made_room),
        "shrank_before_cotenant_allocation": len(waited) > 0 and made_room == len(waited),
        "server_bytes_min": int(timeline["server_bytes"].min()) if len(timeline) else None,
        "samples_over_capacity": over if len(capacity) else None,
        "initial_plan": plan0, "smallest_plan_served": lowest, "final_plan": final_plan,
        "plan_before": describe(plans, plan0), "plan_under_pressure": describe(plans, lowest),
        "plan_after": describe(plans, final_plan),
        "plans_served": " > ".join(f"{plan_bytes[pid] / MIB:.1f}" for pid in served) + " MiB",
        "grew_back": final_plan == plan0 or plan_bytes[final_plan] >= plan_bytes[plan0],
        "reconfig_ratio_median": float(during["ratio"].median()) if during["ratio"].notna().any() else None,
    }


def failures(summary: dict) -> list[str]:
    """What the run was meant to show and did not, one phrase each (empty: it showed all of it)."""
    out = []
    if summary["shrinks"] == 0:
        out.append(f"no shrink: the server kept {summary['plan_before']} under the squeeze")
    if summary["grows"] == 0 or not summary["grew_back"]:
        out.append(f"no grow-back: the server ended on {summary['plan_after']}, having started on "
                   f"{summary['plan_before']}")
    missing = summary["cotenant_up_steps"] - summary["cotenant_up_steps_reached"]
    if missing:
        out.append(f"{missing} of {summary['cotenant_up_steps']} co-tenant steps never got their memory "
                   "(the server did not make room in time)")
    unanswered = summary["requests_submitted"] - summary["requests_answered"]
    if unanswered:
        out.append(f"{unanswered} of {summary['requests_submitted']} requests unanswered")
    if summary["requests_failed"]:
        out.append(f"{summary['requests_failed']} requests failed")
    if summary["server_ooms"]:
        out.append(f"{summary['server_ooms']} out-of-memory errors in the server")
    return out


def show(summary: dict, reconfig: pd.DataFrame) -> None:
    cols = ["t", "kind", "from_gpu_bytes", "to_gpu_bytes", "experts_moved", "bytes_to_accel", "seconds", "bound_s", "ratio"]
    print("\nreconfigurations (bound_s: bytes_to_accel over the PCIe bandwidth; ratio = seconds / bound_s)")
    print(reconfig[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print("\nsummary")
    for key, value in summary.items():
        if key not in ("outputs", "failures"):
            print(f"  {key:<36} {value}")
    for path in summary.get("outputs", []):
        print(f"  wrote {path}")
    print(f"\n{verdict(summary)}")


def verdict(summary: dict) -> str:
    """One line: what the run showed, or what it did not."""
    if summary["failures"]:
        return "memory_pressure FAILED: " + "; ".join(summary["failures"])
    return (f"memory_pressure ok: {summary['shrinks']} shrinks and {summary['grows']} grows "
            f"({summary['plans_served']}), {summary['requests_answered']} of {summary['requests_submitted']} "
            "requests answered, no out-of-memory error")


def plot(timeline, reconfig, events, path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit, name = (GIB, "GiB") if timeline[["server_bytes", "cotenant_bytes"]].max().max() > GIB else (MIB, "MiB")
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for col, label in (("cotenant_bytes", "co-tenant"), ("server_bytes", "server (plan bytes)"),
                       ("free_bytes", "free"), ("budget_bytes", "server budget")):
        ax.plot(timeline["t"], timeline[col] / unit, label=label, drawstyle="steps-post")
    for kind, color in (("shrink", "tab:red"), ("grow", "tab:green")):
        for i, t in enumerate(reconfig.loc[(reconfig["kind"] == kind) & (reconfig["t"] >= 0), "t"]):
            ax.axvline(t, color=color, alpha=0.5, lw=1, label=f"{kind}" if i == 0 else None)
    ax.set_xlabel("seconds")
    ax.set_ylabel(name)
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    result = main()
    if result["failures"]:
        print(verdict(result), file=sys.stderr)
    sys.exit(1 if result["failures"] else 0)
