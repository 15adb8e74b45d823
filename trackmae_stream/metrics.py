"""Run metrics: one JSON object per log interval in `log.jsonl`, TensorBoard scalars, a console line; MFU.

Timing is read on the host. Between log intervals nothing synchronises with the device, so per-step host times are
dispatch times; at a log interval the trainer synchronises once, and the interval's wall time is exact.
"""
from __future__ import annotations

import json
import logging
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("trackmae_stream")

# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s), matched by substring of the device name.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100", 989.0),  # SXM; the PCIe part is lower: set peak_tflops
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 125.0),
    ("V100", 125.0),
)


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value
    return None


def memory_gib(device: torch.device) -> float:
    """Peak device memory (CUDA) or peak resident set size of this process (CPU), GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class IntervalTimer:
    """Host time split into buckets (data wait, batch preparation, train step) over one log interval."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.buckets: dict[str, float] = {}
        self.steps = 0
        self.clips = 0

    def add(self, bucket: str, seconds: float) -> None:
        self.buckets[bucket] = self.buckets.get(bucket, 0.0) + seconds

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (e.g. checkpoint I/O) out of the interval's wall time."""
        self.start += seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class MetricLogger:
    """Writes on rank 0 only; other ranks hold a disabled logger."""

    def __init__(self, run_dir: Path | None, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled and run_dir is not None
        self.jsonl = None
        self.writer = None
        if not self.enabled:
            return
        self.run_dir = Path(run_dir)
        self.tensorboard = tensorboard
        self.jsonl = open(self.run_dir / "log.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def rewind(self, step: int) -> None:
        """Forget what an interrupted attempt logged after `step` (the checkpoint a resume starts from), so that
        log.jsonl and TensorBoard hold each step once: records past it are dropped (rewritten atomically) and
        TensorBoard purges its events past it."""
        if not self.enabled:
            return
        path = self.run_dir / "log.jsonl"
        self.jsonl.close()
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and _record_step(line) <= step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
        self.jsonl = open(path, "a", buffering=1)
        if self.writer is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer.close()
            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=step + 1)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _jsonable(v) for k, v in record.items()}
        self.jsonl.write(json.dumps(clean) + "\n")
        if self.writer is not None:
            step = int(record["step"])
            for key, value in clean.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"train/{key}", value, step)

    def event(self, record: dict[str, Any]) -> None:
        """A one-off record (run start, resume, end) in the same log file."""
        if self.enabled:
            self.jsonl.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()


def _record_step(line: str) -> float:
    """The step of a log.jsonl line: -inf for a record without one (kept), +inf for a line a kill cut short
    (dropped)."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return float("inf")
    return step if isinstance(step, int | float) else float("-inf")


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def format_record(record: dict[str, Any]) -> str:
    parts = [f"step {record['step']}", f"epoch {record['epoch']}"]
    per_target = [(k, "{:.4f}") for k in record if k.startswith("loss_")] + \
        [(k, "{:.3f}") for k in record if k.startswith("rel_")]
    for key, fmt in (("loss", "{:.4f}"), *per_target, ("lr", "{:.2e}"),
                     ("clips_per_s", "{:.1f}"), ("data_wait", "{:.0%}"), ("mfu", "{:.1%}"), ("mem_gib", "{:.2f}"),
                     ("tracker_gflop_per_clip", "{:.1f}"), ("store_hits", "{}"), ("store_misses", "{}")):
        if record.get(key) is not None:
            parts.append(f"{key} " + fmt.format(record[key]))
    if record.get("skipped_videos"):
        parts.append(f"skipped {record['skipped_videos']}")
    return " | ".join(parts)
