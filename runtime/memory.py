"""Where free accelerator memory comes from: CUDA's own count, or a simulated device (CPU machines,
tests, experiments) whose free memory changes as the server takes and releases memory."""

from __future__ import annotations

from collections.abc import Callable


class CudaMemory:
    """Free memory as the CUDA driver reports it (co-tenants' allocations included)."""

    def __init__(self, device):
        self.device = device

    def free_bytes(self) -> int:
        import torch

        return torch.cuda.mem_get_info(self.device)[0]


class SimulatedMemory:
    """A device of `capacity` bytes shared with whatever the server holds (`held()`): memory the
    server releases or takes later changes what is free, as on a real device."""

    def __init__(self, held: Callable[[], int], free_bytes: int):
        self.held = held
        self.capacity = int(free_bytes) + held()

    def free_bytes(self) -> int:
        return self.capacity - self.held()


class Unlimited:
    """No pressure: free memory is always `plenty` (twice the largest plan, say)."""

    def __init__(self, plenty: int):
        self.plenty = plenty

    def free_bytes(self) -> int:
        return self.plenty
