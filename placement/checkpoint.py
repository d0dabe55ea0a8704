"""Local Hugging Face checkpoints (safetensors) read without holding their weights in RAM.

`SafetensorsIndex` checks every `*.safetensors` file of a folder once (with safetensors' own
reader: a truncated or corrupt file is a one-line `CheckpointError` naming it) and serves any
tensor as a zero-copy view of a read-only memory map: its pages live in the page cache, file-backed,
never pinned nor anonymous, and the kernel drops them under memory pressure.

`load_checkpoint` builds the model with its routed experts on the meta device, copies the other
weights from the maps straight to the accelerator, and returns `CheckpointMasters`, the experts'
source for the engine (one expert read from the maps when it is placed or quantized).

Checkpoint names: transformers 5.x saves Mixtral's experts per expert as
`model.layers.N.block_sparse_moe.experts.E.w1|w3|w2.weight` (gate, up, down) and its router as
`block_sparse_moe.gate`; Qwen-MoE and OLMoE as `model.layers.N.mlp.experts.E.gate_proj|up_proj|
down_proj.weight`; a checkpoint saved fused keeps `mlp.experts.gate_up_proj` and `down_proj`.
"""

from __future__ import annotations

import json
import mmap
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from placement.plan import ExpertId

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
# checkpoint name -> model parameter name, per family, where transformers renames on loading
RENAMES = {"mixtral": ((".block_sparse_moe.", ".mlp."),)}
# per-expert names: (gate, up, down) under `<moe block>.experts.E.`
EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}
DEFAULT_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: one line naming the file."""


def looks_like_path(name: str) -> bool:
    """Whether `name` names a local folder rather than a hub id ('org/model')."""
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        return True
    return Path(name).parent.is_dir()  # 'models/mixtral' with a models/ folder here


def check_dir(path: Path) -> None:
    if not path.is_dir():
        raise CheckpointError(f"no such directory: {path}")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face checkpoint folder")


class SafetensorsIndex:
    """Every tensor of a folder's safetensors files by name, as views of read-only memory maps."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.files = sorted(self.path.glob("*.safetensors"))
        if not self.files:
            raise CheckpointError(f"{self.path} has no *.safetensors files (only safetensors checkpoints are supported)")
        self.where: dict[str, tuple[int, str, list[int], int, int]] = {}  # name -> (file, dtype, shape, start, end)
        self.maps: list[mmap.mmap | None] = []
        for i, f in enumerate(self.files):
            header, base = self._check(f)
            for name, t in header.items():
                if name == "__metadata__":
                    continue
                start, end = t["data_offsets"]
                self.where[name] = (i, t["dtype"], t["shape"], base + start, base + end)
            self.maps.append(None)

    @staticmethod
    def _check(f: Path) -> tuple[dict, int]:
        """The file's header and where its data starts; a file safetensors cannot read (truncated,
        corrupt header) is a CheckpointError naming it."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(f), framework="pt"):
                pass
            with f.open("rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
        except (SafetensorError, OSError, ValueError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(f"corrupt or truncated checkpoint file {f}: {first}") from None
        return header, 8 + n

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def _map(self, i: int) -> mmap.mmap:
        if self.maps[i] is None:
            with self.files[i].open("rb") as fh:
                self.maps[i] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return self.maps[i]

    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy, read-only view of tensor `name` (do not write to it)."""
        i, dtype, shape, start, end = self.where[name]
        if dtype not in DTYPES:
            raise CheckpointError(f"{self.files[i]}: tensor {name} has dtype {dtype}, which is not supported")
        with warnings.catch_warnings():  # "non-writable buffer": we only read it
            warnings.simplefilter("ignore")
            raw = torch.frombuffer(self._map(i), dtype=torch.uint8, count=end - start, offset=start)
        return raw.view(DTYPES[dtype]).view(shape)

    def file_of(self, name: str) -> Path:
        return self.files[self.where[name][0]]


class CheckpointMasters:
    """An expert's 16-bit matrices read from the checkpoint's memory maps on each call. gate_up
    is assembled from the gate and up matrices (one expert's worth, transient)."""

    kind = "checkpoint"

    def __init__(self, index: SafetensorsIndex, family: str, layer_names: list[str], dtype: torch.dtype):
        self.index, self.family, self.layer_names, self.dtype = index, family, layer_names, dtype
        gate, up, down = EXPERT_NAMES.get(family, DEFAULT_EXPERT_NAMES)
        self.per_expert = (gate, up, down)
        for l in range(len(layer_names)):  # every expert's names are there, before any is needed
            self._names(ExpertId(l, 0))

    def _block(self, layer: int) -> str:
        """The checkpoint's name of MoE layer `layer`'s block (the model's name, or renamed back)."""
        name = self.layer_names[layer]
        for block in (c.removesuffix(".") for c in _candidates(name + ".", RENAMES.get(self.family, ()))):
            if f"{block}.experts.0.{self.per_expert[0]}.weight" in self.index or f"{block}.experts.gate_up_proj" in self.index:
                return block
        return name

    def _names(self, eid: ExpertId):
        block = self._block(eid.layer)
        fused = (f"{block}.experts.gate_up_proj", f"{block}.experts.down_proj")
        if all(n in self.index for n in fused):
            return fused
        names = tuple(f"{block}.experts.{eid.expert}.{n}.weight" for n in self.per_expert)
        missing = [n for n in names if n not in self.index]
        if missing:
            raise CheckpointError(f"{self.index.path}: no weights for expert {eid.expert} of layer {block} "
                                  f"(looked for {missing[0]})")
        return names

    def get(self, eid: ExpertId) -> tuple[torch.Tensor, torch.Tensor]:
        names = self._names(eid)
        if len(names) == 2:  # saved fused: [E, 2I, H] and [E, H, I]
            gate_up, down = (self.index.tensor(n)[eid.expert] for n in names)
        else:
            gate, up, down = (self.index.tensor(n) for n in names)
            gate_up = torch.cat([gate, up])  # [2I, H]
        return gate_up.to(self.dtype), down.to(self.dtype)

    def resident_bytes(self) -> int:
        return 0


def load_checkpoint(path: Path, config, dtype: torch.dtype, device: torch.device):
    """The model of the checkpoint in `path` (config already read) with its routed experts on the
    meta device and every other weight on `device`, and the experts' master source."""
    from transformers import AutoModelForCausalLM

    from placement.adapters import adapter_for
    from placement.masters import experts_on_meta

    index = SafetensorsIndex(path)
    with torch.device(device), experts_on_meta(config):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = adapter_for(config)
    blocks = adapter.moe_blocks(model)
    expert_params = {id(p) for _, b in blocks for p in b.experts.parameters()}
    renames = RENAMES.get(config.model_type, ())
    tied = getattr(config, "tie_word_embeddings", False)
    for name, param in model.named_parameters(remove_duplicate=True):
        if id(param) in expert_params:
            continue
        key = next((k for k in _candidates(name, renames) if k in index), None)
        if key is None and tied and name == "lm_head.weight":
            continue  # tied to the embedding, loaded with it
        if key is None:
            raise CheckpointError(f"{path}: the checkpoint has no weight for {name} (is it a {config.model_type} "
                                  "checkpoint with this config?)")
        src = index.tensor(key)
        if tuple(src.shape) != tuple(param.shape):
            raise CheckpointError(f"{index.file_of(key)}: {key} has shape {tuple(src.shape)}, the model expects "
                                  f"{tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(src)  # from the map straight to `device`, converting the dtype
    if tied:
        model.tie_weights()
    names = [f"model.layers.{i}.mlp" for i, _ in blocks]
    return model.eval(), CheckpointMasters(index, config.model_type, names, dtype)


def _candidates(name: str, renames) -> list[str]:
    out = [name]
    for ckpt, model in renames:
        if model in name:
            out.append(name.replace(model, ckpt))
    return out


def experts_bytes(masters: CheckpointMasters) -> int:
    """Bytes of every expert master in the checkpoint (what not holding them saves)."""
    total = 0
    for name, (_, dtype, shape, start, end) in masters.index.where.items():
        if ".experts." in name:
            total += end - start
    return total
