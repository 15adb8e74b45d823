"""The track store: tracks of each (video, window) computed once and read back in every epoch.

**What an entry is.** `TrackEntry.tracks` (T', P, 2) holds the stored query points' positions at the T' stored frames
in normalised source coordinates u = (x + 0.5) / W, v = (y + 0.5) / H, `visibility` (T', P) the tracker's visibility.
An entry is found by (settings key, video, window) and only returned when its header also names the same frame
indices; an entry made under other settings (`settings_key`: tracker, its settings, checkpoint hash, store grid and
size, ...) or for other frames is a miss, never reused. The full settings behind each key are kept once per key in
`<store>/settings/<key>.json`, so every entry names its tracker, settings and checkpoint hash.

**Encoding** (little-endian, format version 1): a fixed header (magic, version, settings key, window, T', P, number of
frame indices, video name length), the video name, the frame indices (int64), the coordinates as uint16 fixed point
over [-1, 2] (q = round((u + 1) * 65535 / 3); positions outside are clamped: such a point is more than a frame away
from the frame), the visibility as uint8 (round(255 v)), and a CRC-32 of everything before it. Errors of the encoding:
- coordinates: at most half a step, 3 / 65535 / 2 = 2.289e-5, plus 2.4e-7 of float32 rounding when decoding:
  2.313e-5 of the frame's width or height (`MAX_COORD_ERROR`), i.e. **at most 0.0079 px x 0.0060 px on a 340x256
  source frame and 0.0445 px x 0.0250 px on a 1920x1080 one** (fp16 would be 20x worse near u = 2: 0.94 px at 1920
  wide);
- visibility: at most half a uint8 step, 0.5 / 255 = 0.00196 (`MAX_VISIBILITY_ERROR`).
An entry of T' = 8 frames and P = 28 x 28 = 784 points is 31,360 bytes of payload plus ~150 bytes of header (with a
35-character video name): 31.5 kB.

**Size at Kinetics scale.** 240k videos x K = 4 windows = 960k entries x 31.5 kB = 30 GB of entries; LMDB stores
each as 8 overflow pages of 4 KiB (32 kB, 31.5 GB in all, measured 32.9 kB per entry with the B-tree), the file
backend as one 32 kB file (4 KiB blocks: 31.5 GB, plus 960k inodes). A training node's page cache usually holds it.

**Backends** (`backend=`; chosen by `bench/track_store_read.py`, numbers in bench/README.md):
- `lmdb` (default): one memory-mapped B-tree in `<store>/lmdb/`. Writers of all processes on the machine take
  LMDB's writer lock in turn (a robust mutex: a writer killed with -9 does not block the next one); every put is its
  own transaction (`put_many`: one for all), and a commit is atomic: a kill at any moment leaves the old or the new
  entry. Commits are synced (data pages fdatasync'd, the meta page not: a power cut may undo the last commit, never
  corrupt the tree); that sync bounds the write rate, hence `put_many`. Readers never wait for writers, each in its own
  snapshot. LMDB's locking does not work across machines: several nodes need a store each or the file backend;
  `auto` picks `files` on a network file system and `lmdb` refuses to write there.
- `files`: one file per entry, `<store>/files/<key>/<3 hex digits>/<hash of the video>-<window>.trk`, written to
  `<store>/tmp/` and renamed into place (atomic on one file system, NFS included). Not fsync'd: a kill -9 loses
  nothing (the page cache survives it); a power cut may leave an entry whose checksum fails, which is recomputed.

Every read checks the CRC: a truncated or corrupt entry is counted (`stats["corrupt"]`), logged once per entry and
process, and returned as a miss so that the caller recomputes and puts it again.

**Processes.** The store is picklable and opens its handle lazily in each process (a DataLoader worker, forked or
spawned, never uses a handle its parent opened). `readonly=True` (workers) never creates or writes anything.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import struct
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
COORD_MIN, COORD_MAX = -1.0, 2.0
COORD_STEP = (COORD_MAX - COORD_MIN) / 65535
#: Largest coordinate error of the encoding inside [COORD_MIN, COORD_MAX], in units of the frame's width / height:
#: half a step plus the float32 rounding of the decode (< 2^-22 for values below 2).
MAX_COORD_ERROR = COORD_STEP / 2 + 2.0**-22
MAX_VISIBILITY_ERROR = 0.5 / 255 + 2.0**-24  # + the float32 rounding of the decode
BACKENDS = ("lmdb", "files")
#: Measured faster on reads (bench/README.md, "Track store"): LMDB.
DEFAULT_BACKEND = "lmdb"
#: Address space reserved for the LMDB map (sparse: the file only grows with its contents); ~34x Kinetics at K = 4.
LMDB_MAP_SIZE = 2**40
#: LMDB readahead (off would be MADV_RANDOM on the map): on reads cold entries 1.6x faster (bench/README.md).
LMDB_READAHEAD = True
#: Temporary files of the file backend older than this are leftovers of killed writers.
STALE_TMP_SECONDS = 3600.0
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
                       "9p", "afs", "fuse.sshfs", "fuse.glusterfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs")

_MAGIC = b"TMTS"
_HEAD = struct.Struct("<4sH16sIIIII")  # magic, version, settings key, window, T', P, frame count, video name length
_CRC = struct.Struct("<I")
_MARKER = "store.json"
_MARKER_KIND = "trackmae-track-store"
_KEY_CHARS = 16


class TrackStoreError(UserError, RuntimeError):
    """The store cannot be opened or written (a foreign folder, another backend, a full disk); names the path."""


@dataclass
class TrackEntry:
    tracks: np.ndarray  # (T', P, 2) float32, normalised source coordinates (pixel-centre convention)
    visibility: np.ndarray  # (T', P) float32 in [0, 1]


class _Corrupt(Exception):
    """An entry's bytes fail the checksum or do not parse."""


def settings_key(settings: Mapping[str, Any]) -> str:
    """16 hex digits of the SHA-256 of the settings as sorted, compact JSON (tuples as lists, other objects as str)."""
    text = json.dumps(dict(settings), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:_KEY_CHARS]


# ----------------------------------------------------------------------------------------------------------------------
# Entry bytes


def _frames(frame_indices: Sequence[int]) -> np.ndarray:
    return np.asarray([int(i) for i in frame_indices], dtype="<i8")


def encode_entry(key: str, video: str, window: int, frame_indices: Sequence[int], entry: TrackEntry) -> bytes:
    """The stored bytes of one entry (see the module docstring); checks shapes and finiteness."""
    frames = _frames(frame_indices)
    tracks = np.asarray(entry.tracks)
    vis = np.asarray(entry.visibility)
    if tracks.ndim != 3 or tracks.shape[2] != 2 or tracks.shape[0] != len(frames):
        raise ValueError(f"tracks must be (T'={len(frames)}, P, 2) for {len(frames)} frame indices, got {tracks.shape}")
    if vis.shape != tracks.shape[:2]:
        raise ValueError(f"visibility must be {tracks.shape[:2]}, got {vis.shape}")
    if not (np.isfinite(tracks).all() and np.isfinite(vis).all()):
        raise ValueError(f"{video} window {window}: non-finite tracks or visibility; refusing to store them")
    if not 0 <= window < 2**32:
        raise ValueError(f"window must be a non-negative 32-bit integer, got {window}")
    # rounded in float64: in float32 the scaling's own rounding would move some values past the half step
    q = np.rint((np.clip(tracks.astype(np.float64), COORD_MIN, COORD_MAX) - COORD_MIN) / COORD_STEP).astype("<u2")
    v = np.rint(np.clip(vis.astype(np.float64), 0.0, 1.0) * 255).astype(np.uint8)
    name = video.encode()
    head = _HEAD.pack(_MAGIC, FORMAT_VERSION, key.encode(), window, tracks.shape[0], tracks.shape[1], len(frames),
                      len(name))
    body = b"".join((head, name, frames.tobytes(), q.tobytes(), v.tobytes()))
    return body + _CRC.pack(zlib.crc32(body))


def decode_entry(blob: bytes | memoryview, key: str, video: str, window: int, frames: np.ndarray, *,
                 arrays: bool = True) -> TrackEntry | bool | None:
    """The entry in `blob` if it belongs to (key, video, window, frames), else None (a miss); raises _Corrupt when the
    checksum fails or the bytes do not parse. With arrays=False, True instead of the decoded arrays (a cheaper check).
    """
    view = memoryview(blob)
    if len(view) < _HEAD.size + _CRC.size:
        raise _Corrupt(f"{len(view)} bytes, shorter than a header")
    body = view[:-_CRC.size]
    if zlib.crc32(body) != _CRC.unpack_from(view, len(body))[0]:
        raise _Corrupt("checksum mismatch")
    magic, version, stored_key, stored_window, t, p, f, name_len = _HEAD.unpack_from(view)
    if magic != _MAGIC:
        raise _Corrupt("not a track entry")
    if version != FORMAT_VERSION:
        return None  # another format: recomputed and overwritten like an entry of other settings
    offsets = np.cumsum([_HEAD.size, name_len, 8 * f, 4 * t * p, t * p])
    if offsets[-1] != len(body):
        raise _Corrupt(f"{len(body)} bytes for a {t}x{p} entry that needs {offsets[-1]}")
    name = bytes(view[offsets[0]:offsets[1]])
    stored_frames = np.frombuffer(view[offsets[1]:offsets[2]], dtype="<i8")
    if (stored_key != key.encode() or stored_window != window or name != video.encode()
            or not np.array_equal(stored_frames, frames)):
        return None
    if not arrays:
        return True
    q = np.frombuffer(view[offsets[2]:offsets[3]], dtype="<u2").reshape(t, p, 2)
    v = np.frombuffer(view[offsets[3]:offsets[4]], dtype=np.uint8).reshape(t, p)
    tracks = q.astype(np.float32)
    tracks *= np.float32(COORD_STEP)
    tracks += np.float32(COORD_MIN)
    vis = v.astype(np.float32)
    vis *= np.float32(1 / 255)
    return TrackEntry(tracks=tracks, visibility=vis)


# ----------------------------------------------------------------------------------------------------------------------
# Backends: bytes in, bytes out, under a fixed-size key


@dataclass
class _SharedEnv:
    env: Any
    writable: bool
    users: int


#: One LMDB environment per (process, folder): LMDB forbids opening an environment twice in a process (closing one
#: would drop the other's file locks), and several stores of one process (a reader and a writer) share it. The pid in
#: the key keeps a forked child off its parent's environments (see _drop_inherited).
_ENVS: dict[tuple[int, str], _SharedEnv] = {}


def _drop_inherited(folder: str) -> None:
    """In a forked child, close its copies of the environments of `folder` that the parent opened.

    py-lmdb refuses to open files that an environment of the process holds open, and the child inherited the parent's
    open environments. The child never uses them; closing its copy only unmaps and closes the child's own copies of
    the mapping and descriptors (fcntl locks belong to the parent and are not inherited; mdb_env_close clears only
    reader slots with the child's pid), and with max_spare_txns=0 no cached read transaction exists whose abort would
    free the parent's reader slot.
    """
    pid = os.getpid()
    for key in [k for k in _ENVS if k[1] == folder and k[0] != pid]:
        _ENVS.pop(key).env.close()


class _LmdbBackend:
    def __init__(self, folder: Path, readonly: bool):
        import lmdb  # imported here: a store of the file backend works without the package

        self._lmdb = lmdb
        self.errors: tuple[type[BaseException], ...] = (OSError, lmdb.Error)
        self.folder = folder
        self.readonly = readonly
        self._real = os.path.realpath(folder)  # once: realpath costs a syscall per path component
        self._attached = False

    def _env(self) -> Any:
        key = (os.getpid(), self._real)
        shared = _ENVS.get(key)
        if shared is None or (not self.readonly and not shared.writable):
            if self.readonly and not (self.folder / "data.mdb").exists():
                return None  # no writer has created it yet: every key is a miss
            if shared is None:
                _drop_inherited(self._real)
            else:
                shared.env.close()  # a writer joins this process's readers: reopen for writing, for all of them
            # readahead on (LMDB_READAHEAD): measured 1.6x faster cold reads, warm reads unchanged.
            # lock stays on in readers too: it is what keeps a writer from reusing pages a reader still reads.
            # max_spare_txns=0: no cached read transaction that a forked child could abort (see _drop_inherited).
            env = self._lmdb.open(str(self.folder), map_size=LMDB_MAP_SIZE, subdir=True, readonly=self.readonly,
                                  lock=True, readahead=LMDB_READAHEAD, max_readers=1024, max_spare_txns=0,
                                  metasync=False, sync=True, meminit=False, create=not self.readonly)
            if not self.readonly:
                env.reader_check()  # free the reader slots of killed processes, or their pages are never reused
            shared = _ENVS[key] = _SharedEnv(env, not self.readonly, shared.users if shared is not None else 0)
        if not self._attached:
            self._attached = True
            shared.users += 1
        return shared.env

    def read(self, key: bytes) -> bytes | None:
        env = self._env()
        if env is None:
            return None
        with env.begin(buffers=False) as txn:
            return txn.get(key)

    def write(self, items: list[tuple[bytes, bytes]]) -> None:
        with self._env().begin(write=True) as txn:
            for key, value in items:
                txn.put(key, value)

    def close(self) -> None:
        """Detach; the environment closes with its last store in this process."""
        key = (os.getpid(), self._real)
        shared = _ENVS.get(key)
        if self._attached and shared is not None:
            shared.users -= 1
            if shared.users <= 0:
                shared.env.close()
                del _ENVS[key]
        self._attached = False


class _FileBackend:
    def __init__(self, folder: Path, readonly: bool):
        self.folder = folder
        self.tmp = folder.parent / "tmp"
        self.errors: tuple[type[BaseException], ...] = (OSError,)
        self.readonly = readonly

    def path(self, key: bytes) -> Path:
        settings, rest = key.decode().split("/", 1)
        return self.folder / settings / rest[:3] / f"{rest}.trk"

    def read(self, key: bytes) -> bytes | None:
        try:
            with open(self.path(key), "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def write(self, items: list[tuple[bytes, bytes]]) -> None:
        for key, value in items:
            self._write_one(key, value)

    def _write_one(self, key: bytes, value: bytes) -> None:
        final = self.path(key)
        self.tmp.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"{os.getpid()}-{secrets.token_hex(6)}.tmp"
        try:
            # os.open with 0o666 honours the umask, as every file of the project does
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as handle:
                handle.write(value)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)  # readers see the old file or the new one, never a part
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def remove_stale(self) -> None:
        """Delete temporary files that killed writers left behind (old enough that no live writer owns them)."""
        with contextlib.suppress(OSError):
            for leftover in self.tmp.iterdir():
                with contextlib.suppress(OSError):
                    if time.time() - leftover.stat().st_mtime > STALE_TMP_SECONDS:
                        leftover.unlink()

    def close(self) -> None:
        pass


def _filesystem_type(path: Path) -> str:
    """The type of the file system holding `path` (the longest mount point above it in /proc/self/mounts)."""
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    best, kind = "", ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            mount = parts[1].replace("\\040", " ")
            if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, kind = mount, parts[2]
    return kind


# ----------------------------------------------------------------------------------------------------------------------


class TrackStore:
    """Tracks by (video, window, frame indices) under one set of tracker settings; see the module docstring."""

    def __init__(self, path: str | Path, settings: Mapping[str, Any], *, readonly: bool = False,
                 backend: str = "auto"):
        if backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")
        self.path = Path(path).expanduser().absolute()
        self.settings = dict(settings)
        self.key = settings_key(self.settings)
        self.readonly = readonly
        self.backend = self._choose_backend(backend)
        self._handle: _LmdbBackend | _FileBackend | None = None
        self._pid = os.getpid()
        self._corrupt_seen: set[bytes] = set()
        self.stats: dict[str, int] = {"hits": 0, "misses": 0, "corrupt": 0, "writes": 0}
        if not readonly:
            self._record_settings()

    # -- opening

    def _choose_backend(self, requested: str) -> str:
        """The backend the store folder records; for a new store `requested`, or by the file system for auto."""
        marker = self.path / _MARKER
        if self.path.exists() and not self.path.is_dir():
            raise TrackStoreError(f"{self.path}: is a file, not a track store folder")
        fs_type = _filesystem_type(self.path)
        recorded = self._read_marker(marker)
        if recorded is None:
            if self.path.is_dir() and any(self.path.iterdir()):
                raise TrackStoreError(f"{self.path}: exists, is not empty and has no {_MARKER}; refusing to use it as "
                                      "a track store (choose another tracker.store_path)")
            recorded = requested if requested != "auto" else (
                "files" if fs_type in NETWORK_FILESYSTEMS else DEFAULT_BACKEND)
        elif requested not in ("auto", recorded):
            raise TrackStoreError(f"{self.path}: is a track store of the {recorded!r} backend, not {requested!r}")
        if recorded == "lmdb" and not self.readonly and fs_type in NETWORK_FILESYSTEMS:
            raise TrackStoreError(f"{self.path}: LMDB cannot be written safely on a network file system ({fs_type}); "
                                  "use a local folder or a store made with backend='files'")
        if not self.readonly and not marker.exists():
            recorded = self._write_marker(marker, recorded)  # another rank's marker may win: it is the same choice
            if requested not in ("auto", recorded):
                raise TrackStoreError(f"{self.path}: is a track store of the {recorded!r} backend, not {requested!r}")
        return recorded

    def _read_marker(self, marker: Path) -> str | None:
        try:
            info = json.loads(marker.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise TrackStoreError(f"{marker}: unreadable track store marker ({exc})") from exc
        if not isinstance(info, dict) or info.get("kind") != _MARKER_KIND or info.get("backend") not in BACKENDS:
            raise TrackStoreError(f"{marker}: not a track store marker")
        return str(info["backend"])

    def _write_marker(self, marker: Path, backend: str) -> str:
        """Create the marker once: hard-linking a complete temporary file fails if another rank made it first."""
        text = json.dumps({"kind": _MARKER_KIND, "version": FORMAT_VERSION, "backend": backend}) + "\n"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._atomic_write_new(marker, text.encode())
        except OSError as exc:
            raise TrackStoreError(f"{self.path}: cannot create the track store ({exc.strerror or exc})") from exc
        return self._read_marker(marker) or backend

    @staticmethod
    def _atomic_write_new(path: Path, data: bytes) -> None:
        """Write `path` whole unless it exists (then leave it): temp file + link, which fails on an existing name."""
        tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _record_settings(self) -> None:
        """`settings/<key>.json`: the settings behind the key every entry carries."""
        record = self.path / "settings" / f"{self.key}.json"
        if record.exists():
            return
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(self.settings, sort_keys=True, indent=1, default=str) + "\n"
            self._atomic_write_new(record, text.encode())
        except OSError as exc:
            raise TrackStoreError(f"{self.path}: cannot write ({exc.strerror or exc})") from exc

    def _backend(self) -> _LmdbBackend | _FileBackend | None:
        """This process's handle, opened on first use; a handle inherited through fork is left alone. None while a
        read-only store has not been created by a writer yet (everything is a miss until then)."""
        if self._pid != os.getpid():  # a forked child: the parent's handle is not ours to use or close (see _ENVS)
            self._handle = None
            self._corrupt_seen = set()
            self.stats = dict.fromkeys(self.stats, 0)
            self._pid = os.getpid()
        if self._handle is None:
            if self.readonly:
                recorded = self._read_marker(self.path / _MARKER)
                if recorded is None:
                    return None
                self.backend = recorded  # the writer's choice, made after this reader was constructed
            if self.backend == "lmdb":
                self._handle = _LmdbBackend(self.path / "lmdb", self.readonly)
            else:
                self._handle = _FileBackend(self.path / "files", self.readonly)
                if not self.readonly:
                    self._handle.remove_stale()
        return self._handle

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_corrupt_seen"] = set()
        state["stats"] = dict.fromkeys(self.stats, 0)  # stats are per process
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None

    def __enter__(self) -> TrackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- entries

    def _db_key(self, video: str, window: int) -> bytes:
        # The video name is hashed to a fixed width (LMDB keys are at most 511 bytes; paths can be longer, and file
        # names must not contain '/'); the header holds the name itself, so a hash collision is a miss, not a mix-up.
        digest = hashlib.blake2b(video.encode(), digest_size=16).hexdigest()
        return f"{self.key}/{digest}-{int(window)}".encode()

    def _load(self, video: str, window: int, frame_indices: Sequence[int], arrays: bool) -> TrackEntry | bool | None:
        db_key = self._db_key(video, window)
        handle = self._backend()
        if handle is None:
            return None
        try:
            blob = handle.read(db_key)
        except handle.errors as exc:
            raise TrackStoreError(f"{self.path}: cannot read ({type(exc).__name__}: {exc})") from exc
        if blob is None:
            return None
        try:
            return decode_entry(blob, self.key, video, window, _frames(frame_indices), arrays=arrays)
        except _Corrupt as exc:
            if db_key not in self._corrupt_seen:
                self._corrupt_seen.add(db_key)
                self.stats["corrupt"] += 1
                log.warning("track store %s: corrupt entry for %s window %d (%s); it is recomputed "
                            "(%d corrupt entries seen by this process)", self.path, video, window, exc,
                            self.stats["corrupt"])
            return None

    def get(self, video: str, window: int, frame_indices: Sequence[int]) -> TrackEntry | None:
        """The stored entry, or None (absent, other settings or frame indices, or corrupt: counted and logged)."""
        entry = self._load(video, window, frame_indices, arrays=True)
        self.stats["hits" if entry is not None else "misses"] += 1
        return entry if isinstance(entry, TrackEntry) else None

    def contains(self, video: str, window: int, frame_indices: Sequence[int]) -> bool:
        """Whether get() would hit (the checksum is verified: a corrupt entry is not "contained")."""
        return self._load(video, window, frame_indices, arrays=False) is not None

    def put(self, video: str, window: int, frame_indices: Sequence[int], entry: TrackEntry) -> None:
        """Store an entry atomically (replacing one of the same key); raises ValueError on bad shapes or NaN."""
        self.put_many([(video, window, frame_indices, entry)])

    def put_many(self, items: Iterable[tuple[str, int, Sequence[int], TrackEntry]]) -> None:
        """put() of several entries; LMDB commits them in one transaction (one sync instead of one per entry: what
        bounds LMDB's write rate), all or none. Each entry is atomic either way."""
        if self.readonly:
            raise TrackStoreError(f"{self.path}: opened read-only; cannot write entries")
        encoded = [(self._db_key(video, window), encode_entry(self.key, video, window, frames, entry))
                   for video, window, frames, entry in items]
        if not encoded:
            return
        handle = self._backend()
        assert handle is not None  # a writable store's marker exists since __init__
        try:
            handle.write(encoded)
        except handle.errors as exc:  # a full disk, a full map, permissions: name the store
            raise TrackStoreError(f"{self.path}: cannot write {len(encoded)} entries ({type(exc).__name__}: {exc})"
                                  ) from exc
        self._corrupt_seen.difference_update(key for key, _ in encoded)
        self.stats["writes"] += len(encoded)

    def __repr__(self) -> str:
        return f"TrackStore({str(self.path)!r}, key={self.key}, backend={self.backend}, readonly={self.readonly})"


__all__ = ["TrackEntry", "TrackStore", "TrackStoreError", "settings_key", "MAX_COORD_ERROR", "MAX_VISIBILITY_ERROR",
           "DEFAULT_BACKEND", "BACKENDS"]
