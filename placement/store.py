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

import ctypes
import logging
import math
import mmap
import time
import weakref
from collections import deque
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


PAGE = 4096


class HostBuffers:
    """Host byte buffers, pinned at their exact size when asked: anonymous mappings of whole pages
    registered with CUDA (cudaHostRegister), not torch's pinned caching allocator, which rounds every
    block up to a power of two (a 352 MB 16-bit Mixtral expert would pin 512 MB) and keeps freed
    blocks.

    Each buffer has pages of its own (CUDA registers pages: a buffer sharing one with a registered
    buffer fails as "already mapped"), and what is still registered when the HostBuffers goes (an
    engine dropped without releasing its host tier) is unregistered then: a registration outliving
    its memory made a later allocation at the same address fail to register, and CUDA reported that
    failure at the next, unrelated kernel launch."""

    def __init__(self, pin: bool):
        self.pin = pin
        self._registered: dict[int, tuple[int, mmap.mmap]] = {}  # data_ptr -> (bytes, its mapping)
        weakref.finalize(self, _unregister_all, self._registered)

    def empty(self, nbytes: int) -> torch.Tensor:
        if not self.pin:
            return torch.empty(nbytes, dtype=torch.uint8)
        cudart = _cudart()
        if cudart is not None:
            size = max(-(-nbytes // PAGE) * PAGE, PAGE)
            pages = mmap.mmap(-1, size)
            buf = torch.frombuffer(pages, dtype=torch.uint8)[:nbytes]  # (the tensor keeps the mapping)
            if int(cudart.cudaHostRegister(buf.data_ptr(), size, 0)) == 0:
                self._registered[buf.data_ptr()] = (nbytes, pages)  # (the buffer's bytes; under a page more is pinned)
                return buf
            _clear_cuda_error()  # or the next kernel launch reports this failure as its own
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def release(self, buf: torch.Tensor) -> None:
        """Unpin `buf` (call before dropping the last reference; no copy may be reading it)."""
        if self._registered.pop(buf.data_ptr(), None) is not None:
            cudart = _cudart()
            if cudart is not None:
                cudart.cudaHostUnregister(buf.data_ptr())

    def pinned_bytes(self) -> int:
        return sum(n for n, _ in self._registered.values())


def _clear_cuda_error() -> None:
    """Reset CUDA's last error (torch's cudart binding lacks cudaGetLastError: call the runtime the
    process has loaded)."""
    try:
        with open("/proc/self/maps") as f:
            path = next(line.split()[-1] for line in f if "libcudart.so" in line)
        ctypes.CDLL(path).cudaGetLastError()
    except (OSError, StopIteration, AttributeError):
        pass


def _unregister_all(registered: dict) -> None:
    cudart = _cudart()
    for ptr in list(registered):
        if cudart is not None:
            cudart.cudaHostUnregister(ptr)
        registered.pop(ptr, None)


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
        self.quantize_s = 0.0  # seconds spent making them (masters, solver, packing)
        self.max_batch: int | None = None  # experts quantized together (None: see _batch)
        self._writer = None  # the disk cache's writer thread, started on the first variant made
        self._writes: deque = deque()  # its saves not known to be done
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

    def has_variant(self, eid: ExpertId, bits: int, group_size: int) -> bool:
        """Whether `eid` at `bits` can be had without quantizing."""
        key = (eid, bits, group_size)
        return (bits == 16 or key in self.host or key in self.variants
                or (self.disk is not None and self.disk.has(eid, bits, group_size)))

    def _fill(self, eid: ExpertId, bits: int, group_size: int, out: torch.Tensor) -> bool:
        """Write `eid` at `bits` into `out` (host or accelerator); returns whether it was quantized."""
        return self.fill_many([((eid, bits, group_size), out)]) == 1

    def _held(self, key: Key, out: torch.Tensor) -> bool:
        """Fill `out` from what is at hand without quantizing or reading a file (a 16-bit master or
        a buffer held in memory)."""
        eid, bits, _ = key
        if bits == 16:
            self.master_buffer(eid, out)
            return True
        have = self.host.get(key)
        if have is None:
            have = self.variants.get(key)
        if have is not None:
            out.copy_(have)
            return True
        return False

    def fill_many(self, items: list[tuple[Key, torch.Tensor]], progress: Callable[[int], object] | None = None) -> int:
        """Write each key's variant into its buffer (host or accelerator): from memory or the disk
        cache where it can, else quantized, many experts of one precision at a time when the
        quantizer has `quantize_many` (see hqq_backend). `progress(n)` after every n buffers filled.
        Returns how many were quantized."""
        missing, on_disk = [], []
        for key, out in items:
            if self._held(key, out):
                if progress is not None:
                    progress(1)
            elif self.disk is not None and self.disk.has(*key):
                on_disk.append((key, out))
            else:
                missing.append((key, out))
        if on_disk:
            read = self.disk.load_many([(*key, self.layout(*key[1:]), out) for key, out in on_disk], progress)
            for (key, out), ok in zip(on_disk, read):
                if ok:
                    self._remember(key, out)
                else:
                    missing.append((key, out))
        by_precision: dict[tuple[int, int], list] = {}
        for key, out in missing:
            by_precision.setdefault(key[1:], []).append((key, out))
        for (bits, group_size), todo in sorted(by_precision.items()):
            layout = self.layout(bits, group_size)
            start = 0
            while start < len(todo):
                chunk = todo[start:start + self._batch(layout)]
                start += len(chunk)
                for (key, out), buf in zip(chunk, self._quantize_many([k[0] for k, _ in chunk], bits, group_size)):
                    out.copy_(buf)
                    self._remember(key, buf)
                if progress is not None:
                    progress(len(chunk))
        self._flush()  # every file written (or warned about) before the caller goes on
        return len(missing)

    # working memory of HQQ's solver per weight of a batch (bytes): the float32 stack, its
    # half/float copy and the step's temporaries
    SOLVER_BYTES_PER_WEIGHT = 32

    def _batch(self, layout: Layout) -> int:
        """Experts quantized together: on CUDA as many as half the free memory holds the solver for,
        at least 1, at most 64. On the CPU one: the stacked solver was slower there (0.5-0.7x on 16
        small experts, one thread: its larger operands fall out of the caches, and the
        per-operation overhead it saves is small on a CPU)."""
        if not hasattr(self.quantizer, "quantize_many"):
            return 1
        if self.max_batch is not None:
            return self.max_batch
        if self.quantize_on.type != "cuda":
            return 1
        largest = max(math.prod(shape) for _, shape in layout.matrices)
        free, _ = torch.cuda.mem_get_info(self.quantize_on)
        return max(1, min(64, free // 2 // (self.SOLVER_BYTES_PER_WEIGHT * largest)))

    def _quantize_many(self, eids: list[ExpertId], bits: int, group_size: int) -> list[torch.Tensor]:
        """New packed variants of `eids`, on the quantizing device, each matrix of them quantized
        together (one quantize_many call per matrix name) when the quantizer can, written to the
        disk cache."""
        layout = self.layout(bits, group_size)
        started = time.perf_counter()
        masters = [self.master(eid) for eid in eids]
        tensors: list[dict] = [{} for _ in eids]
        for name, _ in layout.matrices:
            if hasattr(self.quantizer, "quantize_many"):
                qs = self.quantizer.quantize_many([m[name] for m in masters], bits, group_size, self.spec.dtype,
                                                  self.quantize_on)
            else:
                qs = [self.quantizer.quantize(m[name], bits, group_size, self.spec.dtype, self.quantize_on)
                      for m in masters]
            for t, q in zip(tensors, qs):
                t.update({f"{name}.{k}": v for k, v in q.items()})
        del masters
        bufs = [pack_into(layout, ts, torch.empty(layout.nbytes, dtype=torch.uint8, device=self.quantize_on))
                for ts in tensors]
        if self.quantize_on.type == "cuda":
            torch.cuda.synchronize(self.quantize_on)
        self.quantize_s += time.perf_counter() - started
        self.quantized += len(bufs)
        if self.disk is not None:
            for eid, buf in zip(eids, bufs):
                self._write(eid, bits, group_size, layout, buf)
        return bufs

    WRITES_IN_FLIGHT = 8  # host copies of variants waiting for the disk, at most

    def _write(self, eid: ExpertId, bits: int, group_size: int, layout: Layout, buf: torch.Tensor) -> None:
        """Save a new variant to the disk cache in the background (one writer thread: the file's
        write and fsync overlap the next experts' quantizing); `_flush` waits for them."""
        from placement.variants import checksum

        if self._writer is None:
            from concurrent.futures import ThreadPoolExecutor

            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="variant-write")
        digest = checksum(buf)  # where the buffer is: cheap on a GPU
        host = buf.detach().to("cpu", copy=True)
        self._writes.append(self._writer.submit(self.disk.save, eid, bits, group_size, layout, host, digest))
        while len(self._writes) > self.WRITES_IN_FLIGHT:
            self._writes.popleft().result()

    def _flush(self) -> None:
        while self._writes:
            self._writes.popleft().result()

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
        bufs, quantized = self.to_device_many([(eid, bits, group_size)], device)
        return bufs[0], quantized == 1

    def to_device_many(self, keys: list[Key], device: torch.device, progress: Callable | None = None
                       ) -> tuple[list[torch.Tensor], int]:
        """New buffers of `keys` on `device` (see to_device), those to quantize quantized together.
        Returns (buffers, how many were quantized)."""
        bufs = [torch.empty(self.layout(bits, gs).nbytes, dtype=torch.uint8, device=device) for _, bits, gs in keys]
        return bufs, self.fill_many(list(zip(keys, bufs)), progress)

    # --- the host tier -----------------------------------------------------------------------------
    def set_host(self, keys: Iterable[Key], progress: Callable | None = None) -> int:
        """Hold exactly `keys` as host buffers (pinned when pinning): drop the others first, then
        make the missing ones. No copy may be reading a dropped buffer (the engine synchronizes).
        `progress(n)` is called after every n buffers made. Returns how many were quantized."""
        keys = set(keys)
        for key in [k for k in self.host if k not in keys]:
            buf = self.host.pop(key)
            self._views.pop(key, None)
            self.buffers.release(buf)
            del buf
        if self.pin and torch.cuda.is_available() and hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()  # blocks of torch's pinned allocator (the fallback), if any were freed
        new = {key: self.buffers.empty(self.layout(key[1], key[2]).nbytes) for key in sorted(keys - self.host.keys())}
        quantized = self.fill_many(list(new.items()), progress)
        for key, buf in new.items():
            self.host[key] = buf
            self.variants.pop(key, None)  # the host buffer serves it now
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
