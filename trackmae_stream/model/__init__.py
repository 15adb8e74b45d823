"""The TrackMAE network, its attention backends and checkpoint-format adapters."""
from .attention import attention, resolve_backend, xformers_available
from .vit import HeadSpec, TrackMAE, TrackMAEShape, count_parameters, describe, forward_flops

__all__ = ["TrackMAE", "TrackMAEShape", "HeadSpec", "attention", "resolve_backend", "xformers_available",
           "forward_flops", "count_parameters", "describe"]
