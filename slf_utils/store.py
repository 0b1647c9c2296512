"""The feature store: one SQLite file (clips, labels, per-stage status, rejects, provenance) plus per-clip arrays.

Layout under `root`:
* `store.sqlite` — tables `clips`, `stages(clip_id, stage, params_hash, status, reason, updated)`,
  `provenance(stage, json)` and `versions(stage, version)` (bumped on every write of a stage, so caches know when
  they are stale without scanning files).
* `arrays/<stage>/<safe clip key>.npz` — one file per clip and stage, written atomically.
* `arrays/<stage>.cache/` — consolidated `.npy` per array key, (N, max_len, ...) zero-padded, memory-mapped by
  `load_stacked`: a training batch is one fancy index into a memmap, never one query or one file per sample.

Every method opens its own short-lived connection (WAL mode, busy timeout), so one `Store` may be used from
threads, processes and Dask workers (it pickles as its root path). Dask workers should still preferably return
arrays and let the driver write: SQLite serialises writers anyway.
"""

from __future__ import annotations

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

from slf_utils.config import atomic_save_npz, atomic_write_text, exists

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

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS clips (
    clip_id TEXT PRIMARY KEY, identity TEXT, split TEXT, video TEXT, audio TEXT, face TEXT,
    gender TEXT, age REAL, ethnicity TEXT, language TEXT, extra TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS stages (
    clip_id TEXT NOT NULL, stage TEXT NOT NULL, params_hash TEXT NOT NULL, status TEXT NOT NULL,
    reason TEXT, updated REAL NOT NULL, PRIMARY KEY (clip_id, stage));
CREATE INDEX IF NOT EXISTS stages_by_stage ON stages (stage, status, params_hash);
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


class Store:
    def __init__(self, root):
        self.root = Path(root)
        self.db = self.root / "store.sqlite"
        self.arrays = self.root / "arrays"
        self.arrays.mkdir(parents=True, exist_ok=True)
        self._caches = {}  # stage -> (version, {key: memmap}, {clip_id: row}, {key: lengths})
        with self._connect() as con:
            # user_version marks a created schema: opening an existing store (every Dask task does) only reads
            if con.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                con.execute("PRAGMA journal_mode=WAL")
                con.executescript(_SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION};")

    def __repr__(self):
        return f"Store({str(self.root)!r})"

    # pickling: only the root travels to Dask workers / subprocesses, caches are rebuilt there
    def __getstate__(self):
        return {"root": self.root}

    def __setstate__(self, state):
        self.__init__(state["root"])

    @contextmanager
    def _connect(self):
        con = sqlite3.connect(self.db, timeout=60, isolation_level=None)
        con.execute("PRAGMA busy_timeout=60000")
        con.execute("PRAGMA synchronous=NORMAL")
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
            "INSERT INTO stages (clip_id, stage, params_hash, status, reason, updated) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(clip_id, stage) DO UPDATE SET "
            "params_hash=excluded.params_hash, status=excluded.status, reason=excluded.reason, "
            "updated=excluded.updated",
            (clip_id, stage, params_hash, status, reason, time.time()),
        )
        con.execute(
            "INSERT INTO versions (stage, version) VALUES (?, 1) "
            "ON CONFLICT(stage) DO UPDATE SET version = version + 1",
            (stage,),
        )

    def put(self, clip_id, stage, arrays: dict, params_hash: str):
        """Write the arrays of one clip and stage (atomically), then mark it done. The file is in place before
        the row says done, so a crash in between leaves at most an orphan file that the next put replaces."""
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        atomic_save_npz(self.path(clip_id, stage), **arrays)
        with self._transaction() as con:
            self._set_status(con, clip_id, stage, params_hash, "done", None)

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
        """All stage rows (clip_id, stage, params_hash, status, reason, updated)."""
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
        p = self.path(clip_id, stage)
        if not p.exists():
            raise KeyError(f"{stage}: no arrays for clip {clip_id!r} (not done or rejected)")
        with np.load(p) as z:
            return {k: z[k] for k in z.files}

    # ------------------------------------------------------------------ consolidated cache for training batches
    def version(self, stage) -> int:
        with self._connect() as con:
            row = con.execute("SELECT version FROM versions WHERE stage = ?", (stage,)).fetchone()
        return row[0] if row else 0

    def _cache_dir(self, stage) -> Path:
        return self.arrays / f"{stage}.cache"

    def _build_cache(self, stage, version):
        """Stack every done clip of `stage` into one zero-padded .npy per key. Files carry the version in their
        name and index.json is written last, so a reader never mixes two builds. Two passes (headers, then
        data) keep memory at one clip, whatever the corpus size."""
        with self._connect() as con:
            ids = [
                r[0]
                for r in con.execute(
                    "SELECT clip_id FROM stages WHERE stage = ? AND status = 'done' ORDER BY clip_id", (stage,)
                )
            ]
        d = self._cache_dir(stage)
        d.mkdir(parents=True, exist_ok=True)
        headers = [_npz_headers(self.path(cid, stage)) for cid in ids]
        keys = list(headers[0]) if headers else []
        mms, lengths, scalar = {}, {}, []
        for k in keys:
            shp = [h[k][0] for h in headers]
            tail = {s[1:] for s in shp}
            if len(tail) > 1:
                raise ValueError(f"{stage}/{k}: arrays differ beyond the first axis: {sorted(tail)}")
            if not shp[0]:
                scalar.append(k)
            lengths[k] = [s[0] if s else 1 for s in shp]
            out_shape = (len(ids),) + (() if not shp[0] else (max(lengths[k]), *shp[0][1:]))
            tmp = d / f".v{version}_{k}.{os.getpid()}.tmp.npy"
            mms[k] = (tmp, np.lib.format.open_memmap(tmp, mode="w+", dtype=headers[0][k][1], shape=out_shape))
        for i, cid in enumerate(ids):
            a = self.get(cid, stage)
            for k, (_, mm) in mms.items():
                if k in scalar:
                    mm[i] = a[k]
                else:
                    mm[i, : a[k].shape[0]] = a[k]  # the rest stays zero: open_memmap files start zero-filled
        files = {}
        for k, (tmp, mm) in mms.items():
            mm.flush()
            del mm
            files[k] = f"v{version}_{k}.npy"
            os.replace(tmp, d / files[k])
        mms.clear()
        atomic_write_text(
            d / "index.json",
            json.dumps({"version": version, "clip_ids": ids, "files": files, "lengths": lengths, "scalar": scalar}),
        )
        for p in d.glob("v*_*.npy"):  # older builds; open memmaps of other processes survive the unlink
            if p.name not in files.values():
                p.unlink(missing_ok=True)

    def _load_cache(self, stage):
        version = self.version(stage)
        cached = self._caches.get(stage)
        if cached and cached[0] == version:
            return cached
        index_path = self._cache_dir(stage) / "index.json"
        index = json.loads(index_path.read_text()) if index_path.exists() else None
        if not index or index["version"] != version:
            self._build_cache(stage, version)
            index = json.loads(index_path.read_text())
        d = self._cache_dir(stage)
        arrays = {k: np.load(d / f, mmap_mode="r") for k, f in index["files"].items()}
        rows = {cid: i for i, cid in enumerate(index["clip_ids"])}
        lengths = {k: np.asarray(v) for k, v in index["lengths"].items()}
        cached = (version, arrays, rows, lengths, set(index.get("scalar", [])))
        self._caches[stage] = cached
        return cached

    def load_stacked(self, stage, clip_ids, with_lengths=False, keys=None):
        """Arrays of `clip_ids` stacked (N, ...) in the given order; a variable first axis is zero-padded to the
        longest of these clips. With `with_lengths=True` also returns {key: (N,) true lengths}. `keys` picks
        some arrays (e.g. ["face"]: the audio of the preprocess stage is then not read at all)."""
        _, arrays, rows, lengths, scalar = self._load_cache(stage)
        if exists(keys):
            unknown = set(keys) - set(arrays)
            if unknown:
                raise KeyError(f"{stage}: no array(s) {sorted(unknown)}; has {sorted(arrays)}")
            arrays = {k: arrays[k] for k in keys}
        clip_ids = list(clip_ids)
        missing = [c for c in clip_ids if c not in rows]
        if missing:
            raise KeyError(f"{stage}: {len(missing)} clip(s) not done, e.g. {missing[:3]}")
        idx = np.array([rows[c] for c in clip_ids], dtype=np.int64)
        out, lens = {}, {}
        for k, a in arrays.items():
            lens[k] = lengths[k][idx] if len(idx) else np.zeros(0, np.int64)
            if k in scalar:
                out[k] = np.asarray(a[idx])
            else:
                n = int(lens[k].max()) if len(idx) else 0
                out[k] = np.asarray(a[idx, :n])
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
        shutil.rmtree(self.arrays / stage, ignore_errors=True)


def open_store(cfg) -> Store:
    return Store(Path(cfg["results"]) / "store")
