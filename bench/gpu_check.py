"""The GPU check: one command, at most 9 minutes, every result under --out (default $OUT).

  python bench/gpu_check.py                            # on the lent H100/H200 (bench/README.md has the exact call)
  python bench/gpu_check.py --dry-run --out /tmp/gc    # here, no GPU: the plan, every step's command checked on CPU
  python bench/gpu_check.py --dali                     # the optional second call: DALI GPU decoding

Steps, most valuable first; each is a subprocess with its own time box (past it, its process group is killed) and the
check goes on after a failure or a timeout: the environment and measured ceilings (bf16 matmul TFLOP/s, copy GB/s); a
CoTracker3 checkpoint with random weights, made on the spot; ViT-B TrackMAE training throughput (16x224², batch 32:
the model-alone phase is the number without tracking) with CoTracker3 at the public settings and at the fast ones
(native, bf16, 4 iterations, CUDA graph), whose overhead ratios are model-alone clips/s over serial clips/s and over
side-stream clips/s; CoTracker3 ms/clip at batch 32; the kernels against eager torch; the attention backends; the
track store read/write throughput (bench/track_store_read.py); `pytest -m "gpu and not slow"` without the compile
cases. The pytest step may also use the time that the steps before it left unused; the whole never passes --budget.

Per step: <step>.log (the command and its output) and <step>.json (status, seconds, return code, command, parsed
results); then summary.json and summary.md (one table, also printed), rewritten after every step so that a run killed
from outside still leaves them. Only 8 files come back from $OUT, so there (--pack auto) the step files are bundled
into gpu_check_<device>.tar.gz beside the two summaries.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (REPO_ROOT, BENCH_DIR):  # the bench helpers, and the project from a source tree (PYTHONPATH=. or not)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
from common import (  # noqa: E402
    LOCAL_RESULTS_DIR,
    copy_bandwidth,
    device_name,
    device_tag,
    median,
    tag_from_name,
    time_fn,
)

BUDGET_S = 540  # the 9 minutes; the device call's timeout_s (580) leaves the rest to the wheel install
STARTUP_S = 10  # this script's own start (torch import) and its summary at the end
KILL_GRACE_S = 3  # SIGTERM, then SIGKILL for the whole process group
MIN_STEP_S = 5  # a step with less time than this left is skipped rather than started
CARRY_LIMIT_MIB = 64  # what one device call carries: the working tree plus the carried folders

SELF = "bench/gpu_check.py"
PRESET = "throughput_vit_b"  # ViT-B, 16 x 224², batch 32
# Every tracker key spelled out, so that a change of the preset's defaults cannot change what is measured.
PUBLIC_TRACKER = {"tracker.backend": "cotracker3", "tracker.resolution": "official", "tracker.precision": "fp32",
                  "tracker.iters": "6", "tracker.compile": "false", "tracker.cuda_graph": "false"}
FAST_TRACKER = {**PUBLIC_TRACKER, "tracker.resolution": "native", "tracker.precision": "bf16", "tracker.iters": "4",
                "tracker.cuda_graph": "true"}
TRACKER_SETTINGS = ("official:fp32:eager:6", "native:fp32:eager:6", "native:bf16:eager:4", "native:bf16:graph:4")
# torch.compile of CoTracker3 takes minutes: the compile cases are deselected; DALI has its own call (--dali).
PYTEST_GPU = ["-m", "gpu and not slow", "-k", "not compile", "--ignore=tests/test_dali_gpu.py"]
PYTEST_COMMON = ["-q", "-rfEs", "-p", "no:cacheprovider"]
TRACK_STORE_SCRIPT = "bench/track_store_read.py"  # the track store's read/write throughput (bench/track_reuse.py,
#                                                    the training-level comparison, needs more than this call's box)
CARRY_MAIN = (".whl", ".ref")
CARRY_DALI = (".whl", ".dali/extra")

PACKAGES = ("triton", "xformers", "timm", "einops", "numpy", "av", "nvidia-dali-cuda130", "nvidia-cuda-runtime-cu12",
            "pytest", "pytest-timeout", "pyyaml", "tqdm", "tensorboard")
IMPORTS = ("triton", "xformers.ops", "cv2", "av", "nvidia.dali")

Keys = Callable[[Any], tuple[str, dict]]


@dataclass
class Step:
    """One subprocess: `python <argv>` from the repository root, killed after `box_s` seconds."""

    name: str
    what: str
    argv: list[str]
    box_s: float
    result: Path | None = None  # what the command writes (JSON, or pytest's JUnit XML), parsed into the record
    needs: tuple[str, ...] = ()  # steps that must have succeeded first
    skip: str | None = None  # planned skip: why the step cannot run at all
    env: dict[str, str] = field(default_factory=dict)
    extend: bool = False  # may also use the time that earlier steps left unused
    info: dict[str, Any] = field(default_factory=dict)  # copied into the record
    check: Callable[[], str] | None = None  # --dry-run: validates the command on CPU, returns a note, raises if bad
    keys: Keys | None = None  # parsed result -> (key numbers for the table, the same numbers for summary.json)

    def command(self) -> str:
        return shlex.join(["python", *self.argv])


# ------------------------------------------------------------------------------------------------------------------
# The steps' own work when they call this script: environment + ceilings, and the random-weight checkpoint.

def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _try_import(module: str) -> str:
    try:
        imported = importlib.import_module(module)
    except Exception as exc:  # an ImportError, or a binary that fails to load (xformers against another torch)
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return f"ok {getattr(imported, '__version__', '')}".strip()


def nvidia_smi(query: str) -> str | None:
    """First GPU's `nvidia-smi --query-gpu=<query>`, None where nvidia-smi is absent or fails."""
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if lines else None


def measure_ceilings(device: torch.device, small: bool = False) -> dict:
    """bf16 matmul TFLOP/s (8192³, cuBLAS) and device-to-device copy GB/s (1 GiB); tiny sizes with `small`."""
    n, warmup, repeats = (256, 1, 3) if small else (8192, 10, 30)
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty_like(a)
    seconds = median(time_fn(lambda: torch.mm(a, b, out=out), device, warmup=warmup, repeats=repeats))
    copy_numel = (1 << 20) if small else None
    return {"bf16_matmul_n": n, "bf16_matmul_ms": seconds * 1e3, "bf16_matmul_tflops": 2 * n ** 3 / seconds / 1e12,
            "copy_gbps": copy_bandwidth(device, repeats, numel=copy_numel),
            "copy_bytes": 4 * (copy_numel or ((1 << 28) if device.type == "cuda" else (1 << 25)))}


def environment(small: bool = False) -> dict:
    """Versions, device, which optional packages import, and the measured ceilings (small sizes without a GPU)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = small or device.type != "cuda"
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "torch": torch.__version__, "cuda": torch.version.cuda, "device": device_name(device),
                            "tag": device_tag(device), "small": small}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2 ** 30, 1), cudnn=torch.backends.cudnn.version(),
                    driver=nvidia_smi("driver_version"))
    info["packages"] = {name: _version(name) for name in PACKAGES}
    info["imports"] = {module: _try_import(module) for module in IMPORTS}
    if "xformers" in sys.modules:  # without its C++ library, xformers routes attention to torch's flash kernels
        info["xformers_cpp_library"] = getattr(sys.modules["xformers"], "_has_cpp_library", None)
    info["env"] = {key: os.environ.get(key) for key in ("TRACKMAE_REFERENCE_DIR", "TRACKMAE_KERNEL_BACKEND",
                                                        "CUDA_VISIBLE_DEVICES", "PYTHONPATH")}
    info["ceilings"] = measure_ceilings(device, small)
    return info


def make_checkpoint(path: Path) -> dict:
    """A CoTracker3 (offline) state_dict with random weights, then loaded back by the trainer's strict loader."""
    from trackmae_stream.tracking.cotracker3 import CoTrackerThreeOffline, build_cotracker3

    torch.manual_seed(0)
    model = CoTrackerThreeOffline()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    build_cotracker3("offline", path)  # keys and shapes must match, as tracker.checkpoint=<path> will require
    return {"path": str(path), "bytes": path.stat().st_size, "parameters": sum(p.numel() for p in model.parameters()),
            "variant": "offline", "weights": "random (torch.manual_seed(0)): speed only, tracks are meaningless"}


# ------------------------------------------------------------------------------------------------------------------
# Key numbers for the summary table.

def env_keys(r: dict) -> tuple[str, dict]:
    c = r["ceilings"]
    numbers = {"bf16_matmul_tflops": round(c["bf16_matmul_tflops"], 1), "copy_gbps": round(c["copy_gbps"], 1)}
    text = (f"{r['device']}; torch {r['torch']} (CUDA {r['cuda']}), triton {r['packages'].get('triton')}, "
            f"xformers {r['imports'].get('xformers.ops')}; bf16 matmul {c['bf16_matmul_tflops']:.0f} TFLOP/s, "
            f"copy {c['copy_gbps']:.0f} GB/s")
    return text, numbers


def checkpoint_keys(r: dict) -> tuple[str, dict]:
    return f"{r['parameters'] / 1e6:.1f} M parameters, {r['bytes'] / 1e6:.0f} MB, loads strictly", {}


def train_keys(r: dict) -> tuple[str, dict]:
    phases = {row["phase"]: row for row in r["phases"]}
    model = phases["model"]["clips_per_s"]
    numbers: dict[str, Any] = {"model_clips_per_s": round(model, 2), "mfu": phases["model"].get("mfu"),
                               "model_tflops": round(r["train_gflop_per_clip"] * model / 1e3, 1)}
    text = f"model alone {model:.1f} clips/s"
    if numbers["mfu"] is not None:
        text += f" (MFU {numbers['mfu']:.1%})"
    text += f", {numbers['model_tflops']:.0f} TFLOP/s"
    for phase, label in (("serial", "overhead_serial"), ("overlapped", "overhead_side_stream")):
        if phase in phases:
            clips = phases[phase]["clips_per_s"]
            numbers[f"{phase}_clips_per_s"] = round(clips, 2)
            numbers[label] = round(model / clips, 3)
    if "overhead_serial" in numbers:
        text += (f"; serial {numbers['serial_clips_per_s']:.1f} clips/s: overhead x{numbers['overhead_serial']:.2f}")
    if "overhead_side_stream" in numbers:
        text += (f"; side stream {numbers['overlapped_clips_per_s']:.1f} clips/s: "
                 f"overhead x{numbers['overhead_side_stream']:.2f}")
    return text, numbers


def tracker_keys(r: dict) -> tuple[str, dict]:
    parts, numbers = [], {}
    for row in r["results"]:
        label = f"{row['resolution']} {row['dtype']} {row['mode']} it{row['iters']} B{row['batch']}"
        if row.get("status") == "ok":
            parts.append(f"{label} {row['ms_per_clip']:.2f} ms/clip")
            numbers[label] = row["ms_per_clip"]
        else:
            parts.append(f"{label} {row.get('status')}")
    return "; ".join(parts), numbers


def kernels_keys(r: dict) -> tuple[str, dict]:
    parts, numbers = [f"copy {r['copy_bandwidth_gbps']:.0f} GB/s"], {}
    for row in r["rows"]:
        if row["variant"] == "triton":
            name = row["kernel"].split()[0]
            speedup = row.get("speedup_vs_eager")
            numbers[name] = {"speedup_vs_eager": speedup, "pct_copy_bw": round(row["pct_copy_bw"], 1)}
            parts.append(f"{name} {speedup:.1f}x eager, {row['pct_copy_bw']:.0f}% bw" if speedup is not None
                         else f"{name} {row['pct_copy_bw']:.0f}% bw")
    if not numbers:
        parts.append("no Triton rows")
    return "; ".join(parts), numbers


def attention_keys(r: dict) -> tuple[str, dict]:
    rows = [row for row in r["rows"] if row["backend"] == "xformers"]
    if not rows:
        return "SDPA rows only (no xformers: not importable, or no CUDA)", {}
    numbers = {row["shape"]: round(row["fwd_bwd_vs_sdpa"], 3) for row in rows}
    text = "xformers vs SDPA fwd+bwd: " + "; ".join(f"{shape} {ratio:.2f}x" for shape, ratio in numbers.items())
    return text, numbers


def pytest_keys(r: dict) -> tuple[str, dict]:
    numbers = {key: r[key] for key in ("passed", "failures", "errors", "skipped")}
    text = f"{r['passed']} passed, {r['failures']} failed, {r['errors']} errors, {r['skipped']} skipped"
    if r["failed_tests"]:
        text += ": " + ", ".join(name.rsplit("::", 1)[-1] for name in r["failed_tests"][:4])
        text += " ..." if len(r["failed_tests"]) > 4 else ""
    return text, numbers


def dali_keys(r: dict) -> tuple[str, dict]:
    numbers = {row["loader"]: round(row["clips_per_s"], 1) for row in r["results"]}
    return "; ".join(f"{loader} {clips:.1f} clips/s" for loader, clips in numbers.items()), numbers


def generic_keys(r: Any) -> tuple[str, dict]:
    """For a result without its own summariser (the track store's, once it exists): its top-level numbers."""
    numbers = {key: value for key, value in r.items() if isinstance(value, (int, float))
               and not isinstance(value, bool)} if isinstance(r, dict) else {}
    return "; ".join(f"{key} {value:.4g}" for key, value in list(numbers.items())[:6]), numbers


def parse_junit(path: Path) -> dict:
    """Counts, failing test ids and skip reasons from pytest's --junitxml file."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {key: sum(int(suite.get(key, 0)) for suite in suites) for key in ("tests", "failures", "errors",
                                                                                 "skipped")}
    failed, skip_reasons = [], {}
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
        skipped = case.find("skipped")
        if skipped is not None:
            reason = skipped.get("message", "")[:200]
            skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    seconds = sum(float(suite.get("time", 0)) for suite in suites)
    return {**counts, "passed": passed, "seconds": seconds, "failed_tests": failed, "skip_reasons": skip_reasons}


def read_result(path: Path) -> Any:
    return parse_junit(path) if path.suffix == ".xml" else json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------------------------
# Dry-run checks: each step's command line, parsed by the script's own parser, plus what can be checked on CPU.

def load_bench(name: str) -> ModuleType:
    """bench/<name>.py as a module (a private name: bench/kernels.py must not shadow the kernels package)."""
    module_name = f"_gpu_check_bench_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up there while the file executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def parse_args(name: str, argv: list[str]) -> argparse.Namespace:
    """argv = [bench/<name>.py, args...], parsed by the script's build_parser(); a usage error raises ValueError."""
    if argv[0] != f"bench/{name}.py":
        raise ValueError(f"expected bench/{name}.py, got {argv[0]}")
    parser = build_parser() if name == "gpu_check" else load_bench(name).build_parser()
    try:
        return parser.parse_args(argv[1:])
    except SystemExit as exc:  # argparse has printed the usage error to stderr
        raise ValueError(f"bench/{name}.py rejects its arguments: {shlex.join(argv[1:])}") from exc


def check_env(argv: list[str]) -> str:
    args = parse_args("gpu_check", argv)
    if args.env_json is None:
        raise ValueError("the env step must pass --env-json")
    info = environment(small=True)
    return (f"measured on CPU at small sizes ({info['ceilings']['bf16_matmul_tflops']:.2f} TFLOP/s, "
            f"{info['ceilings']['copy_gbps']:.1f} GB/s); xformers.ops {info['imports']['xformers.ops']}")


def check_checkpoint(argv: list[str]) -> str:
    args = parse_args("gpu_check", argv)
    info = make_checkpoint(args.make_checkpoint)
    return f"made and loaded back: {checkpoint_keys(info)[0]}"


def check_train(argv: list[str], expected: dict[str, str]) -> str:
    from trackmae_stream.config import load_config
    from trackmae_stream.tracking import resolve_tracker_backend

    args = parse_args("train_throughput", argv)
    cfg = load_config(args.preset, args.overrides)  # checks every key, and that the checkpoint file exists
    shape = (cfg.model.arch, cfg.data.num_frames, cfg.data.input_size, cfg.batch_size)
    if shape != ("vit_base", 16, 224, 32):
        raise ValueError(f"expected ViT-B 16x224² batch 32, the config gives {shape}")
    if resolve_tracker_backend(cfg.tracker) != "cotracker3":
        raise ValueError(f"the tracker resolves to {resolve_tracker_backend(cfg.tracker)}, not cotracker3")
    for key, value in expected.items():
        got = getattr(cfg.tracker, key.split(".", 1)[1])
        if str(got).lower() != value:
            raise ValueError(f"{key}: expected {value}, the config gives {got}")
    t = cfg.tracker
    return (f"ViT-B 16x224² batch 32, {args.steps}+{args.warmup} steps; CoTracker3 {t.resolution} {t.precision} "
            f"{t.iters} iters{' CUDA graph' if t.cuda_graph else ''}")


def check_tracker(argv: list[str]) -> str:
    args = parse_args("tracker", argv)
    if not args.configs:
        raise ValueError("expected --configs")
    return f"{len(args.configs)} settings x batch {args.batch_sizes}"


def check_parse(name: str, argv: list[str]) -> str:
    args = parse_args(name, argv)
    return "arguments parse" + (f" (--out {Path(args.out).name})" if getattr(args, "out", None) else "")


def check_pytest(argv: list[str], env: dict[str, str]) -> str:
    """pytest --collect-only with the step's selection: it must collect tests (none would mean a broken selection)."""
    command = [sys.executable, *argv[:2], "--collect-only", *argv[2:]]
    done = subprocess.run(command, cwd=REPO_ROOT, env=child_env(env), capture_output=True, text=True, timeout=180)
    output = done.stdout + done.stderr
    found = re.search(r"(\d+)(?:/\d+)? tests? collected", output)
    if done.returncode != 0 or not found or int(found.group(1)) == 0:
        raise ValueError(f"pytest collection failed (exit {done.returncode}):\n{output[-2000:]}")
    return f"{found.group(1)} tests collected"


def check_script_help(argv: list[str]) -> str:
    done = subprocess.run([sys.executable, argv[0], "--help"], cwd=REPO_ROOT, env=child_env({}), capture_output=True,
                          text=True, timeout=60)
    if done.returncode != 0:
        raise ValueError(f"{argv[0]} --help exited {done.returncode}:\n{(done.stdout + done.stderr)[-2000:]}")
    return f"{argv[0]} --help works"


def carry_size(carried: tuple[str, ...]) -> str:
    """What a device call would carry from here: the tree (tracked + untracked, not ignored) plus `carried`."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=REPO_ROOT, capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "not measured (no git here)"
    tree = sum((REPO_ROOT / name).stat().st_size for name in listed.decode().split("\0")
               if name and (REPO_ROOT / name).is_file())
    sizes = {name: sum(f.stat().st_size for f in (REPO_ROOT / name).rglob("*") if f.is_file())
             for name in carried if (REPO_ROOT / name).exists()}
    total = tree + sum(sizes.values())
    parts = [f"tree {tree / 2 ** 20:.1f}"] + [f"{name} {size / 2 ** 20:.1f}" for name, size in sizes.items()]
    missing = [name for name in carried if name not in sizes]
    text = " + ".join(parts) + f" = {total / 2 ** 20:.1f} MiB of {CARRY_LIMIT_MIB}"
    text += f" ({', '.join(missing)} not prepared here)" if missing else ""
    if total > CARRY_LIMIT_MIB * 2 ** 20:
        raise ValueError(f"the call would carry {text}: carry less (bench/README.md: the reference subset)")
    return text


# ------------------------------------------------------------------------------------------------------------------
# The plans.

def reference_dir(arg: Path | None) -> Path | None:
    """--ref-dir, else $TRACKMAE_REFERENCE_DIR, else a carried .ref/ in the repository; None: conftest's default."""
    if arg is not None:
        return arg.resolve()
    if os.environ.get("TRACKMAE_REFERENCE_DIR"):
        return Path(os.environ["TRACKMAE_REFERENCE_DIR"]).resolve()
    local = REPO_ROOT / ".ref"
    return local if local.is_dir() else None


def overrides(settings: dict[str, str]) -> list[str]:
    return [f"{key}={value}" for key, value in settings.items()]


def main_plan(raw: Path, scratch: Path, ref_dir: Path | None) -> list[Step]:
    """The main call's steps. raw: where the commands write their results; scratch: the checkpoint's folder."""
    ckpt = scratch / "cotracker3_random.pth"
    steps: list[Step] = []

    def add(step: Step, check: Callable[[], str]) -> None:
        step.check = check
        steps.append(step)

    env = Step("env", "environment; bf16 matmul TFLOP/s and copy GB/s", [SELF, "--env-json", str(raw / "env.json")],
               30, result=raw / "env.json", keys=env_keys)
    add(env, lambda: check_env(env.argv))
    ckpt_step = Step("cotracker3_checkpoint", "CoTracker3 checkpoint with random weights, made here",
                     [SELF, "--make-checkpoint", str(ckpt), "--result", str(raw / "cotracker3_checkpoint.json")], 20,
                     result=raw / "cotracker3_checkpoint.json", keys=checkpoint_keys)
    add(ckpt_step, lambda: check_checkpoint(ckpt_step.argv))
    for name, settings, box, (steps_n, warmup), label in (
            ("train_public", PUBLIC_TRACKER, 110, (10, 3), "public settings (384x512, fp32, 6 iterations)"),
            ("train_fast", FAST_TRACKER, 80, (20, 5), "fast settings (native, bf16, 4 iterations, CUDA graph)")):
        step = Step(name, f"ViT-B TrackMAE clips/s and MFU, CoTracker3 at the {label}",
                    ["bench/train_throughput.py", "--preset", PRESET, "--steps", str(steps_n), "--warmup", str(warmup),
                     "--out", str(raw / f"{name}.json"), f"tracker.checkpoint={ckpt}", *overrides(settings)],
                    box, result=raw / f"{name}.json", needs=("cotracker3_checkpoint",), keys=train_keys)
        add(step, lambda step=step, settings=settings: check_train(step.argv, settings))
    tracker = Step("tracker", "CoTracker3 track_grid ms/clip at batch 32",
                   ["bench/tracker.py", "--batch-sizes", "32", "--configs", *TRACKER_SETTINGS, "--warmup", "2",
                    "--repeats", "5", "--out", str(raw / "tracker.json")], 60, result=raw / "tracker.json",
                   keys=tracker_keys)
    add(tracker, lambda: check_tracker(tracker.argv))
    kernels = Step("kernels", "Triton kernels vs eager torch, % of copy bandwidth",
                   ["bench/kernels.py", "--no-compile", "--out", str(raw / "kernels.json")], 50,
                   result=raw / "kernels.json", keys=kernels_keys)
    add(kernels, lambda: check_parse("kernels", kernels.argv))
    attention = Step("attention", "xformers vs SDPA at TrackMAE's shapes, bf16",
                     ["bench/attention.py", "--out", str(raw / "attention.json")], 30, result=raw / "attention.json",
                     keys=attention_keys)
    add(attention, lambda: check_parse("attention", attention.argv))
    # The track store's own throughput at a size that fits 30 s (measured: 25 s on 2 CPU cores).
    exists = (REPO_ROOT / TRACK_STORE_SCRIPT).is_file()
    store = Step("track_store", "track store read/write throughput (LMDB vs files)",
                 [TRACK_STORE_SCRIPT, "--entries", "4000", "--seconds", "1", "--write-entries", "200",
                  "--cold-reads", "500", "--write-modes", "1x1", "1x32", "--out", str(raw / "track_store.json")],
                 30, result=raw / "track_store.json",
                 skip=None if exists else f"{TRACK_STORE_SCRIPT} does not exist yet (track store issue)")
    add(store, lambda: check_script_help(store.argv))
    env_vars = {"TRACKMAE_REFERENCE_DIR": str(ref_dir)} if ref_dir else {}
    pytest_step = Step("pytest_gpu", 'pytest -m "gpu and not slow" (compile cases and DALI deselected)',
                       ["-m", "pytest", *PYTEST_GPU, *PYTEST_COMMON, f"--junitxml={raw / 'pytest_gpu.xml'}"], 120,
                       result=raw / "pytest_gpu.xml", env=env_vars, extend=True, keys=pytest_keys,
                       info={"reference_dir": str(ref_dir) if ref_dir else "tests/conftest.py default "
                             "(../shared/reference)", "reference_dir_exists": bool(ref_dir and ref_dir.is_dir())})
    add(pytest_step, lambda: check_pytest(pytest_step.argv, env_vars))
    return steps


def dali_plan(raw: Path, scratch: Path, ref_dir: Path | None) -> list[Step]:
    """The optional second call, once the DALI wheel has been reassembled and installed (bench/README.md)."""
    steps = [step for step in main_plan(raw, scratch, ref_dir) if step.name == "env"]
    common = ["--video-size", "224", "--input-size", "224", "--batch-size", "16", "--threads", "8", "--batches", "20",
              "--warmup", "3"]
    for codec, loaders, box in (("h264", ["dali-gpu", "cpu-opencv"], 150),
                                ("vp9", ["dali-gpu", "dali-cpu", "cpu-opencv"], 120)):
        name = f"dali_decode_{codec}"
        step = Step(name, f"DALI GPU decoding vs CPU workers, {codec} 224²",
                    ["bench/dali_decode.py", "--codec", codec, "--loaders", *loaders, *common,
                     "--out", str(raw / f"{name}.json")], box, result=raw / f"{name}.json", keys=dali_keys)
        step.check = lambda step=step: check_parse("dali_decode", step.argv)
        steps.append(step)
    step = Step("pytest_dali", "pytest -m gpu tests/test_dali_gpu.py (NVDEC against FFmpeg)",
                ["-m", "pytest", "-m", "gpu", "tests/test_dali_gpu.py", *PYTEST_COMMON,
                 f"--junitxml={raw / 'pytest_dali.xml'}"], 150, result=raw / "pytest_dali.xml", extend=True,
                keys=pytest_keys)
    step.check = lambda: check_pytest(step.argv, {})
    steps.append(step)
    return steps


def select(steps: list[Step], names: list[str]) -> list[Step]:
    """The named steps and, recursively, the steps they need, in plan order."""
    known = {step.name: step for step in steps}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown step(s) {unknown}; the plan has {list(known)}")
    wanted, stack = set(), list(names)
    while stack:
        name = stack.pop()
        if name not in wanted:
            wanted.add(name)
            stack.extend(known[name].needs)
    return [step for step in steps if step.name in wanted]


def estimate(steps: list[Step]) -> int:
    """Worst case: every time box used, plus this script's own start and summary."""
    return int(STARTUP_S + sum(step.box_s for step in steps))


# ------------------------------------------------------------------------------------------------------------------
# The runner.

def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env["PYTHONUNBUFFERED"] = "1"  # a killed step's log still holds what it printed
    env.update(extra)
    return env


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the step's process group, SIGKILL after a grace period: workers and compilers must not outlive it."""
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def run_command(argv: list[str], log_path: Path, timeout: float, env: dict[str, str]) -> tuple[str, int | None]:
    """Run `argv` in its own process group with output to `log_path`; (ok | failed | timeout, return code)."""
    # Its own process group but the same session: killpg reaches its children, and whoever ends this command (the
    # device tool at its timeout) still ends them too.
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, **group)
        except OSError as exc:
            log.write(f"[gpu_check] could not start: {exc}\n")
            return "failed", None
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            log.write(f"\n[gpu_check] killed after its time box of {timeout:.0f} s\n")
            return "timeout", proc.returncode
        except BaseException:  # SIGTERM/SIGINT of this script: take the step down with it
            _stop(proc)
            raise
        _signal_group(proc.pid, signal.SIGKILL)  # leftovers of a finished step (orphaned workers) free the GPU
    return ("ok" if returncode == 0 else "failed"), returncode


def _log_tail(path: Path, lines: int) -> list[str]:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in text if line.strip()][-lines:]


def run_step(step: Step, work: Path, done: dict[str, dict], deadline: float) -> dict:
    record: dict[str, Any] = {"step": step.name, "what": step.what, "command": step.command(), "box_s": step.box_s,
                              "status": "skipped", "seconds": 0.0, "returncode": None, **step.info}
    failed_needs = [name for name in step.needs if done.get(name, {}).get("status") != "ok"]
    left = deadline - time.monotonic()
    timeout = left if step.extend else min(step.box_s, left)
    if step.skip:
        record["reason"] = step.skip
    elif failed_needs:
        record["reason"] = f"needs {', '.join(failed_needs)}, which did not succeed"
    elif timeout < min(MIN_STEP_S, step.box_s):
        record["reason"] = f"the budget is spent ({max(left, 0):.0f} s left)"
    else:
        record["timeout_s"] = round(timeout, 1)
        log_path = work / f"{step.name}.log"
        started = time.monotonic()
        status, returncode = run_command([sys.executable, *step.argv], log_path, timeout, child_env(step.env))
        record.update(status=status, seconds=round(time.monotonic() - started, 1), returncode=returncode,
                      log=log_path.name)
        if step.result is not None and step.result.is_file():
            try:
                record["results"] = read_result(step.result)
            except Exception as exc:  # a half-written file is a finding, not a crash of the check
                record["result_error"] = f"{type(exc).__name__}: {exc}"
        elif step.result is not None and status == "ok":
            record.update(status="failed", reason=f"exit 0 but no {step.result.name} was written")
        if record["status"] != "ok" and "reason" not in record:
            tail = _log_tail(log_path, 1)
            record["reason"] = (f"time box of {timeout:.0f} s passed" if status == "timeout"
                                else tail[0][:300] if tail else f"exit {returncode}")
    if "results" in record:
        try:
            record["key"], record["numbers"] = (step.keys or generic_keys)(record["results"])
        except Exception as exc:  # a result without the expected fields: say so in the table
            record["key"] = f"(result not summarised: {type(exc).__name__}: {exc})"
    return record


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def summary_markdown(steps: list[Step], records: dict[str, dict], meta: dict) -> str:
    head = f"# GPU check: {meta.get('device', 'unknown device')} ({meta.get('tag', 'unknown')})"
    facts = [meta.get("started", ""), f"plan {meta.get('plan', 'main')}", f"budget {meta.get('budget_s')} s",
             f"elapsed {meta.get('elapsed_s', 0):.0f} s"]
    facts += [f"{key} {meta[key]}" for key in ("torch", "cuda", "triton", "note") if meta.get(key)]
    rows = ["| step | status | s | box s | key numbers |", "|---|---|---:|---:|---|"]
    for step in steps:
        record = records.get(step.name)
        if record is None:
            rows.append(f"| {step.name} | pending | | {step.box_s:.0f} | {_cell(step.what)} |")
            continue
        key = record.get("key") or record.get("reason") or ""
        if record.get("key") and record["status"] != "ok" and record.get("reason"):
            key = f"{record['reason']}; {key}"
        rows.append(f"| {step.name} | {record['status']} | {record['seconds']:.1f} | {step.box_s:.0f} | "
                    f"{_cell(key)} |")
    return "\n".join([head, "", " · ".join(str(fact) for fact in facts if fact), "", *rows]) + "\n"


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _bundle(out: Path, work: Path, tag: str) -> None:
    """Every step file in one tar.gz (only 8 files come back from $OUT); replaced atomically after each step."""
    target = out / f"gpu_check_{tag}.tar.gz"
    for old in out.glob("gpu_check_*.tar.gz"):
        if old != target:
            old.unlink()
    tmp = out / f"gpu_check_{tag}.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(work.iterdir()):
            if path.is_file() and path.suffix in (".json", ".log"):
                tar.add(path, arcname=path.name)
    os.replace(tmp, target)


def run_plan(steps: list[Step], out: Path, *, work: Path | None = None, budget_s: float = BUDGET_S,
             pack: bool = False, meta: dict | None = None, echo: Callable[[str], None] = print) -> list[dict]:
    """Run every step in order within `budget_s`; write <step>.json/.log to `work` (default `out`) and the summaries
    to `out` after each step (plus the bundle with `pack`). Returns the records."""
    work = work or out
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    meta = {"tag": "unknown", "budget_s": budget_s, "started": time.strftime("%Y-%m-%d %H:%M:%S"), **(meta or {})}
    start = time.monotonic()
    deadline = start + budget_s - STARTUP_S
    records: dict[str, dict] = {}
    smi_tried = False
    # A SIGTERM from outside (the device tool's timeout) still takes the running step down (signals: main thread only).
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if main_thread else None
    try:
        for step in steps:
            echo(f"[{time.monotonic() - start:5.0f} s] {step.name}: {step.command()}")
            record = run_step(step, work, records, deadline)
            records[step.name] = record
            if step.name == "env" and isinstance(record.get("results"), dict):
                found = record["results"]
                meta.update({key: found[key] for key in ("device", "tag", "torch", "cuda") if found.get(key)},
                            triton=found.get("packages", {}).get("triton"))
            if meta["tag"] == "unknown" and not smi_tried:  # no env result: the bundle is still named by the GPU
                smi_tried = True
                if name := nvidia_smi("name"):
                    meta.update(device=name, tag=tag_from_name(name))
            _write_json(work / f"{step.name}.json", record)
            meta["elapsed_s"] = time.monotonic() - start
            _write_json(out / "summary.json", {**meta, "steps": list(records.values()),
                                               "pending": [s.name for s in steps if s.name not in records]})
            (out / "summary.md").write_text(summary_markdown(steps, records, meta))
            if pack:
                _bundle(out, work, meta["tag"] or "unknown")
            echo(f"        {record['status']} in {record['seconds']:.1f} s: "
                 f"{record.get('key') or record.get('reason') or ''}")
            if record["status"] in ("failed", "timeout") and record.get("log"):
                for line in _log_tail(work / record["log"], 12):
                    echo(f"        | {line[:200]}")
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return list(records.values())


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# ------------------------------------------------------------------------------------------------------------------

def dry_run(steps: list[Step], out: Path, budget_s: float, carried: tuple[str, ...]) -> int:
    print(f"plan: {len(steps)} steps, {estimate(steps)} s of time boxes (budget {budget_s:.0f} s)")
    for step in steps:
        extra = " (+ unused time)" if step.extend else ""
        print(f"  {step.name:<22} {step.box_s:>4.0f} s{extra}  {step.command()}")
    print("checks (CPU):")
    failures = 0
    checks: list[tuple[str, Callable[[], str] | None, str | None]] = [
        (step.name, step.check, step.skip) for step in steps]
    checks.append(("carry", lambda: carry_size(carried), None))
    for name, check, skip in checks:
        if skip:
            print(f"  skip  {name}: {skip}")
            continue
        started = time.monotonic()
        try:
            note = check() if check else "nothing to check"
        except Exception as exc:
            failures += 1
            print(f"  FAIL  {name}: {type(exc).__name__}: {exc}")
        else:
            print(f"  ok    {name}: {note} ({time.monotonic() - started:.1f} s)")
    if estimate(steps) > budget_s:
        failures += 1
        print(f"  FAIL  budget: the time boxes add up to {estimate(steps)} s > {budget_s:.0f} s")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "plan.json", [{"step": s.name, "command": s.command(), "box_s": s.box_s, "needs": s.needs,
                                     "skip": s.skip, "extend": s.extend} for s in steps])
    if failures:
        print(f"{failures} check(s) failed")
    print(f"estimated total: {estimate(steps)} s")
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default $OUT, else runs/bench/gpu_check-<time>)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check every step on CPU")
    parser.add_argument("--dali", action="store_true", help="the DALI call's steps instead of the main ones")
    parser.add_argument("--steps", nargs="+", default=None, metavar="STEP",
                        help="only these steps (and the steps they need)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run (default 540)")
    parser.add_argument("--ref-dir", type=Path, default=None,
                        help="reference vectors for pytest (default $TRACKMAE_REFERENCE_DIR, else .ref/ if present)")
    parser.add_argument("--pack", choices=("auto", "yes", "no"), default="auto",
                        help="bundle the step files into one tar.gz (auto: when writing to $OUT)")
    parser.add_argument("--note", default=None, help="free text for the summary (e.g. the commit)")
    internal = parser.add_argument_group("the steps' own commands")
    internal.add_argument("--env-json", type=Path, default=None, metavar="JSON",
                          help="write the environment and ceilings to JSON and exit")
    internal.add_argument("--make-checkpoint", type=Path, default=None, metavar="PTH",
                          help="write a random-weight CoTracker3 checkpoint, load it back, and exit")
    internal.add_argument("--result", type=Path, default=None, metavar="JSON",
                          help="with --make-checkpoint: where to describe it")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.env_json is not None:
        info = environment()
        _write_json(args.env_json, info)
        print(json.dumps(info, indent=2, default=str))
        return 0
    if args.make_checkpoint is not None:
        info = make_checkpoint(args.make_checkpoint)
        if args.result:
            _write_json(args.result, info)
        print(json.dumps(info, indent=2))
        return 0

    out_env = os.environ.get("OUT")
    out = args.out or (Path(out_env) if out_env else LOCAL_RESULTS_DIR / f"gpu_check-{time.strftime('%Y%m%d-%H%M%S')}")
    pack = args.pack == "yes" or (args.pack == "auto" and bool(out_env) and out.resolve() == Path(out_env).resolve())
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    raw = scratch / "raw"
    raw.mkdir()
    plan = dali_plan if args.dali else main_plan
    steps = plan(raw, scratch, reference_dir(args.ref_dir))
    try:
        if args.steps:
            steps = select(steps, args.steps)
        if args.dry_run:
            return dry_run(steps, out, args.budget, CARRY_DALI if args.dali else CARRY_MAIN)
        meta = {"plan": "dali" if args.dali else "main", "note": args.note, "argv": sys.argv}
        records = run_plan(steps, out, work=scratch / "steps" if pack else out, budget_s=args.budget, pack=pack,
                           meta=meta)
        print()
        print((out / "summary.md").read_text(), end="")
        print(f"results: {out}" + (" (step files in the tar.gz)" if pack else ""))
        return 0 if all(record["status"] in ("ok", "skipped") for record in records) else 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
