"""Counter-based uniform draws, bit-identical in torch and Triton.

A draw is a pure function u(key, clip, stream, position) in [0, 1) with 24 random bits, where the 32-bit `key` folds
(seed, step, rank) on the host (`rng_key`, plain Python integers, so no device sync) and the counters are device
tensors. Nothing is stateful: the same arguments give the same draw on any device, in any launch order, which is what
lets the Triton masking kernel and its torch twin pick exactly the same tokens.

The hash is the "lowbias32" integer mixer (xor-shift / multiply rounds with good avalanche) applied once per
absorbed 32-bit word, with a golden-ratio increment between words so that zero words do not collapse the state.
It is written twice, once per backend: `_mix32` below works on Python ints and on int64 torch tensors (exact:
products are split into 16-bit halves so that nothing exceeds 2**49 and int64 never overflows), `triton_mix32`
works on uint32 Triton tensors (wrap-around multiply). Tests compare both bit for bit.
"""
from __future__ import annotations

import operator

import torch
from torch import Tensor

from ._triton import HAS_TRITON, require_triton, tl, triton

MASK32 = 0xFFFFFFFF
_MIX_MUL_A = 0x7FEB352D
_MIX_MUL_B = 0x846CA68B
_GOLDEN = 0x9E3779B9
_UNIFORM_SCALE = 2.0 ** -24

# Streams separate independent uses of one (key, clip): the two motion bins and plain tube masking.
STREAM_HIGH_BIN = 0
STREAM_LOW_BIN = 1
STREAM_TUBE = 2


def _mul32(x, constant: int):
    """(x * constant) mod 2**32 for x in [0, 2**32), exact on Python ints and int64 tensors.

    x = x_hi * 2**16 + x_lo, so x * c = x_lo * c + 2**16 * x_hi * c_lo (mod 2**32): each partial product stays
    below 2**48, far from int64 overflow.
    """
    low = (x & 0xFFFF) * constant
    high = (((x >> 16) * (constant & 0xFFFF)) & 0xFFFF) << 16
    return (low + high) & MASK32


def _mix32(x):
    """lowbias32 finaliser on a 32-bit word (Python int or int64 tensor holding values in [0, 2**32))."""
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX_MUL_A)
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX_MUL_B)
    return x ^ (x >> 16)


def _absorb(state, word):
    """Fold one 32-bit word into the hash state."""
    return _mix32(((state + _GOLDEN) & MASK32) ^ word)


def rng_key(seed: int, step: int, rank: int) -> int:
    """The 32-bit key of (seed, step, rank); each must be a Python integer in [0, 2**64).

    Computed on the host from plain integers, so the trainer's step counter costs no device sync.
    """
    state = 0
    for name, value in (("seed", seed), ("step", step), ("rank", rank)):
        if isinstance(value, Tensor):
            raise TypeError(f"rng_key: {name} must be a Python int, not a tensor (reading it would sync the device)")
        value = operator.index(value)
        if not 0 <= value < 2 ** 64:
            raise ValueError(f"rng_key: {name} must lie in [0, 2**64), got {value}")
        state = _absorb(state, value & MASK32)
        state = _absorb(state, value >> 32)
    return state


def key_argument(key: int) -> int:
    """The 32-bit key as a Triton launch argument: with bit 32 set it is always typed i64 (Triton types a scalar
    below 2**31 as i32), so one specialisation serves every step instead of a recompile when the key crosses 2**31;
    the kernels truncate it to uint32, which drops that bit."""
    return (key & MASK32) | (1 << 32)


def counter_uniform_torch(key: int, clip: Tensor, stream: Tensor | int, position: Tensor) -> Tensor:
    """Float32 draws in [0, 1) (multiples of 2**-24) for broadcastable int64 counters in [0, 2**32)."""
    state = _absorb(key, clip.to(torch.int64))
    state = _absorb(state, stream.to(torch.int64) if isinstance(stream, Tensor) else stream)
    state = _absorb(state, position.to(torch.int64))
    return (state >> 8).to(torch.float32) * _UNIFORM_SCALE


if HAS_TRITON:

    @triton.jit
    def triton_mix32(x):
        """lowbias32 on uint32 (multiplication wraps modulo 2**32)."""
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def triton_absorb(state, word):
        golden = tl.full(state.shape, 0x9E3779B9, tl.uint32)
        return triton_mix32((state + golden) ^ word.to(tl.uint32))

    @triton.jit
    def triton_counter_uniform(key, clip, stream, position):
        """Triton twin of `counter_uniform_torch`: `key` a scalar, the counters integer tensors of one shape."""
        state = triton_absorb(tl.zeros(position.shape, tl.uint32) + key.to(tl.uint32), clip)
        state = triton_absorb(state, stream)
        state = triton_absorb(state, position)
        return (state >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24

    @triton.jit(do_not_specialize=["key"])
    def _counter_uniform_kernel(clip_ptr, stream_ptr, position_ptr, out_ptr, key, numel, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        in_range = offsets < numel
        clip = tl.load(clip_ptr + offsets, mask=in_range, other=0)
        stream = tl.load(stream_ptr + offsets, mask=in_range, other=0)
        position = tl.load(position_ptr + offsets, mask=in_range, other=0)
        tl.store(out_ptr + offsets, triton_counter_uniform(key, clip, stream, position), mask=in_range)


def counter_uniform_triton(key: int, clip: Tensor, stream: Tensor, position: Tensor) -> Tensor:
    """Elementwise Triton evaluation of the draws (counters of one shape); used to test the kernels' hash."""
    require_triton(position.device, "counter_uniform_triton")
    clip, stream, position = torch.broadcast_tensors(clip, stream, position)
    clip, stream, position = (t.to(torch.int64).contiguous() for t in (clip, stream, position))
    out = torch.empty(position.shape, dtype=torch.float32, device=position.device)
    numel = out.numel()
    if numel:
        block = 1024
        _counter_uniform_kernel[(triton.cdiv(numel, block),)](clip, stream, position, out, key_argument(key), numel,
                                                              BLOCK=block)
    return out
