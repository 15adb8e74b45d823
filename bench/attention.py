"""Attention backends at TrackMAE's shapes: xformers memory_efficient_attention vs torch SDPA, forward and
forward+backward, bf16 (numbers.md: nobody has published these; cuDNN SDPA may beat xformers on Hopper).

  python bench/attention.py                 # GPU: decoder (B, 1568, 6, 64) and encoder (B, 160, 12, 64), B = 32
  python bench/attention.py --batch 2       # CPU: SDPA only (xformers has no CPU kernel)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, device_tag, median, print_table, time_fn, write_results  # noqa: E402

from trackmae_stream.model.attention import attention, xformers_available  # noqa: E402

SHAPES = {"decoder 1568x6x64": (1568, 6, 64), "encoder 160x12x64": (160, 12, 64),
          "encoder 320x12x64 (mask 0.8)": (320, 12, 64)}


def build_parser() -> argparse.ArgumentParser:
    """The command line (bench/gpu_check.py --dry-run parses its planned arguments with it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backends = ["sdpa"] + (["xformers"] if device.type == "cuda" and xformers_available() else [])
    if device.type != "cuda":
        print("no CUDA device: SDPA on CPU in float32 only")
    rows = []
    for label, (n, h, d) in SHAPES.items():
        q, k, v = (torch.randn(args.batch, n, h, d, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn_like(q)
        flops = 4 * args.batch * h * n * n * d  # q k^T and attn v
        base = {}
        for backend in backends:
            fwd = median(time_fn(lambda: attention(q, k, v, backend), device, repeats=args.repeats))

            def fwd_bwd():
                out = attention(q, k, v, backend)
                torch.autograd.grad(out, (q, k, v), grad)

            both = median(time_fn(fwd_bwd, device, repeats=args.repeats))
            base.setdefault("fwd", fwd)
            base.setdefault("both", both)
            rows.append({"shape": label, "backend": backend, "fwd_ms": fwd * 1e3, "fwd_bwd_ms": both * 1e3,
                         "fwd_tflops": flops / fwd / 1e12, "fwd_bwd_tflops": 3.5 * flops / both / 1e12,
                         "fwd_bwd_vs_sdpa": base["both"] / both})
    print(f"device: {device_name(device)}, batch {args.batch}, {dtype}")
    print_table(rows, [("shape", "{}"), ("backend", "{}"), ("fwd_ms", "{:.3f}"), ("fwd_bwd_ms", "{:.3f}"),
                       ("fwd_tflops", "{:.1f}"), ("fwd_bwd_tflops", "{:.1f}"), ("fwd_bwd_vs_sdpa", "{:.2f}x")])
    path = write_results({"device": device_name(device), "batch": args.batch, "dtype": str(dtype), "rows": rows},
                         args.out, f"attention_{device_tag(device)}.json")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
