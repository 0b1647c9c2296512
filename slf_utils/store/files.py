"""The store's array files: temp names that say who writes them, fsync and atomic publication, the per-clip `.npz`
(its name, its layout on disk read from the headers alone, its `__meta__` entry checked against the row)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from slf_utils.locks import HOST, alive

META = "__meta__"  # the entry of each array file that says which clip, stage and parameter hash it holds


class StoreError(RuntimeError):
    """The store cannot do this now (a journal mode switch, a file that disagrees with its row); says why."""


# ---------------------------------------------------------------------- temp names, fsync, atomic publication
def _tmp(path: Path) -> Path:
    """A temp name beside `path` that says who writes it, so a cleanup can tell a dead writer's leftover from a
    write in progress: `.<name>+<pid>+<host>+<random>.tmp`."""
    return path.parent / f".{path.name}+{os.getpid()}+{HOST}+{os.urandom(4).hex()}.tmp"


def is_temp(name: str) -> bool:
    return name.startswith(".") and ".tmp" in name


def stale_temp(path: Path, min_age_s=3600) -> bool:
    """A temp file no live process is writing: its writer's pid is dead on this host; an untagged one (older
    workbooks) or another host's once it is `min_age_s` old."""
    parts = path.name.removesuffix(".tmp").split("+")
    if len(parts) == 4 and parts[2] == HOST:
        return not alive(parts[1])
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


def fsync_all(paths) -> None:
    """fsync many files at once: a few in flight share the filesystem's journal commits (0.2 ms a file, not 2)."""
    paths = list(paths)
    if len(paths) < 4:
        for p in paths:
            _fsync(p)
        return
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(_fsync, paths))


def fsync_dir(d) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(path: Path, write_fn, sync=True, replace=True) -> bool:
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


# ---------------------------------------------------------------------- the per-clip .npz
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


def file_name(clip_id, token: str = "") -> str:
    """A clip's array file: `<safe key>.<token>.npz`, a new random token for each write (`<safe key>.npz`: a file
    that a migration named)."""
    return f"{safe_key(clip_id)}.{token}.npz" if token else f"{safe_key(clip_id)}.npz"


def save_npz(path: Path, arrays: dict, meta: dict | None, sync=True) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays, **({META: np.array(json.dumps(meta, sort_keys=True))} if meta else {}))

    publish(path, write, sync=sync)


def npz_meta(z) -> dict | None:
    return json.loads(str(z[META])) if META in z.files else None


def npz_layout(path) -> tuple[dict, dict | None]:
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


def verify(meta, clip_id, stage, params_hash, path) -> None:
    """Raise if an array file's `__meta__` is not this clip, stage and hash (a legacy file has none)."""
    if meta is not None and (meta["clip_id"], meta["stage"], meta["params_hash"]) != (str(clip_id), stage, params_hash):
        raise StoreError(
            f"{path} holds {meta['stage']}/{meta['clip_id']} with parameters {meta['params_hash']}, its row says "
            f"{stage}/{clip_id} with {params_hash}"
        )
