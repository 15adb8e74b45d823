"""Tube masking and motion-aware (motion-bin) tube masking, with fixed visible counts per clip.

Definitions (README_vectors.md section 2, with the official shortfall flaw fixed):

- S tokens per frame; K = S - int(mask_ratio * S) visible per frame; the same spatial pattern in all T slots (tube).
- Motion-aware: bin order = the token statistics in a STABLE descending order (ties: lower token index first); the
  high bin is its first ceil(S/2) tokens, the low bin the rest, both in that order. K1 = int(rho * K) clamped to
  [0, K] and to the high bin's size, K2 = K - K1, and when K2 exceeds the low bin's size the excess moves to the high
  bin, so exactly K distinct tokens are visible (the official code draws the high bin's shortfall with replacement
  and shows fewer).
- Within a bin, the visible positions are those with the n largest draws (ties: lower position first), i.e. the
  official `topk(r, n).indices` mapped through the bin order. Draws are counter-based (`rng.py`): u(key(seed, step,
  rank), clip, bin stream, position in bin), or explicit tensors (the official path: torch.rand on a CPU generator).
- Tube masking: one bin holding the S tokens in index order, K visible, drawn from its own stream.
- Outputs: `MaskOutput(mask (B, T*S) bool True = masked, visible_idx (B, T*K), masked_idx (B, T*(S-K)))`, token
  index t*S + s, both index lists ascending. Every shape depends only on the arguments, never on data.

The torch twins are the definitions; the Triton kernel does the whole mask of one clip in one program with three
in-register bitonic sorts of packed 64-bit keys (bin order, draw order, output order).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ._triton import HAS_TRITON, next_power_of_2, require_triton, tl, triton
from .rng import STREAM_HIGH_BIN, STREAM_LOW_BIN, STREAM_TUBE, counter_uniform_torch, key_argument, rng_key

if HAS_TRITON:
    from .rng import triton_counter_uniform

# Packed sort keys hold a token index and a position in 15 bits each.
MAX_TOKENS_PER_FRAME = 2 ** 15 - 1


class MaskOutput(NamedTuple):
    """A tube mask in the trainer's fixed-size format (token index t*S + s)."""

    mask: Tensor  # (B, T*S) bool, True = masked
    visible_idx: Tensor  # (B, T*K) int64, ascending
    masked_idx: Tensor  # (B, T*(S-K)) int64, ascending


@dataclass(frozen=True)
class BinCounts:
    """How many tokens each bin holds and shows, per frame."""

    tokens: int  # S
    visible: int  # K
    high_size: int  # tokens in the high bin (ceil(S/2); S for plain tube masking)
    high_visible: int  # K1
    low_visible: int  # K2

    @property
    def low_size(self) -> int:
        return self.tokens - self.high_size


def visible_per_frame(tokens_per_frame: int, mask_ratio: float) -> int:
    """K = S - int(mask_ratio * S), the VideoMAE/TrackMAE tube generator's count."""
    if not isinstance(tokens_per_frame, int) or not 1 <= tokens_per_frame <= MAX_TOKENS_PER_FRAME:
        raise ValueError(f"tokens per frame must be an int in [1, {MAX_TOKENS_PER_FRAME}], got {tokens_per_frame!r}")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1) so that at least one token stays visible, got {mask_ratio}")
    return tokens_per_frame - int(mask_ratio * tokens_per_frame)


def motion_bin_counts(tokens_per_frame: int, mask_ratio: float, rho: float) -> BinCounts:
    """Bin sizes and visible counts for motion-aware masking (see module doc)."""
    if tokens_per_frame < 2:
        raise ValueError(f"motion-aware masking needs >= 2 tokens per frame (two bins), got {tokens_per_frame}")
    visible = visible_per_frame(tokens_per_frame, mask_ratio)
    if not math.isfinite(rho):
        raise ValueError(f"rho must be a finite number, got {rho}")
    rho = min(max(float(rho), 0.0), 1.0)
    high_size = (tokens_per_frame + 1) // 2
    low_size = tokens_per_frame - high_size
    high_visible = min(max(int(rho * visible), 0), visible, high_size)
    low_visible = visible - high_visible
    if low_visible > low_size:  # the low bin runs short: its excess moves to the high bin
        high_visible += low_visible - low_size
        low_visible = low_size
    return BinCounts(tokens_per_frame, visible, high_size, high_visible, low_visible)


def _check_common(num_frames: int, seed: int, step: int, rank: int) -> int:
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
    return rng_key(seed, step, rank)


def _check_token_stat(token_stat: Tensor) -> None:
    if not isinstance(token_stat, Tensor) or token_stat.ndim != 2:
        raise ValueError(f"motion_aware_mask: token_stat must be a (B, S) tensor, got "
                         f"{tuple(token_stat.shape) if isinstance(token_stat, Tensor) else type(token_stat).__name__}")
    if not token_stat.is_floating_point():
        raise TypeError(f"motion_aware_mask: token_stat must be floating point, got {token_stat.dtype}")


def _check_draws(name: str, draws: Tensor | None, batch: int, size: int, device: torch.device) -> Tensor | None:
    if draws is None:
        return None
    if not isinstance(draws, Tensor) or tuple(draws.shape) != (batch, size):
        shape = tuple(draws.shape) if isinstance(draws, Tensor) else type(draws).__name__
        raise ValueError(f"motion_aware_mask: {name} must have shape (B, bin size) = ({batch}, {size}), got {shape}")
    if not draws.is_floating_point():
        raise TypeError(f"motion_aware_mask: {name} must be floating point, got {draws.dtype}")
    if draws.device != device:
        raise ValueError(f"motion_aware_mask: {name} is on {draws.device} but token_stat is on {device}")
    return draws.to(torch.float32)


# ----------------------------------------------------------------------------------------------------------- torch


def motion_bin_order_torch(token_stat: Tensor) -> Tensor:
    """(B, S) int64: tokens by descending statistic, ties by ascending token index (a stable sort)."""
    return torch.sort(token_stat, dim=1, descending=True, stable=True).indices


def _visible_spatial_torch(order: Tensor, counts: BinCounts, key: int, high_draws: Tensor | None,
                           low_draws: Tensor | None, high_stream: int) -> Tensor:
    """(B, S) bool spatial mask (True = masked) from a bin order: the n largest draws of each bin are visible."""
    batch, tokens = order.shape
    clip = torch.arange(batch, device=order.device)[:, None]
    bins = ((0, counts.high_size, counts.high_visible, high_draws, high_stream),
            (counts.high_size, counts.low_size, counts.low_visible, low_draws, STREAM_LOW_BIN))
    visible = []
    for start, size, shown, draws, stream in bins:
        if shown == 0:
            continue
        if draws is None:
            position = torch.arange(size, device=order.device)[None, :]
            draws = counter_uniform_torch(key, clip, stream, position)
        chosen = torch.sort(draws, dim=1, descending=True, stable=True).indices[:, :shown]
        visible.append(order[:, start:start + size].gather(1, chosen))
    spatial_mask = torch.ones(batch, tokens, dtype=torch.bool, device=order.device)
    return spatial_mask.scatter_(1, torch.cat(visible, dim=1), False)


def tube_output_from_spatial(spatial_mask: Tensor, num_frames: int, visible: int) -> MaskOutput:
    """Repeat a (B, S) spatial mask (True = masked, exactly `visible` False per row) over `num_frames` slots."""
    batch, tokens = spatial_mask.shape
    # a stable sort of the flags lists the visible tokens first, then the masked ones, each in ascending order
    by_flag = torch.sort(spatial_mask.to(torch.uint8), dim=1, stable=True).indices
    frame_offset = (torch.arange(num_frames, device=spatial_mask.device) * tokens)[None, :, None]
    visible_idx = (by_flag[:, None, :visible] + frame_offset).reshape(batch, num_frames * visible)
    masked_idx = (by_flag[:, None, visible:] + frame_offset).reshape(batch, num_frames * (tokens - visible))
    return MaskOutput(spatial_mask.repeat(1, num_frames), visible_idx, masked_idx)


def motion_aware_mask_from_order_torch(order: Tensor, *, num_frames: int, mask_ratio: float, rho: float,
                                       seed: int = 0, step: int = 0, rank: int = 0,
                                       high_draws: Tensor | None = None,
                                       low_draws: Tensor | None = None) -> MaskOutput:
    """Motion-aware mask from a given bin order (B, S) (e.g. the official unstable CPU argsort, for the vectors)."""
    key = _check_common(num_frames, seed, step, rank)
    if order.ndim != 2:
        raise ValueError(f"motion_aware_mask: order must be (B, S), got {tuple(order.shape)}")
    counts = motion_bin_counts(order.shape[1], mask_ratio, rho)
    high_draws = _check_draws("high_draws", high_draws, order.shape[0], counts.high_size, order.device)
    low_draws = _check_draws("low_draws", low_draws, order.shape[0], counts.low_size, order.device)
    spatial = _visible_spatial_torch(order, counts, key, high_draws, low_draws, STREAM_HIGH_BIN)
    return tube_output_from_spatial(spatial, num_frames, counts.visible)


def motion_aware_mask_torch(token_stat: Tensor, *, num_frames: int, mask_ratio: float, rho: float, seed: int = 0,
                            step: int = 0, rank: int = 0, high_draws: Tensor | None = None,
                            low_draws: Tensor | None = None) -> MaskOutput:
    """Reference twin of motion-aware masking from token statistics (B, S). See module doc."""
    _check_token_stat(token_stat)
    return motion_aware_mask_from_order_torch(
        motion_bin_order_torch(token_stat), num_frames=num_frames, mask_ratio=mask_ratio, rho=rho, seed=seed,
        step=step, rank=rank, high_draws=high_draws, low_draws=low_draws)


def tube_mask_torch(batch: int, *, tokens_per_frame: int, num_frames: int, mask_ratio: float, seed: int = 0,
                    step: int = 0, rank: int = 0, device: torch.device | str | None = None) -> MaskOutput:
    """Reference twin of plain tube masking: K tokens per clip uniformly at random, repeated over time."""
    key = _check_common(num_frames, seed, step, rank)
    if not isinstance(batch, int) or batch < 0:
        raise ValueError(f"tube_mask: batch must be an int >= 0, got {batch!r}")
    visible = visible_per_frame(tokens_per_frame, mask_ratio)
    counts = BinCounts(tokens_per_frame, visible, tokens_per_frame, visible, 0)
    order = torch.arange(tokens_per_frame, device=device).expand(batch, tokens_per_frame)
    spatial = _visible_spatial_torch(order, counts, key, None, None, STREAM_TUBE)
    return tube_output_from_spatial(spatial, num_frames, visible)


# ---------------------------------------------------------------------------------------------------------- triton

if HAS_TRITON:

    @triton.jit
    def _float_order(value):
        """int64 in [0, 2**32) with the order of the float32 values; -0 equals +0 and every NaN sorts above +inf
        (torch.sort's convention)."""
        value = tl.where(value == 0.0, 0.0, value)
        bits = value.to(tl.int32, bitcast=True).to(tl.int64)
        order = tl.where(bits < 0, -1 - bits, bits + 2147483648)
        return tl.where(value != value, order * 0 + 4294967295, order)

    @triton.jit(do_not_specialize=["key"])
    def _tube_mask_kernel(
        stat_ptr, high_draws_ptr, low_draws_ptr, mask_ptr, visible_ptr, masked_ptr,
        key, num_frames,
        TOKENS: tl.constexpr, HIGH_SIZE: tl.constexpr, HIGH_VISIBLE: tl.constexpr, LOW_VISIBLE: tl.constexpr,
        HIGH_STREAM: tl.constexpr, LOW_STREAM: tl.constexpr, BY_STAT: tl.constexpr,
        HIGH_DRAWS: tl.constexpr, LOW_DRAWS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """One program per clip. Sort keys (int64, all real keys > 0 so that padding, 0, sorts last):
        bin order  = float_order(stat) << 15 | (0x7FFF - token)                      (descending)
        draw order = in_high << 62 | float_order(u) << 30 | (0x7FFF - pos) << 15 | token  (descending)
        output     = is_masked << 15 | token                                          (ascending)"""
        clip = tl.program_id(0)
        clip64 = clip.to(tl.int64)
        visible: tl.constexpr = HIGH_VISIBLE + LOW_VISIBLE
        low_size: tl.constexpr = TOKENS - HIGH_SIZE
        slot = tl.arange(0, BLOCK)
        real = slot < TOKENS

        if BY_STAT:
            stat = tl.load(stat_ptr + clip64 * TOKENS + slot, mask=real, other=0.0)
            order_key = tl.where(real, (_float_order(stat) << 15) | (0x7FFF - slot), 0)
            token = 0x7FFF - (tl.sort(order_key, descending=True) & 0x7FFF)  # token at each bin-order slot
        else:
            token = slot.to(tl.int64)

        in_high = slot < HIGH_SIZE
        position = tl.where(in_high, slot, slot - HIGH_SIZE)
        counter = tl.zeros_like(slot)
        draw = triton_counter_uniform(key, counter + clip, tl.where(in_high, counter + HIGH_STREAM,
                                                                     counter + LOW_STREAM), position)
        if HIGH_DRAWS:
            high_u = tl.load(high_draws_ptr + clip64 * HIGH_SIZE + slot, mask=real & in_high, other=0.0)
            draw = tl.where(in_high, high_u, draw)
        if LOW_DRAWS:
            low_u = tl.load(low_draws_ptr + clip64 * low_size + position, mask=real & ~in_high, other=0.0)
            draw = tl.where(in_high, draw, low_u)
        draw_key = ((in_high.to(tl.int64) << 62) | (_float_order(draw) << 30)
                    | ((0x7FFF - position).to(tl.int64) << 15) | token)
        picked = tl.sort(tl.where(real, draw_key, 0), descending=True) & 0x7FFF

        shown = (slot < HIGH_VISIBLE) | ((slot >= HIGH_SIZE) & (slot < HIGH_SIZE + LOW_VISIBLE))
        out_key = tl.where(real, (tl.where(shown, 0, 1).to(tl.int64) << 15) | picked, 1 << 20)
        out_token = tl.sort(out_key) & 0x7FFF  # visible tokens ascending, then masked tokens ascending
        is_masked = slot >= visible

        mask_row = mask_ptr + clip64 * num_frames * TOKENS
        visible_row = visible_ptr + clip64 * num_frames * visible
        masked_row = masked_ptr + clip64 * num_frames * (TOKENS - visible)
        for t in range(num_frames):
            index = out_token + t * TOKENS
            tl.store(mask_row + index, is_masked, mask=real)
            tl.store(visible_row + t * visible + slot, index, mask=slot < visible)
            tl.store(masked_row + t * (TOKENS - visible) + (slot - visible), index, mask=real & is_masked)


def _launch_mask_kernel(batch: int, counts: BinCounts, num_frames: int, key: int, device: torch.device,
                        token_stat: Tensor | None, high_draws: Tensor | None, low_draws: Tensor | None,
                        high_stream: int) -> MaskOutput:
    tokens, visible = counts.tokens, counts.visible
    mask = torch.empty(batch, num_frames * tokens, dtype=torch.bool, device=device)
    visible_idx = torch.empty(batch, num_frames * visible, dtype=torch.int64, device=device)
    masked_idx = torch.empty(batch, num_frames * (tokens - visible), dtype=torch.int64, device=device)
    if batch == 0:
        return MaskOutput(mask, visible_idx, masked_idx)
    placeholder = visible_idx  # any device pointer, for the arguments a specialisation never reads
    _tube_mask_kernel[(batch,)](
        token_stat.contiguous() if token_stat is not None else placeholder,
        high_draws.contiguous() if high_draws is not None else placeholder,
        low_draws.contiguous() if low_draws is not None else placeholder,
        mask, visible_idx, masked_idx, key_argument(key), num_frames,
        TOKENS=tokens, HIGH_SIZE=counts.high_size, HIGH_VISIBLE=counts.high_visible,
        LOW_VISIBLE=counts.low_visible, HIGH_STREAM=high_stream, LOW_STREAM=STREAM_LOW_BIN,
        BY_STAT=token_stat is not None, HIGH_DRAWS=high_draws is not None, LOW_DRAWS=low_draws is not None,
        BLOCK=max(2, next_power_of_2(tokens)),
    )
    return MaskOutput(mask, visible_idx, masked_idx)


def motion_aware_mask_triton(token_stat: Tensor, *, num_frames: int, mask_ratio: float, rho: float, seed: int = 0,
                             step: int = 0, rank: int = 0, high_draws: Tensor | None = None,
                             low_draws: Tensor | None = None) -> MaskOutput:
    """Triton twin of `motion_aware_mask_torch`: one program per clip, no host sync."""
    _check_token_stat(token_stat)
    key = _check_common(num_frames, seed, step, rank)
    require_triton(token_stat.device, "motion_aware_mask")
    batch, tokens = token_stat.shape
    counts = motion_bin_counts(tokens, mask_ratio, rho)
    high_draws = _check_draws("high_draws", high_draws, batch, counts.high_size, token_stat.device)
    low_draws = _check_draws("low_draws", low_draws, batch, counts.low_size, token_stat.device)
    return _launch_mask_kernel(batch, counts, num_frames, key, token_stat.device, token_stat.to(torch.float32),
                               high_draws, low_draws, STREAM_HIGH_BIN)


def tube_mask_triton(batch: int, *, tokens_per_frame: int, num_frames: int, mask_ratio: float, seed: int = 0,
                     step: int = 0, rank: int = 0, device: torch.device | str | None = None) -> MaskOutput:
    """Triton twin of `tube_mask_torch`."""
    key = _check_common(num_frames, seed, step, rank)
    if not isinstance(batch, int) or batch < 0:
        raise ValueError(f"tube_mask: batch must be an int >= 0, got {batch!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    require_triton(device, "tube_mask")
    visible = visible_per_frame(tokens_per_frame, mask_ratio)
    counts = BinCounts(tokens_per_frame, visible, tokens_per_frame, visible, 0)
    return _launch_mask_kernel(batch, counts, num_frames, key, device, None, None, None, STREAM_TUBE)
