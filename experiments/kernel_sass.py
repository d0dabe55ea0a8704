"""What the quantized slot kernels' K loop costs in sm_90 machine code, without a GPU: the kernels
cross-compiled for an H100/H200 by Triton's NVIDIA backend (its ptxas), disassembled with its
nvdisasm. Per kernel and precision: the loop's instructions per weight per thread, its commonest
instructions, its cross-thread waits (shuffles, shared memory accesses, barriers) and spill
accesses, registers and stack per thread.

    python -m experiments.kernel_sass --out experiments/results/kernel_sass.csv
    PYTHONPATH=/tmp/triton36 python -m experiments.kernel_sass   # with another Triton (pip install --target)

A static count, not a timing: fewer instructions need not run faster (a GPU says; see ab_trees).
Run it in a fresh process: it makes placement.kernels define its kernels for a GPU.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import torch

GPU = "NVIDIA H200"  # whose one-slot blocks (kernel_blocks.json "bits@1") are costed by default
CROSS_THREAD = ("SHFL", "BAR", "LDS", "STS")
SPILLS = ("LDL", "STL")


def _tools():
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (bin_dir / "nvdisasm").exists():
        raise SystemExit(f"triton {triton.__version__} has no NVIDIA backend tools here ({bin_dir}): "
                         "kernel_sass needs its ptxas, nvdisasm and cuobjdump")
    return triton, bin_dir


def loop_code(sass: str) -> list[str]:
    """The instructions of the longest loop in nvdisasm's output: from a label to the furthest
    branch back to it."""
    labels, code = {}, []
    for line in sass.splitlines():
        if m := re.match(r"\s*(\.L_x_\d+):", line):
            labels[m.group(1)] = len(code)
        elif m := re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?);", line):
            code.append(m.group(1))
    spans = [(labels[m.group(1)], i) for i, c in enumerate(code)
             if (m := re.search(r"BRA `?\(?(\.L_x_\d+)", c)) and labels.get(m.group(1), i) < i]
    if not spans:
        raise ValueError("no loop in this kernel's machine code")
    start, end = max(spans, key=lambda span: span[1] - span[0])
    return code[start:end + 1]


def opcode(instruction: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0].split(".")[0]


def measure(kind: str, bits: int, blocks: tuple[int, int, int]) -> dict:
    """Compile one kernel (decode's indexed call, PDL on, a Mixtral expert) and cost its K loop."""
    triton, bin_dir = _tools()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from placement import kernels as K

    rows, k_chunk, warps = blocks
    act = {"qa_ptr": "*i32", "qb_ptr": "*i32", "qs_ptr": "*fp32", "qn_ptr": "*i32"}
    slot = {"ptr_tab": "*i64", "idx_tab": "*i64", "tok_tab": "*i64"}
    consts = dict(H=4096, I=14336, GS=64, DTYPE=K.tl.bfloat16, W_OFF=0, S_OFF=64, Z_OFF=128, FAST=True, PDL=True,
                  INDEXED=True, TOKEN_DIV=2, BITS=bits, BLOCK_J=rows, BLOCK_K=k_chunk)
    if kind == "gate_up":
        fn, ptrs = K._gate_up_int_kernel, {**act, **slot, "cnt_ptr": "*i64", "out_ptr": "*fp32", "h_ptr": "*fp32"}
        consts.update(COUNT=True, ZERO_BLOCK=4)
    else:
        fn, ptrs = K._down_int_kernel, {**act, **slot, "wt_tab": "*fp32", "out_ptr": "*fp32"}
        consts.update(SPLIT_K=4)
    signature = {**ptrs, **{name: "constexpr" for name in consts}}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in ptrs}  # as a launch specializes
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 2})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([bin_dir / "nvdisasm", "-c", cubin], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([bin_dir / "cuobjdump", "--dump-resource-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
    code = loop_code(sass)
    ops = collections.Counter(opcode(c) for c in code)
    # rows x K bytes of 8 // bits codes; 8-bit gate_up reads gate's and up's bytes
    weights = rows * k_chunk * (max(2, 8 // bits) if kind == "gate_up" else 8 // bits)
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return dict(triton=triton.__version__, kernel=kind, bits=bits, rows=rows, k_chunk=k_chunk, warps=warps,
                loop_instructions=len(code), per_weight=len(code) * 32 * warps / weights,
                cross_thread=sum(ops[o] for o in CROSS_THREAD), shuffles=ops["SHFL"],
                loop_spills=sum(ops[o] for o in SPILLS), registers=int(regs.group(1)) if regs else None,
                stack_bytes=int(stack.group(1)) if stack else None,
                top=" ".join(f"{o}:{n}" for o, n in ops.most_common(8)))


def main(argv=None) -> pd.DataFrame:
    p = argparse.ArgumentParser(prog="python -m experiments.kernel_sass", description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=lambda s: [int(b) for b in s.split(",")], default=[4, 2])
    p.add_argument("--gate-up", type=lambda s: tuple(int(v) for v in s.split(",")),
                   help=f"rows,K chunk,warps (default: the {GPU}'s one-slot blocks per precision)")
    p.add_argument("--down", type=lambda s: tuple(int(v) for v in s.split(",")),
                   help=f"rows,K chunk,warps (default: the {GPU}'s one-slot blocks per precision)")
    p.add_argument("--out", help="CSV of the table")
    args = p.parse_args(argv)
    if bad := [b for b in args.bits if b not in (8, 4, 2)]:
        p.error(f"--bits must be among 8, 4, 2 (the integer kernels), got {bad}")
    for name, blocks in (("--gate-up", args.gate_up), ("--down", args.down)):
        if blocks is not None and (len(blocks) != 3 or min(blocks) < 1):
            p.error(f"{name} takes rows,K chunk,warps, got {blocks}")
    _tools()
    torch.cuda.is_available = lambda: True  # so placement.kernels defines its kernels with triton.jit
    from placement import kernels

    if kernels._INTERPRET:
        raise SystemExit("placement.kernels runs in Triton's interpreter here (TRITON_INTERPRET=1, or imported "
                         "before): run kernel_sass in a fresh process without TRITON_INTERPRET")
    tuned = kernels.tuned_blocks(GPU)

    def blocks(kind: str, bits: int) -> tuple[int, int, int]:
        given = args.gate_up if kind == "gate_up" else args.down
        b = tuned.get((bits, 1), tuned[bits])
        return given or (b[:3] if kind == "gate_up" else b[3:6])

    table = pd.DataFrame([measure(kind, bits, blocks(kind, bits)) for bits in args.bits for kind in ("gate_up", "down")])
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
    return table


if __name__ == "__main__":
    main()
