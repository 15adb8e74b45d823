"""`python -m trackmae_stream.data.check`: every video of a list probed in parallel, unreadable ones reported."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from test_data_helpers import small_synthetic_set

from trackmae_stream.data import check as check_module
from trackmae_stream.data.check import check_video, main


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    """A folder with good videos, bad ones beside them, and lists of each (paths relative to the folder)."""
    synthetic = small_synthetic_set(tmp_path_factory)
    folder = tmp_path_factory.mktemp("check")
    data = synthetic.videos[0].read_bytes()
    (folder / "zero.webm").write_bytes(b"")
    (folder / "corrupt.webm").write_bytes(bytes(range(256)) * 16)
    (folder / "truncated.webm").write_bytes(data[: len(data) // 2])
    good = [f"{path} {label}\n" for path, label in zip(synthetic.videos[:6], synthetic.labels)]
    bad = ["zero.webm 0\n", "corrupt.webm 1\n", "truncated.webm 2\n", "missing.webm 3\n"]
    (folder / "good.list").write_text("".join(good))
    (folder / "mixed.list").write_text("".join(good[:3] + bad + good[3:]))
    return folder


@pytest.mark.parametrize("decoder", ["opencv", "pyav"])
def test_reports_each_unreadable_video_with_its_reason_and_exits_1(lists, capsys, decoder):
    code = main([str(lists / "mixed.list"), "--workers", "2", "--decoder", decoder])
    out, err = capsys.readouterr()
    assert code == 1, out + err
    assert "checked 10 of 10 videos" in err  # the progress line
    assert "4 of 10 videos are unreadable" in out
    reported = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in out.splitlines() if ": " in line}
    assert set(reported) == {str(lists / name) for name in ("zero.webm", "corrupt.webm", "truncated.webm",
                                                             "missing.webm")}
    assert "missing" in reported[str(lists / "missing.webm")]
    assert "truncated" in reported[str(lists / "truncated.webm")]
    assert "unreadable" in reported[str(lists / "zero.webm")]


def test_all_readable_exits_0_and_root_resolves_relative_paths(lists, tmp_path, capsys):
    assert main([str(lists / "good.list"), "--workers", "2"]) == 0
    assert "all 6 videos are readable" in capsys.readouterr().out
    (tmp_path / "relative.list").write_text("zero.webm 0\n")
    assert main([str(tmp_path / "relative.list"), "--root", str(lists), "--workers", "1"]) == 1
    assert str(lists / "zero.webm") in capsys.readouterr().out


def test_check_video_applies_the_minimum_frame_count(lists):
    video = next(line.split()[0] for line in (lists / "good.list").read_text().splitlines())
    assert check_video(video, "opencv").ok
    short = check_video(video, "opencv", min_frames=1000)
    assert not short.ok and "too short" in short.reason


@pytest.mark.parametrize("args, message", [
    (["nope.list"], "cannot read the video list"),
    (["."], "is a directory, not a video list"),
    (["good.list", "--root", "nope"], "--root nope: folder not found"),
    (["good.list", "--workers", "0"], "--workers must be >= 1"),
])
def test_usage_errors_exit_2_with_one_error_line(lists, monkeypatch, capsys, args, message):
    monkeypatch.chdir(lists)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_runs_as_a_module(lists):
    done = subprocess.run([sys.executable, "-m", "trackmae_stream.data.check", str(lists / "missing.list")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr


def test_a_video_that_crashes_the_decoder_is_reported_and_the_rest_checked(lists, monkeypatch, capsys):
    real = check_module.check_video
    crasher = str(lists / "corrupt.webm")

    def crashing(path, *args, **kwargs):
        if str(path) == crasher:  # as a decoder segfault would: the whole worker process dies
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(check_module, "check_video", crashing)  # forked workers inherit the patch
    code = main([str(lists / "mixed.list"), "--workers", "2"])
    out = capsys.readouterr().out
    assert code == 1 and "4 of 10 videos are unreadable" in out, out
    assert f"{crasher}: the decoder crashed (signal SIGKILL)" in out.splitlines()
