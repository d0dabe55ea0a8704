"""The one module that imports ray: the serving core as a Ray Serve application, and its clients.

One deployment, `QosServer`, is both the HTTP ingress (the OpenAI-compatible API of
runtime/http_api.py) and the model server: one replica per GPU, each with its own Server (model,
controller, executor) adapting to its own GPU's free memory. Its `user_config` holds the SLOs
(`slos:` inline, or `slo_file:` to watch), so `serve deploy` of a changed config reconfigures every
replica live through `reconfigure()`. Handles reach the same replicas for `qos status/submit/stop`.

Replicas report their status every tick to a small named actor (the registry), where `qos status`
reads every replica's, and from which each replica picks up a simulated free-memory value set by
the operator (`qos status --free-memory`).

Self-healing: a replica that dies is replaced by Serve (its health check notices within
HEALTH_CHECK_S), and the replacement takes the dead one's rank. The registry keeps each rank's
desired state (the plan it served, where its SLOs came from, its simulated free memory), so the new
replica starts on the plan the old one served, with the SLOs Serve hands it again (the user_config).
Clients whose requests were in flight get a clear error to retry: `ReplicaLost` through handles,
and over HTTP a 503 with Retry-After (a middleware in Serve's proxy, `proxy_middlewares`), or an
error event ending the stream.

    applications:
      - name: moe-qos
        import_path: runtime.ray_app:build
        args: {front: runs/profile_tiny.csv}
        deployments:
          - name: QosServer
            num_replicas: 1
            ray_actor_options: {num_gpus: 1}
            user_config: {slos: {tenants: [...]}}
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray
import yaml
from ray import serve
from ray.serve import metrics as serve_metrics

log = logging.getLogger(__name__)
NAMESPACE = "moe-qos"
DEFAULT_APP = "moe-qos"
DEPLOYMENT = "QosServer"
STALE_S = 15.0  # a replica that has not reported for this long is gone
HEALTH_CHECK_S = 2.0  # how often Serve checks a replica (a dead one is replaced after the next check)
RETRY_AFTER_S = 1  # what clients of a replica that died are told to wait before retrying
PROXY_CALLBACK = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"  # Serve reads it in each HTTP proxy
ARGS = {"front", "model", "layers", "device", "tick_s", "free_memory", "data", "limits", "speed",
        "served_model_name", "anonymous_tenant", "slos", "slo_file", "num_replicas", "num_gpus", "host_budget"}


def _registry_name(app: str) -> str:
    return f"{app}-replicas"


class ReplicaLost(ValueError):
    """The replica serving a request died before answering it (Serve replaces it): retry."""


def _rank(context) -> int | None:
    """A replica's rank in its deployment (Serve's ReplicaRank, or an int in older Rays)."""
    rank = getattr(context, "rank", None)
    return getattr(rank, "rank", rank)


@ray.remote(num_cpus=0)
class Registry:
    """Each replica's latest status (it reports every tick); the simulated free memory set for all
    replicas or one, which replicas pick up when they report; and each rank's desired state (the
    plan it serves, its SLO source), which a replica replacing a dead one of the same rank restores.
    A replica's settings are kept by rank, so they outlive the replica."""

    def __init__(self):
        self.beats: dict[str, tuple[float, dict]] = {}
        self.free: dict[int | str, tuple[int, int | None]] = {}  # rank (or replica) or "*" -> (version, bytes)
        self.ranks: dict[str, int] = {}  # replica -> its rank, as it last said
        self.desired: dict[int, dict] = {}  # rank -> the state its replica serves
        self.version = 0

    def _free_of(self, key) -> tuple[int, int | None] | None:
        given = [v for v in (self.free.get(key), self.free.get("*")) if v is not None]
        return max(given, default=None)

    def restore(self, replica: str, rank: int | None) -> dict:
        """A replica starting: what its rank served before (None: nothing) and its free memory."""
        if rank is None:
            return {"desired": None, "free": self._free_of(replica)}
        for gone in [r for r, k in self.ranks.items() if k == rank and r != replica]:  # the one it replaces
            self.ranks.pop(gone)
            self.beats.pop(gone, None)
        self.ranks[replica] = rank
        return {"desired": self.desired.get(rank), "free": self._free_of(rank)}

    def beat(self, replica: str, status: dict) -> tuple[int, int | None] | None:
        self.beats[replica] = (time.time(), status)
        rank = status.get("rank")
        if rank is None:
            return self._free_of(replica)
        self.ranks[replica] = rank
        if status.get("plan_id") is not None:
            self.desired[rank] = {"plan_id": status["plan_id"], "slo_source": status.get("slo_source"),
                                  "replica": replica, "at": time.time()}
        return self._free_of(rank)

    def set_free_memory(self, free_bytes: int | None, replica: str | None = None) -> int:
        self.version += 1
        if replica is None:
            self.free.clear()
        self.free[self.ranks.get(replica, replica) if replica else "*"] = (self.version, free_bytes)
        return self.version

    def statuses(self, max_age_s: float) -> list[dict]:
        now = time.time()
        return [s for t, s in sorted(self.beats.values(), key=lambda b: b[1]["replica"]) if now - t <= max_age_s]

    def forget(self, replica: str) -> None:
        self.beats.pop(replica, None)
        self.ranks.pop(replica, None)


def _one_line(err: BaseException) -> str:
    """The last line of an error that crossed Ray, without the "module.ErrorClass: " Ray puts before it."""
    text = str(err).strip()
    return re.sub(r"^[\w.]+(Error|Exception|Rejected): ", "", text.splitlines()[-1]) if text else type(err).__name__


@serve.deployment(name=DEPLOYMENT, max_ongoing_requests=1024, health_check_period_s=HEALTH_CHECK_S,
                  graceful_shutdown_timeout_s=60)
@serve.ingress()
class QosServer:
    def __init__(self, front: str, *, model: str | None = None, layers: int | None = None,
                 device: str | None = None, tick_s: float = 1.0, free_memory: int | None = None,
                 data: str | None = None, limits: dict | None = None, speed: str = "decode_tok_s",
                 served_model_name: str | None = None, anonymous_tenant: str | None = None,
                 host_budget: int | None = None):
        # the model loads at the first reconfigure(), which brings the SLOs (the user_config)
        self.args = dict(front=front, model=model, layers=layers, device=device, tick_s=tick_s,
                         free_bytes=free_memory, data=data, speed=speed, host_budget=host_budget)
        self.limits = limits or {}
        context = serve.get_replica_context()
        self.app_name = context.app_name or DEFAULT_APP
        self.replica = context.replica_id.unique_id
        self.anonymous_tenant = anonymous_tenant
        self.model_name = served_model_name
        self.server = None
        self.applied = 0  # the registry's free-memory version applied
        self.free_memory_changes = 0  # free-memory settings applied (live reconfigurations)
        self.restored = None  # the desired state of this replica's rank before it started
        self.registry = Registry.options(name=_registry_name(self.app_name), namespace=NAMESPACE, lifetime="detached",
                                         get_if_exists=True).remote()

    def __serve_build_asgi_app__(self):
        """The HTTP API (Serve calls this after __init__)."""
        from runtime.http_api import make_app
        return make_app(lambda: self.server, model_name=lambda: self.model_name or "",
                        anonymous_tenant=self.anonymous_tenant)

    def reconfigure(self, config: dict) -> None:
        """The deployment's user_config: the SLOs (runtime.server.slos_of). The first builds the
        server; later ones apply live. A bad later config is refused and recorded in status, and
        the replica keeps serving the SLOs it has."""
        if self.server is not None:
            try:
                self.server.reconfigure(config)
            except ValueError as err:
                log.error("refused user_config: %s", err)
            return
        from runtime.limits import Limits
        from runtime.metrics import Metrics
        from runtime.server import Server

        metrics = Metrics(serve_metrics.Counter, serve_metrics.Gauge, serve_metrics.Histogram)
        args = {k: v for k, v in self.args.items() if k != "front"}
        try:  # what this rank served before: a replica replacing one that died carries on from it
            restored = ray.get(self.registry.restore.remote(self.replica, _rank(serve.get_replica_context())),
                               timeout=30)
        except Exception:
            log.warning("the registry did not answer; starting afresh", exc_info=True)
            restored = {"desired": None, "free": None}
        if restored["free"] is not None:
            self.applied, args["free_bytes"] = restored["free"]
        self.restored = restored["desired"]
        if self.restored is not None:
            log.info("restoring rank state %s", self.restored)
        self.server = Server(self.args["front"], config, limits=Limits(**self.limits), metrics=metrics,
                             start_plan=self.restored and self.restored["plan_id"], **args)
        self.model_name = self.model_name or self.server.session.identity.model
        threading.Thread(target=self._report, daemon=True, name="report").start()

    def _report(self) -> None:
        """Every tick: this replica's status to the registry; a free-memory value set since, applied."""
        while self.server is not None and self.server.executor.serving:
            try:
                status = self.status()
                given = ray.get(self.registry.beat.remote(self.replica, status), timeout=30)
                if given is not None and given[0] > self.applied:
                    self.server.set_free_memory(given[1])
                    self.server.tick()
                    self.applied = given[0]
                    self.free_memory_changes += 1
            except Exception:  # the registry may be gone for a moment (qos stop); keep serving
                log.warning("reporting to the registry failed", exc_info=True)
            time.sleep(self.server.tick_s if self.server is not None else 1.0)

    def check_health(self) -> None:
        if self.server is not None and not self.server.healthy():
            raise RuntimeError("the serving loop has stopped")

    # --- handle methods (qos submit/status, Python clients) ---------------------------------------
    def status(self) -> dict:
        if self.server is None:
            raise ValueError("the replica is starting (no SLOs configured yet)")
        return self.server.status() | {"replica": self.replica, "app": self.app_name,
                                       "rank": _rank(serve.get_replica_context()),
                                       "free_memory_version": self.applied,
                                       "free_memory_changes": self.free_memory_changes, "restored": self.restored}

    async def generate(self, tenant: str, prompt: str, max_new_tokens: int = 32, **sampling) -> dict:
        from runtime.http_api import _awaitable

        req = self.server.submit(tenant, prompt, max_new_tokens, **sampling)
        await _awaitable(req)
        return req.result(0)

    async def stream(self, tenant: str, prompt: str, max_new_tokens: int = 32, **sampling):
        from runtime.http_api import _pieces

        req = self.server.submit(tenant, prompt, max_new_tokens, **sampling)
        pieces = _pieces(self.server, req)
        try:
            while (piece := await pieces.get()) is not None:
                if isinstance(piece, BaseException):
                    raise piece
                yield piece
        finally:
            req.cancel()

    def __del__(self):
        """Serve stops the replica: answer what it accepted, leave the registry."""
        if self.server is not None:
            self.server.stop()
            with contextlib.suppress(Exception):
                self.registry.forget.remote(self.replica)


def build(args: dict):
    """The application from a Serve config's `args` (see ARGS; `slos`/`slo_file` give the default
    user_config, the config's own `user_config` overrides it; `limits` take runtime.limits.Limits'
    fields)."""
    args = dict(args or {})
    unknown = sorted(set(args) - ARGS)
    if unknown:
        raise ValueError(f"unknown application args {', '.join(unknown)}; allowed: {', '.join(sorted(ARGS))}")
    if "front" not in args:
        raise ValueError("the application needs args.front: a profile CSV measured with qos profile or qos search")
    options = {}
    if "slos" in args or "slo_file" in args:
        options["user_config"] = {k: args.pop(k) for k in ("slos", "slo_file") if k in args}
    if "num_replicas" in args:
        options["num_replicas"] = args.pop("num_replicas")
    num_gpus = args.pop("num_gpus", None)
    if num_gpus:
        options["ray_actor_options"] = {"num_gpus": num_gpus, "num_cpus": 1}
    return QosServer.options(**options).bind(args.pop("front"), **args)


# --- Serve's HTTP proxy: a replica that died is a 503 to retry ----------------------------------------
class ReplicaLostMiddleware:
    """ASGI middleware for Serve's HTTP proxy. When the replica serving a request dies, the proxy
    ends the request without an answer (the client sees a bare 500, or a stream cut short); this
    answers instead with a 503 in OpenAI's error format and a Retry-After header, or ends a
    server-sent event stream with an error event. Any request that ends unanswered is answered so."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = {"started": False, "ended": False, "events": False}

        async def watch(message):
            if message["type"] == "http.response.start":
                seen["started"] = True
                seen["events"] = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                     for k, v in message.get("headers", ()))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                seen["ended"] = True
            await send(message)

        await self.app(scope, receive, watch)
        if seen["ended"] or (seen["started"] and not seen["events"]):
            return  # answered; or a plain body cut short, which nothing can mend
        error = {"error": {"message": "the replica serving this request stopped before answering (Serve "
                                      "replaces one that died); retry", "type": "unavailable", "param": None,
                           "code": None}}
        body = json.dumps(error).encode()
        try:
            if seen["started"]:  # a stream: an error event ends it, as the HTTP API ends a failed one
                await send({"type": "http.response.body", "body": b"data: " + body + b"\n\n", "more_body": False})
            else:
                await send({"type": "http.response.start", "status": 503, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(RETRY_AFTER_S).encode())]})
                await send({"type": "http.response.body", "body": body, "more_body": False})
        except Exception:  # the client is gone too
            pass


def proxy_middlewares() -> list:
    """What Serve's HTTP proxies wrap their app in (named by RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH,
    which write_config puts in the Serve controller's environment)."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaLostMiddleware)]


# --- writing and deploying a Serve config ---------------------------------------------------------
def write_config(path: str | Path, *, front: str, slos: str, watch_slos: bool = False, app: str = DEFAULT_APP,
                 replicas: int = 1, max_replicas: int | None = None, num_gpus: float = 0, host: str = "127.0.0.1",
                 port: int = 8000, **args) -> dict:
    """A Serve config for `serve run`/`serve deploy`/`qos serve --config`: the SLO file inline as
    the user_config (or, with watch_slos, its path, re-read when it changes). max_replicas: Serve
    autoscales between `replicas` and it, aiming at a full decoder's worth of requests per replica."""
    from catalog.slo import load_slos

    spec = load_slos(slos)  # a bad file fails here, not inside the cluster
    if args.get("anonymous_tenant") is not None:
        spec.tenant(args["anonymous_tenant"])  # an unknown tenant is a clear error
    user_config = ({"slo_file": str(Path(slos).resolve())} if watch_slos
                   else {"slos": yaml.safe_load(Path(slos).read_text())})
    app_args = {"front": str(Path(front).resolve())} | {k: v for k, v in args.items() if v is not None}
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": port},
        # Serve's HTTP proxies (started by the controller, with its environment) answer a request whose
        # replica died with a 503 to retry (proxy_middlewares)
        "controller_options": {"runtime_env": {"env_vars": {PROXY_CALLBACK: f"{__name__}:proxy_middlewares"}}},
        "applications": [{
            "name": app, "route_prefix": "/", "import_path": "runtime.ray_app:build", "args": app_args,
            "deployments": [{"name": DEPLOYMENT, "num_replicas": replicas, "user_config": user_config,
                             "ray_actor_options": {"num_cpus": 1, "num_gpus": num_gpus}}],
        }],
    }
    if max_replicas is not None:
        if max_replicas < replicas:
            raise ValueError(f"max_replicas ({max_replicas}) must be at least replicas ({replicas})")
        deployment = config["applications"][0]["deployments"][0]
        del deployment["num_replicas"]  # Serve takes one or the other
        per_replica = (args.get("limits") or {}).get("max_seqs", 16)
        deployment["autoscaling_config"] = {"min_replicas": replicas, "max_replicas": max_replicas,
                                            "target_ongoing_requests": per_replica}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
    return config


def deploy(path: str | Path, *, wait_s: float = 900.0) -> list[str]:
    """Deploy a Serve config file (as `serve run`/`serve deploy` do) and wait until its applications
    run; the names of the applications. A failed deployment is one line saying why."""
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    try:
        config = ServeDeploySchema.model_validate(yaml.safe_load(Path(path).read_text()))
    except OSError as err:
        raise ValueError(f"cannot read Serve config {path}: {err.strerror}") from None
    except Exception as err:
        raise ValueError(f"{path}: not a Serve config: {_one_line(err)}") from None
    client = serve_api.serve_start(http_options=config.http_options.model_dump(),
                                   proxy_location=config.proxy_location, controller_options=config.controller_options)
    client.deploy_apps(config, _blocking=False)
    names = [a.name for a in config.applications]
    deadline = time.time() + wait_s
    while True:
        apps = serve.status().applications
        states = {n: apps[n] for n in names if n in apps}
        if len(states) == len(names) and all(s.status == "RUNNING" for s in states.values()):
            return names
        failed = [s for s in states.values() if s.status in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed:
            raise ValueError(f"deploying {path} failed: {_why(failed[0])}")
        if time.time() > deadline:
            raise ValueError(f"{path} was not running after {wait_s:.0f} s; see `serve status`")
        time.sleep(0.5)


def _why(app_status) -> str:
    # a failed deployment's message holds the cause (the replica's traceback); the application's
    # only says which deployments failed
    messages = [d.message for d in app_status.deployments.values()] + [app_status.message]
    for message in messages:  # the last line of the first message that says something
        for line in reversed((message or "").strip().splitlines()):
            if line.strip() and not line.startswith(" "):
                return line.strip()[:500]
    return app_status.status


# --- clients ----------------------------------------------------------------------------------------
def connect(address: str | None = None) -> None:
    """Join a running Ray cluster (`ray start --head`; "auto" finds a local one)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address in (None, "auto") and _loopback_address(_found_address()):
        _single_machine()  # the cluster listens on loopback only: join it there
    try:
        ray.init(address=address or "auto", namespace=NAMESPACE, log_to_driver=False)
    except ConnectionError as err:
        raise ValueError(f"no Ray cluster at {address or 'auto'}: start one with `ray start --head`, or pass "
                         f"--address ({err})") from None


def free_port() -> int:
    """A TCP port free on the loopback now (for a test's or the demo's HTTP API)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cluster_gpus() -> float:
    return ray.cluster_resources().get("GPU", 0)


def handle(app: str = DEFAULT_APP):
    try:
        return serve.get_app_handle(app)
    except Exception:  # RayServeException when no such application runs
        raise ValueError(f"no moe-qos application named {app!r} is running: start one with `qos serve`") from None


def _lost(err: BaseException) -> ReplicaLost:
    return ReplicaLost(f"the replica serving this request died before answering ({type(err).__name__}); Serve "
                       f"replaces it: retry")


def result(response, timeout_s: float | None = None):
    """A handle call's value; a ValueError the server raised comes back as one line, a replica that
    died before answering as ReplicaLost (retry)."""
    try:
        return response.result(timeout_s=timeout_s)
    except ray.exceptions.RayActorError as err:
        raise _lost(err) from None
    except ray.exceptions.RayTaskError as err:
        cause = err.as_instanceof_cause()
        raise (ValueError(_one_line(cause.__cause__ or cause)) if isinstance(cause, ValueError) else cause) from None
    except ValueError as err:
        raise ValueError(_one_line(err)) from None


def generate_all(app_handle, requests: list[tuple[str, str, int]]) -> list[dict]:
    """Send (tenant, prompt, max_new_tokens) requests at once; their results in order."""
    responses = [app_handle.generate.remote(*r) for r in requests]
    return [result(r) for r in responses]


def stream(app_handle, tenant: str, prompt: str, max_new_tokens: int = 32, **sampling):
    """The request's text piece by piece as the server makes it."""
    try:
        yield from app_handle.options(stream=True).stream.remote(tenant, prompt, max_new_tokens, **sampling)
    except ray.exceptions.RayActorError as err:
        raise _lost(err) from None
    except ray.exceptions.RayTaskError as err:
        cause = err.as_instanceof_cause()
        raise (ValueError(_one_line(cause)) if isinstance(cause, ValueError) else cause) from None


def _registry(app: str):
    try:
        return ray.get_actor(_registry_name(app), namespace=NAMESPACE)
    except ValueError:
        raise ValueError(f"no moe-qos application named {app!r} has reported: start one with `qos serve`") \
            from None


def statuses(app: str = DEFAULT_APP, *, free_bytes: int | None = None, set_free: bool = False,
             replica: str | None = None, wait_s: float = 60.0) -> list[dict]:
    """Every live replica's status. set_free: first give the replicas (or one) a simulated free
    memory (None: stop simulating), and wait until each has applied it."""
    registry = _registry(app)
    running = _running_replicas(app)
    if set_free:
        version = ray.get(registry.set_free_memory.remote(free_bytes, replica))
    deadline = time.time() + wait_s
    while True:
        got = ray.get(registry.statuses.remote(max_age_s=STALE_S))
        pending = [s for s in got if set_free and (replica in (None, s["replica"]))
                   and s["free_memory_version"] < version]
        if got and len(got) >= running and not pending:
            return got
        if time.time() > deadline:
            if got:
                return got
            raise ValueError(f"no replica of {app!r} reported within {wait_s:.0f} s; see `serve status`")
        time.sleep(0.2)


def _running_replicas(app: str) -> int:
    apps = serve.status().applications
    if app not in apps or DEPLOYMENT not in apps[app].deployments:
        raise ValueError(f"no moe-qos application named {app!r} is running: start one with `qos serve`")
    return apps[app].deployments[DEPLOYMENT].replica_states.get("RUNNING", 0)


def stop(app: str = DEFAULT_APP) -> None:
    """Delete the application (each replica answers what it accepted) and its registry."""
    if app not in serve.status().applications:
        raise ValueError(f"no moe-qos application named {app!r} is running")
    serve.delete(app)
    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(_registry_name(app), namespace=NAMESPACE))


# Ray binds its servers (GCS, raylet, object manager, agents, workers, metrics) to loopback only when
# the node's address is loopback, and on Linux takes 127.0.0.1 as that address only in its
# single-machine mode, this variable at 0 (`--node-ip-address 127.0.0.1` and `_node_ip_address` are
# replaced by the machine's address). The mode also refuses other nodes: a cluster of several
# machines names its addresses.
SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _single_machine() -> tuple[str | None, bool]:
    """Put this process, and the Ray processes it starts, in Ray's single-machine mode; what it
    replaced (for _restore). Ray read the variable when it was imported: its constant is set too."""
    from ray._private import ray_constants

    saved = os.environ.get(SINGLE_MACHINE), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_MACHINE] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    return saved


def _restore(saved: tuple[str | None, bool]) -> None:
    from ray._private import ray_constants

    if saved[0] is None:
        os.environ.pop(SINGLE_MACHINE, None)
    else:
        os.environ[SINGLE_MACHINE] = saved[0]
    ray_constants.ENABLE_RAY_CLUSTER = saved[1]


def _found_address() -> str | None:
    """The address `ray.init(address="auto")` would join (RAY_ADDRESS, else the last `ray start`'s)
    as recorded, before Ray replaces a loopback host by the machine's address; None: none found."""
    from ray._private.services import get_ray_address_from_environment

    try:
        return get_ray_address_from_environment("auto", None)
    except (ConnectionError, OSError):
        return None  # ray.init says so


def _loopback_address(address: str | None) -> bool:
    """Whether a cluster address (host:port) is on loopback: a cluster started in single-machine mode."""
    host = (address or "").rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def local_cluster(**init_kwargs):
    """A Ray cluster of this process only (demo, tests), its files in a short temporary folder
    (Ray's socket paths have a length limit), removed afterwards. Every listener of it binds
    loopback (Ray's single-machine mode) unless `_node_ip_address` names an address."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ["RAY_AUTH_MODE"] == "disabled":
        _warn_once("local Ray cluster without token auth (RAY_AUTH_MODE=disabled): each Serve replica's gRPC "
                   "port listens on all interfaces and runs what any host sends it while the cluster lives")
    saved = None if "_node_ip_address" in init_kwargs else _single_machine()
    temps = []
    try:
        # Ray gives its raylet a fixed 30 s to register; a loaded 2-core machine has missed that
        # once (CI): a node that timed out at startup is started once more, from a fresh folder
        for attempt in (1, 2):
            temps.append(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
            try:
                ray.init(address="local", namespace=NAMESPACE, _temp_dir=temps[-1], include_dashboard=False,
                         log_to_driver=False, **init_kwargs)
                break
            except Exception as e:
                if attempt == 2 or "timed out during startup" not in str(e):
                    raise
                log.warning("the local Ray node timed out at startup (%s); starting it again", e)
                ray.shutdown()
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
    finally:
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)
        if saved is not None:
            _restore(saved)
