"""The track store (trackmae_stream/tracks/store.py): encoding error bounds, misses, corruption, read-only workers,
pickling across fork and spawn, concurrent writers beside a reader, and a writer killed with SIGKILL mid-way."""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from trackmae_stream.errors import UserError
from trackmae_stream.tracks.store import (
    BACKENDS,
    COORD_MAX,
    COORD_MIN,
    MAX_COORD_ERROR,
    MAX_VISIBILITY_ERROR,
    TrackEntry,
    TrackStore,
    TrackStoreError,
    settings_key,
)

SETTINGS = {"tracker": "cotracker3", "iters": 6, "checkpoint_sha256": "ab" * 32, "store_grid": 28, "store_size": 256}
FRAMES = list(range(0, 16, 2))
T, P = len(FRAMES), 28 * 28
REPO = Path(__file__).resolve().parents[1]


def make_entry(seed: int, t: int = T, p: int = P) -> TrackEntry:
    """Tracks across the whole stored range (points leave the frame) and visibilities; the kill test's child makes
    the same ones from the same seed."""
    rng = np.random.default_rng(seed)
    return TrackEntry(rng.uniform(-1, 2, (t, p, 2)).astype(np.float32), rng.uniform(0, 1, (t, p)).astype(np.float32))


def assert_close(got: TrackEntry | None, want: TrackEntry) -> None:
    """`got` is `want` after the store's encoding: within the stated error bounds, float32, same shapes."""
    assert got is not None
    assert got.tracks.dtype == np.float32 and got.visibility.dtype == np.float32
    assert got.tracks.shape == want.tracks.shape and got.visibility.shape == want.visibility.shape
    assert np.abs(got.tracks.astype(np.float64) - want.tracks).max() <= MAX_COORD_ERROR
    assert np.abs(got.visibility.astype(np.float64) - want.visibility).max() <= MAX_VISIBILITY_ERROR


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


def test_settings_key_is_stable_short_and_sensitive():
    key = settings_key(SETTINGS)
    assert len(key) == 16 and int(key, 16) >= 0
    assert settings_key(dict(reversed(list(SETTINGS.items())))) == key  # order does not matter
    assert settings_key({**SETTINGS, "iters": 4}) != key
    assert settings_key({**SETTINGS, "checkpoint_sha256": "cd" * 32}) != key
    assert settings_key({**SETTINGS, "store_grid": 14}) != key
    # pinned: a change of the hashing would silently turn every stored entry into a miss
    assert settings_key({"tracker": "lk", "grid": (14, 14)}) == settings_key({"grid": [14, 14], "tracker": "lk"})
    assert settings_key({"tracker": "lk"}) == "595b887235dc0412"


def test_coordinate_error_bound_in_pixels(tmp_path, backend):
    """The docstring's bounds: <= 0.0079 x 0.0060 px at 340x256, <= 0.0445 x 0.0250 px at 1920x1080."""
    for size, bound in (((340, 256), (0.0079, 0.0060)), ((1920, 1080), (0.0445, 0.0250))):
        assert MAX_COORD_ERROR * size[0] <= bound[0] and MAX_COORD_ERROR * size[1] <= bound[1]
    assert MAX_VISIBILITY_ERROR <= 0.5 / 255 + 1e-7
    store = TrackStore(tmp_path / "s", SETTINGS, backend=backend)
    rng = np.random.default_rng(0)
    grid = np.linspace(COORD_MIN, COORD_MAX, T * P * 2)  # every part of the range, both ends included
    tracks = rng.permutation(grid).reshape(T, P, 2).astype(np.float32)
    vis = np.linspace(0, 1, T * P).reshape(T, P).astype(np.float32)
    want = TrackEntry(tracks, vis)
    store.put("k400/a b/ü.mp4", 3, FRAMES, want)
    got = store.get("k400/a b/ü.mp4", 3, FRAMES)
    assert_close(got, want)
    for w, h in ((340, 256), (1920, 1080)):
        # pixel errors: x = u W - 0.5, so a normalised error e is e W pixels
        err_x = np.abs(got.tracks[..., 0].astype(np.float64) - tracks[..., 0]).max() * w
        err_y = np.abs(got.tracks[..., 1].astype(np.float64) - tracks[..., 1]).max() * h
        assert err_x <= MAX_COORD_ERROR * w and err_y <= MAX_COORD_ERROR * h
    # outside the stored range: clamped to it (a point that far out of the frame is invisible anyway)
    far = TrackEntry(np.full((T, P, 2), 5.0, np.float32), np.full((T, P), 1.5, np.float32))
    store.put("far", 0, FRAMES, far)
    got = store.get("far", 0, FRAMES)
    assert np.abs(got.tracks - COORD_MAX).max() <= MAX_COORD_ERROR and np.all(got.visibility == 1.0)
    store.close()


def test_misses_hits_and_stats(tmp_path, backend):
    store = TrackStore(tmp_path / "s", SETTINGS, backend=backend)
    entry = make_entry(1)
    assert store.get("v", 0, FRAMES) is None and not store.contains("v", 0, FRAMES)
    store.put("v", 0, FRAMES, entry)
    assert store.contains("v", 0, FRAMES)
    assert_close(store.get("v", 0, FRAMES), entry)
    assert store.get("v", 1, FRAMES) is None  # other window
    assert store.get("v", 0, [f + 1 for f in FRAMES]) is None  # other frame indices
    assert not store.contains("v", 0, FRAMES[:-1])
    assert store.get("w", 0, FRAMES) is None  # other video
    assert store.stats == {"hits": 1, "misses": 4, "corrupt": 0, "writes": 1}
    # the same folder under other settings: a miss, never the other settings' entry
    other = TrackStore(tmp_path / "s", {**SETTINGS, "iters": 4})
    assert other.backend == backend  # taken from the folder
    assert other.get("v", 0, FRAMES) is None and not other.contains("v", 0, FRAMES)
    other.put("v", 0, FRAMES, make_entry(2))  # both settings' entries live side by side
    assert_close(other.get("v", 0, FRAMES), make_entry(2))
    assert_close(store.get("v", 0, FRAMES), entry)
    assert {p.stem for p in (tmp_path / "s" / "settings").iterdir()} == {store.key, other.key}
    # put_many writes several at once
    store.put_many([("m", w, FRAMES, make_entry(10 + w)) for w in range(4)])
    for w in range(4):
        assert_close(store.get("m", w, FRAMES), make_entry(10 + w))
    assert store.stats["writes"] == 5
    other.close()
    store.close()


def test_put_rejects_bad_entries(tmp_path):
    store = TrackStore(tmp_path / "s", SETTINGS)
    good = make_entry(0)
    with pytest.raises(ValueError, match="tracks must be"):
        store.put("v", 0, FRAMES[:-1], good)  # one frame index per stored frame
    with pytest.raises(ValueError, match="visibility"):
        store.put("v", 0, FRAMES, TrackEntry(good.tracks, good.visibility[:, :-1]))
    bad = good.tracks.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        store.put("v", 0, FRAMES, TrackEntry(bad, good.visibility))
    assert store.get("v", 0, FRAMES) is None and store.stats["writes"] == 0


def test_folder_checks(tmp_path):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "data.txt").write_text("mine")
    with pytest.raises(TrackStoreError, match="refusing"):
        TrackStore(tmp_path / "foreign", SETTINGS)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        TrackStore(tmp_path / "file", SETTINGS)
    TrackStore(tmp_path / "s", SETTINGS, backend="files")
    with pytest.raises(TrackStoreError, match="'files' backend"):
        TrackStore(tmp_path / "s", SETTINGS, backend="lmdb")
    with pytest.raises(ValueError):
        TrackStore(tmp_path / "t", SETTINGS, backend="zarr")


def test_readonly_before_and_after_the_writer(tmp_path, backend):
    """A worker's read-only store may exist before any writer: all misses, nothing created; then it sees entries."""
    path = tmp_path / "s"
    reader = TrackStore(path, SETTINGS, readonly=True, backend=backend)
    assert reader.get("v", 0, FRAMES) is None and not path.exists()
    with pytest.raises(TrackStoreError, match="read-only"):
        reader.put("v", 0, FRAMES, make_entry(0))
    writer = TrackStore(path, SETTINGS, backend=backend)
    writer.put("v", 0, FRAMES, make_entry(0))
    assert_close(reader.get("v", 0, FRAMES), make_entry(0))
    writer.put("v", 1, FRAMES, make_entry(1))  # written after the reader opened: seen by its next read
    assert_close(reader.get("v", 1, FRAMES), make_entry(1))
    writer.close()  # one store of the process closing leaves the other's handle working
    assert_close(reader.get("v", 0, FRAMES), make_entry(0))
    reader.close()


def _entry_bytes_on_disk(store: TrackStore, video: str, window: int) -> tuple[Path, int, int]:
    """(file, offset, length) of an entry's stored bytes on disk, found through the backend."""
    key = store._db_key(video, window)
    blob = store._backend().read(key)
    if store.backend == "files":
        return store._backend().path(key), 0, len(blob)
    data = (store.path / "lmdb" / "data.mdb").read_bytes()
    offset = data.find(blob[200:264]) - 200
    assert offset >= 0 and data[offset:offset + len(blob)] == blob
    return store.path / "lmdb" / "data.mdb", offset, len(blob)


def test_corrupt_entry_is_counted_logged_and_recomputed(tmp_path, backend, caplog):
    store = TrackStore(tmp_path / "s", SETTINGS, backend=backend)
    for w in range(3):
        store.put("v", w, FRAMES, make_entry(w))
    path, offset, length = _entry_bytes_on_disk(store, "v", 1)
    with open(path, "r+b") as handle:  # flip bytes in the middle of the coordinates, on disk
        handle.seek(offset + length // 2)
        chunk = handle.read(3)
        handle.seek(offset + length // 2)
        handle.write(bytes(b ^ 0x5A for b in chunk))
    with caplog.at_level(logging.WARNING, logger="trackmae_stream.tracks.store"):
        assert store.get("v", 1, FRAMES) is None
        assert not store.contains("v", 1, FRAMES)
        assert store.get("v", 1, FRAMES) is None
    assert store.stats["corrupt"] == 1 and store.stats["misses"] == 2  # counted and logged once per entry
    assert len([r for r in caplog.records if "corrupt entry" in r.getMessage()]) == 1
    assert_close(store.get("v", 0, FRAMES), make_entry(0))  # the neighbours are intact
    assert_close(store.get("v", 2, FRAMES), make_entry(2))
    # a reader in another process (a worker) sees the same: a miss, counted there
    reader = TrackStore(tmp_path / "s", SETTINGS, readonly=True)
    assert reader.get("v", 1, FRAMES) is None and reader.stats["corrupt"] == 1
    store.put("v", 1, FRAMES, make_entry(1))  # the recomputed entry replaces it
    assert_close(store.get("v", 1, FRAMES), make_entry(1))
    assert_close(reader.get("v", 1, FRAMES), make_entry(1))
    assert store.stats["corrupt"] == 1
    store.close()
    reader.close()


def test_truncated_entry_is_corrupt(tmp_path, backend):
    store = TrackStore(tmp_path / "s", SETTINGS, backend=backend)
    store.put("v", 0, FRAMES, make_entry(0))
    key = store._db_key("v", 0)
    blob = store._backend().read(key)
    if backend == "files":
        os.truncate(store._backend().path(key), len(blob) // 3)
    else:  # through the backend: a value cut short
        store._backend().write([(key, blob[:len(blob) // 3])])
    assert store.get("v", 0, FRAMES) is None and store.stats["corrupt"] == 1
    store._backend().write([(key, blob[:20])])  # shorter than a header
    fresh = TrackStore(tmp_path / "s", SETTINGS)
    assert fresh.get("v", 0, FRAMES) is None and fresh.stats["corrupt"] == 1
    store.put("v", 0, FRAMES, make_entry(0))
    assert_close(fresh.get("v", 0, FRAMES), make_entry(0))


def _fork_child_reads(store: TrackStore, queue) -> None:
    try:
        entry = store.get("v", 0, FRAMES)  # the parent's handle is open: the child must open its own
        if not store.readonly:
            store.put("child", 0, FRAMES, make_entry(7))
        same = entry is not None and np.array_equal(entry.tracks, store.get("v", 0, FRAMES).tracks)
        queue.put((same, store.stats))
    except Exception as exc:  # reported, not left for the parent's queue timeout
        queue.put((repr(exc), {}))


def test_pickle_fork_and_spawn(tmp_path, backend):
    store = TrackStore(tmp_path / "s", SETTINGS, backend=backend)
    store.put("v", 0, FRAMES, make_entry(0))
    assert store.get("v", 0, FRAMES) is not None  # the handle is open now
    clone = pickle.loads(pickle.dumps(store))
    assert clone.stats == {"hits": 0, "misses": 0, "corrupt": 0, "writes": 0} and clone._handle is None
    assert_close(clone.get("v", 0, FRAMES), make_entry(0))
    reader = TrackStore(tmp_path / "s", SETTINGS, readonly=True)  # a worker's store, used in the parent first
    assert reader.get("v", 0, FRAMES) is not None
    for method, worker_store in (("fork", store), ("fork", reader), ("spawn", reader)):
        ctx = mp.get_context(method)
        queue = ctx.Queue()
        child = ctx.Process(target=_fork_child_reads, args=(worker_store, queue))
        child.start()
        ok, stats = queue.get(timeout=60)
        child.join(60)
        assert ok is True and child.exitcode == 0, ok
        assert stats["hits"] == 2 and stats["writes"] == (0 if worker_store.readonly else 1)  # the child's own counts
    assert_close(store.get("child", 0, FRAMES), make_entry(7))  # the forked child's write
    assert store.stats["writes"] == 1  # the parent's counts did not move
    store.put("v", 1, FRAMES, make_entry(1))  # the parent's handle still works after the children
    assert_close(clone.get("v", 1, FRAMES), make_entry(1))
    assert_close(reader.get("v", 1, FRAMES), make_entry(1))
    store.close()
    clone.close()
    reader.close()


def _writer(path: str, writer: int, videos: int, windows: int) -> None:
    store = TrackStore(path, SETTINGS)
    rng = np.random.default_rng(writer)
    order = rng.permutation(videos * windows)  # the same keys as the other writers, in another order
    for n, i in enumerate(order):
        video, window = f"v{i // windows}", int(i % windows)
        if n % 5 == 4:  # some in batches
            store.put_many([(video, window, FRAMES, make_entry(1000 * writer + int(i)))])
        else:
            store.put(video, window, FRAMES, make_entry(1000 * writer + int(i)))
        store.put(f"own{writer}", n, FRAMES, make_entry(5000 + 1000 * writer + n))  # and keys of its own


def _matches_a_writer(entry: TrackEntry, i: int, writers: int) -> bool:
    """`entry` is exactly one writer's version of key i (decoded), not a mix."""
    for w in range(writers):
        want = make_entry(1000 * w + i)
        if np.abs(entry.tracks.astype(np.float64) - want.tracks).max() <= MAX_COORD_ERROR and \
                np.abs(entry.visibility.astype(np.float64) - want.visibility).max() <= MAX_VISIBILITY_ERROR:
            return True
    return False


def _reader(path: str, videos: int, windows: int, writers: int, stop, queue) -> None:
    store = TrackStore(path, SETTINGS, readonly=True)
    rng = np.random.default_rng(99)
    reads = hits = bad = 0
    while not stop.is_set() or reads < 50:
        i = int(rng.integers(videos * windows))
        entry = store.get(f"v{i // windows}", i % windows, FRAMES)
        reads += 1
        if entry is not None:
            hits += 1
            bad += not _matches_a_writer(entry, i, writers)
    queue.put((reads, hits, bad, store.stats["corrupt"]))


def test_concurrent_writers_and_a_reader(tmp_path, backend):
    """3 processes put the same keys (and their own) at once while a 4th reads: every read is a whole entry of one
    writer, nothing is corrupt, and afterwards every key holds one writer's complete version."""
    path, videos, windows, writers = str(tmp_path / "s"), 10, 3, 3
    TrackStore(path, SETTINGS, backend=backend)  # the main process creates the store, as the trainer does
    ctx = mp.get_context("fork")
    stop, queue = ctx.Event(), ctx.Queue()
    reader = ctx.Process(target=_reader, args=(path, videos, windows, writers, stop, queue))
    reader.start()
    procs = [ctx.Process(target=_writer, args=(path, w, videos, windows)) for w in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    stop.set()
    reads, hits, bad, corrupt = queue.get(timeout=60)
    reader.join(60)
    assert [p.exitcode for p in procs] == [0] * writers and reader.exitcode == 0
    assert reads >= 50 and hits > 0 and bad == 0 and corrupt == 0
    store = TrackStore(path, SETTINGS)
    for i in range(videos * windows):
        entry = store.get(f"v{i // windows}", i % windows, FRAMES)
        assert entry is not None and _matches_a_writer(entry, i, writers)
    for w in range(writers):
        for n in range(videos * windows):
            assert_close(store.get(f"own{w}", n, FRAMES), make_entry(5000 + 1000 * w + n))
    assert store.stats["corrupt"] == 0
    store.close()


KILLED_WRITER = """
import sys
import numpy as np
from trackmae_stream.tracks.store import TrackEntry, TrackStore
path, backend, progress = sys.argv[1:4]
store = TrackStore(path, {settings!r}, backend=backend)
with open(progress, "a") as done:
    for i in range(100000):
        rng = np.random.default_rng(i)
        entry = TrackEntry(rng.uniform(-1, 2, ({t}, {p}, 2)).astype(np.float32),
                           rng.uniform(0, 1, ({t}, {p})).astype(np.float32))
        store.put(f"v{{i // 4}}", i % 4, {frames!r}, entry)
        done.write(f"{{i}}\\n")  # only after put() returned
        done.flush()
"""


def test_kill9_during_puts_loses_nothing_stored(tmp_path, backend):
    path, progress = tmp_path / "s", tmp_path / "progress.txt"
    progress.touch()
    script = KILLED_WRITER.format(settings=SETTINGS, t=T, p=P, frames=FRAMES)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen([sys.executable, "-c", script, str(path), backend, str(progress)], env=env)
    deadline = time.monotonic() + 60
    while len(progress.read_text().split()) < 40 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)  # somewhere inside the loop of puts
    assert child.wait(30) == -signal.SIGKILL
    done = [int(i) for i in progress.read_text().split()]
    assert len(done) >= 40 and done == list(range(len(done)))

    store = TrackStore(path, SETTINGS, backend=backend)  # opens fine
    for i in done:
        assert_close(store.get(f"v{i // 4}", i % 4, FRAMES), make_entry(i))  # everything put before the kill
    nxt = len(done)  # the put in flight: absent or whole, never corrupt
    entry = store.get(f"v{nxt // 4}", nxt % 4, FRAMES)
    if entry is not None:
        assert_close(entry, make_entry(nxt))
    assert store.stats["corrupt"] == 0
    for i in range(nxt, nxt + 8):  # the rerun continues (the writer lock of the killed process is released)
        if not store.contains(f"v{i // 4}", i % 4, FRAMES):
            store.put(f"v{i // 4}", i % 4, FRAMES, make_entry(i))
    for i in range(nxt + 8):
        assert_close(store.get(f"v{i // 4}", i % 4, FRAMES), make_entry(i))
    store.close()
    if backend == "files":  # the killed writer's temporary file is never read; old ones are removed on open
        assert all(p.suffix == ".tmp" for p in (path / "tmp").iterdir())


def test_stale_temporary_files_are_removed(tmp_path):
    store = TrackStore(tmp_path / "s", SETTINGS, backend="files")
    store.put("v", 0, FRAMES, make_entry(0))
    old, new = tmp_path / "s" / "tmp" / "1-dead.tmp", tmp_path / "s" / "tmp" / "2-live.tmp"
    old.write_bytes(b"half")
    new.write_bytes(b"half")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    TrackStore(tmp_path / "s", SETTINGS).get("v", 0, FRAMES)
    assert not old.exists() and new.exists()


HOLDS_THE_WRITE_LOCK = """
import sys, time
from trackmae_stream.tracks.store import TrackStore
store = TrackStore(sys.argv[1], {settings!r})
txn = store._backend()._env().begin(write=True)  # LMDB's writer lock, held, with a half-written transaction
txn.put(b"half", b"x" * 100000)
print("holding", flush=True)
time.sleep(60)
"""

PUT_AFTER = """
import sys
import numpy as np
from trackmae_stream.tracks.store import TrackEntry, TrackStore
store = TrackStore(sys.argv[1], {settings!r})
store.put("after", 0, [0], TrackEntry(np.zeros((1, 4, 2), np.float32), np.ones((1, 4), np.float32)))
assert store.get("after", 0, [0]) is not None and store.get("before", 0, [0]) is not None
with store._backend()._env().begin() as txn:
    assert txn.get(b"half") is None
"""


def test_lmdb_writer_killed_holding_the_lock(tmp_path):
    """A writer killed -9 inside its transaction: the next writer gets the lock (robust mutex), the half-written
    transaction is gone, earlier entries stay."""
    path = str(tmp_path / "s")
    TrackStore(path, SETTINGS, backend="lmdb").put("before", 0, [0], make_entry(0, t=1, p=4))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    holder = subprocess.Popen([sys.executable, "-c", HOLDS_THE_WRITE_LOCK.format(settings=SETTINGS), path],
                              env=env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(30)
    holder.stdout.close()
    # in a subprocess with a timeout: a lock that stayed held would hang this put, not the test session
    subprocess.run([sys.executable, "-c", PUT_AFTER.format(settings=SETTINGS), path], env=env, check=True, timeout=60)


def test_network_file_system_gets_the_file_backend(tmp_path, monkeypatch):
    from trackmae_stream.tracks import store as store_module

    assert store_module._filesystem_type(tmp_path / "not" / "yet")  # found through the nearest existing folder
    monkeypatch.setattr(store_module, "_filesystem_type", lambda path: "nfs4")
    assert TrackStore(tmp_path / "auto", SETTINGS).backend == "files"  # LMDB's locks do not hold across machines
    with pytest.raises(TrackStoreError, match="network file system"):
        TrackStore(tmp_path / "explicit", SETTINGS, backend="lmdb")
    assert TrackStore(tmp_path / "ro", SETTINGS, readonly=True, backend="lmdb").get("v", 0, FRAMES) is None
    assert not (tmp_path / "explicit").exists()  # refused before anything was created
