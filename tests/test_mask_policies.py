"""Mask policies as plug-ins: the built-in tube and motion-aware policies equal the kernels they wrap; a deferred batch
selected at a mask equals brute-force gathering; learned policies (AdaMAE, TATS-ref) train inside the trainer, keep
their parameters, optimizer and draws in the checkpoint, and a resumed run is bit-exact with the uninterrupted one."""
from __future__ import annotations

import shutil

import pytest
import torch
from test_train import SYN, read_log, tiny

from trackmae_stream import kernels
from trackmae_stream.checkpoint import load_checkpoint
from trackmae_stream.config import MaskConfig, load_config
from trackmae_stream.data import ensure_synthetic_dataset
from trackmae_stream.engine import train
from trackmae_stream.masking import (
    MASK_POLICIES,
    MaskGenerator,
    MaskInputs,
    mask_from_visible,
    register_mask_policy,
    unregister_mask_policy,
)
from trackmae_stream.pipeline import TrainBatch


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "set", **SYN)


def test_builtin_policies_equal_the_kernels_they_wrap():
    gen = torch.Generator().manual_seed(2)
    stat = torch.rand(3, 25, generator=gen) + 0.1
    motion = MaskGenerator(MaskConfig(type="motion", ratio=0.7, rho=0.3), tokens_per_frame=25, num_slots=3, seed=9,
                           rank=2)
    got = motion(5, 3, torch.device("cpu"), side={"motion_stat": stat})
    ref = kernels.motion_aware_mask(stat, num_frames=3, mask_ratio=0.7, rho=0.3, seed=9, step=5, rank=2)
    assert all(torch.equal(a, b) for a, b in zip(got, ref)) and motion.needs == ("motion_stat",)
    tube = MaskGenerator(MaskConfig(type="tube", ratio=0.7), tokens_per_frame=25, num_slots=3, seed=9, rank=2)
    got = tube(5, 3, torch.device("cpu"))
    ref = kernels.tube_mask(3, tokens_per_frame=25, num_frames=3, mask_ratio=0.7, seed=9, step=5, rank=2)
    assert all(torch.equal(a, b) for a, b in zip(got, ref)) and tube.needs == () and not tube.learned
    assert tube.num_visible == 3 * (25 - int(0.7 * 25))


def test_a_registered_policy_is_one_class():
    class EveryOther(MASK_POLICIES["tube"]):
        name = "every_other_test"

        def __call__(self, inputs: MaskInputs):
            g = self.geometry
            visible = torch.arange(0, 2 * g.num_visible, 2).expand(inputs.batch, -1)
            return mask_from_visible(visible, g.num_tokens)

    register_mask_policy(EveryOther)
    try:
        cfg = load_config("default", ["mask.type=every_other_test", "target.track_motion=false", "mask.ratio=0.9",
                                      "data.num_frames=4", "data.input_size=64"])
        masks = MaskGenerator(cfg.mask, tokens_per_frame=16, num_slots=2, seed=0, rank=0)
        out = masks(0, 2, torch.device("cpu"))
        assert out.visible_idx.tolist()[0] == [0, 2, 4, 6] and out.masked_idx.shape == (2, 28)
    finally:
        unregister_mask_policy("every_other_test")


def test_deferred_batches_select_like_a_brute_force_gather():
    gen = torch.Generator().manual_seed(4)
    b, n, v = 3, 13, 5
    visible = torch.stack([torch.randperm(n, generator=gen)[:v] for _ in range(b)])
    mask = mask_from_visible(visible, n)
    assert torch.equal(mask.visible_idx, visible.sort(1).values)
    batch = TrainBatch(patches=torch.randn(b, n, 7, generator=gen), visible_idx=None, masked_idx=None,
                       targets={"x": torch.randn(b, n, 3, generator=gen)}, valid={"x": torch.rand(b, n) > 0.5},
                       skipped=None, source_index=None)
    got = batch.select(mask)
    for i in range(b):
        vis = [j for j in range(n) if j in visible[i].tolist()]
        msk = [j for j in range(n) if j not in vis]
        assert got.visible_idx[i].tolist() == vis and got.masked_idx[i].tolist() == msk
        assert torch.equal(got.patches[i], batch.patches[i, vis])
        assert torch.equal(got.targets["x"][i], batch.targets["x"][i, msk])
        assert torch.equal(got.valid["x"][i], batch.valid["x"][i, msk])


def test_several_masks_per_clip_select_each_clips_copies():
    gen = torch.Generator().manual_seed(6)
    b, n, v, copies = 2, 11, 4, 3
    visible = torch.stack([torch.randperm(n, generator=gen)[:v] for _ in range(b * copies)])
    mask = mask_from_visible(visible, n)
    batch = TrainBatch(patches=torch.randn(b, n, 5, generator=gen), visible_idx=None, masked_idx=None,
                       targets={"x": torch.randn(b, n, 2, generator=gen)}, skipped=None, source_index=None)
    got = batch.select(mask)
    assert got.num_clips == b * copies
    for row in range(b * copies):
        clip = row // copies
        assert torch.equal(got.patches[row], batch.patches[clip, mask.visible_idx[row]])
        assert torch.equal(got.targets["x"][row], batch.targets["x"][clip, mask.masked_idx[row]])
    with pytest.raises(ValueError, match="multiple"):
        batch.select(mask_from_visible(visible[:5], n))
    # TATS-ref with group_size 3 draws 3 different masks per clip, in a row
    cfg = load_config("default", ["target.track_motion=false", "mask.type=tats_ref", "mask.ratio=0.75",
                                  "mask.options.group_size=3", "mask.options.num_heads=2"]).mask
    masks = MaskGenerator(cfg, tokens_per_frame=16, num_slots=2, seed=1, rank=0, embed_dim=12)
    masks.policy.setup(torch.device("cpu"))
    drawn, _ = masks.policy.sample(MaskInputs(step=0, batch=2, device=torch.device("cpu"),
                                              tokens=torch.randn(2, 32, 12, generator=gen)))
    assert drawn.visible_idx.shape == (6, masks.num_visible)
    assert not torch.equal(drawn.visible_idx[0], drawn.visible_idx[1])


@pytest.mark.parametrize("policy", ["adamae", "tats_ref", "tats_ref_groups"])
def test_learned_policy_resume_is_bit_exact(synthetic, tmp_path, policy):
    """4 steps straight vs 2 + resume + 2 (3 batches per epoch: the resume lands mid-epoch): the same MAE weights,
    MAE optimizer state, sampler weights, sampler optimizer state and losses, bit for bit."""
    groups = policy == "tats_ref_groups"  # two masks per clip, rewards compared within a clip
    policy = policy.removesuffix("_groups")
    extra = {"target.track_motion": False, "mask.type": policy, "mask.ratio": 0.75, "optim.max_steps": 4}
    if policy == "tats_ref":
        extra.update({"mask.options.warmup_steps": 1, "mask.options.epochs": 2})
    if groups:
        extra.update({"mask.options.group_size": 2})
    straight = train(load_config("default", tiny(synthetic, tmp_path, run_name="straight", **extra)))
    ckpts = straight.run_dir / "checkpoints"
    resumed_dir = straight.run_dir.parent / "resumed"
    shutil.copytree(straight.run_dir, resumed_dir)
    (resumed_dir / "checkpoints" / "checkpoint-00000004.pt").unlink()
    resumed = train(load_config("default", tiny(synthetic, tmp_path, run_name="resumed", resume="auto", **extra)))
    assert any(r.get("event") == "resume" and r["step"] == 2 for r in read_log(resumed_dir))
    a, b = load_checkpoint(ckpts / "checkpoint-00000004.pt"), load_checkpoint(resumed.last_checkpoint)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    pa, pb = a["mask_policy"], b["mask_policy"]
    assert pa["name"] == policy and pa["model"].keys() == pb["model"].keys()
    start = load_checkpoint(ckpts / "checkpoint-00000002.pt")["mask_policy"]["model"]
    moved = False
    for key in pa["model"]:
        assert torch.equal(pa["model"][key], pb["model"][key]), key
        moved |= not torch.equal(pa["model"][key], start[key])
    assert moved, "the sampler did not train between steps 2 and 4"
    assert len(pa["optimizer"]["state"]) > 0
    for sa, sb in zip(pa["optimizer"]["state"].values(), pb["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a["loss_history"] == b["loss_history"]
    logged = [r for r in read_log(straight.run_dir) if "loss" in r]
    assert all(any(k.startswith("mask_") for k in r) for r in logged)


def test_a_learned_policy_refuses_a_checkpoint_without_its_state(synthetic, tmp_path):
    args = tiny(synthetic, tmp_path, run_name="plain", **{"target.track_motion": False, "mask.type": "tube",
                                                          "optim.max_steps": 2})
    plain = train(load_config("default", args))
    learned = tiny(synthetic, tmp_path, run_name="plain", resume=str(plain.last_checkpoint),
                   **{"target.track_motion": False, "mask.type": "adamae", "optim.max_steps": 3})
    with pytest.raises(Exception, match="learned mask policy"):
        train(load_config("default", learned))


def _ranks_worker(rank: int, port: int, policy: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(100 + rank)  # the trainer seeds every rank differently: the policy must not differ
        cfg = load_config("default", ["target.track_motion=false", f"mask.type={policy}", "mask.ratio=0.75",
                                      "mask.options.num_heads=2"]).mask
        masks = MaskGenerator(cfg, tokens_per_frame=16, num_slots=2, seed=0, rank=rank, embed_dim=12)
        masks.policy.setup(torch.device("cpu"))
        gen = torch.Generator().manual_seed(rank)  # each rank sees other clips
        for step in range(2):
            tokens = torch.randn(3, 32, 12, generator=gen, requires_grad=True)
            mask, aux = masks.policy.sample(MaskInputs(step=step, batch=3, device=torch.device("cpu"), tokens=tokens))
            error = torch.rand(3, mask.masked_idx.shape[1], generator=gen)
            extra = masks.policy.mae_loss(aux, error, mask)
            if extra is not None:
                extra.backward()
            masks.policy.update(aux, error, mask, step)
        flat = torch.cat([p.detach().reshape(-1) for p in masks.policy.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(2)]
        torch.distributed.all_gather(gathered, flat)
        if rank == 0:
            torch.save(gathered, out)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("policy", ["adamae", "tats_ref"])
def test_learned_policies_stay_identical_across_ranks(tmp_path, policy):
    """Two gloo ranks, different seeds and different clips: after two updates both hold the same policy (rank 0's
    initial parameters broadcast, gradients averaged as they accumulate)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "params.pt"
    torch.multiprocessing.spawn(_ranks_worker, args=(port, policy, str(out)), nprocs=2, join=True)
    first, second = torch.load(out)
    assert torch.equal(first, second)


def test_rekeying_a_copied_generator_leaves_the_original_alone():
    """tracker.placement=ranks serves each training rank from a shallow copy of one generator re-keyed by rank."""
    import copy

    base = MaskGenerator(MaskConfig(type="tube", ratio=0.75), tokens_per_frame=16, num_slots=2, seed=3, rank=0)
    other = copy.copy(base)
    other.rank = 1
    assert base.rank == 0 and other.rank == 1
    a, b = base(4, 2, torch.device("cpu")), other(4, 2, torch.device("cpu"))
    ref = kernels.tube_mask(2, tokens_per_frame=16, num_frames=2, mask_ratio=0.75, seed=3, step=4, rank=1)
    assert torch.equal(b.visible_idx, ref.visible_idx) and not torch.equal(a.visible_idx, b.visible_idx)


@pytest.mark.parametrize("policy", ["adamae", "tats_ref"])
def test_a_learned_policy_trains_under_torchrun_on_two_cpu_ranks(synthetic, tmp_path, policy):
    """The trainer's DDP step with a learned policy (its own gradient averaging beside DDP's) ends cleanly."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    extra = {"optim.max_steps": 2, "run_name": f"ddp-{policy}", "target.track_motion": False, "mask.type": policy}
    if policy == "tats_ref":
        extra.update({"mask.options.epochs": 1, "mask.options.num_heads": 3})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "trackmae_stream.train",
                           *tiny(synthetic, tmp_path, **extra)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_checkpoint(tmp_path / "runs" / f"ddp-{policy}" / "checkpoints" / "checkpoint-00000002.pt")
    assert state["mask_policy"]["name"] == policy and len(state["rng"]["per_rank"]) == 2
