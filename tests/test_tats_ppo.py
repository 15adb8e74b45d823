"""TATS-ref (SPEC §3.4): every PPO quantity against a brute-force float64 computation (explicit loops and enumeration
over N = 7 tokens, k = 3), trajectory attention against a loop reference, gradients to actor and critic (none to the
MAE's tokens), determinism and resume, and a learning test: with a per-token error that is high on moving tokens,
PPO moves π (the probability of being visible) off the moving tokens, i.e. the sampler masks them."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from trackmae_stream.methods.ppo import (
    PPOConfig,
    action_log_prob,
    advantage,
    categorical_entropy,
    log_prob_independent,
    log_prob_plackett_luce,
    normalise_reward,
    ppo_losses,
    ppo_policy_loss,
    ppo_ratio,
    value_loss,
)
from trackmae_stream.methods.tats import (
    STREAM_TATS,
    TATSSampler,
    TrajectoryAttention,
    build_tats_optimizer,
    masked_share,
    per_token_errors,
    ppo_update,
    tats_param_groups,
    tats_reward,
)

N, K, B = 7, 3, 5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one intra-op thread is ~25x faster than two on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_policy(seed: int, batch: int = B, tokens: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(batch, tokens, generator=g, dtype=torch.float64) * 1.3, dim=1)


def _random_orders(seed: int, batch: int = B, tokens: int = N, k: int = K) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(tokens, generator=g)[:k] for _ in range(batch)])


def _pl_prob(p: list[float], order: tuple[int, ...]) -> float:
    """Probability of drawing `order` one by one without replacement: Π_j p_j / (1 - taken before)."""
    prob, taken = 1.0, 0.0
    for i in order:
        prob *= p[i] / (1.0 - taken)
        taken += p[i]
    return prob


# ------------------------------------------------------------------------------------------------- log-probabilities


def test_log_prob_independent_matches_loops():
    log_probs, orders = _random_policy(1), _random_orders(2)
    for reduce in ("sum", "mean"):
        got = log_prob_independent(log_probs, orders, reduce)
        for b in range(B):
            total = sum(float(log_probs[b, int(i)]) for i in orders[b])
            assert got[b].item() == pytest.approx(total / (K if reduce == "mean" else 1), abs=1e-12)


def test_log_prob_plackett_luce_matches_sequential_draws():
    log_probs, orders = _random_policy(3), _random_orders(4)
    got = log_prob_plackett_luce(log_probs, orders)
    got_mean = log_prob_plackett_luce(log_probs, orders, "mean")
    for b in range(B):
        p = log_probs[b].exp().tolist()
        expected = math.log(_pl_prob(p, tuple(int(i) for i in orders[b])))
        assert got[b].item() == pytest.approx(expected, abs=1e-12)
        assert got_mean[b].item() == pytest.approx(expected / K, abs=1e-12)


def test_plackett_luce_sums_to_the_set_probability_and_to_one():
    """Σ over the k! orderings of a set = P(set); Σ over all C(7, 3) sets = 1 (the enumeration is the reference)."""
    log_probs = _random_policy(5, batch=1)
    p = log_probs[0].exp().tolist()
    orders = torch.tensor(list(itertools.permutations(range(N), K)))
    pl = log_prob_plackett_luce(log_probs.expand(len(orders), N), orders).exp()
    assert pl.sum().item() == pytest.approx(1.0, abs=1e-12)
    for subset in itertools.combinations(range(N), K):
        rows = [r for r, o in enumerate(orders.tolist()) if sorted(o) == list(subset)]
        assert pl[rows].sum().item() == pytest.approx(sum(_pl_prob(p, o) for o in itertools.permutations(subset)),
                                                      abs=1e-12)


def test_action_log_prob_follows_the_config():
    log_probs, orders = _random_policy(6), _random_orders(7)
    assert torch.equal(action_log_prob(log_probs, orders, PPOConfig()), log_prob_independent(log_probs, orders))
    assert torch.equal(action_log_prob(log_probs, orders, PPOConfig(log_prob="plackett_luce", reduce="mean")),
                       log_prob_plackett_luce(log_probs, orders, "mean"))
    with pytest.raises(ValueError):
        PPOConfig(log_prob="exact_set")


# ----------------------------------------------------------------------------------------------- PPO quantities


def test_entropy_matches_loops():
    log_probs = _random_policy(8)
    got = categorical_entropy(log_probs)
    for b in range(B):
        p = log_probs[b].exp().tolist()
        assert got[b].item() == pytest.approx(-sum(x * math.log(x) for x in p), abs=1e-12)
    uniform = torch.full((1, N), -math.log(N), dtype=torch.float64)
    assert categorical_entropy(uniform).item() == pytest.approx(math.log(N), abs=1e-12)


def test_reward_normalisation_and_advantage_match_loops():
    g = torch.Generator().manual_seed(9)
    errors = torch.rand(B, N - K, generator=g, dtype=torch.float64) + 0.1
    reward = tats_reward(errors)
    for b in range(B):
        assert reward[b].item() == pytest.approx(sum(errors[b].tolist()) / (N - K), rel=1e-6)
    r = reward.tolist()
    mean = sum(r) / B
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / B)
    norm = normalise_reward(reward)
    old_value = torch.randn(B, generator=g)
    adv = advantage(norm, old_value)
    for b in range(B):
        assert norm[b].item() == pytest.approx((r[b] - mean) / (std + 1e-8), abs=1e-5)
        assert adv[b].item() == pytest.approx((r[b] - mean) / (std + 1e-8) - old_value[b].item(), abs=1e-5)


def _ppo_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    log_prob = torch.randn(B * 3, generator=g, dtype=torch.float64)
    old = log_prob + (torch.rand(B * 3, generator=g, dtype=torch.float64) - 0.5) * 1.2  # ratios in ~[0.55, 1.8]
    adv = torch.randn(B * 3, generator=g, dtype=torch.float64)
    return log_prob, old, adv


def test_ratio_and_clipped_surrogate_match_loops():
    eps = 0.2
    log_prob, old, adv = _ppo_case(10)
    ratio = ppo_ratio(log_prob, old)
    loss = ppo_policy_loss(ratio, adv, eps)
    terms, clipped_used = [], 0
    for lp, lo, a in zip(log_prob.tolist(), old.tolist(), adv.tolist()):
        rho = math.exp(lp - lo)
        rho_clipped = min(max(rho, 1 - eps), 1 + eps)
        if rho * a <= rho_clipped * a:
            terms.append(rho * a)
        else:
            terms.append(rho_clipped * a)
            clipped_used += 1
    assert 0 < clipped_used < len(terms)  # both branches of the min are exercised
    assert ratio.tolist() == pytest.approx([math.exp(a - b) for a, b in zip(log_prob.tolist(), old.tolist())],
                                           abs=1e-12)
    assert loss.item() == pytest.approx(-sum(terms) / len(terms), abs=1e-12)
    # the log-ratio clamp: a ratio of e^30 is read as e^20
    assert ppo_ratio(torch.tensor([30.0], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)).item() == \
        pytest.approx(math.exp(20.0))


def test_clipped_surrogate_gradient_matches_finite_differences():
    log_prob, old, adv = _ppo_case(11)
    log_prob.requires_grad_(True)

    def f(lp):
        return ppo_policy_loss(ppo_ratio(lp, old), adv, 0.2)

    # away from the kinks |ρ - 1| = ε, autograd equals the numerical derivative (including the zero gradient of a
    # clipped term)
    rho = (log_prob - old).exp()
    assert ((rho - 0.8).abs().min() > 1e-3) and ((rho - 1.2).abs().min() > 1e-3)
    assert torch.autograd.gradcheck(f, (log_prob,), eps=1e-6, atol=1e-8)
    grad = torch.autograd.grad(f(log_prob), log_prob)[0]
    for i, (r, a) in enumerate(zip(rho.tolist(), adv.tolist())):
        active_clip = (a > 0 and r > 1.2) or (a < 0 and r < 0.8)
        expected = 0.0 if active_clip else -r * a / len(rho)
        assert grad[i].item() == pytest.approx(expected, abs=1e-12)


def test_value_loss_and_total_match_loops():
    cfg = PPOConfig()
    log_probs = _random_policy(12)
    orders = _random_orders(13)
    g = torch.Generator().manual_seed(14)
    value = torch.randn(B, generator=g, dtype=torch.float64)
    target = torch.randn(B, generator=g, dtype=torch.float64)
    old_value = torch.randn(B, generator=g, dtype=torch.float64)
    old_log_prob = log_prob_independent(log_probs, orders) + (torch.rand(B, generator=g, dtype=torch.float64) - 0.5)
    adv = advantage(target, old_value)
    got = ppo_losses(log_probs, value, orders, old_log_prob, adv, target, cfg)
    assert value_loss(value, target).item() == pytest.approx(
        sum((v - t) ** 2 for v, t in zip(value.tolist(), target.tolist())) / B, abs=1e-12)
    # brute force of the whole objective
    surrogate, entropy = 0.0, 0.0
    for b in range(B):
        p = log_probs[b].exp().tolist()
        lp = sum(math.log(p[int(i)]) for i in orders[b])
        rho = math.exp(lp - old_log_prob[b].item())
        a = target[b].item() - old_value[b].item()
        surrogate += min(rho * a, min(max(rho, 0.8), 1.2) * a) / B
        entropy += -sum(x * math.log(x) for x in p) / B
    v = sum((x - t) ** 2 for x, t in zip(value.tolist(), target.tolist())) / B
    assert got.policy.item() == pytest.approx(-surrogate, abs=1e-12)
    assert got.entropy.item() == pytest.approx(entropy, abs=1e-12)
    assert got.total.item() == pytest.approx(-surrogate + 0.5 * v - 0.01 * entropy, abs=1e-12)


# ---------------------------------------------------------------------------------------------- trajectory attention


def _trajectory_attention_loops(attn: TrajectoryAttention, x: torch.Tensor, p: int, f: int) -> torch.Tensor:
    """Motionformer's trajectory attention, one head / query / frame at a time (float64)."""
    b_, n1, c = x.shape
    h = attn.num_heads
    d = c // h
    scale = d ** -0.5
    qkv = x @ attn.qkv.weight.T
    q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
    out = torch.zeros(b_, n1, c, dtype=x.dtype)
    for b in range(b_):
        for head in range(h):
            sl = slice(head * d, (head + 1) * d)
            weights = torch.softmax(torch.stack([q[b, 0, sl] @ k[b, j, sl] * scale for j in range(n1)]), 0)
            out[b, 0, sl] = sum(weights[j] * v[b, j, sl] for j in range(n1))
        traj = torch.zeros(n1 - 1, f, c, dtype=x.dtype)  # heads merged, as Motionformer rearranges them
        for s in range(n1 - 1):
            for t in range(f):
                for head in range(h):
                    sl = slice(head * d, (head + 1) * d)
                    keys = [1 + t * p + m for m in range(p)]
                    w = torch.softmax(torch.stack([q[b, 1 + s, sl] @ k[b, j, sl] * scale for j in keys]), 0)
                    traj[s, t, sl] = sum(w[m] * v[b, keys[m], sl] for m in range(p))
        for s in range(n1 - 1):
            own = traj[s, s // p]
            q2 = own @ attn.proj_q.weight.T
            kv = traj[s] @ attn.proj_kv.weight.T  # (F, 2C)
            for head in range(h):
                sl = slice(head * d, (head + 1) * d)
                w = torch.softmax(torch.stack([q2[sl] * scale @ kv[t, sl] for t in range(f)]), 0)
                vals = traj[s, :, sl] if attn.use_original_code else kv[:, c:][:, sl]
                out[b, 1 + s, sl] = sum(w[t] * vals[t] for t in range(f))
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("original", [True, False])
def test_trajectory_attention_matches_loops(original):
    torch.manual_seed(15)
    p, f, c = 5, 3, 12
    attn = TrajectoryAttention(c, num_heads=3, use_original_code=original).double()
    for param in attn.parameters():
        torch.nn.init.normal_(param, std=0.4)
    x = torch.randn(2, 1 + p * f, c, dtype=torch.float64)
    got = attn(x, p, f)
    assert torch.allclose(got, _trajectory_attention_loops(attn, x, p, f), atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------------ the sampler


def _sampler(seed: int = 0, s: int = 5, t: int = 3, d: int = 16, **kwargs) -> TATSSampler:
    torch.manual_seed(seed)
    return TATSSampler(tokens_per_frame=s, num_frames=t, embed_dim=d, num_heads=4, **kwargs)


def test_sample_shapes_uniform_start_and_mask_format():
    sampler = _sampler()
    tokens = torch.randn(3, 15, 16)
    rollout = sampler.sample(tokens, 4, seed=1, step=2, rank=0)
    mask, visible, masked = rollout.mask
    assert mask.shape == (3, 15) and visible.shape == (3, 4) and masked.shape == (3, 11)
    assert torch.equal(torch.sort(rollout.order, dim=1).values, visible)
    for b in range(3):
        assert visible[b].tolist() == sorted(visible[b].tolist()) and masked[b].tolist() == sorted(masked[b].tolist())
        assert sorted(visible[b].tolist() + masked[b].tolist()) == list(range(15))
        assert [i for i in range(15) if mask[b, i]] == masked[b].tolist()
    # zero-initialised heads: π uniform, V = 0, log π_old(action) = k log(1/N)
    out = sampler(tokens)
    assert torch.allclose(out.log_probs, torch.full((3, 15), -math.log(15)))
    assert torch.equal(rollout.old_value, torch.zeros(3))
    assert torch.allclose(rollout.old_log_prob, torch.full((3,), -4 * math.log(15)))


def test_determinism_and_keys():
    sampler = _sampler()
    tokens = torch.randn(4, 15, 16)
    a = sampler.sample(tokens, 6, seed=3, step=7, rank=1)
    b = sampler.sample(tokens, 6, seed=3, step=7, rank=1)
    assert torch.equal(a.order, b.order) and torch.equal(a.old_log_prob, b.old_log_prob)
    for other in (dict(seed=4, step=7, rank=1), dict(seed=3, step=8, rank=1), dict(seed=3, step=7, rank=0)):
        assert not torch.equal(sampler.sample(tokens, 6, **other).order, a.order)
    assert STREAM_TATS not in (0, 1, 2)


def _nudge_heads(sampler: TATSSampler, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for last in (sampler.actor[-1], sampler.critic[-1]):
        with torch.no_grad():
            last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 0.3)


def test_gradients_reach_actor_and_critic_but_not_the_mae_tokens():
    sampler = _sampler()
    _nudge_heads(sampler, 16)
    tokens = torch.randn(4, 15, 16, requires_grad=True)
    rollout = sampler.sample(tokens, 5, seed=0, step=0, rank=0)
    g = torch.Generator().manual_seed(17)
    target = normalise_reward(torch.rand(4, generator=g))
    adv = advantage(target, rollout.old_value)
    out = sampler(tokens)
    # perturb old log-probs so that some ratios are away from 1 but inside the clip range
    losses = ppo_losses(out.log_probs, out.value, rollout.order, rollout.old_log_prob - 0.05, adv, target, PPOConfig())
    losses.total.backward()
    assert tokens.grad is None  # stop-gradient into the MAE
    for name, param in sampler.named_parameters():
        if name == "cls_token":  # patch queries never attend to CLS and its output is dropped: inert in one block
            assert param.grad is None or param.grad.abs().sum() == 0
            continue
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # the policy term alone reaches the actor, the value term alone reaches the critic and not the actor head
    sampler.zero_grad()
    out = sampler(tokens)
    value_loss(out.value, target).backward()
    assert sampler.actor[-1].weight.grad is None or sampler.actor[-1].weight.grad.abs().sum() == 0
    assert sampler.critic[-1].weight.grad.abs().sum() > 0


def test_param_groups_and_state_dict_round_trip():
    sampler = _sampler(width=24)
    groups = tats_param_groups(sampler)
    names = {id(p): n for n, p in sampler.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert decay | no_decay == set(names.values()) and not decay & no_decay
    assert "input_proj.weight" in decay and "block.attn.qkv.weight" in decay
    assert {"pos_embed_probs", "cls_token", "actor.1.weight", "critic.3.weight"} <= no_decay
    clone = _sampler(seed=99, width=24)
    clone.load_state_dict(sampler.state_dict())
    tokens = torch.randn(2, 15, 16)
    assert torch.equal(clone(tokens).logits, sampler(tokens).logits)


def test_ppo_update_is_deterministic_and_resumes_bit_exactly():
    cfg = PPOConfig()

    def steps(sampler, optimizer, first, last):
        for step in range(first, last):
            g = torch.Generator().manual_seed(100 + step)
            tokens = torch.randn(4, 15, 16, generator=g)
            rollout = sampler.sample(tokens, 5, seed=1, step=step, rank=0, cfg=cfg)
            errors = torch.rand(4, 10, generator=g) + rollout.mask.visible_idx[:, :1].float() * 0.01
            ppo_update(sampler, optimizer, rollout, tats_reward(errors), cfg)

    run = _sampler()
    opt = build_tats_optimizer(run, lr=1e-3)
    steps(run, opt, 0, 3)
    saved = {"model": {k: v.clone() for k, v in run.state_dict().items()},
             "opt": __import__("copy").deepcopy(opt.state_dict())}
    steps(run, opt, 3, 5)
    resumed = _sampler(seed=42)
    resumed_opt = build_tats_optimizer(resumed, lr=1e-3)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    steps(resumed, resumed_opt, 3, 5)
    for (name, a), b in zip(run.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------------------------------- learning test


def _motion_batch(step: int, batch: int, s: int, t: int, d: int):
    """Clips whose state marks a random third of the tokens as moving (feature 0 = +2, else -2, plus noise); the
    per-token reconstruction error is 1.0 on moving tokens and 0.2 on static ones, with noise."""
    g = torch.Generator().manual_seed(1000 + step)
    n = s * t
    moving = torch.rand(batch, n, generator=g) < 1 / 3
    tokens = torch.randn(batch, n, d, generator=g) * 0.5
    tokens[..., 0] += torch.where(moving, 2.0, -2.0)
    errors = torch.where(moving, 1.0, 0.2) + 0.05 * torch.rand(batch, n, generator=g)
    return tokens, moving, errors


@pytest.mark.parametrize("log_prob", ["independent", "plackett_luce"])
def test_ppo_learns_to_mask_the_moving_tokens(log_prob):
    """Reward = mean error over the masked tokens, so the optimum shows static tokens and masks the moving ones:
    π's mass on moving tokens (1/3 under the uniform start) must fall below half of that, and the masked share of
    moving tokens must rise, measured on held-out clips."""
    s, t, d, k = 5, 3, 16, 4
    cfg = PPOConfig(log_prob=log_prob)
    sampler = _sampler(s=s, t=t, d=d)
    optimizer = build_tats_optimizer(sampler, lr=1e-3)

    def measure():
        tokens, moving, _ = _motion_batch(10_000, 64, s, t, d)
        with torch.no_grad():
            mass = (sampler(tokens).log_probs.exp() * moving).sum(1).mean().item()
        rollout = sampler.sample(tokens, k, seed=5, step=10_000, rank=0, cfg=cfg)
        return mass, masked_share(rollout.mask.mask, moving).item(), moving.float().mean().item()

    mass_before, share_before, moving_fraction = measure()
    for step in range(40):
        tokens, _, errors = _motion_batch(step, 16, s, t, d)
        rollout = sampler.sample(tokens, k, seed=5, step=step, rank=0, cfg=cfg)
        masked_errors = errors.gather(1, rollout.mask.masked_idx)
        ppo_update(sampler, optimizer, rollout, tats_reward(masked_errors), cfg)
    mass_after, share_after, _ = measure()
    assert mass_before == pytest.approx(moving_fraction, abs=0.02)  # uniform start
    assert mass_after < 0.5 * mass_before, (mass_before, mass_after)  # measured 0.34 -> 0.01-0.02
    assert share_after > share_before + 0.08, (share_before, share_after)  # measured 0.33 -> 0.45 (max 5/11)


def test_per_token_errors_matches_loops():
    g = torch.Generator().manual_seed(18)
    pred, target = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    got = per_token_errors(pred, target)
    for b in range(3):
        for m in range(5):
            assert got[b, m].item() == pytest.approx(sum((pred[b, m] - target[b, m]).square().tolist()) / 7,
                                                     rel=1e-6)


@pytest.mark.gpu
def test_cuda_matches_cpu_and_never_syncs():
    cpu = _sampler()
    _nudge_heads(cpu, 19)
    tokens = torch.randn(4, 15, 16)
    expected = cpu.sample(tokens, 5, seed=2, step=3, rank=0)
    gpu = _sampler()
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda()
    optimizer = build_tats_optimizer(gpu, lr=1e-3)
    errors = torch.rand(4, 10).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rollout = gpu.sample(tokens.cuda(), 5, seed=2, step=3, rank=0)
        stats = ppo_update(gpu, optimizer, rollout, tats_reward(errors), PPOConfig(max_grad_norm=1.0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(rollout.mask.visible_idx.cpu(), expected.mask.visible_idx)
    assert torch.isfinite(stats.total).item()


# ---------------------------------------------------------------------------------------------- the synthetic set


def test_group_normalisation_matches_loops():
    g = torch.Generator().manual_seed(20)
    reward = torch.rand(12, generator=g, dtype=torch.float64)
    got = normalise_reward(reward, group_size=4)
    for start in range(0, 12, 4):
        r = reward[start:start + 4].tolist()
        mean = sum(r) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / 4)
        assert got[start:start + 4].tolist() == pytest.approx([(x - mean) / (std + 1e-8) for x in r], abs=1e-5)
    with pytest.raises(ValueError):
        normalise_reward(reward, group_size=5)


def _synthetic_motion_energy(clips: int, size: int = 64, frames: int = 16) -> torch.Tensor:
    """Per-token motion statistic of clips rendered by the project's synthetic set: mean squared difference between
    the two frames of each 2x16x16 tubelet, (clips, 8 * (size/16)**2) in token order t*S + s."""
    import numpy as np

    from trackmae_stream.data.synthetic import render_clip, sample_clip

    video = np.stack([render_clip(*sample_clip(np.random.default_rng(i), i % 4, size, frames, task="legacy"))
                      for i in range(clips)])
    x = torch.from_numpy(video).float().div(255)  # (B, T, H, W, C)
    diff = (x[:, 1::2] - x[:, 0::2]).square().mean(-1)  # (B, T/2, H, W)
    side = size // 16
    return diff.reshape(clips, frames // 2, side, 16, side, 16).mean((3, 5)).reshape(clips, -1)


@pytest.mark.parametrize("group_size", [1, 4])
def test_policy_gradient_on_the_synthetic_set_points_to_masking_moving_tokens(group_size):
    """On clips of the synthetic set, with the per-token error taken as 0.2 + the token's motion energy (relative),
    the PPO objective's gradient for a policy logits = w * f (f the clip-standardised log motion energy) at the
    uniform policy (w = 0), averaged over 120 rollouts, asks for w < 0: less visibility for moving tokens. Within-clip
    groups (G = 4 masks per clip) make the estimate far less noisy than normalising over different clips."""
    energy = _synthetic_motion_energy(24)
    log_energy = energy.clamp_min(1e-6).log()
    feature = (log_energy - log_energy.mean(1, keepdim=True)) / log_energy.std(1, keepdim=True)
    errors = 0.2 + energy / energy.mean()
    grads = []
    for step in range(120):
        g = torch.Generator().manual_seed(step)
        clips = torch.randperm(24, generator=g)[:16 // group_size].repeat_interleave(group_size)
        w = torch.zeros(1, requires_grad=True)
        log_probs = torch.log_softmax(w * feature[clips], dim=1)
        order = torch.stack([torch.randperm(128, generator=g)[:13] for _ in clips])  # uniform policy's draws
        masked = torch.ones(len(clips), 128, dtype=torch.bool).scatter_(1, order, False)
        reward = (errors[clips] * masked).sum(1) / masked.sum(1)
        adv = normalise_reward(reward, group_size=group_size)
        log_prob = log_prob_independent(log_probs, order)
        loss = ppo_policy_loss(ppo_ratio(log_prob, log_prob.detach()), adv)
        grads.append(torch.autograd.grad(loss, w)[0].item())
    mean = sum(grads) / len(grads)
    stderr = math.sqrt(sum((x - mean) ** 2 for x in grads) / (len(grads) - 1) / len(grads))
    assert mean > 4 * stderr, (mean, stderr)  # descent lowers w (measured: G=1 6.3, G=4 43 standard errors)


@pytest.mark.slow
def test_ppo_on_synthetic_set_clips_learns_to_mask_moving_tokens():
    """End to end on rendered synthetic-set clips: the state is a randomly initialised patch embedding of the clip
    (the MAE's at step 0), the per-token error 0.2 + the tubelet's relative motion energy, 4 masks per clip
    (group_size=4), 120 PPO updates over 200 distinct training clips. On 40 held-out clips, π's mass on the top third
    of tokens by motion must fall from its uniform 1/3, the visible tokens' motion energy must fall and the reward
    rise. (With only 32 training clips the policy overfits and the held-out mass rises instead.)"""
    import numpy as np

    from trackmae_stream.data.synthetic import render_clip, sample_clip
    from trackmae_stream.model.vit import PatchEmbed3d

    clips = 240
    video = np.stack([render_clip(*sample_clip(np.random.default_rng(i), i % 4, 64, 16, task="legacy"))
                      for i in range(clips)])
    x = torch.from_numpy(video).float().div(255).permute(0, 4, 1, 2, 3)  # (B, C, T, H, W)
    energy = (x[:, :, 1::2] - x[:, :, 0::2]).square().mean(1).reshape(clips, 8, 4, 16, 4, 16).mean((3, 5))
    energy = energy.reshape(clips, -1)
    moving = energy > energy.quantile(2 / 3, dim=1, keepdim=True)
    errors = 0.2 + energy / energy.mean()
    torch.manual_seed(0)
    with torch.no_grad():
        tokens = PatchEmbed3d(48, 16, 2)((x - 0.45) / 0.25)  # (B, 128, 48)
    cfg = PPOConfig(group_size=4)
    sampler = TATSSampler(tokens_per_frame=16, num_frames=8, embed_dim=48, num_heads=4)
    optimizer = build_tats_optimizer(sampler, lr=1e-3)
    held_out = slice(200, clips)

    def measure():
        state = tokens[held_out].repeat(8, 1, 1)
        with torch.no_grad():
            mass = (sampler(tokens[held_out]).log_probs.exp() * moving[held_out]).sum(1).mean().item()
        rollout = sampler.sample(state, 13, seed=1, step=10**6, rank=0, cfg=cfg)
        reward = errors[held_out].repeat(8, 1).gather(1, rollout.mask.masked_idx).mean().item()
        shown = energy[held_out].repeat(8, 1).gather(1, rollout.mask.visible_idx).mean().item()
        return mass, reward, shown

    mass_before, reward_before, shown_before = measure()
    for step in range(120):
        g = torch.Generator().manual_seed(step)
        batch = torch.randperm(200, generator=g)[:4].repeat_interleave(4)
        rollout = sampler.sample(tokens[batch], 13, seed=1, step=step, rank=0, cfg=cfg)
        ppo_update(sampler, optimizer, rollout, tats_reward(errors[batch].gather(1, rollout.mask.masked_idx)), cfg)
    mass_after, reward_after, shown_after = measure()
    # measured: mass 0.336 -> 0.201, visible tokens' energy x0.75, reward 1.192 -> 1.220
    assert mass_before == pytest.approx(1 / 3, abs=0.01)
    assert mass_after < mass_before - 0.08, (mass_before, mass_after)
    assert shown_after < 0.85 * shown_before, (shown_before, shown_after)
    assert reward_after > reward_before, (reward_before, reward_after)
