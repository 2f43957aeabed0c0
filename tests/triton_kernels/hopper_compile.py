"""Compile the attention kernels for an H100/H200 (sm_90) on a machine without a GPU.

Run as ``python -m tests.triton_kernels.hopper_compile`` with ``TRITON_INTERPRET`` unset: the
interpreter replaces ``@triton.jit`` functions, so the CPU tests cannot see whether the compiled
path builds. This compiles to PTX what the GPU would launch — the launch configurations the
kernels pick on CUDA, the prefill kernel with key blocks read through tensor descriptors and
gathered row by row, fp16 and bf16 — and prints one line per kernel. Exit status 1 if any fails.

``python -m tests.triton_kernels.hopper_compile --decode-ptx FILE`` writes the decode split kernel's
PTX for 54 geometries instead: run it at two commits and compare the files to show that a change to
the decode source leaves the GPU code as it was. It compiles with this machine's Triton, which may
be newer than the GPU machine's (3.9 here, 3.6 on the H200 in December 2026): source that only an
older front end rejects (a jit helper's default string argument, for one) passes here and fails
there, so a change still needs one GPU run.
"""

from __future__ import annotations

import itertools
import re
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pagedtensor.triton_kernels import decode_attention, prefill_attention

TARGET = GPUTarget("cuda", 90, 32)
CUDA = torch.device("cuda")  # only its type is read: nothing touches a GPU


def signature(kernel, pointers: dict[str, str], constants: dict[str, object], descriptor: str | None) -> ASTSource:
    """The kernel's source specialised like a launch: pointer element types by name, int64 strides,
    int32 scalars, fp32 scales, a tensor descriptor type (or constexpr None) for ``*_desc``, pointers
    and strides 16-divisible."""
    types: dict[str, str] = {}
    for index, name in enumerate(kernel.arg_names):
        if kernel.params[index].is_constexpr or name in constants:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = pointers.get(name, "*i32")
        elif name.startswith("stride"):
            types[name] = "i64"
        elif name.endswith("_desc"):
            types[name] = descriptor or "constexpr"
        elif "scale" in name:
            types[name] = "fp32"
        else:
            types[name] = "i32"
    values = dict(constants)
    for name in kernel.arg_names:
        if name.endswith("_desc") and descriptor is None:
            values[name] = None
    # A launch marks pointers and integers divisible by 16 as such (Triton's "D" specialisation); the
    # pools, strides and buffers of real launches are, and without the mark loads are not vectorised.
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
               if types[name].startswith("*") or types[name] == "i64"}  # fmt: skip
    return ASTSource(fn=kernel, signature=types, constexprs={(kernel.arg_names.index(k),): v for k, v in values.items()},
                     attrs=aligned)  # fmt: skip


def compile_prefill(dtype: torch.dtype, descriptors: bool) -> str:
    head_dim, page_tokens = 128, 256
    launch = prefill_attention.prefill_launch_config(head_dim, dtype, CUDA)
    element = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    pointers = {name: f"*{element}" for name in ("q_ptr", "k_pages_ptr", "v_pages_ptr", "out_ptr")} | {"lse_ptr": "*fp32"}
    _, precision = prefill_attention.dot_options(dtype)
    constants = dict(QUERY_GROUP=4, HEAD_DIM=head_dim, PAGE_TOKENS=page_tokens, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
                     CAUSAL=True, DOT_UPCAST=False, DOT_PRECISION=precision, USE_DESCRIPTORS=descriptors)  # fmt: skip
    descriptor = f"tensordesc<{element}[{launch.block_n}, {head_dim}]>" if descriptors else None
    source = signature(prefill_attention._prefill_kernel, pointers, constants, descriptor)
    compiled = triton.compile(source, target=TARGET, options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    return f"prefill {element} descriptors={descriptors} {launch}: {len(compiled.asm['ptx'])} bytes of PTX"


def decode_ptx(dtype: torch.dtype, group: int, head_dim: int = 128, page_tokens: int = 16) -> tuple[str, str]:
    """The decode split kernel's sm_90 PTX for one geometry at its CUDA launch, and a label."""
    launch = decode_attention.decode_launch_config(group, head_dim, dtype, CUDA)
    element = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    pointers = {name: f"*{element}" for name in ("q_ptr", "k_pages_ptr", "v_pages_ptr")} | {"out_ptr": "*fp32", "lse_ptr": "*fp32"}
    _, precision = decode_attention.dot_options(dtype)
    constants = dict(QUERY_GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, PAGE_TOKENS=page_tokens,
                     BLOCK_N=launch.block_n, DOT_UPCAST=False, DOT_PRECISION=precision)  # fmt: skip
    source = signature(decode_attention._decode_split_kernel, pointers, constants, None)
    compiled = triton.compile(source, target=TARGET, options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    return f"decode {element} group={group} d{head_dim} p{page_tokens} {launch}", compiled.asm["ptx"]


def compile_decode(dtype: torch.dtype, group: int) -> str:
    label, ptx = decode_ptx(dtype, group)
    return f"{label}: {len(ptx)} bytes of PTX"


def write_decode_ptx(path: str) -> None:
    """The decode split kernel's PTX for 54 geometries (3 dtypes, groups 1/4/8, head_dim 64/128/256,
    16/32-token pages), source-line records and debug sections stripped, to ``path``: two commits
    whose files compare equal launch the same decode kernel on an H100/H200 (a refactor's check)."""
    sections = []
    for dtype, group, head_dim, page_tokens in itertools.product((torch.float16, torch.bfloat16, torch.float32), (1, 4, 8),
                                                                 (64, 128, 256), (16, 32)):  # fmt: skip
        label, ptx = decode_ptx(dtype, group, head_dim, page_tokens)
        lines = [line for line in ptx.split(".section\t.debug")[0].splitlines() if not re.match(r"\s*(\.loc|\.file|//)", line)]
        sections.append(f"==== {label}\n" + "\n".join(lines))
    with open(path, "w") as handle:
        handle.write("\n".join(sections) + "\n")


def main() -> int:
    if prefill_attention.interpreting():
        print("unset TRITON_INTERPRET: the interpreter does not compile kernels", file=sys.stderr)
        return 2
    if len(sys.argv) == 3 and sys.argv[1] == "--decode-ptx":
        write_decode_ptx(sys.argv[2])
        return 0
    jobs = [lambda d=d, t=t: compile_prefill(d, t) for d in (torch.float16, torch.bfloat16) for t in (True, False)]
    jobs += [lambda d=d, g=g: compile_decode(d, g) for d in (torch.float16, torch.bfloat16) for g in (1, 4)]
    failed = 0
    for job in jobs:
        try:
            print(job(), flush=True)
        except Exception as error:  # noqa: BLE001 - every failure is printed, the exit status reports them
            failed += 1
            print(f"FAILED: {error!r}"[:2000], flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
