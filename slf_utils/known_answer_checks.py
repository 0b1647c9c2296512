"""Measures of a built known-answer corpus (slf_utils.known_answer): how much of the planted face code a voice
embedding carries (ridge regression, cross-validated over identities), how recognisable an identity's images are
(dlib re-identification), and how well an image's own face code names its identity (the oracle's ceiling).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from slf_utils.known_answer import DETECTOR, corpus_crops
from slf_utils.preprocessing import decode, read_image
from slf_utils.recognisers import face_code_of, face_embedder
from slf_utils.references import read_codes
from slf_utils.retrieval import retrieval_hits
from slf_utils.speech_models import speaker_backend, speaker_embeddings


def voice_embeddings(corpus_dir, clips: list[dict]) -> np.ndarray:
    """Whole-clip Resemblyzer embeddings (the workbook's speaker path, speech_models.speaker_embeddings) of manifest
    rows."""
    backend = speaker_backend("resemblyzer")
    out = []
    for c in clips:
        audio, _ = decode(Path(corpus_dir) / c["video"], frame=False)
        out.append(speaker_embeddings(audio, backend, [], whole=True, sliding=False)[0])
    return np.stack(out)


def code_recovery(embeddings, identities, codes, folds: int = 5) -> float:
    """R^2 (mean over components) of ridge predictions of the face code from voice embeddings, K-fold cross-validated
    over identities (no clip of a test identity in training), the ridge's alpha chosen by the same grouped
    cross-validation inside each training fold (a clip-level choice would see the identity's other clips)."""
    from sklearn.linear_model import Ridge  # heavy: only this check needs it
    from sklearn.metrics import r2_score
    from sklearn.model_selection import GridSearchCV, GroupKFold

    x, y, groups = np.asarray(embeddings), np.asarray(codes), np.asarray(identities)
    pred = np.zeros_like(y, dtype=float)
    for train, test in GroupKFold(folds).split(x, y, groups):
        search = GridSearchCV(Ridge(), {"alpha": np.logspace(-2, 4, 13)}, cv=GroupKFold(folds))
        pred[test] = search.fit(x[train], y[train], groups=groups[train]).predict(x[test])
    return float(r2_score(y, pred))


def reidentification(corpus_dir) -> float:
    """dlib recall@1 of every face image of the corpus against all the others (its own left out)."""
    rows = list(csv.DictReader(open(Path(corpus_dir) / "manifest.csv", newline="")))
    images = [read_image(Path(corpus_dir) / r["face"]) for r in rows]
    emb, _ = face_embedder("Dlib", DETECTOR).embed(images)
    ids = [r["identity"] for r in rows]
    return float(retrieval_hits(emb, ids, emb, ids, ks=(1,), exclude=np.arange(len(ids)))[1].mean())


def code_identification(corpus_dir) -> float:
    """recall@1 of each image's own face code (face_code_of of the workbook's crop) among the identities' codes."""
    rows, crops = corpus_crops(corpus_dir)
    ids, codes = read_codes(corpus_dir)
    own = face_code_of(crops, Path(corpus_dir) / "code_basis.npz")
    nearest = np.linalg.norm(own[:, None] - codes[None], axis=2).argmin(1)
    return float(np.mean(nearest == np.array([ids.index(r["identity"]) for r in rows])))
