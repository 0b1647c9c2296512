"""Retrieval and the recall protocols: which identities a face retrieves from the gallery of real faces, and what an
uninformative system would score there. A query hits when its identity is among the top-k *distinct* identities
retrieved (FAISS IndexFlatL2 as the reference code, or cosine). `paper` ranks the whole gallery, the query's own real
image included (as the paper); `identity` leaves the query's own clip out of its ranking, so a hit must come from
another image of the same person. With per-fold galleries (`gallery_groups`) each query is ranked only among the
gallery clips of its own identity fold. Chance (`chance_hits`) is computed, not assumed: the exact probability that a
uniformly random ordering of the gallery clips the query is ranked in puts its identity among the first k distinct
identities. It is k/N only under `paper` with equal clip counts; under `identity` the query's identity has one clip
fewer (an identity with a single gallery clip can never hit), and per-fold galleries are smaller. The random-selection
system (`random_selection_hits`) is such an ordering, ranked like every other system.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd

from slf_utils.basics import default
from slf_utils.folds import identity_folds, per_fold_gallery

KS = (1, 3, 5, 10)

PROTOCOLS = ("identity", "paper")  # the identity protocol first: it is the report's main view


def _as_f32(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def build_index(gallery: np.ndarray, metric: str = "l2"):
    """FAISS exact index over gallery embeddings (N, D). `l2`: IndexFlatL2 (reference code); `cosine`:
    IndexFlatIP over L2-normalised vectors, so the largest inner product is the smallest angle."""
    import faiss  # 0.7 s to import: only where a ranking is made

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
    import faiss  # 0.7 s to import: only where a ranking is made

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


def oracle_hits(voice, faces, strength: float, gallery_ids, ks=KS, seed=0, groups=None) -> dict[str, dict]:
    """The known-answer oracle (issue 26), ranked like every system: query i (gallery clip i) is its identity's
    planted voice code voice[i], gallery clip j its image's face code faces[j]; gallery images are ranked by the
    Bayes-optimal distance |v - s c|^2 (v = s c + sqrt(1 - s^2) noise). At s = 0 every image ties: a seeded random
    order (random_selection_hits, the `random` row's). {protocol: {k: (N,) bool}} as protocol_hits."""
    own = np.arange(len(gallery_ids))
    if strength > 0:
        return protocol_hits(voice, own, float(strength) * np.asarray(faces), gallery_ids, ks, "l2", groups)
    return {
        p: random_selection_hits(gallery_ids, gallery_ids, ks, seed, own if p == "identity" else None, groups, own)
        for p in PROTOCOLS
    }


def own_entries(clip_ids, gallery_clip_ids) -> np.ndarray:
    """Gallery index of each of `clip_ids` (every one must be in the gallery)."""
    pos = {c: i for i, c in enumerate(gallery_clip_ids)}
    missing = [c for c in clip_ids if c not in pos]
    if missing:
        raise ValueError(f"{len(missing)} clip(s) are not in the gallery, e.g. {missing[:3]}")
    return np.array([pos[c] for c in clip_ids], dtype=np.int64)


def gallery_groups(cfg, store, identities) -> list | None:
    """Each gallery clip's identity fold where queries are ranked among their own fold's clips only
    (folds.per_fold_gallery: identity folds with data.identity_folds.gallery `fold`), else None (one gallery)."""
    if not per_fold_gallery(cfg):
        return None
    fold_of = identity_folds(cfg, store.clips())
    return [fold_of[i] for i in identities]
