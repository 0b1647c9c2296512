"""The feature store: one SQLite file (clips, labels, per-stage status, rejects, provenance) plus per-clip arrays and
per-key, append-only training caches that index them. Designed to stay flat in cost per clip up to VoxCeleb2 (1.09 M
clips).

Layout under `root`:
* `store.sqlite` — tables `clips`, `stages(clip_id, stage, params_hash, status, reason, updated, seq, file)`,
  `provenance(stage, json)` and `versions(stage, version)`. Every write of a stage bumps its version and stamps the
  clip's row with it (`seq`), so "what changed since the cache was built" is one indexed range query.
* `arrays/<stage>/<safe clip key>.<token>.npz` — one file per clip and stage, the unit of resumable work and the
  only copy of its arrays (the copy of record). A write never replaces a file: it writes a new name (a new random
  token), and the row records the name (`file`). Each file also holds `__meta__` (clip id, stage, parameter hash),
  so a file can be checked against its row.
* `arrays/<stage>.cache/<key>/<lo>-<hi>.npy` — training caches: an index into those files, not a copy of them. One
  folder per array key, built lazily on the first `load_stacked` that asks for that key. A segment lists the clips
  written with `lo < seq <= hi`, for each the token of its file and where the key's array lies in it (byte offset,
  first-axis length, order: np.savez stores arrays uncompressed, so an array is one pread), then a JSON trailer:
  clip ids, clips removed since, dtype and shape beyond the first axis. New clips append a new segment; a
  re-written clip is found in the newest segment that has it. A segment is one file, published complete under its
  final name by a hard link that fails if the name exists: the first builder wins and a name's content never
  changes, so any number of processes, on any host, read while another builds. A batch is one open and one pread
  a clip and key, zero-padded in memory. The caches are derived: removing them costs a rebuild (headers only).
* `locks/<stage>.lock` — the writer lock of a stage (see below).
* Audio has its own stage (`audio`, written by preprocessing and read one clip at a time by feature extraction)
  and is never part of a training cache: 24 s of 16 kHz float32 is 1.5 MB a clip, 1.6 TB for VoxCeleb2 dev.

Crash safety (any kill point, `benchmarks/faults.py` injects them): `put_many` writes the new files (temp name,
fsync, rename, fsync of the folder), then commits the rows that name them in one transaction (synchronous=FULL),
then removes the files the rows named before. Killed before the commit, the rows still name the old files, which
are untouched; after it, the rows name the new ones. Either way a row and its file agree; what is left is a file
no row names (an orphan) or a temp file, which `check` reports and `check --repair` removes. `get` reads the file
the row names and verifies its `__meta__`, so it never returns arrays of a hash other than the row's.

One copy of record, so one protocol: the per-clip file is the only copy of a clip's arrays (store format 4; format
3's caches held a second copy, 284 KB a clip in all for the paper's stages). A cache entry is made from the file its
row names, after the same `__meta__` check, and a file's content never changes under its name, so an entry reads
the arrays of that row or, when the clip has been re-written since (its old file removed after the commit), finds
no file: `load_stacked` then reads the stage's version again and looks again, and a file missing with no write
since is reported (it is a `missing` row for `check`). Nothing a kill leaves in the caches is read: a segment
exists whole or not at all, and a temp file of a killed build is reported and removed like any other.

One writer per stage: the first write of a stage by a `Store` takes `locks/<stage>.lock` (`fcntl.flock`, released
by the kernel when the process dies; the file says host, pid and command) and holds it until `Store.close()`, the
end of a `with Store(...)` block or the instance's garbage collection; any number of instances in one process share
it. A second process that writes the stage is refused with a message naming the holder. A lock whose pid is dead on
this host (held on only by a forked child) is stale and taken over. Readers never lock. The grid holds
`results/<grid>/.grid.lock` for a whole `grid run` (a second run on the same results folder is refused the same
way); the notebooks it runs are other processes that take the stage locks as they write, so the grid's own
kernels are never refused by the grid's lock, and two steps that write different stages run at once.

Why not Zarr: the arrays here are small per clip and read by random fancy index; per-clip .npz files with
append-only index segments under a SQLite index give the same properties (chunked, appendable, concurrent readers,
one copy of the data) with numpy alone, and keep one source of truth for what is done (the `stages` table).

Concurrency: `journal_mode` is a parameter (`store.journal_mode` in a grid file), applied on every connection.
WAL (default) lets readers and one writer work at once on one host; it needs shared memory, so a store on a network
filesystem shared by several nodes must use `delete` (rollback journal with file locks). Leaving WAL needs the only
connection to the database: while another process has it open the switch is refused with that reason. `check` and
`migrate` keep whatever mode the store has. `Store.get` is one indexed query on a cached connection and one file.

A store from a previous format (1: audio inside `preprocess`; 2: no file names in the rows; 3: caches that copy
every array) is refused with the command that migrates it: `python -m slf_utils.store migrate RESULTS/store`
(nothing is recomputed). `python -m slf_utils.store check RESULTS/store [--repair]` verifies every done row's file
against the row.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sqlite3
import struct
import sys
import threading
import time
import weakref
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from slf_utils.config import exists

CLIP_COLUMNS = ("clip_id", "identity", "split", "video", "audio", "face", "gender", "age", "ethnicity", "language")
LABEL_COLUMNS = ("gender", "age", "ethnicity", "language")
ETHNICITIES = ("asian", "indian", "black", "white", "middle eastern", "latino hispanic")
_GENDERS = {
    "man": "man",
    "male": "man",
    "m": "man",
    "men": "man",
    "woman": "woman",
    "female": "woman",
    "f": "woman",
    "women": "woman",
    "w": "woman",
}

AUDIO_STAGE = "audio"  # read per clip with `get`, never cached for batches
SEGMENT_ROWS = 50_000  # clips per cache segment file: bounds the cost of one build, whatever the corpus size
JOURNAL_MODES = ("wal", "delete", "truncate", "persist")
SCHEMA_VERSION = 4  # 1: audio inside `preprocess`; 2: rows without file names; 3: caches copied the arrays
META = "__meta__"  # the entry of each array file that says which clip, stage and parameter hash it holds
_TRAILER = struct.Struct("<Q8s")  # a cache segment ends with its JSON's length and this magic
# a cache entry: where one clip's array lies in its file (<safe key>.<token>.npz)
_ENTRY = np.dtype([("token", "S8"), ("offset", "<u8"), ("length", "<u4"), ("fortran", "?")])
_MAGIC = b"SLFIDX01"  # format 3's segments (SLFSEG01) held copies of the arrays
_SCHEMA = """
CREATE TABLE IF NOT EXISTS clips (
    clip_id TEXT PRIMARY KEY, identity TEXT, split TEXT, video TEXT, audio TEXT, face TEXT,
    gender TEXT, age REAL, ethnicity TEXT, language TEXT, extra TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS stages (
    clip_id TEXT NOT NULL, stage TEXT NOT NULL, params_hash TEXT NOT NULL, status TEXT NOT NULL,
    reason TEXT, updated REAL NOT NULL, seq INTEGER NOT NULL DEFAULT 0, file TEXT, PRIMARY KEY (clip_id, stage));
CREATE INDEX IF NOT EXISTS stages_by_stage ON stages (stage, status, params_hash);
CREATE INDEX IF NOT EXISTS stages_by_seq ON stages (stage, seq);
CREATE TABLE IF NOT EXISTS provenance (stage TEXT PRIMARY KEY, json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (stage TEXT PRIMARY KEY, version INTEGER NOT NULL);
"""


class StoreFormatError(RuntimeError):
    """The store on disk was written by an older workbook (or is not a store); the message says what to run."""


class StoreError(RuntimeError):
    """The store cannot do this now (a journal mode switch, a file that disagrees with its row); says why."""


class StoreLocked(RuntimeError):
    """Another process holds the writer lock; the message names it and says how to clear a stale lock."""


# ---------------------------------------------------------------------- files: temp names, fsync, atomic publication
_HOST = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "host"


def _alive(pid) -> bool:
    """Whether a process of this host runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(int(pid), 0)
    except PermissionError:  # exists, another user's
        return True
    except (OSError, TypeError, ValueError):
        return False
    try:
        return Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _tmp(path: Path) -> Path:
    """A temp name beside `path` that says who writes it, so a cleanup can tell a dead writer's leftover from a
    write in progress: `.<name>+<pid>+<host>+<random>.tmp`."""
    return path.parent / f".{path.name}+{os.getpid()}+{_HOST}+{os.urandom(4).hex()}.tmp"


def _is_temp(name: str) -> bool:
    return name.startswith(".") and ".tmp" in name


def _stale_temp(path: Path, min_age_s=3600) -> bool:
    """A temp file no live process is writing: its writer's pid is dead on this host; an untagged one (older
    workbooks) or another host's once it is `min_age_s` old."""
    parts = path.name.removesuffix(".tmp").split("+")
    if len(parts) == 4 and parts[2] == _HOST:
        return not _alive(parts[1])
    try:
        return time.time() - path.stat().st_mtime > min_age_s
    except FileNotFoundError:
        return False


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_all(paths) -> None:
    """fsync many files at once: a few in flight share the filesystem's journal commits (0.2 ms a file, not 2)."""
    paths = list(paths)
    if len(paths) < 4:
        for p in paths:
            _fsync(p)
        return
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(_fsync, paths))


def _write(path: Path, write_fn, sync=True, replace=True) -> bool:
    """write_fn(tmp) then publish as `path`: readers never see a half-written file. With `replace=False` the name is
    created only if it does not exist (a hard link; False when another process published it first)."""
    tmp = _tmp(path)
    try:
        write_fn(tmp)
        if sync:
            _fsync(tmp)
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: last writer wins (the contents are equivalent)
            os.replace(tmp, path)
            return True
    finally:
        if tmp.exists():
            tmp.unlink()


def _save_npz(path: Path, arrays: dict, meta: dict | None, sync=True) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays, **({META: np.array(json.dumps(meta, sort_keys=True))} if meta else {}))

    _write(path, write, sync=sync)


def _npz_meta(z) -> dict | None:
    return json.loads(str(z[META])) if META in z.files else None


def _file_name(clip_id, token: str = "") -> str:
    """A clip's array file: `<safe key>.<token>.npz`, a new random token for each write (`<safe key>.npz`: a file
    that a migration named)."""
    return f"{safe_key(clip_id)}.{token}.npz" if token else f"{safe_key(clip_id)}.npz"


def _npz_layout(path) -> tuple[dict, dict | None]:
    """({key: (offset, shape, dtype, fortran_order)}, `__meta__`) of an .npz, from its headers alone: `offset` is
    where the key's array data starts in the file. np.savez stores its members uncompressed, so each array's bytes
    are contiguous on disk and a batch read is one pread a clip."""
    arrays, meta = {}, None
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        for info in zf.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise StoreError(f"{path}: {info.filename} is compressed (the store writes uncompressed arrays)")
            f.seek(info.header_offset)
            local = f.read(30)  # the local file header: its name and extra field lengths vary
            if local[:4] != b"PK\x03\x04":
                raise StoreError(f"{path}: not a zip member at {info.header_offset}")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            key = info.filename.removesuffix(".npy")
            if key == META:
                meta = json.loads(str(np.frombuffer(f.read(dtype.itemsize), dtype)[0]))
            else:
                arrays[key] = (f.tell(), shape, dtype, fortran)
    return arrays, meta


def _fsync_dir(d) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- the writer lock
_held: dict = {}  # lock path -> [pid, fd, holders]: instances of one process share a lock


class WriterLock:
    """An exclusive, advisory lock on `path` (`fcntl.flock`: the kernel releases it when the process dies). The file
    records the holder (host, pid, command); a refused process gets them in the message. Reentrant within a
    process. `with WriterLock(path, what):` or `acquire()`/`release()`."""

    def __init__(self, path, what: str):
        self.path, self.what, self.held = Path(path), what, False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        self.release()

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self, wait_s: float = 2.0):
        """Take the lock or raise StoreLocked. Waits up to `wait_s` (a `check` may be probing it for a moment)."""
        if self.held:
            return self
        got = _held.get(str(self.path))
        if got and got[0] == os.getpid():
            got[2] += 1
            self.held = True
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait_s
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = self._holder()
                same = _same_file(fd, self.path)
                os.close(fd)
                if same and info.get("host") == _HOST and not _alive(info.get("pid")):
                    # stale: its holder died and a forked child of it keeps the flock; a new file is a new lock
                    self.path.unlink(missing_ok=True)
                    continue
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise StoreLocked(self._refusal(info)) from None
            if not _same_file(fd, self.path):  # another process took a stale lock over meanwhile: try again
                os.close(fd)
                continue
            info = {"host": _HOST, "pid": os.getpid(), "command": " ".join(sys.argv)[:300], "what": self.what}
            info["since"] = time.strftime("%Y-%m-%d %H:%M:%S")
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            _held[str(self.path)] = [os.getpid(), fd, 1]
            self.held = True
            return self

    def _refusal(self, info) -> str:
        who = f"pid {info.get('pid', '?')} on {info.get('host', '?')} ({info.get('command', '?')!r}, since "
        who += f"{info.get('since', '?')}: {info.get('what', '?')})"
        return (
            f"{self.what}: refused, {who} holds {self.path}. One writer at a time: wait for it to finish or stop it. "
            f"If that process no longer exists (its host crashed), remove {self.path} and retry; on this host a "
            "dead holder's lock is taken over by itself."
        )

    def release(self):
        if not self.held:
            return
        self.held = False
        got = _held.get(str(self.path))
        if not got or got[0] != os.getpid():
            return
        got[2] -= 1
        if got[2] == 0:
            del _held[str(self.path)]
            fcntl.flock(got[1], fcntl.LOCK_UN)
            os.close(got[1])


def _same_file(fd, path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _lock_busy(path) -> bool:
    """Whether another process holds the lock at `path` (taken and released at once if free)."""
    got = _held.get(str(path))
    if (got and got[0] == os.getpid()) or not Path(path).exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")  # compiled once: a batch read names a file a clip


def safe_key(clip_id: str) -> str:
    """A file-name-safe, injective key for a clip id: `id00003/abc/00001` -> `id00003__abc__00001`.

    Ids that need more than replacing '/' (non-ASCII, spaces, '__', very long) keep a readable prefix and get a
    hash suffix, so two different ids never share a file."""
    s = str(clip_id)
    key = s.replace("/", "__")
    clean = _UNSAFE.sub("_", key).lstrip(".")
    if clean != key or "__" in s or len(clean) > 120 or not clean:
        clean = f"{clean[:100]}-{hashlib.sha1(s.encode()).hexdigest()[:10]}"
    return clean


def normalise_gender(g):
    """`Man`/`man`/`M`/`male` -> `man`; `Woman`/`F`/`female` -> `woman`; empty -> None."""
    if not exists(g) or (isinstance(g, float) and np.isnan(g)):
        return None
    g = str(g).strip().lower()
    if not g:
        return None
    if g not in _GENDERS:
        raise ValueError(f"unknown gender label {g!r} (expected man/woman or m/f/male/female)")
    return _GENDERS[g]


def normalise_ethnicity(e):
    if not exists(e) or (isinstance(e, float) and np.isnan(e)):
        return None
    e = str(e).strip().lower().replace("_", " ")
    if not e:
        return None
    if e not in ETHNICITIES:
        raise ValueError(f"unknown ethnicity {e!r} (deepface classes: {', '.join(ETHNICITIES)})")
    return e


def _clean(v):
    """NaN/empty -> None so SQLite stores NULL; numpy scalars -> Python scalars."""
    if v is None:
        return None
    if isinstance(v, float) and np.isnan(v):
        return None
    if isinstance(v, np.generic):
        return _clean(v.item())
    if isinstance(v, str) and not v.strip():
        return None
    return v


def _normalise_label(col, v):
    v = _clean(v)
    if col == "gender":
        return normalise_gender(v)
    if col == "ethnicity":
        return normalise_ethnicity(v)
    if col == "age":
        return None if v is None else float(v)
    return None if v is None else str(v)


def _segment_meta(path) -> dict:
    """The JSON trailer of a cache segment (clip ids, lengths, removed ids); raises if the file is not whole."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size < _TRAILER.size:
            raise ValueError(f"{path}: truncated segment")
        f.seek(size - _TRAILER.size)
        n, magic = _TRAILER.unpack(f.read(_TRAILER.size))
        if magic != _MAGIC or n > size - _TRAILER.size:
            raise ValueError(f"{path}: not a complete cache segment")
        f.seek(size - _TRAILER.size - n)
        return json.loads(f.read(n))


def _read_arrays(folder: Path, clip_ids, entries: np.ndarray, out: np.ndarray) -> None:
    """out[j, :length] = the array of clip_ids[j], read from its file where its cache entry says: one open and one
    pread a clip (names resolved in the stage's folder, opened once), not mapped, so a process's resident memory
    holds the batches it asked for and nothing more. A file removed since the entry was made (its clip was
    re-written) raises FileNotFoundError."""
    frame = out.dtype.itemsize * int(np.prod(out.shape[2:], dtype=np.int64))
    fields = (entries[f].tolist() for f in ("token", "offset", "length", "fortran"))
    folder_fd = os.open(folder, os.O_RDONLY)
    try:
        for j, (cid, token, offset, n, fortran) in enumerate(zip(clip_ids, *fields)):
            want = n * frame if out.ndim > 1 else out.dtype.itemsize
            fd = os.open(_file_name(cid, token.decode()), os.O_RDONLY, dir_fd=folder_fd)
            try:
                buf = os.pread(fd, want, offset)
            finally:
                os.close(fd)
            if len(buf) < want:
                raise StoreError(f"{folder}/{_file_name(cid, token.decode())}: truncated (`check` lists such files)")
            a = np.frombuffer(buf, out.dtype)
            if out.ndim == 1:
                out[j] = a[0]
            elif fortran:  # saved column-major as it came (put_many keeps an array's order)
                out[j, :n] = a.reshape((n, *out.shape[2:])[::-1]).T
            else:
                out[j, :n] = a.reshape(n, *out.shape[2:])
    finally:
        os.close(folder_fd)


_SEGMENT = re.compile(r"\d{12}-\d{12}")


def _segment_range(name: str) -> tuple[int, int]:
    lo, hi = name.split("-")
    return int(lo), int(hi)


_readers: dict = {}  # (db, identity, journal mode) -> [pid, connection, its lock]: `get`'s cached connection
_prepared: set = set()  # (db, identity) whose format this process has checked


def _identity(db) -> tuple[int, int] | None:
    """(inode, ctime): a store deleted and created again at the same path (whose inode may be reused) is another
    database, and a cached connection to the old one is stale. By stat alone: opening and closing the database file
    with a descriptor of our own would drop every POSIX lock this process's SQLite connections hold on it (POSIX locks
    are per process and file), and another process could then checkpoint and delete the WAL under them (a "database
    disk image is malformed" seen in the notebook tests). ctime also moves when a checkpoint writes the file: a cached
    connection is then simply opened again."""
    try:
        st = os.stat(db)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_ctime_ns


def _close_readers(db) -> None:
    for key in [k for k in _readers if k[0] == str(db)]:
        pid, con, lock = _readers.pop(key)
        if pid == os.getpid():
            with lock:
                con.close()


class Store:
    def __init__(self, root, journal_mode: str | None = "wal"):
        """`journal_mode`: one of JOURNAL_MODES, applied on every connection; None keeps the store's own (check,
        migrate)."""
        if journal_mode is not None and journal_mode not in JOURNAL_MODES:
            raise ValueError(f"store.journal_mode must be one of {', '.join(JOURNAL_MODES)}, got {journal_mode!r}")
        self.root = Path(root)
        self.db = self.root / "store.sqlite"
        self.arrays = self.root / "arrays"
        self.journal_mode = journal_mode
        self.arrays.mkdir(parents=True, exist_ok=True)
        self._ready = False  # the schema is checked on first use
        self._caches = {}  # (stage, key) -> (version, its segments newest first)
        self._seg = {}  # (stage, key, segment name) -> loaded segment (segments never change once built)
        self._keys = {}  # stage -> its array keys
        self._locks = {}  # stage -> its WriterLock, taken on the first write of the stage
        weakref.finalize(self, _release_all, self._locks)

    def __repr__(self):
        return f"Store({str(self.root)!r})"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Release the stage writer locks this instance holds (the store stays usable; a write takes them again)."""
        _release_all(self._locks)

    # pickling: only the root travels to Dask workers / subprocesses, caches are rebuilt there, locks are not held
    def __getstate__(self):
        return {"root": self.root, "journal_mode": self.journal_mode}

    def __setstate__(self, state):
        self.__init__(state["root"], state.get("journal_mode", "wal"))

    def _open(self):
        con = sqlite3.connect(self.db, timeout=0, isolation_level=None, check_same_thread=False)
        try:
            self._apply_journal_mode(con)
        except BaseException:
            con.close()
            raise
        con.execute("PRAGMA busy_timeout=60000")
        con.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the files it replaced are removed
        return con

    def _apply_journal_mode(self, con):
        """Set the journal mode on this connection (rollback modes are per connection, WAL is kept in the file).
        Leaving or entering WAL needs the only connection to the database: retried for 2 s, then refused."""
        mode = self.journal_mode
        if mode is None:
            return
        for attempt in range(40):
            try:
                if con.execute(f"PRAGMA journal_mode={mode}").fetchone()[0] == mode:
                    return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
            if attempt == 0:
                _close_readers(self.db)  # this process's own cached connections must not block the switch
            time.sleep(0.05)
        now = con.execute("PRAGMA journal_mode").fetchone()[0]
        raise StoreError(
            f"{self.root}: cannot switch the journal mode from {now} to {mode} now: "
            f"{'leaving' if now == 'wal' else 'entering'} WAL needs the only connection to the database, and another "
            f"process has this store open. Stop its other readers and writers first, or open it with "
            f"journal_mode={now}."
        )

    def _prepare(self):
        """Create the schema in a new store, refuse an old one (once per process and database file)."""
        if (str(self.db), _identity(self.db)) in _prepared:
            self._ready = True
            return
        con = self._open()
        try:
            found = con.execute("PRAGMA user_version").fetchone()[0]
            if 0 < found < SCHEMA_VERSION:
                what = {1: "audio inside the preprocess stage, one cache per stage", 2: "rows without file names"}
                what[3] = "training caches that copy every array"
                raise StoreFormatError(
                    f"{self.root}: store format {found} ({what.get(found, 'older')}); this workbook reads format "
                    f"{SCHEMA_VERSION}. Migrate it in place (nothing is recomputed): "
                    f"python -m slf_utils.store migrate {self.root}"
                )
            if found > SCHEMA_VERSION:
                raise StoreFormatError(f"{self.root}: store format {found} is newer than this workbook's; update it")
            if found == 0:
                app = int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF
                con.executescript(_SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION}; PRAGMA application_id={app};")
                con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the id into the file's header now (WAL keeps it)
        finally:
            con.close()
        _prepared.add((str(self.db), _identity(self.db)))
        self._ready = True

    @contextmanager
    def _connect(self):
        if not self._ready:
            self._prepare()
        con = self._open()
        try:
            yield con
        finally:
            con.close()

    def _reader(self):
        """This process's cached connection to the store ([pid, connection, lock]): `get` costs one query. Read-only:
        closing it never checkpoints nor deletes the WAL by its path, which, were the store deleted and created
        again at the same path, would be another database's. The journal mode is the writers' business."""
        if not self._ready:
            self._prepare()
        key = (str(self.db), _identity(self.db), self.journal_mode)
        got = _readers.get(key)
        if got is None or got[0] != os.getpid():  # a forked child never uses its parent's connection
            _close_readers(self.db)  # another database at this path now, or a parent's: not used again
            con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
            con.execute("PRAGMA busy_timeout=60000")
            got = _readers[key] = [os.getpid(), con, threading.Lock()]
        return got

    @contextmanager
    def _transaction(self):
        """A short write transaction. BEGIN IMMEDIATE takes the write lock up front so concurrent writers queue on
        the busy timeout instead of failing on lock upgrade."""
        with self._connect() as con:
            for attempt in range(20):
                try:
                    con.execute("BEGIN IMMEDIATE")
                    break
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) or attempt == 19:
                        raise
                    time.sleep(0.05 * (attempt + 1))
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def _stage_lock(self, stage):
        """Take (once) the writer lock of a stage, and clear the temp files that dead writers left there."""
        if stage not in self._locks:
            lock = WriterLock(
                self.root / "locks" / f"{safe_key(stage)}.lock", f"writing stage {stage!r} of {self.root}"
            )
            self._locks[stage] = lock.acquire()
            d = self.arrays / stage
            for e in os.scandir(d) if d.is_dir() else ():
                if _is_temp(e.name) and _stale_temp(Path(e.path), min_age_s=86400):
                    Path(e.path).unlink(missing_ok=True)

    def _query(self, sql, args=()) -> pd.DataFrame:
        with self._connect() as con:
            return pd.read_sql_query(sql, con, params=args)

    # ------------------------------------------------------------------ clips and labels
    def add_clips(self, df: pd.DataFrame):
        """Upsert clip rows. Known columns go to their column, other columns (e.g. voice_set) into `extra`.
        A value that is empty in `df` does not erase a stored one: re-adding the manifest on a rerun keeps the
        labels that preprocessing estimated (e.g. age)."""
        rows = []
        for rec in df.to_dict("records"):
            if not exists(_clean(rec.get("clip_id"))):
                raise ValueError("add_clips: every row needs a clip_id")
            row = {c: _normalise_label(c, rec.get(c)) for c in CLIP_COLUMNS}
            extra = {k: _clean(v) for k, v in rec.items() if k not in CLIP_COLUMNS}
            row["extra"] = json.dumps({k: v for k, v in extra.items() if exists(v)}, default=str, sort_keys=True)
            rows.append(row)
        if not rows:
            return
        cols = (*CLIP_COLUMNS, "extra")
        sql = (
            f"INSERT INTO clips ({', '.join(cols)}) VALUES ({', '.join(':' + c for c in cols)}) "
            "ON CONFLICT(clip_id) DO UPDATE SET "
            + ", ".join(f"{c}=COALESCE(excluded.{c}, clips.{c})" for c in CLIP_COLUMNS if c != "clip_id")
            + ", extra=json_patch(clips.extra, excluded.extra)"
        )
        with self._transaction() as con:
            con.executemany(sql, rows)

    def clips(self, split=None, stage=None) -> pd.DataFrame:
        """Clip table, optionally only one split and/or only clips whose `stage` is done. Extra columns from
        `extra` are expanded; ordered by clip_id."""
        sql = f"SELECT {', '.join('c.' + c for c in CLIP_COLUMNS)}, c.extra FROM clips c"
        args = []
        if exists(stage):
            sql += " JOIN stages s ON s.clip_id = c.clip_id AND s.stage = ? AND s.status = 'done'"
            args.append(stage)
        if exists(split):
            sql += " WHERE c.split = ?"
            args.append(split)
        df = self._query(sql + " ORDER BY c.clip_id", args)
        extra = pd.DataFrame([json.loads(x) for x in df.pop("extra")], index=df.index)
        df = pd.concat([df, extra[[c for c in extra.columns if c not in df.columns]]], axis=1)
        df["age"] = df["age"].astype(float)
        return df

    def update_labels(self, clip_id, **labels):
        """Set labels of one clip (e.g. age=31.0, gender="Man"); unknown keys are kept in `extra`."""
        known = {k: _normalise_label(k, v) for k, v in labels.items() if k in CLIP_COLUMNS and k != "clip_id"}
        other = {k: _clean(v) for k, v in labels.items() if k not in CLIP_COLUMNS}
        with self._transaction() as con:
            cur = con.execute("SELECT extra FROM clips WHERE clip_id = ?", (clip_id,)).fetchone()
            if cur is None:
                raise KeyError(f"update_labels: unknown clip {clip_id!r}")
            if known:
                con.execute(
                    f"UPDATE clips SET {', '.join(f'{k} = ?' for k in known)} WHERE clip_id = ?",
                    (*known.values(), clip_id),
                )
            if other:
                extra = {**json.loads(cur[0]), **other}
                con.execute(
                    "UPDATE clips SET extra = ? WHERE clip_id = ?",
                    (json.dumps(extra, default=str, sort_keys=True), clip_id),
                )

    # ------------------------------------------------------------------ stage status and arrays
    # ------------------------------------------------------------------ stage status and arrays
    def _row(self, clip_id, stage):
        """(file, params_hash) of a done clip, None otherwise: one query by primary key on the cached connection."""
        sql = "SELECT file, params_hash FROM stages WHERE clip_id = ? AND stage = ? AND status = 'done'"
        _, con, lock = self._reader()
        try:
            with lock:
                return con.execute(sql, (str(clip_id), stage)).fetchone()
        except sqlite3.OperationalError:  # e.g. a killed writer's hot journal, which only a writable one rolls back
            _close_readers(self.db)
            with self._connect() as con:
                return con.execute(sql, (str(clip_id), stage)).fetchone()

    def path(self, clip_id, stage) -> Path:
        """The array file of a done clip (where its row says); for any other clip, where a legacy file would be."""
        row = self._row(clip_id, stage)
        return self.arrays / stage / (row[0] if row and row[0] else _file_name(clip_id))

    def _set_status(self, con, clip_id, stage, params_hash, status, reason, file=None):
        """Upsert a row; returns the file the row named before (to remove once the transaction is committed)."""
        con.execute(
            "INSERT INTO versions (stage, version) VALUES (?, 1) "
            "ON CONFLICT(stage) DO UPDATE SET version = version + 1",
            (stage,),
        )
        (seq,) = con.execute("SELECT version FROM versions WHERE stage = ?", (stage,)).fetchone()
        old = con.execute("SELECT file FROM stages WHERE clip_id = ? AND stage = ?", (clip_id, stage)).fetchone()
        con.execute(
            "INSERT INTO stages (clip_id, stage, params_hash, status, reason, updated, seq, file) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(clip_id, stage) DO UPDATE SET "
            "params_hash=excluded.params_hash, status=excluded.status, reason=excluded.reason, "
            "updated=excluded.updated, seq=excluded.seq, file=excluded.file",
            (clip_id, stage, params_hash, status, reason, time.time(), seq, file),
        )
        return old[0] if old and old[0] != file else None

    def put(self, clip_id, stage, arrays: dict, params_hash: str):
        """Write the arrays of one clip and stage and mark it done (see `put_many`)."""
        self.put_many(stage, [(clip_id, arrays)], params_hash)

    def put_many(self, stage, items, params_hash: str):
        """`put` for several clips of one stage, [(clip_id, arrays)], marked done in one transaction. New files
        first (new names, on disk), then the rows that name them, then the old files go: a kill at any point leaves
        each row with the file it names, and at most files no row names (removed by `check --repair`)."""
        items = {str(cid): {k: np.asarray(v) for k, v in arrays.items()} for cid, arrays in items}  # last one wins
        for cid, arrays in items.items():
            if stage != AUDIO_STAGE and AUDIO_STAGE in arrays:
                raise ValueError(f"{stage}/{cid}: audio goes to its own stage ('{AUDIO_STAGE}'), never a cached one")
            if META in arrays:
                raise ValueError(f"{stage}/{cid}: {META!r} is the store's own entry")
        if not items:
            return
        self._stage_lock(stage)
        d = self.arrays / stage
        d.mkdir(parents=True, exist_ok=True)
        names, old, committed = {}, [], False
        try:
            for cid, arrays in items.items():
                names[cid] = _file_name(cid, os.urandom(4).hex())
                meta = {"clip_id": cid, "stage": stage, "params_hash": params_hash}
                _save_npz(d / names[cid], arrays, meta, sync=False)
            _fsync_all(d / n for n in names.values())  # the files are on disk before a row names them
            _fsync_dir(d)
            with self._transaction() as con:
                old = [self._set_status(con, cid, stage, params_hash, "done", None, n) for cid, n in names.items()]
            committed = True
        finally:
            if not committed:
                for n in names.values():
                    (d / n).unlink(missing_ok=True)
        for f in old:
            if f:
                (d / f).unlink(missing_ok=True)

    def reject(self, clip_id, stage, reason: str, params_hash: str, retry: bool = False):
        """Record why a clip cannot be used. `retry=True` (status `failed`: an unexpected error rather than bad
        input) keeps the reason but lets the next run try the clip again."""
        self._stage_lock(stage)
        with self._transaction() as con:
            old = self._set_status(
                con, str(clip_id), stage, params_hash, "failed" if retry else "rejected", str(reason)
            )
        if old:
            (self.arrays / stage / old).unlink(missing_ok=True)

    def done(self, stage, params_hash) -> set[str]:
        with self._connect() as con:
            rows = con.execute(
                "SELECT clip_id FROM stages WHERE stage = ? AND status = 'done' AND params_hash = ?",
                (stage, params_hash),
            ).fetchall()
        return {r[0] for r in rows}

    def finished(self, stage, params_hash) -> set[str]:
        """Done or rejected with these parameters: what a rerun skips."""
        with self._connect() as con:
            rows = con.execute(
                "SELECT clip_id FROM stages WHERE stage = ? AND params_hash = ? AND status != 'failed'",
                (stage, params_hash),
            ).fetchall()
        return {r[0] for r in rows}

    def status(self, stage=None) -> pd.DataFrame:
        """All stage rows (clip_id, stage, params_hash, status, reason, updated, seq)."""
        if exists(stage):
            return self._query("SELECT * FROM stages WHERE stage = ? ORDER BY clip_id", (stage,))
        return self._query("SELECT * FROM stages ORDER BY stage, clip_id")

    def summary(self) -> pd.DataFrame:
        """Counts per stage and status (for the notebooks' summary tables)."""
        df = self._query("SELECT stage, status, COUNT(*) AS n FROM stages GROUP BY stage, status")
        if df.empty:
            return pd.DataFrame(columns=["done", "rejected", "failed"])
        return (
            df.pivot(index="stage", columns="status", values="n")
            .reindex(columns=["done", "rejected", "failed"])
            .fillna(0)
            .astype(int)
        )

    def rejects(self) -> pd.DataFrame:
        return self._query("SELECT clip_id, stage, reason FROM stages WHERE status != 'done' ORDER BY stage, clip_id")

    def get(self, clip_id, stage) -> dict[str, np.ndarray]:
        """One clip's arrays of one stage: the file its row names (one indexed query on a cached connection),
        verified to hold this clip, stage and parameter hash."""
        for _ in range(5):
            row = self._row(clip_id, stage)
            if row is None:
                raise KeyError(f"{stage}: no arrays for clip {clip_id!r} (not done or rejected)")
            try:
                with np.load(self.arrays / stage / row[0]) as z:
                    out = {k: z[k] for k in z.files if k != META}
                    meta = _npz_meta(z)
            except FileNotFoundError:
                continue  # re-written by another process between the query and the read: ask again
            _verify(meta, clip_id, stage, row[1], self.arrays / stage / row[0])
            return out
        raise StoreError(f"{stage}/{clip_id}: its file keeps changing under this read")

    # ------------------------------------------------------------------ per-key, append-only training caches
    def version(self, stage) -> int:
        with self._connect() as con:
            row = con.execute("SELECT version FROM versions WHERE stage = ?", (stage,)).fetchone()
        return row[0] if row else 0

    def _cache_dir(self, stage, key=None) -> Path:
        d = self.arrays / f"{stage}.cache"
        return d / key if exists(key) else d

    def keys(self, stage) -> list[str]:
        """The array keys of a stage (read once from one done clip's file header)."""
        if stage not in self._keys:
            with self._connect() as con:
                row = con.execute("SELECT file FROM stages WHERE stage = ? AND status = 'done' LIMIT 1", (stage,))
                row = row.fetchone()
            if not row:
                return []
            self._keys[stage] = list(_npz_layout(self.arrays / stage / row[0])[0])
        return self._keys[stage]

    def _segments(self, stage, key) -> list[tuple[int, int]]:
        """The chain of built segments (lo, hi) from seq 0 upwards. A segment appears complete under its name (by a
        hard link that the first builder wins), so whatever has the name is whole."""
        names = (p.stem for p in self._cache_dir(stage, key).glob("*-*.npy"))
        built = sorted(_segment_range(n) for n in names if _SEGMENT.fullmatch(n))  # not another writer's temp file
        chain, at = [], 0
        for lo, hi in built:
            if lo == at:
                chain.append((lo, hi))
                at = hi
            elif lo < at < hi:  # a wider segment built by another process: take the part after `at` from it
                chain.append((lo, hi))
                at = hi
        return chain

    def _build_segments(self, stage, key, after: int, upto: int):
        """Append index segments for the clips written with after < seq <= upto: for each, the token of the file its
        row names and where the key's array lies in it (offset, first-axis length, order), from the file's headers
        alone, checked against the row. A file removed meanwhile (its clip was re-written, so a later segment has
        it) is listed as removed here."""
        with self._connect() as con:
            rows = con.execute(
                "SELECT clip_id, status, seq, file, params_hash FROM stages WHERE stage = ? AND seq > ? AND seq <= ? "
                "ORDER BY seq",
                (stage, after, upto),
            ).fetchall()
        d = self._cache_dir(stage, key)
        d.mkdir(parents=True, exist_ok=True)
        for start in range(0, max(len(rows), 1), SEGMENT_ROWS):
            part = rows[start : start + SEGMENT_ROWS]
            hi = upto if start + SEGMENT_ROWS >= len(rows) else part[-1][2]
            ids, entries, removed = [], [], [cid for cid, status, *_ in part if status != "done"]
            form, scalar = None, False  # (dtype, shape beyond the first axis): one per segment
            for cid, status, _, file, h in part:
                if status != "done":
                    continue
                path = self.arrays / stage / file
                try:
                    arrays, meta = _npz_layout(path)
                except FileNotFoundError:
                    removed.append(cid)
                    continue
                _verify(meta, cid, stage, h, path)
                if key not in arrays:
                    raise KeyError(f"{stage}/{cid}: no array {key!r}; has {sorted(arrays)}")
                offset, shape, dtype, fortran = arrays[key]
                if form is not None and form != (dtype, shape[1:]):
                    raise ValueError(f"{stage}/{key}: arrays differ in dtype or beyond the first axis: {form}, {cid}")
                form, scalar = (dtype, shape[1:]), not shape
                token = file.removeprefix(safe_key(cid)).removesuffix(".npz").lstrip(".")
                if _file_name(cid, token) != file or len(token) > _ENTRY["token"].itemsize:
                    raise StoreError(f"{stage}/{cid}: its row names {file!r}, not a name the store gives")
                ids.append(cid)
                entries.append((token, offset, shape[0] if shape else 1, fortran))
            trailer = {"clip_ids": ids, "removed": removed, "scalar": scalar}
            if form is not None:
                trailer.update(dtype=np.lib.format.dtype_to_descr(form[0]), tail=list(form[1]))

            index, blob = np.array(entries, dtype=_ENTRY), json.dumps(trailer).encode()

            def write(tmp, index=index, blob=blob):
                with open(tmp, "wb") as f:
                    np.lib.format.write_array(f, index)
                    f.write(blob)
                    f.write(_TRAILER.pack(len(blob), _MAGIC))

            # first builder wins: a name's content never changes
            _write(d / f"{after:012d}-{hi:012d}.npy", write, replace=False)
            after = hi

    def _segment(self, stage, key, name):
        """One built segment, loaded once per process: its entries, its clip ids sorted for lookup (as UTF-8 bytes:
        a few bytes per clip, shared by the keys whose segments hold the same clips), removed ids, array form."""
        if (stage, key, name) not in self._seg:
            path = self._cache_dir(stage, key) / f"{name}.npy"
            meta = _segment_meta(path)
            ids = np.array([c.encode() for c in meta["clip_ids"]], dtype=bytes)
            order = np.argsort(ids, kind="stable")
            ids = ids[order]
            for (st, _, _), other in self._seg.items():
                if st == stage and other["ids"].shape == ids.shape and np.array_equal(other["ids"], ids):
                    ids, order = other["ids"], other["order"]
                    break
            dtype = np.lib.format.descr_to_dtype(meta["dtype"]) if "dtype" in meta else None
            self._seg[(stage, key, name)] = {
                "ids": ids,
                "order": order.astype(np.int32),
                "entries": np.load(path),
                "removed": np.sort(np.array([c.encode() for c in meta["removed"]], dtype=bytes)),
                "form": None if dtype is None else (dtype, tuple(meta["tail"]), meta["scalar"]),
            }
        return self._seg[(stage, key, name)]

    def _load_cache(self, stage, key, version):
        """The segments of one key, newest first, building what the store has written since the last build."""
        cached = self._caches.get((stage, key))
        if cached and cached[0] == version:
            return cached[1]
        chain = self._segments(stage, key)
        if (chain[-1][1] if chain else 0) < version:
            self._build_segments(stage, key, chain[-1][1] if chain else 0, version)
            chain = self._segments(stage, key)
        segments = [self._segment(stage, key, f"{lo:012d}-{hi:012d}") for lo, hi in reversed(chain)]
        self._caches[(stage, key)] = (version, segments)
        return segments

    @staticmethod
    def _find(segments, clip_ids):
        """(segment, row) of each clip id in its newest segment, (-1, -1) where it is not done."""
        q = np.array([str(c).encode() for c in clip_ids], dtype=bytes)
        where = np.full((len(q), 2), -1, np.int64)
        todo = np.arange(len(q))
        for s, seg in enumerate(segments):
            if not len(todo):
                break
            for name in ("removed", "ids"):
                ids = seg[name]
                if not len(ids):
                    continue
                pos = np.minimum(np.searchsorted(ids, q[todo]), len(ids) - 1)
                hit = ids[pos] == q[todo]
                if name == "ids":
                    where[todo[hit]] = np.stack([np.full(hit.sum(), s), seg["order"][pos[hit]]], axis=1)
                todo = todo[~hit]  # removed here: not done, whatever older segments say
        return where

    def load_stacked(self, stage, clip_ids, with_lengths=False, keys=None):
        """Arrays of `clip_ids` stacked (N, ...) in the given order; a variable first axis is zero-padded to the
        longest of these clips. With `with_lengths=True` also returns {key: (N,) true lengths}. `keys` picks
        some arrays; only the keys asked for are cached and read."""
        if stage == AUDIO_STAGE:
            raise ValueError(f"the {AUDIO_STAGE} stage is read one clip at a time (Store.get), never in batches")
        clip_ids, seen, gone = list(clip_ids), None, None
        for _ in range(5):
            version = self.version(stage)  # one database query per batch
            if version == seen:  # a file went missing and nothing was written since: not a re-write
                raise StoreError(
                    f"{self.arrays / stage / gone}: named by its row but missing; `python -m slf_utils.store check` "
                    "lists it"
                )
            try:
                out, lens = self._stacked(stage, clip_ids, keys, version)
                return (out, lens) if with_lengths else out
            except FileNotFoundError as e:  # a clip re-written (its old file removed) since `version`: read again
                seen, gone = version, e.filename
        raise StoreError(f"{stage}: the files of these clips keep changing under this read")

    def _stacked(self, stage, clip_ids, keys, version):
        """`load_stacked` at one version of the stage: FileNotFoundError if a file its cache names has gone since."""
        all_keys = self.keys(stage)
        keys = all_keys if not exists(keys) else list(keys)
        unknown = set(keys) - set(all_keys)
        if unknown:
            raise KeyError(f"{stage}: no array(s) {sorted(unknown)}; has {sorted(all_keys)}")
        out, lens = {}, {}
        for k in keys:
            segments = self._load_cache(stage, k, version)
            where = self._find(segments, clip_ids)
            missing = [c for c, (s, _) in zip(clip_ids, where) if s < 0]
            if missing:
                raise KeyError(f"{stage}: {len(missing)} clip(s) not done, e.g. {missing[:3]}")
            forms = {segments[s]["form"] for s in np.unique(where[:, 0])}
            if len(forms) > 1:
                raise ValueError(f"{stage}/{k}: arrays differ in dtype or beyond the first axis: {forms}")
            entries = np.zeros(len(where), _ENTRY)
            for s in np.unique(where[:, 0]):
                sel = where[:, 0] == s
                entries[sel] = segments[s]["entries"][where[sel, 1]]
            lens[k] = entries["length"].astype(np.int64)
            if not len(entries):
                out[k] = np.zeros((0,), np.float32)
                continue
            dtype, tail, scalar = forms.pop()
            out[k] = np.zeros((len(entries),) if scalar else (len(entries), int(lens[k].max()), *tail), dtype)
            _read_arrays(self.arrays / stage, clip_ids, entries, out[k])
        return out, lens

    # ------------------------------------------------------------------ provenance
    def set_provenance(self, stage, prov: dict):
        with self._transaction() as con:
            con.execute(
                "INSERT INTO provenance (stage, json) VALUES (?, ?) ON CONFLICT(stage) DO UPDATE SET "
                "json=excluded.json",
                (stage, json.dumps(prov, default=str, sort_keys=True)),
            )

    def provenance(self, stage) -> dict:
        with self._connect() as con:
            row = con.execute("SELECT json FROM provenance WHERE stage = ?", (stage,)).fetchone()
        return json.loads(row[0]) if row else {}

    # ------------------------------------------------------------------ housekeeping

    # ------------------------------------------------------------------ housekeeping
    def _check_file(self, cid, stage, h, file) -> str | None:
        """Why a done row's file is not right (None if it is): absent, unreadable, or another clip's or hash's."""
        p = self.arrays / stage / str(file)
        if not exists(file) or not p.is_file():
            return f"missing: {stage}/{cid}: done but {p.name} is missing"
        try:
            with np.load(p) as z:
                meta = _npz_meta(z)
                for k in z.files:
                    z[k]
            if meta is None and p.name != _file_name(cid):  # only migrated files predate __meta__
                raise StoreError("no __meta__ entry")
            _verify(meta, cid, stage, h, p)
        except StoreError as e:
            return f"mismatch: {stage}/{cid}: {e}"
        except Exception as e:  # zero-length, truncated, not a zip...
            return f"unreadable: {stage}/{cid}: {p.name}: {type(e).__name__}: {e}"
        return None

    def check(self, repair: bool = False, log=print) -> list[str]:
        """Consistency problems, each '<kind>: <what>'. Kinds: `missing` / `unreadable` / `mismatch` (a done row whose
        file is absent, does not read, or holds another clip, stage or parameter hash), `orphan` (a file no row or
        segment names: left by a killed write), `temp` (a dead writer's temp file). Empty list = consistent.

        `repair=True` (takes each stage's writer lock: refused while a writer is active) removes orphans and temp
        files, marks the rows of the first three kinds `failed` (the next run recomputes them), and returns what it
        could not repair (nothing, normally)."""
        problems, fixed = [], []
        if repair:  # every stage's writer lock first: nothing changes under the repair
            stages = set(self._query("SELECT DISTINCT stage FROM stages").stage)
            stages |= {d.name for d in self.arrays.iterdir() if d.is_dir() and not d.name.endswith(".cache")}
            for stage in sorted(stages - {".old-caches"}):
                self._stage_lock(stage)
        rows = self._query("SELECT clip_id, stage, params_hash, status, file FROM stages")
        named = {}
        for cid, stage, h, status, file in rows.itertuples(index=False):
            if exists(file):
                named.setdefault(stage, set()).add(file)
            if status != "done":
                continue
            why = self._check_file(cid, stage, h, file)
            if why and not repair:  # a live writer may have re-written it since the rows were read: ask again
                now = self._query(
                    "SELECT params_hash, file FROM stages WHERE clip_id = ? AND stage = ? AND status = 'done'",
                    (cid, stage),
                )
                if now.empty or tuple(now.iloc[0]) != (h, file):
                    why = None if now.empty else self._check_file(cid, stage, *now.iloc[0])
            if why:
                problems.append(why)
                if repair:
                    self.reject(cid, stage, f"check --repair: {why}", h, retry=True)
                    fixed.append(why)
        if repair:
            named = {}  # the rejects above removed files: read the names again
            for stage, file in self._query("SELECT stage, file FROM stages WHERE file IS NOT NULL").itertuples(
                index=False
            ):
                named.setdefault(stage, set()).add(file)
        for d in sorted(self.arrays.iterdir()) if self.arrays.is_dir() else ():
            if d.name.endswith(".cache") or d.name == ".old-caches":
                continue
            if d.is_file():
                problems.append(f"orphan: {d}")
                continue
            if not repair and _lock_busy(self.root / "locks" / f"{safe_key(d.name)}.lock"):
                continue  # a writer is at work there: its new files are not named yet
            for e in os.scandir(d):
                if e.name in named.get(d.name, ()):
                    continue
                if _is_temp(e.name):
                    if _stale_temp(Path(e.path), min_age_s=0 if repair else 3600):
                        problems.append(f"temp: {e.path}")
                else:
                    problems.append(f"orphan: {e.path}")
        for c in sorted(self.arrays.glob("*.cache")):
            for k in sorted(c.iterdir()):
                for p in sorted(k.iterdir()) if k.is_dir() else [k]:
                    if _is_temp(p.name):
                        if _stale_temp(p, min_age_s=3600):  # a reader may be building: only a dead one's
                            problems.append(f"temp: {p}")
                    elif not (p.suffix == ".npy" and _SEGMENT.fullmatch(p.stem)):
                        problems.append(f"orphan: {p}")  # e.g. an older workbook's cache file
                    else:
                        try:
                            meta = _segment_meta(p)
                            if len(np.load(p)) != len(meta["clip_ids"]):
                                raise ValueError("rows and clip ids differ")
                        except Exception as e:
                            problems.append(f"unreadable: {p}: {e}")  # whole by construction: not repaired
        if (self.arrays / ".old-caches").exists():
            problems.append(f"orphan: {self.arrays / '.old-caches'} (an interrupted migration's old caches)")
        if not repair:
            return problems
        for p in problems:
            kind, _, what = p.partition(": ")
            if kind in ("orphan", "temp"):
                path = Path(what.split(" (")[0])
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
                fixed.append(p)
        for p in fixed:
            log(f"repaired: {p}")
        return [p for p in problems if p not in fixed]

    def size_bytes(self) -> int:
        """Bytes of the database, the array files and the caches (temp files of writes in progress left out)."""
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file() and not _is_temp(p.name))

    def clear_stage(self, stage):
        self._stage_lock(stage)
        with self._transaction() as con:
            con.execute("DELETE FROM stages WHERE stage = ?", (stage,))
            con.execute("DELETE FROM provenance WHERE stage = ?", (stage,))
            con.execute(
                "INSERT INTO versions (stage, version) VALUES (?, 1) "
                "ON CONFLICT(stage) DO UPDATE SET version = version + 1",
                (stage,),
            )
        self._keys.pop(stage, None)
        self._seg = {k: v for k, v in self._seg.items() if k[0] != stage}
        shutil.rmtree(self.arrays / stage, ignore_errors=True)
        shutil.rmtree(self._cache_dir(stage), ignore_errors=True)  # deleted rows leave no trace for segments


def _verify(meta, clip_id, stage, params_hash, path) -> None:
    """Raise if an array file's `__meta__` is not this clip, stage and hash (a legacy file has none)."""
    if meta is not None and (meta["clip_id"], meta["stage"], meta["params_hash"]) != (str(clip_id), stage, params_hash):
        raise StoreError(
            f"{path} holds {meta['stage']}/{meta['clip_id']} with parameters {meta['params_hash']}, its row says "
            f"{stage}/{clip_id} with {params_hash}"
        )


def _release_all(locks: dict) -> None:
    for lock in locks.values():
        lock.release()
    locks.clear()


def open_store(cfg) -> Store:
    return Store(Path(cfg["results"]) / "store", journal_mode=cfg.get("store", {}).get("journal_mode", "wal"))


def _is_store(root) -> None:
    """Raise unless `root` holds a store (check and migrate never create one on a mistyped path)."""
    db = Path(root) / "store.sqlite"
    if not db.is_file():
        raise FileNotFoundError(f"{root}: no store here (no store.sqlite)")
    # mode=rw: never creates a file, but can roll back the hot journal a killed writer left (read-only cannot:
    # "attempt to write a readonly database", seen once in 120 migrations killed at random points)
    con = sqlite3.connect(f"file:{db}?mode=rw", uri=True)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        con.close()
    if "stages" not in tables:
        raise StoreFormatError(f"{db}: not a store (no stages table)")


def migrate(root, log=print) -> None:
    """Bring a format-1, -2 or -3 store to format 4 in place. Format 1: audio moves from `preprocess` to its own
    stage, rows get their `seq`. Formats 1 and 2: rows record their file name; a done row whose file is missing or
    empty is reported and marked failed (the next run recomputes that clip). All: the old caches go (format 3's
    held a second copy of every array; the new ones, an index, are rebuilt on use). Nothing is recomputed. Every
    part resumes when rerun after a kill, removing the old caches included. The journal mode is the store's own."""
    from tqdm.auto import tqdm

    root = Path(root)
    _is_store(root)
    with WriterLock(root / "locks" / "migrate.lock", f"migrating {root}"):
        con = sqlite3.connect(root / "store.sqlite", timeout=60, isolation_level=None)
        old = root / "arrays" / ".old-caches"
        try:
            found = con.execute("PRAGMA user_version").fetchone()[0]
            if found > SCHEMA_VERSION:
                raise StoreFormatError(f"{root}: store format {found} is newer than this workbook's; update it")
            if found < SCHEMA_VERSION:
                for d in (root / "arrays").glob("*.cache"):  # parked first: a rerun after a kill removes them
                    old.mkdir(exist_ok=True)
                    os.replace(d, old / f"{d.name}.{os.urandom(4).hex()}")
                if found < 3:
                    _migrate_rows(con, root, found, log, tqdm)
                else:  # the rows and files stay as they are: only the caches change
                    con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                    log(f"{root}: migrated to format {SCHEMA_VERSION} (training caches rebuilt on first use)")
        finally:
            con.close()
        if old.exists():
            shutil.rmtree(old)
        if found >= SCHEMA_VERSION:
            log(f"{root}: already format {found}, nothing to do")


def _migrate_rows(con, root, found, log, tqdm) -> None:
    arrays = root / "arrays"
    if found == 1 and "seq" not in [r[1] for r in con.execute("PRAGMA table_info(stages)")]:
        con.executescript(
            "BEGIN; ALTER TABLE stages ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;"
            "CREATE INDEX IF NOT EXISTS stages_by_seq ON stages (stage, seq);"
            # every existing write counts as the first: the new caches then take all of it in one segment
            "UPDATE stages SET seq = 1;"
            "INSERT OR IGNORE INTO versions (stage, version) SELECT DISTINCT stage, 1 FROM stages; COMMIT;"
        )
    if "file" not in [r[1] for r in con.execute("PRAGMA table_info(stages)")]:
        con.execute("ALTER TABLE stages ADD COLUMN file TEXT")

    def whole(p):
        return p.is_file() and p.stat().st_size > 0

    audio_rows = []
    if found == 1:
        done = con.execute(
            "SELECT clip_id, params_hash FROM stages WHERE stage = 'preprocess' AND status = 'done'"
        ).fetchall()
        for cid, h in tqdm(done, desc="migrate: audio out of preprocess", disable=not done or None):
            pre = arrays / "preprocess" / _file_name(cid)
            aud = arrays / AUDIO_STAGE / pre.name
            if not whole(pre):
                continue  # reported below with the other missing files
            with np.load(pre) as z:
                split = {k: z[k] for k in z.files}
            if AUDIO_STAGE in split:
                aud.parent.mkdir(parents=True, exist_ok=True)
                _save_npz(aud, {"audio": split.pop(AUDIO_STAGE)}, None)
                _save_npz(pre, split, None)  # after the audio file exists: a rerun finds one or the other
            if whole(aud):
                audio_rows.append((cid, AUDIO_STAGE, h, "done", None, time.time(), 1, aud.name))
    rows = con.execute("SELECT clip_id, stage FROM stages WHERE status = 'done'").fetchall()
    named, lost = [], []
    for cid, stage in rows:
        p = arrays / stage / _file_name(cid)
        (named if whole(p) else lost).append((p.name, cid, stage))
    for _, cid, stage in lost:
        log(f"migrate: {stage}/{cid}: done but its array file is missing or empty; marked failed (recomputed next run)")
    con.execute("BEGIN")
    con.executemany("INSERT OR REPLACE INTO stages VALUES (?, ?, ?, ?, ?, ?, ?, ?)", audio_rows)
    con.executemany("UPDATE stages SET file = ? WHERE clip_id = ? AND stage = ?", named)
    con.executemany(
        "UPDATE stages SET status = 'failed', file = NULL, reason = 'migrate: array file missing or empty' "
        "WHERE clip_id = ? AND stage = ?",
        [(cid, stage) for _, cid, stage in lost],
    )
    if found == 1:
        con.execute("INSERT OR IGNORE INTO versions (stage, version) VALUES (?, 1)", (AUDIO_STAGE,))
        con.execute(
            "INSERT OR REPLACE INTO provenance (stage, json) SELECT ?, json FROM provenance WHERE stage = 'preprocess'",
            (AUDIO_STAGE,),
        )
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    if not con.execute("PRAGMA application_id").fetchone()[0]:
        con.execute(f"PRAGMA application_id={int.from_bytes(os.urandom(4), 'big') & 0x7FFFFFFF}")
    con.execute("COMMIT")
    log(
        f"{root}: migrated to format {SCHEMA_VERSION} ({len(named)} files, {len(audio_rows)} clips' audio in the "
        f"'{AUDIO_STAGE}' stage, {len(lost)} missing: marked failed)"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m slf_utils.store", description="Store housekeeping.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("migrate", help="bring an older store to this format in place").add_argument("root")
    c = sub.add_parser("check", help="verify every done row's array file; list orphans and temp files")
    c.add_argument("root")
    c.add_argument("--repair", action="store_true", help="remove orphans and temp files, mark bad rows failed")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "migrate":
            migrate(args.root)
            return
        _is_store(args.root)
        problems = Store(args.root, journal_mode=None).check(repair=args.repair)
    except (FileNotFoundError, StoreFormatError, StoreLocked, StoreError) as e:
        print(e, file=sys.stderr)
        raise SystemExit(2) from None
    print("\n".join(problems) or "consistent")
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
