"""The one place that assembles a model, its expert engine and a planner, for every command and
for the server: from a model identity (what a measured row records) and a device."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch

from catalog.data import calibration_text
from catalog.knobs import Knobs
from catalog.rows import ModelIdentity
from placement.adapters import adapter_for
from placement.engine import ApplyReport, Engine
from placement.models import LoadedModel, default_dtype, load_model
from placement.plan import Plan
from placement.planner import Planner
from placement.spec import ModelSpec

log = logging.getLogger(__name__)
DTYPES = ("bfloat16", "float16", "float32")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' or None: CUDA when present, else the CPU; asking for CUDA without it is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available on this machine")
    return device


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of auto, {', '.join(DTYPES)}")
    return getattr(torch, dtype)


@dataclass
class Session:
    """A loaded model under an engine, the identity rows record for it, and its planner."""

    identity: ModelIdentity  # dtype resolved, fingerprint filled in
    loaded: LoadedModel
    engine: Engine
    planner: Planner

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def spec(self) -> ModelSpec:
        return self.engine.spec

    def plan(self, knobs: Knobs) -> Plan:
        return self.planner.plan(knobs)

    def apply(self, plan: Plan) -> ApplyReport:
        return self.engine.apply(plan)


def open_session(identity: ModelIdentity, device=None, *, data: str | None = None, quantizer=None,
                 host_budget: int | None = None) -> Session:
    """Load the model `identity` names on `device` and put an engine in charge of its experts (no
    plan applied yet). A fingerprint in the identity must match the weights found. `quantizer`:
    the engine's (default: HQQ with its solver); its variants are cached on disk by the weights'
    fingerprint. `host_budget`: bytes the plans' host tier may hold (see Engine)."""
    device = resolve_device(device)
    dtype = resolve_dtype(identity.dtype, device)
    t0 = time.perf_counter()
    loaded = load_model(identity.model, layers=identity.layers, dtype=dtype, device=device,
                        seed=identity.model_seed)
    found = replace(identity, dtype=str(dtype).removeprefix("torch."), fingerprint=loaded.fingerprint)
    if identity.fingerprint is not None and identity.fingerprint != loaded.fingerprint:
        raise ValueError(f"the weights of {identity.model} have fingerprint {loaded.fingerprint}, not the "
                         f"{identity.fingerprint} the plans were measured on: another checkpoint or seed?")
    engine = Engine(loaded.model, accel=device, quantizer=quantizer, masters=loaded.masters,
                    fingerprint=loaded.fingerprint, host_budget=host_budget)
    log.info("loaded %s in %.1fs: %s", identity.describe(), time.perf_counter() - t0, engine.spec)
    # scored selections measure their scores on calibration text, read only when needed
    calib: list[int] = []

    def calib_ids() -> list[int]:
        if not calib:
            calib.extend(loaded.tokenizer.encode(calibration_text(identity.calib, data)))
        return calib

    return Session(found, loaded, engine, Planner(engine, identity.model, calib_ids))


def model_spec(identity: ModelIdentity, device=None) -> ModelSpec:
    """The shape facts of the model `identity` names, without its weights (built on the meta device)."""
    dtype = resolve_dtype(identity.dtype, resolve_device(device))
    loaded = load_model(identity.model, layers=identity.layers, dtype=dtype, device="meta", seed=identity.model_seed)
    return adapter_for(loaded.model.config).spec(loaded.model)


def identity_for(front: ModelIdentity | None, *, model: str | None = None, layers: int | None = None,
                 dtype: str | None = None, seed: int | None = None, calib: str | None = None,
                 source: str = "the front") -> ModelIdentity:
    """The model to serve: the front's own identity, with what a person asked for checked against
    it (a front rebuilds only on the model it was measured on). Without a front, what was asked."""
    if front is None:
        if model is None:
            raise ValueError("name a model (--model) or a front measured on one (--front)")
        return ModelIdentity(model, layers, None if dtype == "auto" else dtype, seed or 0, calib)
    # naming a model names its depth too (no --layers: all of them); other flags count when given
    asked = {"model": model, "dtype": None if dtype == "auto" else dtype, "model_seed": seed, "calib": calib}
    wrong = [f"{k} {v!r}" for k, v in asked.items() if v is not None and v != getattr(front, k)]
    if (model is not None or layers is not None) and layers != front.layers:
        wrong.append(f"{layers} layer{'s' if layers > 1 else ''}" if layers else "all layers")
    if wrong:
        raise ValueError(f"{source} was measured on {front.describe()}, not on {', '.join(wrong)}: "
                         "profile that model, or leave the model flags out to serve the front's own")
    return front
