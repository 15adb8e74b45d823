"""`python -m trackmae_stream.tracks precompute [--config PRESET] [section.key=value ...]` (also under torchrun)."""
from __future__ import annotations

import argparse
import sys

from ..config import PRESET_DIR, load_config
from ..errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trackmae_stream.tracks",
        description="Fill the track store ahead of training (tracker.placement=store). Takes the training config: "
                    "the same preset and overrides as trackmae_stream.train.",
        epilog="presets: " + ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))))
    parser.add_argument("command", choices=["precompute"])
    parser.add_argument("--config", default="default", help="preset name or a YAML file (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from ..distributed import init_distributed, shutdown
        from ..engine import setup_logging
        from .precompute import precompute

        dist = init_distributed(cfg.device)
        setup_logging(dist.is_main)
        try:
            summary = precompute(cfg, dist, progress=not args.no_progress)
        finally:
            shutdown(dist)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if dist.is_main:
        print(f"done: {summary.entries} windows, {summary.tracked} tracked now, {summary.present} already stored, "
              f"{summary.failed} unreadable")
    return 0 if summary.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
