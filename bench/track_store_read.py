"""Track store throughput at the training access pattern, per backend (JSON output).

Fills a store with `--entries` entries (T' = 8 frames x P = 28² points by default, K = 4 windows per video), then
reads random (video, window) keys, one entry per clip as a data loader worker does, from 1 and from 2 reader
processes (`TrackStore(readonly=True)` in each, while the writer's handle stays open in this process), with a warm
page cache and after evicting the store's files from it (`posix_fadvise(DONTNEED)`: a cold start without root).
Every read is a full `get()`: fetch, CRC check, decode to float32. Also: write throughput (put() per entry: one LMDB
transaction with its sync, or one file renamed into place; and put_many() of 32), from one and from two writer
processes, the fetch and CRC + decode shares of a warm read (one process), and the bytes on disk per entry.

  python bench/track_store_read.py                          # 20k entries, both backends, ~2 min on 2 cores
  python bench/track_store_read.py --entries 2000 --seconds 1 --write-entries 200 --out /tmp/ts.json  # quick
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LOCAL_RESULTS_DIR, print_table, write_results  # noqa: E402

from trackmae_stream.tracks import store as store_module  # noqa: E402
from trackmae_stream.tracks.store import BACKENDS, TrackEntry, TrackStore, decode_entry, encode_entry  # noqa: E402

SETTINGS = {"tracker": "bench", "store_grid": 28, "store_size": 256, "checkpoint_sha256": "0" * 64}


def video_name(i: int) -> str:
    return f"k400/train/class_{i % 400:03d}/video_{i:06d}.mp4"


def frame_indices(window: int, frames: int) -> list[int]:
    return [window * 16 + 2 * t for t in range(frames)]


def make_entry(rng: np.random.Generator, frames: int, points: int) -> TrackEntry:
    """Tracks that drift from a grid like real ones (a random walk), some leaving the frame; visibility mostly 1."""
    start = rng.uniform(0, 1, (1, points, 2))
    tracks = start + np.cumsum(rng.normal(0, 0.01, (frames, points, 2)), axis=0)
    vis = (rng.uniform(0, 1, (frames, points)) > 0.1).astype(np.float32)
    return TrackEntry(tracks.astype(np.float32), vis)


def keys(entries: int, windows: int) -> list[tuple[int, int]]:
    return [(i // windows, i % windows) for i in range(entries)]


def _write(path: str, backend: str, items: list[tuple[int, int]], frames: int, points: int, batch: int,
           seed: int) -> None:
    store = TrackStore(path, SETTINGS, backend=backend)
    rng = np.random.default_rng(seed)
    pool = [make_entry(rng, frames, points) for _ in range(16)]  # encoding is measured, making tracks is not
    for start in range(0, len(items), batch):
        store.put_many([(video_name(v), w, frame_indices(w, frames), pool[(start + n) % len(pool)])
                        for n, (v, w) in enumerate(items[start:start + batch])])
    store.close()


def measure_writes(path: str, backend: str, items: list[tuple[int, int]], writers: int, batch: int, frames: int,
                   points: int) -> float:
    """Seconds for `writers` processes to put `items` (split between them, `batch` entries per put_many)."""
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_write, args=(path, backend, items[w::writers], frames, points, batch, w))
             for w in range(writers)]
    start = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError("a writer failed")
    return time.perf_counter() - start


def _read(path: str, items: list[tuple[int, int]], frames: int, seconds: float, order: np.ndarray | None,
          barrier, result) -> None:
    """Random gets for `seconds` (warm), or one get of each key in `order` (cold: distinct keys, each read once)."""
    store = TrackStore(path, SETTINGS, readonly=True)
    store.get("no such video", 0, [0])  # open the handle
    rng = np.random.default_rng(os.getpid())
    cold = order is not None
    keys = order if cold else rng.integers(0, len(items), 1_000_000)
    barrier.wait()
    done, misses, start = 0, 0, time.perf_counter()
    while done < len(keys) and (cold or time.perf_counter() - start < seconds):
        for i in keys[done:done + 64]:
            video, window = items[i]
            misses += store.get(video_name(video), window, frame_indices(window, frames)) is None
        done += len(keys[done:done + 64])
    result.put((done, time.perf_counter() - start, misses, store.stats["corrupt"]))


def measure_reads(path: str, items: list[tuple[int, int]], readers: int, frames: int, seconds: float,
                  cold_reads: int | None = None) -> dict:
    """Aggregate entries/s of `readers` processes started together; cold: `cold_reads` distinct keys per process."""
    ctx = mp.get_context("fork")
    result: mp.Queue = ctx.Queue()
    barrier = ctx.Barrier(readers)
    orders: list[np.ndarray | None] = [None] * readers
    if cold_reads:
        picks = np.random.default_rng(readers).permutation(len(items))[:cold_reads * readers]
        orders = [picks[r::readers] for r in range(readers)]
    procs = [ctx.Process(target=_read, args=(path, items, frames, seconds, orders[r], barrier, result))
             for r in range(readers)]
    for p in procs:
        p.start()
    out = [result.get() for _ in procs]
    for p in procs:
        p.join()
    if any(o[2] or o[3] for o in out):
        raise RuntimeError(f"reads missed or found corrupt entries: {out}")
    return {"entries_per_s": sum(o[0] / o[1] for o in out), "reads": sum(o[0] for o in out)}


def evict(path: Path) -> None:
    """Drop the store's files from the page cache (clean pages: no root needed), for a cold-start read."""
    os.sync()
    for folder, _, names in os.walk(path):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def disk_bytes(path: Path) -> int:
    return sum(os.stat(os.path.join(f, n)).st_blocks * 512 for f, _, names in os.walk(path) for n in names)


def split_costs(path: str, items: list[tuple[int, int]], frames: int, repeats: int = 2000) -> dict:
    """Per-read microseconds of the backend fetch alone and of CRC + decode alone (one process, warm cache)."""
    store = TrackStore(path, SETTINGS, readonly=True)
    rng = np.random.default_rng(7)
    picks = [items[i] for i in rng.integers(0, len(items), repeats)]
    db_keys = [store._db_key(video_name(v), w) for v, w in picks]
    store.get(video_name(picks[0][0]), picks[0][1], frame_indices(picks[0][1], frames))  # open
    backend = store._backend()
    start = time.perf_counter()
    blobs = [backend.read(k) for k in db_keys]
    fetch = (time.perf_counter() - start) / repeats
    frames_arr = [np.asarray(frame_indices(w, frames), dtype="<i8") for _, w in picks]
    start = time.perf_counter()
    for blob, (v, w), f in zip(blobs, picks, frames_arr):
        decode_entry(blob, store.key, video_name(v), w, f)
    decode = (time.perf_counter() - start) / repeats
    store.close()
    return {"fetch_us": 1e6 * fetch, "decode_us": 1e6 * decode}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=20000)
    parser.add_argument("--windows", type=int, default=4, help="K windows per video")
    parser.add_argument("--frames", type=int, default=8, help="T' stored frames per entry")
    parser.add_argument("--points", type=int, default=28 * 28, help="P stored points per entry")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--readers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--write-modes", type=lambda t: tuple(int(x) for x in t.split("x")), nargs="+",
                        default=[(1, 1), (2, 1), (1, 32), (2, 32)],
                        help="PROCSxBATCH write measurements after the fill: writer processes x entries per put_many")
    parser.add_argument("--write-entries", type=int, default=1000, help="entries per write measurement")
    parser.add_argument("--seconds", type=float, default=3.0, help="per read measurement")
    parser.add_argument("--cold-reads", type=int, default=1500,
                        help="distinct entries each reader gets after the eviction (a small share of the store, as "
                        "at Kinetics scale, so that readahead of neighbours is rarely of use)")
    parser.add_argument("--no-cold", action="store_true", help="skip the reads after evicting the page cache")
    parser.add_argument("--lmdb-readahead", type=int, choices=(0, 1), default=None,
                        help="override the store's LMDB readahead (the default is the store's LMDB_READAHEAD)")
    parser.add_argument("--dir", default=None, help="where the stores go (default: a temporary folder, removed)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    if args.lmdb_readahead is not None:
        store_module.LMDB_READAHEAD = bool(args.lmdb_readahead)  # forked readers and writers inherit it
    root = Path(tempfile.mkdtemp(prefix="track_store_bench-", dir=args.dir))
    items = keys(args.entries, args.windows)
    entry_bytes = len(encode_entry("0" * 16, video_name(0), 0, frame_indices(0, args.frames),
                                   make_entry(np.random.default_rng(0), args.frames, args.points)))
    rows: list[dict] = []
    try:
        for backend in args.backends:
            path = str(root / backend)
            # the fill: one writer, batches of 32; then each write mode adds fresh keys (videos past the filled ones)
            modes = [(1, 32, items)] + [(w, b, [(v + 10**6 * (n + 1), k) for v, k in items[:args.write_entries]])
                                        for n, (w, b) in enumerate(args.write_modes)]
            for n, (writers, batch, todo) in enumerate(modes):
                seconds = measure_writes(path, backend, todo, writers, batch, args.frames, args.points)
                rate = len(todo) / seconds
                rows.append({"backend": backend, "op": "fill" if n == 0 else "write", "procs": writers,
                             "batch": batch, "cache": "-", "entries_per_s": rate, "MB_per_s": rate * entry_bytes / 1e6})
            on_disk = disk_bytes(Path(path)) / sum(len(todo) for _, _, todo in modes)
            costs = {}
            for cache in ("warm",) if args.no_cold else ("warm", "cold"):
                for readers in args.readers:
                    if cache == "cold":
                        evict(Path(path))
                    res = measure_reads(path, items, readers, args.frames, args.seconds,
                                        args.cold_reads if cache == "cold" else None)
                    rows.append({"backend": backend, "op": "read", "procs": readers, "batch": 1, "cache": cache,
                                 "entries_per_s": res["entries_per_s"],
                                 "MB_per_s": res["entries_per_s"] * entry_bytes / 1e6})
                if cache == "warm":  # before any eviction: the whole store is in the page cache
                    costs = split_costs(path, items, args.frames)
            for row in rows:
                if row["backend"] == backend:
                    row["disk_kB_per_entry"] = on_disk / 1e3
                    if row["op"] == "read":
                        row.update(costs)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"track store | {args.entries} entries of T'={args.frames} x P={args.points} ({entry_bytes} B stored) | "
          f"K={args.windows} | LMDB readahead {store_module.LMDB_READAHEAD} | {os.cpu_count()} CPUs | "
          f"{socket.gethostname()}")
    print_table(rows, [("backend", "{}"), ("op", "{}"), ("procs", "{}"), ("batch", "{}"), ("cache", "{}"),
                       ("entries_per_s", "{:.0f}", "entries/s"), ("MB_per_s", "{:.0f}", "MB/s"),
                       ("fetch_us", "{:.0f}", "fetch us"), ("decode_us", "{:.0f}", "crc+decode us"),
                       ("disk_kB_per_entry", "{:.1f}", "disk kB/entry")])
    payload = {"args": vars(args), "lmdb_readahead": store_module.LMDB_READAHEAD, "entry_bytes": entry_bytes,
               "cpus": os.cpu_count(), "results": rows}
    path = write_results(payload,
                         args.out, f"track_store_read_{socket.gethostname()}.json", results_dir=LOCAL_RESULTS_DIR)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
