"""The small things every stage needs: the project root, the parameter error, YAML that refuses a key given twice,
nested mappings, atomic writes, hashes and provenance. Imports nothing of the project."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (
    "torch",
    "torchvision",
    "torchaudio",
    "imagen-pytorch",
    "speechbrain",
    "deepface",
    "resemblyzer",
    "librosa",
    "pyAudioAnalysis",
    "faiss-cpu",
    "numpy",
    "opencv-contrib-python-headless",
    "dlib-bin",
    "papermill",
    "dask",
)


class ParamsError(ValueError):
    """A parameter file is wrong; the message names the file and the key."""


def exists(x):
    return x is not None


def default(x, d):
    return x if exists(x) else d


def resolve(p) -> Path | None:
    """A path from the params: relative paths are relative to the project root."""
    if not exists(p):
        return None
    p = Path(os.path.expanduser(str(p)))
    return p if p.is_absolute() else ROOT / p


class _DuplicateKey(yaml.YAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True) if key_node.tag != "tag:yaml.org,2002:merge" else None
            if isinstance(key, (str, int, float, bool)):  # others: PyYAML's own error
                if key in seen:
                    raise _DuplicateKey(f"duplicate key '{key}' (line {key_node.start_mark.line + 1})")
                seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path) -> dict:
    path = resolve(path)
    if not path.exists():
        raise ParamsError(f"{path}: file not found")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader) or {}
    except _DuplicateKey as e:
        raise ParamsError(f"{path}: {e}") from e
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return data


def deep_merge(base: dict, over: dict | None) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _get(d, dotted):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _set(d, dotted, value):
    *head, last = dotted.split(".")
    for part in head:
        d = d[part]
    d[last] = value


def flat(d: dict, at: str = "") -> dict:
    """{dotted key: value} of the leaves of nested mappings (an empty mapping is a leaf; lists are leaves)."""
    out = {}
    for k, v in d.items():
        out |= flat(v, f"{at}{k}.") if isinstance(v, dict) and v else {f"{at}{k}": v}
    return out


def params_hash(d) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if rev.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions(names=PACKAGES) -> dict:
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def provenance(extra: dict | None = None) -> dict:
    return {
        "git_revision": git_revision(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }


def atomic_write(path, write_fn):
    """Call write_fn(tmp_path) then rename over `path`: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give results the usual permissions
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the name points at it, then the name too
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path, text: str):
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path, obj):
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def atomic_save_npz(path, **arrays):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(path, write)
