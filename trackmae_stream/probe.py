"""Linear probe and k-NN of a frozen encoder on a fixed evaluation split, with 95% intervals over the clips.

  python -m trackmae_stream.probe runs/<run>/checkpoints/checkpoint-00000060.pt            # the run's own data set
  python -m trackmae_stream.probe --random-init --seed 0 --config default                  # the untrained baseline
  python -m trackmae_stream.probe CKPT --train-list train.csv --val-list val.csv --root /data/videos

Protocol (the same for every checkpoint, every run seed and the supervised bound, `trackmae_stream.supervised`):
  - clips: each video's fixed evaluation window (`eval_frame_indices`: the centred num_frames x sampling_rate
    window; the largest centred square, resized to input_size; no random crop, no flip), so a video gives the same
    clip whatever the checkpoint's seed;
  - features: the encoder's output tokens (all tokens, after its final norm) averaged over tokens;
  - linear probe: multinomial logistic regression on features standardised with the training split's statistics,
    fitted full-batch with L-BFGS and weight decay (deterministic);
  - k-NN: the same standardised features, L2-normalised; cosine similarity to the training clips, the k nearest
    (default 20) vote with weights exp(similarity / 0.07) (DINO's weighted k-NN);
  - every accuracy comes with a 95% Wilson score interval for a binomial proportion over the evaluated clips: it
    covers the sampling of clips only, not the spread between training runs or seeds.
On the synthetic set the training and validation lists are the set's own split (`train.list`, `val.list`), the same
for every run on that set. A video that cannot be decoded is excluded, never replaced by another one (a substitute
would count twice, with its own label); the result counts the exclusions per split. A validation split without a
decodable clip of some class the training split has fails (the accuracy would silently change meaning).

`--random-init` probes the architecture untrained, initialised exactly as the trainer initialises it
(`engine.build_model`: VideoMAE's xavier-uniform linears) from `--seed`: the baseline any pretraining must beat.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import load_checkpoint, state_dict_problems
from .config import TrainConfig, config_from_dict, load_config, parse_overrides, to_dict
from .data import VideoDecodeError, VideoRecord, ensure_synthetic_dataset, normalize_clip, open_video, read_video_list
from .data.dataset import FRAME_COUNT_TOLERANCE
from .data.decode import ShortReadError
from .data.synthetic import DEFAULT_TASK
from .data.transforms import CropBox, crop_resize_flip
from .errors import UserError
from .model.adapters import StateDictError, to_native, unwrap_checkpoint
from .model.vit import VideoEncoder

log = logging.getLogger(__name__)

#: z of a two-sided 95% normal interval (scipy.stats.norm.ppf(0.975)).
Z95 = 1.959963984540054
KNN_K = 20
KNN_TEMPERATURE = 0.07
EVAL_WINDOW = "centre"
INTERVAL_NOTE = ("95% Wilson score intervals for a binomial proportion over the evaluated clips (clip sampling only; "
                 "they do not include the spread between training runs or seeds)")


class ProbeError(UserError, ValueError):
    """The probe cannot give a meaningful result: no decodable video in a split, a class missing from the
    validation split, or no lists to probe on."""


# ------------------------------------------------------------------------------------------------ statistics

def wilson_interval(successes: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion `successes / total` (95% for the default z)."""
    if total < 1 or not 0 <= successes <= total:
        raise ValueError(f"need 0 <= successes <= total and total >= 1, got {successes} of {total}")
    p = successes / total
    denominator = 1.0 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Accuracy:
    """Top-1 accuracy over `total` clips with its 95% Wilson interval."""

    correct: int
    total: int

    @property
    def top1(self) -> float:
        return self.correct / self.total

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.total)

    @classmethod
    def of(cls, predicted: Tensor, labels: Tensor) -> Accuracy:
        return cls(correct=int((predicted == labels).sum()), total=len(labels))

    def summary(self) -> dict:
        return {"top1": self.top1, "ci95": list(self.ci95), "correct": self.correct, "total": self.total}

    def __str__(self) -> str:
        low, high = self.ci95
        return f"{self.top1:.1%} [{low:.1%}, {high:.1%}] ({self.correct}/{self.total})"


# ------------------------------------------------------------------------------------------------ classifiers

@dataclass
class ProbeResult:
    top1: float  # validation accuracy of the linear probe
    train_top1: float
    num_train: int
    num_val: int
    num_classes: int
    weight_decay: float
    top1_ci95: tuple[float, float] = (0.0, 1.0)  # Wilson interval over the validation clips
    train_top1_ci95: tuple[float, float] = (0.0, 1.0)
    val_correct: int = 0
    train_correct: int = 0
    knn_top1: float | None = None  # weighted k-NN on the same features (None: not computed)
    knn_top1_ci95: tuple[float, float] | None = None
    knn_correct: int | None = None
    knn_k: int | None = None
    knn_temperature: float | None = None
    num_train_excluded: int = 0  # videos left out because they cannot be decoded
    num_val_excluded: int = 0
    excluded: list[dict[str, str]] = field(default_factory=list)  # {"split", "path", "reason"} per excluded video
    meta: dict = field(default_factory=dict)  # what was probed: checkpoint, random_init, seed, data, clip, model
    head: tuple[Tensor, Tensor, Tensor, Tensor] | None = field(default=None, repr=False, compare=False)
    """(weight (D, C), bias (C,), feature mean, feature std): logits = ((x - mean) / std) @ weight + bias."""

    def summary(self) -> dict:
        """Everything as JSON-ready values (what was probed first), with a note on what the intervals cover."""
        fields_ = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()
                   if k not in ("head", "meta")}
        return {**self.meta, **fields_, "intervals": INTERVAL_NOTE}


def _standardise(train_x: Tensor, *others: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Mean and std (clamped) of the training features in float64, and every tensor standardised with them."""
    mu, sigma = train_x.double().mean(0), train_x.double().std(0).clamp_min(1e-6)
    return mu, sigma, [(x.double() - mu) / sigma for x in (train_x, *others)]


def fit_linear_probe(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, *,
                     weight_decay: float = 1e-3, max_iter: int = 200) -> ProbeResult:
    """Multinomial logistic regression on standardised features (L-BFGS, float64, deterministic)."""
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    mu, sigma, (xs, xv) = _standardise(train_x, val_x)
    weight = torch.zeros(xs.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    # tight tolerances: the objective is convex and float64, so run to its optimum (the result is then unique)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-10, tolerance_change=1e-14)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(xs @ weight + bias, train_y) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        train = Accuracy.of((xs @ weight + bias).argmax(1), train_y)
        val = Accuracy.of((xv @ weight + bias).argmax(1), val_y)
    return ProbeResult(top1=val.top1, train_top1=train.top1, num_train=len(train_y), num_val=len(val_y),
                       num_classes=num_classes, weight_decay=weight_decay, top1_ci95=val.ci95,
                       train_top1_ci95=train.ci95, val_correct=val.correct, train_correct=train.correct,
                       head=(weight.detach(), bias.detach(), mu, sigma))


def knn_predict(train_x: Tensor, train_y: Tensor, query_x: Tensor, *, k: int = KNN_K,
                temperature: float = KNN_TEMPERATURE, num_classes: int | None = None) -> Tensor:
    """Weighted k-NN labels (Q,) of `query_x`: features standardised with the training statistics and L2-normalised,
    the k most cosine-similar training clips (k capped at their number) each vote exp(similarity / temperature)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    num_classes = int(train_y.max()) + 1 if num_classes is None else num_classes
    _, _, (xs, xq) = _standardise(train_x, query_x)
    similarity = F.normalize(xq, dim=1) @ F.normalize(xs, dim=1).T  # (Q, N)
    top, index = similarity.topk(min(k, len(train_y)), dim=1)
    votes = torch.zeros(len(query_x), num_classes, dtype=torch.float64)
    votes.scatter_add_(1, train_y[index], torch.exp(top / temperature))
    return votes.argmax(1)


def evaluate_features(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, *, weight_decay: float = 1e-3,
                      knn_k: int = KNN_K, knn_temperature: float = KNN_TEMPERATURE) -> ProbeResult:
    """Linear probe and weighted k-NN of the same features, each with its Wilson interval."""
    result = fit_linear_probe(train_x, train_y, val_x, val_y, weight_decay=weight_decay)
    knn = Accuracy.of(knn_predict(train_x, train_y, val_x, k=knn_k, temperature=knn_temperature,
                                  num_classes=result.num_classes), val_y)
    return replace(result, knn_top1=knn.top1, knn_top1_ci95=knn.ci95, knn_correct=knn.correct,
                   knn_k=min(knn_k, len(train_y)), knn_temperature=knn_temperature)


# ------------------------------------------------------------------------------------------------ encoders

def build_encoder(cfg: TrainConfig, seed: int | None = None) -> VideoEncoder:
    """The encoder of the model the trainer builds for `cfg` (`engine.build_model`, so the trainer's
    initialisation), drawn from `seed` when given (without touching the global RNG), else from the global RNG.

    The targets are built for their shapes only (`load=False`): a CLIP teacher's weights are not needed for the
    encoder, and the encoder is initialised before the decoders and heads.
    """
    from .engine import build_model  # the trainer's module: imported on use, so the probe's import stays light
    from .targets import TargetBuilder

    if seed is None:
        return build_model(cfg, TargetBuilder(cfg, load=False)).encoder
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(cfg, TargetBuilder(cfg, load=False)).encoder


def load_encoder_state(encoder: VideoEncoder, weights, source: str) -> None:
    """The `encoder.*` part of a checkpoint in any supported layout, strictly."""
    native, _ = to_native(unwrap_checkpoint(weights))
    encoder_sd = {k[len("encoder."):]: v for k, v in native.items() if k.startswith("encoder.")}
    problems = state_dict_problems(encoder.state_dict(), encoder_sd)
    if problems:
        raise StateDictError(f"{source}: the encoder weights do not fit: " + "; ".join(problems))
    encoder.load_state_dict(encoder_sd)


# ------------------------------------------------------------------------------------------------ clips

def eval_frame_indices(num_available: int, num_frames: int, sampling_rate: int) -> np.ndarray:
    """The fixed evaluation window: every `sampling_rate`-th frame of the window centred in the video (first and last
    used frames equally far from the ends, rounded towards the start); a video shorter than the window starts at
    frame 0 and repeats its last strided frame (the training sampler's clamp). int64 (num_frames,)."""
    if num_available < num_frames:
        raise ValueError(f"video has {num_available} frames, fewer than num_frames={num_frames}")
    extent = (num_frames - 1) * sampling_rate + 1
    offset = max(0, (num_available - extent) // 2)
    steps = np.minimum(np.arange(num_frames), (num_available - 1 - offset) // sampling_rate)
    return (offset + steps * sampling_rate).astype(np.int64)


def read_eval_clip(path: str | Path, *, num_frames: int, sampling_rate: int, input_size: int,
                   decoder: str = "opencv") -> np.ndarray:
    """The fixed evaluation clip of a video: `eval_frame_indices`, the largest centred square resized to
    input_size^2. uint8 (num_frames, input_size, input_size, 3); VideoDecodeError when the video cannot be used."""
    try:
        with open_video(path, decoder) as reader:
            available = reader.num_frames
            while True:
                if available < num_frames:
                    raise VideoDecodeError(path, f"too short: {available} frames < num_frames {num_frames}")
                try:
                    frames = reader.read(eval_frame_indices(available, num_frames, sampling_rate))
                    break
                except ShortReadError as error:  # the header overstated the frame count: as the training set does
                    decodable = reader.count_decodable_frames()
                    if decodable >= available or available - decodable > FRAME_COUNT_TOLERANCE:
                        raise VideoDecodeError(path, f"truncated or corrupt: {error.reason}; {decodable} frames "
                                                     "decode") from error
                    available = decodable
        height, width = frames.shape[1:3]
        side = min(height, width)
        return crop_resize_flip(frames, CropBox((width - side) // 2, (height - side) // 2, side, side), input_size)
    except VideoDecodeError:
        raise
    except Exception as error:  # a decoder library's own exception on a strange file is a bad video, as in training
        raise VideoDecodeError(path, f"decoding failed ({type(error).__name__}: {error})") from error


class EvalClips(torch.utils.data.Dataset):
    """Each video's fixed evaluation clip (`read_eval_clip`), or why it cannot be decoded.

    `cache` (a dict the caller keeps, used with in-process loading): decoded clips by (path, clip settings), for
    callers that probe many encoders on the same clips (`trackmae_stream.compare`); the clips do not depend on the
    encoder, so reusing them changes nothing but the time."""

    def __init__(self, records: Sequence[VideoRecord], cfg: TrainConfig, cache: dict | None = None):
        self.records = list(records)
        d = cfg.data
        self.kwargs = dict(num_frames=d.num_frames, sampling_rate=d.sampling_rate, input_size=d.input_size,
                           decoder=d.decoder)
        self.cache = cache

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        key = (str(record.path), tuple(sorted(self.kwargs.items())))
        clip = self.cache.get(key) if self.cache is not None else None
        if clip is None:
            try:
                clip = read_eval_clip(record.path, **self.kwargs)
            except VideoDecodeError as error:  # caught in the worker: the reason travels as data
                return {"index": index, "reason": error.reason}
            if self.cache is not None:
                self.cache[key] = clip
        return {"index": index, "frames": torch.from_numpy(clip)[None],
                "label": torch.tensor([record.label], dtype=torch.int64)}


@torch.no_grad()
def extract_features(encoder: VideoEncoder, loader, device: torch.device, mean: tuple, std: tuple) -> tuple[Tensor,
                                                                                                            Tensor]:
    """Mean-pooled encoder features (N, D) float32 and labels (N,) of every clip the loader yields."""
    encoder.eval()
    feats, labels = [], []
    for batch in loader:
        clip = normalize_clip(batch["frames"].to(device), mean, std)
        feats.append(encoder.forward_video(clip).mean(dim=1).float().cpu())
        labels.append(batch["label"])
    return torch.cat(feats), torch.cat(labels)


def split_features(encoder: VideoEncoder, records: Sequence[VideoRecord], cfg: TrainConfig, split: str, *,
                   batch_size: int = 8, workers: int = 0, device: torch.device | str = "cpu",
                   cache: dict | None = None) -> tuple[Tensor, Tensor, list[dict[str, str]]]:
    """Features and labels of the decodable videos of one split (fixed evaluation clips), and the excluded ones;
    ProbeError when none decodes."""
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(EvalClips(records, cfg, cache if workers == 0 else None),
                                         batch_size=batch_size, num_workers=workers,
                                         collate_fn=list)
    excluded: list[dict[str, str]] = []
    feats, labels = [], []
    for samples in loader:  # per batch, so that the features of one split never hold all its clips
        for sample in samples:
            if "reason" in sample:
                path = str(records[sample["index"]].path)
                excluded.append({"split": split, "path": path, "reason": sample["reason"]})
                log.warning("probe: excluding %s video %s: %s", split, path, sample["reason"])
        good = [sample for sample in samples if "reason" not in sample]
        if good:
            batch = {"frames": torch.cat([g["frames"] for g in good]), "label": torch.cat([g["label"] for g in good])}
            x, y = extract_features(encoder, [batch], device, tuple(cfg.data.mean), tuple(cfg.data.std))
            feats.append(x)
            labels.append(y)
    if not feats:
        name = "validation" if split == "val" else split
        example = f"{excluded[0]['path']}: {excluded[0]['reason']}" if excluded else "the list is empty"
        raise ProbeError(f"none of the {len(records)} {name} videos can be decoded (e.g. {example}); python -m "
                         "trackmae_stream.data.check LIST reports every one")
    return torch.cat(feats), torch.cat(labels), excluded


def check_classes(train_y: Tensor, val_y: Tensor) -> None:
    """ProbeError when a class of the training split has no validation clip (at least one per class)."""
    missing = sorted(set(train_y.tolist()) - set(val_y.tolist()))
    if missing:
        raise ProbeError(f"the validation split has no decodable clip of class(es) {missing} (the training split "
                         "has them): every class needs at least one validation clip (a larger set, or a larger "
                         "val_fraction)")


def probe_encoder(encoder: VideoEncoder, cfg: TrainConfig, train_records: Sequence[VideoRecord],
                  val_records: Sequence[VideoRecord], *, batch_size: int = 8, workers: int = 0,
                  weight_decay: float = 1e-3, knn_k: int = KNN_K, knn_temperature: float = KNN_TEMPERATURE,
                  device: torch.device | str = "cpu", cache: dict | None = None) -> ProbeResult:
    """Linear probe and k-NN of `encoder` (clips as `cfg.data` describes them, fixed windows) on the decodable videos
    of the two lists."""
    dev = torch.device(device)
    encoder = encoder.to(dev)
    common = dict(batch_size=batch_size, workers=workers, device=dev, cache=cache)
    # validation first: a split without one decodable video fails before the longer training split is encoded
    val_x, val_y, val_out = split_features(encoder, val_records, cfg, "val", **common)
    train_x, train_y, train_out = split_features(encoder, train_records, cfg, "train", **common)
    check_classes(train_y, val_y)
    result = evaluate_features(train_x, train_y, val_x, val_y, weight_decay=weight_decay, knn_k=knn_k,
                               knn_temperature=knn_temperature)
    return replace(result, num_train_excluded=len(train_out), num_val_excluded=len(val_out),
                   excluded=train_out + val_out)


# ------------------------------------------------------------------------------------------------ lists

def synthetic_task(cfg: TrainConfig) -> str:
    """The synthetic task a config asks for (`data.synthetic_task` once the config has it; else the default)."""
    return getattr(cfg.data, "synthetic_task", None) or DEFAULT_TASK


def eval_lists(cfg: TrainConfig, *, train_list: str | Path | None = None, val_list: str | Path | None = None,
               root: str | Path | None = None,
               task: str | None = None) -> tuple[list[VideoRecord], list[VideoRecord], str]:
    """The training and validation records to evaluate on, and a description: the given lists, or the config's
    synthetic set (generated on first use) and its own split."""
    if train_list is not None and val_list is not None:
        return read_video_list(train_list, root), read_video_list(val_list, root), f"lists {train_list}, {val_list}"
    if train_list is not None or val_list is not None:
        raise ProbeError("give both --train-list and --val-list (or neither, for the synthetic set's own split)")
    d = cfg.data
    if d.source != "synthetic":
        raise ProbeError("give --train-list and --val-list: the config does not use the synthetic set")
    task = task or synthetic_task(cfg)
    synthetic = ensure_synthetic_dataset(Path(d.synthetic_dir).expanduser() if d.synthetic_dir else None,
                                         num_videos=d.synthetic_videos, size=d.synthetic_size,
                                         num_frames=d.synthetic_frames, task=task)
    return (read_video_list(synthetic.list_file, synthetic.root), read_video_list(synthetic.val_list_file,
                                                                                  synthetic.root),
            f"synthetic set {synthetic.root} (task {task})")


def _merged(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve_config(checkpoint: str | Path | None, config: str | None, overrides: Sequence[str] = ()) -> tuple[
        TrainConfig, dict | None]:
    """The config to evaluate with (the checkpoint's, else the preset `config`) plus `section.key=value` overrides,
    and the checkpoint's state (None without one)."""
    if checkpoint is None:
        return load_config(config or "default", list(overrides)), None
    state = load_checkpoint(checkpoint)
    data = _merged(state["config"], parse_overrides(list(overrides)))
    return config_from_dict(data, check=False), state


def run_probe(checkpoint: str | Path | None, *, train_list: str | None = None, val_list: str | None = None,
              root: str | None = None, random_init: bool = False, seed: int = 0, config: str | None = None,
              overrides: Sequence[str] = (), task: str | None = None, batch_size: int = 8, workers: int = 0,
              weight_decay: float = 1e-3, knn_k: int = KNN_K, device: str = "auto") -> ProbeResult:
    """Probe a checkpoint's encoder (or, with `random_init`, the trainer's initialisation drawn from `seed`; then the
    checkpoint only gives the config, and may be None when `config` names a preset)."""
    if checkpoint is None and not random_init:
        raise ProbeError("give a checkpoint, or --random-init for the untrained baseline")
    cfg, state = resolve_config(checkpoint, config, overrides)
    train_records, val_records, source = eval_lists(cfg, train_list=train_list, val_list=val_list, root=root,
                                                    task=task)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    encoder = build_encoder(cfg, seed=seed)
    if not random_init:
        load_encoder_state(encoder, state["model"], source=str(checkpoint))
    result = probe_encoder(encoder, cfg, train_records, val_records, batch_size=batch_size, workers=workers,
                           weight_decay=weight_decay, knn_k=knn_k, device=dev)
    d = cfg.data
    about = {"checkpoint": None if checkpoint is None else str(checkpoint), "random_init": random_init,
             "seed": seed if random_init else None, "data": source,
             "clip": {"window": EVAL_WINDOW, "num_frames": d.num_frames, "sampling_rate": d.sampling_rate,
                      "input_size": d.input_size},
             "model": {k: v for k, v in to_dict(cfg)["model"].items() if k in ("arch", "embed_dim", "depth",
                                                                                "num_heads", "patch_size",
                                                                                "tubelet_size")}}
    return replace(result, meta=about)


def against_random_init(checkpoint: str | Path, seed: int) -> str:
    """The final encoder against the trainer's random initialisation from `seed`, probed on the same clips: the
    lines `train` prints at the end of a run with probe_at_end."""
    cache: dict = {}  # the random-init probe reuses the decoded evaluation clips
    cfg, state = resolve_config(checkpoint, None)
    train_records, val_records, source = eval_lists(cfg)
    results = {}
    for name, random_init in (("trained", False), ("random init", True)):
        encoder = build_encoder(cfg, seed=seed)
        if not random_init:
            load_encoder_state(encoder, state["model"], source=str(checkpoint))
        results[name] = probe_encoder(encoder, cfg, train_records, val_records, cache=cache)
    trained, baseline = results["trained"], results["random init"]
    chance = 1.0 / trained.num_classes
    lines = [f"probe ({source}, {trained.num_val} validation clips, {trained.num_classes} classes, chance "
             f"{chance:.1%}):"]
    for name, r in results.items():
        lines.append(f"  {name:<12} linear {Accuracy(r.val_correct, r.num_val)}  k-NN "
                     f"{Accuracy(r.knn_correct, r.num_val)}")
    lines.append(f"  trained - random init: linear {100 * (trained.top1 - baseline.top1):+.1f} points, k-NN "
                 f"{100 * (trained.knn_top1 - baseline.knn_top1):+.1f} points [{INTERVAL_NOTE}]")
    return "\n".join(lines)


def format_result(result: ProbeResult, label: str) -> str:
    """Two lines: the linear probe and the k-NN, each with its interval."""
    val, train = Accuracy(result.val_correct, result.num_val), Accuracy(result.train_correct, result.num_train)
    lines = [f"{label} linear probe: top-1 {val} on {result.num_val} validation clips, train {train} "
             f"({result.num_classes} classes, chance {1 / result.num_classes:.1%})"]
    if result.knn_correct is not None:
        knn = Accuracy(result.knn_correct, result.num_val)
        lines.append(f"{label} k-NN (k={result.knn_k}, cosine, weighted): top-1 {knn}")
    lines.append(f"[intervals: {INTERVAL_NOTE}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trackmae_stream.probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", help="a run checkpoint (optional with --random-init)")
    parser.add_argument("--config", help="preset or YAML for --random-init without a checkpoint (default: default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set data.synthetic_videos=4000")
    parser.add_argument("--task", help="synthetic task (default: the config's data.synthetic_task, else motion)")
    parser.add_argument("--train-list")
    parser.add_argument("--val-list")
    parser.add_argument("--root")
    parser.add_argument("--random-init", action="store_true", help="probe the untrained architecture (baseline)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --random-init weights")
    parser.add_argument("--knn-k", type=int, default=KNN_K)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    try:
        result = run_probe(args.checkpoint, train_list=args.train_list, val_list=args.val_list,
                                  root=args.root, random_init=args.random_init, seed=args.seed, config=args.config,
                                  overrides=args.overrides, task=args.task, batch_size=args.batch_size,
                                  workers=args.workers, weight_decay=args.weight_decay, knn_k=args.knn_k,
                                  device=args.device)
    except (UserError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for entry in result.excluded:
        print(f"warning: excluded {entry['split']} video {entry['path']}: {entry['reason']}", file=sys.stderr)
    label = f"random init (seed {args.seed})" if args.random_init else "checkpoint"
    print(format_result(result, label))
    print(f"excluded {result.num_train_excluded} of {result.num_train + result.num_train_excluded} train and "
          f"{result.num_val_excluded} of {result.num_val + result.num_val_excluded} validation videos that do not "
          "decode")
    if args.out:
        Path(args.out).write_text(json.dumps(result.summary(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
