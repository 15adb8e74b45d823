"""Track drawing and `python -m trackmae_stream.tracking.visualize` on a synthetic video with exact tracks."""
from __future__ import annotations

import subprocess
import sys

import av
import cv2
import numpy as np
import pytest
import torch

from trackmae_stream.data.synthetic import compute_tracks, encode_video, render_clip, sample_clip
from trackmae_stream.tracking import cotracker3
from trackmae_stream.tracking.base import query_grid
from trackmae_stream.tracking.visualize import (
    draw_tracks,
    image_strip,
    main,
    read_frames,
    save_visualization,
    write_video,
)

torch.set_num_threads(2)
SIZE, VIDEO_FRAMES = 64, 20


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A 64 x 64 VP9 synthetic clip of 20 frames and its motion (exact tracks)."""
    # the legacy task's few objects leave most of the grid visible (the count below was measured on it)
    motion, appearance = sample_clip(np.random.default_rng(3), 2, SIZE, VIDEO_FRAMES, task="legacy")
    path = encode_video(render_clip(motion, appearance), tmp_path_factory.mktemp("video") / "clip.webm")
    return path, motion


def decode(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_draw_tracks_fading_tail_and_hollow_points():
    frames = np.full((5, 40, 60, 3), 100, dtype=np.uint8)
    # track 0 moves 10 px right per frame along y = 10; track 1 sits still at (30, 30), visible only from frame 1
    tracks = np.zeros((5, 2, 2), dtype=np.float32)
    tracks[:, 0] = np.stack([5.0 + 10 * np.arange(5), np.full(5, 10.0)], axis=1)
    tracks[:, 1] = (30.0, 30.0)
    visibility = np.ones((5, 2))
    visibility[0, 1] = 0.3
    drawn = draw_tracks(frames, tracks, visibility, trail=4, radius=3)
    change = np.abs(drawn.astype(int) - frames.astype(int)).sum(-1)
    assert change[0, 30, 30] == 0 and change[0, 30, 33] > 0  # hollow: the ring is drawn, the centre is not
    assert change[1, 30, 30] > 0  # visible: a filled disc
    assert change[0, 10, 5] > 0  # a filled disc at the moving point's start
    # frame 4: tail segments 3->4 (newest) ... 0->1 (oldest), blended ever more weakly
    along = [change[4, 10, x] for x in (40, 30, 20, 10)]  # the middles of segments 3->4, 2->3, 1->2, 0->1
    assert along[0] > along[1] > along[2] > along[3] > 0, along
    assert change[4, 25:, :25].sum() == 0  # nothing drawn away from the tracks (track 1 is at x = 30)
    # boolean visibility and no visibility are accepted too; non-finite positions are skipped
    tracks[2, 0] = np.nan
    assert draw_tracks(frames, tracks, visibility > 0.5).shape == frames.shape
    assert draw_tracks(frames, tracks).shape == frames.shape


def test_image_strip_contact_sheet():
    frames = np.stack([np.full((4, 6, 3), 10 * (i + 1), dtype=np.uint8) for i in range(10)])
    sheet = image_strip(frames, max_frames=10, columns=4)
    assert sheet.shape == (3 * 4, 4 * 6, 3)
    assert sheet[8, 6 * 1, 0] == 100 and sheet[8:, 12:].max() == 0  # frame 9 at row 2 column 1; empty cells black
    assert image_strip(frames).shape == (4, 8 * 6, 3)  # the CoTracker3 CLI's strip: 8 frames in one row
    assert cotracker3.draw_tracks is draw_tracks and cotracker3.save_visualization is save_visualization


def test_cli_png_draws_the_tracks(video, tmp_path, capsys):
    path, motion = video
    out = tmp_path / "tracks.png"
    args = ["--frames", "8", "--start", "0", "--stride", "2", "--size", "0"]
    assert main([str(path), "--out", str(out), "--grid", "8", "--columns", "4", *args]) == 0
    assert "tracked 64 points through 8 frames (64x64) with lucas-kanade" in capsys.readouterr().out
    sheet = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)
    assert sheet.shape == (2 * SIZE, 4 * SIZE, 3)
    original = read_frames(path, frames=8, stride=2)
    np.testing.assert_array_equal(original, decode(path)[0:16:2])
    np.testing.assert_array_equal(read_frames(path, frames=30, start=5, stride=3), decode(path)[5::3])
    # near every exactly known, visible track position something was drawn (a disc, a ring or a tail)
    queries = query_grid(8, SIZE, SIZE, "cotracker").numpy()
    truth, visible = compute_tracks(motion, queries)
    truth, visible = truth[0:16:2], visible[0:16:2]
    changed = []
    for k in range(8):
        cell = sheet[(k // 4) * SIZE:(k // 4 + 1) * SIZE, (k % 4) * SIZE:(k % 4 + 1) * SIZE].astype(int)
        diff = np.abs(cell - original[k].astype(int)).sum(-1)
        for (x, y), seen in zip(truth[k], visible[k]):
            x, y = int(round(x)), int(round(y))
            if seen and 2 <= x < SIZE - 2 and 2 <= y < SIZE - 2:
                changed.append(diff[y - 2:y + 3, x - 2:x + 3].max() > 30)
    assert len(changed) > 300 and np.mean(changed) > 0.9, np.mean(changed)


def test_cli_mp4(video, tmp_path):
    path, _ = video
    out, control = tmp_path / "tracks.mp4", tmp_path / "control.mp4"
    assert main([str(path), "--out", str(out), "--frames", "6", "--stride", "3", "--size", "48", "--grid", "6"]) == 0
    drawn = decode(out)
    assert drawn.shape == (6, 48, 48, 3)
    # pixels far (> 60 levels) from the original frames: many where tracks are drawn, almost none from the codec
    # alone (the same frames through the same encoder without tracks)
    original = read_frames(path, frames=6, stride=3, size=48)
    write_video(original, control)
    far = [(np.abs(decode(p).astype(int) - original.astype(int)).max(-1) > 60).mean() for p in (out, control)]
    assert far[0] > 0.05 and far[1] < 0.01, far


def test_write_video_without_pyav_uses_opencv(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    frames = np.random.default_rng(0).integers(0, 256, (5, 30, 42, 3), dtype=np.uint8)
    write_video(frames, tmp_path / "cv.mp4")
    capture = cv2.VideoCapture(str(tmp_path / "cv.mp4"))
    decoded = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        decoded.append(frame)
    capture.release()
    assert len(decoded) == 5 and decoded[0].shape == (30, 42, 3)
    with pytest.raises(ImportError, match="needs PyAV"):
        write_video(frames, tmp_path / "cv.webm")


def test_cli_cotracker3(video, tmp_path):
    """The CoTracker3 path with random weights (the wiring, not the tracking quality)."""
    torch.manual_seed(0)
    weights = tmp_path / "random.pth"
    torch.save(cotracker3.CoTrackerThreeOffline().state_dict(), weights)
    out = tmp_path / "co.png"
    assert main([str(video[0]), "--out", str(out), "--checkpoint", str(weights), "--size", "32", "--frames", "4",
                 "--grid", "3", "--resolution", "native", "--iters", "1", "--device", "cpu"]) == 0
    assert cv2.imread(str(out)).shape == (32, 4 * 32, 3)


@pytest.mark.parametrize("extra, message", [
    (["--grid", "1"], "--grid 1"),
    (["--grid", "x"], "--grid"),
    (["--frames", "1"], "at least 2 frames"),
    (["--stride", "0"], "--stride"),
    (["--size", "3"], "--size 3"),
    (["--start", "19"], "leaves 1"),
    (["--tracker", "cotracker3"], "needs --checkpoint"),
    (["--checkpoint", "missing.pth"], "no such file"),
    (["--tracker", "lucas-kanade", "--checkpoint", "official"], "--checkpoint is for"),
    (["--device", "nonsense"], "nonsense"),
])
def test_cli_errors(video, tmp_path, capsys, extra, message):
    assert main([str(video[0]), "--out", str(tmp_path / "o.png"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o.png").exists()


def test_cli_bad_video_and_output(video, tmp_path, capsys):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video" * 100)
    for args, message in (([str(tmp_path / "missing.mp4"), "--out", str(tmp_path / "o.png")], "missing"),
                          ([str(garbage), "--out", str(tmp_path / "o.png")], "unreadable"),
                          ([str(video[0]), "--out", str(tmp_path / "o.txt")], "unknown suffix")):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_module_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "trackmae_stream.tracking.visualize", str(tmp_path / "none.mp4"),
                             "--out", str(tmp_path / "o.mp4")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "missing" in result.stderr
