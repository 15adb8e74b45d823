"""Tube and motion-aware masking: official vectors, exact counts, tube property, determinism, uniformity within a
bin, and the Triton kernel against the torch twin (identical masks for identical draws)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import reference_path, reference_sets
from scipy.stats import chi2

from trackmae_stream import kernels
from trackmae_stream.kernels import _triton as triton_support
from trackmae_stream.kernels.masking import (
    MaskOutput,
    motion_aware_mask_from_order_torch,
    motion_aware_mask_torch,
    motion_aware_mask_triton,
    motion_bin_counts,
    motion_bin_order_torch,
    tube_mask_torch,
    tube_mask_triton,
)
from trackmae_stream.kernels.motion import motion_targets_torch

needs_triton = pytest.mark.skipif(not triton_support.HAS_TRITON, reason="triton does not import")

CASES = {"mr0.9_rho0.5": (0.9, 0.5), "mr0.8_rho0.5": (0.8, 0.5), "mr0.4_rho0.9_shortfall": (0.4, 0.9)}
MODES = {"up": ("tracks14", 2), "noup": ("tracks28", 1)}


@pytest.fixture(scope="module", params=reference_sets("targets/bins"))
def bins(request):
    """Every vector set present (A ships; a hold-out set with the same keys is tested the same way)."""
    with np.load(reference_path(f"targets/bins_{request.param}.npz")) as data:
        return {key: torch.from_numpy(data[key]) for key in data.files}


def stored_draws(bins, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The official CPU generator's draws of one case: high bin first, then (after a shortfall randint) low."""
    low_key = "_rng2_rand" if "shortfall" in prefix else "_rng1_rand"
    return bins[prefix + "_rng0_rand"], bins[prefix + low_key]


def assert_valid_output(out: MaskOutput, batch: int, tokens: int, frames: int, visible: int) -> None:
    """Shapes, dtypes, ascending disjoint index lists consistent with the mask, and the tube property."""
    assert out.mask.shape == (batch, frames * tokens) and out.mask.dtype == torch.bool
    assert out.visible_idx.shape == (batch, frames * visible) and out.visible_idx.dtype == torch.int64
    assert out.masked_idx.shape == (batch, frames * (tokens - visible)) and out.masked_idx.dtype == torch.int64
    slots = out.mask.reshape(batch, frames, tokens)
    assert bool((slots == slots[:, :1]).all()), "the mask is not a tube"
    assert bool((out.visible_idx.diff(dim=1) > 0).all()) and bool((out.masked_idx.diff(dim=1) > 0).all())
    everything = torch.sort(torch.cat([out.visible_idx, out.masked_idx], dim=1), dim=1).values
    assert torch.equal(everything, torch.arange(frames * tokens).expand(batch, -1))
    assert not bool(out.mask.gather(1, out.visible_idx).any()) and bool(out.mask.gather(1, out.masked_idx).all())


# ------------------------------------------------------------------------------------------------ official vectors


@pytest.mark.parametrize("mode", MODES)
def test_stable_order_and_bin_membership(bins, mode):
    for prefix in ("", "tiefree_"):
        order = motion_bin_order_torch(bins[f"{prefix}{mode}_mean_disp"])
        assert torch.equal(order, bins[f"{prefix}{mode}_sorted_idx_stable"])
        high = torch.zeros_like(bins[f"{prefix}{mode}_high_bin_member"]).scatter_(1, order[:, :98], True)
        assert torch.equal(high, bins[f"{prefix}{mode}_high_bin_member"])
    # without ties the stable order is the official one
    assert torch.equal(bins[f"tiefree_{mode}_sorted_idx_stable"], bins[f"tiefree_{mode}_sorted_idx_cpu"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_official_masks_with_official_order_and_draws(bins, mode, case, seed):
    prefix = f"{mode}_{case}_seed{seed}"
    mask_ratio, rho = CASES[case]
    high, low = stored_draws(bins, prefix)
    out = motion_aware_mask_from_order_torch(bins[f"{mode}_sorted_idx_cpu"], num_frames=8, mask_ratio=mask_ratio,
                                             rho=rho, high_draws=high, low_draws=low)
    official = bins[prefix + "_mask"]
    visible = 196 - int(mask_ratio * 196)
    batch = official.shape[0]
    assert_valid_output(out, batch, 196, 8, visible)
    if "shortfall" not in case:
        assert torch.equal(out.mask, official)
        return
    # The official code shows only 98 + 12 = 110 distinct tokens here; ours shows exactly K = 118 and keeps theirs.
    assert int((~official[:, :196]).sum(dim=1).max()) == 110
    assert bool((~out.mask | official).all()), "a token visible in the official mask is masked in ours"
    spatial_visible = ~out.mask[:, :196]
    high_member = bins[f"{mode}_high_bin_member"]
    assert spatial_visible.sum(dim=1).tolist() == [118] * batch
    assert (spatial_visible & high_member).sum(dim=1).tolist() == [98] * batch  # the whole high bin ...
    assert (spatial_visible & ~high_member).sum(dim=1).tolist() == [20] * batch  # ... and the excess from the low bin


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
def test_tie_free_masks_from_tracks(bins, mode, case):
    """From tie-free tracks our statistic and stable order alone reproduce the official masks (seed 0 and 1)."""
    key, upsample = MODES[mode]
    mask_ratio, rho = CASES[case]
    _, token_stat = motion_targets_torch(bins[f"tiefree_{key}"], tokens_side=14, upsample=upsample)
    for seed in (0, 1):
        prefix = f"tiefree_{mode}_{case}_seed{seed}"
        high, low = stored_draws(bins, prefix)
        out = kernels.motion_aware_mask(token_stat, num_frames=8, mask_ratio=mask_ratio, rho=rho, high_draws=high,
                                        low_draws=low)
        official = bins[prefix + "_mask"]
        if "shortfall" in case:
            assert bool((~out.mask | official).all())
        else:
            assert torch.equal(out.mask, official)


@needs_triton
def test_triton_reproduces_official_tie_free_mask(bins):
    _, token_stat = motion_targets_torch(bins["tiefree_tracks14"], tokens_side=14, upsample=2)
    prefix = "tiefree_up_mr0.9_rho0.5_seed1"
    high, low = stored_draws(bins, prefix)
    out = motion_aware_mask_triton(token_stat, num_frames=8, mask_ratio=0.9, rho=0.5, high_draws=high,
                                   low_draws=low)
    assert torch.equal(out.mask, bins[prefix + "_mask"])
    expected = motion_aware_mask_torch(token_stat, num_frames=8, mask_ratio=0.9, rho=0.5, high_draws=high,
                                       low_draws=low)
    assert all(torch.equal(a, b) for a, b in zip(out, expected))


# ------------------------------------------------------------------------------------------------------- counts


@pytest.mark.parametrize("tokens,mask_ratio,rho,expected", [
    (196, 0.9, 0.5, (20, 98, 10, 10)),
    (196, 0.8, 0.5, (40, 98, 20, 20)),
    (196, 0.8, 0.15, (40, 98, 6, 34)),
    (196, 0.75, 0.5, (49, 98, 24, 25)),
    (196, 0.4, 0.9, (118, 98, 98, 20)),  # high-bin shortfall: capped at 98, the rest from the low bin
    (5, 0.0, 0.0, (5, 3, 3, 2)),  # low-bin shortfall: the excess moves to the high bin
    (15, 0.5, 1.7, (8, 8, 8, 0)),  # rho clamped to 1
    (15, 0.5, -0.3, (8, 8, 1, 7)),  # rho clamped to 0, low bin holds 7
])
def test_bin_counts(tokens, mask_ratio, rho, expected):
    counts = motion_bin_counts(tokens, mask_ratio, rho)
    assert (counts.visible, counts.high_size, counts.high_visible, counts.low_visible) == expected
    assert counts.high_visible + counts.low_visible == counts.visible


def random_stat(batch: int, tokens: int, seed: int, ties: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values, zeros included: exercises the stable tie rule
        return torch.randint(0, 4, (batch, tokens), generator=gen).float() * 0.5
    return torch.rand(batch, tokens, generator=gen) * 3


# (batch, tokens, frames, mask_ratio, rho, ties)
MOTION_CASES = [(3, 15, 3, 0.6, 0.5, False), (2, 13, 5, 0.3, 0.9, True), (3, 21, 2, 0.75, 0.0, True),
                (2, 9, 3, 0.0, 0.2, False), (1, 2, 4, 0.5, 1.0, False)]


@pytest.mark.parametrize("batch,tokens,frames,mask_ratio,rho,ties", MOTION_CASES)
def test_motion_mask_exact_per_bin_counts(batch, tokens, frames, mask_ratio, rho, ties):
    token_stat = random_stat(batch, tokens, seed=tokens, ties=ties)
    counts = motion_bin_counts(tokens, mask_ratio, rho)
    out = kernels.motion_aware_mask(token_stat, num_frames=frames, mask_ratio=mask_ratio, rho=rho, seed=5, step=3)
    assert_valid_output(out, batch, tokens, frames, counts.visible)
    # brute-force bins: sort by (-stat, index) in Python
    for b in range(batch):
        order = sorted(range(tokens), key=lambda n: (-float(token_stat[b, n]), n))
        high = set(order[:counts.high_size])
        shown = set(out.visible_idx[b, :counts.visible].tolist())
        assert len(shown & high) == counts.high_visible and len(shown - high) == counts.low_visible


@pytest.mark.parametrize("batch,tokens,frames,mask_ratio", [(3, 15, 3, 0.6), (2, 7, 4, 0.0), (2, 49, 2, 0.9)])
def test_tube_mask_shapes_and_counts(batch, tokens, frames, mask_ratio):
    out = kernels.tube_mask(batch, tokens_per_frame=tokens, num_frames=frames, mask_ratio=mask_ratio, seed=1)
    assert_valid_output(out, batch, tokens, frames, tokens - int(mask_ratio * tokens))


def test_masks_are_deterministic_and_keyed_by_seed_step_rank():
    token_stat = random_stat(4, 23, seed=2, ties=False)

    def visible(**key):
        return kernels.motion_aware_mask(token_stat, num_frames=2, mask_ratio=0.7, rho=0.5, **key).visible_idx

    def tube_visible(**key):
        return kernels.tube_mask(4, tokens_per_frame=23, num_frames=2, mask_ratio=0.7, **key).visible_idx

    for draw in (visible, tube_visible):
        reference = draw(seed=3, step=10, rank=1)
        assert torch.equal(draw(seed=3, step=10, rank=1), reference)
        for other in (dict(seed=4, step=10, rank=1), dict(seed=3, step=11, rank=1), dict(seed=3, step=10, rank=0)):
            assert not torch.equal(draw(**other), reference), other
        assert len({tuple(row) for row in reference.tolist()}) == 4  # clips of one batch differ


# --------------------------------------------------------------------------------------------------- uniformity


def subset_chi_square(chosen: torch.Tensor, universe: list[int], size: int) -> tuple[float, float]:
    """Chi-square statistic of the subsets drawn (rows of `chosen`) against all C(n, size) subsets equally likely,
    and the 0.999 quantile of its null distribution."""
    subsets = {s: i for i, s in enumerate(itertools.combinations(sorted(universe), size))}
    counts = np.bincount([subsets[tuple(sorted(row))] for row in chosen.tolist()], minlength=len(subsets))
    expected = chosen.shape[0] / len(subsets)
    return float(((counts - expected) ** 2 / expected).sum()), float(chi2.ppf(0.999, len(subsets) - 1))


def test_draws_are_uniform_within_each_bin():
    """14 tokens with fixed distinct statistics -> high bin {7..13}, low bin {0..6}; K = 6 = 3 + 3. Over 14000 clips
    every 3-subset of each bin (35 of them) must be equally likely: chi-square below its 0.999 quantile (65.2)."""
    clips, tokens = 14000, 14
    token_stat = torch.arange(tokens, dtype=torch.float32).expand(clips, tokens)
    out = kernels.motion_aware_mask(token_stat, num_frames=1, mask_ratio=0.6, rho=0.5, seed=2024, step=7, rank=0)
    visible = out.visible_idx  # ascending: 3 low-bin tokens, then 3 high-bin tokens
    for chosen, universe in ((visible[:, :3], range(0, 7)), (visible[:, 3:], range(7, 14))):
        assert bool((chosen >= universe.start).all()) and bool((chosen < universe.stop).all())
        statistic, bound = subset_chi_square(chosen, list(universe), 3)
        assert statistic < bound, (statistic, bound)


def test_draws_are_uniform_over_steps_for_one_clip():
    """The same clip slot over 3000 training steps: each of the 15 tokens of a 15-token tube mask with K = 4 is
    visible 800 times in expectation; chi-square over the 15 token counts below its 0.999 quantile (36.1)."""
    steps, tokens, visible = 3000, 15, 4
    counts = torch.zeros(tokens)
    for step in range(steps):
        out = tube_mask_torch(1, tokens_per_frame=tokens, num_frames=1, mask_ratio=0.75, seed=99, step=step)
        counts[out.visible_idx[0]] += 1
    expected = steps * visible / tokens
    # draws without replacement: each token count is binomial-like with variance scaled by (S-K)/(S-1)
    statistic = float(((counts - expected) ** 2 / expected).sum()) / ((tokens - visible) / (tokens - 1))
    assert statistic < chi2.ppf(0.999, tokens - 1), statistic


# ---------------------------------------------------------------------------------------------- triton vs torch


@needs_triton
@pytest.mark.parametrize("batch,tokens,frames,mask_ratio,rho,ties", MOTION_CASES)
@pytest.mark.parametrize("explicit_draws", [False, True])
def test_triton_motion_mask_matches_torch(batch, tokens, frames, mask_ratio, rho, ties, explicit_draws):
    token_stat = random_stat(batch, tokens, seed=3 * tokens, ties=ties)
    counts = motion_bin_counts(tokens, mask_ratio, rho)
    draws = {}
    if explicit_draws:  # with repeated values, to exercise the position tie rule
        gen = torch.Generator().manual_seed(tokens)
        draws = dict(high_draws=torch.randint(0, 3, (batch, counts.high_size), generator=gen) / 4.0,
                     low_draws=torch.rand(batch, counts.low_size, generator=gen))
    kwargs = dict(num_frames=frames, mask_ratio=mask_ratio, rho=rho, seed=11, step=2 ** 40 + 1, rank=3, **draws)
    got = motion_aware_mask_triton(token_stat, **kwargs)
    expected = motion_aware_mask_torch(token_stat, **kwargs)
    for name, a, b in zip(MaskOutput._fields, got, expected):
        assert torch.equal(a, b), name


@needs_triton
def test_triton_motion_mask_with_one_explicit_bin_and_special_values():
    token_stat = torch.tensor([[0.0, -0.0, 2.0, float("nan"), 2.0, -1.0, float("inf"), 0.5, 0.5, 3.0, -0.0]])
    for draws in (dict(high_draws=torch.rand(1, 6)), dict(low_draws=torch.tensor([[0.5, 0.25, 0.5, 0.5, 0.0]]))):
        kwargs = dict(num_frames=2, mask_ratio=0.5, rho=0.34, seed=1, **draws)
        got = motion_aware_mask_triton(token_stat, **kwargs)
        expected = motion_aware_mask_torch(token_stat, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


@needs_triton
@pytest.mark.parametrize("batch,tokens,frames,mask_ratio", [(3, 15, 3, 0.6), (2, 1, 2, 0.0), (2, 37, 2, 0.9)])
def test_triton_tube_mask_matches_torch(batch, tokens, frames, mask_ratio):
    kwargs = dict(tokens_per_frame=tokens, num_frames=frames, mask_ratio=mask_ratio, seed=8, step=5, rank=1)
    got = tube_mask_triton(batch, **kwargs)
    expected = tube_mask_torch(batch, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


# ----------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(mask_ratio=1.0), ValueError, "mask_ratio"),
    (dict(rho=math.nan), ValueError, "rho"),
    (dict(num_frames=0), ValueError, "num_frames"),
    (dict(high_draws=torch.rand(2, 4)), ValueError, "high_draws"),
    (dict(low_draws=torch.rand(3, 4)), ValueError, "low_draws"),
    (dict(token_stat=torch.rand(9)), ValueError, r"\(B, S\)"),
    (dict(token_stat=torch.rand(2, 1)), ValueError, ">= 2 tokens"),
    (dict(step=-1), ValueError, "step"),
])
def test_bad_arguments_raise(kwargs, error, match):
    call = dict(token_stat=torch.rand(2, 9), num_frames=2, mask_ratio=0.5, rho=0.5)
    call.update(kwargs)
    with pytest.raises(error, match=match):
        kernels.motion_aware_mask(call.pop("token_stat"), **call)
    with pytest.raises(ValueError, match="tokens per frame"):
        kernels.tube_mask(2, tokens_per_frame=2 ** 15, num_frames=1, mask_ratio=0.5)


# ------------------------------------------------------------------------------------------------------------ gpu


@pytest.mark.gpu
@pytest.mark.parametrize("explicit_draws", [False, True])
def test_triton_cuda_masks_match_torch_on_cpu(explicit_draws):
    """Counter-based draws make the masks device-independent: Triton on CUDA == torch on CPU, bit for bit."""
    token_stat = random_stat(32, 196, seed=1, ties=True)
    draws = {}
    if explicit_draws:
        draws = dict(high_draws=torch.rand(32, 98), low_draws=torch.rand(32, 98))
    kwargs = dict(num_frames=8, mask_ratio=0.8, rho=0.5, seed=7, step=123, rank=2)
    got = kernels.motion_aware_mask(token_stat.cuda(), **kwargs, **{k: v.cuda() for k, v in draws.items()})
    expected = kernels.motion_aware_mask(token_stat, backend="torch", **kwargs, **draws)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, expected))
    tube = kernels.tube_mask(32, tokens_per_frame=196, num_frames=8, mask_ratio=0.9, seed=7, step=4, device="cuda")
    tube_cpu = kernels.tube_mask(32, tokens_per_frame=196, num_frames=8, mask_ratio=0.9, seed=7, step=4,
                                 backend="torch")
    assert all(torch.equal(a.cpu(), b) for a, b in zip(tube, tube_cpu))
