"""Analytic FLOP count of a CoTracker3 forward (2 FLOPs per multiply-add, as torch's FlopCounterMode counts).

Counted: convolutions, linear layers, attention products and the correlation products. Not counted (as in
FlopCounterMode): sampling, interpolation, normalisation and element-wise work.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

LATENT, HIDDEN, MLP_HIDDEN, INPUT_DIM, CORR_HIDDEN, CORR_OUT = 128, 384, 1536, 1110, 384, 256


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def encoder_flops(height: int, width: int) -> float:
    """FLOPs of the feature encoder (BasicEncoder) on one frame of height x width."""
    total = 0.0

    def conv(h, w, c_in, c_out, kernel, stride, padding):
        nonlocal total
        h, w = _conv_out(h, kernel, stride, padding), _conv_out(w, kernel, stride, padding)
        total += 2.0 * h * w * c_out * c_in * kernel * kernel
        return h, w

    h, w = conv(height, width, 3, 64, 7, 2, 3)
    c_in = 64
    for c_out, stride in ((64, 1), (96, 2), (128, 2), (128, 2)):
        h_in, w_in = h, w
        h, w = conv(h_in, w_in, c_in, c_out, 3, stride, 1)  # block 0
        conv(h, w, c_out, c_out, 3, 1, 1)
        if stride != 1:
            conv(h_in, w_in, c_in, c_out, 1, stride, 0)
        conv(h, w, c_out, c_out, 3, 1, 1)  # block 1
        conv(h, w, c_out, c_out, 3, 1, 1)
        c_in = c_out
    h4, w4 = height // 4, width // 4
    conv(h4, w4, 64 + 96 + 128 + 128, 256, 3, 1, 1)
    conv(h4, w4, 256, LATENT, 1, 1, 0)
    return total


def _attention_block_flops(n_query: float, n_key: float, groups: float) -> float:
    """One pre-norm (cross-)attention block: projections, attention products and the MLP, over `groups` sets."""
    projections = 2.0 * (2 * n_query * HIDDEN * HIDDEN + n_key * HIDDEN * 2 * HIDDEN)
    attention = 2.0 * 2 * n_query * n_key * HIDDEN
    mlp = 2.0 * 2 * n_query * HIDDEN * MLP_HIDDEN
    return groups * (projections + attention + mlp)


def update_transformer_flops(n_frames: int, n_points: int, n_virtual: int = 64, depth: int = 3) -> float:
    """FLOPs of one EfficientUpdateFormer call on (N points, T frames) tokens."""
    tokens = n_points * n_frames
    total = 2.0 * tokens * INPUT_DIM * HIDDEN + 2.0 * tokens * HIDDEN * 4  # input transform, flow + vis/conf heads
    for _ in range(depth):
        total += _attention_block_flops(n_frames, n_frames, n_points + n_virtual)  # time, per track
        total += _attention_block_flops(n_virtual, n_points, n_frames)  # virtual <- points, per frame
        total += _attention_block_flops(n_virtual, n_virtual, n_frames)  # virtual self-attention
        total += _attention_block_flops(n_points, n_virtual, n_frames)  # points <- virtual
    return total


@dataclass
class FlopBreakdown:
    """GFLOP of one forward on one clip, by part."""

    encoder: float
    update_transformer: float
    corr_mlp: float
    correlation: float

    @property
    def total(self) -> float:
        return self.encoder + self.update_transformer + self.corr_mlp + self.correlation

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def cotracker3_gflop(n_frames: int, n_points: int, height: int, width: int, iters: int, *, window: int | None = None,
                     levels: int = 4, radius: int = 3, backward: bool = False) -> FlopBreakdown:
    """GFLOP per clip of the offline model (window=None) or the online model (sliding windows of `window`).

    `n_points` counts every query the network sees (e.g. + 36 for the predictor's support grid). `backward` adds
    the backward pass of the predictor (tracking only: the encoder output is reused).
    """
    side = (2 * radius + 1) ** 2
    if window is None:
        spans = [n_frames]
        encoded = n_frames
    else:
        step = window // 2
        n_windows = max(1, (n_frames - window + step - 1) // step + 1)
        spans = [window] * n_windows
        encoded = n_frames  # the padding frames repeat the last frame's features
    passes = 2 if backward else 1
    frames_tracked = passes * sum(spans)
    per_iter_transformer = passes * sum(update_transformer_flops(s, n_points) for s in spans)
    corr_mlp = 2.0 * levels * frames_tracked * n_points * (side * side * CORR_HIDDEN + CORR_HIDDEN * CORR_OUT)
    correlation = 2.0 * levels * frames_tracked * n_points * side * side * LATENT
    return FlopBreakdown(encoder=encoded * encoder_flops(height, width) / 1e9,
                         update_transformer=iters * per_iter_transformer / 1e9,
                         corr_mlp=iters * corr_mlp / 1e9, correlation=iters * correlation / 1e9)
