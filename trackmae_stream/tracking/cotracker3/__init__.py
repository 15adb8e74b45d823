"""CoTracker3, our own implementation: the offline and online networks, a checkpoint loader, a predictor matching
the official `CoTrackerPredictor` (with options beyond it), the trainer's `PointTracker` adapter and visualisation.

Command line: `python -m trackmae_stream.tracking.cotracker3 VIDEO --weights PATH --grid 14 --out tracks.npz`.
"""
from .checkpoint import (
                         OFFICIAL_CHECKPOINT_URLS,
                         VARIANTS,
                         CheckpointError,
                         build_cotracker3,
                         check_state_dict,
                         file_sha256,
                         load_checkpoint,
                         read_state_dict,
)
from .flops import FlopBreakdown, cotracker3_gflop
from .model import CoTrackerThreeBase, CoTrackerThreeOffline, CoTrackerThreeOnline
from .predictor import CoTracker3Predictor, Prediction, resolve_resolution
from .tracker import CoTracker3Tracker
from .visualize import draw_tracks, save_visualization

__all__ = [
    "CoTrackerThreeBase", "CoTrackerThreeOffline", "CoTrackerThreeOnline",
    "OFFICIAL_CHECKPOINT_URLS", "VARIANTS", "CheckpointError", "build_cotracker3", "check_state_dict", "file_sha256",
    "load_checkpoint", "read_state_dict",
    "CoTracker3Predictor", "Prediction", "resolve_resolution",
    "CoTracker3Tracker",
    "draw_tracks", "save_visualization",
    "FlopBreakdown", "cotracker3_gflop",
]
