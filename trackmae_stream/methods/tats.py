"""TATS-ref: a trajectory-attention token sampler trained by PPO (SPEC §3.4, our reference design; the TATS code is
not available, so nothing here is confirmed by the paper -- label results "TATS-ref").

Design (SPEC §3.4, choices marked "ours" where the SPEC leaves one open):

- State s = stopgrad(patch_embed(x)) (B, N, D), the MAE's patch embeddings before its positional embedding;
  the network adds its own learnable `pos_embed_probs` (zero-initialised). The stop-gradient keeps the RL signal out
  of the MAE.
- Actor: a learnable CLS token is prepended (as SPEC §3.4 says; with one block it is inert: in trajectory attention
  the patch queries attend only to patch keys and the CLS output is dropped, so it gets no gradient); one pre-norm
  block with Motionformer's `TrajectoryAttention`
  (facebookresearch/Motionformer @ bf43d50, slowfast/models/vit_helper.py; `use_original_code=True` keeps its
  documented typo: the temporal step aggregates the trajectory tokens, not their value projection) and an MLP;
  then LayerNorm -> Linear(D, H) -> GELU -> Linear(H, 1) per token -> logits ℓ (B, N), nan_to_num, divided by the
  temperature, clamped to ±`logit_clamp`. π = softmax(ℓ) is the probability of a token being *visible*.
  The last actor and critic layers start at zero (ours), so π starts exactly uniform and V at 0.
- Critic: mean of the block's output tokens without CLS -> LayerNorm -> Linear(D, H) -> GELU -> Linear(H, 1) = V(s).
- Action: k visible tokens drawn without replacement from π (Gumbel-top-k on the project's counter RNG, keyed by
  (seed, step, rank), stream `STREAM_TATS`; see methods/adamae.py), stored in draw order.
- Reward: R = mean over the clip's masked tokens of the per-token reconstruction error e (detached), normalised over
  the batch (methods/ppo.py). Maximising it makes the sampler *mask* the tokens that are hard to reconstruct (moving
  ones) and show the easy ones: π falls on high-error tokens ("select motion-centric tokens to mask").
- PPO (methods/ppo.py): K epochs over the stored (s, action, log π_old, V_old, R) with the clipped surrogate, value
  loss and entropy bonus; its own AdamW (lr 1e-4; no weight decay on the heads, the positional embedding, the CLS
  token, biases and norms).

Reward groups (ours, `PPOConfig(group_size=G)`): normalising R over *different* clips leaves each clip's overall
difficulty in the advantage; it dwarfs the effect of the mask and correlates with the tokens' appearance. Measured on
rendered synthetic-set clips (64 px, random patch embedding as the state, 150 updates of 16 rows): with G = 1 (SPEC)
π's mass on the moving third of the tokens stayed at 0.34 on held-out clips; with each clip repeated G = 4 times in
the batch (each copy its own mask) and R normalised within the copies it fell to 0.18 and the held-out reward rose.

Per training step (what the trainer does):
    rollout = sampler.sample(tokens, k, seed=seed, step=step, rank=rank, cfg=cfg, uniform=in_warmup)
    ... MAE forward on rollout.mask.visible_idx / rollout.mask.masked_idx, per-token errors e (B, M), MAE step ...
    if not in_warmup:
        stats = ppo_update(sampler, optimizer, rollout, tats_reward(e), cfg)
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..kernels.masking import MaskOutput
from ..model.vit import init_weights
from .adamae import mask_output_from_visible, sample_without_replacement
from .ppo import PPOConfig, action_log_prob, advantage, normalise_reward, ppo_losses

#: Counter-RNG stream of TATS-ref's Gumbel noise ("TATS"); distinct from tube masking (0-2) and AdaMAE.
STREAM_TATS = 0x54415453
#: SPEC §3.4's PPO settings.
DEFAULT_PPO = PPOConfig()


class TrajectoryAttention(nn.Module):
    """Motionformer's trajectory attention (full-attention path), written from its definition.

    x (B, 1 + F*P, C) with a CLS token at index 0 and patch tokens in frame-major order f*P + p -> (B, 1 + F*P, C).
    1. q, k, v = qkv(x), split into h heads; CLS attends to all tokens (ordinary attention).
    2. For each patch query q_s and frame f: softmax over that frame's P keys (scale d_h^-1/2), weighted sum of that
       frame's values: trajectory tokens x̃ (B, N, F, C).
    3. q2 = proj_q(x̃[s, frame(s)]), (k2, v2) = proj_kv(x̃); softmax over f of q2·k2 (scaled); aggregate x̃ itself
       when `use_original_code` (Motionformer's default, its acknowledged typo) or v2 otherwise.
    4. Concatenate CLS, output projection.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, use_original_code: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_original_code = use_original_code

    def forward(self, x: Tensor, tokens_per_frame: int, num_frames: int) -> Tensor:
        b, n1, c = x.shape
        h, p, f = self.num_heads, tokens_per_frame, num_frames
        n = n1 - 1
        if n != p * f:
            raise ValueError(f"expected 1 + {f} * {p} tokens, got {n1}")
        d = c // h
        q, k, v = (t.reshape(b, n1, h, d).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))  # (B, h, 1+N, d)
        cls_attn = ((q[:, :, :1] * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        cls_out = (cls_attn @ v).transpose(1, 2).reshape(b, 1, c)
        q_, k_, v_ = q[:, :, 1:], k[:, :, 1:], v[:, :, 1:]
        space = (self.scale * (q_ @ k_.transpose(-2, -1))).reshape(b, h, n, f, p).softmax(dim=-1)
        traj = torch.einsum("bhqfp,bhfpd->bhqfd", space, v_.reshape(b, h, f, p, d))
        traj = traj.permute(0, 2, 3, 1, 4).reshape(b, n, f, c)  # (B, N, F, C), heads merged
        # each query's own frame: query s = g*P + m takes traj[s, g]
        diag = torch.diagonal(traj.reshape(b, f, p, f, c), dim1=1, dim2=3)  # (B, P, C, F)
        diag = diag.permute(0, 3, 1, 2).reshape(b, n, c)
        q2 = self.proj_q(diag).reshape(b, n, h, d).transpose(1, 2) * self.scale  # (B, h, N, d)
        k2, v2 = (t.reshape(b, n, f, h, d).permute(0, 3, 1, 2, 4) for t in self.proj_kv(traj).chunk(2, dim=-1))
        time = torch.einsum("bhsd,bhsfd->bhsf", q2, k2).softmax(dim=-1)
        values = traj.reshape(b, n, f, h, d).permute(0, 3, 1, 2, 4) if self.use_original_code else v2
        out = torch.einsum("bhsf,bhsfd->bhsd", time, values).transpose(1, 2).reshape(b, n, c)
        return self.proj(torch.cat([cls_out, out], dim=1))


class TrajectoryBlock(nn.Module):
    """Motionformer's block with trajectory attention (pre-norm, LayerNorm eps 1e-6, GELU MLP, no dropout):
    x (B, 1 + F*P, C) -> same shape."""

    def __init__(self, dim: int, num_heads: int = 8, mlp_ratio: float = 4.0, use_original_code: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TrajectoryAttention(dim, num_heads, use_original_code=use_original_code)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, tokens_per_frame: int, num_frames: int) -> Tensor:
        x = x + self.attn(self.norm1(x), tokens_per_frame, num_frames)
        return x + self.mlp(self.norm2(x))


class TATSOutput(NamedTuple):
    """The sampler's forward: logits (B, N) float32 (cleaned, tempered, clamped), log_probs = log_softmax(logits)
    (B, N), value (B,) float32."""

    logits: Tensor
    log_probs: Tensor
    value: Tensor


class TATSRollout(NamedTuple):
    """What the sampling step stores for PPO (all detached).

    mask: MaskOutput (mask (B, N) True = masked; visible_idx (B, k), masked_idx (B, N - k) ascending).
    order: (B, k) int64 visible tokens in draw order (the action).
    state: (B, N, D) the detached patch embeddings the policy saw.
    old_log_prob: (B,) log π_old(action) by the PPOConfig's log_prob/reduce.
    old_value: (B,) V_old(s).
    """

    mask: MaskOutput
    order: Tensor
    state: Tensor
    old_log_prob: Tensor
    old_value: Tensor


class TATSSampler(nn.Module):
    """TATS-ref actor-critic (see module doc). Parameters: `pos_embed_probs` (1, N, W), `cls_token` (1, 1, W),
    `input_proj` (Linear(D, W) when width != embed_dim), `block`, `actor`, `critic`.

    Args:
        tokens_per_frame: S = (H/p)(W/p) patches per time slot (Motionformer's seq_len).
        num_frames: T time slots (tubelets); N = T * S, token index t * S + s.
        embed_dim: D, the MAE's patch-embedding width (the state's last dimension).
        width: W, the sampler's width (default D; otherwise a Linear(D, W) maps the state first).
        num_heads: heads of the trajectory attention (default 8; must divide W).
        mlp_ratio: block MLP width / W.
        head_hidden: H, hidden width of the actor and critic MLPs (default W).
        logit_clamp: logits are clamped to ±logit_clamp (SPEC: 10).
        temperature: logits are divided by it before the clamp.
        use_original_code: Motionformer's temporal aggregation over x̃ (True, its default) or over v2.
    """

    def __init__(self, *, tokens_per_frame: int, num_frames: int, embed_dim: int, width: int | None = None,
                 num_heads: int = 8, mlp_ratio: float = 4.0, head_hidden: int | None = None,
                 logit_clamp: float = 10.0, temperature: float = 1.0, use_original_code: bool = True):
        super().__init__()
        width = width or embed_dim
        head_hidden = head_hidden or width
        if temperature <= 0 or logit_clamp <= 0:
            raise ValueError("temperature and logit_clamp must be > 0")
        self.tokens_per_frame = tokens_per_frame
        self.num_frames = num_frames
        self.num_tokens = tokens_per_frame * num_frames
        self.embed_dim = embed_dim
        self.logit_clamp = float(logit_clamp)
        self.temperature = float(temperature)
        self.input_proj = nn.Identity() if width == embed_dim else nn.Linear(embed_dim, width)
        self.pos_embed_probs = nn.Parameter(torch.zeros(1, self.num_tokens, width))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.block = TrajectoryBlock(width, num_heads, mlp_ratio, use_original_code)
        self.actor = nn.Sequential(nn.LayerNorm(width, eps=1e-6), nn.Linear(width, head_hidden), nn.GELU(),
                                   nn.Linear(head_hidden, 1))
        self.critic = nn.Sequential(nn.LayerNorm(width, eps=1e-6), nn.Linear(width, head_hidden), nn.GELU(),
                                    nn.Linear(head_hidden, 1))
        self.apply(init_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02, a=-0.02, b=0.02)
        for last in (self.actor[-1], self.critic[-1]):  # uniform π and V = 0 at the start
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, tokens: Tensor) -> TATSOutput:
        """tokens (B, N, D) patch embeddings (detached here: stop-gradient into the MAE) -> TATSOutput."""
        if tokens.ndim != 3 or tokens.shape[1:] != (self.num_tokens, self.embed_dim):
            raise ValueError(f"tokens must be (B, {self.num_tokens}, {self.embed_dim}), got {tuple(tokens.shape)}")
        x = self.input_proj(tokens.detach())
        x = x + self.pos_embed_probs.to(x.dtype)
        x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        x = self.block(x, self.tokens_per_frame, self.num_frames)[:, 1:]
        logits = torch.nan_to_num(self.actor(x).flatten(1).float()) / self.temperature
        logits = logits.clamp(-self.logit_clamp, self.logit_clamp)
        value = self.critic(x.mean(dim=1)).flatten().float()
        return TATSOutput(logits, torch.log_softmax(logits, dim=1), value)

    @torch.no_grad()
    def sample(self, tokens: Tensor, num_visible: int, *, seed: int, step: int, rank: int,
               cfg: PPOConfig = DEFAULT_PPO, uniform: bool = False) -> TATSRollout:
        """Draw `num_visible` visible tokens per clip from π (no gradients) and store what PPO needs.

        tokens (B, N, D). `uniform=True` draws from the uniform policy instead (the SPEC's warm-up: random masking
        for the first 1-5% of iterations; skip `ppo_update` on those steps). Keyed by (seed, step, rank), stream
        `STREAM_TATS`; the same arguments and parameters give the same rollout.
        """
        state = tokens.detach()
        out = self(state)
        logits = torch.zeros_like(out.logits) if uniform else out.logits
        log_probs = torch.log_softmax(logits, dim=1)
        order = sample_without_replacement(logits, num_visible, seed=seed, step=step, rank=rank, stream=STREAM_TATS)
        return TATSRollout(mask_output_from_visible(order, self.num_tokens), order, state,
                           action_log_prob(log_probs, order, cfg), out.value)


def tats_reward(masked_errors: Tensor) -> Tensor:
    """Per-clip reward R = mean over the masked tokens of the reconstruction error (detached): masked_errors (B, M)
    (per-token error, e.g. the mean squared error over the target dims, in masked_idx order) -> (B,) float32.

    A loss summed over several targets: pass their weighted per-token sum. Raw, not normalised (`ppo_update`
    normalises over the batch).
    """
    if masked_errors.ndim != 2:
        raise ValueError(f"masked_errors must be (B, M), got {tuple(masked_errors.shape)}")
    return masked_errors.detach().float().mean(dim=1)


def per_token_errors(prediction: Tensor, target: Tensor) -> Tensor:
    """Per-token mean squared error (B, M, C), (B, M, C) -> (B, M): the MAE loss before its mean."""
    return (prediction - target).square().mean(dim=-1)


def masked_share(mask: Tensor, region: Tensor) -> Tensor:
    """Fraction of the masked tokens that lie in `region`: mask (B, N) True = masked, region (B, N) bool (e.g. moving
    tokens) -> scalar float32 tensor over the batch (a diagnostic to log; no host sync)."""
    mask = mask.to(torch.float32)
    return (mask * region.to(torch.float32)).sum() / mask.sum().clamp_min(1.0)


class PPOStats(NamedTuple):
    """Diagnostics of one `ppo_update` (scalar tensors, detached; the last epoch's values unless named otherwise)."""

    total: Tensor
    policy: Tensor
    value: Tensor
    entropy: Tensor
    clip_fraction: Tensor
    approx_kl: Tensor
    reward_mean: Tensor  # raw reward, mean over the batch


def ppo_update(sampler: TATSSampler, optimizer: torch.optim.Optimizer, rollout: TATSRollout, reward: Tensor,
               cfg: PPOConfig = DEFAULT_PPO) -> PPOStats:
    """K = cfg.epochs PPO epochs on one rollout: normalise the reward (B,) over the batch, A = R_norm - V_old, then
    per epoch: forward on the stored state, `ppo_losses`, zero_grad, backward, optional gradient clipping, step.

    Touches only the sampler's parameters (its state is detached), so call it after the MAE's own step. No host syncs.
    """
    target = normalise_reward(reward, group_size=cfg.group_size)
    adv = advantage(target, rollout.old_value)
    for _ in range(cfg.epochs):
        out = sampler(rollout.state)
        losses = ppo_losses(out.log_probs, out.value, rollout.order, rollout.old_log_prob, adv, target, cfg)
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(sampler.parameters(), cfg.max_grad_norm)
        optimizer.step()
    return PPOStats(losses.total.detach(), losses.policy.detach(), losses.value.detach(), losses.entropy.detach(),
                    losses.clip_fraction, losses.approx_kl, reward.detach().float().mean())


def tats_param_groups(sampler: TATSSampler, weight_decay: float = 0.05) -> list[dict]:
    """AdamW groups: `weight_decay` (ours: 0.05, the MAE's) on the block's and input projection's matrices; none on
    the actor and critic heads (SPEC §3.4), `pos_embed_probs`, `cls_token`, biases and LayerNorms."""
    decay, no_decay = [], []
    for name, param in sampler.named_parameters():
        if not param.requires_grad:
            continue
        is_matrix = param.ndim >= 2 and not name.endswith(".bias")
        in_trunk = name.startswith(("block.", "input_proj."))
        (decay if is_matrix and in_trunk else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_tats_optimizer(sampler: TATSSampler, lr: float = 1e-4, weight_decay: float = 0.05) -> torch.optim.AdamW:
    """The sampler's own AdamW (SPEC §3.4: lr 1e-4; betas torch's default (0.9, 0.999)); state_dict-able."""
    return torch.optim.AdamW(tats_param_groups(sampler, weight_decay), lr=lr)
