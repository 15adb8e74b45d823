"""Track drawing for the CoTracker3 command line: the tracker-independent implementation lives in
`trackmae_stream.tracking.visualize`; these names stay importable from here."""
from __future__ import annotations

from ..visualize import (
    IMAGE_SUFFIXES,
    VIDEO_CODECS,
    draw_tracks,
    image_strip,
    save_visualization,
    track_colors,
    write_video,
)

__all__ = ["IMAGE_SUFFIXES", "VIDEO_CODECS", "draw_tracks", "image_strip", "save_visualization", "track_colors",
           "write_video"]
