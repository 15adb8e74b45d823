"""DALI's GPU backend (NVDEC), run on a GPU machine: needs DALI and OpenCV; PyAV only for the H.264 case.

See tests/test_dali.py for why DALI's RGB and FFmpeg's swscale RGB differ (chroma upsampling) and what agrees.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from test_dali_helpers import BT601_LUMA, iterate_epoch, smooth_clip, swscale_rgb  # noqa: E402

from trackmae_stream.data.dali import build_dali_loader  # noqa: E402
from trackmae_stream.data.lists import VideoRecord  # noqa: E402
from trackmae_stream.data.synthetic import encode_video  # noqa: E402

try:
    import av
except ImportError:
    av = None


def nvcuvid_available() -> bool:
    """NVDEC decoding needs the driver's libnvcuvid, which some GPU images lack."""
    try:
        ctypes.CDLL("libnvcuvid.so.1")
    except OSError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.parametrize("codec", ["vp9", "h264"])
def test_gpu_decoding_matches_the_reference(tmp_path, codec):
    """NVDEC through fn.decoders.video(device='mixed'): frames on the GPU, a full epoch, and pixels equal to
    FFmpeg's decode of the planned frames up to colour conversion: implied luma within 2 levels on average and 4 at
    the 99.9th percentile, mean RGB gap below 6 (whatever chroma upsampling the GPU kernel uses; see
    tests/test_dali.py). Needs only DALI and OpenCV for VP9 (PyAV, when present, also encodes the H.264 clips)."""
    if codec == "h264" and av is None:
        pytest.skip("encoding H.264 needs PyAV")
    if not nvcuvid_available():
        pytest.skip("libnvcuvid.so.1 (NVIDIA driver) is missing: DALI cannot decode on this GPU")
    rng = np.random.default_rng(1)
    suffix = "mp4" if codec == "h264" else "webm"
    try:
        paths = [encode_video(smooth_clip(rng, 24, 64, 96), tmp_path / f"clip{i}.{suffix}", codec=codec)
                 for i in range(4)]
    except (ImportError, RuntimeError) as error:  # no encoder for this codec on this machine
        pytest.skip(f"cannot encode {codec} test clips here: {error}")
    records = [VideoRecord(path=p, label=i) for i, p in enumerate(paths)]
    loader = build_dali_loader(records, batch_size=2, num_frames=6, sampling_rate=3, input_size=64,
                               scales=(1.0,), flip=False, device="gpu", num_threads=2)
    assert loader.num_dropped == 0
    batches = iterate_epoch(loader, 0)
    assert len(batches) == 2
    luma_gaps, rgb_gaps = [], []
    for batch in batches:
        frames = batch["frames"]
        assert frames.is_cuda and frames.device.index == torch.cuda.current_device()
        assert frames.dtype == torch.uint8 and frames.shape == (2, 6, 64, 64, 3)
        assert batch["index"].device.type == "cpu"
        for row in range(2):
            path = records[int(batch["index"][row])].path
            x, y, w, h = batch["crop_box"][row].tolist()
            assert (w, h) == (64, 64)
            reference = swscale_rgb(path, batch["frame_indices"][row].numpy())[:, y:y + h, x:x + w].astype(np.float64)
            got = frames[row].cpu().numpy().astype(np.float64)
            luma_gaps.append(np.abs((got - reference) @ BT601_LUMA).ravel())
            rgb_gaps.append(np.abs(got - reference).ravel())
    luma_gaps = np.concatenate(luma_gaps)
    assert luma_gaps.mean() < 2.0 and np.percentile(luma_gaps, 99.9) <= 4.0
    assert np.concatenate(rgb_gaps).mean() < 6.0
