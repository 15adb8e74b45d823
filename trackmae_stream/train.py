"""Entry point: `torchrun [...] -m trackmae_stream.train [--config PRESET] [section.key=value ...]`.

Also runs as one plain process (`python -m trackmae_stream.train`). With no arguments it trains the embedded default:
a tiny TrackMAE on a synthetic video set generated on first use, on CPU or GPU, with no download and no weights.
"""
from __future__ import annotations

import argparse
import sys

from .config import PRESET_DIR, ConfigError, load_config, to_dict


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trackmae_stream.train",
        description="TrackMAE pretraining. Overrides are section.key=value pairs, e.g. optim.lr=1e-3 data.flip=true.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets: " + ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))),
    )
    parser.add_argument("--config", default="default", help="preset name or a YAML file (default: %(default)s)")
    parser.add_argument("--resume", default=None, help="'auto' (newest valid checkpoint of the run) or a path")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"resume={args.resume}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from .checkpoint import CheckpointError
    from .data import TooManySkippedVideosError, VideoListError
    from .engine import NonFiniteLossError, train
    from .model.adapters import StateDictError

    try:
        summary = train(cfg)
    except (ConfigError, VideoListError, TooManySkippedVideosError, CheckpointError, StateDictError,
            NonFiniteLossError) as exc:
        # Expected failures with a message that names the file, key or step: no traceback needed.
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"done: step {summary.step}, run folder {summary.run_dir}, checkpoint {summary.last_checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
