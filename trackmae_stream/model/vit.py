"""TrackMAE network: a VideoMAE ViT encoder on visible tubelets, a spatial decoder and a motion decoder.

Module names follow VideoMAE's pretraining model (`encoder.blocks.{i}.attn.qkv`, `encoder_to_decoder`, `mask_token`,
`decoder.head`) so that the state-dict adapters stay simple. Differences from VideoMAE: the qkv projection carries one
fused bias (VideoMAE stores q_bias/v_bias; a key bias shifts every logit of a query row equally, so it has no effect and
converts exactly), and the encoder embeds only the visible tubelets from pre-gathered raw patches (a Conv3d with
kernel = stride is a linear map per tubelet, so embedding 10% of the tokens gives the same result for them).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import attention


def sinusoid_table(num_positions: int, dim: int) -> Tensor:
    """VideoMAE's fixed 1-D sin-cos table over the flattened token index (float32, (N, dim))."""
    position = np.arange(num_positions, dtype=np.float64)[:, None]
    exponent = 2 * (np.arange(dim) // 2) / dim
    table = position / np.power(10000.0, exponent)[None, :]
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.from_numpy(table).float()


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.backend = "sdpa"  # set by TrackMAE.set_attention_backend

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).unbind(2)
        return self.proj(attention(q, k, v, self.backend).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6 as in VideoMAE)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Blocks(nn.ModuleList):
    """A stack of blocks with optional activation checkpointing (recompute in backward to save memory)."""

    checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        for block in self:
            if self.checkpointing and x.requires_grad:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class PatchEmbed3d(nn.Module):
    """Tubelet embedding: Conv3d with kernel = stride = (tubelet, patch, patch)."""

    def __init__(self, embed_dim: int, patch_size: int, tubelet_size: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=(tubelet_size, patch_size, patch_size),
                              stride=(tubelet_size, patch_size, patch_size))

    def embed_patches(self, patches: Tensor) -> Tensor:
        """patches (B, V, C*t*p*p) flattened in Conv3d weight order (c, kt, kh, kw) -> (B, V, D)."""
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)

    def forward(self, video: Tensor) -> Tensor:
        """video (B, C, T, H, W) -> (B, N, D) in token order t*h*w + i*w + j."""
        return self.proj(video).flatten(2).transpose(1, 2)


class VideoEncoder(nn.Module):
    def __init__(self, *, num_tokens: int, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float,
                 patch_size: int, tubelet_size: int, drop_path: float):
        super().__init__()
        self.patch_embed = PatchEmbed3d(embed_dim, patch_size, tubelet_size)
        self.register_buffer("pos_embed", sinusoid_table(num_tokens, embed_dim), persistent=False)
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = Blocks([Block(embed_dim, num_heads, mlp_ratio, r) for r in rates])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, patches: Tensor, visible_idx: Tensor) -> Tensor:
        """patches (B, V, C*t*p*p) of the visible tokens `visible_idx` (B, V) -> (B, V, D)."""
        x = self.patch_embed.embed_patches(patches) + self.pos_embed[visible_idx].to(patches.dtype)
        return self.norm(self.blocks(x))

    def forward_video(self, video: Tensor) -> Tensor:
        """All tokens of a normalised clip (B, C, T, H, W): for fine-tuning, probing and feature extraction."""
        x = self.patch_embed(video) + self.pos_embed.to(video.dtype)
        return self.norm(self.blocks(x))


class Decoder(nn.Module):
    def __init__(self, *, dim: int, depth: int, num_heads: int, mlp_ratio: float, out_dim: int):
        super().__init__()
        self.blocks = Blocks([Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor, num_masked: int) -> Tensor:
        """Predictions for the last `num_masked` tokens (the mask tokens)."""
        return self.head(self.norm(self.blocks(x)[:, -num_masked:]))


@dataclass(frozen=True)
class TrackMAEShape:
    """Everything that fixes the network's parameter shapes and token count."""

    num_frames: int
    input_size: int
    patch_size: int
    tubelet_size: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    mlp_ratio: float = 4.0
    spatial_dim: int | None = 1536  # None: no spatial decoder (trajectory-only pretraining)
    motion_dim: int | None = 8  # None: no motion decoder (plain VideoMAE)
    drop_path: float = 0.0

    @property
    def tokens_per_frame(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return (self.num_frames // self.tubelet_size) * self.tokens_per_frame

    @property
    def patch_dim(self) -> int:
        return 3 * self.tubelet_size * self.patch_size ** 2


class TrackMAE(nn.Module):
    """Encoder + spatial decoder + motion decoder. The decoders share the mask token and position table (as in the
    public code); each has its own bias-free projection from the encoder width."""

    def __init__(self, shape: TrackMAEShape):
        super().__init__()
        if shape.spatial_dim is None and shape.motion_dim is None:
            raise ValueError("TrackMAE needs at least one of a spatial and a motion decoder")
        self.shape = shape
        s = shape
        self.encoder = VideoEncoder(num_tokens=s.num_tokens, embed_dim=s.embed_dim, depth=s.depth,
                                    num_heads=s.num_heads, mlp_ratio=s.mlp_ratio, patch_size=s.patch_size,
                                    tubelet_size=s.tubelet_size, drop_path=s.drop_path)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, s.decoder_dim))
        self.register_buffer("decoder_pos_embed", sinusoid_table(s.num_tokens, s.decoder_dim), persistent=False)
        decoder_kw = dict(dim=s.decoder_dim, depth=s.decoder_depth, num_heads=s.decoder_heads, mlp_ratio=s.mlp_ratio)
        if s.spatial_dim is not None:
            self.encoder_to_decoder = nn.Linear(s.embed_dim, s.decoder_dim, bias=False)
            self.decoder = Decoder(out_dim=s.spatial_dim, **decoder_kw)
        if s.motion_dim is not None:
            self.motion_encoder_to_decoder = nn.Linear(s.embed_dim, s.decoder_dim, bias=False)
            self.motion_decoder = Decoder(out_dim=s.motion_dim, **decoder_kw)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    # -- configuration ---------------------------------------------------------------------------------------------
    def set_attention_backend(self, backend: str) -> None:
        for module in self.modules():
            if isinstance(module, Attention):
                module.backend = backend

    def set_activation_checkpointing(self, enabled: bool) -> None:
        for module in self.modules():
            if isinstance(module, Blocks):
                module.checkpointing = enabled

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    # -- forward ---------------------------------------------------------------------------------------------------
    def _decode(self, proj: nn.Linear, decoder: Decoder, latent: Tensor, pos_visible: Tensor,
                pos_masked: Tensor) -> Tensor:
        visible = proj(latent) + pos_visible
        masked = self.mask_token.to(latent.dtype) + pos_masked
        return decoder(torch.cat([visible, masked], dim=1), masked.shape[1])

    def forward(self, patches: Tensor, visible_idx: Tensor, masked_idx: Tensor) -> dict[str, Tensor]:
        """patches (B, V, patch_dim) raw normalised visible tubelets; visible_idx (B, V) and masked_idx (B, M) in
        ascending token order. Returns {"spatial": (B, M, spatial_dim), "motion": (B, M, motion_dim)}."""
        latent = self.encoder(patches, visible_idx)
        pos = self.decoder_pos_embed.to(latent.dtype)
        pos_visible, pos_masked = pos[visible_idx], pos[masked_idx]
        out = {}
        if self.shape.spatial_dim is not None:
            out["spatial"] = self._decode(self.encoder_to_decoder, self.decoder, latent, pos_visible, pos_masked)
        if self.shape.motion_dim is not None:
            out["motion"] = self._decode(self.motion_encoder_to_decoder, self.motion_decoder, latent, pos_visible,
                                         pos_masked)
        return out


def _init_weights(module: nn.Module) -> None:
    # VideoMAE's initialisation: xavier-uniform linears with zero bias, unit LayerNorms; the Conv3d keeps torch's.
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------------------------------
# Analytic cost, for MFU (a multiply-add counts 2 FLOPs)


def _blocks_flops(tokens: int, dim: int, depth: int, mlp_ratio: float) -> float:
    # qkv 3d^2 + proj d^2 + mlp 2*ratio*d^2 per token, and q k^T plus attn v (2 n^2 d per layer).
    per_layer = 2 * tokens * dim * dim * (4 + 2 * mlp_ratio) + 4 * tokens * tokens * dim
    return depth * per_layer


def forward_flops(shape: TrackMAEShape, num_visible: int) -> float:
    """Forward FLOPs of one clip with `num_visible` visible tokens (training ~ 3x this)."""
    s = shape
    n, v = s.num_tokens, num_visible
    m = n - v
    flops = 2 * v * s.patch_dim * s.embed_dim + _blocks_flops(v, s.embed_dim, s.depth, s.mlp_ratio)
    for out_dim in (s.spatial_dim, s.motion_dim):
        if out_dim is None:
            continue
        flops += 2 * v * s.embed_dim * s.decoder_dim
        flops += _blocks_flops(n, s.decoder_dim, s.decoder_depth, s.mlp_ratio)
        flops += 2 * m * s.decoder_dim * out_dim
    return float(flops)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(shape: TrackMAEShape) -> str:
    return (f"ViT {shape.embed_dim}x{shape.depth} ({shape.num_heads} heads), decoders {shape.decoder_dim}x"
            f"{shape.decoder_depth}, {shape.num_tokens} tokens of {shape.tubelet_size}x{shape.patch_size}x"
            f"{shape.patch_size}")


__all__ = ["TrackMAE", "TrackMAEShape", "VideoEncoder", "Decoder", "Block", "Attention", "sinusoid_table",
           "forward_flops", "count_parameters", "describe"]
