"""trackmae_stream: streaming TrackMAE pretraining (masked video modelling with point-track motion targets)."""

__version__ = "0.1.0"
