import pytest
import torch

from placement import hqq_backend
from placement.packed import ALIGN, expert_layout, pack


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layout_matches_hqq_packing(bits, dtype):
    hidden, inter = 64, 96
    layout = expert_layout(hidden, inter, bits, dtype, group_size=64)
    tensors = {}
    for name, shape in layout.matrices:
        q = hqq_backend.quantize(torch.randn(shape), bits, 64, dtype, "cpu")
        tensors.update({f"{name}.{k}": v for k, v in q.items()})
    buf = pack(layout, tensors)  # asserts every field's shape and dtype against hqq's tensors
    assert buf.numel() == layout.nbytes
    views = layout.views(buf)
    for key, t in tensors.items():
        assert torch.equal(views[key], t)
    assert all(f.offset % ALIGN == 0 for f in layout.fields)


def test_quantized_layouts_shrink_with_bits():
    sizes = [expert_layout(4096, 14336, b, torch.bfloat16).nbytes for b in (16, 8, 4, 3, 2)]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] == 3 * 4096 * 14336 * 2  # Mixtral-8x7B expert in bf16: 352 MB
