"""Unseen speakers (data.identity_folds) and the one place a training set is drawn.

* Identity folds: on a manifest corpus every identity has held-out clips, so `data.identity_folds.folds` >= 2 deals
  the identities into K folds; fold k's models train on the `train` clips of the other folds' identities only
  (never a `val`, `test` or `unused` clip) and answer fold k's held-out clips. Validation speakers
  (`data.validation.identities`, preprocessing.assign_validation) are dealt apart from test speakers, so that every
  fold gets both: each list is sorted, permuted with the seed and dealt round-robin, the test list going on where
  the validation list stopped (fold sizes differ by at most one; without validation speakers the deal is
  `seeded_folds` of every identity). Per fold, test, validation and training identities are disjoint (`fold_roles`).
* `training_clips` is what every model of the workbook trains on (diffusion models, direct decoders, normalisation,
  face priors, latent autoencoders, the mean-face reference rows, the trained encoders, the eigenfaces recogniser):
  it refuses a set that holds a gallery clip (`check_training_set`), naming the clips and who asked.
* Nested cross-fitting: a trained encoder's stage (voice_face_embedding, contrastive_speech) exists once per outer
  fold (`fold_stage`, e.g. `voice_face_embedding.fold1`), read by fold k's Recipe: fold k's clips from the encoder
  trained without fold k, a clip of fold j != k from the encoder trained without folds j and k (`encoder_key`).
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pandas as pd

from slf_utils.basics import exists

# The gallery: the real faces of every held-out clip. `val` ones choose, `test` ones report; both are queries and
# ranked against, so no model may train on either.
HELD_OUT = ("val", "test")
GALLERIES = ("fold", "all")  # data.identity_folds.gallery


def _deal(units, folds: int, rng, offset: int = 0) -> dict:
    perm = rng.permutation(len(units))
    return {u: int((perm[i] + offset) % int(folds)) for i, u in enumerate(units)}


def seeded_folds(units, folds: int, seed) -> dict:
    """{unit: fold} of the distinct `units`, sorted, then dealt round-robin in a seeded permutation (fold sizes differ
    by at most one): the encoders' cross-fitting folds, and the identity folds without validation speakers."""
    return _deal(sorted(set(units)), folds, np.random.default_rng(seed))


def n_folds(cfg) -> int:
    """data.identity_folds.folds: 0 in the closed set (one model per system), else the models per system."""
    return int(cfg["data"]["identity_folds"]["folds"])


def per_fold_gallery(cfg) -> bool:
    """Whether each query is ranked among its own fold's gallery clips only (identity folds, gallery `fold`)."""
    return n_folds(cfg) >= 2 and cfg["data"]["identity_folds"].get("gallery", "fold") == "fold"


def identity_folds(cfg, clips: pd.DataFrame) -> dict:
    """{identity: fold} of data.identity_folds over every identity of `clips` (all of the store's clips, so that the
    folds do not depend on which stages are done): validation speakers (identities with a `val` clip) and the others
    dealt separately (module docstring); {} in the closed set."""
    if n_folds(cfg) < 2:
        return {}
    k, seed = n_folds(cfg), int(cfg["data"]["identity_folds"]["seed"])
    val = sorted(set(clips.loc[clips["split"] == "val", "identity"]))
    rest = sorted(set(clips["identity"]) - set(val))
    return _deal(val, k, np.random.default_rng([seed, 1])) | _deal(rest, k, np.random.default_rng(seed), len(val))


def fold_view(clips: pd.DataFrame, fold_of: dict, fold: int | None) -> pd.DataFrame:
    """The clips as the models of fold `fold` see them: its identities keep their held-out clips (its queries, `val`
    and `test` as assigned) and their training clips become `unused`; the other identities keep their `train` clips
    and their held-out clips become `unused` (another fold's queries, and gallery images). Closed set (no folds) or
    fold None: unchanged."""
    if not fold_of or fold is None:
        return clips
    mine = clips["identity"].map(fold_of).to_numpy() == fold
    split = clips["split"].to_numpy(dtype=object).copy()
    split[mine & (split == "train")] = "unused"
    split[~mine & (split != "train")] = "unused"
    return clips.assign(split=split)


def check_training_set(clips: pd.DataFrame, ids, who: str) -> None:
    """Refuse a training set that holds a gallery clip (`val` or `test` in `clips`, the store's table): a model
    trained on a gallery image draws it and misses the query it should have found."""
    split = dict(zip(clips["clip_id"], clips["split"]))
    leaked = sorted(c for c in ids if split.get(c) in HELD_OUT)
    if leaked:
        shown = ", ".join(leaked[:5]) + (f" and {len(leaked) - 5} more" if len(leaked) > 5 else "")
        raise ValueError(
            f"{who}: its training set holds {len(leaked)} gallery clip(s) (val/test: the real faces queries are ranked "
            f"against): {shown}. A model must train on `train` clips only (slf_utils.folds.training_clips)"
        )


def training_clips(store, cfg=None, fold: int | None = None, stage: str = "preprocess", who=None) -> pd.DataFrame:
    """The clips (with `stage` done) a model trains on: the `train` split, or with identity folds the `train` clips of
    the identities of the folds other than `fold` (fold_view; fold None: every `train` clip). Checked: no gallery
    clip (check_training_set; `who` names the model in the error). cfg None: the train split."""
    every = store.clips()
    fold_of = identity_folds(cfg, every) if exists(cfg) else {}
    clips = fold_view(store.clips(stage=stage), fold_of, fold)
    clips = clips[clips["split"] == "train"].reset_index(drop=True)
    check_training_set(every, clips["clip_id"], who or ("the closed set" if fold is None else f"fold {fold}"))
    return clips


def training_ids(store, stages=(), cfg=None, fold: int | None = None, who=None) -> list[str]:
    """Sorted ids of the training clips (training_clips) with a face and every stage of `stages` done."""
    ids = set(training_clips(store, cfg, fold, who=who)["clip_id"])
    for stage in stages:
        ids &= set(store.clips(stage=stage)["clip_id"])
    return sorted(ids)


# ---------------------------------------------------------------------------------------------- roles and power
def fold_roles(cfg, clips: pd.DataFrame) -> pd.DataFrame:
    """Per identity fold: the identities in each role (test: its identities' `test` clips are reported; validation:
    its identities' `val` clips choose; training: the other folds' identities whose `train` clips its models train
    on) and the clips of each. Empty in the closed set."""
    fold_of = identity_folds(cfg, clips)
    fold = clips["identity"].map(fold_of)
    rows = []
    for k in range(n_folds(cfg) if fold_of else 0):
        mine, split = clips[fold == k], clips["split"]
        train = clips[(fold != k) & (split == "train")]
        rows.append(
            {
                "fold": k,
                "test_identities": mine.loc[mine["split"] == "test", "identity"].nunique(),
                "validation_identities": mine.loc[mine["split"] == "val", "identity"].nunique(),
                "training_identities": train["identity"].nunique(),
                "test_queries": int((mine["split"] == "test").sum()),
                "validation_queries": int((mine["split"] == "val").sum()),
                "gallery_clips": int(mine["split"].isin(HELD_OUT).sum()),
                "training_clips": len(train),
            }
        )
    return pd.DataFrame(rows)


def roles_line(cfg, clips: pd.DataFrame) -> str:
    """One sentence: the identities in each role per fold and what reporting on unseen speakers costs in power,
    against the closed set on the same held-out clips (every identity reported, one held-out clip each choosing:
    `data.validation.per_identity: 1`)."""
    roles = fold_roles(cfg, clips)
    if roles.empty:
        return ""
    per = "; ".join(
        f"fold {r.fold}: {r.test_identities} test, {r.validation_identities} validation, {r.training_identities} "
        f"training identities"
        for r in roles.itertuples()
    )
    held = clips[clips["split"].isin([*HELD_OUT, "unused"])]  # unused here: validation speakers' other held-out clips
    closed_ids = held["identity"].nunique()
    closed_queries = len(held) - closed_ids
    n_test, q_test = int(roles["test_identities"].sum()), int(roles["test_queries"].sum())
    wider = math.sqrt(closed_ids / n_test) if n_test else float("nan")
    gallery = "its own fold's held-out clips" if per_fold_gallery(cfg) else "every held-out clip"
    return (
        f"Roles per fold ({per}). Each query is ranked among {gallery}. Reported: {q_test} test queries of {n_test} "
        f"identities, against {closed_queries} of {closed_ids} in the closed set on the same held-out clips (one per "
        f"identity choosing): identity-bootstrap intervals about {wider:.2f}x wider."
    )


# ---------------------------------------------------------------------------------------------- nested cross-fitting
def fold_stage(stage: str, fold: int) -> str:
    """The store stage that holds a trained encoder's values for outer fold `fold`'s models."""
    return f"{stage}.fold{int(fold)}"


def encoder_key(clip_fold: int, outer: int | None) -> tuple:
    """The folds left out of the encoder whose value of a clip of `clip_fold` outer fold `outer`'s models read (outer
    None: the clip's own fold only, the encoder's own evaluation)."""
    return tuple(sorted({int(clip_fold), *([] if outer is None else [int(outer)])}))


def encoder_keys(folds: int) -> list[tuple]:
    """Every encoder of nested cross-fitting over `folds` identity folds: one without each fold (its queries) and one
    without each pair (the training clips of the other folds): K + K(K-1)/2 trainings."""
    return [(k,) for k in range(folds)] + list(combinations(range(folds), 2))


def key_name(key: tuple) -> str:
    """The folder of an encoder trained without the folds `key` (`fold1`, `fold0-2`)."""
    return "fold" + "-".join(str(k) for k in key)
