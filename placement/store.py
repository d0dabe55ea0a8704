"""The host side of the experts: every expert's 16-bit master, the quantized variants derived from it
on demand, and, for `cpu` offloading, the dequantized matrices the host computes with.

One packed buffer per (expert, precision, group size), pinned when there is CUDA, so any precision
can be re-derived and returning to an earlier plan quantizes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from placement.experts import expert_weights, tensor_bytes
from placement.packed import Layout, expert_layout, pack
from placement.plan import ExpertId
from placement.spec import ModelSpec

Key = tuple[ExpertId, int, int]  # (expert, bits, group size)


class ExpertStore:
    """Host buffers of every expert, by precision. `quantizer` provides quantize and dequantize
    (see hqq_backend); quantization runs on `quantize_on` (the accelerator when it is CUDA)."""

    def __init__(self, spec: ModelSpec, quantizer, *, pin: bool, quantize_on: torch.device):
        self.spec, self.quantizer, self.pin, self.quantize_on = spec, quantizer, pin, quantize_on
        self.masters: dict[ExpertId, torch.Tensor] = {}  # 16-bit packed buffers
        self.variants: dict[Key, torch.Tensor] = {}  # quantized packed buffers
        self._views: dict[Key, dict] = {}
        # `cpu` offload: a quantized host expert's matrices, dequantized on first use and kept while
        # the plan serves it so (hqq's CPU dequantization of a whole expert on every call costs far
        # more than the matmuls)
        self.dequantized: dict[Key, dict[str, torch.Tensor]] = {}

    def layout(self, bits: int, group_size: int) -> Layout:
        return expert_layout(self.spec.hidden, self.spec.intermediate, bits, self.spec.dtype, group_size)

    @property
    def dequantize(self):
        return self.quantizer.dequantize

    def add_master(self, eid: ExpertId, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Pack an expert's 16-bit matrices ([2I, H] gate_up, [H, I] down) as its master."""
        self.masters[eid] = pack(self.layout(16, 64), {"gate_up": gate_up, "down": down}, pin=self.pin)

    def has_variant(self, eid: ExpertId, bits: int, group_size: int) -> bool:
        return (eid, bits, group_size) in self.variants

    def buffer(self, eid: ExpertId, bits: int, group_size: int) -> tuple[torch.Tensor, bool]:
        """The buffer of `eid` at `bits`, quantizing from the master if it is not cached yet.
        Returns (buffer, whether it was quantized now)."""
        if bits == 16:
            return self.masters[eid], False
        key = (eid, bits, group_size)
        if key in self.variants:
            return self.variants[key], False
        master = self.layout(16, group_size).views(self.masters[eid])
        tensors = {}
        for name, _ in self.layout(bits, group_size).matrices:
            q = self.quantizer.quantize(master[name], bits, group_size, self.spec.dtype, self.quantize_on)
            tensors.update({f"{name}.{k}": v for k, v in q.items()})
        self.variants[key] = pack(self.layout(bits, group_size), tensors, pin=self.pin)
        return self.variants[key], True

    def views(self, eid: ExpertId, bits: int, group_size: int) -> dict:
        key = (eid, bits, group_size)
        if key not in self._views:
            buf, _ = self.buffer(eid, bits, group_size)
            self._views[key] = self.layout(bits, group_size).views(buf)
        return self._views[key]

    def host_weights(self, eid: ExpertId, bits: int, group_size: int) -> dict[str, torch.Tensor]:
        """The matrices a `cpu`-offloaded expert computes with: views of its 16-bit buffer, or its
        quantized variant dequantized once (exactly what dequantizing on every call gives)."""
        views = self.views(eid, bits, group_size)
        if bits == 16:
            return views
        key = (eid, bits, group_size)
        if key not in self.dequantized:
            self.dequantized[key] = expert_weights(self.layout(bits, group_size), views, self.dequantize)
        return self.dequantized[key]

    def keep_dequantized(self, keep: Callable[[Key], bool]) -> None:
        """Drop the dequantized matrices whose key `keep` rejects."""
        for key in [k for k in self.dequantized if not keep(k)]:
            del self.dequantized[key]

    # --- accounting -------------------------------------------------------------------------------
    def bytes_of(self, experts: Iterable[tuple[ExpertId, int]], group_size: int) -> int:
        """Packed bytes of (expert, bits) pairs (deriving missing variants)."""
        return tensor_bytes(self.buffer(eid, bits, group_size)[0] for eid, bits in experts)

    def dequantized_bytes(self) -> int:
        return tensor_bytes(t for w in self.dequantized.values() for t in w.values())

    def nbytes(self) -> int:
        """Everything held: masters, variants and dequantized matrices."""
        return tensor_bytes([*self.masters.values(), *self.variants.values()]) + self.dequantized_bytes()
