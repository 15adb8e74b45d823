"""Target and masking kernels: Triton against the torch reference twins (eager and torch.compile).

  python bench/kernels.py                 # GPU: training shapes, B = 32, 16x224^2 clips, 2x16x16 tubelets,
                                          #      14x14 track grid upsampled x2, mask ratio 0.9
  python bench/kernels.py --small         # small shapes (the default without a GPU: numbers are NOT comparable)

Per kernel and variant: median time, achieved GB/s (bytes each kernel must read and write, once) and its share of the
device's measured copy bandwidth (a large device-to-device copy), and the speed-up of Triton over each torch variant.
The masks and the motion targets move kilobytes to a couple of megabytes per batch, so their time is launch latency
and their GB/s says little; the bandwidth goal concerns the pixel kernels and the token gather.
Prints a table and writes JSON (GPU: bench/results/kernels_<gpu>.json; CPU: runs/bench/kernels_cpu.json).
On CPU the Triton variant runs only under TRITON_INTERPRET=1 and then measures the interpreter, not a kernel.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    LOCAL_RESULTS_DIR,
    RESULTS_DIR,
    copy_bandwidth,
    device_name,
    device_tag,
    median,
    print_table,
    time_fn,
    write_results,
)

from trackmae_stream import kernels  # noqa: E402
from trackmae_stream.kernels import _triton as triton_support  # noqa: E402
from trackmae_stream.kernels import gather, masking, motion, pixels  # noqa: E402


@dataclass(frozen=True)
class Shapes:
    batch: int
    frames: int  # video frames per clip; the tracker sees frames / tubelet of them
    size: int  # H = W
    tubelet: int
    patch: int
    grid: int  # track grid side G
    upsample: int
    mask_ratio: float

    @property
    def tokens_side(self) -> int:
        return self.size // self.patch

    @property
    def slots(self) -> int:
        return self.frames // self.tubelet


TRAINING = Shapes(batch=32, frames=16, size=224, tubelet=2, patch=16, grid=14, upsample=2, mask_ratio=0.9)
SMALL = Shapes(batch=2, frames=4, size=32, tubelet=2, patch=8, grid=4, upsample=2, mask_ratio=0.75)


@dataclass
class Case:
    name: str
    run: Callable[[str], object]  # backend -> outputs
    torch_fn: Callable[[], object]  # the bare torch twin call, for torch.compile
    bytes_moved: int


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build_cases(shapes: Shapes, device: torch.device) -> list[Case]:
    gen = torch.Generator().manual_seed(0)
    b, s = shapes.batch, shapes.tokens_side
    tracks = (torch.rand(b, 1, shapes.grid ** 2, 2, generator=gen) * shapes.size
              + torch.randn(b, shapes.slots, shapes.grid ** 2, 2, generator=gen).cumsum(dim=1)).to(device)
    frames = torch.randint(0, 256, (b, shapes.frames, shapes.size, shapes.size, 3), generator=gen,
                           dtype=torch.uint8).to(device)
    patch_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # what the trainer feeds the encoder
    motion_kw = dict(tokens_side=s, upsample=shapes.upsample)
    targets, token_stat = kernels.motion_targets(tracks, backend="torch", **motion_kw)
    mask_kw = dict(num_frames=shapes.slots, mask_ratio=shapes.mask_ratio, rho=0.5, seed=1, step=2, rank=0)
    mask = kernels.motion_aware_mask(token_stat, backend="torch", **mask_kw)
    tube_kw = dict(tokens_per_frame=s * s, num_frames=shapes.slots, mask_ratio=shapes.mask_ratio, seed=1, step=2,
                   device=device)
    pix_kw = dict(tubelet=shapes.tubelet, patch=shapes.patch, layout="BTHWC")
    patches = kernels.gather_patches(frames, mask.visible_idx, out_dtype=patch_dtype, backend="torch", **pix_kw)
    pixel = kernels.pixel_targets(frames, mask.masked_idx, backend="torch", **pix_kw)
    motion_masked = kernels.gather_tokens(targets, mask.masked_idx, backend="torch")
    token_bytes = 3 * shapes.tubelet * shapes.patch ** 2  # uint8 pixels of one tubelet
    return [
        Case("motion_targets", lambda be: kernels.motion_targets(tracks, backend=be, **motion_kw),
             lambda: motion.motion_targets_torch(tracks, **motion_kw), nbytes(tracks, targets, token_stat)),
        Case("motion_aware_mask", lambda be: kernels.motion_aware_mask(token_stat, backend=be, **mask_kw),
             lambda: masking.motion_aware_mask_torch(token_stat, **mask_kw), nbytes(token_stat, *mask)),
        Case("tube_mask", lambda be: kernels.tube_mask(b, backend=be, **tube_kw),
             lambda: masking.tube_mask_torch(b, **tube_kw), nbytes(*mask)),
        Case(f"gather_patches (u8 -> {str(patch_dtype).removeprefix('torch.')})",
             lambda be: kernels.gather_patches(frames, mask.visible_idx, out_dtype=patch_dtype, backend=be, **pix_kw),
             lambda: pixels.gather_patches_torch(frames, mask.visible_idx, out_dtype=patch_dtype, **pix_kw),
             mask.visible_idx.numel() * token_bytes + nbytes(mask.visible_idx, patches)),
        Case("pixel_targets (u8 -> fp32, normalised)",
             lambda be: kernels.pixel_targets(frames, mask.masked_idx, backend=be, **pix_kw),
             lambda: pixels.pixel_targets_torch(frames, mask.masked_idx, **pix_kw),
             mask.masked_idx.numel() * token_bytes + nbytes(mask.masked_idx, pixel)),
        Case("gather_tokens (motion)", lambda be: kernels.gather_tokens(targets, mask.masked_idx, backend=be),
             lambda: gather.gather_tokens_torch(targets, mask.masked_idx), 2 * nbytes(motion_masked)
             + nbytes(mask.masked_idx)),
    ]


def build_parser() -> argparse.ArgumentParser:
    """The command line (bench/gpu_check.py --dry-run parses its planned arguments with it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="small shapes (always on without a GPU)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--out", default=None, help="JSON path")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small or device.type != "cuda"
    shapes = SMALL if small else TRAINING
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    else:  # inductor's background compile workers would otherwise share the few CPU cores with the timings
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
    run_triton = triton_support.HAS_TRITON and (device.type == "cuda" or triton_support.INTERPRETED)
    notes = []
    if small:
        notes.append(f"SMALL shapes {asdict(shapes)}: not the training shapes; numbers are not comparable")
    if device.type != "cuda":
        notes.append("no CUDA device: " + ("Triton runs in the interpreter (CPU emulation, not a kernel timing)"
                                           if run_triton else "Triton skipped (set TRITON_INTERPRET=1 to emulate)"))
    for note in notes:
        print("NOTE:", note)
    repeats = args.repeats if device.type == "cuda" else min(args.repeats, 10)

    bandwidth = copy_bandwidth(device, repeats)
    rows = []
    for case in build_cases(shapes, device):
        variants: dict[str, Callable[[], object]] = {"torch eager": lambda c=case: c.run("torch")}
        if not args.no_compile:
            variants["torch compile"] = torch.compile(case.torch_fn, dynamic=False)
        if run_triton:
            variants["triton"] = lambda c=case: c.run("triton")
        times = {}
        for variant, fn in variants.items():
            try:
                times[variant] = median(time_fn(fn, device, warmup=3, repeats=repeats))
            except Exception as exc:  # a compile failure is a result to report, not a crash
                print(f"{case.name} / {variant}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        for variant, seconds in times.items():
            gbps = case.bytes_moved / seconds / 1e9
            rows.append({
                "kernel": case.name, "variant": variant, "median_ms": seconds * 1e3, "gbps": gbps,
                "pct_copy_bw": 100 * gbps / bandwidth, "bytes": case.bytes_moved,
                "speedup_vs_eager": times["torch eager"] / seconds if "torch eager" in times else None,
                "speedup_vs_compile": times["torch compile"] / seconds if "torch compile" in times else None,
            })

    print(f"device: {device_name(device)}; copy bandwidth {bandwidth:.0f} GB/s; shapes {asdict(shapes)}")
    print_table(rows, [("kernel", "{}"), ("variant", "{}"), ("median_ms", "{:.4f}"), ("gbps", "{:.1f}"),
                       ("pct_copy_bw", "{:.1f}%"), ("speedup_vs_eager", "{:.2f}x"),
                       ("speedup_vs_compile", "{:.2f}x")])
    payload = {"device": device_name(device), "shapes": asdict(shapes), "small": small, "notes": notes,
               "copy_bandwidth_gbps": bandwidth, "triton": run_triton, "rows": rows}
    # bench/results holds GPU measurements only
    path = write_results(payload, args.out, f"kernels_{device_tag(device)}.json",
                         results_dir=RESULTS_DIR if device.type == "cuda" else LOCAL_RESULTS_DIR)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
