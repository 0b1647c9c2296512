"""Parameters, paths, provenance and atomic writes: the small things every stage needs."""

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


def read_yaml(path) -> dict:
    path = resolve(path)
    if not path.exists():
        raise ParamsError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
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


# Every key a grid file may set, with its default and type. A grid file names only what it changes.
DEFAULTS = {
    "name": "grid",
    "results": None,
    "data": {
        "kind": "manifest",
        "manifest": None,
        "root": None,
        "train_root": None,
        "test_root": None,
        "test_list": None,
        "max_train_clips": None,
        "demo_corpus": {"build": False, "identities": 40},
    },
    "preprocess": {
        "audio_seconds": 24.0,
        "face_size": 128,
        "guide_size": 8,
        "detector_backend": "opencv",
        "expand_h": 0.4,
        "expand_w": 0.5,
        "attributes": "labels",
    },
    "features": {
        "speaker_backend": "resemblyzer",
        "speaker_source": None,
        "windows": [[3, 1], [6, 2], [12, 4], [24, 8]],
        "frame_window": 0.5,
        "frame_step": 0.3,
        "n_mels": 128,
        "language": "labels",
        "language_source": None,
        "scheduler": None,
    },
    "layout": "params/layout.yaml",
    # constituents no system of this grid may see (e.g. the demo's language label, which nearly names the speaker)
    "layout_drop": [],
    "systems_file": "params/systems.yaml",
    "systems": [],
    "model": {"preset": "demo"},
    "train": {
        "steps": 2000,
        "batch_size": 16,
        "lr": 3e-4,
        "ema": False,
        "seed": 0,
        "checkpoint_every": 250,
        "attribute_dropout": 0.2,
        "cond_drop_prob": 0.1,
        "grad_accum": 1,
        "lr_schedule": "constant",  # or cosine: decays to 0 over train.steps
        "warmup_steps": 0,  # linear warm-up of the learning rate (0: none)
        "feature_noise": 0.0,  # sd of Gaussian noise on the non-zero feature entries in training (standardised units)
    },
    "evaluate": {
        "scales": [0, 1, 2, 3, 4, 5, 6, 7, 8],
        "sampling_steps": 50,
        "use_ema": False,
        "lowres_sample_noise_level": None,  # None: the model preset's value
        "face_model": "Dlib",
        "detector_backend": "opencv",
        "metric": "l2",
        "ks": [1, 3, 5, 10],
        "bootstrap": 1000,
        "seed": 0,
        "batch_size": 64,
        "attributes": "labels",
        "upscale_to": 160,  # deepface: small generated faces are upscaled before detection
        "eigenfaces_size": 32,
        "eigenfaces_components": 80,
        "eigenfaces_crop": 0.6,
    },
    "report": {
        "k_weights": "inverse",
        "chosen_scale": 3.0,
        "n_examples": 6,
        "scales_system": None,
        "bootstrap": 1000,
        "seed": 0,
        # paired differences a - b (each super-resolution system - bicubic is added); pairs not in the grid skipped
        "differences": [["full_input", "pure_sr"], ["full_input", "no_speaker_embeddings"]],
        "guide_top1_min": 0.9,  # learning check: a super-resolution system keeps its guide at least this often
    },
    "grid": {"scheduler": None, "workers": None, "threads_per_worker": 1},
    # per-system changes, e.g. more training steps for generation systems: {system: {train: {steps: 6000}}}
    "system_overrides": {},
}
FREE_FORM = ("model", "system_overrides")  # checked by their own loaders / per system below
ANY_TYPE = ("report.k_weights",)  # a name ("inverse") or explicit numbers: checked by report.k_weights
PATH_KEYS = (
    "results",
    "data.manifest",
    "data.root",
    "data.train_root",
    "data.test_root",
    "data.test_list",
    "layout",
    "systems_file",
    "features.speaker_source",
    "features.language_source",
)


def _check_types(d: dict, ref: dict, where: str, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if k not in ref:
            raise ParamsError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(ref))})")
        r = ref[k]
        if isinstance(r, dict):
            if not isinstance(v, dict):
                raise ParamsError(f"{where}: {key} must be a mapping, got {v!r}")
            if key not in FREE_FORM:
                _check_types(v, r, where, key + ".")
        elif exists(r) and exists(v) and key not in ANY_TYPE:
            ok = (
                isinstance(v, (int, float)) and not isinstance(v, bool)
                if isinstance(r, float)
                else isinstance(v, type(r))
            )
            if isinstance(r, int) and not isinstance(r, bool) and isinstance(v, bool):
                ok = False
            if not ok:
                raise ParamsError(f"{where}: {key} must be {type(r).__name__}, got {v!r}")


def _get(d, dotted):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _set(d, dotted, value):
    *head, last = dotted.split(".")
    for part in head:
        d = d[part]
    d[last] = value


def load_params(path, overrides: dict | None = None) -> dict:
    """Read a grid file, merge `overrides` (e.g. from papermill), validate, resolve paths."""
    path = resolve(path)
    raw = deep_merge(read_yaml(path), overrides)
    _check_types(raw, DEFAULTS, str(path))
    cfg = deep_merge(DEFAULTS, raw)
    cfg["results"] = default(cfg["results"], f"results/{cfg['name']}")
    for key in PATH_KEYS:
        if exists(_get(cfg, key)):
            _set(cfg, key, str(resolve(_get(cfg, key))))
    if not isinstance(cfg["systems"], list):
        raise ParamsError(f"{path}: systems must be a list of system names")
    if cfg["train"]["lr_schedule"] not in ("constant", "cosine"):
        raise ParamsError(f"{path}: train.lr_schedule must be constant or cosine, got {cfg['train']['lr_schedule']!r}")
    for pair in cfg["report"]["differences"]:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise ParamsError(f"{path}: report.differences must be a list of [system, system] pairs, got {pair!r}")
    if not 0 <= cfg["report"]["guide_top1_min"] <= 1:
        raise ParamsError(f"{path}: report.guide_top1_min must be in [0, 1], got {cfg['report']['guide_top1_min']!r}")
    for name, over in cfg["system_overrides"].items():
        if not isinstance(over, dict):
            raise ParamsError(f"{path}: system_overrides.{name} must be a mapping, got {over!r}")
        _check_types(over, DEFAULTS, str(path), f"system_overrides.{name}.")
    cfg["params_file"] = str(path)
    return cfg


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
        os.replace(tmp, path)
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
