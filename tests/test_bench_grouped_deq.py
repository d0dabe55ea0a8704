"""experiments/bench_grouped_deq.py (an experiment awaiting its GPU run): its kernels agree with the
engine's grouped 4-bit kernels in Triton's interpreter, and compile for sm_90 with their packed bf16
inline PTX, the dots accumulating across groups asynchronously."""

import torch

from experiments.bench_grouped_deq import compare

_CROSS_COMPILE = """
import re
import torch
torch.cuda.is_available = lambda: True  # the kernels are then defined with triton.jit
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from placement import kernels as K
from experiments import bench_grouped_deq as D
assert not K._INTERPRET
common = dict(H=4096, I=14336, GS=64, DTYPE=K.tl.bfloat16, W_OFF=0, S_OFF=64, Z_OFF=128, TOP_K=2, BLOCK_M=16,
              BLOCK_J=64, SPLIT_K=4, DOT=K.tl.bfloat16, IEEE=False, FAST=True)
slots = {"table_ptr": "*i64", "order_ptr": "*i64", "bounds_ptr": "*i64"}
for fn, ptrs in ((D._gate_up_deq_kernel, {"x_ptr": "*bf16", **slots, "gu_ptr": "*fp32"}),
                 (D._down_deq_kernel, {"h_ptr": "*bf16", **slots, "wt_ptr": "*bf16", "out_ptr": "*fp32"})):
    sig = {**ptrs, **{n: "constexpr" for n in common}}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in ptrs}  # as a launch specializes
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=common, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
    assert "sub.rn.bf16x2" in k.asm["ptx"] and "fma.rn.bf16x2" in k.asm["ptx"] and "wgmma" in k.asm["ptx"]
    waits = re.findall(r"warp_group_dot_wait .*?pendings = (\\d+)", k.asm["ttgir"])
    print(fn.__name__, waits)
print("compiled")
"""


def test_the_dequantizing_kernels_agree_with_the_engines_grouped_ones():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = compare(128, 256, [(1, 1), (3, 5), (2, 17)], 1, device)  # 17 tokens: two token blocks
    tol = 1e-4 if device.type == "cpu" else 2e-2  # (bf16 on a GPU: rounding of the weights)
    assert [(r["experts"], r["tokens"]) for r in rows] == [(1, 1), (3, 5), (2, 17)]
    assert all(r["rel_diff"] < tol for r in rows), rows


def test_the_dequantizing_kernels_compile_for_sm90(cross_compile):
    out = cross_compile(_CROSS_COMPILE)
    # the dots chain across groups without waiting for each (the point of the experiment)
    assert "_gate_up_deq_kernel ['3'" in out and "_down_deq_kernel ['3'" in out, out
