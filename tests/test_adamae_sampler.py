"""AdaMAE's learned token sampler (SPEC §3.3) and the seeded sampling without replacement both learned samplers use:
the exact without-replacement distribution (chi-square against an enumeration over N = 7, k = 3), determinism, the
MaskOutput format, the network against a functional float64 re-computation of AdaMAE's block, the sampling loss and
its gradient against loops, and a learning test: with a per-token error that is high on moving tokens, AdaMAE's loss
raises their probability of being visible (AdaMAE samples visible tokens from high-information regions)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy.stats import chi2

from trackmae_stream.kernels.masking import MaskOutput
from trackmae_stream.methods.adamae import (
    ADAMAE_SAMPLING_WEIGHT,
    STREAM_ADAMAE,
    AdaMAESampler,
    adamae_num_visible,
    adamae_param_groups,
    adamae_sampling_loss,
    gumbel_noise,
    mask_output_from_visible,
    sample_without_replacement,
)

N, K = 7, 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one intra-op thread is ~25x faster than two on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _set_probabilities(p: list[float]) -> dict[tuple[int, ...], float]:
    """P(set) of k sequential draws without replacement, summed over the k! orders (float64 enumeration)."""
    out = {}
    for subset in itertools.combinations(range(len(p)), K):
        total = 0.0
        for order in itertools.permutations(subset):
            prob, taken = 1.0, 0.0
            for i in order:
                prob *= p[i] / (1.0 - taken)
                taken += p[i]
            total += prob
        out[subset] = total
    return out


def test_sampling_without_replacement_has_the_exact_distribution():
    """20000 clips share one π (each clip its own counter); set frequencies against the enumeration (35 cells),
    first-draw frequencies against π (7 cells)."""
    logits = torch.tensor([1.1, -0.4, 0.3, 0.9, -1.2, 0.05, 0.6], dtype=torch.float64)
    clips = 20000
    draws = sample_without_replacement(logits.expand(clips, N), K, seed=11, step=3, rank=0, stream=STREAM_ADAMAE)
    assert draws.shape == (clips, K)
    assert all(len(set(row)) == K for row in draws.tolist())
    p = torch.softmax(logits, 0).tolist()
    exact = _set_probabilities(p)
    assert sum(exact.values()) == pytest.approx(1.0, abs=1e-12)
    counts = dict.fromkeys(exact, 0)
    for row in torch.sort(draws, dim=1).values.tolist():
        counts[tuple(row)] += 1
    expected = [exact[s] * clips for s in exact]
    assert min(expected) > 5  # the chi-square approximation holds
    stat = sum((counts[s] - e) ** 2 / e for s, e in zip(exact, expected))
    assert chi2.sf(stat, len(exact) - 1) > 1e-3, stat
    first = torch.bincount(draws[:, 0], minlength=N).tolist()
    stat_first = sum((c - pi * clips) ** 2 / (pi * clips) for c, pi in zip(first, p))
    assert chi2.sf(stat_first, N - 1) > 1e-3, stat_first


def test_sampling_is_keyed_by_seed_step_rank_and_stream():
    logits = torch.randn(6, 11)
    a = sample_without_replacement(logits, 4, seed=1, step=2, rank=3, stream=STREAM_ADAMAE)
    assert torch.equal(a, sample_without_replacement(logits, 4, seed=1, step=2, rank=3, stream=STREAM_ADAMAE))
    for kw in (dict(seed=2, step=2, rank=3), dict(seed=1, step=3, rank=3), dict(seed=1, step=2, rank=0)):
        assert not torch.equal(a, sample_without_replacement(logits, 4, stream=STREAM_ADAMAE, **kw))
    assert not torch.equal(a, sample_without_replacement(logits, 4, seed=1, step=2, rank=3, stream=2))
    # a very peaked π picks its top tokens in order of probability
    peaked = torch.tensor([[0.0, 40.0, 0.0, 80.0, 0.0, 60.0]])
    assert sample_without_replacement(peaked, 3, seed=0, step=0, rank=0, stream=STREAM_ADAMAE).tolist() == [[3, 5, 1]]


def test_gumbel_noise_is_finite_and_standard():
    g = gumbel_noise(200, 2001, seed=5, step=1, rank=0, stream=STREAM_ADAMAE)  # standard error of the mean 0.002
    assert g.dtype == torch.float64 and torch.isfinite(g).all()
    assert g.mean().item() == pytest.approx(0.5772156649, abs=0.01)  # Euler-Mascheroni
    assert g.var().item() == pytest.approx(math.pi ** 2 / 6, abs=0.05)


def test_mask_output_from_visible_matches_loops():
    g = torch.Generator().manual_seed(1)
    visible = torch.stack([torch.randperm(13, generator=g)[:5] for _ in range(4)])
    out = mask_output_from_visible(visible, 13)
    assert isinstance(out, MaskOutput)
    for b in range(4):
        chosen = set(visible[b].tolist())
        assert out.mask[b].tolist() == [i not in chosen for i in range(13)]
        assert out.visible_idx[b].tolist() == sorted(chosen)
        assert out.masked_idx[b].tolist() == [i for i in range(13) if i not in chosen]


def test_num_visible_follows_adamae():
    assert adamae_num_visible(1568, 0.95) == 78
    assert adamae_num_visible(1568, 0.9) == 156
    assert adamae_num_visible(15, 0.75) == 3
    with pytest.raises(ValueError):
        adamae_num_visible(7, 0.99)


# ------------------------------------------------------------------------------------------------------ the network


def _reference_logits(sampler: AdaMAESampler, tokens: torch.Tensor) -> torch.Tensor:
    """AdaMAE's get_mask network written out functionally (eval mode, float64): + pos_embed_probs, LN(eps 1e-5),
    8-head attention without qkv bias, projection, residual, LN, fc1, GELU, fc2, residual, Linear(D, 1)."""
    sd = {k: v.double() for k, v in sampler.state_dict().items()}
    x = tokens.double() + sd["pos_embed_probs"]
    b, n, c = x.shape
    h = 8
    d = c // h
    y = torch.nn.functional.layer_norm(x, (c,), sd["block.norm1.weight"], sd["block.norm1.bias"], 1e-5)
    qkv = y @ sd["block.attn.qkv.weight"].T
    heads = []
    for head in range(h):
        q = qkv[..., head * d:(head + 1) * d]
        k = qkv[..., c + head * d:c + (head + 1) * d]
        v = qkv[..., 2 * c + head * d:2 * c + (head + 1) * d]
        heads.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1) @ v)
    x = x + torch.cat(heads, -1) @ sd["block.attn.proj.weight"].T + sd["block.attn.proj.bias"]
    y = torch.nn.functional.layer_norm(x, (c,), sd["block.norm2.weight"], sd["block.norm2.bias"], 1e-5)
    y = torch.nn.functional.gelu(y @ sd["block.mlp.0.weight"].T + sd["block.mlp.0.bias"])
    x = x + y @ sd["block.mlp.2.weight"].T + sd["block.mlp.2.bias"]
    return (x @ sd["head.weight"].T + sd["head.bias"]).flatten(1)


def test_network_structure_and_forward_match_adamae():
    torch.manual_seed(2)
    sampler = AdaMAESampler(15, 32)
    shapes = {k: tuple(v.shape) for k, v in sampler.state_dict().items()}
    assert shapes["pos_embed_probs"] == (1, 15, 32) and not sampler.pos_embed_probs.any()
    assert "block.attn.qkv.bias" not in shapes and shapes["block.attn.qkv.weight"] == (96, 32)
    assert shapes["head.weight"] == (1, 32) and shapes["block.mlp.0.weight"] == (128, 32)
    assert not sampler.head.bias.any() and not sampler.block.attn.proj.bias.any()  # AdaMAE's zero-bias init
    with torch.no_grad():  # move off the init so every term of the forward matters
        for param in sampler.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    sampler.eval()
    tokens = torch.randn(3, 15, 32)
    assert torch.allclose(sampler(tokens).double(), _reference_logits(sampler, tokens), atol=2e-5, rtol=0)


def test_sample_outputs_and_determinism():
    torch.manual_seed(3)
    sampler = AdaMAESampler(15, 32).eval()
    tokens = torch.randn(4, 15, 32)
    out = sampler.sample(tokens, 3, seed=7, step=1, rank=0)
    assert out.mask.visible_idx.shape == (4, 3) and out.mask.masked_idx.shape == (4, 12)
    assert torch.equal(torch.sort(out.draw_order, 1).values, out.mask.visible_idx)
    assert torch.allclose(out.log_probs, torch.log_softmax(sampler(tokens), 1))
    again = sampler.sample(tokens, 3, seed=7, step=1, rank=0)
    assert torch.equal(out.draw_order, again.draw_order)
    # train mode: AdaMAE's dropout draws from torch's global generator, which a checkpoint restores
    sampler.train()
    torch.manual_seed(4)
    a = sampler.sample(tokens, 3, seed=7, step=1, rank=0)
    torch.manual_seed(4)
    b = sampler.sample(tokens, 3, seed=7, step=1, rank=0)
    assert torch.equal(a.log_probs, b.log_probs) and torch.equal(a.draw_order, b.draw_order)


def test_sampling_loss_and_gradient_match_loops():
    torch.manual_seed(5)
    batch, n, k = 3, 9, 2
    log_probs = torch.log_softmax(torch.randn(batch, n, dtype=torch.float64), 1).requires_grad_(True)
    masked_idx = torch.stack([torch.sort(torch.randperm(n)[k:]).values for _ in range(batch)])
    errors = torch.rand(batch, n - k, dtype=torch.float64) + 0.1
    loss = adamae_sampling_loss(log_probs, masked_idx, errors)
    per_clip = []
    for b in range(batch):
        terms = [log_probs[b, int(i)].item() * errors[b, j].item() for j, i in enumerate(masked_idx[b])]
        per_clip.append(-sum(terms) / len(terms))
    assert loss.item() == pytest.approx(ADAMAE_SAMPLING_WEIGHT * sum(per_clip) / batch, rel=1e-12)
    loss.backward()
    expected = torch.zeros(batch, n, dtype=torch.float64)
    for b in range(batch):
        for j, i in enumerate(masked_idx[b].tolist()):
            expected[b, i] = -ADAMAE_SAMPLING_WEIGHT * errors[b, j].item() / ((n - k) * batch)
    assert torch.allclose(log_probs.grad, expected, atol=1e-18, rtol=1e-12)
    assert adamae_sampling_loss(log_probs, masked_idx, errors, weight=1.0).item() == pytest.approx(
        sum(per_clip) / batch, rel=1e-12)


def test_gradients_reach_the_sampler_and_the_patch_embeddings():
    torch.manual_seed(6)
    sampler = AdaMAESampler(15, 32)
    tokens = torch.randn(4, 15, 32, requires_grad=True)  # AdaMAE does not detach them
    out = sampler.sample(tokens, 4, seed=0, step=0, rank=0)
    errors = torch.rand(4, 11) + 0.1
    adamae_sampling_loss(out.log_probs, out.mask.masked_idx, errors).backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    for name, param in sampler.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_param_groups_follow_adamae():
    sampler = AdaMAESampler(15, 32)
    decay, no_decay = adamae_param_groups(sampler, 0.05)
    names = {id(p): n for n, p in sampler.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decay_names == {"pos_embed_probs", "block.attn.qkv.weight", "block.attn.proj.weight",
                           "block.mlp.0.weight", "block.mlp.2.weight", "head.weight"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(sampler.parameters()))


# --------------------------------------------------------------------------------------------------- learning test


def _motion_batch(step: int, batch: int, n: int, d: int):
    g = torch.Generator().manual_seed(2000 + step)
    moving = torch.rand(batch, n, generator=g) < 1 / 3
    tokens = torch.randn(batch, n, d, generator=g) * 0.5
    tokens[..., 0] += torch.where(moving, 2.0, -2.0)
    errors = torch.where(moving, 1.0, 0.2) + 0.05 * torch.rand(batch, n, generator=g)
    return tokens, moving, errors


def test_adamae_loss_moves_visibility_to_the_hard_moving_tokens():
    """AdaMAE's sampling loss (weight 1e-4, AdamW betas (0.9, 0.95) as AdaMAE, dropout on) raises p on tokens that
    were hard to reconstruct: from the uniform policy (head zeroed so that the start is uniform: AdaMAE's own random
    init starts anywhere), π's mass on moving tokens must rise well above the moving fraction (~1/3), measured on
    held-out clips, and so must their share of the visible tokens.

    AdaMAE's loss does not push p to the hard tokens without bound: for a fixed mask its minimiser is p_i ∝ e_i on the
    masked tokens, so the expected update settles where p_i ∝ e_i P(i masked) (measured: mass ~0.55 here, from
    above as from below)."""
    n, d, k = 15, 32, 4
    torch.manual_seed(7)
    sampler = AdaMAESampler(n, d)
    torch.nn.init.zeros_(sampler.head.weight)
    optimizer = torch.optim.AdamW(adamae_param_groups(sampler, 0.0), lr=1e-3, betas=(0.9, 0.95))

    def measure():
        tokens, moving, _ = _motion_batch(10_000, 64, n, d)
        sampler.eval()
        with torch.no_grad():
            mass = (sampler(tokens).softmax(1) * moving).sum(1).mean().item()
            out = sampler.sample(tokens, k, seed=9, step=10_000, rank=0)
        sampler.train()
        shown = moving.gather(1, out.mask.visible_idx).float().mean().item()
        return mass, shown

    mass_before, shown_before = measure()
    for step in range(40):
        tokens, _, errors = _motion_batch(step, 16, n, d)
        out = sampler.sample(tokens, k, seed=9, step=step, rank=0)
        loss = adamae_sampling_loss(out.log_probs, out.mask.masked_idx, errors.gather(1, out.mask.masked_idx))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    mass_after, shown_after = measure()
    assert mass_before == pytest.approx(0.32, abs=0.02)  # uniform: the moving fraction of the held-out clips
    assert mass_after > mass_before + 0.12, (mass_before, mass_after)
    assert shown_after > shown_before + 0.08, (shown_before, shown_after)


@pytest.mark.gpu
def test_cuda_sampling_matches_cpu_and_never_syncs():
    torch.manual_seed(8)
    sampler = AdaMAESampler(15, 32).eval()
    tokens = torch.randn(4, 15, 32)
    expected = sampler.sample(tokens, 4, seed=1, step=2, rank=0)
    sampler = sampler.cuda()
    errors = (torch.rand(4, 11) + 0.1).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sampler.sample(tokens.cuda(), 4, seed=1, step=2, rank=0)
        loss = adamae_sampling_loss(out.log_probs, out.mask.masked_idx, errors)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out.mask.visible_idx.cpu(), expected.mask.visible_idx)
    assert torch.allclose(out.log_probs.cpu(), expected.log_probs, atol=1e-5)


def test_adamae_gradient_on_the_synthetic_set_points_to_showing_moving_tokens():
    """On clips of the synthetic set (per-token error = 0.2 + relative motion energy of the tubelet), AdaMAE's
    sampling loss for a policy logits = w * f (f the clip-standardised log motion energy) at the uniform policy asks
    for w > 0 (more visibility for moving tokens), averaged over 60 batches of uniform masks."""
    import numpy as np

    from trackmae_stream.data.synthetic import render_clip, sample_clip

    video = np.stack([render_clip(*sample_clip(np.random.default_rng(i), i % 4, 64, 16, task="legacy"))
                      for i in range(16)])
    x = torch.from_numpy(video).float().div(255)
    energy = (x[:, 1::2] - x[:, 0::2]).square().mean(-1).reshape(16, 8, 4, 16, 4, 16).mean((3, 5)).reshape(16, -1)
    log_energy = energy.clamp_min(1e-6).log()
    feature = (log_energy - log_energy.mean(1, keepdim=True)) / log_energy.std(1, keepdim=True)
    errors = 0.2 + energy / energy.mean()
    grads = []
    for step in range(60):
        g = torch.Generator().manual_seed(step)
        w = torch.zeros(1, requires_grad=True)
        log_probs = torch.log_softmax(w * feature, dim=1)
        visible = torch.stack([torch.randperm(128, generator=g)[:13] for _ in range(16)])
        masked_idx = mask_output_from_visible(visible, 128).masked_idx
        loss = adamae_sampling_loss(log_probs, masked_idx, errors.gather(1, masked_idx), weight=1.0)
        grads.append(torch.autograd.grad(loss, w)[0].item())
    mean = sum(grads) / len(grads)
    stderr = math.sqrt(sum((v - mean) ** 2 for v in grads) / (len(grads) - 1) / len(grads))
    assert mean < -4 * stderr, (mean, stderr)  # descent raises w (measured: -369 standard errors)
