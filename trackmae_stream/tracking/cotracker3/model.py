"""CoTracker3 (offline and online), written from the description in SPEC.md.

Public entry points:
  - `CoTrackerThreeOffline()` / `CoTrackerThreeOnline()`: the released configurations (window 60 / 16, stride 4,
    corr_radius 3, 4 levels, 64 virtual tracks); `state_dict` keys and shapes equal the official checkpoints.
  - `forward(video, queries, iters=4)` -> (tracks (B,T,N,2) px, visibility (B,T,N), confidence (B,T,N), train_data),
    like the official forward. The online model also streams (`init_video_online_processing()`, `is_online=True`).
  - `encode(video)` and `track_features(fmaps, queries, iters)`: the same computation in two stages, so that a
    caller can reuse the encoder output (e.g. for backward tracking on the time-flipped features).

Internal layout: track state is kept as (B, N, T, ...) -- the update transformer's layout -- so no per-iteration
transposes of the large tensors are needed. Nothing mixes batch elements: every reshape keeps B outermost, sampling is
per sample, and the query frames are per sample. Shapes depend only on (B, T, N, H, W), so the forward is
`torch.compile`/CUDA-graph friendly (no host syncs, no data-dependent shapes).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import ATTENTION_BACKENDS, Attention, BasicEncoder, EfficientUpdateFormer, Mlp

LATENT_DIM = 128
INPUT_DIM = 1110  # vis(1) + conf(1) + 4 levels x 256 correlation embedding + 84 motion encoding
POSENC_DEGREES = 10


def sincos_time_embedding(embed_dim: int, num_positions: int) -> Tensor:
    """(1, num_positions, embed_dim) table [sin(p w_k), cos(p w_k)], w_k = 10000^(-k / (embed_dim/2)).

    Computed in float64, returned as float32.
    """
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0))
    pos = torch.arange(num_positions, dtype=torch.float32).to(torch.float64)
    angles = pos[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)[None].float()


def motion_posenc(x: Tensor, scales: Tensor) -> Tensor:
    """[x, sin(x 2^s), cos(x 2^s)] over the last axis, with (s, d) flattened s-major, as CoTracker3's `posenc`.

    `scales` holds 2^0..2^(S-1). The cosine is computed as sin(. + pi/2), the way the reference does it.
    """
    xb = (x.unsqueeze(-2) * scales[:, None]).flatten(-2)
    return torch.cat([x, torch.sin(torch.cat([xb, xb + 0.5 * math.pi], dim=-1))], dim=-1)


def _normalise_coords(x: Tensor, y: Tensor, width: int, height: int) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates -> grid_sample's [-1, 1] (align_corners=True), in the reference's operation order."""
    return x * (2.0 / max(width - 1, 1)) - 1.0, y * (2.0 / max(height - 1, 1)) - 1.0


class CoTrackerThreeBase(nn.Module):
    """Shared parts of the offline and online models: encoder, correlation, update iterations."""

    def __init__(self, window_len: int = 8, stride: int = 4, corr_radius: int = 3, corr_levels: int = 4,
                 num_virtual_tracks: int = 64, model_resolution: tuple[int, int] = (384, 512),
                 add_space_attn: bool = True, linear_layer_for_vis_conf: bool = True):
        super().__init__()
        self.window_len = window_len
        self.stride = stride
        self.corr_radius = corr_radius
        self.corr_levels = corr_levels
        self.latent_dim = LATENT_DIM
        self.num_virtual_tracks = num_virtual_tracks
        self.model_resolution = tuple(model_resolution)
        self.add_space_attn = add_space_attn
        self.linear_layer_for_vis_conf = linear_layer_for_vis_conf
        self.fnet = BasicEncoder(input_dim=3, output_dim=LATENT_DIM, stride=stride)
        self.updateformer = EfficientUpdateFormer(
            space_depth=3, time_depth=3, input_dim=INPUT_DIM, hidden_size=384, num_heads=8, output_dim=4,
            mlp_ratio=4.0, num_virtual_tracks=num_virtual_tracks, add_space_attn=add_space_attn,
            linear_layer_for_vis_conf=linear_layer_for_vis_conf)
        side = 2 * corr_radius + 1
        self.corr_mlp = Mlp(side ** 4, 384, 256, gelu_approximate="none")
        self.register_buffer("time_emb", sincos_time_embedding(INPUT_DIM, window_len))
        # Constants kept as non-persistent buffers (not in the state_dict): they follow .to(device) and need no
        # host-to-device copy inside forward, which CUDA-graph capture forbids.
        # Relative motion is divided by the model resolution in feature units, (W/s, H/s), whatever the input size.
        self.register_buffer("motion_scale", torch.tensor(
            [self.model_resolution[1] / stride, self.model_resolution[0] / stride], dtype=torch.float32),
            persistent=False)
        self.register_buffer("posenc_scales", torch.tensor([2.0 ** i for i in range(POSENC_DEGREES)]),
                             persistent=False)
        # Support-patch offsets (dx, dy), x-major: entry a * side + b is (a - r, b - r). This order fixes the layout of
        # the correlation vector fed to corr_mlp.
        offsets = torch.arange(-corr_radius, corr_radius + 1, dtype=torch.float32)
        self.register_buffer("patch_offsets", torch.stack(
            [offsets.repeat_interleave(side), offsets.repeat(side)], dim=-1), persistent=False)

    # ------------------------------------------------------------------ configuration
    def set_attention_backend(self, backend: str) -> None:
        """Select the attention implementation of every attention layer: "sdpa" (default) or "math" (explicit)."""
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}")
        for module in self.modules():
            if isinstance(module, Attention):
                module.backend = backend

    # ------------------------------------------------------------------ stage 1: features
    def encode(self, video: Tensor, chunk_frames: int = 200) -> Tensor:
        """Video (B, T, 3, H, W) in [0, 255] -> unit-norm features (B, T, 128, H/stride, W/stride), float32.

        Frames are encoded in chunks of at most `chunk_frames * B` (the result does not depend on the chunking).
        """
        batch, n_frames, channels, height, width = video.shape
        if channels != 3:
            raise ValueError(f"video must be (B, T, 3, H, W); got shape {tuple(video.shape)}")
        if height % self.stride or width % self.stride:
            raise ValueError(f"video height and width must be divisible by {self.stride}; got {height}x{width}")
        if min(height, width) // self.stride < 2 ** (self.corr_levels - 1):
            raise ValueError(f"video {height}x{width} is too small for {self.corr_levels} correlation levels "
                             f"(needs at least {self.stride * 2 ** (self.corr_levels - 1)} px per side)")
        frames = (2 * (video / 255.0) - 1.0).reshape(batch * n_frames, channels, height, width)
        step = max(chunk_frames, 1) * batch
        if frames.shape[0] <= step:
            fmaps = self.fnet(frames)
        else:
            fmaps = torch.cat([self.fnet(frames[i:i + step]) for i in range(0, frames.shape[0], step)], dim=0)
        fmaps = fmaps.float()
        # Per-pixel L2 normalisation over channels: correlations are then cosine similarities.
        fmaps = fmaps / torch.sqrt(torch.clamp_min(torch.sum(fmaps * fmaps, dim=1, keepdim=True), 1e-12))
        return fmaps.reshape(batch, n_frames, self.latent_dim, height // self.stride, width // self.stride)

    def feature_pyramid(self, fmaps: Tensor) -> list[Tensor]:
        """corr_levels levels, each (B, T, C, h_i, w_i), by repeated 2x2 average pooling."""
        batch, n_frames, channels = fmaps.shape[:3]
        levels = [fmaps]
        for _ in range(self.corr_levels - 1):
            pooled = F.avg_pool2d(levels[-1].reshape(batch * n_frames, channels, *levels[-1].shape[-2:]), 2, stride=2)
            levels.append(pooled.reshape(batch, n_frames, channels, *pooled.shape[-2:]))
        return levels

    def query_support_features(self, pyramid: list[Tensor], query_frames: Tensor, query_xy: Tensor) -> list[Tensor]:
        """Features of the (2r+1)^2 patch around each query at its frame, per level: (B, N, (2r+1)^2, C).

        query_frames (B, N) integer frame indices into the pyramid's time axis (clamped there, like border padding);
        query_xy (B, N, 2) in level-0 feature units.
        """
        out = []
        frame_coord = query_frames.to(query_xy.dtype)
        for level, fmap in enumerate(pyramid):
            batch, n_frames, channels, height, width = fmap.shape
            xy = (query_xy / 2 ** level).unsqueeze(2) + self.patch_offsets  # (B, N, P, 2)
            x, y = _normalise_coords(xy[..., 0], xy[..., 1], width, height)
            t = (frame_coord * (2.0 / max(n_frames - 1, 1)) - 1.0).unsqueeze(2).expand_as(x)
            grid = torch.stack([x, y, t], dim=-1).unsqueeze(3)  # (B, N, P, 1, 3) as (x, y, t)
            sampled = F.grid_sample(fmap.transpose(1, 2), grid, mode="bilinear", padding_mode="border",
                                    align_corners=True)  # (B, C, N, P, 1)
            out.append(sampled.squeeze(-1).permute(0, 2, 3, 1))
        return out

    # ------------------------------------------------------------------ stage 2: iterative updates
    def time_embedding(self, n_frames: int) -> Tensor:
        """The (1, T, 1110) time embedding: the table itself when T equals its length, else linearly resampled."""
        if n_frames == self.time_emb.shape[1]:
            return self.time_emb
        return F.interpolate(self.time_emb.float().transpose(1, 2), size=n_frames, mode="linear",
                             align_corners=False).transpose(1, 2)

    def correlation_embedding(self, pyramid: list[Tensor], support: list[Tensor], coords: Tensor) -> Tensor:
        """corr_mlp(local correlation volume) of every level, side by side: (B, N, T, levels * 256).

        coords (B, N, T, 2) in level-0 feature units; support[i] (B, N, P, C).
        """
        batch, n_points, n_frames, _ = coords.shape
        n_patch = self.patch_offsets.shape[0]
        coords_btn = coords.transpose(1, 2)  # (B, T, N, 2)
        embeddings = []
        for level, (fmap, query_feats) in enumerate(zip(pyramid, support)):
            channels, height, width = fmap.shape[-3:]
            xy = (coords_btn / 2 ** level).unsqueeze(3) + self.patch_offsets  # (B, T, N, P, 2)
            x, y = _normalise_coords(xy[..., 0], xy[..., 1], width, height)
            grid = torch.stack([x, y], dim=-1).reshape(batch * n_frames, n_points, n_patch, 2)
            sampled = F.grid_sample(fmap.reshape(batch * n_frames, channels, height, width), grid, mode="bilinear",
                                    padding_mode="border", align_corners=True)  # (B*T, C, N, P)
            sampled = sampled.reshape(batch, n_frames, channels, n_points, n_patch).permute(0, 3, 1, 4, 2)
            # Plain dot products (the features are unit-norm) between every target-patch sample and every
            # query-patch feature, per (sample, point): (B*N, T*P, C) @ (B*N, C, P).
            corr = torch.bmm(sampled.reshape(batch * n_points, n_frames * n_patch, channels),
                             query_feats.reshape(batch * n_points, n_patch, channels).transpose(1, 2))
            # The MLP (shared by all levels) runs per level, so only one level's volume is alive at a time: at
            # B=32, T=8, N=196 a level's volume is ~0.5 GB in fp32.
            embeddings.append(self.corr_mlp(corr.reshape(batch, n_points, n_frames, n_patch * n_patch)))
        return torch.cat(embeddings, dim=-1)

    def update_tracks(self, pyramid: list[Tensor], support: list[Tensor], coords: Tensor, vis: Tensor, conf: Tensor,
                      iters: int, add_space_attn: bool = True, record_iterations: bool = False,
                      ) -> tuple[Tensor, Tensor, Tensor, list[tuple[Tensor, Tensor, Tensor]]]:
        """Run `iters` refinement steps on one window.

        coords (B, N, T, 2) feature units; vis, conf (B, N, T) logits. Returns the updated (coords, vis, conf) and,
        if `record_iterations`, every iteration's (coords, vis, conf) (same layout, logits).
        """
        n_frames = coords.shape[2]
        time_emb = self.time_embedding(n_frames)
        history = []
        for _ in range(iters):
            coords = coords.detach()
            corr_emb = self.correlation_embedding(pyramid, support, coords)
            # Relative motion to the next / previous frame (zero at the ends), in units of the model resolution.
            forward_motion = F.pad(coords[:, :, :-1] - coords[:, :, 1:], (0, 0, 0, 1))
            backward_motion = F.pad(coords[:, :, 1:] - coords[:, :, :-1], (0, 0, 1, 0))
            motion = torch.cat([forward_motion, backward_motion], dim=-1) / self.motion_scale.repeat(2)
            tokens = torch.cat([vis.unsqueeze(-1), conf.unsqueeze(-1), corr_emb,
                                motion_posenc(motion, self.posenc_scales)], dim=-1)
            tokens = tokens + time_emb
            delta = self.updateformer(tokens, add_space_attn=add_space_attn).float()
            coords = coords + delta[..., :2]
            vis = vis + delta[..., 2]
            conf = conf + delta[..., 3]
            if record_iterations:
                history.append((coords, vis, conf))
        return coords, vis, conf, history

    @staticmethod
    def _split_queries(queries: Tensor, stride: int) -> tuple[Tensor, Tensor]:
        if queries.dim() != 3 or queries.shape[-1] != 3:
            raise ValueError(f"queries must be (B, N, 3) as (t, x, y); got shape {tuple(queries.shape)}")
        # .long() truncates toward zero, as the reference does.
        return queries[..., 0].long(), queries[..., 1:3].float() / stride

    @staticmethod
    def _check_batch(fmaps: Tensor, queries: Tensor) -> None:
        if fmaps.shape[0] != queries.shape[0]:
            raise ValueError(f"video batch {fmaps.shape[0]} != queries batch {queries.shape[0]}")


class CoTrackerThreeOffline(CoTrackerThreeBase):
    """CoTracker3 offline: all frames attend to each other (window 60; the time embedding is resampled to T)."""

    def __init__(self, window_len: int = 60, stride: int = 4, corr_radius: int = 3, **kwargs):
        super().__init__(window_len=window_len, stride=stride, corr_radius=corr_radius, **kwargs)

    def forward(self, video: Tensor, queries: Tensor, iters: int = 4, is_train: bool = False,
                add_space_attn: bool = True, fmaps_chunk_size: int = 200):
        """video (B, T, 3, H, W) float in [0, 255]; queries (B, N, 3) as (t, x, y) px.

        Returns (tracks (B, T, N, 2) px, visibility (B, T, N), confidence (B, T, N), train_data); train_data is None
        unless `is_train`, then ([per-iteration tracks], [per-iteration vis], [per-iteration conf], valid mask) with
        each list wrapped in a one-element list, as the reference returns it.
        """
        fmaps = self.encode(video, chunk_frames=fmaps_chunk_size)
        return self.track_features(fmaps, queries, iters=iters, is_train=is_train, add_space_attn=add_space_attn)

    def track_features(self, fmaps: Tensor, queries: Tensor, iters: int = 4, is_train: bool = False,
                       add_space_attn: bool = True):
        """The forward pass after the encoder: fmaps (B, T, C, h, w) from `encode`."""
        self._check_batch(fmaps, queries)
        batch, n_frames = fmaps.shape[:2]
        query_frames, query_xy = self._split_queries(queries, self.stride)
        pyramid = self.feature_pyramid(fmaps)
        support = self.query_support_features(pyramid, query_frames, query_xy)
        n_points = query_xy.shape[1]
        coords = query_xy.unsqueeze(2).expand(batch, n_points, n_frames, 2)
        logits = query_xy.new_zeros(batch, n_points, n_frames)
        coords, vis, conf, history = self.update_tracks(pyramid, support, coords, logits, logits, iters,
                                                        add_space_attn=add_space_attn, record_iterations=is_train)
        tracks = (coords * self.stride).transpose(1, 2)
        vis_prob, conf_prob = torch.sigmoid(vis).transpose(1, 2), torch.sigmoid(conf).transpose(1, 2)
        train_data = None
        if is_train:
            train_data = ([[(c * self.stride).transpose(1, 2) for c, _, _ in history]],
                          [[torch.sigmoid(v).transpose(1, 2) for _, v, _ in history]],
                          [[torch.sigmoid(k).transpose(1, 2) for _, _, k in history]],
                          torch.ones_like(vis_prob))
        return tracks, vis_prob, conf_prob, train_data


class CoTrackerThreeOnline(CoTrackerThreeBase):
    """CoTracker3 online: sliding windows of 16 frames with step 8; also a streaming mode over chunks.

    Deviation from the reference: for T <= 8 the reference's non-streaming forward processes no window and returns
    zeros; here one (padded) window is processed, which equals streaming the video as a single chunk.
    """

    def __init__(self, window_len: int = 16, stride: int = 4, corr_radius: int = 3, **kwargs):
        super().__init__(window_len=window_len, stride=stride, corr_radius=corr_radius, **kwargs)
        self.online_ind: int | None = None
        self._online_support: list[Tensor] | None = None
        self._online_coords: Tensor | None = None
        self._online_vis: Tensor | None = None
        self._online_conf: Tensor | None = None

    def init_video_online_processing(self) -> None:
        """Reset the streaming state; call before feeding the first chunk of each video."""
        self.online_ind = 0
        self._online_support = None
        self._online_coords = self._online_vis = self._online_conf = None

    def forward(self, video: Tensor, queries: Tensor, iters: int = 4, is_train: bool = False,
                add_space_attn: bool = True, fmaps_chunk_size: int = 200, is_online: bool = False):
        """video (B, T, 3, H, W) float in [0, 255]; queries (B, N, 3) as (t, x, y) px of the whole video.

        Non-streaming: tracks the whole video with the sliding windows. Streaming (`is_online=True`, after
        `init_video_online_processing()`): `video` is the chunk of at most 16 frames starting at frame
        `self.online_ind` (0, 8, 16, ...), and the outputs cover all frames seen so far.
        Returns (tracks (B, T, N, 2) px, visibility, confidence (B, T, N), train_data).
        """
        if is_online:
            if self.online_ind is None:
                raise RuntimeError("online mode: call init_video_online_processing() before the first chunk")
            if is_train:
                raise ValueError("online mode does not support is_train=True")
            if video.shape[1] > self.window_len:
                raise ValueError(f"online mode: a chunk has at most {self.window_len} frames; got {video.shape[1]}")
        fmaps = self.encode(video, chunk_frames=fmaps_chunk_size)
        return self.track_features(fmaps, queries, iters=iters, is_train=is_train, add_space_attn=add_space_attn,
                                   is_online=is_online)

    def track_features(self, fmaps: Tensor, queries: Tensor, iters: int = 4, is_train: bool = False,
                       add_space_attn: bool = True, is_online: bool = False):
        """The forward pass after the encoder: fmaps (B, T, C, h, w) of the video (or of the chunk if streaming)."""
        self._check_batch(fmaps, queries)
        window, step = self.window_len, self.window_len // 2
        batch, n_frames = fmaps.shape[:2]
        query_frames, query_xy = self._split_queries(queries, self.stride)
        n_points = query_xy.shape[1]
        # Pad with copies of the last frame's features (== features of copied frames) to whole windows.
        pad = window - n_frames if is_online else (window - n_frames % window) % window
        if pad > 0:
            fmaps = torch.cat([fmaps, fmaps[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
        pyramid = self.feature_pyramid(fmaps)

        if is_online:
            start = self.online_ind
            support = self.query_support_features(pyramid, (query_frames - start).clamp(0, window - 1), query_xy)
            # Queries whose frame falls in this chunk's new frames contribute their features once.
            left = 0 if start == 0 else start + step
            new_here = ((query_frames >= left) & (query_frames < start + window))[:, :, None, None]
            if self._online_support is None:
                self._online_support = [torch.zeros_like(s) for s in support]
            self._online_support = [acc + torch.where(new_here, s, torch.zeros_like(s))
                                    for acc, s in zip(self._online_support, support)]
            support = self._online_support
            total = start + n_frames
            if self._online_coords is None:
                coords_pred = query_xy.new_zeros(batch, n_points, total, 2)
                vis_pred = query_xy.new_zeros(batch, n_points, total)
                conf_pred = query_xy.new_zeros(batch, n_points, total)
            else:
                coords_pred, vis_pred, conf_pred = (self._grow(self._online_coords, total),
                                                    self._grow(self._online_vis, total),
                                                    self._grow(self._online_conf, total))
            starts = [start]
        else:
            support = self.query_support_features(pyramid, query_frames, query_xy)
            total = n_frames
            coords_pred = query_xy.new_zeros(batch, n_points, total, 2)
            vis_pred = query_xy.new_zeros(batch, n_points, total)
            conf_pred = query_xy.new_zeros(batch, n_points, total)
            num_windows = max(1, (n_frames - window + step - 1) // step + 1)
            starts = [i * step for i in range(num_windows)]

        history_all = []
        for ind in starts:
            coords = query_xy.unsqueeze(2).expand(batch, n_points, window, 2)
            vis = query_xy.new_zeros(batch, n_points, window)
            conf = query_xy.new_zeros(batch, n_points, window)
            if ind > 0:
                # Tracks queried before the end of the overlap start from the previous window's predictions
                # (logits for vis/conf), the last overlap frame repeated to fill the window.
                overlap = window - step
                copy_over = (query_frames < ind + overlap)[:, :, None]
                coords = torch.where(copy_over[..., None], self._extend(coords_pred[:, :, ind:ind + overlap], window),
                                     coords)
                vis = torch.where(copy_over, self._extend(vis_pred[:, :, ind:ind + overlap], window), vis)
                conf = torch.where(copy_over, self._extend(conf_pred[:, :, ind:ind + overlap], window), conf)
            in_window = (query_frames < ind + window)[:, :, None, None]
            window_support = [torch.where(in_window, s, torch.zeros_like(s)) for s in support]
            window_pyramid = pyramid if is_online else [level[:, ind:ind + window] for level in pyramid]
            coords, vis, conf, history = self.update_tracks(window_pyramid, window_support, coords, vis, conf, iters,
                                                            add_space_attn=add_space_attn,
                                                            record_iterations=is_train)
            kept = n_frames if is_online else min(n_frames - ind, window)
            coords_pred = self._write(coords_pred, coords[:, :, :kept], ind)
            vis_pred = self._write(vis_pred, vis[:, :, :kept], ind)
            conf_pred = self._write(conf_pred, conf[:, :, :kept], ind)
            if is_train:
                history_all.append([(c[:, :, :kept], v[:, :, :kept], k[:, :, :kept]) for c, v, k in history])

        if is_online:
            self.online_ind += step
            self._online_coords, self._online_vis, self._online_conf = coords_pred, vis_pred, conf_pred
        tracks = (coords_pred * self.stride).transpose(1, 2)
        vis_prob, conf_prob = torch.sigmoid(vis_pred).transpose(1, 2), torch.sigmoid(conf_pred).transpose(1, 2)
        train_data = None
        if is_train:
            valid = query_frames[:, None, :] <= torch.arange(n_frames, device=fmaps.device)[None, :, None]
            train_data = ([[(c * self.stride).transpose(1, 2) for c, _, _ in h] for h in history_all],
                          [[torch.sigmoid(v).transpose(1, 2) for _, v, _ in h] for h in history_all],
                          [[torch.sigmoid(k).transpose(1, 2) for _, _, k in h] for h in history_all],
                          valid)
        return tracks, vis_prob, conf_prob, train_data

    @staticmethod
    def _extend(x: Tensor, length: int) -> Tensor:
        """Repeat the last frame (axis 2) of x until it has `length` frames."""
        missing = length - x.shape[2]
        return torch.cat([x, x[:, :, -1:].expand(*x.shape[:2], missing, *x.shape[3:])], dim=2)

    @staticmethod
    def _grow(x: Tensor, length: int) -> Tensor:
        """Zero-pad (or cut) axis 2 of x to `length` frames."""
        if x.shape[2] >= length:
            return x[:, :, :length]
        return torch.cat([x, x.new_zeros(*x.shape[:2], length - x.shape[2], *x.shape[3:])], dim=2)

    @staticmethod
    def _write(dest: Tensor, values: Tensor, start: int) -> Tensor:
        """dest with frames [start, start + len) replaced by values (out of place: safe under autograd/compile)."""
        end = start + values.shape[2]
        return torch.cat([dest[:, :, :start], values, dest[:, :, end:]], dim=2)
