"""Loading models by name: built-ins that need no download, the bundled reference model, or any
local Hugging Face directory / hub id of a supported MoE family."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from placement.adapters import adapter_for

log = logging.getLogger(__name__)

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
BUILTINS = ("tiny-random", "tiny-random-qwen2_moe", "tiny-random-qwen3_moe", "tiny-random-olmoe",
            "mixtral-8x7b-shape", "reference")


class ByteTokenizer:
    """UTF-8 bytes as token ids, for the random-weight built-ins (which have no vocabulary)."""

    def __init__(self, vocab_size: int):
        if vocab_size < 256:
            raise ValueError(f"a byte tokenizer needs a vocabulary of at least 256, got {vocab_size}")
        self.vocab_size = vocab_size
        self.eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A transformers tokenizer behind the same two calls as ByteTokenizer."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_token_id = tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False, verbose=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


@dataclass
class LoadedModel:
    name: str
    model: nn.Module
    tokenizer: ByteTokenizer | HFTokenizer
    fingerprint: str  # of the weights' source: see fingerprint()


# What makes a random built-in's weights: its recipe (family and shapes) and the seed. The layer
# count is not part of it (a model identity records it apart).
RECIPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
               "num_attention_heads", "num_key_value_heads", "num_local_experts", "num_experts",
               "num_experts_per_tok", "shared_expert_intermediate_size")


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()[:16]


def recipe_fingerprint(name: str, config, seed: int) -> str:
    """A random built-in: its name, shapes and seed (the weights follow from them)."""
    recipe = {k: getattr(config, k, None) for k in RECIPE_KEYS}
    return _digest(json.dumps({"name": name, "seed": seed, **recipe}, sort_keys=True).encode())


def checkpoint_fingerprint(path: Path) -> str:
    """A checkpoint folder: its config.json and, per safetensors file, its size, header (names,
    shapes, dtypes, offsets) and first MiB of weights; cheap even for a 93 GB checkpoint."""
    parts = [(path / "config.json").read_bytes()]
    for f in sorted(path.glob("*.safetensors")):
        with f.open("rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            parts += [f.name.encode(), str(f.stat().st_size).encode(), fh.read(min(n, 1 << 26)), fh.read(1 << 20)]
    return _digest(*parts)


def _tiny_config(family: str):
    from transformers import AutoConfig

    common = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, num_experts_per_tok=2,
                  tie_word_embeddings=False)
    if family == "mixtral":
        return AutoConfig.for_model("mixtral", intermediate_size=128, num_local_experts=8, **common)
    if family == "olmoe":
        return AutoConfig.for_model("olmoe", intermediate_size=128, num_experts=8, **common)
    # Qwen MoE families: routed experts use moe_intermediate_size; layer 1 of 3 is dense to
    # exercise models whose MoE layers are not every layer.
    extra = dict(moe_intermediate_size=128, intermediate_size=192, num_experts=8,
                 mlp_only_layers=[1], **{**common, "num_hidden_layers": 3})
    if family == "qwen2_moe":
        extra["shared_expert_intermediate_size"] = 96
    return AutoConfig.for_model(family, **extra)


def _mixtral_shape_config(layers: int | None):
    from transformers import AutoConfig

    # Mixtral-8x7B-v0.1's config.json, without the weights.
    return AutoConfig.for_model(
        "mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=layers or 32, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=32768, num_local_experts=8, num_experts_per_tok=2,
        rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False,
    )


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 where it is fast (CUDA); fp32 on CPUs, many of which emulate bf16 matmuls slowly.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _random_model(config, dtype: torch.dtype, device: torch.device, seed: int) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):  # initialise where it is fastest; the engine moves experts to the host
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def load_model(name: str, *, layers: int | None = None, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None, seed: int = 0) -> LoadedModel:
    """Load `name` for inference. Random built-ins are initialised on `device` (the accelerator);
    checkpoints load on the host, and the engine places their weights."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(device)
    if layers is not None and layers < 1:
        raise ValueError(f"--layers must be >= 1, got {layers}")

    if name.startswith("tiny-random"):
        family = "mixtral" if name == "tiny-random" else name.removeprefix("tiny-random-")
        if family not in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
            raise ValueError(f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTINS)}")
        config = _tiny_config(family)
        if layers:
            config.num_hidden_layers = layers
        model = _random_model(config, dtype, device, seed)
        return LoadedModel(name, model, ByteTokenizer(config.vocab_size), recipe_fingerprint(name, config, seed))
    if name == "mixtral-8x7b-shape":
        config = _mixtral_shape_config(layers)
        model = _random_model(config, dtype, device, seed)
        return LoadedModel(name, model, ByteTokenizer(config.vocab_size), recipe_fingerprint(name, config, seed))

    path = REFERENCE_DIR if name == "reference" else Path(name)
    if name == "reference" and not (path / "config.json").exists():
        raise ValueError(f"the reference model is missing: expected a checkpoint in {path}")
    return _load_pretrained(str(path) if path.exists() else name, layers, dtype, device)


def _load_pretrained(name_or_path: str, layers: int | None, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    local = os.path.isdir(name_or_path)
    if not local and "/" not in name_or_path:
        raise ValueError(
            f"unknown model {name_or_path!r}: not a local directory, not a hub id, not a built-in "
            f"({', '.join(BUILTINS)})"
        )
    try:
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=local)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load a model config from {name_or_path!r}: {err}") from None
    adapter_for(config)  # fail early, naming the supported families
    if layers:
        config.num_hidden_layers = layers
    if device.type == "meta":  # shapes only, e.g. to cost plans without reading the weights
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, config=config, dtype=dtype,
                                                     local_files_only=local)
    tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local)
    fp = checkpoint_fingerprint(Path(name_or_path)) if local else _digest(f"hub:{name_or_path}".encode())
    return LoadedModel(Path(name_or_path).name, model.eval(), HFTokenizer(tok), fp)
