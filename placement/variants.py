"""Quantized expert variants cached on disk, so a second start (or another process) with the same
weights quantizes nothing.

One safetensors file per (expert, precision, group size) under
`$QOS_CACHE_DIR/variants/<weights fingerprint>/<quantizer>-<dtype>/`, holding the expert's packed
buffer (`packed`, uint8, see packed.py) and, in its metadata, the layout it was packed with and a
checksum of its bytes. Files are written to a temporary name and renamed into place (atomic on
POSIX), so a reader never sees a half-written file; a file that does not verify (truncated,
corrupt, another layout) is warned about, deleted and made again, never used.

Reading is what a warm start waits on, so it is direct: the header is parsed here and the bytes
are read from the file straight into their destination (a host buffer, or a pinned staging buffer
copied to the accelerator and checksummed there), by a few threads ahead of the copies.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from placement.packed import Layout
from placement.plan import ExpertId

log = logging.getLogger(__name__)
FORMAT = "moe-qos-variant-1"


def cache_root() -> Path:
    """`$QOS_CACHE_DIR`, by default ~/.cache/moe-qos (shared with the sensitivity scores)."""
    return Path(os.environ.get("QOS_CACHE_DIR") or Path.home() / ".cache" / "moe-qos")


def checksum(buf: torch.Tensor, block: int = 4096) -> str:
    """A cheap checksum of a packed buffer (uint8, length a multiple of 8: layouts align to 64), on
    whatever device holds it: the wrapping sums of its 64-bit words, plain and weighted by position
    (1-based). The weighted sum is taken as rows of `block` words, sum_r sum_c (r*block + c + 1)
    w[r, c] = block * sum_r r * rowsum[r] + sum_c (c + 1) * colsum[c], so no position array of the
    buffer's size is made; integer sums wrap the same in any order, so every device agrees."""
    words = buf.view(torch.int64)
    n, rows = words.numel(), words.numel() // block
    grid, tail = words[: rows * block].view(rows, block), words[rows * block:]

    def positions(start, stop):
        return torch.arange(start, stop, dtype=torch.int64, device=buf.device)

    row_sums = grid.sum(1)  # [rows]; the plain sum is theirs (wrapping sums agree in any order)
    plain = int(row_sums.sum()) + int(tail.sum())
    weighted = (block * int((row_sums * positions(0, rows)).sum()) + int((grid.sum(0) * positions(1, block + 1)).sum())
                + int((tail * positions(rows * block + 1, n + 1)).sum()))
    return f"{plain & (2**64 - 1):016x}{weighted & (2**64 - 1):016x}{buf.numel():x}"


def read_header(fh, size: int) -> tuple[dict, int]:
    """A safetensors file's header (its JSON) and where its data begins, read from `fh`."""
    head = fh.read(8)
    if len(head) != 8:
        raise ValueError("no header")
    n = int.from_bytes(head, "little")
    if n > min(size - 8, 1 << 20):
        raise ValueError(f"a header of {n} bytes")
    return json.loads(fh.read(n)), 8 + n


def read_into(fh, dest: torch.Tensor) -> int:
    """Read from `fh` into the host tensor `dest` (uint8) until it is full or the file ends."""
    view, got = memoryview(dest.numpy()).cast("B"), 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def layout_meta(layout: Layout) -> str:
    return json.dumps([[f.name, str(f.dtype).removeprefix("torch."), list(f.shape), f.offset] for f in layout.fields]
                      + [layout.nbytes])


TEMP_GRACE_S = 3600  # a writer's temporary file older than this belongs to a process that died


def cache_files(root: Path | None = None) -> list[dict]:
    """Every variant file under `root` (default cache_root()): its path, bytes, when it was last used
    (its mtime: written, or read by a load) and the model fingerprint and quantizer folder it is in;
    most recently used first."""
    base = (root or cache_root()) / "variants"
    files = []
    for path in base.glob("*/*/*.safetensors") if base.is_dir() else ():
        try:
            st = path.stat()
        except OSError:  # (removed meanwhile)
            continue
        files.append({"path": str(path), "bytes": st.st_size, "used": st.st_mtime, "model": path.parent.parent.name,
                      "quantizer": path.parent.name})
    return sorted(files, key=lambda f: -f["used"])


def prune(max_bytes: int, root: Path | None = None, *, dry_run: bool = False) -> dict:
    """Delete the least recently used variant files until the cache holds at most `max_bytes` (0:
    empty it), and temporary files writers left (older than TEMP_GRACE_S). A file being read while
    it goes is read to the end (POSIX); a later start makes it again. `dry_run`: only say what would
    go. Returns the files and bytes kept and removed."""
    if max_bytes < 0:
        raise ValueError(f"the cache's size limit must be >= 0 bytes, got {max_bytes}")
    kept = removed = kept_bytes = removed_bytes = 0
    for f in cache_files(root):  # newest first: keep while they fit
        if kept_bytes + f["bytes"] <= max_bytes:
            kept, kept_bytes = kept + 1, kept_bytes + f["bytes"]
            continue
        if not dry_run:
            Path(f["path"]).unlink(missing_ok=True)
        removed, removed_bytes = removed + 1, removed_bytes + f["bytes"]
    base = (root or cache_root()) / "variants"
    now = time.time()
    for tmp in base.glob("*/*/.*.tmp") if base.is_dir() else ():
        try:
            if now - tmp.stat().st_mtime > TEMP_GRACE_S:
                size = tmp.stat().st_size
                if not dry_run:
                    tmp.unlink(missing_ok=True)
                removed, removed_bytes = removed + 1, removed_bytes + size
        except OSError:
            continue
    return {"kept_files": kept, "kept_bytes": kept_bytes, "removed_files": removed, "removed_bytes": removed_bytes,
            "dry_run": dry_run}


class VariantCache:
    """The on-disk variants of one model's weights (`fingerprint`), made by one quantizer (`tag`)."""

    def __init__(self, fingerprint: str, tag: str, dtype: torch.dtype, root: Path | None = None):
        self.dir = (root or cache_root()) / "variants" / fingerprint / f"{tag}-{str(dtype).removeprefix('torch.')}"
        self.fingerprint, self.tag = fingerprint, tag
        self.loaded = self.written = self.rejected = 0
        self.read_s = self.verify_s = self.write_s = 0.0  # seconds reading, verifying and writing files

    def path(self, eid: ExpertId, bits: int, group_size: int) -> Path:
        return self.dir / f"L{eid.layer:03d}-E{eid.expert:03d}-b{bits}-g{group_size}.safetensors"

    def has(self, eid: ExpertId, bits: int, group_size: int) -> bool:
        return self.path(eid, bits, group_size).is_file()

    def load(self, eid: ExpertId, bits: int, group_size: int, layout: Layout, out: torch.Tensor | None = None
             ) -> torch.Tensor | None:
        """The cached packed buffer (read into `out` if given, on any device), or None when there is
        none or it does not verify (then the file is removed, with a warning, to be made again)."""
        if out is None:
            out = torch.empty(layout.nbytes, dtype=torch.uint8)
        return out if self.load_many([(eid, bits, group_size, layout, out)])[0] else None

    def load_many(self, requests: list[tuple[ExpertId, int, int, Layout, torch.Tensor]],
                  progress: Callable[[int], object] | None = None, workers: int | None = None) -> list[bool]:
        """Read each request's cached variant into its `out` buffer (host or accelerator); whether
        each was read and verified (a missing file is False; a bad one is warned about, deleted and
        False). The bytes go from the file straight into a host `out`, or into a pinned staging
        buffer copied to the accelerator and verified there; `workers` threads read files ahead of
        the copies (reads and checksums leave the interpreter). `progress(1)` after each one read."""
        from concurrent.futures import ThreadPoolExecutor

        pin = torch.cuda.is_available()
        workers = workers or min(8, max(2, os.cpu_count() or 2))
        results: list[bool] = []
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="variant-read") as pool:
            window = 2 * workers  # reads in flight at most: bounds the staging memory
            pending = [pool.submit(self._read, r, pin) for r in requests[:window]]
            for i, (eid, bits, group_size, layout, out) in enumerate(requests):
                if i + window < len(requests):
                    pending.append(pool.submit(self._read, requests[i + window], pin))
                read = pending[i].result()
                pending[i] = None
                if read is None:  # no such file
                    results.append(False)
                    continue
                dest, problem, want = read
                if problem is None and dest is not out:  # staged on the host: verified where it lands
                    t = time.perf_counter()
                    out.copy_(dest, non_blocking=pin)
                    problem = None if checksum(out) == want else "does not match its checksum"
                    self.verify_s += time.perf_counter() - t
                del dest
                if problem is not None:
                    self._reject(self.path(eid, bits, group_size), problem)
                else:
                    self.loaded += 1
                    if progress is not None:
                        progress(1)
                results.append(problem is None)
        if pin and hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()  # the staging buffers: pinned memory not to keep
        return results

    def _read(self, request, pin: bool) -> tuple[torch.Tensor | None, str | None, str | None] | None:
        """Run in a reader thread: (the bytes read, a problem or None, the checksum they should have),
        or None for a missing file. A host `out` is filled and verified here; for another, the
        bytes are read into a (pinned) staging buffer to copy."""
        eid, bits, group_size, layout, out = request
        path = self.path(eid, bits, group_size)
        t = time.perf_counter()
        try:
            with open(path, "rb", buffering=0) as fh:
                size = os.fstat(fh.fileno()).st_size
                header, start = read_header(fh, size)
                meta = header.get("__metadata__") or {}
                problem = self._check_meta(meta, eid, bits, group_size, layout)
                entry = header.get("packed") or {}
                if problem is None and (entry.get("dtype") != "U8" or entry.get("shape") != [layout.nbytes]
                                        or entry.get("data_offsets") != [0, layout.nbytes]):
                    problem = f"holds {entry.get('dtype')} data of shape {entry.get('shape')}"
                if problem is None and size != start + layout.nbytes:
                    problem = f"is {size} bytes, not {start + layout.nbytes} (truncated or padded)"
                if problem is None and not isinstance(meta.get("checksum"), str):
                    problem = "has no checksum"
                if problem is not None:
                    return None, problem, None
                dest = out if out.device.type == "cpu" else torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=pin)
                if read_into(fh, dest) != layout.nbytes:
                    return None, "ends early", None
            with contextlib.suppress(OSError):  # (a read-only cache is still read)
                os.utime(path)  # last used: what `prune` keeps the newest of
        except FileNotFoundError:
            return None
        except (OSError, ValueError, UnicodeDecodeError, AttributeError) as err:
            return None, f"cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__})", None
        finally:
            self.read_s += time.perf_counter() - t  # (summed over the reader threads)
        if dest is out:
            t = time.perf_counter()
            problem = None if checksum(out) == meta["checksum"] else "does not match its checksum"
            self.verify_s += time.perf_counter() - t
        return dest, problem, meta["checksum"]

    def _reject(self, path: Path, problem: str) -> None:
        self.rejected += 1
        warnings.warn(f"cached variant {path} {problem}: quantizing it again", stacklevel=3)
        path.unlink(missing_ok=True)

    def _check_meta(self, meta: dict, eid: ExpertId, bits: int, group_size: int, layout: Layout) -> str | None:
        want = {"format": FORMAT, "fingerprint": self.fingerprint, "quantizer": self.tag, "layer": str(eid.layer),
                "expert": str(eid.expert), "bits": str(bits), "group_size": str(group_size),
                "layout": layout_meta(layout)}
        wrong = [k for k, v in want.items() if meta.get(k) != v]
        return f"was written for another {', '.join(wrong)}" if wrong else None

    def save(self, eid: ExpertId, bits: int, group_size: int, layout: Layout, packed: torch.Tensor,
             digest: str | None = None) -> None:
        """Write the packed buffer atomically (a temporary file in the same folder, then a rename);
        `digest`: its checksum if already taken. A cache that cannot be written is a warning, not an
        error: serving goes on."""
        from safetensors.torch import save_file

        path = self.path(eid, bits, group_size)
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "quantizer": self.tag, "layer": str(eid.layer),
                "expert": str(eid.expert), "bits": str(bits), "group_size": str(group_size),
                "layout": layout_meta(layout), "checksum": digest or checksum(packed)}  # where it is: cheap on a GPU
        packed = packed.detach().to("cpu").contiguous()
        tmp, t = None, time.perf_counter()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{path.stem}.", suffix=".tmp")
            os.close(fd)
            save_file({"packed": packed}, tmp, metadata=meta)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            tmp = None
            self.written += 1
        except OSError as err:
            warnings.warn(f"cannot write the variant cache in {self.dir}: {err}", stacklevel=2)
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            self.write_s += time.perf_counter() - t

    def counts(self) -> dict:
        return {"variant_cache_dir": str(self.dir), "variants_loaded": self.loaded,
                "variants_written": self.written, "variants_rejected": self.rejected,
                "variants_read_s": self.read_s, "variants_verify_s": self.verify_s, "variants_write_s": self.write_s}
