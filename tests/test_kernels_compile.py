"""Every Triton kernel compiles for an H100 (sm_90) with the installed triton, without a GPU.

The interpreter runs the kernels' Python, not Triton's compiler: a kernel can pass every CPU test and still be
rejected by the CUDA backend. Triton compiles ahead of time for an explicit target with no device present, so this
test catches that here. It runs in a subprocess because the kernels must be decorated with TRITON_INTERPRET unset
(conftest sets it for the other tests). Run this file directly to see per-kernel compile times and division/sqrt
instruction counts.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

# (label, module, kernel, runtime arguments as dtype names / example values, constexprs), at training shapes
DTYPES = {"f32": "*fp32", "bf16": "*bf16", "i64": "*i64", "u8": "*u8", "bool": "*i1"}


def _cases() -> list[tuple]:
    motion = [(f"motion_targets upsample={up} norm={norm} first={first}", "motion", "_motion_targets_kernel",
               dict(tracks_ptr="f32", targets_ptr="bf16", stat_ptr="f32", src_scale=0.5, eps=1e-6, safe_eps_sq=1e-4),
               dict(FRAMES=8, GRID=grid, UPSAMPLE=up, TOKENS_SIDE=14, POINTS_SIDE=2, POOL_SIDE=grid // 14,
                    FROM_FIRST=first, NORM=norm, BLOCK_TOK=64, BLOCK_VAL=8, BLOCK_POOL=(grid // 14) ** 2))
              for up, grid, norm, first in [(2, 14, 1, False), (1, 28, 0, False), (2, 14, 2, True)]]
    masks = [(f"mask by_stat={by_stat} draws={draws}", "masking", "_tube_mask_kernel",
              dict(stat_ptr="f32", high_draws_ptr="f32", low_draws_ptr="f32", mask_ptr="bool", visible_ptr="i64",
                   masked_ptr="i64", key=2 ** 31 + 7, num_frames=8),
              dict(TOKENS=196, HIGH_SIZE=98 if by_stat else 196, HIGH_VISIBLE=10 if by_stat else 20,
                   LOW_VISIBLE=10 if by_stat else 0, HIGH_STREAM=0 if by_stat else 2, LOW_STREAM=1, BY_STAT=by_stat,
                   HIGH_DRAWS=draws, LOW_DRAWS=draws, BLOCK=256))
             for by_stat, draws in [(True, False), (True, True), (False, False)]]
    # as launched: 8 warps for BLOCK_P 512, and a stride of 1 (channel-last u8 frames) specialised to a constant
    patches = [(f"pixels u8={u8} raw={raw} patch_norm={norm}", "pixels", "_patch_kernel",
                dict(video_ptr="u8" if u8 else "f32", idx_ptr="i64", out_ptr=out, num_idx=1408, num_tokens=1568,
                     grid_h=14, grid_w=14, stride_b=2408448, stride_t=150528, stride_h=672, stride_w=3,
                     mean0=0.485, mean1=0.456, mean2=0.406, std0=0.229, std1=0.224, std2=0.225, eps=1e-6,
                     **({} if u8 else dict(stride_c=50176))),
                dict(TUBELET=2, PATCH=16, U8_INPUT=u8, RAW_OUTPUT=raw, CHANNEL_LAST_OUT=raw, PATCH_NORM=norm,
                     HAS_IDX=True, BLOCK_P=512, **(dict(stride_c=1) if u8 else {})), dict(num_warps=8))
               for u8, raw, norm, out in [(True, False, False, "bf16"), (True, True, True, "f32"),
                                          (False, True, True, "f32"), (False, False, False, "f32")]]
    rows = dict(idx_ptr="i64", num_rows=45056, num_idx=1408, num_tokens=1568, dim=8)
    gather = [("gather_tokens forward", "gather", "_gather_rows_kernel",
               dict(src_ptr="bf16", dst_ptr="bf16", **rows), dict(BLOCK_ROWS=512, BLOCK_D=8)),
              ("gather_tokens backward", "gather", "_scatter_add_rows_kernel",
               dict(grad_out_ptr="bf16", grad_src_ptr="f32", **rows), dict(BLOCK_ROWS=512, BLOCK_D=8))]
    uniform = [("counter_uniform", "rng", "_counter_uniform_kernel",
                dict(clip_ptr="i64", stream_ptr="i64", position_ptr="i64", out_ptr="f32", key=2 ** 31 + 5,
                     numel=1000), dict(BLOCK=1024))]
    return uniform + motion + masks + patches + gather


def compile_all(arch: int = 90) -> list[str]:
    """Compile every case; returns one report line per kernel, raising on the first failure."""
    import importlib
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    lines = []
    for label, module_name, kernel_name, args, constexprs, *options in _cases():
        kernel = getattr(importlib.import_module(f"trackmae_stream.kernels.{module_name}"), kernel_name)
        signature = {}
        for name in inspect.signature(kernel.fn).parameters:
            if name in constexprs:
                signature[name] = "constexpr"
            elif isinstance(args[name], str):
                signature[name] = DTYPES[args[name]]
            elif isinstance(args[name], float):
                signature[name] = "fp32"
            else:
                signature[name] = "i32" if -2 ** 31 <= args[name] < 2 ** 31 else "i64"
        start = time.perf_counter()
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", arch, 32), options=options[0] if options else None)
        ptx = compiled.asm["ptx"]
        lines.append(f"{label}: {time.perf_counter() - start:.1f} s, div.rn {ptx.count('div.rn.f32')}, "
                     f"div.full {ptx.count('div.full.f32')}, sqrt.rn {ptx.count('sqrt.rn.f32')}")
    return lines


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's notice; the default itself is unchanged
    result = subprocess.run([sys.executable, str(Path(__file__).resolve())], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"a kernel failed to compile:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert result.stdout.count("\n") == len(_cases()), result.stdout


if __name__ == "__main__":
    print("\n".join(compile_all()))
