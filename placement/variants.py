"""Quantized expert variants cached on disk, so a second start (or another process) with the same
weights quantizes nothing.

One safetensors file per (expert, precision, group size) under
`$QOS_CACHE_DIR/variants/<weights fingerprint>/<quantizer>-<dtype>/`, holding the expert's packed
buffer (`packed`, uint8, see packed.py) and, in its metadata, the layout it was packed with and a
checksum of its bytes. Files are written to a temporary name and renamed into place (atomic on
POSIX), so a reader never sees a half-written file; a file that does not verify (truncated,
corrupt, another layout) is warned about, deleted and made again, never used.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch

from placement.packed import Layout
from placement.plan import ExpertId

log = logging.getLogger(__name__)
FORMAT = "moe-qos-variant-1"


def cache_root() -> Path:
    """`$QOS_CACHE_DIR`, by default ~/.cache/moe-qos (shared with the sensitivity scores)."""
    return Path(os.environ.get("QOS_CACHE_DIR") or Path.home() / ".cache" / "moe-qos")


def checksum(buf: torch.Tensor) -> str:
    """A cheap checksum of a packed buffer (uint8, length a multiple of 8: layouts align to 64):
    the wrapping sums of its 64-bit words, plain and weighted by position."""
    words = buf.view(torch.int64)
    plain = int(words.sum())
    weighted = int((words * torch.arange(1, words.numel() + 1, dtype=torch.int64)).sum())
    return f"{plain & (2**64 - 1):016x}{weighted & (2**64 - 1):016x}{buf.numel():x}"


def layout_meta(layout: Layout) -> str:
    return json.dumps([[f.name, str(f.dtype).removeprefix("torch."), list(f.shape), f.offset] for f in layout.fields]
                      + [layout.nbytes])


class VariantCache:
    """The on-disk variants of one model's weights (`fingerprint`), made by one quantizer (`tag`)."""

    def __init__(self, fingerprint: str, tag: str, dtype: torch.dtype, root: Path | None = None):
        self.dir = (root or cache_root()) / "variants" / fingerprint / f"{tag}-{str(dtype).removeprefix('torch.')}"
        self.fingerprint, self.tag = fingerprint, tag
        self.loaded = self.written = self.rejected = 0

    def path(self, eid: ExpertId, bits: int, group_size: int) -> Path:
        return self.dir / f"L{eid.layer:03d}-E{eid.expert:03d}-b{bits}-g{group_size}.safetensors"

    def has(self, eid: ExpertId, bits: int, group_size: int) -> bool:
        return self.path(eid, bits, group_size).is_file()

    def load(self, eid: ExpertId, bits: int, group_size: int, layout: Layout, out: torch.Tensor | None = None
             ) -> torch.Tensor | None:
        """The cached packed buffer (copied into `out` if given), or None when there is none or it
        does not verify (then the file is removed, with a warning, to be made again)."""
        from safetensors import SafetensorError, safe_open

        path = self.path(eid, bits, group_size)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                problem = self._check_meta(meta, eid, bits, group_size, layout)
                if problem is None:
                    packed = f.get_tensor("packed")
                    if packed.dtype != torch.uint8 or packed.shape != (layout.nbytes,):
                        problem = f"holds a {packed.dtype} tensor of shape {tuple(packed.shape)}"
                    elif checksum(packed) != meta.get("checksum"):
                        problem = "does not match its checksum"
        except (SafetensorError, OSError, ValueError, KeyError) as err:
            problem = f"cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        if problem is not None:
            self.rejected += 1
            warnings.warn(f"cached variant {path} {problem}: quantizing it again", stacklevel=2)
            path.unlink(missing_ok=True)
            return None
        self.loaded += 1
        if out is None:
            return packed
        out.copy_(packed)
        return out

    def _check_meta(self, meta: dict, eid: ExpertId, bits: int, group_size: int, layout: Layout) -> str | None:
        want = {"format": FORMAT, "fingerprint": self.fingerprint, "quantizer": self.tag, "layer": str(eid.layer),
                "expert": str(eid.expert), "bits": str(bits), "group_size": str(group_size),
                "layout": layout_meta(layout)}
        wrong = [k for k, v in want.items() if meta.get(k) != v]
        return f"was written for another {', '.join(wrong)}" if wrong else None

    def save(self, eid: ExpertId, bits: int, group_size: int, layout: Layout, packed: torch.Tensor) -> None:
        """Write the packed buffer atomically (a temporary file in the same folder, then a rename).
        A cache that cannot be written is a warning, not an error: serving goes on."""
        from safetensors.torch import save_file

        path = self.path(eid, bits, group_size)
        packed = packed.detach().to("cpu").contiguous()
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "quantizer": self.tag, "layer": str(eid.layer),
                "expert": str(eid.expert), "bits": str(bits), "group_size": str(group_size),
                "layout": layout_meta(layout), "checksum": checksum(packed)}
        tmp = None
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

    def counts(self) -> dict:
        return {"variant_cache_dir": str(self.dir), "variants_loaded": self.loaded,
                "variants_written": self.written, "variants_rejected": self.rejected}
