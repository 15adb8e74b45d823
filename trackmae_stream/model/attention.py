"""One attention function with two backends: xformers' memory-efficient attention and torch SDPA.

Tensors use xformers' layout (B, N, heads, head_dim) because that is what a fused qkv projection produces without a
copy; SDPA gets a transposed view. Both compute softmax(q k^T / sqrt(d)) v with no mask and no dropout.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "xformers", "sdpa")


@functools.lru_cache(maxsize=1)
def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or a build that fails to load its extension
        return False
    return True


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """`auto` -> xformers on CUDA when it is installed, else SDPA. An explicit choice is honoured or refused."""
    device = torch.device(device)
    if requested not in BACKENDS:
        raise ValueError(f"model.attention={requested!r}: expected one of {BACKENDS}")
    if requested == "auto":
        return "xformers" if device.type == "cuda" and xformers_available() else "sdpa"
    if requested == "xformers":
        if not xformers_available():
            raise RuntimeError("model.attention='xformers' but xformers is not installed (pip install '.[xformers]')")
        if device.type != "cuda":
            raise RuntimeError("model.attention='xformers' needs a CUDA device: memory_efficient_attention has no CPU "
                               "kernel; use model.attention=sdpa or auto")
    return requested


def attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "sdpa") -> Tensor:
    """q, k, v: (B, N, H, D) -> (B, N, H, D)."""
    if backend == "xformers":
        import xformers.ops as xops

        return xops.memory_efficient_attention(q, k, v)
    if backend != "sdpa":
        raise ValueError(f"attention backend {backend!r} is not resolved; call resolve_backend first")
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
