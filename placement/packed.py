"""One contiguous byte buffer per expert variant.

Every expert, whatever its precision, lives in a single flat ``uint8`` tensor: its weights (16-bit)
or its HQQ-packed weights plus scales and zeros (8/4/3/2-bit) sit at aligned offsets inside it.
One buffer means one host-to-accelerator copy per expert and accelerator slots of uniform size, and
the bytes a tier holds are just the sum of its buffers.

The layout arithmetic here mirrors hqq 0.2.8's packing (``Quantizer.quantize`` with ``axis=1``);
``tests/test_packed.py`` checks it against hqq's real output for every bit width.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

ALIGN = 64  # bytes; keeps every field aligned for any dtype view and for vectorised copies
QUANT_BITS = (8, 4, 3, 2)

# hqq packs groups of `group_size` values as rows of a [n_groups, group_size] matrix; the packed
# row count shrinks by the number of values per storage element (3-bit: 10 values per int32).
_PACKED_ROWS = {
    8: lambda g: g,
    4: lambda g: math.ceil(g / 2),
    2: lambda g: math.ceil(g / 4),
    3: lambda g: math.ceil(g / 10),
}
_PACKED_DTYPE = {8: torch.uint8, 4: torch.uint8, 2: torch.uint8, 3: torch.int32}


@dataclass(frozen=True)
class Field:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Layout:
    """Where each tensor of one expert variant sits in its buffer."""

    bits: int
    group_size: int
    dtype: torch.dtype  # the model's (compute) dtype
    matrices: tuple[tuple[str, tuple[int, int]], ...]  # (name, [out, in]) in forward order
    fields: tuple[Field, ...]
    nbytes: int

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views of `buf` (uint8, at least `nbytes` long) for each field; no copies."""
        out = {}
        for f in self.fields:
            out[f.name] = buf[f.offset : f.offset + f.nbytes].view(f.dtype).view(f.shape)
        return out


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _quant_fields(name: str, shape: tuple[int, int], bits: int, group_size: int, dtype: torch.dtype):
    n_groups = math.prod(shape) // group_size
    return [
        (f"{name}.W_q", _PACKED_DTYPE[bits], (_PACKED_ROWS[bits](n_groups), group_size)),
        (f"{name}.scale", dtype, (n_groups, 1)),
        (f"{name}.zero", dtype, (n_groups, 1)),
    ]


@functools.lru_cache(maxsize=None)  # asked for on every fetched expert call
def expert_layout(
    hidden: int, intermediate: int, bits: int, dtype: torch.dtype, group_size: int = 64
) -> Layout:
    """Layout of one gated expert (fused gate_up [2I, H] and down [H, I]) at `bits`."""
    matrices = (("gate_up", (2 * intermediate, hidden)), ("down", (hidden, intermediate)))
    specs = []
    for name, shape in matrices:
        if bits == 16:
            specs.append((name, dtype, shape))
        else:
            specs.extend(_quant_fields(name, shape, bits, group_size, dtype))
    fields, offset = [], 0
    for name, fdtype, shape in specs:
        fields.append(Field(name, fdtype, tuple(shape), offset))
        offset = _align(offset + fields[-1].nbytes)
    return Layout(bits, group_size, dtype, matrices, tuple(fields), offset)


def pack(layout: Layout, tensors: dict[str, torch.Tensor], *, pin: bool = False) -> torch.Tensor:
    """Copy `tensors` (named as the layout's fields) into one new host buffer."""
    return pack_into(layout, tensors, torch.zeros(layout.nbytes, dtype=torch.uint8, pin_memory=pin))


def pack_into(layout: Layout, tensors: dict[str, torch.Tensor], buf: torch.Tensor) -> torch.Tensor:
    """Copy `tensors` (named as the layout's fields) into `buf` (uint8, layout.nbytes, any device)."""
    views = layout.views(buf)
    for f in layout.fields:
        src = tensors[f.name]
        assert tuple(src.shape) == f.shape and src.dtype == f.dtype, (f, src.shape, src.dtype)
        views[f.name].copy_(src)
    return buf


# --- one quantized matrix (attention projections, placement/qlinear.py) -------------------------------
QLINEAR_BITS = (8, 4)  # precisions of quantized projections (16: the model's own nn.Linear)


@functools.lru_cache(maxsize=None)
def linear_layout(out_features: int, in_features: int, bits: int, dtype: torch.dtype, group_size: int = 64) -> Layout:
    """Layout of one [out, in] matrix named "weight" at `bits` (8 or 4), as packed.py lays out experts."""
    if bits not in QLINEAR_BITS:
        raise ValueError(f"bits={bits} is not a quantized linear precision; choose one of "
                         f"{', '.join(map(str, QLINEAR_BITS))}")
    check_shape(out_features, in_features, bits, group_size)
    fields, offset = [], 0
    for name, fdtype, shape in _quant_fields("weight", (out_features, in_features), bits, group_size, dtype):
        fields.append(Field(name, fdtype, tuple(shape), offset))
        offset = _align(offset + fields[-1].nbytes)
    return Layout(bits, group_size, dtype, (("weight", (out_features, in_features)),), tuple(fields), offset)


def check_shape(out_features: int, in_features: int, bits: int, group_size: int) -> None:
    """A one-line ValueError when an [out, in] matrix cannot be quantized with these groups: groups
    must tile each row (so a group never spans two rows) and 4-bit packs rows n and n + out/2."""
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group_size={group_size} does not divide the input dimension ({in_features}) of a "
                         f"{out_features}x{in_features} projection")
    if bits == 4 and out_features % 2:
        raise ValueError(f"4-bit packs two rows per byte: the {out_features}x{in_features} projection has an odd "
                         "number of rows")


def pack_linear(layout: Layout, quantized: dict[str, torch.Tensor], device) -> torch.Tensor:
    """One buffer of `layout` on `device` from hqq_backend.quantize's W_q, scale and zero."""
    tensors = {f"weight.{k}": v for k, v in quantized.items()}
    return pack_into(layout, tensors, torch.empty(layout.nbytes, dtype=torch.uint8, device=device))
