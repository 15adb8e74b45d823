"""AdaMAE's learned token sampler (SPEC §3.3; wgcban/adamae @ aa19850, models/pretrain/vit.py and
msc/engine_for_pretraining.py), plus the seeded sampling without replacement that the learned samplers share.

What AdaMAE defines, and this module reproduces:

- Input: the MAE's own patch embeddings x (B, N, D) *before* the encoder's positional embedding, not detached (so the
  sampling loss also trains `patch_embed`).
- Network: x + `pos_embed_probs` (learnable, (1, N, D), zero-initialised) -> one pre-norm transformer block (8 heads,
  MLP ratio 4, no qkv bias, dropout 0.1 after the attention projection and after the MLP, LayerNorm eps 1e-5, no
  layer scale) -> Linear(D, 1) -> flatten -> nan_to_num -> softmax over all N tokens: p (B, N) is the probability of a
  token being *visible*. Linear layers are xavier-uniform with zero bias, LayerNorms 1/0 (AdaMAE's `_init_weights`).
- Action: N_vis = int(N * (1 - mask_ratio)) visible tokens drawn from p without replacement (over all N tokens, not
  per time slot); the rest are masked.
- Sampling loss, per clip: -mean_{i in masked}(log p_i * stopgrad(e_i)), e_i the mean squared error of masked token i;
  total = mean(e) + 1e-4 * mean over clips. This raises p (the chance of being visible next time) of the tokens that
  were hard to reconstruct: AdaMAE samples more visible tokens from high-information (moving) regions.

What differs, deliberately:

- `torch.multinomial(p, k, replacement=False)` is replaced by Gumbel-top-k on log p with Gumbel noise from the
  project's counter-based generator keyed by (seed, step, rank) (`kernels/rng.py`): the k largest of log p_i + G_i,
  G_i = -log(-log u_i), are a sample without replacement with exactly the distribution of sequential draws
  (Plackett-Luce; Vieira 2014, Kool et al. 2019), and `topk`'s descending order is the draw order. The draws are a pure
  function of (seed, step, rank, clip, token), so a resumed run masks the same tokens. u has 24 random bits; it is
  centred in its bin (u + 2**-25) so that the noise is finite, and the noise is made in float64.
- log p is computed with log_softmax (AdaMAE takes the log of the softmax, which is -inf where p underflows).

Dropout (AdaMAE's 0.1) draws from torch's global generator, which the project's checkpoint captures; pass
`dropout=0.0` for a sampler whose forward is a pure function of its inputs.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..kernels.masking import MaskOutput
from ..kernels.rng import counter_uniform_torch, rng_key
from ..model.vit import init_weights

#: Counter-RNG stream of AdaMAE's Gumbel noise ("ADME"); distinct from the tube-masking streams 0-2 in kernels/rng.py.
STREAM_ADAMAE = 0x41444D45
#: AdaMAE's weight of the sampling loss in the total loss (engine_for_pretraining.py: `1e-4*torch.mean(l_s)`).
ADAMAE_SAMPLING_WEIGHT = 1e-4
_HALF_BIN = 2.0 ** -25  # half of the counter generator's 2**-24 resolution


def adamae_num_visible(num_tokens: int, mask_ratio: float) -> int:
    """AdaMAE's visible count over all N tokens: int(N * (1 - mask_ratio)) (e.g. 78 of 1568 at ratio 0.95).

    The project's tube count T * (S - int(ratio * S)) (80 of 1568 at 0.95) is an equally valid fixed count: every
    sampler here takes the count as an argument.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
    visible = int(num_tokens * (1.0 - mask_ratio))
    if not 1 <= visible <= num_tokens:
        raise ValueError(f"{num_tokens} tokens at mask ratio {mask_ratio} leave {visible} visible; need >= 1")
    return visible


def gumbel_noise(batch: int, num_tokens: int, *, seed: int, step: int, rank: int, stream: int,
                 device: torch.device | str | None = None) -> Tensor:
    """(B, N) float64 standard Gumbel draws G = -log(-log u), u = counter_uniform(key(seed, step, rank), clip, stream,
    token) + 2**-25. A pure function of its arguments (no generator state); clip index = row, token index = column."""
    key = rng_key(seed, step, rank)
    clip = torch.arange(batch, device=device, dtype=torch.int64)[:, None]
    token = torch.arange(num_tokens, device=device, dtype=torch.int64)[None, :]
    u = counter_uniform_torch(key, clip, stream, token).to(torch.float64) + _HALF_BIN
    return -torch.log(-torch.log(u))


def sample_without_replacement(logits: Tensor, num_samples: int, *, seed: int, step: int, rank: int,
                               stream: int) -> Tensor:
    """Draw `num_samples` distinct tokens per row from softmax(logits) (B, N), without replacement.

    Returns (B, k) int64 token indices in draw order (first drawn first): the Gumbel-top-k of log_softmax(logits) in
    float64. Same (seed, step, rank, stream) and logits -> same draw. No host sync.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, N), got {tuple(logits.shape)}")
    batch, tokens = logits.shape
    if not 1 <= num_samples <= tokens:
        raise ValueError(f"num_samples must lie in [1, {tokens}], got {num_samples}")
    noise = gumbel_noise(batch, tokens, seed=seed, step=step, rank=rank, stream=stream, device=logits.device)
    scores = torch.log_softmax(logits.detach().to(torch.float64), dim=1) + noise
    return torch.topk(scores, num_samples, dim=1, largest=True, sorted=True).indices


def mask_output_from_visible(visible: Tensor, num_tokens: int) -> MaskOutput:
    """The project's MaskOutput from (B, k) distinct visible token indices (any order).

    mask (B, N) bool True = masked; visible_idx (B, k) and masked_idx (B, N - k), both ascending int64.
    """
    batch, count = visible.shape
    mask = torch.ones(batch, num_tokens, dtype=torch.bool, device=visible.device)
    mask.scatter_(1, visible.to(torch.int64), False)
    # a stable sort of the flags lists the visible tokens first, then the masked ones, each ascending
    by_flag = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
    return MaskOutput(mask, by_flag[:, :count], by_flag[:, count:])


class _Attention(nn.Module):
    """AdaMAE's sampler attention: qkv without bias, scale head_dim**-0.5, projection with bias and dropout."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(b, n, c)))


class SamplerBlock(nn.Module):
    """AdaMAE's pre-norm block (models/finetune/vit.py `Block` with init_values=0, drop_path=0): (B, N, D) -> (B, N, D).

    x + attn(LN(x)); then + mlp(LN(x)) with mlp = fc1 -> GELU -> fc2 -> dropout (no dropout after the GELU).
    """

    def __init__(self, dim: int, num_heads: int = 8, mlp_ratio: float = 4.0, dropout: float = 0.1):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AdaMAESample(NamedTuple):
    """One AdaMAE sampling step.

    mask: the project's MaskOutput (mask (B, N) True = masked; visible_idx (B, k), masked_idx (B, N - k) ascending).
    log_probs: (B, N) float32 log p, differentiable (keep it for `adamae_sampling_loss`).
    draw_order: (B, k) int64 visible tokens in the order they were drawn.
    """

    mask: MaskOutput
    log_probs: Tensor
    draw_order: Tensor


class AdaMAESampler(nn.Module):
    """AdaMAE's token-probability network (see module doc). State: `pos_embed_probs` (1, N, D), `block`, `head`.

    Args:
        num_tokens: N = T * S tokens per clip, in the project's order t * S + s.
        embed_dim: D, the encoder's patch-embedding width.
        num_heads: attention heads of the sampler block (AdaMAE: 8).
        mlp_ratio: MLP width / D (AdaMAE: 4).
        dropout: dropout after the attention projection and the MLP (AdaMAE: 0.1).
    """

    def __init__(self, num_tokens: int, embed_dim: int, *, num_heads: int = 8, mlp_ratio: float = 4.0,
                 dropout: float = 0.1):
        super().__init__()
        self.num_tokens = num_tokens
        self.embed_dim = embed_dim
        self.pos_embed_probs = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.block = SamplerBlock(embed_dim, num_heads, mlp_ratio, dropout)
        self.head = nn.Linear(embed_dim, 1)
        self.apply(init_weights)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B, N, D) patch embeddings (no positional embedding; AdaMAE does not detach them) -> logits (B, N)
        float32, nan_to_num-cleaned. p = softmax(logits, dim=1)."""
        if tokens.ndim != 3 or tokens.shape[1:] != (self.num_tokens, self.embed_dim):
            raise ValueError(f"tokens must be (B, {self.num_tokens}, {self.embed_dim}), got {tuple(tokens.shape)}")
        x = tokens + self.pos_embed_probs.to(tokens.dtype)
        return torch.nan_to_num(self.head(self.block(x)).flatten(1).float())

    def sample(self, tokens: Tensor, num_visible: int, *, seed: int, step: int, rank: int) -> AdaMAESample:
        """Run the network with gradients and draw `num_visible` visible tokens per clip without replacement.

        tokens (B, N, D). The draw is keyed by (seed, step, rank) (step = the trainer's micro-batch counter) on stream
        `STREAM_ADAMAE`; with dropout > 0 the logits also depend on torch's global generator.
        """
        logits = self(tokens)
        order = sample_without_replacement(logits, num_visible, seed=seed, step=step, rank=rank, stream=STREAM_ADAMAE)
        return AdaMAESample(mask_output_from_visible(order, self.num_tokens), torch.log_softmax(logits, dim=1), order)


def adamae_sampling_loss(log_probs: Tensor, masked_idx: Tensor, masked_errors: Tensor, *,
                         weight: float = ADAMAE_SAMPLING_WEIGHT) -> Tensor:
    """AdaMAE's sampling loss, weighted: weight * mean_b[-mean_{j<M}(log p[b, masked_idx[b, j]] * sg(e[b, j]))].

    log_probs (B, N) from `AdaMAESample.log_probs`; masked_idx (B, M) the MaskOutput's masked tokens; masked_errors
    (B, M) the per-token reconstruction error in masked_idx order (mean over the target dims of the squared error, the
    MAE loss before its mean; detached here). Returns a scalar to add to the MAE loss (AdaMAE: mean(e) + this).
    """
    if masked_idx.shape != masked_errors.shape or masked_idx.shape[0] != log_probs.shape[0]:
        raise ValueError(f"masked_idx {tuple(masked_idx.shape)} and masked_errors {tuple(masked_errors.shape)} must "
                         f"both be (B, M) with B = {log_probs.shape[0]}")
    masked_log_probs = log_probs.gather(1, masked_idx)
    per_clip = -(masked_log_probs * masked_errors.detach().to(masked_log_probs.dtype)).mean(dim=1)
    return weight * per_clip.mean()


def adamae_param_groups(sampler: nn.Module, weight_decay: float) -> list[dict]:
    """Parameter groups by AdaMAE's rule (optim_factory.get_parameter_groups): no decay for 1-D tensors and biases,
    `weight_decay` for the rest (including `pos_embed_probs`, which AdaMAE's skip list does not name).

    AdaMAE trains the sampler with the MAE's own AdamW (betas 0.9, 0.95; lr 1.5e-4 * B / 256); give these groups to a
    sampler optimizer with those settings, or merge them into the MAE's.
    """
    decay, no_decay = [], []
    for name, param in sampler.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim == 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
