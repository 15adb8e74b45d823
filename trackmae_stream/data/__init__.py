"""Data: VideoMAE-format lists, CPU decoding and augmentation, sharded resumable loading, the synthetic default set.

The GPU (DALI) pipeline lives in `trackmae_stream.data.dali` and is imported from there only, so that this package
imports without DALI installed.
"""
from .dataset import VideoClipDataset
from .decode import DECODERS, DEFAULT_DECODER, VideoDecodeError, open_video, sample_clip_indices
from .lists import VideoListError, VideoRecord, read_video_list
from .loader import PretrainLoader, build_pretrain_loader, collate_clips
from .sampler import ResumableDistributedSampler
from .skips import DEFAULT_MAX_SKIP_FRACTION, SkipCounter, TooManySkippedVideosError
from .synthetic import SyntheticDataset, default_cache_dir, ensure_synthetic_dataset, ground_truth_tracks
from .transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_clip

__all__ = [
    "DECODERS", "DEFAULT_DECODER", "DEFAULT_MAX_SKIP_FRACTION", "IMAGENET_MEAN", "IMAGENET_STD", "PretrainLoader",
    "ResumableDistributedSampler", "SkipCounter", "SyntheticDataset", "TooManySkippedVideosError",
    "VideoClipDataset", "VideoDecodeError", "VideoListError", "VideoRecord", "build_pretrain_loader",
    "collate_clips", "default_cache_dir", "ensure_synthetic_dataset", "ground_truth_tracks", "normalize_clip",
    "open_video", "read_video_list", "sample_clip_indices",
]
