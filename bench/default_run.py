"""The README's main job, timed from nothing: `python -m trackmae_stream.train` with an empty cache (so set generation
is included) and a fresh run folder; reports the wall time, the last log record's rel_* values and the probe lines.

  python bench/default_run.py --out bench/results/default_run_cpu.json

What the embedded default promises (issue: "the embedded default shows learning"): every rel_* of the last record
<= 0.9, and the probe of the trained encoder against its random initialisation printed, within 5 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*", help="extra section.key=value overrides")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "TRACKMAE_CACHE_DIR": str(Path(scratch) / "cache")}
        cmd = [sys.executable, "-m", "trackmae_stream.train", f"output_dir={scratch}/runs", "run_name=default",
               "progress=false", *args.overrides]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        records = [json.loads(line) for line in (Path(scratch) / "runs" / "default" / "log.jsonl").read_text()
                   .splitlines()]
    last = [r for r in records if "loss" in r][-1]
    rel = {k: v for k, v in last.items() if k.startswith("rel_")}
    lines = proc.stdout.strip().splitlines()
    probe = lines[next(i for i, line in enumerate(lines) if line.startswith("probe (")):]
    result = {"command": " ".join(["python -m trackmae_stream.train", *args.overrides]), "wall_seconds": seconds,
              "last_step": last["step"], "rel": rel, "all_rel_at_most_0.9": all(v <= 0.9 for v in rel.values()),
              "stdout_tail": probe, "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "machine": platform.processor() or platform.machine()}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
