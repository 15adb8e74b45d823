"""Batch preparation and the side-stream prefetcher: the prefetched batches equal direct preparation, masks are keyed
by the micro-step, the overlapped (CUDA) path equals the serial one, and nothing on the per-step path syncs the host."""
from __future__ import annotations

import pytest
import torch

from trackmae_stream.config import load_config
from trackmae_stream.metrics import IntervalTimer
from trackmae_stream.pipeline import BatchPreparer, StreamingPrefetcher, build_batch_preparer

OVERRIDES = ["data.num_frames=8", "data.input_size=64", "batch_size=3", "tracker.backend=lucas-kanade",
             "target.motion_norm=patch"]


def make_preparer(device: torch.device, extra: list[str] | None = None) -> BatchPreparer:
    return build_batch_preparer(load_config("default", OVERRIDES + ["seed=5"] + (extra or [])), device)


def host_batches(count: int, seed: int = 0) -> list[dict]:
    """Loader-style batches: smooth moving textures (so the tracker has something to follow), uint8."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        base = torch.rand(3, 1, 3, 96, 96, generator=gen)
        base = torch.nn.functional.interpolate(base[:, 0], size=(96, 96), mode="bilinear")[:, None]
        shifts = torch.arange(8)
        frames = torch.stack([torch.roll(base[:, 0], shifts=(int(s), int(s) // 2), dims=(2, 3)) for s in shifts], 1)
        frames = (frames[..., 16:80, 16:80] * 255).to(torch.uint8).permute(0, 1, 3, 4, 2).contiguous()
        out.append({"frames": frames, "skipped": torch.full((3, 4), -1), "source_index": torch.arange(3)})
    return out


def assert_batches_equal(a, b) -> None:
    items_a, items_b = a.tensor_items(), b.tensor_items()
    assert items_a.keys() == items_b.keys()
    for name in ("patches", "visible_idx", "masked_idx", "target.pixel", "target.track_motion"):
        x, y = items_a[name], items_b[name]
        assert torch.equal(x.cpu(), y.cpu()), name


def test_prefetched_batches_equal_direct_preparation_and_masks_follow_the_step():
    device = torch.device("cpu")
    preparer = make_preparer(device)
    batches = host_batches(3)
    prefetched = list(StreamingPrefetcher(batches, preparer, start_step=7, timer=IntervalTimer()))
    assert len(prefetched) == 3
    for i, got in enumerate(prefetched):
        assert_batches_equal(got, preparer(batches[i], 7 + i))
    # same clips, different step: different masks; same step: the same masks
    again = preparer(batches[0], 8)
    assert not torch.equal(again.visible_idx, prefetched[0].visible_idx)
    assert torch.equal(preparer(batches[0], 7).visible_idx, prefetched[0].visible_idx)
    first = prefetched[0]
    assert first.patches.shape == (3, first.visible_idx.shape[1], 3 * 2 * 16 * 16)
    assert first.targets["track_motion"].shape == (3, first.masked_idx.shape[1], 8)


def test_explicit_prefetch_gives_the_same_batches_and_repeated_calls_skip_nothing():
    preparer = make_preparer(torch.device("cpu"))
    batches = host_batches(3, seed=2)
    plain = list(StreamingPrefetcher(batches, preparer, start_step=4, timer=IntervalTimer()))
    prefetcher = StreamingPrefetcher(batches, preparer, start_step=4, timer=IntervalTimer())
    explicit = []
    for _ in range(3):
        explicit.append(next(prefetcher))
        prefetcher.prefetch()  # what the trainer does after launching its step
        prefetcher.prefetch()  # a second call must not consume a loader batch
    with pytest.raises(StopIteration):
        next(prefetcher)
    for a, b in zip(plain, explicit):
        assert_batches_equal(a, b)


def test_a_failed_preparation_never_hands_out_a_stale_batch():
    preparer = make_preparer(torch.device("cpu"))
    batches = host_batches(3, seed=3)
    calls = []

    def flaky(batch, step):
        calls.append(step)
        if len(calls) == 2:
            raise RuntimeError("tracker failed")
        return preparer(batch, step)

    prefetcher = StreamingPrefetcher(batches, flaky, start_step=0, timer=IntervalTimer())
    first = next(prefetcher)
    with pytest.raises(RuntimeError, match="tracker failed"):
        prefetcher.prefetch()
    second = next(prefetcher)  # the failed loader batch is lost; the next one is prepared with the same step
    assert second is not first
    assert_batches_equal(second, preparer(batches[2], 1))
    with pytest.raises(StopIteration):
        next(prefetcher)


def test_masking_without_the_motion_target_draws_the_same_motion_aware_masks():
    """target.track_motion=false still tracks for the binning statistic (the stat-only path: a provider that is not a
    target) and masks the same tokens; the former key target.motion=false means the same."""
    device = torch.device("cpu")
    batch = host_batches(1, seed=4)[0]
    with_target = make_preparer(device)(batch, 3)
    without_preparer = make_preparer(device, ["target.track_motion=false"])
    without = without_preparer(batch, 3)
    assert "track_motion" not in without.targets and "track_motion" in with_target.targets
    assert list(without_preparer.targets.providers) == ["motion_stat"]
    former = make_preparer(device, ["target.motion=false"])(batch, 3)
    assert torch.equal(former.visible_idx, with_target.visible_idx)
    assert torch.equal(without.visible_idx, with_target.visible_idx)
    assert torch.equal(without.masked_idx, with_target.masked_idx)
    tube = make_preparer(device, ["target.track_motion=false", "mask.type=tube"])
    assert tube.tracker is None  # nothing needs tracks then


def test_drop_invisible_with_lucas_kanade_carries_the_validity_of_the_masked_motion_values():
    """target.drop_invisible=true end to end with the Lucas-Kanade tracker: the tracker's visibility reaches the
    targets, the batch carries the validity of the masked values (0 targets where invalid), the masks follow the
    visible-only statistic (also on the stat-only path), and the prefetcher hands the validity out."""
    from trackmae_stream import kernels

    device = torch.device("cpu")
    batch = host_batches(1, seed=4)[0]
    preparer = make_preparer(device, ["target.track_motion.drop_invisible=true"])
    got = preparer(batch, 3)
    tracked = preparer.track(batch["frames"])
    assert bool((tracked.visibility < 0.5).any())  # LK loses points on these wrapped textures: something to drop
    targets, stat, valid = kernels.motion_targets_visible(tracked.tracks, tracked.visibility, tokens_side=4,
                                                          upsample=2)
    expected = preparer.masks(3, 3, device, token_stat=stat)
    assert torch.equal(got.visible_idx, expected.visible_idx) and torch.equal(got.masked_idx, expected.masked_idx)
    motion_valid, motion_target = got.valid["track_motion"], got.targets["track_motion"]
    assert motion_valid.dtype == torch.bool and motion_valid.shape == motion_target.shape
    assert torch.equal(motion_valid, valid.gather(1, got.masked_idx[..., None].expand(-1, -1, 8)))
    assert torch.equal(motion_target, targets.gather(1, got.masked_idx[..., None].expand(-1, -1, 8)))
    assert bool((motion_target[~motion_valid] == 0).all()) and not bool(motion_valid.all())
    assert make_preparer(device)(batch, 3).valid == {}  # off: the official definition
    stat_only = make_preparer(device, ["target.track_motion.drop_invisible=true",
                                       "target.track_motion.enabled=false"])(batch, 3)
    assert stat_only.valid == {} and torch.equal(stat_only.visible_idx, got.visible_idx)
    handed = next(StreamingPrefetcher([batch], preparer, start_step=3, timer=IntervalTimer()))
    assert torch.equal(handed.valid["track_motion"], motion_valid)


@pytest.mark.gpu
def test_drop_invisible_overlapped_equals_serial_and_hands_over_the_validity_on_cuda():
    device = torch.device("cuda")
    preparer = make_preparer(device, ["target.track_motion.drop_invisible=true"])
    batches = [{k: (v.pin_memory() if k == "frames" else v) for k, v in b.items()} for b in host_batches(3)]
    serial = list(StreamingPrefetcher(batches, preparer, start_step=0, timer=IntervalTimer()))
    overlapped = list(StreamingPrefetcher(batches, preparer, start_step=0, timer=IntervalTimer(),
                                          stream=torch.cuda.Stream()))
    torch.cuda.synchronize()
    for a, b in zip(serial, overlapped):
        assert_batches_equal(a, b)
        assert torch.equal(a.valid["track_motion"].cpu(), b.valid["track_motion"].cpu())
        assert any(t is b.valid["track_motion"] for t in b.device_tensors())  # record_stream covers it
    preparer(batches[0], 0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        preparer(batches[1], 1)  # the option's path adds no host sync
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_overlapped_preparation_equals_serial_on_cuda():
    device = torch.device("cuda")
    preparer = make_preparer(device)
    batches = [{k: (v.pin_memory() if k == "frames" else v) for k, v in b.items()} for b in host_batches(4)]
    serial = list(StreamingPrefetcher(batches, preparer, start_step=0, timer=IntervalTimer()))
    stream = torch.cuda.Stream()
    overlapped = []
    prefetcher = StreamingPrefetcher(batches, preparer, start_step=0, timer=IntervalTimer(), stream=stream)
    for i, batch in enumerate(prefetcher):
        overlapped.append(batch)
        torch.cuda._sleep(2_000_000)  # keep the consumer stream busy so that preparation really overlaps it
        if i % 2:
            prefetcher.prefetch()  # the trainer's order (after its step); even steps: plain iteration
    torch.cuda.synchronize()
    for a, b in zip(serial, overlapped):
        assert_batches_equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("tracker", ["lucas-kanade", "cotracker3"])
def test_batch_preparation_never_syncs_the_host(tracker, tmp_path):
    device = torch.device("cuda")
    extra = []
    if tracker == "cotracker3":
        from trackmae_stream.tracking.cotracker3 import CoTrackerThreeOffline

        path = tmp_path / "cotracker.pth"
        torch.save(CoTrackerThreeOffline().state_dict(), path)
        extra = [f"tracker.checkpoint={path}", "tracker.resolution=native", "tracker.iters=2"]
    preparer = make_preparer(device, extra)
    batches = host_batches(2)
    batches = [{k: (v.pin_memory() if k == "frames" else v) for k, v in b.items()} for b in batches]
    preparer(batches[0], 0)  # first call: builds the cached grids and constants
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        preparer(batches[1], 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_training_step_never_syncs_the_host(tmp_path):
    from trackmae_stream.engine import Trainer, _IntervalState

    cfg = load_config("default", OVERRIDES + [f"output_dir={tmp_path}", "data.num_workers=0", "progress=false",
                                              f"data.synthetic_dir={tmp_path / 'syn'}", "data.synthetic_videos=12",
                                              "data.synthetic_size=64", "data.synthetic_frames=20", "device=cuda"])
    trainer = Trainer(cfg)
    try:
        trainer.data.set_position(0, 0)
        state = _IntervalState(trainer.device, trainer.targets.names)
        batches = StreamingPrefetcher(trainer.data.loader, trainer.preparer, start_step=0, timer=state.timer,
                                      stream=trainer.side_stream)
        trainer._train_step(batches, state)  # warm-up: caches, cuBLAS handles, optimizer state
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            trainer._train_step(batches, state)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        batches.close()
    finally:
        trainer.close()
