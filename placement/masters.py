"""Where the engine reads an expert's 16-bit weights (its master) from, one expert at a time.

A master source hands out `(gate_up [2I, H], down [H, I])` for an expert on demand and keeps as
little as it can resident:
- `ModelMasters`: the fused expert tensors of a model already in memory (tests, small models);
- `SeededMasters`: the random built-ins' experts, regenerated from a per-expert seed on each call
  (on the accelerator, where it is fast), so a 93 GB random model behaves like a checkpoint
  without one existing anywhere;
- `checkpoint.CheckpointMasters`: views of a checkpoint's safetensors files through memory maps
  (page cache: file-backed, never pinned, never copied whole).

`experts_on_meta` builds a model whose routed experts are on the meta device (no bytes), so
nothing materialises every master on the host before the engine places them.
"""

from __future__ import annotations

import hashlib
import importlib
from contextlib import contextmanager

import torch
from torch import nn

from placement.plan import ExpertId


class ModelMasters:
    """The fused experts of an in-memory model (moved to the host if they were elsewhere)."""

    kind = "model"

    def __init__(self, fused_modules: list[nn.Module]):
        self.tensors = []
        for fused in fused_modules:
            gate_up, down = fused.gate_up_proj, fused.down_proj
            if gate_up.is_meta or down.is_meta:
                raise ValueError("the model's experts have no weights (meta device): give the engine their "
                                 "master source (load_model(...).masters)")
            self.tensors.append((gate_up.detach().to("cpu"), down.detach().to("cpu")))

    def get(self, eid: ExpertId) -> tuple[torch.Tensor, torch.Tensor]:
        gate_up, down = self.tensors[eid.layer]
        return gate_up[eid.expert], down[eid.expert]

    def resident_bytes(self) -> int:
        """Anonymous host bytes the source holds (its tensors)."""
        return sum(t.numel() * t.element_size() for pair in self.tensors for t in pair)


def expert_seed(seed: int, eid: ExpertId) -> int:
    digest = hashlib.sha256(f"{seed}:{eid.layer}:{eid.expert}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class SeededMasters:
    """Random experts, each a function of (seed, layer, expert): normal(0, `std`) like transformers'
    initialisation, generated on `device` on every call and held nowhere."""

    kind = "seeded"

    def __init__(self, *, seed: int, hidden: int, intermediate: int, dtype: torch.dtype, device, std: float):
        self.seed, self.hidden, self.intermediate, self.dtype = seed, hidden, intermediate, dtype
        self.device, self.std = torch.device(device), std

    def get(self, eid: ExpertId) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator(device=self.device).manual_seed(expert_seed(self.seed, eid))
        H, I = self.hidden, self.intermediate

        def draw(*shape):
            return torch.randn(*shape, generator=g, device=self.device, dtype=torch.float32).mul_(self.std).to(self.dtype)

        gate_up = draw(2 * I, H)  # [2I, H]
        return gate_up, draw(H, I)  # [H, I]

    def resident_bytes(self) -> int:
        return 0


def experts_classes(model_type: str) -> list[type]:
    """The fused-experts module classes of a transformers model family."""
    mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return [c for n, c in vars(mod).items()
            if isinstance(c, type) and n.endswith("Experts") and issubclass(c, nn.Module)]


@contextmanager
def experts_on_meta(config):
    """Within the block, a model of `config`'s family builds its routed experts on the meta device
    (everything else where the surrounding device context says)."""
    classes = experts_classes(config.model_type)
    saved = {c: c.__init__ for c in classes}

    def on_meta(init):
        def wrapped(self, *args, **kwargs):
            with torch.device("meta"):
                init(self, *args, **kwargs)
        return wrapped

    for c in classes:
        c.__init__ = on_meta(saved[c])
    try:
        yield
    finally:
        for c, init in saved.items():
            c.__init__ = init


def fill_experts(blocks: list[nn.Module], source, device) -> None:
    """Give the (meta) fused experts of `blocks` real weights from `source` on `device`: the stock
    transformers model runs again (a baseline); `drop_experts` undoes it."""
    for l, block in enumerate(blocks):
        fused = block.experts
        E, two_i, H = fused.gate_up_proj.shape
        gate_up = torch.empty(E, two_i, H, dtype=fused.gate_up_proj.dtype, device=device)
        down = torch.empty(E, H, two_i // 2, dtype=fused.down_proj.dtype, device=device)
        for e in range(E):
            g, d = source.get(ExpertId(l, e))
            gate_up[e].copy_(g)
            down[e].copy_(d)
        fused.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
        fused.down_proj = nn.Parameter(down, requires_grad=False)


def drop_experts(blocks: list[nn.Module]) -> None:
    """Put the fused experts of `blocks` back on the meta device (their memory freed)."""
    for block in blocks:
        fused = block.experts
        fused.gate_up_proj = nn.Parameter(torch.empty_like(fused.gate_up_proj, device="meta"), requires_grad=False)
        fused.down_proj = nn.Parameter(torch.empty_like(fused.down_proj, device="meta"), requires_grad=False)
