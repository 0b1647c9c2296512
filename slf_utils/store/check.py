"""`check`: every done row's file against its row (present, readable, this clip's, stage's and hash's), plus the
leftovers a kill may leave (files no row names, dead writers' temp files, unreadable cache segments); `--repair`
removes the leftovers and marks bad rows failed. See docs/store.md, "Check and migrate"."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from slf_utils.basics import exists
from slf_utils.locks import lock_busy
from slf_utils.store.caches import SEGMENT, Caches, segment_meta
from slf_utils.store.files import StoreError, file_name, is_temp, npz_meta, safe_key, stale_temp, verify


class Checks(Caches):
    """Consistency of a store's rows, files and caches."""

    def _check_file(self, cid, stage, h, file) -> str | None:
        """Why a done row's file is not right (None if it is): absent, unreadable, or another clip's or hash's."""
        p = self.arrays / stage / str(file)
        if not exists(file) or not p.is_file():
            return f"missing: {stage}/{cid}: done but {p.name} is missing"
        try:
            with np.load(p) as z:
                meta = npz_meta(z)
                for k in z.files:
                    z[k]
            if meta is None and p.name != file_name(cid):  # only migrated files predate __meta__
                raise StoreError("no __meta__ entry")
            verify(meta, cid, stage, h, p)
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
            if not repair and lock_busy(self.root / "locks" / f"{safe_key(d.name)}.lock"):
                continue  # a writer is at work there: its new files are not named yet
            for e in os.scandir(d):
                if e.name in named.get(d.name, ()):
                    continue
                if is_temp(e.name):
                    if stale_temp(Path(e.path), min_age_s=0 if repair else 3600):
                        problems.append(f"temp: {e.path}")
                else:
                    problems.append(f"orphan: {e.path}")
        for c in sorted(self.arrays.glob("*.cache")):
            for k in sorted(c.iterdir()):
                for p in sorted(k.iterdir()) if k.is_dir() else [k]:
                    if is_temp(p.name):
                        if stale_temp(p, min_age_s=3600):  # a reader may be building: only a dead one's
                            problems.append(f"temp: {p}")
                    elif not (p.suffix == ".npy" and SEGMENT.fullmatch(p.stem)):
                        problems.append(f"orphan: {p}")  # e.g. an older workbook's cache file
                    else:
                        try:
                            meta = segment_meta(p)
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
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file() and not is_temp(p.name))
