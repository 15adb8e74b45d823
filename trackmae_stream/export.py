"""Export a training checkpoint's weights for other code bases.

  python -m trackmae_stream.export runs/<run>/checkpoints/checkpoint-00010000.pt --format videomae --out vitb.pth

`videomae` writes `{"model": state_dict}` with q_bias/v_bias, which VideoMAE's and VideoMAE V2's fine-tuning scripts
load directly (they strip `encoder.`); `trackmae_public` writes the public TrackMAE layout; `native` the weights alone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checkpoint import CheckpointError, atomic_save, load_checkpoint
from .model.adapters import FORMATS, StateDictError, from_native, unwrap_checkpoint


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path) -> Path:
    state = load_checkpoint(checkpoint)
    data, model = state["config"]["data"], state["config"]["model"]
    num_tokens = (data["num_frames"] // model["tubelet_size"]) * (data["input_size"] // model["patch_size"]) ** 2
    weights = from_native(unwrap_checkpoint(state), fmt, num_tokens=num_tokens)
    return atomic_save({"model": weights, "source": str(checkpoint), "format": fmt}, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trackmae_stream.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--format", choices=FORMATS, default="videomae")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        path = export_checkpoint(args.checkpoint, args.format, args.out)
    except (CheckpointError, StateDictError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({args.format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
