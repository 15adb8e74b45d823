"""CoTracker3 online model: vector_online (whole-video sliding windows and streaming), batching, short videos."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import reference_path
from test_cotracker3_fill import filled_model
from test_cotracker3_model import _random_clips

torch.set_num_threads(2)

TRACK_TOL, PROB_TOL = 2e-4, 1.25e-4  # sin fill: README_vectors.md §5 (vector_a-like)


@pytest.fixture(scope="module")
def online_vector():
    data = np.load(reference_path("cotracker3/vector_online.npz"))
    return data, filled_model("sin", "online")


def _stream(model, video, queries, iters, chunk=16, step=8):
    """The README's streaming loop: chunks video[:, ind:ind+16] for ind in range(0, T - 8, 8)."""
    model.init_video_online_processing()
    outputs = []
    for ind in range(0, video.shape[1] - step, step):
        with torch.no_grad():
            outputs.append(model(video[:, ind:ind + chunk], queries, iters=iters, is_online=True))
    return outputs


def _max_err(actual, expected) -> float:
    return float(np.abs(actual.numpy().astype(np.float64) - expected).max())


def test_whole_video_sliding_windows(online_vector):
    data, model = online_vector
    with torch.no_grad():
        tracks, vis, conf, _ = model(torch.from_numpy(data["video"]), torch.from_numpy(data["queries"]), iters=4)
    assert tracks.shape == data["tracks"].shape
    assert _max_err(tracks, data["tracks"]) <= TRACK_TOL
    assert _max_err(vis, data["visibility"]) <= PROB_TOL
    assert _max_err(conf, data["confidence"]) <= PROB_TOL


@pytest.mark.parametrize("iters", [4, 6])
def test_streaming(online_vector, iters):
    data, model = online_vector
    outputs = _stream(model, torch.from_numpy(data["video"]), torch.from_numpy(data["queries"]), iters)
    assert len(outputs) == 2
    first, last = outputs[0], outputs[-1]
    assert first[0].shape == data[f"stream{iters}_tracks_after_chunk0"].shape
    assert _max_err(first[0], data[f"stream{iters}_tracks_after_chunk0"]) <= TRACK_TOL
    assert _max_err(last[0], data[f"stream{iters}_tracks_final"]) <= TRACK_TOL
    assert _max_err(last[1], data[f"stream{iters}_visibility_final"]) <= PROB_TOL
    assert _max_err(last[2], data[f"stream{iters}_confidence_final"]) <= PROB_TOL


def test_streaming_requires_init():
    model = filled_model("sin", "online")
    video = torch.rand(1, 8, 3, 32, 32) * 255
    with pytest.raises(RuntimeError, match="init_video_online_processing"):
        model(video, torch.zeros(1, 2, 3), is_online=True)
    model.init_video_online_processing()
    with pytest.raises(ValueError, match="at most 16 frames"):
        model(torch.rand(1, 17, 3, 32, 32), torch.zeros(1, 2, 3), is_online=True)


@pytest.fixture(scope="module")
def hash_online():
    return filled_model("hash", "online")


def test_online_batched_equals_per_sample(hash_online):
    # T = 20: two windows (0 and 8) and padding; queries start in the first window, the overlap and the second.
    video, queries = _random_clips(2, 20, 36, 44, seed=21)
    queries[:, -1, 0] = torch.tensor([17.0, 12.0])
    with torch.no_grad():
        batched = hash_online(video, queries, iters=1)[:3]
        single = [hash_online(video[b:b + 1], queries[b:b + 1], iters=1)[:3] for b in range(2)]
    for out, ref in zip(batched, zip(*single)):
        torch.testing.assert_close(out, torch.cat(ref), rtol=0, atol=1e-3)
    streamed = _stream(hash_online, video, queries, iters=1)[-1][:3]
    streamed_single = [_stream(hash_online, video[b:b + 1], queries[b:b + 1], iters=1)[-1][:3] for b in range(2)]
    for out, ref in zip(streamed, zip(*streamed_single)):
        torch.testing.assert_close(out, torch.cat(ref), rtol=0, atol=1e-3)
    # Streaming matches the whole-video mode (the reference's own agreement is 4e-5 px; hash fill amplifies noise).
    torch.testing.assert_close(streamed[0], batched[0], rtol=0, atol=1e-2)


def test_short_video_equals_single_chunk_stream(hash_online):
    # Deviation from the reference (which returns zeros for T <= 8): one padded window, as streaming one chunk.
    video, queries = _random_clips(2, 6, 36, 44, seed=22)
    with torch.no_grad():
        whole = hash_online(video, queries, iters=2)
        hash_online.init_video_online_processing()
        streamed = hash_online(video, queries, iters=2, is_online=True)
    assert whole[0].shape == streamed[0].shape == (2, 6, 7, 2)
    torch.testing.assert_close(whole[0], streamed[0], rtol=0, atol=1e-4)
    assert whole[0].abs().max() > 1.0  # not the reference's zeros
