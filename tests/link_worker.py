"""The two ends of a `trackmae_stream.tracks.remote.Link` in two gloo processes (test_tracking_ranks spawns them).

A module of its own so that the spawned processes import only torch and the link, not the other tests' imports.
"""
from __future__ import annotations

import time

import torch

from trackmae_stream.pipeline import TrainBatch
from trackmae_stream.tracks import remote

CPU = torch.device("cpu")


def same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _schema() -> remote.BatchSchema:
    specs = (remote.TensorSpec("patches", (3, 5, 7), torch.bfloat16),
             remote.TensorSpec("visible_idx", (3, 5), torch.int64),
             remote.TensorSpec("masked_idx", (3, 11), torch.int64),
             remote.TensorSpec("target.track_motion", (3, 11, 6), torch.float32),
             remote.TensorSpec("valid.track_motion", (3, 11, 6), torch.bool))
    return remote.BatchSchema(tensors=specs, samples=2, frames=remote.TensorSpec("frames_u8", (1, 4, 6, 5, 3),
                                                                                 torch.uint8))


def _random_batch(k: int) -> TrainBatch:
    """Random odd-shaped tensors (the same in both processes: seeded by k); one target with a validity,
    source_index in every other batch, the picture frames in batch 1 only."""
    g = torch.Generator().manual_seed(1000 + k)
    return TrainBatch(
        patches=torch.randn(3, 5, 7, generator=g).to(torch.bfloat16),
        visible_idx=torch.randint(0, 2 ** 40, (3, 5), generator=g),
        masked_idx=torch.randint(-9, 9, (3, 11), generator=g),
        targets={"track_motion": torch.randn(3, 11, 6, generator=g)},
        skipped=torch.randint(-1, 50, (2, 3), generator=g),
        source_index=torch.randint(0, 50, (2,), generator=g) if k % 2 == 0 else None,
        valid={"track_motion": torch.rand(3, 11, 6, generator=g) > 0.5},
        frames_u8=torch.randint(0, 256, (1, 4, 6, 5, 3), generator=g, dtype=torch.uint8) if k == 1 else None)


def run(rank: int, port: int) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    control = torch.distributed.new_group(backend="gloo")
    link = remote.Link(1 - rank, 2, CPU, control)
    schema, n = _schema(), 3
    try:
        if rank == 0:  # the tracking end
            sends = [link.send_batch(_random_batch(k), schema, k=k, position=(0, k, k), with_frames=k == 1)
                     for k in range(n)]
            sends.append(link.send_header(link.new_header(remote.Word.ERROR, "a failure, ünïcode")))
            deadline = time.monotonic() + 30
            for pending in sends:
                remote._await(pending, deadline)
        else:  # the training end: every receive posted before the first arrives (they match in order)
            incoming = [link.post_batch(schema, k=k, position=(0, k, k), with_frames=k == 1) for k in range(n)]
            error_header, error_done = link.post_header()
            deadline = time.monotonic() + 30
            for item in incoming:
                remote._await(item.header_done, deadline)
                assert remote.header_word(item.header) == remote.Word.BATCH
                remote._await(item.tensors_done, deadline)
                got, expected = remote.unpack_batch(item, schema), _random_batch(item.k)
                got_items, expected_items = got.tensor_items(), expected.tensor_items()
                assert got_items.keys() == expected_items.keys()
                for name, value in expected_items.items():
                    assert same(got_items[name], value), (item.k, name)
            remote._await(error_done, deadline)
            assert remote.header_word(error_header) == remote.Word.ERROR
            assert remote.header_text(error_header) == "a failure, ünïcode"
    finally:
        link.close()
        torch.distributed.destroy_process_group()
