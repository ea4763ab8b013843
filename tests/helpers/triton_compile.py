"""Compiles the Triton attention kernels for a GPU target without a GPU (Triton ships ptxas):
catches what the interpreter lets through (types across branches, constexpr rules, dot shapes).

    python -m tests.helpers.triton_compile [--arch 90]

Run without TRITON_INTERPRET set (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from shared.engine.model import triton_attention as ta

ELEM = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int8": "i8", "fp8": "fp8e4nv"}


def _compile(fn, types: dict[str, str], constants: dict, arch: int):
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        else:
            signature[name] = types.get(name, "i32")
    src = ASTSource(fn=fn, signature=signature, constexprs=constants)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32))


# a spread of the engine's cases: half and float32, head sizes 64/128, GQA ratios 1/4/8, 8-bit scaled
CASES = [("bfloat16", 128, 8, False), ("bfloat16", 64, 4, True), ("float16", 64, 1, False),
         ("float32", 128, 4, False)]


def quick_variants():
    """Three compilations covering every kernel and both load paths (for the unit test)."""
    decode, varlen, merge = ta._decode_split_kernel, ta._varlen_kernel, ta._decode_merge_kernel
    picked = {}
    for fn, types, constants in variants([("bfloat16", 128, 8, True), ("bfloat16", 128, 8, False)]):
        key = (fn, constants.get("SCALED"), constants.get("NUM_SPLITS"))
        if key in ((decode, True, 8), (varlen, False, None), (merge, None, 16)):
            picked[key] = (fn, types, constants)
    return list(picked.values())


def packed_variants():
    """Both kernels reading the engine's packed 8-bit rows (fp8: uint8 cache, int8: int8 cache)."""
    for packed, cache in ((1, "*u8"), (2, "*i8")):
        common = dict(HEAD_DIM=64, D_PAD=64, SCALED=False, PRECISION="tf32", UPCAST=False, BLOCK_SIZE=16,
                      GROUP=4, k_scale=None, v_scale=None, PACKED=packed)
        ptrs = dict(q="*bf16", k_cache=cache, v_cache=cache, block_tables="*i32", context_lens="*i32",
                    part_acc="*fp32", part_max="*fp32", part_sum="*fp32", out="*bf16", cu_q_lens="*i32",
                    scale="fp32")
        yield ta._decode_split_kernel, ptrs, dict(common, GROUP_PAD=16, BLOCK_N=32, NUM_SPLITS=4)
        yield ta._varlen_kernel, ptrs, dict(common, BLOCK_M=64, BLOCK_N=64)


def variants(cases=CASES):
    """(kernel, pointer types, constexprs) for the shapes and dtypes the engine uses."""
    for dtype, d, group, scaled in cases:
        q = "*" + ELEM[dtype]
        cache = "*i8" if scaled else q
        scales = {} if scaled else {"k_scale": None, "v_scale": None}
        common = dict(HEAD_DIM=d, D_PAD=d, SCALED=scaled, PRECISION="ieee" if dtype == "float32" else "tf32",
                      UPCAST=False, BLOCK_SIZE=16, GROUP=group, PACKED=0, **scales)
        ptrs = dict(q=q, k_cache=cache, v_cache=cache, k_scale="*fp32", v_scale="*fp32", block_tables="*i32",
                    context_lens="*i32", part_acc="*fp32", part_max="*fp32", part_sum="*fp32", out=q,
                    cu_q_lens="*i32", scale="fp32")
        for splits in (1, 8) if d == 128 else (4,):
            yield ta._decode_split_kernel, ptrs, dict(common, GROUP_PAD=max(16, group), BLOCK_N=32,
                                                     NUM_SPLITS=splits)
        yield ta._varlen_kernel, ptrs, dict(common, BLOCK_M=64, BLOCK_N=64)
    for splits in (1, 2, 16):
        yield ta._decode_merge_kernel, {"part_acc": "*fp32", "part_max": "*fp32", "part_sum": "*fp32",
                                        "out": "*bf16"}, dict(HEAD_DIM=128, D_PAD=128, NUM_SPLITS=splits,
                                                              SPLITS_PAD=max(2, splits))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100/H200)")
    p.add_argument("--cases", choices=("quick", "default", "all", "packed"), default="default",
                   help="quick: one compilation per kernel; all: every dtype x head size x GQA ratio x scaling; "
                   "packed: the 8-bit KV rows")
    args = p.parse_args(argv)
    todo = quick_variants() if args.cases == "quick" else list(variants(CASES))
    if args.cases == "packed":
        todo = list(packed_variants())
    if args.cases == "all":
        todo = list(variants([c for c in itertools.product(("bfloat16", "float16", "float32"), (64, 128), (1, 4, 8),
                                                           (False, True)) if not c[3] or c[0] == "bfloat16"]))
    if ta.INTERPRETED:
        print("TRITON_INTERPRET is set: nothing to compile", file=sys.stderr)
        return 2
    n = 0
    for fn, types, constants in todo:
        _compile(fn, types, {k: v for k, v in constants.items() if k in fn.arg_names}, args.arch)
        n += 1
    print(f"compiled {n} kernel variants for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
