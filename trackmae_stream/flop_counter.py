"""A FLOP counter whose per-op formulas are ours, so a count does not move between torch releases.

torch's `FlopCounterMode` is the obvious tool, but its registry changes between releases (2.14 does not count the
CPU flash-attention kernel that 2.15 counts, so the same forward gave 4.82 M vs 6.83 M FLOPs). This counter sees the
same dispatcher ops (a `TorchDispatchMode`, i.e. after composite ops such as `linear`, `matmul`, `einsum` and the
math attention path have been decomposed) and applies fixed formulas, 2 FLOPs per multiply-add, to:

- matrix products: mm, addmm, bmm, baddbmm, mv, addmv, dot;
- convolutions (forward, any dimensionality, grouped, transposed);
- every fused attention kernel (flash, memory-efficient, cuDNN, the CPU flash kernel): 2·B·H·Lq·Lk·(Dqk + Dv).

Element-wise work, reductions, normalisation, softmax and sampling are not counted, as in FlopCounterMode and in the
project's analytic models. An op that looks like a product or an attention kernel but has no formula here is recorded
in `unknown`, so a release that routes work through a new kernel makes a comparison fail loudly instead of
undercounting. Backward ops are not counted: this counts forward passes.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _mm(a: torch.Tensor, b: torch.Tensor) -> float:
    return 2.0 * a.shape[0] * a.shape[1] * b.shape[1]


def _bmm(a: torch.Tensor, b: torch.Tensor) -> float:
    return 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


def _convolution(args: Sequence, out: torch.Tensor) -> float:
    # Each output element of a direct convolution costs (C_in / groups) * prod(kernel) multiply-adds; a transposed
    # convolution is the adjoint, so each *input* element scatters into C_out / groups * prod(kernel) outputs.
    x, w, transposed = args[0], args[1], bool(args[6])
    kernel = math.prod(w.shape[2:])
    return 2.0 * (x.numel() if transposed else out.numel()) * w.shape[1] * kernel


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float:
    """The SDPA family: (..., L, D) with any leading batch and head dimensions."""
    *batch, lq, dqk = q.shape
    return 2.0 * math.prod(batch) * lq * k.shape[-2] * (dqk + v.shape[-1])


def _bshd_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float:
    """_efficient_attention_forward / _flash_attention_forward: (B, L, H, D)."""
    b, lq, h, dqk = q.shape
    return 2.0 * b * h * lq * k.shape[1] * (dqk + v.shape[-1])


Formula = Callable[[Sequence, torch.Tensor], float]


def _formulas() -> dict[object, Formula]:
    """Op overload -> FLOPs from (positional args, output). Ops absent from this torch are left out."""
    table: dict[object, Formula] = {
        aten.mm.default: lambda a, out: _mm(a[0], a[1]),
        aten.addmm.default: lambda a, out: _mm(a[1], a[2]),
        aten.bmm.default: lambda a, out: _bmm(a[0], a[1]),
        aten.baddbmm.default: lambda a, out: _bmm(a[1], a[2]),
        aten.mv.default: lambda a, out: 2.0 * a[0].numel(),
        aten.addmv.default: lambda a, out: 2.0 * a[1].numel(),
        aten.dot.default: lambda a, out: 2.0 * a[0].numel(),
    }
    for name in ("convolution", "_convolution"):
        if hasattr(aten, name):
            table[getattr(aten, name).default] = _convolution
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_fused_attention_overrideable"):
        if hasattr(aten, name):
            table[getattr(aten, name).default] = lambda a, out: _sdpa(a[0], a[1], a[2])
    for name in ("_efficient_attention_forward", "_flash_attention_forward"):
        if hasattr(aten, name):
            table[getattr(aten, name).default] = lambda a, out: _bshd_attention(a[0], a[1], a[2])
    return table


# Name tokens of ops that do product-like work: such an op without a formula is reported, never silently skipped.
_PRODUCT_TOKENS = frozenset({"mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "einsum", "linear", "dot", "vdot",
                             "mv", "addmv", "attention", "tensordot", "chain", "bilinear"})


def _is_product_like(name: str) -> bool:
    tokens = name.strip("_").split("_")
    if "backward" in tokens or "upsample" in tokens:  # backward: not forward work; upsample_bilinear2d: sampling
        return False
    return any(t in _PRODUCT_TOKENS or t.startswith("conv") for t in tokens)


class OpFlopCounter(TorchDispatchMode):
    """Counts forward FLOPs by op with fixed formulas; use as a context manager.

    >>> with OpFlopCounter() as counter:
    ...     model(x)
    >>> counter.total, counter.by_op, counter.unknown
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self.unknown: Counter[str] = Counter()
        self._formulas = _formulas()

    @property
    def total(self) -> float:
        return float(sum(self.by_op.values()))

    def __torch_dispatch__(self, func, types: Sequence[type], args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        formula = self._formulas.get(func)
        if formula is not None:
            self.by_op[name] += formula(args, out[0] if isinstance(out, tuple | list) else out)
        elif _is_product_like(name):
            self.unknown[name] += 1
        return out


__all__ = ["OpFlopCounter"]
