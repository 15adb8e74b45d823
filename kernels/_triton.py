"""Optional Triton import and the checks shared by every kernel launcher.

CPU-only torch builds ship without triton; the torch twins must keep working there, so every kernel module defines
its Triton half only when `HAS_TRITON` is true and every launcher calls `require_triton` first.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with the CUDA torch builds used here
    triton = None
    tl = None
    HAS_TRITON = False

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when the kernel modules are imported; reading it at
# the same moment tells the launchers whether CPU tensors can run the kernels at all.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def require_triton(device: torch.device, what: str) -> None:
    """Raise a clear error when the Triton kernel `what` cannot run on tensors of `device`."""
    if not HAS_TRITON:
        raise RuntimeError(f"{what}: backend='triton' needs the triton package, which does not import here")
    if device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            f"{what}: backend='triton' on {device.type} tensors needs TRITON_INTERPRET=1 set before "
            "trackmae_stream.kernels is imported (the Triton interpreter); use backend='torch' instead")


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (>= 1): Triton block sizes must be powers of two."""
    return 1 << max(0, int(n) - 1).bit_length()
