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
    # reuse: results folders of other grids (e.g. [results/demo]); a step not done here whose record there is done with
    # the same hash (same parameters, upstream steps and notebook) is copied instead of run (slf_utils.grid)
    "grid": {"scheduler": None, "workers": None, "threads_per_worker": 1, "reuse": []},
    # wal: readers and one writer at once on one host; delete: a store on a network filesystem shared by nodes
    "store": {"journal_mode": "wal"},
    # Speech2Face (Oh et al. 2019) on the same bench: a voice encoder predicts the face recogniser's embedding of the
    # speaker's face (slf_utils.voice_encoder, notebook 06); store stages `face_embedding` and `voice_face_embedding`
    "speech2face": {
        "face_model": "Dlib",  # recogniser of the face_embedding stage: Dlib 128-d offline; the paper: VGG-Face 4096-d
        "voice_encoder": {
            "backend": "mlp",  # mlp (stored speaker embeddings), ve_conv (the paper's CNN on a spectrogram), ast
            "inputs": ["speaker"],  # mlp: speaker and/or speaker_windows (mean over windows), concatenated
            "hidden": 512,  # width of the fully connected layers (the paper: 4096)
            "dropout": 0.0,
            "channels": [16, 16, 32, 32, 32, 64, 128, 128],  # ve_conv widths (the paper: 64 64 128 128 128 256 512 512)
            "spectrogram": "power_law",  # ve_conv: power_law (the paper: complex STFT, sgn|S|^0.3) or log_mel
            "n_mels": 64,  # ve_conv with log_mel
            "seconds": 6.0,  # ve_conv/ast: audio window (random in training, the clip's start for predictions)
            "ast_source": None,  # hub id or local folder (None: MIT/ast-finetuned-audioset-10-10-0.4593)
            "ast_freeze": False,  # ast: train the regression head only
            "steps": 2000,
            "batch_size": 32,
            "lr": 1e-3,
            "weight_decay": 0.0,
            "seed": 0,
            "checkpoint_every": 500,  # an interrupted training resumes from its last checkpoint
            "metric": "cosine",  # retrieval in embedding space: the loss fixes only the prediction's direction
            # the paper's loss: weights of |p - t|_1, |p - t|^2 and 1 - cos of the L2-normalised prediction p and
            # target t; `decoder` (L1 of the face decoder's first-layer activations) and `classifier` (softmax
            # distillation at `temperature`) need those networks, which the encoder's training does not have: 0
            "loss": {"l1": 0.0, "l2": 1.0, "cosine": 0.0, "decoder": 0.0, "classifier": 0.0, "temperature": 2.0},
        },
    },
    # The direct face decoder (slf_utils.face_decoder; systems with `decoder: direct`): an MLP from the embedding to a
    # base x base feature map, then upsampling conv blocks to the preset's output size; trained with L1 (+ an optional
    # perceptual term) on the training split's real faces. Diffusion systems read `train`, direct ones this.
    "face_decoder": {
        "hidden": 512,  # MLP width
        "base": 4,  # side of the MLP's feature map (doubled by each upsampling block)
        "channels": 128,  # channels of the feature map, halved by each block (at least 16)
        "steps": 2000,
        "batch_size": 32,
        "lr": 1e-3,
        "lr_schedule": "cosine",  # or constant
        "weight_decay": 0.0,
        "input_noise": 1.0,  # sd of Gaussian noise on the (standardised) input embedding in training: see face_decoder
        "seed": 0,
        "checkpoint_every": 500,  # an interrupted training resumes from its last checkpoint
        "perceptual": 0.0,  # weight of the VGG-16 perceptual loss (L1 of relu1_2, relu2_2, relu3_3 features): off
        "perceptual_source": None,  # None: torchvision's ImageNet weights (downloaded); or a local state_dict file
    },
    # SCLDM-style contrastive pre-training (slf_utils.contrastive, notebook 07): a speech encoder and a face encoder
    # trained with CLIP's symmetric InfoNCE and a learnable temperature; store stage `contrastive_speech` (the aligned
    # speech embedding of every clip), read by the constituent and the system of that name
    "contrastive": {
        "speech_encoder": "mlp",  # mlp (stored speaker embeddings) or mel_conv (temporal conv + pooling on mel frames)
        "speech_inputs": ["speaker"],  # mlp: speaker and/or speaker_windows (mean over windows), concatenated
        "mel_channels": [128, 128],  # mel_conv: widths of the 1-d convolutions in time (kernel 3)
        "face_encoder": "cnn",  # cnn (from scratch on the stored face) or recogniser (frozen face_embedding + head)
        "face_px": 32,  # cnn: the stored face is downsized to face_px x face_px
        "channels": [32, 64, 128],  # cnn: conv3x3-BN-ReLU-maxpool2 block widths
        "augment": True,  # cnn: training faces flipped left-right at random and shifted by up to 2 px
        "dim": 128,  # D of the shared space: the stored embedding's size
        "hidden": 256,  # width of the heads' hidden layer
        "dropout": 0.1,
        "positives": "identity",  # identity (every face of the speaker in the batch) or clip (the clip's own face)
        "temperature": 0.07,  # initial; the logit scale ln(1/T) is learnt (CLIP)
        "max_logit_scale": 100.0,  # exp(logit scale) is clamped to at most this (CLIP: 100)
        "steps": 500,  # measured on the demo corpus: test recall@1 the same at 500 and 1500 steps
        "batch_size": 64,
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "seed": 0,
        "checkpoint_every": 500,  # an interrupted training resumes from its last checkpoint
    },
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
)
# a model source is a local folder or a hub id ("speechbrain/spkrec-ecapa-voxceleb"): resolved only when it names
# an existing folder or is written as a path (./x, ../x, /x, ~/x)
SOURCE_KEYS = ("features.speaker_source", "features.language_source", "face_decoder.perceptual_source")


def _check_types(d: dict, ref: dict, where: str, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if k not in ref:
            raise ParamsError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(ref))})")
        r = ref[k]
        if isinstance(r, dict):
            if not isinstance(v, dict):
                raise ParamsError(f"{where}: {key} must be a mapping, got {v!r}")
            # a system's model options (system_overrides.<system>.model) are checked like `model`, by its loader
            per_system_model = key.startswith("system_overrides.") and key.endswith(".model") and key.count(".") == 2
            if key not in FREE_FORM and not per_system_model:
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
    for key in SOURCE_KEYS:
        src = _get(cfg, key)
        if exists(src) and (str(src).startswith((".", "/", "~")) or resolve(src).is_dir()):
            _set(cfg, key, str(resolve(src)))
    if not isinstance(cfg["systems"], list):
        raise ParamsError(f"{path}: systems must be a list of system names")
    if cfg["train"]["lr_schedule"] not in ("constant", "cosine"):
        raise ParamsError(f"{path}: train.lr_schedule must be constant or cosine, got {cfg['train']['lr_schedule']!r}")
    if cfg["store"]["journal_mode"] not in ("wal", "delete", "truncate", "persist"):
        raise ParamsError(
            f"{path}: store.journal_mode must be wal, delete, truncate or persist, got {cfg['store']['journal_mode']!r}"
        )
    for pair in cfg["report"]["differences"]:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise ParamsError(f"{path}: report.differences must be a list of [system, system] pairs, got {pair!r}")
    if not 0 <= cfg["report"]["guide_top1_min"] <= 1:
        raise ParamsError(f"{path}: report.guide_top1_min must be in [0, 1], got {cfg['report']['guide_top1_min']!r}")
    _check_speech2face(cfg["speech2face"], str(path))
    _check_face_decoder(cfg["face_decoder"], str(path))
    _check_contrastive(cfg["contrastive"], str(path))
    cfg["grid"]["reuse"] = [str(resolve(p)) for p in cfg["grid"]["reuse"] or []]
    for name, over in cfg["system_overrides"].items():
        if not isinstance(over, dict):
            raise ParamsError(f"{path}: system_overrides.{name} must be a mapping, got {over!r}")
        _check_types(over, DEFAULTS, str(path), f"system_overrides.{name}.")
    cfg["params_file"] = str(path)
    return cfg


def _check_choices(section: dict, choices: dict, prefix: str, where: str):
    for name, ok in choices.items():
        if section[name] not in ok:
            raise ParamsError(f"{where}: {prefix}.{name} must be one of {', '.join(ok)}, got {section[name]!r}")


def _check_at_least_1(section: dict, names, prefix: str, where: str):
    for name in names:
        if section[name] < 1:
            raise ParamsError(f"{where}: {prefix}.{name} must be at least 1, got {section[name]!r}")


def _check_speech2face(s2f: dict, where: str):
    ve = s2f["voice_encoder"]
    key = "speech2face.voice_encoder"
    choices = {
        "backend": ("mlp", "ve_conv", "ast"),
        "spectrogram": ("power_law", "log_mel"),
        "metric": ("cosine", "l2"),
    }
    _check_choices(ve, choices, key, where)
    if not ve["inputs"] or not set(ve["inputs"]) <= {"speaker", "speaker_windows"}:
        raise ParamsError(f"{where}: {key}.inputs must list speaker and/or speaker_windows, got {ve['inputs']!r}")
    if not ve["channels"] or not all(isinstance(c, int) and c > 0 for c in ve["channels"]):
        raise ParamsError(f"{where}: {key}.channels must be a list of positive integers, got {ve['channels']!r}")
    _check_at_least_1(ve, ("hidden", "n_mels", "steps", "batch_size", "checkpoint_every"), key, where)
    if not (ve["seconds"] > 0 and ve["lr"] > 0 and ve["weight_decay"] >= 0 and 0 <= ve["dropout"] < 1):
        raise ParamsError(f"{where}: {key}: seconds and lr must be > 0, weight_decay >= 0, dropout in [0, 1)")
    loss = ve["loss"]
    if any(w < 0 for w in loss.values()) or loss["temperature"] == 0:
        raise ParamsError(f"{where}: {key}.loss: weights must be >= 0 and temperature > 0, got {loss!r}")
    if loss["l1"] + loss["l2"] + loss["cosine"] <= 0:
        raise ParamsError(f"{where}: {key}.loss: one of l1, l2, cosine must be > 0 (the embedding loss), got {loss!r}")


def _check_face_decoder(fd: dict, where: str):
    _check_at_least_1(
        fd, ("hidden", "base", "channels", "steps", "batch_size", "checkpoint_every"), "face_decoder", where
    )
    if fd["lr_schedule"] not in ("constant", "cosine"):
        raise ParamsError(f"{where}: face_decoder.lr_schedule must be constant or cosine, got {fd['lr_schedule']!r}")
    if not (fd["lr"] > 0 and fd["weight_decay"] >= 0 and fd["perceptual"] >= 0 and fd["input_noise"] >= 0):
        raise ParamsError(f"{where}: face_decoder: lr must be > 0, weight_decay, input_noise and perceptual >= 0")


def _check_contrastive(ct: dict, where: str):
    choices = {
        "speech_encoder": ("mlp", "mel_conv"),
        "face_encoder": ("cnn", "recogniser"),
        "positives": ("identity", "clip"),
    }
    _check_choices(ct, choices, "contrastive", where)
    if not ct["speech_inputs"] or not set(ct["speech_inputs"]) <= {"speaker", "speaker_windows"}:
        raise ParamsError(
            f"{where}: contrastive.speech_inputs must list speaker and/or speaker_windows, got {ct['speech_inputs']!r}"
        )
    for name in ("channels", "mel_channels"):
        if not ct[name] or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in ct[name]):
            raise ParamsError(f"{where}: contrastive.{name} must be a list of positive integers, got {ct[name]!r}")
    _check_at_least_1(ct, ("face_px", "dim", "hidden", "steps", "batch_size", "checkpoint_every"), "contrastive", where)
    if ct["face_px"] >> len(ct["channels"]) < 1:
        raise ParamsError(
            f"{where}: contrastive.face_px {ct['face_px']} is too small for {len(ct['channels'])} pooling blocks "
            f"(at least {2 ** len(ct['channels'])})"
        )
    if ct["batch_size"] < 2:
        raise ParamsError(f"{where}: contrastive.batch_size must be at least 2 (InfoNCE needs negatives)")
    if not (ct["lr"] > 0 and ct["weight_decay"] >= 0 and 0 <= ct["dropout"] < 1):
        raise ParamsError(f"{where}: contrastive: lr must be > 0, weight_decay >= 0, dropout in [0, 1)")
    if not (0 < ct["temperature"] and 1 <= ct["max_logit_scale"] and 1 / ct["temperature"] <= ct["max_logit_scale"]):
        raise ParamsError(
            f"{where}: contrastive: temperature must be > 0, max_logit_scale >= 1 and 1 / temperature <= "
            f"max_logit_scale, got {ct['temperature']!r}, {ct['max_logit_scale']!r}"
        )


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
