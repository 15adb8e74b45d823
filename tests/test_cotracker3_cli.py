"""The CoTracker3 command line on a synthetic video written with PyAV, with randomly initialised weights."""
from __future__ import annotations

import json
import subprocess
import sys

import av
import cv2
import numpy as np
import pytest
import torch

from trackmae_stream.tracking.base import grid_queries
from trackmae_stream.tracking.cotracker3 import CoTrackerThreeOffline
from trackmae_stream.tracking.cotracker3.__main__ import main

torch.set_num_threads(2)
N_FRAMES, HEIGHT, WIDTH = 9, 48, 64


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A moving-square clip (mpeg4) and a randomly initialised offline checkpoint."""
    folder = tmp_path_factory.mktemp("cli")
    video_path = folder / "clip.mp4"
    rng = np.random.default_rng(0)
    background = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    with av.open(str(video_path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for t in range(N_FRAMES):
            frame = background.copy()
            frame[10 + t:22 + t, 5 + 2 * t:17 + 2 * t] = (255, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    torch.manual_seed(0)
    weights = folder / "random.pth"
    torch.save(CoTrackerThreeOffline().state_dict(), weights)
    return {"folder": folder, "video": video_path, "weights": weights}


def _check_npz(path, n_points: int) -> dict:
    data = np.load(path)
    assert data["tracks"].shape == (N_FRAMES, n_points, 2) and data["tracks"].dtype == np.float32
    assert np.isfinite(data["tracks"]).all()
    assert data["visibility"].shape == (N_FRAMES, n_points) and data["visibility"].dtype == bool
    assert ((data["visibility_prob"] >= 0) & (data["visibility_prob"] <= 1)).all()
    assert data["confidence"].shape == (N_FRAMES, n_points)
    assert data["queries"].shape == (n_points, 3)
    np.testing.assert_array_equal(data["frame_indices"], np.arange(N_FRAMES))
    meta = json.loads(str(data["meta"]))
    assert (meta["height"], meta["width"]) == (HEIGHT, WIDTH)
    return {key: data[key] for key in data.files}


def test_cli_grid_with_image_strip(inputs):
    # The documented command line, as a separate process.
    out, strip = inputs["folder"] / "grid.npz", inputs["folder"] / "grid.png"
    result = subprocess.run(
        [sys.executable, "-m", "trackmae_stream.tracking.cotracker3", str(inputs["video"]), "--weights",
         str(inputs["weights"]), "--grid", "3", "--out", str(out), "--resolution", "native", "--iters", "2",
         "--device", "cpu", "--vis", str(strip)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "tracked 9 points through 9 frames" in result.stdout
    data = _check_npz(out, 9)
    # Grid queries: frame 0, the trainer's "cotracker" grid rule on the frame.
    np.testing.assert_allclose(data["queries"], grid_queries(1, 3, HEIGHT, WIDTH, "cotracker")[0].numpy(), atol=1e-5)
    image = cv2.imread(str(strip))
    assert image is not None and image.shape == (HEIGHT, 8 * WIDTH, 3)


def test_cli_queries_backward_with_video(inputs):
    queries = np.array([[0, 10.5, 15.0], [4, 30.0, 20.0], [8, 63.0, 47.0]], dtype=np.float32)
    query_file = inputs["folder"] / "queries.txt"
    np.savetxt(query_file, queries)
    out, movie = inputs["folder"] / "queries.npz", inputs["folder"] / "tracks.mp4"
    assert main([str(inputs["video"]), "--weights", str(inputs["weights"]), "--queries", str(query_file),
                 "--backward", "--out", str(out), "--resolution", "32x48", "--iters", "1", "--device", "cpu",
                 "--vis", str(movie)]) == 0
    data = _check_npz(out, 3)
    np.testing.assert_array_equal(data["queries"], queries)
    for n, (t, x, y) in enumerate(queries):  # the query frame holds the query point
        np.testing.assert_allclose(data["tracks"][int(t), n], (x, y), atol=1e-4)
        assert data["visibility"][int(t), n]
    with av.open(str(movie)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == N_FRAMES and frames[0].shape == (HEIGHT, WIDTH, 3)


def test_cli_errors(inputs, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        main([str(tmp_path / "missing.mp4"), "--weights", str(inputs["weights"]), "--out", str(tmp_path / "o.npz")])
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2\n3 4\n")
    with pytest.raises(ValueError, match=r"expected \(N, 3\)"):
        main([str(inputs["video"]), "--weights", str(inputs["weights"]), "--queries", str(bad),
              "--out", str(tmp_path / "o.npz"), "--device", "cpu"])
