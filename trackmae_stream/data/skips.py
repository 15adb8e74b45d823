"""Counting skipped videos across DataLoader workers, and the bound that aborts training.

Workers cannot share counters, so every sample reports the record indices that failed while producing it
(`skipped`, padded with -1) and the record it finally used (`source_index`). The trainer feeds those CPU tensors
to a `SkipCounter` (cheap; no device sync: they never leave the host) and calls `check()` at log intervals.

The skipped fraction is unique failed videos / max(unique videos attempted, videos per rank per epoch). Early in
an epoch the second term keeps a few unlucky first samples from aborting a run (the fraction is then a lower bound
of the data set's bad fraction); after an epoch both terms agree. With several ranks, each counts its own shard,
which estimates the same fraction.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from ..errors import UserError
from .lists import VideoRecord

DEFAULT_MAX_SKIP_FRACTION = 0.1


class TooManySkippedVideosError(UserError, RuntimeError):
    """The fraction of unusable videos passed the configured bound."""


class SkipCounter:
    """Accumulates skip reports; `check()` raises once the skipped fraction passes `max_skip_fraction`."""

    def __init__(self, videos: Sequence[VideoRecord | str | Path], *,
                 max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION, world_size: int = 1, examples: int = 5):
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self._paths = [str(v.path) if isinstance(v, VideoRecord) else str(v) for v in videos]
        if not self._paths:
            raise ValueError("SkipCounter needs the data set's videos (got none)")
        self.max_skip_fraction = max_skip_fraction
        self.videos_per_rank = math.ceil(len(self._paths) / world_size)
        self.examples = examples
        self._failed: set[int] = set()
        self._used: set[int] = set()
        self.num_skip_events = 0

    def update(self, skipped: Tensor, source_index: Tensor | None = None) -> None:
        """Add one batch's reports: `skipped` (B, K) record indices padded with -1, `source_index` (B,) used records.

        Pass the tensors as the loader returns them (on the host).
        """
        failed = skipped[skipped >= 0].tolist()
        self.num_skip_events += len(failed)
        self._failed.update(failed)
        if source_index is not None:
            self._used.update(source_index.reshape(-1).tolist())

    @property
    def num_skipped_videos(self) -> int:
        return len(self._failed)

    @property
    def num_attempted_videos(self) -> int:
        return len(self._failed | self._used)

    @property
    def fraction(self) -> float:
        return self.num_skipped_videos / max(self.num_attempted_videos, self.videos_per_rank)

    def failed_paths(self) -> list[str]:
        return [self._paths[i] for i in sorted(self._failed)]

    def summary(self) -> str:
        """One log line, e.g. 'skipped videos: 2 (3 events), 1.2% of 160 (bound 10.0%)'."""
        return (f"skipped videos: {self.num_skipped_videos} ({self.num_skip_events} events), "
                f"{100 * self.fraction:.1f}% of {max(self.num_attempted_videos, self.videos_per_rank)} "
                f"(bound {100 * self.max_skip_fraction:.1f}%)")

    def check(self) -> None:
        """Raise TooManySkippedVideosError naming the fraction, the bound and some failing files when over it."""
        if self.fraction > self.max_skip_fraction:
            failed = self.failed_paths()
            shown = ", ".join(failed[: self.examples]) + (", ..." if len(failed) > self.examples else "")
            raise TooManySkippedVideosError(
                f"{self.num_skipped_videos} of {max(self.num_attempted_videos, self.videos_per_rank)} videos could "
                f"not be decoded ({100 * self.fraction:.1f}% > max_skip_fraction {100 * self.max_skip_fraction:.1f}%)"
                f"; e.g. {shown}. Fix or remove them from the list, or raise max_skip_fraction.")

    def state_dict(self) -> dict:
        return {"failed": sorted(self._failed), "used": sorted(self._used), "events": self.num_skip_events}

    def load_state_dict(self, state: dict) -> None:
        self._failed = set(int(i) for i in state["failed"])
        self._used = set(int(i) for i in state["used"])
        self.num_skip_events = int(state["events"])
