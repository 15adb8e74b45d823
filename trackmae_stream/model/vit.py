"""TrackMAE network: a VideoMAE ViT encoder on visible tubelets and one decoder (or a shared one) per target.

Module names follow VideoMAE's pretraining model inside each part (`encoder.blocks.{i}.attn.qkv`, `mask_token`,
`decoders.<group>.encoder_to_decoder`, `decoders.<group>.blocks`, `heads.<target>`); `model/adapters.py` maps the former
layout (`decoder.*`, `motion_decoder.*`) and the other code bases' layouts to it. Differences from VideoMAE: the qkv
projection carries one fused bias (VideoMAE stores q_bias/v_bias; a key bias shifts every logit of a query row equally,
so it has no effect and converts exactly), and the encoder embeds only the visible tubelets from pre-gathered raw
patches (a Conv3d with kernel = stride is a linear map per tubelet, so embedding 10% of the tokens gives the same result
for them).
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
    """Decoder blocks of one decoder group: the projection from the encoder width, the blocks and the final norm.
    The targets that name this decoder each have their own head on its output (`TrackMAE.heads`)."""

    def __init__(self, *, embed_dim: int, dim: int, depth: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.encoder_to_decoder = nn.Linear(embed_dim, dim, bias=False)
        self.blocks = Blocks([Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor, num_masked: int) -> Tensor:
        """Features of the last `num_masked` tokens (the mask tokens)."""
        return self.norm(self.blocks(x)[:, -num_masked:])


class MLPHead(nn.Sequential):
    """Linear -> GELU -> Linear (MME's heads; the activation is applied by the model)."""

    def __init__(self, dim: int, hidden: int, out_dim: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


@dataclass(frozen=True)
class HeadSpec:
    """One target's output head: its width, the decoder group it reads, the head form and output activation."""

    name: str
    dim: int
    decoder: str | None = None  # None: a decoder of its own named like the target
    head: str = "linear"  # "linear" | "mlp"
    hidden: int = 512
    activation: str = "none"  # "none" | "sigmoid" | "tanh"

    @property
    def group(self) -> str:
        return self.decoder or self.name


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
    heads: tuple[HeadSpec, ...] = (HeadSpec("pixel", 1536), HeadSpec("track_motion", 8))
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

    @property
    def groups(self) -> list[str]:
        """Decoder groups in order of first use."""
        return list(dict.fromkeys(h.group for h in self.heads))


_ACTIVATIONS = {"none": None, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


class TrackMAE(nn.Module):
    """Encoder + one decoder per decoder group + one head per target. The decoders share the mask token and position
    table (as in the public TrackMAE code); each has its own bias-free projection from the encoder width. Targets
    that name the same decoder (MME's HOG and trajectory) share its blocks."""

    def __init__(self, shape: TrackMAEShape):
        super().__init__()
        if not shape.heads:
            raise ValueError("TrackMAE needs at least one target head")
        names = [h.name for h in shape.heads]
        if len(set(names)) != len(names):
            raise ValueError(f"target heads must have distinct names, got {names}")
        self.shape = shape
        s = shape
        self.encoder = VideoEncoder(num_tokens=s.num_tokens, embed_dim=s.embed_dim, depth=s.depth,
                                    num_heads=s.num_heads, mlp_ratio=s.mlp_ratio, patch_size=s.patch_size,
                                    tubelet_size=s.tubelet_size, drop_path=s.drop_path)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, s.decoder_dim))
        self.register_buffer("decoder_pos_embed", sinusoid_table(s.num_tokens, s.decoder_dim), persistent=False)
        self.decoders = nn.ModuleDict({
            group: Decoder(embed_dim=s.embed_dim, dim=s.decoder_dim, depth=s.decoder_depth,
                           num_heads=s.decoder_heads, mlp_ratio=s.mlp_ratio) for group in s.groups})
        self.heads = nn.ModuleDict({
            h.name: (nn.Linear(s.decoder_dim, h.dim) if h.head == "linear" else MLPHead(s.decoder_dim, h.hidden, h.dim))
            for h in s.heads})
        self.apply(init_weights)
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
    def forward(self, patches: Tensor, visible_idx: Tensor, masked_idx: Tensor) -> dict[str, Tensor]:
        """patches (B, V, patch_dim) raw normalised visible tubelets; visible_idx (B, V) and masked_idx (B, M) in
        ascending token order. Returns {target name: (B, M, dim)}."""
        latent = self.encoder(patches, visible_idx)
        pos = self.decoder_pos_embed.to(latent.dtype)
        pos_visible, pos_masked = pos[visible_idx], pos[masked_idx]
        masked = self.mask_token.to(latent.dtype) + pos_masked
        features = {}
        for group, decoder in self.decoders.items():
            visible = decoder.encoder_to_decoder(latent) + pos_visible
            features[group] = decoder(torch.cat([visible, masked], dim=1), masked.shape[1])
        out = {}
        for h in self.shape.heads:
            y = self.heads[h.name](features[h.group])
            act = _ACTIVATIONS[h.activation]
            out[h.name] = act(y) if act is not None else y
        return out


def init_weights(module: nn.Module) -> None:
    """VideoMAE's (and AdaMAE's, TATS-ref's) initialisation, for `module.apply`."""
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
    for _ in s.groups:
        flops += 2 * v * s.embed_dim * s.decoder_dim
        flops += _blocks_flops(n, s.decoder_dim, s.decoder_depth, s.mlp_ratio)
    for h in s.heads:
        if h.head == "linear":
            flops += 2 * m * s.decoder_dim * h.dim
        else:
            flops += 2 * m * (s.decoder_dim * h.hidden + h.hidden * h.dim)
    return float(flops)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(shape: TrackMAEShape) -> str:
    heads = ", ".join(f"{h.name}[{h.dim}]" for h in shape.heads)
    return (f"ViT {shape.embed_dim}x{shape.depth} ({shape.num_heads} heads), {len(shape.groups)} decoder(s) "
            f"{shape.decoder_dim}x{shape.decoder_depth}, heads {heads}, {shape.num_tokens} tokens of "
            f"{shape.tubelet_size}x{shape.patch_size}x{shape.patch_size}")


__all__ = ["TrackMAE", "TrackMAEShape", "HeadSpec", "MLPHead", "VideoEncoder", "Decoder", "Block", "Attention",
           "sinusoid_table", "forward_flops", "count_parameters", "describe"]
