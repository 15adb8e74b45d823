"""The analytic CoTracker3 FLOP count (used by bench/tracker.py) against the project's op counter on our model.

The op counter (trackmae_stream.flop_counter) has fixed per-op formulas, so this holds on every torch release the
project supports; torch's own FlopCounterMode counted the CPU attention kernel on 2.15 but not on 2.14.
"""
from __future__ import annotations

import pytest
import torch

from trackmae_stream.flop_counter import OpFlopCounter
from trackmae_stream.tracking.cotracker3 import CoTrackerThreeOffline, CoTrackerThreeOnline
from trackmae_stream.tracking.cotracker3.flops import cotracker3_gflop

torch.set_num_threads(2)


@pytest.mark.parametrize("cls,window,batch,n_frames,height,width,n_points,iters", [
    (CoTrackerThreeOffline, None, 2, 5, 44, 60, 7, 2),
    (CoTrackerThreeOffline, None, 2, 3, 36, 52, 1, 1),
    (CoTrackerThreeOnline, 16, 1, 20, 32, 40, 3, 1),  # two sliding windows
])
def test_analytic_flops_equal_flop_counter(cls, window, batch, n_frames, height, width, n_points, iters):
    model = cls().eval()
    video = torch.rand(batch, n_frames, 3, height, width) * 255
    queries = torch.cat([torch.zeros(batch, n_points, 1), torch.rand(batch, n_points, 2) * 30], dim=-1)
    with torch.no_grad(), OpFlopCounter() as counter:
        model(video, queries, iters=iters)
    analytic = cotracker3_gflop(n_frames, n_points, height, width, iters, window=window)
    assert not counter.unknown, f"product-like ops without a formula: {dict(counter.unknown)}"
    assert counter.total / batch / 1e9 == pytest.approx(analytic.total, rel=1e-9)
    assert analytic.encoder > 0 and analytic.update_transformer > 0 and analytic.correlation > 0
