"""The significance S of an input (paper Eq. 3/4): R_inc,k = (R_k^all - R_k^without P) / R_k^without P x 100 and
S = sum_k w_k R_inc,k with normalised weights w. The paper does not give its weights; they are `report.k_weights`
(default `inverse`: w_k proportional to 1/k) and every output says which were used. R_k^without = 0 makes R_inc,k
infinite (S = inf, "unbounded") when R_k^all > 0, and undefined (that k left out of the mean) when both are 0. The
paper's bands name S; a paired bootstrap over identities (and seeds) gives its interval; the inputs, their two
systems and the paper's values are `INPUTS`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from slf_utils.retrieval import KS
from slf_utils.stats import two_level_means
from slf_utils.tables import _fmt_scale

# (key, title, system with all inputs, system without the input, the paper's S in %)
INPUTS = (
    ("image_guide", "Image guide (8x8)", "full_input", "no_image_guide", 75.0),
    ("audio", "Audio", "full_input", "no_audio", 77.0),
    ("speaker_embeddings", "Speaker embeddings", "full_input", "no_speaker_embeddings", 98.0),
    ("attributes", "Gender, ethnicity, age", "full_input", "no_additional_attributes", 31.0),
)

BANDS = ((0.0, "negligible"), (20.0, "minor"), (40.0, "moderate"), (60.0, "considerable"), (80.0, "significant"))


def k_weights(spec, ks=KS) -> dict[int, float]:
    """Normalised weights over k: `inverse` (w_k ~ 1/k, default), `inverse_square`, `uniform`, or explicit numbers
    (a list in ks order or a {k: w} mapping)."""
    ks = [int(k) for k in ks]
    if isinstance(spec, str):
        raw = {"inverse": [1 / k for k in ks], "inverse_square": [1 / k**2 for k in ks], "uniform": [1.0] * len(ks)}
        if spec not in raw:
            raise ValueError(f"report.k_weights must be inverse, inverse_square, uniform or numbers, got {spec!r}")
        w = raw[spec]
    elif isinstance(spec, dict):
        w = [float(spec[k]) for k in ks]
    else:
        w = [float(x) for x in spec]
        if len(w) != len(ks):
            raise ValueError(f"report.k_weights: {len(w)} weights for {len(ks)} values of k")
    total = sum(w)
    if total <= 0 or min(w) < 0:
        raise ValueError(f"report.k_weights must be non-negative with a positive sum, got {w}")
    return {k: x / total for k, x in zip(ks, w)}


def describe_weights(weights: dict) -> str:
    return ", ".join(f"w@{k} = {w:.3f}" for k, w in weights.items())


def recall_increase(r_all: float, r_without: float) -> float:
    """Eq. 3 in percent. R_without = 0: +inf when R_all > 0, NaN (undefined) when R_all is 0 as well."""
    if r_without == 0:
        return float("inf") if r_all > 0 else float("nan")
    return (r_all - r_without) / r_without * 100.0


def significance(r_all: dict, r_without: dict, weights: dict) -> float:
    """Eq. 4: weighted mean of the recall increases over k. Undefined (0/0) k are left out and the remaining
    weights renormalised; any infinite increase makes S infinite; nothing defined gives NaN."""
    inc = {k: recall_increase(r_all[k], r_without[k]) for k in weights}
    defined = {k: v for k, v in inc.items() if not np.isnan(v)}
    if not defined:
        return float("nan")
    if any(np.isinf(v) for v in defined.values()):
        return float("inf")
    wsum = sum(weights[k] for k in defined)
    return float(sum(weights[k] * v for k, v in defined.items()) / wsum) if wsum > 0 else float("nan")


def band(s: float) -> str:
    """The paper's bands: 0 negligible, <=20 minor, <=40 moderate, <=60 considerable, <=80 significant, else
    profound. Negative S (the input lowers recall) and undefined S are named as such."""
    if s is None or np.isnan(s):
        return "undefined"
    if np.isinf(s):
        return "profound (unbounded: recall without the input is 0)"
    if s < 0:
        return "negative (recall is higher without the input)"
    if s == 0:
        return "negligible"
    for top, name in BANDS[1:]:
        if s <= top:
            return name
    return "profound"


def fmt_s(s: float) -> str:
    if s is None or np.isnan(s):
        return "undefined"
    if np.isinf(s):
        return "inf" if s > 0 else "-inf"
    return f"{s:.0f} %"


def bootstrap_significance(
    hits_all: pd.DataFrame, hits_without: pd.DataFrame, weights: dict, n_boot=1000, seed=0, alpha=0.05
):
    """Paired percentile bootstrap of S over the test clips both systems scored (hit frames of one scale and
    protocol each: clip_id, k, hit, identity to resample identities rather than clips, and seed where a system has
    several runs: each resample also draws each system's seeds, stats.two_level_means). Returns (ci_low,
    ci_high); infinite resamples count as +inf in the percentiles."""
    a, b = _clips_seeds_ks(hits_all), _clips_seeds_ks(hits_without)
    common = a.dropna().index.intersection(b.dropna().index)
    ks = [k for k in weights if k in a.columns.get_level_values("k") and k in b.columns.get_level_values("k")]
    if len(common) < 2 or len(ks) != len(weights):
        return float("nan"), float("nan")
    clusters = hits_all.groupby("clip_id")["identity"].first().loc[common] if "identity" in hits_all else None
    # the same identities drawn for both systems (same clusters and seed), each system's own seeds drawn apart
    ra, rb = (two_level_means(_as_clips_seeds_ks(h.loc[common], ks), clusters, n_boot, seed) for h in (a, b))
    s = np.array([significance(dict(zip(ks, x)), dict(zip(ks, y)), weights) for x, y in zip(ra, rb)])
    s = s[~np.isnan(s)]
    if not len(s):
        return float("nan"), float("nan")
    # inverted_cdf: an order statistic, no interpolation between a finite and an infinite resample
    lo, hi = np.quantile(s, [alpha / 2, 1 - alpha / 2], method="inverted_cdf")
    return float(lo), float(hi)


def _clips_seeds_ks(hits: pd.DataFrame) -> pd.DataFrame:
    """Hits as clips x (seed, k) (one run without a `seed` column)."""
    return hits.assign(seed=hits.get("seed", 0)).pivot_table(index="clip_id", columns=["seed", "k"], values="hit")


def _as_clips_seeds_ks(wide: pd.DataFrame, ks) -> np.ndarray:
    seeds = list(dict.fromkeys(wide.columns.get_level_values("seed")))
    return wide.reindex(columns=pd.MultiIndex.from_product([seeds, ks])).to_numpy().reshape(len(wide), len(seeds), -1)


def pretty_significance(sig: pd.DataFrame) -> pd.DataFrame:
    if sig.empty:
        return sig
    ci = [
        f"[{fmt_s(lo)}, {fmt_s(hi)}]" if not np.isnan(lo) else "–" for lo, hi in zip(sig["S_ci_low"], sig["S_ci_high"])
    ]
    inc = [c for c in sig.columns if c.startswith("R_inc@")]
    out = pd.DataFrame(
        {
            "protocol": sig["protocol"],
            "input": sig["input"],
            "with vs without": sig["with"] + " vs " + sig["without"],
            "scales": [f"{_fmt_scale(a)} vs {_fmt_scale(b)}" for a, b in zip(sig["scale_with"], sig["scale_without"])],
        }
    )
    for c in inc:
        out[c] = sig[c].map(fmt_s)
    out["S"] = sig["S_text"]
    out["S 95% CI"] = ci
    out["band"] = sig["band"]
    out["paper S"] = sig["paper_S"].map(lambda v: f"{v:.0f} %")
    out["paper band"] = sig["paper_band"]
    return out
