"""The store's index: one SQLite file (clips, per-stage rows, versions, provenance), its connections and format, the
writes (`put_many`: files first, then the rows that name them in one transaction, then the old files go) and the
reads of one clip (`get`: one indexed query on a cached connection, one file). See docs/store.md."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import weakref
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from slf_utils.basics import exists
from slf_utils.locks import WriterLock
from slf_utils.store.files import (
    META,
    StoreError,
    file_name,
    fsync_all,
    fsync_dir,
    is_temp,
    npz_meta,
    safe_key,
    save_npz,
    stale_temp,
    verify,
)

AUDIO_STAGE = "audio"  # read per clip with `get`, never cached for batches
JOURNAL_MODES = ("wal", "delete", "truncate", "persist")
SCHEMA_VERSION = 4  # 1: audio inside `preprocess`; 2: rows without file names; 3: caches copied the arrays
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


def close_readers(db) -> None:
    """Close this process's cached reader connections to `db`."""
    for key in [k for k in _readers if k[0] == str(db)]:
        pid, con, lock = _readers.pop(key)
        if pid == os.getpid():
            with lock:
                con.close()


def _release_all(locks: dict) -> None:
    for lock in locks.values():
        lock.release()
    locks.clear()


def is_store(root) -> None:
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


class Index:
    """Rows and single-clip reads and writes of a store; `slf_utils.store.Store` adds labels, caches and check."""

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

    # ------------------------------------------------------------------ connections
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
                close_readers(self.db)  # this process's own cached connections must not block the switch
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
            close_readers(self.db)  # another database at this path now, or a parent's: not used again
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
                if is_temp(e.name) and stale_temp(Path(e.path), min_age_s=86400):
                    Path(e.path).unlink(missing_ok=True)

    def _query(self, sql, args=()) -> pd.DataFrame:
        with self._connect() as con:
            return pd.read_sql_query(sql, con, params=args)

    # ------------------------------------------------------------------ stage status and arrays
    def _row(self, clip_id, stage):
        """(file, params_hash) of a done clip, None otherwise: one query by primary key on the cached connection."""
        sql = "SELECT file, params_hash FROM stages WHERE clip_id = ? AND stage = ? AND status = 'done'"
        _, con, lock = self._reader()
        try:
            with lock:
                return con.execute(sql, (str(clip_id), stage)).fetchone()
        except sqlite3.OperationalError:  # e.g. a killed writer's hot journal, which only a writable one rolls back
            close_readers(self.db)
            with self._connect() as con:
                return con.execute(sql, (str(clip_id), stage)).fetchone()

    def path(self, clip_id, stage) -> Path:
        """The array file of a done clip (where its row says); for any other clip, where a legacy file would be."""
        row = self._row(clip_id, stage)
        return self.arrays / stage / (row[0] if row and row[0] else file_name(clip_id))

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
                names[cid] = file_name(cid, os.urandom(4).hex())
                meta = {"clip_id": cid, "stage": stage, "params_hash": params_hash}
                save_npz(d / names[cid], arrays, meta, sync=False)
            fsync_all(d / n for n in names.values())  # the files are on disk before a row names them
            fsync_dir(d)
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
                    meta = npz_meta(z)
            except FileNotFoundError:
                continue  # re-written by another process between the query and the read: ask again
            verify(meta, clip_id, stage, row[1], self.arrays / stage / row[0])
            return out
        raise StoreError(f"{stage}/{clip_id}: its file keeps changing under this read")

    def version(self, stage) -> int:
        """How many writes the stage has had: every row's `seq` is at most this (the caches index up to it)."""
        with self._connect() as con:
            row = con.execute("SELECT version FROM versions WHERE stage = ?", (stage,)).fetchone()
        return row[0] if row else 0

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
