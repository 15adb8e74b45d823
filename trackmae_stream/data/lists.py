"""VideoMAE-format video lists.

Accepted lines (whitespace-separated; paths therefore cannot contain spaces, as in VideoMAE):
  - `path label`                       VideoMAE / VideoMAE V2 classification lists (label an integer >= -1)
  - `path start_index total_frames`    VideoMAE V2 pretraining lists; only `path 0 -1` (a video file) is accepted,
                                       the label is then -1 (unlabelled). Rawframe folders (total_frames >= 0) are
                                       rejected: this loader decodes video files.
The file is UTF-8 (a leading byte-order mark is dropped). Blank lines and lines starting with `#` are ignored.
Relative paths are resolved against `root` (default: the list file's folder). Parsing never opens the videos (K400
lists have 240k lines).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

UNLABELLED = -1


class VideoListError(UserError, ValueError):
    """A malformed video list; the message names the file and the line."""


@dataclass(frozen=True)
class VideoRecord:
    path: Path
    label: int


def _parse_int(token: str) -> int | None:
    try:
        return int(token)
    except ValueError:
        return None


def parse_video_list_line(line: str) -> tuple[str, int]:
    """(path, label) of one non-blank list line; raises ValueError with the reason when malformed."""
    tokens = line.split()
    if len(tokens) == 2:
        label = _parse_int(tokens[1])
        if label is None or label < UNLABELLED:
            raise ValueError(f"label {tokens[1]!r} is not an integer >= {UNLABELLED}")
        return tokens[0], label
    if len(tokens) == 3:
        start, total = _parse_int(tokens[1]), _parse_int(tokens[2])
        if start is None or total is None:
            raise ValueError(f"expected integers start_index and total_frames, got {tokens[1]!r} {tokens[2]!r}")
        if total >= 0:
            raise ValueError(f"rawframe entry (total_frames={total}) is not supported; video files use "
                             "'path 0 -1'")
        if start != 0:
            raise ValueError(f"start_index must be 0 for a video file ('path 0 -1'), got {start}")
        return tokens[0], UNLABELLED
    raise ValueError(f"expected 'path label' or 'path 0 -1', got {len(tokens)} fields")


def read_video_list(list_file: str | Path, root: str | Path | None = None) -> list[VideoRecord]:
    """Parse a VideoMAE-format list into records; a malformed line raises VideoListError with file:line."""
    list_file = Path(list_file)
    if list_file.is_dir():
        raise VideoListError(f"{list_file}: is a directory, not a video list (give the list file inside it)")
    try:
        # utf-8-sig drops a byte-order mark, which would otherwise become an invisible part of the first path
        text = list_file.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise VideoListError(f"{list_file}: cannot read the video list ({error.strerror or error})") from error
    except UnicodeDecodeError as error:
        raise VideoListError(f"{list_file}: not a UTF-8 text file (byte {error.start}), so not a video list") from None
    base = Path(root) if root is not None else list_file.parent
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            path, label = parse_video_list_line(stripped)
        except ValueError as error:
            raise VideoListError(f"{list_file}:{number}: {error}: {line!r}") from None
        records.append(VideoRecord(path=base / path, label=label))
    if not records:
        raise VideoListError(f"{list_file}: the video list has no entries")
    return records
