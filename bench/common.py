"""Shared helpers for the benchmarks: device description, timing with CUDA events, JSON results."""
from __future__ import annotations

import json
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: For measurements that must not land in bench/results (e.g. CPU runs of GPU benchmarks): runs/ is not committed.
LOCAL_RESULTS_DIR = Path(__file__).resolve().parents[1] / "runs" / "bench"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def device_tag(device: torch.device) -> str:
    """Short file-name tag: cpu, or the GPU model (h100, h200, gh200, a100, l40s ...).

    A GPU outside the known list is named by the first model-like word of its name ("rtx a6000" -> "a6000"), else by
    its whole name as a slug.
    """
    if device.type != "cuda":
        return "cpu"
    return tag_from_name(device_name(device))


def tag_from_name(name: str) -> str:
    """device_tag for a GPU given by its name (as torch.cuda.get_device_name or nvidia-smi print it)."""
    name = name.lower()
    for tag in ("gh200", "h200", "h100", "a100", "l40s", "a10g", "v100"):
        if tag in name:
            return tag
    match = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", name)
    return match.group(1) if match else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, repeats: int = 10) -> list[float]:
    """Per-call seconds (CUDA events on GPU, perf_counter on CPU) after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def copy_bandwidth(device: torch.device, repeats: int, numel: int | None = None) -> float:
    """GB/s of a plain device copy (read + write), the ceiling a memory-bound kernel can reach.

    numel: fp32 elements per buffer; default 1 GiB on CUDA (far beyond L2), 128 MiB on CPU.
    """
    numel = numel or ((1 << 28) if device.type == "cuda" else (1 << 25))
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = median(time_fn(lambda: dst.copy_(src), device, repeats=repeats))
    return 2 * src.numel() * src.element_size() / seconds / 1e9


def write_results(payload: dict, out: str | Path | None, default_name: str, *,
                  results_dir: str | Path = RESULTS_DIR) -> Path:
    """Write `payload` (plus torch version and date) as JSON to `out`, else to results_dir / default_name."""
    path = Path(out) if out else Path(results_dir) / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"torch": torch.__version__, "created": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def print_table(rows: list[dict], columns: list[tuple[str, str] | tuple[str, str, str]]) -> None:
    """columns: (key, format) or (key, format, header) tuples; format like '{:.2f}'; the header defaults to the key.
    A missing or None value prints as '-'."""
    headers = [column[2] if len(column) > 2 else column[0] for column in columns]
    cells = [[column[1].format(r[column[0]]) if r.get(column[0]) is not None else "-" for column in columns]
             for r in rows]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(headers)]  # rows may be []
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))
