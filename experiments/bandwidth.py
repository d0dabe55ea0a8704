"""Memory bandwidths measured in the running process: what `bench_decode`'s memory bound is computed
with, so that every "ratio to bound" rests on the machine that ran the rows.

- accelerator memory (HBM): a device-to-device copy of `nbytes` (it reads nbytes and writes nbytes,
  so it is reported as read+write GB/s, 2 x nbytes / t) and a read-only pass over the same bytes (a
  sum: nbytes / t). The bound's read bandwidth is the higher of the two (`accel_read_gbps`, named by
  `accel_read_basis`): the fastest rate at which this run saw the memory system move bytes;
- host-to-accelerator: copies from a pinned host buffer of `h2d_bytes` (what a `fetch` miss does);
- host memory: the same copy and sum on host buffers (what `cpu` offload computes from).

Each figure is the best of `repeats` timed repetitions after one untimed one. Without CUDA the
accelerator is the host: its "HBM" figures are host memory measured the same way, and the
host-to-accelerator copy is a host-to-host copy (what the engine's fetch does there).

    python -m experiments.bandwidth
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass

import torch

MiB = 1 << 20


@dataclass(frozen=True)
class Bandwidths:
    """GB/s (1e9 bytes per second) measured on `device`."""

    device: str  # the accelerator's name ("cpu" without CUDA)
    accel_copy_gbps: float  # device-to-device copy, read+write
    accel_sum_gbps: float  # read-only pass
    h2d_gbps: float  # pinned host to accelerator (host to host without CUDA)
    host_copy_gbps: float  # host copy, read+write
    host_sum_gbps: float  # host read-only pass
    nbytes: int  # the buffers' size (accelerator and host); the h2d copy's is h2d_bytes
    h2d_bytes: int

    @property
    def accel_read_gbps(self) -> float:
        """The accelerator read bandwidth the bound uses."""
        return max(self.accel_copy_gbps, self.accel_sum_gbps)

    @property
    def accel_read_basis(self) -> str:
        return "copy (read+write)" if self.accel_copy_gbps >= self.accel_sum_gbps else "sum (read)"

    @property
    def host_read_gbps(self) -> float:
        """The host read bandwidth the bound of `cpu`-offload rows uses."""
        return max(self.host_copy_gbps, self.host_sum_gbps)

    def as_dict(self) -> dict:
        return {**asdict(self), "accel_read_gbps": self.accel_read_gbps, "accel_read_basis": self.accel_read_basis,
                "host_read_gbps": self.host_read_gbps}

    def describe(self) -> str:
        h2d = "pinned host-to-GPU copy" if self.device != "cpu" else "host-to-host copy (no CUDA)"
        return (f"bandwidth measured in this run on {self.device} (best of several repetitions):\n"
                f"  accelerator memory: copy {self.accel_copy_gbps:.0f} GB/s read+write, sum {self.accel_sum_gbps:.0f} "
                f"GB/s read over {self.nbytes / MiB:.0f} MiB; the bound reads at {self.accel_read_gbps:.0f} GB/s "
                f"({self.accel_read_basis})\n"
                f"  {h2d}: {self.h2d_gbps:.1f} GB/s over {self.h2d_bytes / MiB:.0f} MiB\n"
                f"  host memory: copy {self.host_copy_gbps:.1f} GB/s read+write, sum {self.host_sum_gbps:.1f} GB/s "
                f"read; `cpu` rows read host experts at {self.host_read_gbps:.1f} GB/s")


def _best_seconds(fn, repeats: int, device: torch.device) -> float:
    """The shortest of `repeats` timed calls of fn() after one untimed call (CUDA events on a GPU)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
    return best


def copy_and_sum(device: torch.device, nbytes: int, repeats: int) -> tuple[float, float]:
    """(copy read+write GB/s, sum read GB/s) of `nbytes` buffers on `device`."""
    src = torch.zeros(nbytes, dtype=torch.uint8, device=device)  # zeros: every page touched before timing
    dst = torch.empty_like(src)
    dst.zero_()
    copy_s = _best_seconds(lambda: dst.copy_(src), repeats, device)
    floats = src.view(torch.float32)  # a sum reads each byte once and writes one number
    sum_s = _best_seconds(lambda: floats.sum(), repeats, device)
    del src, dst, floats
    return 2 * nbytes / copy_s / 1e9, nbytes / sum_s / 1e9


def host_to_accel(device: torch.device, nbytes: int, repeats: int) -> float:
    """GB/s of copies from a (pinned, with CUDA) host buffer of `nbytes` to `device`."""
    cuda = device.type == "cuda"
    src = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=cuda)
    dst = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    seconds = _best_seconds(lambda: dst.copy_(src, non_blocking=cuda), repeats, device)
    del src, dst
    return nbytes / seconds / 1e9


def measure(device: torch.device | str | None = None, *, nbytes: int = 1024 * MiB, h2d_bytes: int = 256 * MiB,
            repeats: int = 10) -> Bandwidths:
    """Every bandwidth of `Bandwidths` on `device` (default: CUDA if there is one, else the CPU)."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if nbytes < MiB or nbytes % 4 or h2d_bytes < MiB:
        raise ValueError(f"bandwidth buffers must be at least 1 MiB (and nbytes a multiple of 4), got "
                         f"nbytes={nbytes}, h2d_bytes={h2d_bytes}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
    accel_copy, accel_sum = copy_and_sum(device, nbytes, repeats)
    h2d = host_to_accel(device, h2d_bytes, repeats)
    cpu = torch.device("cpu")
    if device.type == "cpu":  # the accelerator is the host: measured once
        host_copy, host_sum = accel_copy, accel_sum
    else:
        host_copy, host_sum = copy_and_sum(cpu, nbytes, max(3, repeats // 2))  # host copies are slower
        torch.cuda.empty_cache()
    return Bandwidths(name, accel_copy, accel_sum, h2d, host_copy, host_sum, nbytes, h2d_bytes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=1024, help="accelerator and host buffers, MiB")
    p.add_argument("--h2d-mib", type=int, default=256, help="the pinned host-to-accelerator copy, MiB")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    try:
        bw = measure(nbytes=args.mib * MiB, h2d_bytes=args.h2d_mib * MiB, repeats=args.repeats)
    except ValueError as e:
        p.error(str(e))
    print(bw.describe())


if __name__ == "__main__":
    main()
