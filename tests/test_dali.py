"""The DALI clip loader on DALI's CPU backend (VP9), against independent references (GPU: test_dali_gpu.py).

Colour: DALI and PyAV/OpenCV (swscale) get identical YUV 4:2:0 planes from libvpx but convert them to RGB
differently: DALI upsamples chroma bilinearly (centre-sited), swscale's default path effectively does not, so on
colourful textures their RGB differs by ~4.5 levels on average (up to ~70 at colour edges) while the luma they imply
agrees to ~1.3 levels on average (99.9% within 3; a few pixels near clipping reach 6). The exact test therefore
converts PyAV's YUV planes with BT.601 limited-range coefficients and bilinear chroma upsampling in float64 (agreement:
+-1 level, rounding), and checks against swscale's RGB (OpenCV's = PyAV's rgb24) through luma statistics only.
"""
from __future__ import annotations

import functools
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")
av = pytest.importorskip("av")  # the YUV reference planes, H.264 encoding and packet edits need PyAV

from test_dali_helpers import BT601_LUMA, iterate_epoch, smooth_clip, swscale_rgb  # noqa: E402
from test_data_helpers import bilinear_resize_reference, small_synthetic_set  # noqa: E402

from trackmae_stream.data import VideoClipDataset, VideoRecord, build_pretrain_loader, read_video_list  # noqa: E402
from trackmae_stream.data.dali import DALI_CPU_CODECS, SKIPPED_WIDTH, build_dali_loader, probe_records, probe_video  # noqa: E402
from trackmae_stream.data.decode import VideoDecodeError  # noqa: E402
from trackmae_stream.data.skips import TooManySkippedVideosError  # noqa: E402
from trackmae_stream.data.synthetic import encode_video  # noqa: E402


def reference_rgb(path: str | Path, frame_ids: np.ndarray) -> np.ndarray:
    """float64 (T, H, W, 3): PyAV's YUV 4:2:0 planes of the given frames, BT.601 limited range, bilinear chroma."""
    return np.stack([_reference_frame(str(path), int(i)) for i in frame_ids])


@functools.lru_cache(maxsize=256)
def _reference_frame(path: str, frame_id: int) -> np.ndarray:
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i == frame_id:
                planar = frame.to_ndarray(format="yuv420p").astype(np.float64)
                break
    height, width = planar.shape[0] * 2 // 3, planar.shape[1]
    chroma = planar[height:].reshape(2, height // 2, width // 2)
    u, v = (bilinear_resize_reference(c[..., None], height, width)[..., 0] - 128.0 for c in chroma)
    y = (planar[:height] - 16.0) * (255.0 / 219.0)
    u, v = u * (255.0 / 224.0), v * (255.0 / 224.0)
    rgb = np.stack([y + 1.402 * v, y - 0.344136 * u - 0.714136 * v, y + 1.772 * u], axis=-1)
    return np.clip(rgb, 0.0, 255.0)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return small_synthetic_set(tmp_path_factory)


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory) -> dict[str, Path]:
    """Non-square VP9 videos, plus the bad cases: corrupt, truncated, missing, too short, H.264 (GPU-only codec)."""
    folder = tmp_path_factory.mktemp("dali_videos")
    rng = np.random.default_rng(0)
    paths = {}
    for name in ("wide_a", "wide_b"):
        paths[name] = encode_video(smooth_clip(rng, 20, 64, 96), folder / f"{name}.webm", codec="vp9")
    paths["short"] = encode_video(smooth_clip(rng, 5, 64, 96), folder / "short.webm", codec="vp9")
    paths["h264"] = encode_video(smooth_clip(rng, 20, 64, 96), folder / "h264.mp4", codec="h264")
    paths["corrupt"] = folder / "corrupt.webm"
    paths["corrupt"].write_bytes(rng.integers(0, 256, 20000, dtype=np.uint8).tobytes())
    data = paths["wide_a"].read_bytes()
    paths["truncated"] = folder / "truncated.webm"
    paths["truncated"].write_bytes(data[: len(data) * 2 // 5])
    paths["missing"] = folder / "missing.webm"
    paths["late_corrupt"] = corrupt_after_first_frames(paths["wide_b"], folder / "late_corrupt.webm", keep=2)
    return paths


def corrupt_after_first_frames(source: Path, target: Path, keep: int) -> Path:
    """Copy `source` with the VP9 frame headers of every packet after the first `keep` zeroed: the container stays
    valid and the first frames decode (so the probe passes), but decoding any later frame fails."""
    data = bytearray(source.read_bytes())
    with av.open(str(source)) as container:
        payloads = [bytes(packet) for packet in container.demux(video=0) if packet.size]
    for payload in payloads[keep:]:
        offset = data.find(payload[:32])
        assert offset >= 0
        data[offset:offset + 8] = bytes(8)
    target.write_bytes(bytes(data))
    return target


def test_full_frame_clips_equal_the_reference_decode(small_set):
    """crop = full frame (scales (1,)), no flip, resize to the same size: DALI's frames are the decoded frames.

    Against the float64 YUV -> RGB reference: within 1 level everywhere. Against swscale's RGB: implied luma within
    2 levels on average and 4 levels at the 99.9th percentile (chroma upsampling differs, see the module docstring).
    """
    size, num_frames, rate = small_set.size, 4, 5
    loader = build_dali_loader(small_set.list_file, batch_size=3, num_frames=num_frames, sampling_rate=rate,
                               input_size=size, scales=(1.0,), flip=False, seed=1, device="cpu", num_threads=1)
    records = read_video_list(small_set.list_file)
    batches = iterate_epoch(loader, 0)
    assert len(batches) == len(loader) == len(records) // 3
    seen, luma_gaps = [], []
    for batch in batches:
        assert batch["frames"].shape == (3, num_frames, size, size, 3) and batch["frames"].dtype == torch.uint8
        assert batch["frames"].device.type == "cpu"
        for key in ("label", "index", "source_index", "frame_indices", "crop_box", "skipped"):
            assert batch[key].dtype == torch.int64, key
        assert batch["skipped"].shape == (3, SKIPPED_WIDTH) and (batch["skipped"] == -1).all()
        assert torch.equal(batch["crop_box"], torch.tensor([[0, 0, size, size]] * 3))
        assert not batch["flipped"].any()
        for row in range(3):
            index = int(batch["index"][row])
            seen.append(index)
            assert int(batch["label"][row]) == records[index].label
            frame_ids = batch["frame_indices"][row].numpy()
            assert (np.diff(frame_ids) == rate).all() and 0 <= frame_ids[0] <= small_set.num_frames - rate * num_frames
            got = batch["frames"][row].numpy().astype(np.float64)
            reference = reference_rgb(records[index].path, frame_ids)
            assert np.abs(got - reference).max() <= 1.0 + 1e-9
            luma_gaps.append(np.abs((got - swscale_rgb(records[index].path, frame_ids)) @ BT601_LUMA).ravel())
    assert len(set(seen)) == len(seen)
    luma_gaps = np.concatenate(luma_gaps)
    assert luma_gaps.mean() < 2.0 and np.percentile(luma_gaps, 99.9) <= 4.0


@pytest.mark.parametrize("num_sample", [2])
def test_crops_flips_and_resize_against_reference(video_folder, num_sample):
    """Multi-scale crops inside a 96 x 64 frame, both flip states, and the pixels of crop + resize + flip equal a
    float64 bilinear reference of the cropped reference frames (within 2 levels: colour and resize rounding).

    input_size 40 is at most the smallest crop (42 snaps to 40), so resampling never reads outside the crop.
    """
    path = video_folder["wide_a"]
    records = [VideoRecord(path=path, label=7)] * 6
    loader = build_dali_loader(records, batch_size=3, num_frames=4, sampling_rate=2, input_size=40, flip=True,
                               num_sample=num_sample, seed=3, device="cpu", num_threads=1)
    batches = iterate_epoch(loader, 0)
    boxes = torch.cat([b["crop_box"] for b in batches])
    flips = torch.cat([b["flipped"] for b in batches])
    assert boxes.shape == (6 * num_sample, 4)
    assert ((boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 0] + boxes[:, 2] <= 96)
            & (boxes[:, 1] + boxes[:, 3] <= 64)).all()
    assert len({tuple(b) for b in boxes.tolist()}) > 1
    assert flips.any() and not flips.all()
    for batch in batches:
        assert batch["frames"].shape == (3 * num_sample, 4, 40, 40, 3)
        assert (batch["label"] == 7).all()
        for row in range(3 * num_sample):
            x, y, w, h = batch["crop_box"][row].tolist()
            frames = reference_rgb(path, batch["frame_indices"][row].numpy())[:, y:y + h, x:x + w]
            expected = np.stack([bilinear_resize_reference(f, 40, 40) for f in frames])
            if batch["flipped"][row]:
                expected = expected[:, :, ::-1]
            assert np.abs(batch["frames"][row].numpy() - expected).max() <= 2.0


def test_plans_match_the_cpu_loader_and_depend_on_the_seed(small_set):
    """With no dropped videos, DALI batches ask for the CPU loader's indices, frames, crops and flips (same seed,
    epochs 0 and 1); frames agree up to the colour conversion. Another seed gives other crops and offsets."""
    records = read_video_list(small_set.list_file)
    options = dict(num_frames=4, sampling_rate=4, input_size=48, flip=True, seed=11)
    cpu = build_pretrain_loader(VideoClipDataset(records, **options), batch_size=4, num_workers=0, seed=11)
    dali = build_dali_loader(records, batch_size=4, device="cpu", num_threads=1, **options)
    for epoch in (0, 1):
        for cpu_batch, dali_batch in zip(iterate_epoch(cpu, epoch), iterate_epoch(dali, epoch), strict=True):
            for key in ("index", "source_index", "label", "frame_indices", "crop_box", "flipped", "skipped"):
                assert torch.equal(cpu_batch[key], dali_batch[key]), key
            gap = (cpu_batch["frames"].double() - dali_batch["frames"].double()).abs()
            assert gap.mean() < 8.0
    other = build_dali_loader(records, batch_size=4, device="cpu", num_threads=1, **{**options, "seed": 12})
    first, second = iterate_epoch(dali, 0), iterate_epoch(other, 0)
    assert not torch.equal(torch.cat([b["crop_box"] for b in first]), torch.cat([b["crop_box"] for b in second]))
    again = iterate_epoch(dali, 0)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["frames"], b["frames"]) and torch.equal(a["index"], b["index"])


def test_bad_videos_are_dropped_with_a_counted_warning(video_folder, caplog):
    names = ["wide_a", "corrupt", "wide_b", "truncated", "missing", "short", "h264"]
    records = [VideoRecord(path=video_folder[name], label=i) for i, name in enumerate(names)]
    with caplog.at_level(logging.WARNING, logger="trackmae_stream.data.dali"):
        loader = build_dali_loader(records, batch_size=1, num_frames=8, sampling_rate=2, input_size=32,
                                   device="cpu", num_threads=1, max_skip_fraction=0.8)
    assert loader.usable == [0, 2]
    assert loader.dropped_indices == [1, 3, 4, 5, 6] and loader.num_dropped == 5
    reasons = {Path(error.path).name: error.reason for error in loader.dropped}
    assert "missing" in reasons["missing.webm"]
    assert "too short" in reasons["short.webm"] and "5 frames" in reasons["short.webm"]
    assert "codec 'h264'" in reasons["h264.mp4"] and all(c in reasons["h264.mp4"] for c in DALI_CPU_CODECS)
    assert reasons["corrupt.webm"] and reasons["truncated.webm"]
    assert "dropped 5 of 7" in loader.dropped_summary()
    assert any("dropping 5 of 7" in message for message in caplog.messages)
    batches = iterate_epoch(loader, 0)
    assert sorted(int(b["index"]) for b in batches) == [0, 2]
    with pytest.raises(TooManySkippedVideosError, match="5 of 7 videos fail the DALI probe"):
        build_dali_loader(records, batch_size=1, num_frames=8, sampling_rate=2, input_size=32, device="cpu")


@pytest.mark.parametrize("backend", ["pyav", "opencv"])
def test_probe_counts_frames_and_sizes(video_folder, small_set, backend):
    probe = probe_video(video_folder["wide_b"], backend=backend)
    assert (probe.num_frames, probe.width, probe.height, probe.codec) == (20, 96, 64, "vp9")
    probe = probe_video(small_set.videos[0], backend=backend)
    assert (probe.num_frames, probe.width) == (small_set.num_frames, small_set.size)
    assert probe_video(video_folder["h264"], backend=backend).codec == "h264"
    with pytest.raises(VideoDecodeError, match="codec 'h264' is not decoded"):
        probe_video(video_folder["h264"], codecs=DALI_CPU_CODECS, backend=backend)
    for bad in ("corrupt", "missing"):
        with pytest.raises(VideoDecodeError, match=bad if bad == "missing" else "unreadable|no decodable"):
            probe_video(video_folder[bad], backend=backend)


def test_probe_cache_is_reused_and_invalidated_by_changes(video_folder, tmp_path):
    good = tmp_path / "good.webm"
    shutil.copyfile(video_folder["wide_a"], good)
    records = [VideoRecord(path=good, label=0)]
    cache = tmp_path / "probes.json"
    first = probe_records(records, codecs=DALI_CPU_CODECS, min_frames=4, cache_path=cache)
    assert first[0].num_frames == 20 and cache.exists()
    assert str(good) in cache.read_text()
    good.write_bytes(b"not a video any more")  # size and mtime change: the cached probe must not be trusted
    second = probe_records(records, codecs=DALI_CPU_CODECS, min_frames=4, cache_path=cache)
    assert "unreadable" in second[0].reason


def test_epoch_length_order_and_resume(small_set):
    records = read_video_list(small_set.list_file)  # 8 videos
    make = dict(batch_size=3, num_frames=4, sampling_rate=2, input_size=32, device="cpu", num_threads=1, seed=5)
    loader = build_dali_loader(records, **make)
    assert len(loader) == loader.batches_per_epoch == len(records) // 3
    epoch0 = [b["index"].tolist() for b in iterate_epoch(loader, 0)]
    epoch1 = [b["index"].tolist() for b in iterate_epoch(loader, 1)]
    assert epoch0 != epoch1 and len(epoch1) == len(loader)
    assert [b["index"].tolist() for b in loader] == epoch1  # iterating again repeats the selected epoch
    loader.resume(1, 1)
    assert len(loader) == len(epoch1) - 1
    assert [b["index"].tolist() for b in loader] == epoch1[1:]
    # abandon an epoch after one batch; the next one still starts at its beginning
    loader.set_epoch(0)
    next(iter(loader))
    assert [b["index"].tolist() for b in iterate_epoch(loader, 0)] == epoch0
    # two shards split an epoch without overlap
    shards = [build_dali_loader(records, shard_id=s, num_shards=2, **{**make, "batch_size": 2}) for s in (0, 1)]
    taken = [sum((b["index"].tolist() for b in iterate_epoch(s, 0)), []) for s in shards]
    assert not set(taken[0]) & set(taken[1]) and len(taken[0]) == len(taken[1]) == 4
    partial = build_dali_loader(records, drop_last=False, **make)
    sizes = [len(b["index"]) for b in iterate_epoch(partial, 0)]
    assert sizes == [3, 3, 2] and len(partial) == 3
    partial.close()
    with pytest.raises(RuntimeError, match="closed"):
        iter(partial)


def test_file_vanishing_after_the_probe_is_substituted(video_folder, tmp_path):
    paths = []
    for name in ("a", "b", "c"):
        paths.append(tmp_path / f"{name}.webm")
        shutil.copyfile(video_folder["wide_a" if name != "b" else "wide_b"], paths[-1])
    records = [VideoRecord(path=p, label=i) for i, p in enumerate(paths)]
    loader = build_dali_loader(records, batch_size=3, num_frames=4, sampling_rate=2, input_size=32, device="cpu",
                               num_threads=1, shuffle=False)
    paths[1].unlink()
    (batch,) = iterate_epoch(loader, 0)
    assert batch["index"].tolist() == [0, 1, 2]
    assert batch["skipped"][1, 0] == 1 and (batch["skipped"][1, 1:] == -1).all()
    assert batch["source_index"][1] in (0, 2) and batch["label"][1] == batch["source_index"][1]
    assert (batch["skipped"][[0, 2]] == -1).all()
    for path in paths[::2]:  # nothing left to substitute: the bound error, not a DALI failure
        path.unlink()
    with pytest.raises(TooManySkippedVideosError, match="videos in a row are unusable.*0 usable videos left"):
        iterate_epoch(loader, 1)


def test_video_failing_inside_dali_is_substituted_and_the_batch_replayed(video_folder, caplog):
    """A stream that breaks after its first frames passes the probe; DALI fails on it, the loader finds it with a
    full PyAV decode, rebuilds the pipeline, replays the batch with a substitute, and keeps substituting it."""
    names = ["wide_a", "late_corrupt", "wide_b"]
    records = [VideoRecord(path=video_folder[name], label=i) for i, name in enumerate(names)]
    assert probe_video(video_folder["late_corrupt"]).num_frames == 20
    loader = build_dali_loader(records, batch_size=3, num_frames=4, sampling_rate=2, input_size=32, device="cpu",
                               num_threads=1, shuffle=False)
    assert loader.num_dropped == 0
    with caplog.at_level(logging.WARNING, logger="trackmae_stream.data.dali"):
        for epoch in (0, 1):
            (batch,) = iterate_epoch(loader, epoch)
            assert batch["index"].tolist() == [0, 1, 2]
            assert batch["skipped"][1, 0] == 1 and (batch["skipped"][[0, 2]] == -1).all()
            assert int(batch["source_index"][1]) in (0, 2)
            assert batch["label"][1] == batch["source_index"][1]
            assert batch["frames"].shape == (3, 4, 32, 32, 3)
    assert [Path(e.path).name for e in loader.runtime_failures] == ["late_corrupt.webm"]
    assert "undecodable" in loader.runtime_failures[0].reason
    assert sum("late_corrupt.webm" in message for message in caplog.messages) == 1


@pytest.mark.parametrize("kwargs, error", [
    (dict(device="tpu"), ValueError), (dict(batch_size=0), ValueError), (dict(shard_id=2, num_shards=2), ValueError),
    (dict(num_sample=0), ValueError), (dict(max_skip_fraction=1.5), ValueError)])
def test_bad_arguments_raise(small_set, kwargs, error):
    options = dict(batch_size=2, num_frames=4, sampling_rate=2, input_size=32, device="cpu")
    with pytest.raises(error):
        build_dali_loader(small_set.list_file, **{**options, **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without CUDA")
def test_gpu_device_without_cuda_raises_clearly(small_set):
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        build_dali_loader(small_set.list_file, batch_size=2, num_frames=4, sampling_rate=2, input_size=32)
