"""The training caches (store format 4): per stage and array key, append-only index segments into the per-clip
files, not copies of them. A segment lists the clips written with `lo < seq <= hi`, for each the token of its file
and where the key's array lies in it; a batch is one open and one pread a clip and key. Built lazily, published
whole by a hard link that the first builder wins, never rewritten. See docs/store.md, "Training caches"."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np

from slf_utils.basics import exists
from slf_utils.store.files import StoreError, file_name, npz_layout, publish, safe_key, verify
from slf_utils.store.index import AUDIO_STAGE, Index

SEGMENT_ROWS = 50_000  # clips per cache segment file: bounds the cost of one build, whatever the corpus size
SEGMENT = re.compile(r"\d{12}-\d{12}")  # a segment's name: <lo>-<hi>
_TRAILER = struct.Struct("<Q8s")  # a cache segment ends with its JSON's length and this magic
# a cache entry: where one clip's array lies in its file (<safe key>.<token>.npz)
_ENTRY = np.dtype([("token", "S8"), ("offset", "<u8"), ("length", "<u4"), ("fortran", "?")])
_MAGIC = b"SLFIDX01"  # format 3's segments (SLFSEG01) held copies of the arrays


def segment_meta(path) -> dict:
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
            fd = os.open(file_name(cid, token.decode()), os.O_RDONLY, dir_fd=folder_fd)
            try:
                buf = os.pread(fd, want, offset)
            finally:
                os.close(fd)
            if len(buf) < want:
                raise StoreError(f"{folder}/{file_name(cid, token.decode())}: truncated (`check` lists such files)")
            a = np.frombuffer(buf, out.dtype)
            if out.ndim == 1:
                out[j] = a[0]
            elif fortran:  # saved column-major as it came (put_many keeps an array's order)
                out[j, :n] = a.reshape((n, *out.shape[2:])[::-1]).T
            else:
                out[j, :n] = a.reshape(n, *out.shape[2:])
    finally:
        os.close(folder_fd)


def _segment_range(name: str) -> tuple[int, int]:
    lo, hi = name.split("-")
    return int(lo), int(hi)


class Caches(Index):
    """Batch reads of a store (`load_stacked`) through its training caches."""

    def __init__(self, root, journal_mode: str | None = "wal"):
        super().__init__(root, journal_mode)
        self._caches = {}  # (stage, key) -> (version, its segments newest first)
        self._seg = {}  # (stage, key, segment name) -> loaded segment (segments never change once built)
        self._keys = {}  # stage -> its array keys

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
            self._keys[stage] = list(npz_layout(self.arrays / stage / row[0])[0])
        return self._keys[stage]

    def _segments(self, stage, key) -> list[tuple[int, int]]:
        """The chain of built segments (lo, hi) from seq 0 upwards. A segment appears complete under its name (by a
        hard link that the first builder wins), so whatever has the name is whole."""
        names = (p.stem for p in self._cache_dir(stage, key).glob("*-*.npy"))
        built = sorted(_segment_range(n) for n in names if SEGMENT.fullmatch(n))  # not another writer's temp file
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
                    arrays, meta = npz_layout(path)
                except FileNotFoundError:
                    removed.append(cid)
                    continue
                verify(meta, cid, stage, h, path)
                if key not in arrays:
                    raise KeyError(f"{stage}/{cid}: no array {key!r}; has {sorted(arrays)}")
                offset, shape, dtype, fortran = arrays[key]
                if form is not None and form != (dtype, shape[1:]):
                    raise ValueError(f"{stage}/{key}: arrays differ in dtype or beyond the first axis: {form}, {cid}")
                form, scalar = (dtype, shape[1:]), not shape
                token = file.removeprefix(safe_key(cid)).removesuffix(".npz").lstrip(".")
                if file_name(cid, token) != file or len(token) > _ENTRY["token"].itemsize:
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
            publish(d / f"{after:012d}-{hi:012d}.npy", write, replace=False)
            after = hi

    def _segment(self, stage, key, name):
        """One built segment, loaded once per process: its entries, its clip ids sorted for lookup (as UTF-8 bytes:
        a few bytes per clip, shared by the keys whose segments hold the same clips), removed ids, array form."""
        if (stage, key, name) not in self._seg:
            path = self._cache_dir(stage, key) / f"{name}.npy"
            meta = segment_meta(path)
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
