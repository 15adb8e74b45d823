"""VideoMAE-format list parsing."""
from __future__ import annotations

import pytest

from trackmae_stream.data import VideoListError, VideoRecord, read_video_list


def test_both_formats_comments_blank_lines_and_path_resolution(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    absolute = tmp_path / "elsewhere" / "abs.mp4"
    (lists / "train.txt").write_text(
        "# comment line\n"
        "k400/a_b.mp4 3\n"
        "\n"
        "  k400/c.webm   17  \n"
        f"{absolute} 0 -1\n"
        "\t\n"
        "sub/d.mkv -1\n")
    records = read_video_list(lists / "train.txt")
    assert records == [
        VideoRecord(lists / "k400/a_b.mp4", 3),
        VideoRecord(lists / "k400/c.webm", 17),
        VideoRecord(absolute, -1),
        VideoRecord(lists / "sub/d.mkv", -1),
    ]
    rooted = read_video_list(lists / "train.txt", root=tmp_path / "data")
    assert [r.path for r in rooted] == [tmp_path / "data/k400/a_b.mp4", tmp_path / "data/k400/c.webm", absolute,
                                        tmp_path / "data/sub/d.mkv"]


def test_does_not_open_the_videos(tmp_path):
    (tmp_path / "list.txt").write_text("".join(f"missing/{i}.mp4 {i % 7}\n" for i in range(1001)))
    records = read_video_list(tmp_path / "list.txt")
    assert len(records) == 1001 and records[-1] == VideoRecord(tmp_path / "missing/1000.mp4", 1000 % 7)


@pytest.mark.parametrize("bad_line, reason", [
    ("video.mp4", "got 1 fields"),
    ("video.mp4 cat", "label 'cat' is not an integer"),
    ("video.mp4 -2", "not an integer >= -1"),
    ("video.mp4 0 25", "rawframe entry"),
    ("video.mp4 3 -1", "start_index must be 0"),
    ("video.mp4 0 x", "expected integers"),
    ("my video.mp4 0 -1 5", "got 5 fields"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad_line, reason):
    list_file = tmp_path / "train.csv"
    list_file.write_text("a.mp4 1\n\n# note\nb.mp4 2\n" + bad_line + "\nc.mp4 3\n")
    with pytest.raises(VideoListError) as error:
        read_video_list(list_file)
    message = str(error.value)
    assert message.startswith(f"{list_file}:5: ")
    assert reason in message and repr(bad_line) in message


def test_missing_or_empty_list(tmp_path):
    with pytest.raises(VideoListError, match="cannot read the video list"):
        read_video_list(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n# only a comment\n")
    with pytest.raises(VideoListError, match="empty.txt: the video list has no entries"):
        read_video_list(tmp_path / "empty.txt")


def test_a_utf8_bom_does_not_become_part_of_the_first_path(tmp_path):
    """Editors on Windows save lists with a BOM; it is invisible, and the first video would be "missing"."""
    (tmp_path / "bom.txt").write_bytes("\ufeffvideos/a.mp4 3\nvideos/b.mp4 4\n".encode())
    records = read_video_list(tmp_path / "bom.txt")
    assert records[0] == VideoRecord(tmp_path / "videos/a.mp4", 3)
    (tmp_path / "bom_first_comment.txt").write_bytes(b"\xef\xbb\xbf# header\nc.mp4 1\n")
    assert read_video_list(tmp_path / "bom_first_comment.txt") == [VideoRecord(tmp_path / "c.mp4", 1)]


def test_a_folder_or_a_binary_file_given_as_the_list_says_what_it_is(tmp_path):
    with pytest.raises(VideoListError, match=f"^{tmp_path}: is a directory, not a video list"):
        read_video_list(tmp_path)
    (tmp_path / "video.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42\xff\xfe\x80")
    with pytest.raises(VideoListError, match="video.mp4: not a UTF-8 text file"):
        read_video_list(tmp_path / "video.mp4")
