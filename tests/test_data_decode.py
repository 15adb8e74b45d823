"""Decoders, temporal sampling, crops/flip and normalisation against brute-force references."""
from __future__ import annotations

import itertools
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from test_data_helpers import bilinear_resize_reference, decode_all_frames, small_synthetic_set

from trackmae_stream.data import IMAGENET_MEAN, IMAGENET_STD, VideoDecodeError, normalize_clip, open_video
from trackmae_stream.data.decode import DECODERS, OpenCVReader, sample_clip_indices
from trackmae_stream.data.synthetic import encode_video, render_clip, sample_clip
from trackmae_stream.data.transforms import (
    CropBox,
    crop_resize_flip,
    crop_size_pairs,
    fixed_crop_offsets,
    sample_multi_scale_crop,
)

H264_FRAMES = 75


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return small_synthetic_set(tmp_path_factory)


@pytest.fixture(scope="module")
def h264_video(tmp_path_factory):
    """A 96 x 96 H.264 (B-frames, GOP 16) clip and its brute-force decode."""
    motion, appearance = sample_clip(np.random.default_rng(5), 2, 96, H264_FRAMES)
    path = encode_video(render_clip(motion, appearance), tmp_path_factory.mktemp("h264") / "clip.mp4", "h264")
    return path, decode_all_frames(path)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("container", ["webm", "mp4"])
def test_random_reads_equal_the_sequential_decode(synthetic, h264_video, decoder, container):
    if container == "webm":
        path = synthetic.videos[5]
        reference = decode_all_frames(path)
    else:
        path, reference = h264_video
    rng = np.random.default_rng(1)
    with open_video(path, decoder) as reader:
        assert reader.num_frames == len(reference)
    for _ in range(12):
        indices = rng.integers(0, len(reference), size=int(rng.integers(1, 9)))  # unsorted, with repeats
        with open_video(path, decoder, seek_threshold=int(rng.integers(0, 20))) as reader:
            frames = reader.read(indices)
            more = rng.integers(0, len(reference), size=3)  # a second read on the same reader (seeks back)
            frames_more = reader.read(more)
        np.testing.assert_array_equal(frames, reference[indices])
        np.testing.assert_array_equal(frames_more, reference[more])


class _CountingReader(OpenCVReader):
    """Counts decoded frames (grab calls) to check that a read decodes only the span it needs."""

    decoded = 0

    def _frames_from(self, start):
        for item in super()._frames_from(start):
            self.decoded += 1
            yield item


def test_reads_decode_only_what_is_needed(h264_video):
    path, reference = h264_video
    wanted = np.arange(H264_FRAMES - 8, H264_FRAMES - 1, 2)  # a late clip: seek, decode from its keyframe, stop
    with _CountingReader(path) as reader:
        np.testing.assert_array_equal(reader.read(wanted), reference[wanted])
        assert reader.decoded <= wanted.max() - wanted.min() + 1
    with _CountingReader(path, seek_threshold=10**6) as reader:  # never seek: decodes from frame 0
        reader.read(wanted)
        assert reader.decoded == wanted.max() + 1


@pytest.mark.parametrize("decoder", DECODERS)
def test_bad_files_raise_video_decode_error(tmp_path, synthetic, decoder):
    with pytest.raises(VideoDecodeError, match="missing"):
        open_video(tmp_path / "absent.webm", decoder)
    garbage = tmp_path / "garbage.webm"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoDecodeError, match="unreadable"):
        open_video(garbage, decoder).read(np.arange(4))
    truncated = tmp_path / "truncated.webm"
    data = synthetic.videos[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with open_video(truncated, decoder) as reader:
        assert reader.num_frames == 24  # the header still promises every frame
        with pytest.raises(VideoDecodeError, match="stream ended"):
            reader.read(np.arange(reader.num_frames))
        assert 0 < reader.count_decodable_frames() < 24


def _brute_force_clips(num_video_frames: int, num_frames: int, rate: int) -> set[tuple[int, ...]]:
    """Every clip VideoMAE's stepping loop can produce: start at an offset, step by `rate` while the next strided
    frame still exists, else repeat the current one."""
    span = num_frames * rate
    offsets = range(num_video_frames - span + 1) if num_video_frames >= span else [0]
    clips = set()
    for offset in offsets:
        position, clip = offset, []
        for _ in range(num_frames):
            clip.append(position)
            if position + rate <= num_video_frames - 1:
                position += rate
        clips.add(tuple(clip))
    return clips


@pytest.mark.parametrize("num_video_frames, num_frames, rate", [
    (40, 8, 2), (37, 5, 3), (64, 16, 4), (63, 16, 4), (21, 6, 4), (9, 4, 4), (10, 4, 4), (5, 5, 1), (17, 3, 1)])
def test_temporal_sampling_matches_brute_force(num_video_frames, num_frames, rate):
    expected = _brute_force_clips(num_video_frames, num_frames, rate)
    seen = Counter(tuple(sample_clip_indices(num_video_frames, num_frames, rate, np.random.default_rng(seed)).tolist())
                   for seed in range(400))
    assert set(seen) == expected  # every legal clip is drawn, nothing else
    if len(expected) > 1:
        assert max(seen.values()) < 3 * 400 / len(expected)  # roughly uniform offsets


def test_too_short_video_raises():
    with pytest.raises(ValueError, match="fewer than num_frames"):
        sample_clip_indices(7, 8, 2, np.random.default_rng(0))


def _brute_force_crops(width, height, size, scales, max_distort, more_fix_crop):
    """GroupMultiScaleCrop's reachable (x, y, w, h), re-derived from its definition."""
    base = min(width, height)
    sizes = []
    for scale in scales:
        s = int(base * scale)
        sizes.append(size if abs(s - size) < 3 else s)
    crops = set()
    for i, j in itertools.product(range(len(sizes)), repeat=2):
        if abs(i - j) > max_distort:
            continue
        w, h = min(sizes[j], width), min(sizes[i], height)  # snapping may overshoot a frame just below size
        ws, hs = (width - w) // 4, (height - h) // 4
        grid = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2)]
        if more_fix_crop:
            grid += [(0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3)]
        crops.update((a * ws, b * hs, w, h) for a, b in grid)
    return crops


@pytest.mark.parametrize("width, height, size, more", [(171, 128, 112, True), (97, 131, 64, False),
                                                       (64, 64, 64, True), (63, 222, 65, True)])
def test_multi_scale_crop_reaches_exactly_the_videomae_candidates(width, height, size, more):
    scales = (1.0, 0.875, 0.75, 0.66)
    expected = _brute_force_crops(width, height, size, scales, 1, more)
    drawn = set()
    for seed in range(3000):
        box = sample_multi_scale_crop(width, height, size, np.random.default_rng(seed), scales=scales,
                                      more_fix_crop=more)
        drawn.add((box.x, box.y, box.width, box.height))
    assert drawn == expected
    assert len(crop_size_pairs(width, height, size, scales, 1)) == 10
    assert len(fixed_crop_offsets(width, height, 50, 40, more)) == (13 if more else 5)


def test_random_crop_offsets_stay_inside():
    for seed in range(200):
        box = sample_multi_scale_crop(77, 59, 32, np.random.default_rng(seed), fix_crop=False)
        assert 0 <= box.x <= 77 - box.width and 0 <= box.y <= 59 - box.height


@pytest.mark.parametrize("flip", [False, True])
def test_crop_resize_flip_matches_float64_reference(flip):
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, size=(5, 37, 53, 3), dtype=np.uint8)
    box = CropBox(x=7, y=4, width=41, height=29)
    out = crop_resize_flip(frames, box, 23, flip=flip)
    assert out.shape == (5, 23, 23, 3) and out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]
    for t in range(5):
        reference = bilinear_resize_reference(frames[t, 4:33, 7:48], 23, 23)
        if flip:
            reference = reference[:, ::-1]
        assert np.abs(out[t].astype(np.float64) - reference).max() <= 1.0
    # No resize when the crop already has the output size: exact copy.
    exact = crop_resize_flip(frames, CropBox(x=3, y=2, width=20, height=20), 20, flip=flip)
    expected = frames[:, 2:22, 3:23]
    np.testing.assert_array_equal(exact, expected[:, :, ::-1] if flip else expected)


def test_crop_resize_many_frames_in_chunks():
    """More frames than cv2.resize takes channels in one call still give per-frame resizes."""
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, size=(175, 11, 13, 3), dtype=np.uint8)
    out = crop_resize_flip(frames, CropBox(0, 0, 13, 11), 7)
    for t in (0, 41, 42, 174):
        assert np.abs(out[t] - bilinear_resize_reference(frames[t], 7, 7)).max() <= 1.0


def test_normalize_clip_matches_float64_reference():
    rng = np.random.default_rng(4)
    frames = rng.integers(0, 256, size=(2, 3, 5, 7, 3), dtype=np.uint8)
    out = normalize_clip(torch.from_numpy(frames))
    reference = (frames.astype(np.float64) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    reference = reference.transpose(0, 4, 1, 2, 3)
    assert out.shape == (2, 3, 3, 5, 7) and out.dtype == torch.float32 and out.is_contiguous()
    np.testing.assert_allclose(out.numpy(), reference, atol=1e-5)
    assert normalize_clip(torch.from_numpy(frames), dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="uint8"):
        normalize_clip(torch.from_numpy(frames).float())


@pytest.mark.gpu
def test_normalize_clip_on_gpu_equals_cpu():
    frames = torch.randint(0, 256, (2, 4, 9, 11, 3), dtype=torch.uint8)
    torch.testing.assert_close(normalize_clip(frames.cuda()).cpu(), normalize_clip(frames))


def test_package_imports_and_encodes_without_pyav(tmp_path):
    """The GPU image has OpenCV but no PyAV: the package must import, decode with OpenCV and encode VP9."""
    script = (
        "import sys; sys.modules['av'] = None\n"
        "import numpy as np\n"
        "from trackmae_stream.data import open_video\n"
        "from trackmae_stream.data.synthetic import encode_video, render_clip, sample_clip\n"
        "frames = render_clip(*sample_clip(np.random.default_rng(0), 1, 48, 6))\n"
        f"path = encode_video(frames, {str(tmp_path / 'cv.webm')!r})\n"
        "decoded = open_video(path).read(np.arange(6))\n"
        "assert decoded.shape == frames.shape, decoded.shape\n"
        "assert np.abs(decoded.astype(float) - frames).mean() < 12\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
