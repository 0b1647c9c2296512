"""`migrate`: a store of format 1, 2 or 3 to format 4 in place, nothing recomputed, resumable after a kill; and
`format1_store`, the one writer of a format-1 store that the tests and `benchmarks/faults.py` migrate. See
docs/store.md, "Check and migrate"."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np

from slf_utils.locks import WriterLock
from slf_utils.store.files import file_name, safe_key, save_npz
from slf_utils.store.index import AUDIO_STAGE, SCHEMA_VERSION, StoreFormatError, is_store


def migrate(root, log=print) -> None:
    """Bring a format-1, -2 or -3 store to format 4 in place. Format 1: audio moves from `preprocess` to its own
    stage, rows get their `seq`. Formats 1 and 2: rows record their file name; a done row whose file is missing or
    empty is reported and marked failed (the next run recomputes that clip). All: the old caches go (format 3's
    held a second copy of every array; the new ones, an index, are rebuilt on use). Nothing is recomputed. Every
    part resumes when rerun after a kill, removing the old caches included. The journal mode is the store's own."""
    from tqdm.auto import tqdm  # third-party, only a migration shows progress: not loaded with every store

    root = Path(root)
    is_store(root)
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
            pre = arrays / "preprocess" / file_name(cid)
            aud = arrays / AUDIO_STAGE / pre.name
            if not whole(pre):
                continue  # reported below with the other missing files
            with np.load(pre) as z:
                split = {k: z[k] for k in z.files}
            if AUDIO_STAGE in split:
                aud.parent.mkdir(parents=True, exist_ok=True)
                save_npz(aud, {"audio": split.pop(AUDIO_STAGE)}, None)
                save_npz(pre, split, None)  # after the audio file exists: a rerun finds one or the other
            if whole(aud):
                audio_rows.append((cid, AUDIO_STAGE, h, "done", None, time.time(), 1, aud.name))
    rows = con.execute("SELECT clip_id, stage FROM stages WHERE status = 'done'").fetchall()
    named, lost = [], []
    for cid, stage in rows:
        p = arrays / stage / file_name(cid)
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


def format1_store(root, clips: dict, params_hash: str = "h", provenance: dict | None = None) -> None:
    """Write a store as the first workbook did (format 1) in a new folder `root`: the `preprocess` stage holds the
    audio beside the face, its rows have neither `seq` nor a file name, its arrays are `<safe key>.npz`, and one
    whole-stage cache folder (`preprocess.cache/index.json`). `clips`: {clip_id: {key: array}}, `audio` included;
    each clip gets a `train` row in the clips table and a done `preprocess` row with `params_hash`; the stage's
    version counts one write a clip; `provenance`: the stage's, if given."""
    root = Path(root)
    (root / "arrays" / "preprocess").mkdir(parents=True)
    (root / "arrays" / "preprocess.cache").mkdir()
    (root / "arrays" / "preprocess.cache" / "index.json").write_text('{"version": 2}')
    with sqlite3.connect(root / "store.sqlite") as con:
        con.executescript(
            "CREATE TABLE clips (clip_id TEXT PRIMARY KEY, identity TEXT, split TEXT, video TEXT, audio TEXT, "
            "face TEXT, gender TEXT, age REAL, ethnicity TEXT, language TEXT, extra TEXT NOT NULL DEFAULT '{}');"
            "CREATE TABLE stages (clip_id TEXT NOT NULL, stage TEXT NOT NULL, params_hash TEXT NOT NULL, "
            "status TEXT NOT NULL, reason TEXT, updated REAL NOT NULL, PRIMARY KEY (clip_id, stage));"
            "CREATE TABLE provenance (stage TEXT PRIMARY KEY, json TEXT NOT NULL);"
            "CREATE TABLE versions (stage TEXT PRIMARY KEY, version INTEGER NOT NULL);"
            "PRAGMA user_version=1;"
        )
        con.execute("INSERT INTO versions VALUES ('preprocess', ?)", (len(clips),))
        if provenance is not None:
            con.execute("INSERT INTO provenance VALUES ('preprocess', ?)", (json.dumps(provenance),))
        for cid, arrays in clips.items():
            con.execute("INSERT INTO clips (clip_id, split) VALUES (?, 'train')", (cid,))
            con.execute("INSERT INTO stages VALUES (?, 'preprocess', ?, 'done', NULL, 0)", (cid, params_hash))
            np.savez(root / "arrays" / "preprocess" / f"{safe_key(cid)}.npz", **arrays)
