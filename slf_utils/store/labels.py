"""The clips table and its labels: one vocabulary for gender and ethnicity (deepface's words, manifests' words and
evaluation's all normalised here), and the clip rows that preprocessing and the manifests write."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from slf_utils.basics import exists
from slf_utils.store.index import Index

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


class Labels(Index):
    """The clips table of a store: rows from a manifest, labels that preprocessing estimates."""

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
