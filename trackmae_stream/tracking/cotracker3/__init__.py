"""CoTracker3, our own implementation (offline and online models, checkpoint loader, predictor, trainer adapter)."""
from .model import CoTrackerThreeBase, CoTrackerThreeOffline, CoTrackerThreeOnline

__all__ = ["CoTrackerThreeBase", "CoTrackerThreeOffline", "CoTrackerThreeOnline"]
