"""A run folder belongs to one run: fresh starts, rotation, --resume auto by identity, stale temporaries, failed
starts, file modes, clean one-line errors, the log after a resume, and SIGTERM / SIGINT (single process and two
ranks under torchrun, resumed bit for bit from the signal's checkpoint)."""
from __future__ import annotations

import json
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_train import SYN, read_log, tiny

from trackmae_stream.checkpoint import load_checkpoint
from trackmae_stream.config import load_config
from trackmae_stream.data import ensure_synthetic_dataset
from trackmae_stream.run_folder import identity_hash, run_identity
from trackmae_stream.train import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "set", **SYN)


def ckpt_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def steps_of(names: list[str]) -> list[int]:
    return [int(n[len("checkpoint-"):-len(".pt")]) for n in names if n.endswith(".pt")]


def test_fresh_start_never_takes_over_another_runs_folder(synthetic, tmp_path, capsys):
    """The issue's command (`for ms in 6 2; ... run_name=myexp ckpt_every=1`): the second, fresh start used to
    write steps 1-2 beside steps 4-6 and rotation deleted them, so `done:` named a file that no longer existed."""
    runs = tmp_path / "runs"
    for max_steps in (6, 2):
        code = main(tiny(synthetic, tmp_path, **{"run_name": "myexp", "optim.max_steps": max_steps, "ckpt_every": 1,
                                                 "keep_checkpoints": 3, "batch_size": 2}))
    out = capsys.readouterr()
    assert code == 1 and "--resume auto" in out.err and "myexp" in out.err and "Traceback" not in out.err
    assert ckpt_names(runs / "myexp") == [f"checkpoint-{s:08d}.pt" for s in (4, 5, 6)]
    assert out.out.count("done:") == 1

    # --resume auto that finds every checkpoint damaged starts fresh in the same folder: the damaged files are
    # renamed aside, and rotation keeps the new run's own checkpoints (the newest always).
    for path in (runs / "myexp" / "checkpoints").glob("*.pt"):
        path.write_bytes(path.read_bytes()[:1000])
    code = main(tiny(synthetic, tmp_path, **{"run_name": "myexp", "optim.max_steps": 5, "ckpt_every": 1,
                                             "keep_checkpoints": 2, "batch_size": 2, "resume": "auto"}))
    out = capsys.readouterr()
    assert code == 0
    names = ckpt_names(runs / "myexp")
    assert [n for n in names if n.endswith(".pt")] == ["checkpoint-00000004.pt", "checkpoint-00000005.pt"]
    assert sum(n.endswith(".damaged") for n in names) == 3
    done = out.out.strip().splitlines()[-1]
    assert done.startswith("done: step 5") and Path(done.rsplit("checkpoint ", 1)[1]).is_file()


def test_resume_auto_takes_only_a_run_with_the_same_identity(synthetic, tmp_path, caplog):
    common = {"optim.max_steps": 2, "ckpt_every": 100}
    first = main(tiny(synthetic, tmp_path, **common))  # ratio 0.75 (default preset, timestamped folder)
    time.sleep(1.1)  # the other run is newer (and gets its own timestamp)
    second = main(tiny(synthetic, tmp_path, **common, **{"mask.ratio": 0.6}))
    assert first == second == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2
    ratio_075, ratio_06 = runs

    caplog.set_level("INFO")
    code = main(tiny(synthetic, tmp_path, **{"optim.max_steps": 3, "ckpt_every": 100, "resume": "auto",
                                             "optim.lr": 2e-3}))
    assert code == 0
    assert sorted((tmp_path / "runs").iterdir()) == runs  # no new folder: it continued the matching run
    assert ckpt_names(ratio_075)[-1] == "checkpoint-00000003.pt" and ckpt_names(ratio_06) == ["checkpoint-00000002.pt"]
    assert f"skipped {ratio_06}: other settings (mask.ratio: 0.6 -> 0.75)" in caplog.text
    resume = [r for r in read_log(ratio_075) if r.get("event") == "resume"][-1]
    # explicit overrides of keys that do not change what the weights mean are allowed, and logged
    assert "optim.lr: 0.003 -> 0.002" in resume["changes"] and "optim.max_steps: 2 -> 3" in resume["changes"]

    # other data: nothing matches, so a new run starts (it does not continue a run trained on other videos)
    other = synthetic.list_file
    code = main(tiny(synthetic, tmp_path, **{"optim.max_steps": 1, "ckpt_every": 100, "resume": "auto",
                                             "data.source": "list", "data.list_file": str(other),
                                             "data.root": str(synthetic.root)}))
    assert code == 0 and len(list((tmp_path / "runs").iterdir())) == 3
    assert "other settings (data.list_file: None ->" in caplog.text

    # with run_name, a mismatch is refused naming the keys, and the run's config.yaml is left alone
    before = (ratio_075 / "config.yaml").read_text()
    assert main(tiny(synthetic, tmp_path, **{"run_name": ratio_075.name, "resume": "auto", "data.input_size": 32,
                                             "optim.max_steps": 4})) == 1
    assert (ratio_075 / "config.yaml").read_text() == before


def test_identity_ignores_speed_and_schedule_keys(synthetic, tmp_path):
    base = load_config("default", tiny(synthetic, tmp_path))
    same = load_config("default", tiny(synthetic, tmp_path, **{"optim.lr": 1e-2, "batch_size": 2, "log_every": 1,
                                                               "tracker.precision": "bf16", "data.num_workers": 3}))
    assert identity_hash(run_identity(base)) == identity_hash(run_identity(same))
    for key, value in (("mask.ratio", 0.8), ("target.motion_norm", "patch"), ("model.depth", 3),
                       ("data.input_size", 32), ("tracker.grid_rule", "naive"), ("target.drop_invisible", True)):
        changed = load_config("default", tiny(synthetic, tmp_path, **{key: value}))
        assert identity_hash(run_identity(changed)) != identity_hash(run_identity(base)), key


def test_stale_temporaries_removed_and_files_follow_umask(synthetic, tmp_path):
    old_mask = os.umask(0o027)
    try:
        assert main(tiny(synthetic, tmp_path, **{"run_name": "modes", "optim.max_steps": 2, "ckpt_every": 1})) == 0
        ckpts = tmp_path / "runs" / "modes" / "checkpoints"
        assert stat.S_IMODE((ckpts / "checkpoint-00000002.pt").stat().st_mode) == 0o640
        stale = ckpts / ".checkpoint-00000003.pt.k1ll3d.tmp"  # what a kill -9 mid-write leaves
        stale.write_bytes(os.urandom(4096))
        assert main(tiny(synthetic, tmp_path, **{"run_name": "modes", "optim.max_steps": 3, "ckpt_every": 1,
                                                 "resume": "auto"})) == 0
        assert not stale.exists() and (ckpts / "checkpoint-00000003.pt").is_file()
    finally:
        os.umask(old_mask)


def test_failed_start_leaves_no_folder_and_errors_are_one_line(synthetic, tmp_path, capsys):
    runs = tmp_path / "runs"
    bad_list = tmp_path / "bad.txt"
    bad_list.write_text(f"{synthetic.list_file.read_text().splitlines()[0]}\nno_label_here.webm x\n")
    assert main(tiny(synthetic, tmp_path, **{"run_name": "failed", "data.source": "list",
                                             "data.list_file": str(bad_list)})) == 1
    assert not (runs / "failed").exists()

    # a tracker checkpoint that is not one (its own error class used to escape as a traceback)
    garbage = tmp_path / "scaled_offline.pth"
    garbage.write_bytes(os.urandom(2048))
    assert main(tiny(synthetic, tmp_path, **{"run_name": "badtracker", "tracker.backend": "cotracker3",
                                             "tracker.checkpoint": str(garbage)})) == 1
    assert not (runs / "badtracker").exists()

    # output_dir that is a file
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("x")
    assert main(tiny(synthetic, tmp_path, **{"output_dir": str(a_file)})) == 1

    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 3, err
    assert str(bad_list) in lines[0] and str(garbage) in lines[1] and "not_a_folder" in lines[2]

    # an override after a flag is taken, not rejected by argparse
    assert main(["--print-config", "log_every=7"]) == 0
    assert "log_every: 7" in capsys.readouterr().out


def test_disk_full_is_one_error_line(synthetic, tmp_path, capsys):
    mount = tmp_path / "tiny_disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root) to fill a disk")
    try:
        code = main(tiny(synthetic, tmp_path, **{"output_dir": str(mount), "run_name": "full", "optim.max_steps": 1,
                                                 "tensorboard": False}))
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err
        line = [x for x in err.splitlines() if x.startswith("error:")][-1]
        assert "checkpoint-00000001.pt" in line and "No space left on device" in line and "MiB free" in line
        assert not list((mount / "full" / "checkpoints").glob(".*.tmp"))  # the failed write cleaned up after itself
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_log_holds_each_step_once_after_a_resume(synthetic, tmp_path):
    args = {"run_name": "relog", "optim.max_steps": 6, "ckpt_every": 4, "log_every": 1}
    assert main(tiny(synthetic, tmp_path, **args)) == 0
    run_dir = tmp_path / "runs" / "relog"
    # as if killed after logging steps 5 and 6 but before checkpoint 6 was written
    (run_dir / "checkpoints" / "checkpoint-00000006.pt").unlink()
    with open(run_dir / "log.jsonl", "a") as fh:
        fh.write('{"step": 6, "loss": 1.0')  # and a line cut short by the kill
    assert main(tiny(synthetic, tmp_path, **args, resume="auto")) == 0
    steps = [r["step"] for r in read_log(run_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def _spawn(args: list[str], *, torchrun: bool = False) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if torchrun:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2",
               "-m", "trackmae_stream.train", *args]
    else:
        cmd = [sys.executable, "-m", "trackmae_stream.train", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = run_dir / "log.jsonl"
        if log.is_file() and any(json.loads(line).get("step", 0) >= step
                                 for line in log.read_text().splitlines() if line.endswith("}")):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def test_sigterm_checkpoints_and_a_second_signal_exits_at_once(synthetic, tmp_path):
    args = tiny(synthetic, tmp_path, **{"run_name": "term", "optim.max_steps": 500, "log_every": 1,
                                        "ckpt_every": 1000})
    proc = _spawn(args)
    _wait_for_step(tmp_path / "runs" / "term", 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-3000:]
    records = read_log(tmp_path / "runs" / "term")
    stopped = records[-1]
    assert stopped["event"] == "stopped" and stopped["signal"] == "SIGTERM" and 2 <= stopped["step"] < 500
    assert Path(stopped["checkpoint"]).name == f"checkpoint-{stopped['step']:08d}.pt"
    assert load_checkpoint(stopped["checkpoint"])["step"] == stopped["step"]
    assert "stopped: SIGTERM" in err and "--resume auto" in err

    # The second signal must arrive after the first was handled (the kernel merges a pending duplicate), while the
    # step still runs: wait for the handler's message, with steps made slow enough (bigger clips and batch).
    slow = {"run_name": "twice", "optim.max_steps": 500, "log_every": 1, "batch_size": 8, "data.input_size": 96,
            "data.num_frames": 16}
    proc = _spawn(tiny(synthetic, tmp_path, **slow))
    _wait_for_step(tmp_path / "runs" / "twice", 2, proc)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    proc.send_signal(signal.SIGINT)
    seen = []
    while not any("SIGINT: finishing the step" in line for line in seen):
        seen.append(lines.get(timeout=60))
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 128 + signal.SIGINT
    time.sleep(0.2)
    while not lines.empty():
        seen.append(lines.get())
    err = "".join(seen)
    assert "again: exiting now" in err and "stopped:" not in err, err[-3000:]


@pytest.mark.slow
def test_sigterm_under_torchrun_resumes_bit_exactly(synthetic, tmp_path):
    """Two CPU ranks: SIGTERM to torchrun reaches both; they agree on the step, write one checkpoint and exit; the
    resumed run ends with the same parameters as a run that was never interrupted."""
    total = 30
    common = {"optim.max_steps": total, "log_every": 1, "ckpt_every": 1000}
    interrupted = _spawn(tiny(synthetic, tmp_path, **common, run_name="interrupted"), torchrun=True)
    _wait_for_step(tmp_path / "runs" / "interrupted", 3, interrupted, timeout=300)
    interrupted.send_signal(signal.SIGTERM)
    _, err = interrupted.communicate(timeout=300)
    records = read_log(tmp_path / "runs" / "interrupted")
    stopped = [r for r in records if r.get("event") == "stopped"]
    assert len(stopped) == 1 and stopped[0]["signal"] == "SIGTERM", err[-3000:]
    step = stopped[0]["step"]
    assert 3 <= step < total, f"the run was not interrupted mid-way (stopped at {step})"
    # torchrun itself reports the signal with a traceback of its own (SignalException); the ranks must not
    assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err, err[-3000:]
    assert err.count("stopped: SIGTERM") == 1

    resumed = _spawn(tiny(synthetic, tmp_path, **common, run_name="interrupted", resume="auto"), torchrun=True)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert out.count("done:") == 1  # one line per job, not per rank
    straight = _spawn(tiny(synthetic, tmp_path, **common, run_name="straight"), torchrun=True)
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err[-3000:]
    a = load_checkpoint(tmp_path / "runs" / "straight" / "checkpoints" / f"checkpoint-{total:08d}.pt")
    b = load_checkpoint(tmp_path / "runs" / "interrupted" / "checkpoints" / f"checkpoint-{total:08d}.pt")
    assert any(r.get("event") == "resume" and r["step"] == step for r in read_log(tmp_path / "runs" / "interrupted"))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["loss_history"][-1] == b["loss_history"][-1]
