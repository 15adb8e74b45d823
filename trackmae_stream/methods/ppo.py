"""PPO quantities for a one-step token-sampling episode (TATS-ref, SPEC §3.4), in torch, with no host syncs.

The action is a set of k visible tokens drawn without replacement from a categorical π over N tokens (B clips at
once). Every function is batched over clips and returns tensors; nothing reads a value back to the host.

- log π(action): `log_prob_independent` (SPEC's default, AdaMAE-style: Σ_{i∈V} log π_i, which ignores the
  renormalisation between draws) or `log_prob_plackett_luce` (exact for the *ordered* draw: Σ_j log π_{i_j} -
  log(1 - Σ_{l<j} π_{i_l}); the set is a function of the ordered draw, so it is an exact policy likelihood). Either
  may be reduced by "sum" or by "mean" over the k tokens (SPEC's remedy for exploding ratios).
- Reward: per clip, normalised over the batch: (R - mean_b R) / (std_b R + 1e-8), population std (divisor B);
  optionally within groups of G masks of one clip (`PPOConfig.group_size`, ours).
- Advantage: A = R_norm - V_old(s) (single-step episode, no GAE), V_old from the sampling step.
- Ratio: ρ = exp(clamp(log π(a) - log π_old(a), ±log_ratio_clip)).
- Policy loss: -mean_b min(ρA, clip(ρ, 1-ε, 1+ε)A). Value loss: mean_b (V(s) - R_norm)². Entropy: mean_b H(π).
- Total: policy + value_coef * value - entropy_coef * entropy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


@dataclass(frozen=True)
class PPOConfig:
    """SPEC §3.4's settings (ours, not the TATS paper's): clip ε 0.2, value weight 0.5, entropy bonus 0.01, K = 4
    epochs over the batch, log-ratio clamp ±20, independent summed log-probability."""

    clip_eps: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    epochs: int = 4
    log_ratio_clip: float = 20.0
    log_prob: str = "independent"  # or "plackett_luce"
    reduce: str = "sum"  # or "mean" (per token)
    max_grad_norm: float | None = None  # clip the sampler's gradient norm per PPO epoch (no host sync)
    group_size: int = 1  # G > 1: the batch holds each clip G times in a row; rewards are normalised within a clip


    def __post_init__(self):
        if self.log_prob not in ("independent", "plackett_luce"):
            raise ValueError(f"log_prob must be 'independent' or 'plackett_luce', got {self.log_prob!r}")
        if self.reduce not in ("sum", "mean"):
            raise ValueError(f"reduce must be 'sum' or 'mean', got {self.reduce!r}")
        if self.epochs < 1 or self.clip_eps <= 0 or self.log_ratio_clip <= 0 or self.group_size < 1:
            raise ValueError("epochs and group_size must be >= 1 and clip_eps, log_ratio_clip > 0")


def _reduce(per_token: Tensor, reduce: str) -> Tensor:
    if reduce == "sum":
        return per_token.sum(dim=1)
    if reduce == "mean":
        return per_token.mean(dim=1)
    raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")


def log_prob_independent(log_probs: Tensor, actions: Tensor, reduce: str = "sum") -> Tensor:
    """Σ (or mean) over the k chosen tokens of log π_i: log_probs (B, N) normalised, actions (B, k) -> (B,)."""
    return _reduce(log_probs.gather(1, actions), reduce)


def log_prob_plackett_luce(log_probs: Tensor, order: Tensor, reduce: str = "sum") -> Tensor:
    """Exact log-probability of the ordered draw `order` (B, k) (first drawn first) without replacement from π:
    Σ_j [log π_{i_j} - log(1 - Σ_{l<j} π_{i_l})] (or its mean over j). log_probs (B, N) normalised -> (B,).

    The remaining mass 1 - Σ_{l<j} π_{i_l} is formed in float64 (clamped at 1e-300) and returned in log_probs' dtype.
    """
    chosen = log_probs.gather(1, order)
    chosen64 = chosen.to(torch.float64)
    taken_before = torch.cumsum(chosen64.exp(), dim=1) - chosen64.exp()
    remaining = torch.log((1.0 - taken_before).clamp_min(1e-300))
    return _reduce(chosen64 - remaining, reduce).to(log_probs.dtype)


def action_log_prob(log_probs: Tensor, order: Tensor, cfg: PPOConfig) -> Tensor:
    """log π(action) (B,) by `cfg.log_prob` and `cfg.reduce`; order (B, k) the draw-ordered visible tokens."""
    if cfg.log_prob == "plackett_luce":
        return log_prob_plackett_luce(log_probs, order, cfg.reduce)
    return log_prob_independent(log_probs, order, cfg.reduce)


def categorical_entropy(log_probs: Tensor) -> Tensor:
    """H(π) = -Σ_i π_i log π_i per row: log_probs (B, N) normalised -> (B,). Zero-probability tokens add 0 (the
    clamp keeps -inf out of the product and its gradient)."""
    log_probs = log_probs.clamp_min(torch.finfo(log_probs.dtype).min)
    return -(log_probs.exp() * log_probs).sum(dim=1)


def normalise_reward(reward: Tensor, eps: float = 1e-8, group_size: int = 1) -> Tensor:
    """(R - mean R) / (std R + eps) over the batch, std with divisor B: reward (B,) -> (B,) float32, detached.

    group_size G > 1 (ours, not SPEC §3.4): the batch is B/G clips, each repeated G times in a row with its own mask
    (`x.repeat_interleave(G, 0)`; the Gumbel noise is keyed by the row, so the copies get different masks), and each
    reward is normalised within its clip's G copies. This removes the clip's overall difficulty from the advantage,
    which otherwise dominates it and correlates with the tokens' appearance (measured on the synthetic set: see
    tests/test_tats_ppo.py).
    With B = 1 (or G = 1 copy) every normalised reward is 0 (no learning signal).
    """
    reward = reward.detach().float()
    if group_size > 1:
        if reward.shape[0] % group_size:
            raise ValueError(f"batch {reward.shape[0]} is not a multiple of group_size {group_size}")
        grouped = reward.reshape(-1, group_size)
        normed = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, unbiased=False, keepdim=True) + eps)
        return normed.reshape(-1)
    return (reward - reward.mean()) / (reward.std(unbiased=False) + eps)


def advantage(normalised_reward: Tensor, old_value: Tensor) -> Tensor:
    """A = R_norm - V_old(s): (B,), (B,) -> (B,) detached (single-step episode, so no GAE)."""
    return (normalised_reward - old_value).detach()


def ppo_ratio(log_prob: Tensor, old_log_prob: Tensor, log_ratio_clip: float = 20.0) -> Tensor:
    """ρ = exp(clamp(log π - log π_old, -c, c)): (B,), (B,) -> (B,); gradient flows through log_prob only."""
    return torch.exp((log_prob - old_log_prob.detach()).clamp(-log_ratio_clip, log_ratio_clip))


def ppo_policy_loss(ratio: Tensor, adv: Tensor, clip_eps: float = 0.2) -> Tensor:
    """Clipped surrogate, negated to be minimised: -mean_b min(ρA, clip(ρ, 1-ε, 1+ε)A). (B,), (B,) -> scalar."""
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    return -torch.minimum(unclipped, clipped).mean()


def value_loss(value: Tensor, target: Tensor) -> Tensor:
    """mean_b (V(s) - R_norm)²: (B,), (B,) -> scalar (the 0.5 weight is `PPOConfig.value_coef`)."""
    return (value - target.detach()).square().mean()


class PPOLosses(NamedTuple):
    """One PPO evaluation: `total` (scalar, to backpropagate) and its parts, plus diagnostics (all tensors)."""

    total: Tensor  # policy + value_coef * value - entropy_coef * entropy
    policy: Tensor  # clipped surrogate loss (scalar)
    value: Tensor  # value loss (scalar)
    entropy: Tensor  # mean entropy of π over clips (scalar)
    ratio: Tensor  # (B,) ρ
    clip_fraction: Tensor  # scalar, fraction of clips with |ρ - 1| > ε (detached)
    approx_kl: Tensor  # scalar, mean(log π_old - log π) (detached)


def ppo_losses(log_probs: Tensor, value: Tensor, order: Tensor, old_log_prob: Tensor, adv: Tensor,
               target: Tensor, cfg: PPOConfig) -> PPOLosses:
    """All PPO terms for one epoch.

    log_probs (B, N) normalised log π from the current policy; value (B,) V(s); order (B, k) the stored draw-ordered
    action; old_log_prob (B,) log π_old(action) stored at sampling; adv (B,) from `advantage`; target (B,) R_norm.
    """
    log_prob = action_log_prob(log_probs, order, cfg)
    ratio = ppo_ratio(log_prob, old_log_prob, cfg.log_ratio_clip)
    policy = ppo_policy_loss(ratio, adv, cfg.clip_eps)
    v_loss = value_loss(value, target)
    entropy = categorical_entropy(log_probs).mean()
    total = policy + cfg.value_coef * v_loss - cfg.entropy_coef * entropy
    with torch.no_grad():
        clip_fraction = ((ratio - 1.0).abs() > cfg.clip_eps).float().mean()
        approx_kl = (old_log_prob - log_prob).mean()
    return PPOLosses(total, policy, v_loss, entropy, ratio, clip_fraction, approx_kl)
