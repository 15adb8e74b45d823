"""Entry point: `torchrun [...] -m trackmae_stream.train [--config PRESET] [section.key=value ...]`.

Also runs as one plain process (`python -m trackmae_stream.train`). With no arguments it trains the embedded default:
a tiny TrackMAE on a synthetic video set generated on first use, on CPU or GPU, with no download and no weights.
"""
from __future__ import annotations

import argparse
import errno
import signal
import sys

from .config import PRESET_DIR, load_config, to_dict
from .errors import UserError

# Failures of the machine rather than of the code (disk full, quota, permissions, read-only file system): the user
# acts on these, so they get one `error:` line; any other OSError keeps its traceback.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


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
    # intermixed: overrides may come before or after the flags (`--print-config log_every=1`)
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"resume={args.resume}")
    try:
        cfg = load_config(args.config, overrides)
    except UserError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from .engine import train

    try:
        summary = train(cfg)
    except UserError as exc:
        # Expected failures with a message that names the file, key or step: no traceback needed.
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        print(f"error: {exc.filename or 'a file of the run'}: {exc.strerror}", file=sys.stderr)
        return 1
    if summary.stopped_by is not None:
        if summary.is_main:
            print(f"stopped: {summary.stopped_by} at step {summary.step}, run folder {summary.run_dir}, checkpoint "
                  f"{summary.last_checkpoint}; continue with --resume auto", file=sys.stderr)
        return 128 + signal.Signals[summary.stopped_by].value  # the shell's code for "ended by this signal"
    if summary.is_main:  # one line per job, not per rank, and the last one
        if cfg.probe_at_end and cfg.data.source == "synthetic" and summary.last_checkpoint is not None:
            from .probe import against_random_init

            print(against_random_init(summary.last_checkpoint, cfg.seed), flush=True)
        print(f"done: step {summary.step}, run folder {summary.run_dir}, checkpoint {summary.last_checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
