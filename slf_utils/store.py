"""The feature store: one SQLite file (clips, labels, per-stage status, rejects, provenance) plus per-clip arrays and
per-key, append-only training caches. Designed to stay flat in cost per clip up to VoxCeleb2 (1.09 M clips).

Layout under `root`:
* `store.sqlite` — tables `clips`, `stages(clip_id, stage, params_hash, status, reason, updated, seq)`,
  `provenance(stage, json)` and `versions(stage, version)`. Every write of a stage bumps its version and stamps the
  clip's row with it (`seq`), so "what changed since the cache was built" is one indexed range query.
* `arrays/<stage>/<safe clip key>.npz` — one file per clip and stage, written atomically: the unit of resumable work.
* `arrays/<stage>.cache/<key>/<lo>-<hi>.npy` + `.json` — training caches, one folder per array key, built lazily
  on the first `load_stacked` that asks for that key. A segment holds the clips written with `lo < seq <= hi`
  (zero-padded along the first axis; the .json lists clip ids, true lengths and clips removed since). New clips
  append a new segment; nothing already written is rewritten, and a re-written clip is found in the newest
  segment that has it. Segments are immutable and appear by atomic rename (.json last), so any number of
  processes, on any host, can read them while another builds the next one.
* Audio has its own stage (`audio`, written by preprocessing and read one clip at a time by feature extraction)
  and is never part of a training cache: 24 s of 16 kHz float32 is 1.5 MB a clip, 1.6 TB for VoxCeleb2 dev.

Why not Zarr: the arrays here are small per clip and read by random fancy index; append-only .npy segments under
a SQLite index give the same properties (chunked, appendable, memory-mapped, concurrent readers) with numpy
alone, and keep one source of truth for what is done (the `stages` table).

Concurrency: `journal_mode` is a parameter (`store.journal_mode` in a grid file). WAL (default) lets readers and
one writer work at once on one host; it needs shared memory, so a store on a network filesystem shared by several
nodes must use `delete` (rollback journal with file locks). Either way the workbook's stages let workers return
arrays and only the driver writes, and `Store.get` reads an array file without opening the database at all.

A store from the previous format (audio inside `preprocess`, one cache file per stage) is refused with the
command that migrates it: `python -m slf_utils.store migrate RESULTS/store` (nothing is recomputed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sqlite3
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from slf_utils.config import atomic_save_npz, atomic_write, atomic_write_json, exists

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
SCHEMA_VERSION = 2  # 1: audio inside `preprocess`, one cache file per stage (see `migrate`)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS clips (
    clip_id TEXT PRIMARY KEY, identity TEXT, split TEXT, video TEXT, audio TEXT, face TEXT,
    gender TEXT, age REAL, ethnicity TEXT, language TEXT, extra TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS stages (
    clip_id TEXT NOT NULL, stage TEXT NOT NULL, params_hash TEXT NOT NULL, status TEXT NOT NULL,
    reason TEXT, updated REAL NOT NULL, seq INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (clip_id, stage));
CREATE INDEX IF NOT EXISTS stages_by_stage ON stages (stage, status, params_hash);
CREATE INDEX IF NOT EXISTS stages_by_seq ON stages (stage, seq);
CREATE TABLE IF NOT EXISTS provenance (stage TEXT PRIMARY KEY, json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (stage TEXT PRIMARY KEY, version INTEGER NOT NULL);
"""


def _npz_headers(path) -> dict:
    """{key: (shape, dtype)} of an .npz without reading the data."""
    out = {}
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            with zf.open(name) as f:
                major, _ = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
            out[name.removesuffix(".npy")] = (shape, dtype)
    return out


def safe_key(clip_id: str) -> str:
    """A file-name-safe, injective key for a clip id: `id00003/abc/00001` -> `id00003__abc__00001`.

    Ids that need more than replacing '/' (non-ASCII, spaces, '__', very long) keep a readable prefix and get a
    hash suffix, so two different ids never share a file."""
    s = str(clip_id)
    key = s.replace("/", "__")
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", key).lstrip(".")
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


def _npy_layout(path) -> dict:
    """Where the rows of a cache segment lie in its .npy: read with pread, not mapped, so a process's resident
    memory holds the batches it asked for and not every page it ever touched."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        return {"path": str(path), "offset": f.tell(), "shape": shape, "dtype": dtype}


def _read_rows(seg: dict, rows, out: np.ndarray, at) -> None:
    """out[at[j]] = rows[j] of a segment, the first out.shape[1] frames only (they are contiguous on disk)."""
    frame = seg["dtype"].itemsize * int(np.prod(seg["shape"][2:], dtype=np.int64))
    row_bytes = frame * seg["shape"][1] if len(seg["shape"]) > 1 else seg["dtype"].itemsize
    want = row_bytes if len(seg["shape"]) == 1 else frame * min(out.shape[1], seg["shape"][1])
    fd = os.open(seg["path"], os.O_RDONLY)
    try:
        for j, r in zip(at, rows):
            buf = os.pread(fd, want, seg["offset"] + int(r) * row_bytes)
            a = np.frombuffer(buf, seg["dtype"])
            if len(seg["shape"]) == 1:
                out[j] = a[0]
            else:
                out[j, : min(out.shape[1], seg["shape"][1])] = a.reshape(-1, *seg["shape"][2:])
    finally:
        os.close(fd)


class StoreFormatError(RuntimeError):
    """The store on disk was written by an older workbook; the message says what to run."""


_SEGMENT = re.compile(r"\d{12}-\d{12}")


def _segment_range(name: str) -> tuple[int, int]:
    lo, hi = name.split("-")
    return int(lo), int(hi)


class Store:
    def __init__(self, root, journal_mode: str = "wal"):
        if journal_mode not in JOURNAL_MODES:
            raise ValueError(f"store.journal_mode must be one of {', '.join(JOURNAL_MODES)}, got {journal_mode!r}")
        self.root = Path(root)
        self.db = self.root / "store.sqlite"
        self.arrays = self.root / "arrays"
        self.journal_mode = journal_mode
        self.arrays.mkdir(parents=True, exist_ok=True)
        self._ready = False  # the schema is checked on first use: `get` alone never opens the database
        self._caches = {}  # (stage, key) -> (version, its segments newest first)
        self._seg = {}  # (stage, key, segment name) -> loaded segment (segments never change once built)
        self._keys = {}  # stage -> its array keys

    def __repr__(self):
        return f"Store({str(self.root)!r})"

    # pickling: only the root travels to Dask workers / subprocesses, caches are rebuilt there
    def __getstate__(self):
        return {"root": self.root, "journal_mode": self.journal_mode}

    def __setstate__(self, state):
        self.__init__(state["root"], state.get("journal_mode", "wal"))

    def _open(self):
        con = sqlite3.connect(self.db, timeout=60, isolation_level=None)
        con.execute("PRAGMA busy_timeout=60000")
        con.execute("PRAGMA synchronous=NORMAL")
        return con

    def _prepare(self):
        """Create the schema in a new store, refuse an old one, and set the journal mode asked for."""
        con = self._open()
        try:
            found = con.execute("PRAGMA user_version").fetchone()[0]
            if 0 < found < SCHEMA_VERSION:
                raise StoreFormatError(
                    f"{self.root}: store format {found} (audio inside the preprocess stage, one cache per stage); "
                    f"this workbook reads format {SCHEMA_VERSION}. Migrate it in place (nothing is recomputed): "
                    f"python -m slf_utils.store migrate {self.root}"
                )
            if found > SCHEMA_VERSION:
                raise StoreFormatError(f"{self.root}: store format {found} is newer than this workbook's; update it")
            if con.execute("PRAGMA journal_mode").fetchone()[0] != self.journal_mode:
                con.execute(f"PRAGMA journal_mode={self.journal_mode}")
            if found == 0:
                con.executescript(_SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION};")
        finally:
            con.close()
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
    def path(self, clip_id, stage) -> Path:
        return self.arrays / stage / f"{safe_key(clip_id)}.npz"

    def _set_status(self, con, clip_id, stage, params_hash, status, reason):
        con.execute(
            "INSERT INTO versions (stage, version) VALUES (?, 1) "
            "ON CONFLICT(stage) DO UPDATE SET version = version + 1",
            (stage,),
        )
        (seq,) = con.execute("SELECT version FROM versions WHERE stage = ?", (stage,)).fetchone()
        con.execute(
            "INSERT INTO stages (clip_id, stage, params_hash, status, reason, updated, seq) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(clip_id, stage) DO UPDATE SET "
            "params_hash=excluded.params_hash, status=excluded.status, reason=excluded.reason, "
            "updated=excluded.updated, seq=excluded.seq",
            (clip_id, stage, params_hash, status, reason, time.time(), seq),
        )

    def put(self, clip_id, stage, arrays: dict, params_hash: str):
        """Write the arrays of one clip and stage (atomically), then mark it done. The file is in place before
        the row says done, so a crash in between leaves at most an orphan file that the next put replaces."""
        self.put_many(stage, [(clip_id, arrays)], params_hash)

    def put_many(self, stage, items, params_hash: str):
        """`put` for several clips of one stage, [(clip_id, arrays)], marked done in one transaction."""
        items = [(cid, {k: np.asarray(v) for k, v in arrays.items()}) for cid, arrays in items]
        for cid, arrays in items:
            if stage != AUDIO_STAGE and AUDIO_STAGE in arrays:
                raise ValueError(f"{stage}/{cid}: audio goes to its own stage ('{AUDIO_STAGE}'), never a cached one")
            atomic_save_npz(self.path(cid, stage), **arrays)
        with self._transaction() as con:
            for cid, _ in items:
                self._set_status(con, cid, stage, params_hash, "done", None)

    def reject(self, clip_id, stage, reason: str, params_hash: str, retry: bool = False):
        """Record why a clip cannot be used. `retry=True` (status `failed`: an unexpected error rather than bad
        input) keeps the reason but lets the next run try the clip again."""
        with self._transaction() as con:
            self._set_status(con, clip_id, stage, params_hash, "failed" if retry else "rejected", str(reason))
        self.path(clip_id, stage).unlink(missing_ok=True)

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
        """One clip's arrays of one stage, straight from its file (no database access)."""
        p = self.path(clip_id, stage)
        if not p.exists():
            raise KeyError(f"{stage}: no arrays for clip {clip_id!r} (not done or rejected)")
        with np.load(p) as z:
            return {k: z[k] for k in z.files}

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
                row = con.execute("SELECT clip_id FROM stages WHERE stage = ? AND status = 'done' LIMIT 1", (stage,))
                row = row.fetchone()
            if not row:
                return []
            self._keys[stage] = list(_npz_headers(self.path(row[0], stage)))
        return self._keys[stage]

    def _segments(self, stage, key) -> list[tuple[int, int]]:
        """The chain of built segments (lo, hi) from seq 0 upwards. Two processes that built the same range wrote
        the same content under the same name; a segment without its .json is unfinished and ignored."""
        names = (p.stem for p in self._cache_dir(stage, key).glob("*-*.json"))
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
        """Append segments for the clips written with after < seq <= upto. Memory stays at one clip: headers
        first (for the padded shape), then the data appended row by row to a .npy."""
        with self._connect() as con:
            rows = con.execute(
                "SELECT clip_id, status, seq FROM stages WHERE stage = ? AND seq > ? AND seq <= ? ORDER BY seq",
                (stage, after, upto),
            ).fetchall()
        d = self._cache_dir(stage, key)
        d.mkdir(parents=True, exist_ok=True)
        for start in range(0, max(len(rows), 1), SEGMENT_ROWS):
            part = rows[start : start + SEGMENT_ROWS]
            hi = upto if start + SEGMENT_ROWS >= len(rows) else part[-1][2]
            name = f"{after:012d}-{hi:012d}"
            ids = [cid for cid, status, _ in part if status == "done"]
            removed = [cid for cid, status, _ in part if status != "done"]
            shapes, dtype = [], None
            for cid in ids:
                h = _npz_headers(self.path(cid, stage))
                if key not in h:
                    raise KeyError(f"{stage}/{cid}: no array {key!r}; has {sorted(h)}")
                shapes.append(h[key][0])
                dtype = h[key][1]
            tails = {s[1:] for s in shapes}
            if len(tails) > 1:
                raise ValueError(f"{stage}/{key}: arrays differ beyond the first axis: {sorted(tails)}")
            scalar = bool(shapes) and not shapes[0]
            lengths = [s[0] if s else 1 for s in shapes]
            if ids:
                shape = (len(ids),) + (() if scalar else (max(lengths), *shapes[0][1:]))

                def write(tmp, ids=ids, shape=shape, dtype=dtype):
                    # plain appends, one padded row at a time: memory (and RSS) stays at one clip
                    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
                    row = np.zeros(shape[1:], dtype)
                    with open(tmp, "wb") as f:
                        np.lib.format.write_array_header_2_0(f, header)
                        for cid in ids:
                            with np.load(self.path(cid, stage)) as z:
                                a = z[key]
                            row[...] = 0
                            row[: len(a)] = a
                            f.write(row.tobytes())

                atomic_write(d / f"{name}.npy", write)
            meta = {"clip_ids": ids, "lengths": lengths, "scalar": scalar, "removed": removed}
            atomic_write_json(d / f"{name}.json", meta)  # last: a segment exists once its .json does
            after = hi

    def _segment(self, stage, key, name):
        """One built segment, loaded once per process: its memmap, its clip ids sorted for lookup (as UTF-8 bytes:
        a few bytes per clip, shared by the keys whose segments hold the same clips), lengths, removed ids."""
        if (stage, key, name) not in self._seg:
            d = self._cache_dir(stage, key)
            meta = json.loads((d / f"{name}.json").read_text())
            ids = np.array([c.encode() for c in meta["clip_ids"]], dtype=bytes)
            order = np.argsort(ids, kind="stable")
            ids = ids[order]
            for (st, _, _), other in self._seg.items():
                if st == stage and other["ids"].shape == ids.shape and np.array_equal(other["ids"], ids):
                    ids, order = other["ids"], other["order"]
                    break
            self._seg[(stage, key, name)] = {
                "ids": ids,
                "order": order.astype(np.int32),
                "lengths": np.asarray(meta["lengths"], np.int32),
                "removed": np.sort(np.array([c.encode() for c in meta["removed"]], dtype=bytes)),
                "array": _npy_layout(d / f"{name}.npy") if meta["clip_ids"] else None,
                "scalar": meta["scalar"],
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
        version = self.version(stage)  # one database query per batch
        all_keys = self.keys(stage)
        keys = all_keys if not exists(keys) else list(keys)
        unknown = set(keys) - set(all_keys)
        if unknown:
            raise KeyError(f"{stage}: no array(s) {sorted(unknown)}; has {sorted(all_keys)}")
        clip_ids = list(clip_ids)
        out, lens = {}, {}
        for k in keys:
            segments = self._load_cache(stage, k, version)
            where = self._find(segments, clip_ids)
            missing = [c for c, (s, _) in zip(clip_ids, where) if s < 0]
            if missing:
                raise KeyError(f"{stage}: {len(missing)} clip(s) not done, e.g. {missing[:3]}")
            lens[k] = np.array([segments[s]["lengths"][i] for s, i in where], dtype=np.int64)
            ref = next((g["array"] for g in segments if exists(g["array"])), None)
            n = int(lens[k].max()) if len(where) else 0
            shape = (len(where), *(ref["shape"][1:2] and (n,)), *ref["shape"][2:]) if exists(ref) else (0,)
            batch = np.zeros(shape, dtype=ref["dtype"] if exists(ref) else np.float32)
            for s in np.unique(where[:, 0]):
                sel = np.flatnonzero(where[:, 0] == s)
                _read_rows(segments[s]["array"], where[sel, 1], batch, sel)
            out[k] = batch
        return (out, lens) if with_lengths else out

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
    def check(self) -> list[str]:
        """Consistency problems: done rows without a readable array file. Empty list = consistent."""
        problems = []
        for cid, stage in self._query("SELECT clip_id, stage FROM stages WHERE status = 'done'").itertuples(
            index=False
        ):
            p = self.path(cid, stage)
            if not p.exists():
                problems.append(f"{stage}/{cid}: done but {p.name} is missing")
        return problems

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def clear_stage(self, stage):
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


def open_store(cfg) -> Store:
    return Store(Path(cfg["results"]) / "store", journal_mode=cfg.get("store", {}).get("journal_mode", "wal"))


def migrate(root, log=print) -> None:
    """Bring a format-1 store to format 2 in place: audio moves from `preprocess` to its own stage, rows get their
    `seq`, the old whole-stage caches go. Nothing is recomputed; an interrupted migration resumes when rerun."""
    from tqdm.auto import tqdm

    root = Path(root)
    db = root / "store.sqlite"
    if not db.exists():
        raise FileNotFoundError(f"{db}: no store here")
    con = sqlite3.connect(db, timeout=60, isolation_level=None)
    try:
        found = con.execute("PRAGMA user_version").fetchone()[0]
        if found >= SCHEMA_VERSION:
            log(f"{root}: already format {found}, nothing to do")
            return
        if "seq" not in [r[1] for r in con.execute("PRAGMA table_info(stages)")]:
            con.executescript(
                "BEGIN; ALTER TABLE stages ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;"
                "CREATE INDEX IF NOT EXISTS stages_by_seq ON stages (stage, seq);"
                # every existing write counts as the first: the new caches then take all of it in one segment
                "UPDATE stages SET seq = 1;"
                "INSERT OR IGNORE INTO versions (stage, version) SELECT DISTINCT stage, 1 FROM stages; COMMIT;"
            )
        done = con.execute(
            "SELECT clip_id, params_hash FROM stages WHERE stage = 'preprocess' AND status = 'done'"
        ).fetchall()
        rows = []
        for cid, h in tqdm(done, desc="migrate: audio out of preprocess", disable=not done):
            pre = root / "arrays" / "preprocess" / f"{safe_key(cid)}.npz"
            with np.load(pre) as z:
                arrays = {k: z[k] for k in z.files}
            if AUDIO_STAGE in arrays:
                atomic_save_npz(root / "arrays" / AUDIO_STAGE / pre.name, audio=arrays.pop(AUDIO_STAGE))
                atomic_save_npz(pre, **arrays)  # after the audio file exists: a rerun finds one or the other
            if (root / "arrays" / AUDIO_STAGE / pre.name).exists():
                rows.append((cid, AUDIO_STAGE, h, "done", None, time.time(), 1))
        con.execute("BEGIN")
        con.executemany("INSERT OR REPLACE INTO stages VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        con.execute("INSERT OR IGNORE INTO versions (stage, version) VALUES (?, 1)", (AUDIO_STAGE,))
        con.execute(
            "INSERT OR REPLACE INTO provenance (stage, json) SELECT ?, json FROM provenance WHERE stage = 'preprocess'",
            (AUDIO_STAGE,),
        )
        con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        con.execute("COMMIT")
    finally:
        con.close()
    for d in (root / "arrays").glob("*.cache"):
        shutil.rmtree(d, ignore_errors=True)  # format-1 caches (index.json + one file per key): rebuilt on use
    log(f"{root}: migrated to format {SCHEMA_VERSION} ({len(rows)} clips' audio in the '{AUDIO_STAGE}' stage)")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m slf_utils.store", description="Store housekeeping.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("migrate", help="bring an older store to this format in place").add_argument("root")
    sub.add_parser("check", help="list done rows whose array file is missing").add_argument("root")
    args = ap.parse_args(argv)
    if args.cmd == "migrate":
        migrate(args.root)
    else:
        problems = Store(args.root).check()
        print("\n".join(problems) or "consistent")
        raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
