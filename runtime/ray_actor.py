"""The one module that imports ray: the Server as a named, detached Ray actor, and its clients."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import ray

NAMESPACE = "moe-qos"
DEFAULT_NAME = "moe-qos"
# Control calls run in a concurrency group of their own, so they answer at once however many
# requests are queued on the actor's request threads.
CONTROL = frozenset({"ready", "status", "tick", "set_free_memory", "stop"})


def _method(handle, name: str):
    method = getattr(handle, name)
    return method.options(concurrency_group="control") if name in CONTROL else method


def connect(address: str | None = None) -> None:
    """Join a running Ray cluster (`ray start --head`; "auto" finds a local one)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(address=address or "auto", namespace=NAMESPACE, log_to_driver=False)
    except ConnectionError as err:
        raise ValueError(f"no Ray cluster at {address or 'auto'}: start one with `ray start --head` "
                         f"(and RAY_AUTH_MODE=disabled for local use), or pass --address ({err})") from None


def serve(front: str, slos: str, *, name: str = DEFAULT_NAME, model: str | None = None, layers: int | None = None,
          device: str | None = None, tick_s: float = 1.0, free_bytes: int | None = None, data: str | None = None,
          num_gpus: float | None = None, limits=None, speed: str = "decode_tok_s"):
    """Start the server actor (detached: it outlives this process) and wait until it serves the
    model the front was measured on (`model`/`layers`, when given, must agree with it)."""
    from runtime.limits import Limits
    from runtime.server import Server

    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        pass  # the name is free
    else:
        raise ValueError(f"a server named {name!r} is already running; stop it or pick another --name")
    if num_gpus is None:
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 and device != "cpu" else 0
    actor_cls = ray.remote(concurrency_groups={"control": 4})(Server).options(
        name=name, namespace=NAMESPACE, lifetime="detached", max_concurrency=64, num_gpus=num_gpus, num_cpus=1)
    handle = actor_cls.remote(front, slos, model=model, layers=layers, device=device, tick_s=tick_s,
                              free_bytes=free_bytes, data=data, limits=limits or Limits(), speed=speed)
    try:
        ray.get(_method(handle, "ready").remote())
    except ray.exceptions.RayActorError as err:  # the constructor failed: say why in one line
        ray.kill(handle)
        cause = getattr(err, "cause", None) or err
        if isinstance(cause, ray.exceptions.RayTaskError):
            cause = cause.as_instanceof_cause()
        if isinstance(cause, ValueError):
            raise ValueError(str(cause).strip().splitlines()[-1]) from None
        raise
    return handle


def server(name: str = DEFAULT_NAME):
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        raise ValueError(f"no server named {name!r} in namespace {NAMESPACE!r}: start one with `qos serve`") from None


def call(handle, method: str, *args, **kwargs):
    """A remote call whose errors come back as the server raised them (ValueError for bad input)."""
    return result(_method(handle, method).remote(*args, **kwargs))


def result(ref):
    """The value of a remote call; a ValueError the server raised comes back as one line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = err.as_instanceof_cause()
        raise (ValueError(str(cause.__cause__ or cause).strip().splitlines()[-1]) if isinstance(cause, ValueError)
               else cause) from None


def generate_all(handle, requests: list[tuple[str, str, int]]) -> list[dict]:
    """Send (tenant, prompt, max_new_tokens) requests at once; their results in order."""
    refs = [handle.generate.remote(*r) for r in requests]
    return [result(ref) for ref in refs]


def stream(handle, tenant: str, prompt: str, max_new_tokens: int = 32, **sampling):
    """The request's text piece by piece as the server makes it (a streaming generator call)."""
    for ref in handle.stream.options(num_returns="streaming").remote(tenant, prompt, max_new_tokens, **sampling):
        yield result(ref)


def stop(name: str = DEFAULT_NAME) -> None:
    handle = server(name)
    try:
        ray.get(_method(handle, "stop").remote())
    finally:
        ray.kill(handle)


@contextlib.contextmanager
def local_cluster(**init_kwargs):
    """A Ray cluster of this process only (demo, tests), its files in a short temporary folder
    (Ray's socket paths have a length limit), removed afterwards."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(namespace=NAMESPACE, _temp_dir=temp, include_dashboard=False, log_to_driver=False, **init_kwargs)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@contextlib.contextmanager
def running(name: str, *args, **kwargs):
    """`serve(*args, name=name, **kwargs)` for the length of a with-block, stopped afterwards."""
    handle = serve(*args, name=name, **kwargs)
    try:
        yield handle
    finally:
        stop(name)
