"""Building blocks of CoTracker3: the convolutional feature encoder and the update transformer.

Module names and parameter shapes follow the released checkpoints exactly (see SPEC.md §1-3), so that
`load_state_dict(official_state_dict)` works strictly. Every operation is independent per batch element.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: attention implementations: "sdpa" = F.scaled_dot_product_attention (default: on CPU fp32 it reproduces the test
#: vectors as closely as the explicit form, measured in tests/test_cotracker3_model.py); "math" = explicit
#: softmax(q k^T * scale) v, the reference's arithmetic, kept for debugging and as the test's independent check.
ATTENTION_BACKENDS = ("sdpa", "math")


class Mlp(nn.Module):
    """Linear -> GELU -> Linear (timm layout: `fc1`, `fc2`)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, gelu_approximate: str = "none"):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.gelu_approximate = gelu_approximate

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.gelu_approximate))


class ResidualBlock(nn.Module):
    """Two 3x3 convs with instance norm and ReLU; a strided 1x1 conv (+ instance norm) on the shortcut if s != 1."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, padding=1, stride=stride)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1)
        self.norm1 = nn.InstanceNorm2d(planes)
        self.norm2 = nn.InstanceNorm2d(planes)
        # `downsample.0` is the checkpoint key of the shortcut conv; its norm has no parameters.
        self.downsample = (
            nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride), nn.InstanceNorm2d(planes))
            if stride != 1 else None
        )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        if self.downsample is not None:
            x = self.downsample(x)
        return F.relu(x + y)


class BasicEncoder(nn.Module):
    """CoTracker3's `fnet`: a 4-stage residual CNN whose multi-scale outputs are fused at 1/stride resolution.

    Input (F, 3, H, W) in [-1, 1]; output (F, output_dim, H // stride, W // stride), not normalised.
    """

    def __init__(self, input_dim: int = 3, output_dim: int = 128, stride: int = 4):
        super().__init__()
        self.stride = stride
        half, three_quarters = output_dim // 2, output_dim // 4 * 3
        self.conv1 = nn.Conv2d(input_dim, half, kernel_size=7, stride=2, padding=3)
        self.norm1 = nn.InstanceNorm2d(half)
        self.layer1 = nn.Sequential(ResidualBlock(half, half, 1), ResidualBlock(half, half, 1))
        self.layer2 = nn.Sequential(ResidualBlock(half, three_quarters, 2),
                                    ResidualBlock(three_quarters, three_quarters, 1))
        self.layer3 = nn.Sequential(ResidualBlock(three_quarters, output_dim, 2),
                                    ResidualBlock(output_dim, output_dim, 1))
        self.layer4 = nn.Sequential(ResidualBlock(output_dim, output_dim, 2), ResidualBlock(output_dim, output_dim, 1))
        fused = half + three_quarters + 2 * output_dim  # 64 + 96 + 128 + 128 = 416
        self.conv2 = nn.Conv2d(fused, output_dim * 2, kernel_size=3, padding=1)
        self.norm2 = nn.InstanceNorm2d(output_dim * 2)
        self.conv3 = nn.Conv2d(output_dim * 2, output_dim, kernel_size=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2] // self.stride, x.shape[-1] // self.stride
        x = F.relu(self.norm1(self.conv1(x)))
        a = self.layer1(x)
        b = self.layer2(a)
        c = self.layer3(b)
        d = self.layer4(c)
        scales = [F.interpolate(f, (height, width), mode="bilinear", align_corners=True) for f in (a, b, c, d)]
        x = F.relu(self.norm2(self.conv2(torch.cat(scales, dim=1))))
        return self.conv3(x)


class Attention(nn.Module):
    """Multi-head attention with a fused key/value projection (`to_kv` chunks into k = first half, v = second)."""

    def __init__(self, query_dim: int, context_dim: int | None = None, num_heads: int = 8, dim_head: int = 48):
        super().__init__()
        inner_dim = dim_head * num_heads
        self.heads = num_heads
        self.dim_head = dim_head
        self.scale = dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner_dim)
        self.to_kv = nn.Linear(context_dim or query_dim, inner_dim * 2)
        self.to_out = nn.Linear(inner_dim, query_dim)
        self.backend = "sdpa"

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        batch, n_query, _ = x.shape
        context = x if context is None else context
        n_key = context.shape[1]
        q = self.to_q(x).reshape(batch, n_query, self.heads, self.dim_head).transpose(1, 2)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        k = k.reshape(batch, n_key, self.heads, self.dim_head).transpose(1, 2)
        v = v.reshape(batch, n_key, self.heads, self.dim_head).transpose(1, 2)
        if self.backend == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            out = attn @ v
        return self.to_out(out.transpose(1, 2).reshape(batch, n_query, self.heads * self.dim_head))


def _layer_norm(x: Tensor) -> Tensor:
    """The attention blocks' LayerNorm: no affine parameters, eps 1e-6."""
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


class AttnBlock(nn.Module):
    """Pre-norm self-attention block: x += Attn(LN(x)); x += MLP(LN(x)) with a tanh-approximated GELU."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads=num_heads, dim_head=hidden_size // num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size, gelu_approximate="tanh")

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(_layer_norm(x))
        return x + self.mlp(_layer_norm(x))


class CrossAttnBlock(nn.Module):
    """Pre-norm cross-attention block; the context goes through an affine LayerNorm (eps 1e-5, `norm_context`)."""

    def __init__(self, hidden_size: int, context_dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm_context = nn.LayerNorm(context_dim)
        self.cross_attn = Attention(hidden_size, context_dim=context_dim, num_heads=num_heads,
                                    dim_head=hidden_size // num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size, gelu_approximate="tanh")

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.cross_attn(_layer_norm(x), context=self.norm_context(context))
        return x + self.mlp(_layer_norm(x))


class EfficientUpdateFormer(nn.Module):
    """The update transformer: time attention per track, space attention through a few learned virtual tracks.

    Input (B, N, T, input_dim) tokens, output (B, N, T, 4) = (dx, dy, dvis, dconf).
    """

    def __init__(self, space_depth: int = 3, time_depth: int = 3, input_dim: int = 1110, hidden_size: int = 384,
                 num_heads: int = 8, output_dim: int = 4, mlp_ratio: float = 4.0, num_virtual_tracks: int = 64,
                 add_space_attn: bool = True, linear_layer_for_vis_conf: bool = True):
        super().__init__()
        self.num_virtual_tracks = num_virtual_tracks
        self.linear_layer_for_vis_conf = linear_layer_for_vis_conf
        self.input_transform = nn.Linear(input_dim, hidden_size)
        if linear_layer_for_vis_conf:
            self.flow_head = nn.Linear(hidden_size, output_dim - 2)
            self.vis_conf_head = nn.Linear(hidden_size, 2)
        else:
            self.flow_head = nn.Linear(hidden_size, output_dim)
        # The misspelling is the checkpoint's key.
        self.virual_tracks = nn.Parameter(torch.randn(1, num_virtual_tracks, 1, hidden_size))
        self.time_blocks = nn.ModuleList([AttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(time_depth)])
        if add_space_attn:
            self.space_virtual_blocks = nn.ModuleList(
                [AttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(space_depth)])
            self.space_point2virtual_blocks = nn.ModuleList(
                [CrossAttnBlock(hidden_size, hidden_size, num_heads, mlp_ratio) for _ in range(space_depth)])
            self.space_virtual2point_blocks = nn.ModuleList(
                [CrossAttnBlock(hidden_size, hidden_size, num_heads, mlp_ratio) for _ in range(space_depth)])
            if time_depth < space_depth:
                raise ValueError(f"time_depth ({time_depth}) must be >= space_depth ({space_depth})")
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Small heads: an untrained model starts close to "no update".
        nn.init.trunc_normal_(self.flow_head.weight, std=0.001)
        if self.linear_layer_for_vis_conf:
            nn.init.trunc_normal_(self.vis_conf_head.weight, std=0.001)

    def forward(self, tokens: Tensor, add_space_attn: bool = True) -> Tensor:
        tokens = self.input_transform(tokens)
        batch, n_points, n_frames, width = tokens.shape
        # Under autocast the projection is bf16 and the virtual tracks fp32: cat promotes, so the residual stream
        # stays fp32 and only the matrix products run in reduced precision (as the official mixed-precision runs).
        virtual = self.virual_tracks.expand(batch, -1, n_frames, -1)
        tokens = torch.cat([tokens, virtual], dim=1)
        n_all = tokens.shape[1]
        space = add_space_attn and hasattr(self, "space_virtual_blocks")
        space_every = len(self.time_blocks) // len(self.space_virtual_blocks) if space else 0
        space_index = 0
        for i, time_block in enumerate(self.time_blocks):
            # Time attention: every track (real and virtual) attends over its own frames.
            tokens = time_block(tokens.reshape(batch * n_all, n_frames, width)).reshape(batch, n_all, n_frames, width)
            if space and i % space_every == 0:
                # Space attention per frame: virtual tracks gather from the points, mix, and write back.
                frame_tokens = tokens.transpose(1, 2).reshape(batch * n_frames, n_all, width)
                points, virtual = frame_tokens[:, :n_points], frame_tokens[:, n_points:]
                virtual = self.space_virtual2point_blocks[space_index](virtual, points)
                virtual = self.space_virtual_blocks[space_index](virtual)
                points = self.space_point2virtual_blocks[space_index](points, virtual)
                frame_tokens = torch.cat([points, virtual], dim=1)
                tokens = frame_tokens.reshape(batch, n_frames, n_all, width).transpose(1, 2)
                space_index += 1
        tokens = tokens[:, :n_points]
        out = self.flow_head(tokens)
        if self.linear_layer_for_vis_conf:
            out = torch.cat([out, self.vis_conf_head(tokens)], dim=-1)
        return out
