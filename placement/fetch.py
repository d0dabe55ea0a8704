"""The fetch cache: accelerator slots that hold recently used host experts (`offload="fetch"`),
least recently used evicted first, filled on a side copy stream.

Per slot, a "ready" event orders compute after the slot's copy and a "free" event orders the next
copy into the slot after the last compute that read it, so copies overlap compute already queued.
Counters are the caller's: each lookup says what it cost.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from placement import kernels
from placement.experts import tensor_bytes
from placement.plan import ExpertId
from placement.store import ExpertStore


@dataclass(frozen=True)
class Lookup:
    slot: int
    copied: int  # bytes copied into the slot (0: it was there)
    prefetch_hit: bool  # a demand hit on an expert copied ahead and not used since


class FetchCache:
    """`slots` equal buffers on `accel`, keyed by (expert, bits) in `lru`; copies come from `store`."""

    def __init__(self, store: ExpertStore, accel: torch.device, *, pin: bool):
        self.store, self.accel, self.pin = store, accel, pin
        self.slots: list[torch.Tensor] = []  # uint8 buffers on the accelerator
        self.slot_views: list[tuple | None] = []  # per slot, (layout, views) of what it holds
        self.lru: OrderedDict[tuple[ExpertId, int], int] = OrderedDict()  # (eid, bits) -> slot
        self.prefetched: set[tuple[ExpertId, int]] = set()  # in a slot ahead of use, not used yet
        self.copy_stream = torch.cuda.Stream(accel) if accel.type == "cuda" else None
        self.slot_ready: list = []
        self.slot_free: list = []
        self.slot_table = torch.zeros(0, dtype=torch.int64, device=accel)  # [slots] buffer addresses

    def nbytes(self) -> int:
        return tensor_bytes(self.slots)

    # --- reconfiguration ----------------------------------------------------------------------
    def matches(self, n_slots: int, slot_bytes: int) -> bool:
        """Whether the slots allocated now are `n_slots` of `slot_bytes` each."""
        return len(self.slots) == n_slots and not (self.slots and self.slots[0].numel() != slot_bytes)

    def free(self) -> None:
        """Drop every slot and what it held."""
        self.slots, self.slot_views = [], []
        self.lru.clear()
        self.prefetched.clear()

    def keep_only(self, keep: Callable[[ExpertId, int], bool]) -> None:
        """Forget cached (expert, bits) entries that `keep` rejects; their slots become free."""
        for key in [k for k in self.lru if not keep(*k)]:
            self.slot_views[self.lru.pop(key)] = None
            self.prefetched.discard(key)

    def allocate(self, n_slots: int, slot_bytes: int) -> None:
        """Allocate `n_slots` empty slots of `slot_bytes` if none are allocated."""
        if self.slots or not n_slots:
            return
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.accel) for _ in range(n_slots)]
        self.slot_views = [None] * n_slots
        self.slot_table = kernels.expert_table(self.slots, device=self.accel)
        if self.copy_stream is not None:
            self.slot_ready = [torch.cuda.Event() for _ in self.slots]
            self.slot_free = [torch.cuda.Event() for _ in self.slots]

    # --- serving ------------------------------------------------------------------------------
    def fetch(self, eid: ExpertId, bits: int, group_size: int, *, ahead: bool = False) -> Lookup:
        """The slot holding `eid` at `bits`, copying it in (over the least recently used) if missing;
        `ahead`: a prefetch, which leaves the entry marked until a demand lookup uses it."""
        key = (eid, bits)
        slot = self.lru.get(key)
        if slot is not None:
            self.lru.move_to_end(key)
            used_ahead = not ahead and key in self.prefetched
            if used_ahead:
                self.prefetched.discard(key)
            return Lookup(slot, 0, used_ahead)
        if len(self.lru) < len(self.slots):
            used = set(self.lru.values())
            slot = next(i for i in range(len(self.slots)) if i not in used)
        else:
            old, slot = self.lru.popitem(last=False)
            self.prefetched.discard(old)
        src, _ = self.store.buffer(eid, bits, group_size)
        dst = self.slots[slot][: src.numel()]
        if self.copy_stream is not None:
            # pinned source, side stream: the copy overlaps compute already queued and waits only
            # for the last compute that read this slot
            self.copy_stream.wait_event(self.slot_free[slot])
            with torch.cuda.stream(self.copy_stream):
                dst.copy_(src, non_blocking=self.pin)
            self.slot_ready[slot].record(self.copy_stream)
        else:
            dst.copy_(src)
        layout = self.store.layout(bits, group_size)
        self.slot_views[slot] = (layout, layout.views(dst))
        self.lru[key] = slot
        if ahead:
            self.prefetched.add(key)
        return Lookup(slot, src.numel(), False)

    def await_copy(self, slot: int) -> None:
        """Order the compute stream after the copy into `slot`."""
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.accel).wait_event(self.slot_ready[slot])

    def release(self, slot: int) -> None:
        """Mark the compute queued so far as the last reader of `slot` (the next copy waits for it)."""
        if self.copy_stream is not None:
            self.slot_free[slot].record(torch.cuda.current_stream(self.accel))
