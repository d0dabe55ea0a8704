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
    # where the engine reads expert masters from when the model's experts are on the meta device
    # (checkpoints, the full-size built-in); None: the model's own expert tensors
    masters: object | None = None


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


def recipe_fingerprint(name: str, config, seed: int, experts: str | None = None) -> str:
    """A random built-in: its name, shapes and seed (the weights follow from them), and how its
    experts are drawn when not by transformers' initialisation (`experts`)."""
    recipe = {k: getattr(config, k, None) for k in RECIPE_KEYS}
    extra = {"experts": experts} if experts else {}
    return _digest(json.dumps({"name": name, "seed": seed, **recipe, **extra}, sort_keys=True).encode())


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


def _random_model(config, dtype: torch.dtype, device: torch.device, seed: int, *, seeded_experts: bool = False):
    """A random model initialised on `device` (where it is fastest). `seeded_experts`: its routed
    experts stay on the meta device and come from a SeededMasters (regenerated per expert on
    demand), returned too (else None)."""
    from transformers import AutoModelForCausalLM

    from placement.masters import SeededMasters, experts_on_meta

    torch.manual_seed(seed)
    if not seeded_experts:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=dtype).eval(), None
    with torch.device(device), experts_on_meta(config):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    spec = adapter_for(config).spec(model)
    masters = SeededMasters(seed=seed, hidden=spec.hidden, intermediate=spec.intermediate, dtype=dtype,
                            device="cpu" if device.type == "meta" else device,
                            std=getattr(config, "initializer_range", 0.02))
    model.qos_masters = masters  # Engine(model) finds them there
    return model, masters


def load_model(name: str, *, layers: int | None = None, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None, seed: int = 0,
               seeded_experts: bool | None = None) -> LoadedModel:
    """Load `name` for inference, non-expert weights on `device` (the accelerator). Random built-ins
    are initialised there; `seeded_experts` (default: for mixtral-8x7b-shape) leaves their routed
    experts on the meta device, regenerated per expert on demand (`LoadedModel.masters`). Local
    checkpoints never materialise their experts: the engine reads them from memory maps."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(device)
    if layers is not None and layers < 1:
        raise ValueError(f"--layers must be >= 1, got {layers}")

    if name.startswith("tiny-random") or name == "mixtral-8x7b-shape":
        if name == "mixtral-8x7b-shape":
            config = _mixtral_shape_config(layers)
            seeded = True if seeded_experts is None else seeded_experts
        else:
            family = "mixtral" if name == "tiny-random" else name.removeprefix("tiny-random-")
            if family not in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
                raise ValueError(f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTINS)}")
            config = _tiny_config(family)
            if layers:
                config.num_hidden_layers = layers
            seeded = bool(seeded_experts)
        model, masters = _random_model(config, dtype, device, seed, seeded_experts=seeded)
        # seeded experts are drawn on the accelerator: other random numbers than the CPU's
        extra = f"seeded-experts:{'cpu' if device.type == 'meta' else device.type}" if seeded else None
        return LoadedModel(name, model, ByteTokenizer(config.vocab_size),
                           recipe_fingerprint(name, config, seed, extra), masters)

    path = REFERENCE_DIR if name == "reference" else Path(name).expanduser()
    if name == "reference" and not (path / "config.json").exists():
        raise ValueError(f"the reference model is missing: expected a checkpoint in {path}")
    if path.is_dir():
        return _load_local(path, layers, dtype, device)
    if "/" not in name:
        raise ValueError(
            f"unknown model {name!r}: not a local directory, not a hub id, not a built-in "
            f"({', '.join(BUILTINS)})"
        )
    from placement.checkpoint import looks_like_path

    if looks_like_path(name):
        raise ValueError(f"no such directory: {name}")
    return _load_pretrained(name, layers, dtype, device)


def _tokenizer(path: Path, vocab_size: int):
    """The checkpoint's tokenizer, or bytes as tokens when it has none (a checkpoint written by
    save_pretrained alone)."""
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        log.warning("%s has no tokenizer: using UTF-8 bytes as token ids", path)
        return ByteTokenizer(vocab_size)
    return HFTokenizer(AutoTokenizer.from_pretrained(str(path), local_files_only=True))


def _load_local(path: Path, layers: int | None, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """A local checkpoint folder: non-expert weights copied from its memory maps to `device`,
    experts left in the files for the engine (see checkpoint.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from placement.checkpoint import check_dir, load_checkpoint

    check_dir(path)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load a model config from {str(path)!r}: {str(err).splitlines()[0]}") from None
    adapter_for(config)  # fail early, naming the supported families
    if layers:
        config.num_hidden_layers = layers
    fp = checkpoint_fingerprint(path)
    if device.type == "meta":  # shapes only, e.g. to cost plans without reading the weights
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return LoadedModel(path.name, model.eval(), ByteTokenizer(max(config.vocab_size, 256)), fp)
    model, masters = load_checkpoint(path, config, dtype, device)
    model.qos_masters = masters  # Engine(model) finds them there
    return LoadedModel(path.name, model, _tokenizer(path, config.vocab_size), fp, masters)


def _load_pretrained(name_or_path: str, layers: int | None, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """A hub id (from the local Hugging Face cache or the hub), loaded whole by transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    local = os.path.isdir(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=local)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load a model config from {name_or_path!r}: {str(err).splitlines()[0]}") from None
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
