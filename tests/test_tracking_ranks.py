"""tracker.placement=ranks: the last ranks of the world decode and track, the others train on the batches they send.

Bit for bit the same as inline preparation (3 CPU ranks under torchrun against 2 inline ranks: the batches each
training rank received, the final parameters, optimizer state and losses); a tracking rank that dies or hangs stops
the training ranks with one clear error line; the wire format itself between two gloo processes.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import link_worker
import pytest
import torch
import torch.multiprocessing as mp
from test_train import SYN, read_log, tiny

from trackmae_stream.checkpoint import load_checkpoint
from trackmae_stream.config import load_config
from trackmae_stream.data import ensure_synthetic_dataset
from trackmae_stream.data_setup import build_data
from trackmae_stream.distributed import DistInfo
from trackmae_stream.pipeline import build_batch_preparer
from trackmae_stream.tracks import remote

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "set", **SYN)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _torchrun(nproc: int, args: list[str], **env: str) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={nproc}", "-m",
           "trackmae_stream.train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_env(**env), cwd=REPO)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_world(nproc: int, args: list[str], **env: str) -> list[subprocess.Popen]:
    """The ranks as plain processes (env:// rendezvous), without torchrun: torchrun ends every rank as soon as one
    fails, which would hide how the training ranks handle it themselves. This is what a multi-node job sees when the
    tracking rank's node fails."""
    port = str(_free_port())
    procs = []
    for rank in range(nproc):
        world = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(nproc),
                     LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc))
        procs.append(subprocess.Popen([sys.executable, "-m", "trackmae_stream.train", *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=_env(**world, **env), cwd=REPO))
    return procs


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_ranks_placement_equals_inline_bit_for_bit(synthetic, tmp_path):
    """1 tracking + 2 training ranks against 2 inline ranks; batch 1 with 3 accumulation steps over 4 batches per
    epoch: every step drops an epoch tail, so the schedule's epoch, tail and accumulation rules are all exercised.
    Checked: (a) the batches each training rank received equal an inline preparation in this process, field by
    field (debug dump, TRACKMAE_REMOTE_DUMP); (b) final parameters, optimizer state and losses are bit-identical."""
    common = {"optim.max_steps": 3, "batch_size": 1, "optim.accum_steps": 3, "log_every": 1, "ckpt_every": 100,
              "tracker.backend": "lucas-kanade"}  # auto would pick synthetic_gt inline but not with ranks
    dump = tmp_path / "dump"
    ranks_args = tiny(synthetic, tmp_path, **common, run_name="ranks", **{"tracker.placement": "ranks"})
    proc = _torchrun(3, ranks_args, **{remote.DUMP_ENV: str(dump)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done:") == 1, proc.stdout  # the main rank only: the tracking rank prints nothing
    inline = _torchrun(2, tiny(synthetic, tmp_path, **common, run_name="inline"))
    assert inline.returncode == 0, inline.stderr[-3000:]

    runs = tmp_path / "runs"
    start = read_log(runs / "ranks")[0]
    assert start["world_size"] == 2 and start["global_batch"] == 6 and start["tracker"] == "lucas-kanade"
    assert "on tracking rank 2" in start["data"]
    a = load_checkpoint(runs / "inline" / "checkpoints" / "checkpoint-00000003.pt")
    b = load_checkpoint(runs / "ranks" / "checkpoints" / "checkpoint-00000003.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a["loss_history"] == b["loss_history"] and len(b["loss_history"]) == 3
    assert len(b["rng"]["per_rank"]) == 2  # training ranks only
    assert [r["skips"] for r in a["rng"]["per_rank"]] == [r["skips"] for r in b["rng"]["per_rank"]]
    assert (runs / "ranks" / "pictures" / "step_0000003.png").is_file()  # frames travel for the pictured step

    # (a) the received batches against inline preparation of the same shards, masks and positions
    cfg = load_config("default", ranks_args)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks: the same reduction order
    try:
        for rank in range(2):
            data = build_data(cfg, DistInfo(rank, 2, 0, CPU), CPU)
            preparer = build_batch_preparer(cfg, CPU, rank=rank)
            # 3 optimizer steps of 3 micro-batches; an epoch's tail of fewer than 3 batches is dropped (the
            # synthetic set's split decides how many steps an epoch holds)
            steps_per_epoch = data.batches_per_epoch // 3
            assert steps_per_epoch >= 1
            batches, epoch_open = None, -1
            for micro in range(9):
                step, within = divmod(micro, 3)
                epoch, b_in_epoch = step // steps_per_epoch, (step % steps_per_epoch) * 3 + within
                if epoch != epoch_open:
                    data.set_position(epoch, 0)
                    batches, epoch_open = iter(data.loader), epoch
                loaded = next(batches)
                expected = preparer(loaded, micro)
                got = torch.load(dump / f"rank{rank}_batch{micro:05d}.pt", weights_only=True)
                assert tuple(got["position"]) == (epoch, b_in_epoch, micro)
                for name, value in expected.tensor_items().items():
                    if name == "frames_u8":  # only the pictured micro-batch (rank 0, the last) carries them
                        pictured = rank == 0 and micro == 8
                        assert _same(got[name], loaded["frames"][:1] if pictured else None), (rank, micro)
                    else:
                        assert _same(got[name], value), (rank, micro, name)
            data.close()
    finally:
        torch.set_num_threads(threads)
    assert len(list(dump.iterdir())) == 18


@pytest.mark.parametrize("failure", ["exit", "hang", pytest.param("error", marks=pytest.mark.slow)])
def test_a_tracking_rank_that_dies_or_hangs_stops_the_job_with_a_clear_error(synthetic, tmp_path, failure):
    """The tracking rank exits after 5 batches (its connections close), stops answering (a 3 s timeout here) or
    fails with an error of its own: both training ranks stop at the same micro-batch with one `error:` line naming
    it (and its message), no traceback, no hang."""
    args = tiny(synthetic, tmp_path, **{"optim.max_steps": 200, "batch_size": 1, "log_every": 1, "ckpt_every": 1000,
                                        "run_name": failure, "tracker.placement": "ranks"})
    procs = _spawn_world(3, args, **{remote.FAIL_HOOK_ENV: f"{failure}:5", remote.TIMEOUT_ENV: "3"})
    t0 = time.monotonic()
    try:
        results = [p.communicate(timeout=90) + (p.returncode,) for p in procs[:2]]
        elapsed = time.monotonic() - t0
    finally:
        if failure == "hang" and procs[2].poll() is None:
            procs[2].send_signal(signal.SIGTERM)  # its hook waits for a signal, as torchrun would send one
        tracking_out, tracking_err = procs[2].communicate(timeout=60)
        for p in procs:
            if p.poll() is None:
                p.kill()
    for out, err, code in results:
        assert code == 1, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, err
        if failure == "error":
            assert lines[0] == "error: tracking rank 2 failed: test hook: the tracking rank fails", lines[0]
        else:
            assert lines[0].startswith("error: tracking rank 2 stopped sending batches ("), lines[0]
            assert lines[0].endswith("check its log"), lines[0]
        if failure == "hang":
            assert "(no batch within 3 s)" in lines[0], lines[0]
        assert "done:" not in out
    assert elapsed < 60
    assert procs[2].returncode == (128 + signal.SIGTERM if failure == "hang" else 1), tracking_err[-2000:]
    steps = [r["step"] for r in read_log(tmp_path / "runs" / failure) if "loss" in r]
    assert steps and max(steps) < 200


@pytest.mark.slow
def test_sigterm_under_ranks_placement_resumes_bit_exactly(synthetic, tmp_path):
    """SIGTERM to torchrun: the training ranks finish the step (the tracking rank keeps serving until their STOP
    word), write one checkpoint and exit; the resumed run (the tracking rank starts where the checkpoint is) ends
    with the parameters of a run that was never interrupted."""
    from test_run_lifecycle import _wait_for_step

    total = 12
    common = {"optim.max_steps": total, "log_every": 1, "ckpt_every": 1000, "batch_size": 1,
              "optim.accum_steps": 3, "tracker.placement": "ranks"}
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=3", "-m",
                "trackmae_stream.train"]

    def start(**extra) -> subprocess.Popen:
        return subprocess.Popen(torchrun + tiny(synthetic, tmp_path, **common, **extra), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)

    interrupted = start(run_name="interrupted")
    _wait_for_step(tmp_path / "runs" / "interrupted", 3, interrupted, timeout=300)
    interrupted.send_signal(signal.SIGTERM)
    _, err = interrupted.communicate(timeout=300)
    stopped = [r for r in read_log(tmp_path / "runs" / "interrupted") if r.get("event") == "stopped"]
    assert len(stopped) == 1 and stopped[0]["signal"] == "SIGTERM", err[-3000:]
    step = stopped[0]["step"]
    assert 3 <= step < total and err.count("stopped: SIGTERM") == 1
    assert all(f"[rank{r}]: Traceback" not in err for r in range(3)), err[-3000:]
    resumed = start(run_name="interrupted", resume="auto")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and out.count("done:") == 1, err[-3000:]
    straight = start(run_name="straight")
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err[-3000:]
    a = load_checkpoint(tmp_path / "runs" / "straight" / "checkpoints" / f"checkpoint-{total:08d}.pt")
    b = load_checkpoint(tmp_path / "runs" / "interrupted" / "checkpoints" / f"checkpoint-{total:08d}.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["loss_history"] == b["loss_history"]


# ----------------------------------------------------------------------------------------------------------------------
# The wire format between two processes


def test_batches_cross_between_two_gloo_processes_bit_exact():
    """Random odd-shaped tensors in bf16, int64, float32, bool and uint8, None fields, the picture frames in one
    batch, several batches in flight at once, then an error header with its text."""
    mp.spawn(link_worker.run, args=(_free_port(),), nprocs=2, join=True)


def test_schedule_follows_the_training_loop():
    """The engine's rule: steps of `accum` batches inside one epoch, the tail dropped, resumable at any step."""
    positions = []
    schedule = remote.Schedule(step=0, epoch=0, batch_in_epoch=0, total_steps=4, batches_per_epoch=5, accum=2)
    assert len(schedule) == 8
    while len(schedule):
        positions.append(schedule.pop())
    assert positions == [(0, 0, 0), (0, 1, 1), (0, 2, 2), (0, 3, 3), (1, 0, 4), (1, 1, 5), (1, 2, 6), (1, 3, 7)]
    resumed = remote.Schedule(step=2, epoch=0, batch_in_epoch=4, total_steps=4, batches_per_epoch=5, accum=2)
    assert [resumed.pop() for _ in range(len(resumed))] == positions[4:]


def test_placement_ranks_needs_enough_ranks(synthetic, tmp_path, capsys):
    from trackmae_stream.train import main

    assert main(tiny(synthetic, tmp_path, **{"tracker.placement": "ranks"})) == 1
    err = capsys.readouterr().err
    assert "error: tracker.tracking_ranks=1" in err and "1 rank(s) in all" in err
