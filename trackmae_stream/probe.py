"""Linear probe of a pretrained encoder: frozen features, a logistic-regression head, top-1 on a held-out list.

  python -m trackmae_stream.probe runs/<run>/checkpoints/checkpoint-00000060.pt            # the run's own data set
  python -m trackmae_stream.probe CKPT --train-list train.csv --val-list val.csv --root /data/videos

Features are the encoder's output tokens (all tokens of a full-frame clip, after its final norm) averaged over
tokens, standardised with the training set's statistics; the head is fitted full-batch with L-BFGS and weight decay,
so the result is deterministic. A video that cannot be decoded is excluded, never replaced by another one (a substitute
would count twice, with its own label); the result counts the exclusions per split, and a probe with no decodable
validation video fails. On the synthetic set the classes are motion directions and rotation senses, so the
probe measures how much motion the encoder represents. `--random-init` probes the same architecture untrained, the
baseline any pretraining must beat.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import load_checkpoint, state_dict_problems
from .config import config_from_dict
from .data import (
    VideoClipDataset,
    VideoDecodeError,
    VideoRecord,
    ensure_synthetic_dataset,
    normalize_clip,
    read_video_list,
)
from .errors import UserError
from .model.adapters import StateDictError, to_native, unwrap_checkpoint
from .model.vit import VideoEncoder

log = logging.getLogger(__name__)


class ProbeError(UserError, ValueError):
    """The probe cannot give a meaningful result: no decodable video in a split, or no lists to probe on."""


@dataclass
class ProbeResult:
    top1: float  # validation accuracy
    train_top1: float
    num_train: int
    num_val: int
    num_classes: int
    weight_decay: float
    num_train_excluded: int = 0  # videos left out because they cannot be decoded
    num_val_excluded: int = 0
    excluded: list[dict[str, str]] = field(default_factory=list)  # {"split", "path", "reason"} per excluded video
    head: tuple[Tensor, Tensor, Tensor, Tensor] | None = field(default=None, repr=False, compare=False)
    """(weight (D, C), bias (C,), feature mean, feature std): logits = ((x - mean) / std) @ weight + bias."""

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "head"}


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


def fit_linear_probe(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, *,
                     weight_decay: float = 1e-3, max_iter: int = 200) -> ProbeResult:
    """Multinomial logistic regression on standardised features (L-BFGS, float64, deterministic)."""
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    mu, sigma = train_x.double().mean(0), train_x.double().std(0).clamp_min(1e-6)
    xs, xv = (train_x.double() - mu) / sigma, (val_x.double() - mu) / sigma
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
        train_top1 = ((xs @ weight + bias).argmax(1) == train_y).double().mean().item()
        top1 = ((xv @ weight + bias).argmax(1) == val_y).double().mean().item()
    return ProbeResult(top1=top1, train_top1=train_top1, num_train=len(train_y), num_val=len(val_y),
                       num_classes=num_classes, weight_decay=weight_decay,
                       head=(weight.detach(), bias.detach(), mu, sigma))


def build_encoder(cfg) -> VideoEncoder:
    """The encoder a config trains (no decoders, no teacher)."""
    m, d = cfg.model, cfg.data
    num_tokens = (d.num_frames // m.tubelet_size) * (d.input_size // m.patch_size) ** 2
    return VideoEncoder(num_tokens=num_tokens, embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
                        mlp_ratio=m.mlp_ratio, patch_size=m.patch_size, tubelet_size=m.tubelet_size, drop_path=0.0)


def load_encoder_state(encoder: VideoEncoder, weights, source: str) -> None:
    """The `encoder.*` part of a checkpoint in any supported layout, strictly."""
    native, _ = to_native(unwrap_checkpoint(weights))
    encoder_sd = {k[len("encoder."):]: v for k, v in native.items() if k.startswith("encoder.")}
    problems = state_dict_problems(encoder.state_dict(), encoder_sd)
    if problems:
        raise StateDictError(f"{source}: the encoder weights do not fit: " + "; ".join(problems))
    encoder.load_state_dict(encoder_sd)


class _ProbeClips(torch.utils.data.Dataset):
    """Each video's deterministic full-frame clip (no multi-scale crop, no flip), or why it cannot be decoded."""

    def __init__(self, records: Sequence[VideoRecord], cfg):
        d = cfg.data
        self.clips = VideoClipDataset(records, num_frames=d.num_frames, sampling_rate=d.sampling_rate,
                                      input_size=d.input_size, scales=(1.0,), flip=False, decoder=d.decoder,
                                      seed=cfg.seed, substitute=False)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict:
        try:
            sample = self.clips[(0, index)]
        except VideoDecodeError as error:  # caught in the worker: the reason travels as data
            return {"index": index, "reason": error.reason}
        return {"index": index, "frames": sample["frames"], "label": sample["label"]}


def _features(encoder: VideoEncoder, records: Sequence[VideoRecord], cfg, split: str, *, batch_size: int,
              workers: int, device: torch.device) -> tuple[Tensor, Tensor, list[dict[str, str]]]:
    """Features and labels of the decodable videos of one split, and the excluded ones; ProbeError when none
    decodes."""
    loader = torch.utils.data.DataLoader(_ProbeClips(records, cfg), batch_size=batch_size, num_workers=workers,
                                         collate_fn=list)
    excluded: list[dict[str, str]] = []

    def decodable_batches():
        for samples in loader:
            for sample in samples:
                if "reason" in sample:
                    path = str(records[sample["index"]].path)
                    excluded.append({"split": split, "path": path, "reason": sample["reason"]})
                    log.warning("probe: excluding %s video %s: %s", split, path, sample["reason"])
            good = [sample for sample in samples if "reason" not in sample]
            if good:
                yield {"frames": torch.cat([g["frames"] for g in good]), "label": torch.cat([g["label"] for g in good])}

    feats, labels = [], []
    for batch in decodable_batches():  # per batch, so that the features of one split never hold all its clips
        x, y = extract_features(encoder, [batch], device, tuple(cfg.data.mean), tuple(cfg.data.std))
        feats.append(x)
        labels.append(y)
    if not feats:
        name = "validation" if split == "val" else split
        example = f"{excluded[0]['path']}: {excluded[0]['reason']}" if excluded else "the list is empty"
        raise ProbeError(f"none of the {len(records)} {name} videos can be decoded (e.g. {example}); python -m "
                         "trackmae_stream.data.check LIST reports every one")
    return torch.cat(feats), torch.cat(labels), excluded


def probe_encoder(encoder: VideoEncoder, cfg, train_records: Sequence[VideoRecord],
                  val_records: Sequence[VideoRecord], *, batch_size: int = 8, workers: int = 0,
                  weight_decay: float = 1e-3, device: torch.device | str = "cpu") -> ProbeResult:
    """Linear probe of `encoder` (clips as `cfg.data` describes them) on the decodable videos of the two lists."""
    dev = torch.device(device)
    encoder = encoder.to(dev)
    common = dict(batch_size=batch_size, workers=workers, device=dev)
    # validation first: a split without one decodable video fails before the longer training split is encoded
    val_x, val_y, val_out = _features(encoder, val_records, cfg, "val", **common)
    train_x, train_y, train_out = _features(encoder, train_records, cfg, "train", **common)
    result = fit_linear_probe(train_x, train_y, val_x, val_y, weight_decay=weight_decay)
    return replace(result, num_train_excluded=len(train_out), num_val_excluded=len(val_out),
                   excluded=train_out + val_out)


def run_probe(checkpoint: str | Path, *, train_list: str | None = None, val_list: str | None = None,
              root: str | None = None, random_init: bool = False, batch_size: int = 8, workers: int = 0,
              weight_decay: float = 1e-3, device: str = "auto") -> ProbeResult:
    state = load_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"], check=False)
    if train_list is None or val_list is None:
        if cfg.data.source != "synthetic":
            raise ProbeError("give --train-list and --val-list: the checkpoint was not trained on the synthetic set")
        synthetic = ensure_synthetic_dataset(Path(cfg.data.synthetic_dir).expanduser() if cfg.data.synthetic_dir
                                             else None, num_videos=cfg.data.synthetic_videos,
                                             size=cfg.data.synthetic_size, num_frames=cfg.data.synthetic_frames)
        train_list, val_list, root = synthetic.list_file, synthetic.val_list_file, synthetic.root
    train_records, val_records = read_video_list(train_list, root), read_video_list(val_list, root)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))

    encoder = build_encoder(cfg)
    if not random_init:
        load_encoder_state(encoder, state["model"], source=str(checkpoint))
    return probe_encoder(encoder, cfg, train_records, val_records, batch_size=batch_size, workers=workers,
                         weight_decay=weight_decay, device=dev)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trackmae_stream.probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--train-list")
    parser.add_argument("--val-list")
    parser.add_argument("--root")
    parser.add_argument("--random-init", action="store_true", help="probe the untrained architecture (baseline)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    try:
        result = run_probe(args.checkpoint, train_list=args.train_list, val_list=args.val_list, root=args.root,
                           random_init=args.random_init, batch_size=args.batch_size, workers=args.workers,
                           weight_decay=args.weight_decay, device=args.device)
    except (UserError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for entry in result.excluded:
        print(f"warning: excluded {entry['split']} video {entry['path']}: {entry['reason']}", file=sys.stderr)
    print(f"linear probe{' (random init)' if args.random_init else ''}: top-1 {result.top1:.1%} on {result.num_val} "
          f"validation clips ({result.num_classes} classes; train top-1 {result.train_top1:.1%} on {result.num_train})"
          f"; excluded {result.num_train_excluded} of {result.num_train + result.num_train_excluded} train and "
          f"{result.num_val_excluded} of {result.num_val + result.num_val_excluded} validation videos that do not "
          "decode")
    if args.out:
        Path(args.out).write_text(json.dumps({"checkpoint": str(args.checkpoint), "random_init": args.random_init,
                                              **result.summary()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
