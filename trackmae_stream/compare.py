"""Compare pretraining methods on the synthetic motion task with one budget and several seeds.

  python -m trackmae_stream.compare --out bench/results/compare_cpu          # the committed CPU comparison
  python -m trackmae_stream.compare --budget ci --seeds 0 1 --out /tmp/cmp    # the small version CI runs

Every arm pretrains the same encoder on the same synthetic set (the "motion" task: the class is the direction of
travel alone) with the same data, model and step budget (`BUDGETS`) and is evaluated with the probe's protocol
(`trackmae_stream.probe`: the set's fixed validation split, fixed clip windows, linear probe and k-NN on frozen
token-averaged features). Beside the methods, per seed: the random-init encoder (the trainer's initialisation, the
floor any pretraining must beat) and the supervised bound (the same encoder trained on the labels with the same
step budget and batch, `trackmae_stream.supervised`: the ceiling that shows the task can be learned at all).

Arms: every method preset of `METHODS` that exists in the preset folder; a method that reads tracks runs once per
tracker of `--trackers` (default: `synthetic_gt`, the set's exact tracks, and `lucas-kanade`, the weight-free
tracker), so that tracker quality and method are measured apart. What differs between arms is only what the method
preset sets (targets, masking, tracker); `BUDGETS` overrides data, model and optimisation for all of them.

Statistics: for each arm, the mean over seeds with a 95% Student-t interval over seeds (the spread between training
runs, which the per-clip Wilson interval of a single probe does not include), and each arm's paired difference to
the pixel-only baseline (`videomae`), seed by seed on the same validation clips, with its own t interval.

Each finished (arm, seed) is written to `<out>/runs/<arm>/seed<k>.json` as it completes; a rerun with the same
`--out` and budget skips those (an interrupted comparison continues). `<out>/results.json`, `table.md` and
`chart.png` are rewritten from all finished runs at the end, with `command.txt` holding the command line.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import PRESET_DIR, load_config
from .errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    preset: str  # the method's preset (trackmae_stream/configs/<preset>.yaml)
    tracks: bool  # reads tracks: one arm per tracker
    overrides: tuple[str, ...] = ()  # a variant of the preset
    note: str = ""
    # trackers the method cannot use, and why (shown as skipped arms)
    unsupported_trackers: tuple[tuple[str, str], ...] = ()


#: The methods compared, in table order. A method whose preset does not exist is skipped and listed.
METHODS: dict[str, Method] = {
    "videomae": Method("videomae", tracks=False, note="per-patch-normalised pixels, random tube masking"),
    "trackmae": Method("trackmae", tracks=True, note="+ motion from tracks (per-token normalised, the public "
                                                     "code), motion-aware masking"),
    "trackmae_raw_motion": Method("trackmae", tracks=True, overrides=("target.track_motion.norm=none",),
                                  note="trackmae with the motion target in pixels (no per-token normalisation)"),
    "mme": Method("mme", tracks=True, note="MME: trajectory + HOG targets"),
    "motionmae_ref": Method("motionmae_ref", tracks=False, note="MotionMAE reference design: frame differences"),
    "adamae": Method("adamae", tracks=False, note="AdaMAE learned sampler"),
    "tats_ref": Method("tats_ref", tracks=False, note="TATS-style PPO sampler (reference design)"),
}
BASELINE = "videomae"
TRACKERS = ("synthetic_gt", "lucas-kanade")

#: Shared by every arm: the synthetic set, clip, model and optimisation. Measured on 2 CPU cores (README).
BUDGETS: dict[str, dict] = {
    "cpu": {
        # the embedded default's clip, model and optimisation (configs/default.yaml) on a larger set; the masking
        # ratio is fixed for every method: at 64 tokens per clip the papers' 90-95% leave 3-6 visible tokens
        "overrides": ["data.synthetic_videos=1600", "data.synthetic_size=64", "data.synthetic_frames=24",
                      "data.synthetic_task=motion", "data.input_size=64", "data.num_frames=8",
                      "data.sampling_rate=3", "data.num_workers=1", "model.arch=vit_tiny", "batch_size=16",
                      "optim.max_steps=400", "optim.lr=5e-4", "optim.warmup_steps=30", "optim.min_lr=1e-5",
                      "mask.ratio=0.75"],
        "supervised_steps": 400,
    },
    "ci": {
        "overrides": ["data.synthetic_videos=64", "data.synthetic_size=64", "data.synthetic_frames=20",
                      "data.input_size=48", "data.num_frames=8", "data.sampling_rate=2", "data.num_workers=0",
                      "model.embed_dim=48", "model.num_heads=3", "model.depth=2", "model.decoder_dim=32",
                      "model.decoder_heads=2", "model.decoder_depth=1", "batch_size=8", "optim.max_steps=4",
                      "optim.warmup_steps=1"],
        "supervised_steps": 4,
    },
}
_RUN_KEYS = ["log_every=50", "ckpt_every=1000000", "progress=false", "keep_checkpoints=1"]

#: two-sided 95% Student-t critical values by degrees of freedom (scipy.stats.t.ppf(0.975, df))
_T95 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105, 5: 2.570581836, 6: 2.446911851,
        7: 2.364624252, 8: 2.306004135, 9: 2.262157163, 10: 2.228138852}


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% Student-t interval of the mean over `values` (n >= 2; one value: the interval is that value)."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, mean, mean
    crit = _T95.get(len(x) - 1, 1.959963984540054)
    half = crit * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def method_arms(methods: list[str], trackers: list[str]) -> tuple[dict[str, tuple[str, list[str]]], list[str]]:
    """{arm name: (preset, overrides)} for the requested methods that can run, and notes on those that cannot."""
    arms, skipped = {}, []
    for name in methods:
        if name not in METHODS:
            raise UserError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
        method = METHODS[name]
        if not (PRESET_DIR / f"{method.preset}.yaml").exists():
            skipped.append(f"{name}: no preset {method.preset}.yaml in {PRESET_DIR}")
            continue
        preset, overrides = method.preset, list(method.overrides)
        if method.tracks:
            unsupported = dict(method.unsupported_trackers)
            for tracker in trackers:
                if tracker in unsupported:
                    skipped.append(f"{name}[{tracker}]: {unsupported[tracker]}")
                    continue
                arms[f"{name}[{tracker}]"] = (preset, [*overrides, f"tracker.backend={tracker}"])
        else:
            arms[name] = (preset, overrides)
    return arms, skipped


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _probe_summary(result) -> dict:
    return {"linear": result.top1, "linear_ci95": list(result.top1_ci95), "knn": result.knn_top1,
            "knn_ci95": list(result.knn_top1_ci95) if result.knn_top1_ci95 else None, "num_val": result.num_val,
            "num_train": result.num_train, "train_linear": result.train_top1}


class Comparison:
    def __init__(self, out: Path, budget: str, seeds: list[int], extra: list[str]):
        self.out = out
        self.budget = budget
        self.seeds = seeds
        self.shared = [*BUDGETS[budget]["overrides"], *extra, *_RUN_KEYS,
                       f"data.synthetic_dir={out / 'sets'}"]
        self._records = None
        self._clips: dict = {}  # decoded evaluation clips, shared by every probe of the comparison

    def config(self, preset: str, overrides: list[str], seed: int, run_name: str):
        return load_config(preset, [*overrides, *self.shared, f"seed={seed}", f"run_name={run_name}",
                                    f"output_dir={self.out / 'runs'}"])

    def records(self, cfg):
        if self._records is None:
            from .probe import eval_lists

            self._records = eval_lists(cfg)[:2]
        return self._records

    def collect(self) -> list[dict]:
        """Every finished run of this budget in the folder, baselines first, then in METHODS order."""
        found = [json.loads(p.read_text()) for p in sorted((self.out / "runs").glob("*/seed*.json"))]
        found = [r for r in found if r.get("budget") == self.budget and _effective(r.get("shared", [])) ==
                 _effective(self.shared)]
        order = ["random_init", "supervised", *METHODS]
        return sorted(found, key=lambda r: (order.index(r["arm"].split("[")[0]) if r["arm"].split("[")[0] in order
                                            else len(order), r["arm"], r["seed"]))

    def _done(self, arm: str, seed: int) -> dict | None:
        path = self.out / "runs" / arm / f"seed{seed}.json"
        if path.exists():
            data = json.loads(path.read_text())
            if data.get("budget") == self.budget and _effective(data.get("shared", [])) == _effective(self.shared):
                return data
        return None

    def run_method(self, arm: str, preset: str, overrides: list[str], seed: int) -> dict:
        from .checkpoint import load_checkpoint
        from .engine import train
        from .probe import build_encoder, load_encoder_state, probe_encoder

        cfg = self.config(preset, overrides, seed, f"{arm.replace('[', '-').replace(']', '')}-s{seed}")
        start = time.perf_counter()
        summary = train(cfg)
        seconds = time.perf_counter() - start
        last = _last_record(summary.run_dir)
        encoder = build_encoder(cfg, seed=seed)
        load_encoder_state(encoder, load_checkpoint(summary.last_checkpoint)["model"], str(summary.last_checkpoint))
        result = probe_encoder(encoder, cfg, *self.records(cfg), cache=self._clips)
        return {"arm": arm, "preset": preset, "overrides": overrides, "seed": seed, "train_seconds": seconds,
                "steps": summary.step, "final": {k: v for k, v in last.items() if k.startswith(("rel_", "loss"))},
                **_probe_summary(result)}

    def run_random_init(self, seed: int) -> dict:
        from .probe import build_encoder, probe_encoder

        cfg = self.config("default", [], seed, "random-init")
        result = probe_encoder(build_encoder(cfg, seed=seed), cfg, *self.records(cfg), cache=self._clips)
        return {"arm": "random_init", "seed": seed, **_probe_summary(result)}

    def run_supervised(self, seed: int) -> dict:
        from .supervised import train_supervised

        cfg = self.config("default", [], seed, "supervised")
        result = train_supervised(cfg, *self.records(cfg), steps=BUDGETS[self.budget]["supervised_steps"],
                                  batch_size=cfg.batch_size, seed=seed, workers=cfg.data.num_workers)
        probe = result.probe
        return {"arm": "supervised", "seed": seed, "train_seconds": result.seconds, "linear": probe["top1"],
                "linear_ci95": probe["top1_ci95"], "knn": probe["knn_top1"], "knn_ci95": probe["knn_top1_ci95"],
                "head": result.val.top1, "head_train": result.train.top1, "num_val": result.num_val,
                "num_train": result.num_train}

    def jobs(self, arms: dict[str, tuple[str, list[str]]], baselines: bool) -> list[tuple[str, int]]:
        return [(arm, seed) for seed in self.seeds for arm in
                ([*(["random_init", "supervised"] if baselines else []), *arms])]

    def run(self, arms: dict[str, tuple[str, list[str]]], baselines: bool, worker: tuple[int, int] = (0, 1),
            run: bool = True) -> list[dict]:
        """Run (or, with run=False, only collect) the jobs; worker (i, n) runs every n-th job from the i-th."""
        results = []
        jobs = self.jobs(arms, baselines)
        for i, (arm, seed) in enumerate(jobs):
            if i % worker[1] != worker[0]:
                continue
            done = self._done(arm, seed)
            if done is None and not run:
                raise UserError(f"compare: {arm} seed {seed} did not finish (see the worker logs in {self.out})")
            if done is None:
                log.info("compare: [%d/%d] %s seed %d", i + 1, len(jobs), arm, seed)
                if arm == "random_init":
                    done = self.run_random_init(seed)
                elif arm == "supervised":
                    done = self.run_supervised(seed)
                else:
                    done = self.run_method(arm, *arms[arm], seed)
                done.update(budget=self.budget, shared=self.shared)
                _write_json(self.out / "runs" / arm / f"seed{seed}.json", done)
            log.info("compare: %s seed %d: linear %.3f k-NN %.3f", arm, seed, done["linear"], done["knn"])
            results.append(done)
        return results


def _effective(overrides: list[str]) -> dict[str, str]:
    """key -> value of a list of key=value overrides, the last one winning (as the config loader applies them)."""
    return dict(item.split("=", 1) for item in overrides)


def _last_record(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    with_loss = [r for r in records if "loss" in r]
    return with_loss[-1] if with_loss else {}


def aggregate(results: list[dict]) -> dict:
    """Per arm: seeds, mean and 95% t interval of the linear probe and k-NN; paired differences to BASELINE."""
    arms: dict[str, list[dict]] = {}
    for r in results:
        arms.setdefault(r["arm"], []).append(r)
    table = {}
    for arm, runs in arms.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        row = {"seeds": [r["seed"] for r in runs], "num_val": runs[0]["num_val"]}
        for metric in ("linear", "knn"):
            values = [r[metric] for r in runs]
            mean, lo, hi = t_interval(values)
            row[metric] = {"values": values, "mean": mean, "ci95": [lo, hi]}
        if runs[0].get("final"):
            row["final"] = {k: float(np.mean([r["final"][k] for r in runs if k in r.get("final", {})]))
                            for k in runs[0]["final"]}
        if "train_seconds" in runs[0]:
            row["train_seconds"] = float(np.mean([r["train_seconds"] for r in runs]))
        table[arm] = row
    baseline = {r["seed"]: r for r in arms.get(BASELINE, [])}
    for arm, row in table.items():
        if arm == BASELINE or not baseline:
            continue
        for metric in ("linear", "knn"):
            pairs = [(r[metric], baseline[r["seed"]][metric]) for r in sorted(arms[arm], key=lambda r: r["seed"])
                     if r["seed"] in baseline]
            if pairs:
                diffs = [a - b for a, b in pairs]
                mean, lo, hi = t_interval(diffs)
                row[metric][f"minus_{BASELINE}"] = {"values": diffs, "mean": mean, "ci95": [lo, hi]}
    return table


def markdown_table(table: dict, chance: float) -> str:
    lines = ["| arm | seeds | linear probe top-1 (mean, 95% t over seeds) | k-NN top-1 | linear − videomae (paired) "
             "| final rel_* | s/run |", "|---|---|---|---|---|---|---|"]

    def pct(m):
        return f"{100 * m['mean']:.1f} [{100 * m['ci95'][0]:.1f}, {100 * m['ci95'][1]:.1f}]"

    for arm, row in table.items():
        diff = row["linear"].get(f"minus_{BASELINE}")
        final = ", ".join(f"{k[4:]} {v:.3f}" for k, v in row.get("final", {}).items() if k.startswith("rel_"))
        lines.append(f"| {arm} | {len(row['seeds'])} | {pct(row['linear'])} | {pct(row['knn'])} | "
                     f"{pct(diff) if diff else '–'} | {final or '–'} | {row.get('train_seconds', 0):.0f} |")
    lines.append(f"\nchance {100 * chance:.1f}%; validation clips per run: "
                 f"{next(iter(table.values()))['num_val'] if table else 0}")
    return "\n".join(lines) + "\n"


def bar_chart(table: dict, chance: float, path: Path) -> None:
    """Linear-probe and k-NN means with their seed intervals and every seed's value, drawn with OpenCV."""
    import cv2

    from .visuals import write_png

    arms = list(table)
    width, height, left, bottom, top = 140 + 110 * len(arms), 440, 60, 110, 45
    img = np.full((height, width, 3), 255, np.uint8)
    plot_h = height - bottom - top

    def y_of(v: float) -> int:  # intervals of few seeds can pass 0 or 1: drawn clipped to the axis
        return int(round(top + plot_h * (1 - min(max(v, 0.0), 1.0))))

    for tick in np.linspace(0, 1, 6):
        y = y_of(tick)
        cv2.line(img, (left, y), (width - 10, y), (225, 225, 225), 1)
        cv2.putText(img, f"{100 * tick:.0f}", (8, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (60, 60, 60), 1)
    cv2.line(img, (left, y_of(chance)), (width - 10, y_of(chance)), (150, 150, 150), 1, cv2.LINE_AA)
    cv2.putText(img, "chance", (width - 70, y_of(chance) - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (120, 120, 120), 1)
    colours = {"linear": (40, 90, 200), "knn": (230, 140, 40)}
    for i, arm in enumerate(arms):
        x0 = left + 20 + 110 * i
        for j, metric in enumerate(("linear", "knn")):
            m = table[arm][metric]
            xa, xb = x0 + 40 * j, x0 + 40 * j + 34
            cv2.rectangle(img, (xa, y_of(m["mean"])), (xb, y_of(0)), colours[metric], -1)
            xc = (xa + xb) // 2
            cv2.line(img, (xc, y_of(m["ci95"][1])), (xc, y_of(m["ci95"][0])), (0, 0, 0), 1)
            for v in m["values"]:
                cv2.circle(img, (xc, y_of(v)), 2, (0, 0, 0), -1)
        for k, part in enumerate(arm.replace("[", " [").split(" ")):
            cv2.putText(img, part, (x0, height - bottom + 18 + 14 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.38,
                        (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "top-1 % on the fixed validation clips: linear probe (blue), k-NN (orange); bar = mean over "
                "seeds, line = 95% t interval, dots = seeds", (left, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.38,
                (0, 0, 0), 1, cv2.LINE_AA)
    write_png(path, img)


def _run_workers(argv: list[str], out: Path, jobs: int, threads: int) -> None:
    """Start `jobs` worker processes (each runs every jobs-th run, with `threads` torch threads and as many OpenMP
    threads) and wait for all; their output goes to <out>/worker-<i>.log."""
    import subprocess

    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = []
    for index in range(jobs):
        with open(out / f"worker-{index}.log", "w") as log_file:
            procs.append(subprocess.Popen([sys.executable, "-m", "trackmae_stream.compare", *argv,
                                           "--worker", f"{index}/{jobs}"], stdout=log_file,
                                          stderr=subprocess.STDOUT, env=env))
    failed = [i for i, p in enumerate(procs) if p.wait() != 0]
    if failed:
        raise UserError(f"compare: worker(s) {failed} failed; see {out}/worker-<i>.log")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trackmae_stream.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for runs, results.json, table.md, chart.png")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="methods (default: all with a preset)")
    parser.add_argument("--trackers", nargs="+", default=list(TRACKERS), help="trackers for methods that read tracks")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--no-baselines", action="store_true", help="skip random init and the supervised bound")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time, each in its own process with --threads torch threads (default 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: the CPU count divided by --jobs)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "i/n": one of --jobs processes
    parser.add_argument("--collect", action="store_true",
                        help="run nothing: tabulate every finished run of this budget in --out (comparisons "
                             "made by several commands, e.g. with different seeds per method)")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key for every arm (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    try:
        arms, skipped = method_arms(args.methods, args.trackers)
        for note in skipped:
            log.warning("compare: skipped %s", note)
        comparison = Comparison(out, args.budget, args.seeds, args.extra)
        threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))
        if args.worker is not None:  # one of the parallel processes: run its share, report nothing
            import torch

            torch.set_num_threads(threads)
            index, count = (int(v) for v in args.worker.split("/"))
            comparison.run(arms, baselines=not args.no_baselines, worker=(index, count))
            return 0
        if args.jobs > 1:
            _run_workers(argv if argv is not None else sys.argv[1:], out, args.jobs, threads)
        else:
            import torch

            torch.set_num_threads(threads)
        if args.collect:
            results = comparison.collect()
        else:
            results = comparison.run(arms, baselines=not args.no_baselines, run=args.jobs <= 1)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    table = aggregate(results)
    num_classes = len((out / "sets").glob("*/classes.txt").__next__().read_text().split())
    chance = 1.0 / num_classes
    _write_json(out / "results.json", {"budget": args.budget, "shared": comparison.shared, "seeds": args.seeds,
                                       "skipped": skipped, "chance": chance, "arms": table, "runs": results})
    (out / "table.md").write_text(markdown_table(table, chance))
    (out / "command.txt").write_text("python -m trackmae_stream.compare " + " ".join(argv or sys.argv[1:]) + "\n")
    bar_chart(table, chance, out / "chart.png")
    print(markdown_table(table, chance))
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'chart.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
