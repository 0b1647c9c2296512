"""The reference rows: systems of mode `reference`, named for what they are, scored with no model, a single scale
(NaN), the same gallery, protocols and statistics as the learned systems. `bicubic` (the stored guide upscaled
bicubically to the grid's super-resolution output size: the floor of any super-resolution system), `identity_mean`
(the pixel mean of the identity's real training faces: the closed-set ceiling of knowing who speaks),
`attribute_mean` (the mean training face of the query's gender and ethnicity: the ceiling of a voice that tells only
them, where identity_mean cannot exist), `real_face` (the query's own real face at the output size: a perfect
reconstruction; under the identity protocol it shows what reproducing the very image is worth, which at 16 px is less
than the identity mean), `random` (a seeded random ranking per query, retrieval.random_selection_hits; mode `none`
in older systems files), `oracle` (a known-answer corpus's planted voice code ranked against each gallery image's
face code, retrieval.oracle_hits: the ceiling of any reading of the voice; no images, skipped on other corpora).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from slf_utils.basics import default, exists
from slf_utils.folds import identity_folds, training_clips
from slf_utils.preprocessing import resize, to_rgb
from slf_utils.recognisers import face_code_of

REFERENCES = ("bicubic", "identity_mean", "attribute_mean", "real_face", "random", "oracle")

ATTRIBUTE_MEAN_BY = ("gender", "ethnicity")  # attribute_mean: the training faces sharing these labels, where known

# the reference rows other rows are read against: the floor of super-resolution, the closed-set ceiling, and the
# ceiling where identity_mean cannot exist (unseen speakers)
FLOOR, CEILING, OPEN_CEILING = "bicubic", "identity_mean", "attribute_mean"


def reference_kind(system) -> str | None:
    """The reference row a system is (`bicubic`, `identity_mean`, `real_face`, `random`, `oracle`, ...), or None for
    a trained system."""
    if system.mode == "none":  # systems files from before `reference`: random selection
        return "random"
    if system.mode != "reference":
        return None
    if system.name not in REFERENCES:
        raise ValueError(f"system {system.name!r}: mode reference, but no reference row of that name ({REFERENCES})")
    return system.name


def bicubic_images(guides, size: int) -> np.ndarray:
    """The `bicubic` reference: each guide upscaled bicubically to size x size."""
    return np.stack([cv2.resize(to_rgb(g), (size, size), interpolation=cv2.INTER_CUBIC) for g in guides])


def identity_means(store, identities, size: int, train: pd.DataFrame | None = None) -> dict:
    """The `identity_mean` reference: {identity: pixel mean of its real training faces at size x size} for those of
    `identities` that have training faces (none, where test identities are unseen, as in VoxCeleb2's test set).
    `train`: the training clips (default the train split; a fold's, folds.training_clips)."""
    train = store.clips(split="train", stage="preprocess") if train is None else train
    train = train[train["identity"].isin(set(identities))]
    faces = store.load_stacked("preprocess", train["clip_id"].tolist(), keys=["face"])["face"]  # one read for all
    return {
        ident: resize(np.round(faces[idx].astype(np.float64).mean(0)).astype(np.uint8), size)
        for ident, idx in train.reset_index(drop=True).groupby("identity").indices.items()
    }


def attribute_means(store, clip_ids, size: int, train: pd.DataFrame | None = None) -> list:
    """The `attribute_mean` reference: per clip, the pixel mean of the training faces that share its labelled gender
    and ethnicity (ATTRIBUTE_MEAN_BY; an unlabelled one is left out of the match, and a combination no training face
    has falls back to gender alone, then to all training faces). What knowing the attributes gives: the ceiling of
    a voice that tells only them (on unseen speakers, where identity_mean does not exist). `train`: the training
    clips (default the train split; a fold's, folds.training_clips)."""
    clips = store.clips(stage="preprocess").set_index("clip_id")
    train = clips[clips["split"] == "train"] if train is None else train.set_index("clip_id")
    faces = store.load_stacked("preprocess", train.index.tolist(), keys=["face"])["face"].astype(np.float64)
    labels = train[list(ATTRIBUTE_MEAN_BY)].astype(object).where(train[list(ATTRIBUTE_MEAN_BY)].notna(), None)
    memo = {}

    def mean_of(key):
        if key not in memo:
            mask = np.ones(len(train), bool)
            for a, v in key:
                mask &= (labels[a] == v).to_numpy()
            memo[key] = resize(np.round(faces[mask].mean(0)).astype(np.uint8), size) if mask.any() else None
        return memo[key]

    out = []
    for c in clip_ids:
        known = tuple((a, clips.at[c, a]) for a in ATTRIBUTE_MEAN_BY if pd.notna(clips.at[c, a]))
        out.append(next(m for m in (mean_of(known), mean_of(known[:1]), mean_of(())) if m is not None))
    return out


def reference_images(kind: str, store, gallery, size: int, cfg=None) -> tuple[list, list]:
    """(clip ids, images) of an image reference row over the gallery; `identity_mean` leaves out the clips whose
    identity has no training face (every clip, with identity folds: `cfg`'s data.identity_folds). The mean rows read
    the training faces the query's own models would train on (a fold's, folds.training_clips)."""
    if kind == "bicubic":
        return list(gallery.clip_ids), list(bicubic_images(gallery.guides, size))
    if kind == "real_face":
        return list(gallery.clip_ids), [resize(to_rgb(f), size) for f in gallery.faces]
    if kind not in ("identity_mean", "attribute_mean"):
        raise ValueError(f"reference_images: {kind!r} has no images")
    fold_of = identity_folds(cfg, store.clips()) if exists(cfg) else {}
    found = {}
    for fold in sorted({fold_of.get(i) for i in gallery.identities}, key=str):
        train = training_clips(store, cfg, fold, who=f"{kind}" + ("" if fold is None else f" (identity fold {fold})"))
        mine = [(c, i) for c, i in zip(gallery.clip_ids, gallery.identities) if fold_of.get(i) == fold]
        if kind == "identity_mean":
            means = identity_means(store, {i for _, i in mine}, size, train)
            found |= {c: means[i] for c, i in mine if i in means}
        else:
            found |= dict(zip([c for c, _ in mine], attribute_means(store, [c for c, _ in mine], size, train)))
    ids = [c for c in gallery.clip_ids if c in found]
    return ids, [found[c] for c in ids]


# ---------------------------------------------------------------------------------------------- the oracle
def read_codes(corpus_dir, which: str = "face") -> tuple[list[str], np.ndarray]:
    """(identities, codes (N, components)) from a known-answer corpus's codes.csv: `which` face or voice."""
    codes = pd.read_csv(Path(corpus_dir) / "codes.csv", dtype={"identity": str})
    return codes["identity"].tolist(), codes.filter(regex=rf"^{which}_\d+$").to_numpy(np.float64)


def corpus_link_strength(cfg) -> float | None:
    """The link strength the known-answer corpus in data.root was built with (its build record), None where data.root
    holds no known-answer corpus (the demo, VoxCeleb2)."""
    stamp = Path(default(cfg["data"].get("root"), ".")) / ".build" / "settings.json"
    if not stamp.exists():
        return None
    return json.loads(stamp.read_text()).get("settings", {}).get("link_strength")


def oracle_inputs(cfg, store, clips: pd.DataFrame):
    """(voice code of each clip's identity, face code of each clip's stored face, link strength) for the `oracle` row
    from the known-answer corpus in data.root (codes.csv, code_basis.npz, the strength it was built with), or a
    sentence saying why there are none (a corpus without planted codes: the demo, VoxCeleb2)."""
    root = Path(default(cfg["data"].get("root"), "."))
    strength = corpus_link_strength(cfg)
    missing = [f for f in ("codes.csv", "code_basis.npz") if not (root / f).exists()]
    if missing or strength is None:
        return f"the corpus in {root} has no planted codes ({', '.join(missing) or 'no build record'})"
    ids, voice = read_codes(root, "voice")
    at = dict(zip(ids, voice))
    unknown = sorted(set(clips["identity"]) - set(at))
    if unknown:
        return f"{len(unknown)} identities of the gallery are not in {root / 'codes.csv'}, e.g. {unknown[:3]}"
    faces = store.load_stacked("preprocess", clips["clip_id"].tolist(), keys=["face"])["face"]
    return np.stack([at[i] for i in clips["identity"]]), face_code_of(faces, root / "code_basis.npz"), float(strength)
