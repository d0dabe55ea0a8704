"""The host side of the experts: where masters and quantized variants come from, and the host-tier
buffers the plan serves from.

Nothing here holds every expert. Masters come from a master source (masters.py: the model's own
tensors, a per-expert seed, or a checkpoint's memory maps) one expert at a time; quantized variants
are made from them by the quantizer, or read back from the on-disk variant cache (variants.py)
when an earlier run made them. What stays resident in host memory is:
- `host`: one packed buffer per host-tier expert at its plan precision (the fetch source; pinned
  when there is CUDA, at its exact size), set by `set_host` on each plan;
- `dequantized`: for `cpu` offloading, quantized host experts' matrices, dequantized on first use
  and kept while the plan serves them so;
- `variants`: only without a disk cache and without a host budget, every variant derived so far
  (so returning to an earlier plan quantizes nothing, as before the disk cache).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import torch

from placement.experts import expert_weights, tensor_bytes
from placement.packed import Layout, expert_layout, pack_into
from placement.plan import ExpertId
from placement.spec import ModelSpec

log = logging.getLogger(__name__)
Key = tuple[ExpertId, int, int]  # (expert, bits, group size)


def _cudart():
    try:
        return torch.cuda.cudart() if torch.cuda.is_available() else None
    except (RuntimeError, AttributeError, AssertionError):
        return None


class HostBuffers:
    """Host byte buffers, pinned at their exact size when asked: a plain allocation registered with
    CUDA (cudaHostRegister), not torch's pinned caching allocator, which rounds every block up to
    a power of two (a 352 MB 16-bit Mixtral expert would pin 512 MB) and keeps freed blocks."""

    def __init__(self, pin: bool):
        self.pin = pin
        self._registered: dict[int, int] = {}  # data_ptr -> bytes

    def empty(self, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if not self.pin:
            return buf
        cudart = _cudart()
        if cudart is not None and int(cudart.cudaHostRegister(buf.data_ptr(), nbytes, 0)) == 0:
            self._registered[buf.data_ptr()] = nbytes
            return buf
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def release(self, buf: torch.Tensor) -> None:
        """Unpin `buf` (call before dropping the last reference; no copy may be reading it)."""
        if self._registered.pop(buf.data_ptr(), None) is not None:
            cudart = _cudart()
            if cudart is not None:
                cudart.cudaHostUnregister(buf.data_ptr())

    def pinned_bytes(self) -> int:
        return sum(self._registered.values())


class MasterBuffers(Mapping):
    """Packed 16-bit master buffers by expert, built on access (nothing is kept)."""

    def __init__(self, store: ExpertStore):
        self.store = store

    def __getitem__(self, eid: ExpertId) -> torch.Tensor:
        return self.store.master_buffer(eid)

    def __iter__(self):
        spec = self.store.spec
        return (ExpertId(l, e) for l in range(spec.num_layers) for e in range(spec.num_experts))

    def __len__(self) -> int:
        return self.store.spec.num_layers * self.store.spec.num_experts


class ExpertStore:
    """Expert buffers by precision. `masters`: the master source; `quantizer` provides quantize and
    dequantize (see hqq_backend), run on `quantize_on` (the accelerator when it is CUDA); `disk`:
    the on-disk variant cache (or None); `keep_variants`: keep every derived variant in memory."""

    def __init__(self, spec: ModelSpec, quantizer, masters, *, pin: bool, quantize_on: torch.device,
                 disk=None, keep_variants: bool = True):
        self.spec, self.quantizer, self.source, self.pin, self.quantize_on = spec, quantizer, masters, pin, quantize_on
        self.disk, self.keep_variants = disk, keep_variants
        self.buffers = HostBuffers(pin)
        self.host: dict[Key, torch.Tensor] = {}  # host-tier experts of the plan
        self.variants: dict[Key, torch.Tensor] = {}  # derived variants kept in memory (keep_variants)
        self._views: dict[Key, dict] = {}
        self.dequantized: dict[Key, dict[str, torch.Tensor]] = {}
        self.quantized = 0  # experts quantized (quantizer calls per matrix: 2 each)
        self.masters = MasterBuffers(self)

    def layout(self, bits: int, group_size: int) -> Layout:
        return expert_layout(self.spec.hidden, self.spec.intermediate, bits, self.spec.dtype, group_size)

    @property
    def dequantize(self):
        return self.quantizer.dequantize

    # --- making buffers ------------------------------------------------------------------------
    def master(self, eid: ExpertId) -> dict[str, torch.Tensor]:
        gate_up, down = self.source.get(eid)
        return {"gate_up": gate_up, "down": down}

    def master_buffer(self, eid: ExpertId, out: torch.Tensor | None = None) -> torch.Tensor:
        """The 16-bit packed buffer of `eid` (in `out`, else a new unpinned host buffer)."""
        layout = self.layout(16, 64)
        return pack_into(layout, self.master(eid), out if out is not None else torch.empty(layout.nbytes, dtype=torch.uint8))

    def _quantize(self, eid: ExpertId, bits: int, group_size: int) -> torch.Tensor:
        """A new packed variant of `eid`, on the quantizing device."""
        master = self.master(eid)
        tensors = {}
        for name, _ in self.layout(bits, group_size).matrices:
            q = self.quantizer.quantize(master[name], bits, group_size, self.spec.dtype, self.quantize_on)
            tensors.update({f"{name}.{k}": v for k, v in q.items()})
        layout = self.layout(bits, group_size)
        buf = pack_into(layout, tensors, torch.empty(layout.nbytes, dtype=torch.uint8, device=self.quantize_on))
        self.quantized += 1
        if self.disk is not None:
            self.disk.save(eid, bits, group_size, layout, buf)
        return buf

    def has_variant(self, eid: ExpertId, bits: int, group_size: int) -> bool:
        """Whether `eid` at `bits` can be had without quantizing."""
        key = (eid, bits, group_size)
        return (bits == 16 or key in self.host or key in self.variants
                or (self.disk is not None and self.disk.has(eid, bits, group_size)))

    def _fill(self, eid: ExpertId, bits: int, group_size: int, out: torch.Tensor) -> bool:
        """Write `eid` at `bits` into `out` (host or accelerator); returns whether it was quantized."""
        key = (eid, bits, group_size)
        if bits == 16:
            self.master_buffer(eid, out)
            return False
        have = self.host.get(key)
        if have is None:
            have = self.variants.get(key)
        if have is not None:
            out.copy_(have)
            return False
        layout = self.layout(bits, group_size)
        if self.disk is not None:
            got = self.disk.load(eid, bits, group_size, layout)
            if got is not None:
                out.copy_(got)
                self._remember(key, got)
                return False
        buf = self._quantize(eid, bits, group_size)
        out.copy_(buf)
        self._remember(key, buf)
        return True

    def _remember(self, key: Key, buf: torch.Tensor) -> None:
        if self.keep_variants and key not in self.variants:
            self.variants[key] = buf.to("cpu", copy=True)

    def buffer(self, eid: ExpertId, bits: int, group_size: int) -> tuple[torch.Tensor, bool]:
        """The host buffer of `eid` at `bits`: the host-tier one if the plan keeps it there, else a
        new one (unpinned, not kept). Returns (buffer, whether it was quantized now)."""
        key = (eid, bits, group_size)
        if key in self.host:
            return self.host[key], False
        if key in self.variants:
            return self.variants[key], False
        buf = torch.empty(self.layout(bits, group_size).nbytes, dtype=torch.uint8)
        return buf, self._fill(eid, bits, group_size, buf)

    def to_device(self, eid: ExpertId, bits: int, group_size: int, device: torch.device) -> tuple[torch.Tensor, bool]:
        """A new buffer of `eid` at `bits` on `device`, made there without a pinned host copy.
        Returns (buffer, whether it was quantized now)."""
        buf = torch.empty(self.layout(bits, group_size).nbytes, dtype=torch.uint8, device=device)
        return buf, self._fill(eid, bits, group_size, buf)

    # --- the host tier -----------------------------------------------------------------------------
    def set_host(self, keys: Iterable[Key], progress: Callable | None = None) -> int:
        """Hold exactly `keys` as host buffers (pinned when pinning): drop the others first, then
        make the missing ones. No copy may be reading a dropped buffer (the engine synchronizes).
        `progress()` is called once per buffer made. Returns how many were quantized."""
        keys = set(keys)
        for key in [k for k in self.host if k not in keys]:
            buf = self.host.pop(key)
            self._views.pop(key, None)
            self.buffers.release(buf)
            del buf
        if self.pin and torch.cuda.is_available() and hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()  # blocks of torch's pinned allocator (the fallback), if any were freed
        quantized = 0
        for key in sorted(keys - self.host.keys()):
            eid, bits, gs = key
            buf = self.buffers.empty(self.layout(bits, gs).nbytes)
            quantized += self._fill(eid, bits, gs, buf)
            self.host[key] = buf
            self.variants.pop(key, None)  # the host buffer serves it now
            if progress is not None:
                progress()
        return quantized

    def views(self, eid: ExpertId, bits: int, group_size: int) -> dict:
        key = (eid, bits, group_size)
        if key not in self._views:
            buf, _ = self.buffer(eid, bits, group_size)
            if key not in self.host and key not in self.variants:
                return self.layout(bits, group_size).views(buf)  # transient: not cached
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
    def host_bytes(self) -> int:
        """Host-tier buffers and dequantized matrices: what the plan keeps resident on the host."""
        return tensor_bytes(self.host.values()) + self.dequantized_bytes()

    def pinned_bytes(self) -> int:
        return tensor_bytes(b for b in self.host.values() if self.pin)

    def dequantized_bytes(self) -> int:
        return tensor_bytes(t for w in self.dequantized.values() for t in w.values())

    def nbytes(self) -> int:
        """Everything held in host memory: host-tier buffers, in-memory variants, dequantized
        matrices and the masters' source's own tensors (memory maps and seeds hold none)."""
        return (tensor_bytes([*self.host.values(), *self.variants.values()]) + self.dequantized_bytes()
                + self.source.resident_bytes())
