"""The report (notebook 05): from whatever `<results>/<system>/eval/metrics.csv` exist, the paper's Fig. 8 (recall vs
conditional scale with bootstrap bands, the chance line and the reference rows), its tables (each system at its best
scale and at a chosen scale), paired differences between systems, the significance S of each input (Eq. 3/4) beside
the paper's values, and sample grids (Fig. 6, 7).

Everything is shown under both recall protocols (evaluation: `identity` first, the main one, then `paper`); each
protocol picks its own best scales. Reference rows (bicubic, identity_mean, real_face, random: mode `reference`) have
no scale: they are horizontal lines in the figure and rows in every table. Intervals resample identities (evaluation).
A system with a direct decoder (slf_utils.face_decoder) has no conditional scale either (scale NaN): one point, drawn
as a dash-dotted horizontal line ("no scale") and a row in every table, judged by the learning checks like any
trained system. A system's `note` (systems.yaml; e.g. face_to_face: it is fed its own real face's embedding, so it
sees the answer) marks its title with a dagger and is printed under the headline in headline.md and summary.md.

Paired differences (`differences.*`): recall@k of system a minus system b on the same gallery clips, the mean over
pairs of runs (a one-run reference against every seed of a seeded system, two seeded systems seed by seed), with a
95 % paired bootstrap interval over identities and seeds, for the pairs of `report.differences` and every
super-resolution system minus bicubic, at each system's best scale and at `report.chosen_scale`. The learning checks
read the identity protocol of the clips that choose wherever those can hit under it (lead_protocol).

Significance (paper Eq. 3/4): R_inc,k = (R_k^all - R_k^without P) / R_k^without P x 100 and S = sum_k w_k R_inc,k with
normalised weights w. The paper does not give its weights; they are `report.k_weights` (default `inverse`:
w_k proportional to 1/k) and every output says which were used. R_k^without = 0 makes R_inc,k infinite
(S = inf, "unbounded") when R_k^all > 0, and undefined (that k left out of the mean) when both are 0.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from slf_utils.config import (
    DEFAULTS,
    FACTORS,
    atomic_write,
    atomic_write_text,
    deep_merge,
    default,
    exists,
    seed_overrides,
    seeds_of,
)
from slf_utils.evaluation import (
    KS,
    METRIC_COLUMNS,
    PROTOCOLS,
    REFERENCES,
    at_protocol,
    at_split,
    eval_dir,
    load_metrics,
    scale_label,
    two_level_ci,
    two_level_means,
)
from slf_utils.evaluation import load_hits as read_hits
from slf_utils.folds import n_folds, roles_line
from slf_utils.preprocessing import read_image
from slf_utils.store import open_store

# (key, title, system with all inputs, system without the input, the paper's S in %)
INPUTS = (
    ("image_guide", "Image guide (8x8)", "full_input", "no_image_guide", 75.0),
    ("audio", "Audio", "full_input", "no_audio", 77.0),
    ("speaker_embeddings", "Speaker embeddings", "full_input", "no_speaker_embeddings", 98.0),
    ("attributes", "Gender, ethnicity, age", "full_input", "no_additional_attributes", 31.0),
)
BANDS = ((0.0, "negligible"), (20.0, "minor"), (40.0, "moderate"), (60.0, "considerable"), (80.0, "significant"))
TABLE_METRICS = (
    "recall@1",
    "recall@3",
    "recall@5",
    "recall@10",
    "guide_top1",
    "guide_rmse",
    "gender_acc",
    "ethnicity_acc",
    "age_group_acc",
    "age_rmse",
    "psnr",
    "ssim",
)
# Keys read with .get() so a params file without them still works.
REPORT_EXTRAS = DEFAULTS["report"]  # for a cfg built by hand; load_params merges the same defaults
FLOOR, CEILING, OPEN_CEILING = "bicubic", "identity_mean", "attribute_mean"


# ---------------------------------------------------------------------------------------------- significance
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
    several runs: each resample also draws each system's seeds, evaluation.two_level_means). Returns (ci_low,
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


# ---------------------------------------------------------------------------------------------- reading results
def system_runs(cfg, system) -> list[tuple[int, Path]]:
    """(seed, eval folder) of every run of a system: one per seed of grid.seeds (its system_overrides merged), or
    the one run at train.seed."""
    scfg = deep_merge(cfg, (cfg.get("system_overrides") or {}).get(system) or {})
    return [(x, eval_dir(deep_merge(scfg, seed_overrides(x)), system)) for x in seeds_of(scfg)]


def load_all(cfg) -> pd.DataFrame:
    """Every finished `<system>/eval/metrics.csv` of cfg['systems'], each seed's (system_runs), in one tidy table
    with a `seed` column (missing ones skipped)."""
    frames = [
        load_metrics(d / "metrics.csv").assign(seed=x)
        for name in cfg["systems"]
        for x, d in system_runs(cfg, name)
        if (d / "metrics.csv").exists()
    ]
    if not frames:
        return pd.DataFrame(columns=[*METRIC_COLUMNS, "seed"])
    return pd.concat(frames, ignore_index=True)


def load_hits(cfg, system) -> pd.DataFrame | None:
    """A system's hits.csv of every seed, with a `seed` column (None without any)."""
    frames = [
        read_hits(d / "hits.csv").assign(seed=x) for x, d in system_runs(cfg, system) if (d / "hits.csv").exists()
    ]
    return pd.concat(frames, ignore_index=True) if frames else None


def _by_clip_and_seed(hits: pd.DataFrame) -> pd.DataFrame:
    """Hits (one k) as clips x seeds, indexed by (clip_id, identity)."""
    return hits.pivot_table(index=["clip_id", "identity"], columns="seed", values="hit")


def combine_seeds(metrics: pd.DataFrame, hits: dict, n_boot=1000, seed=0) -> pd.DataFrame:
    """One row per (system, scale, protocol, split, metric), with `n_seeds`: a system of one seed as it is; of
    several, the mean over seeds, its recall@k with an interval that resamples identities and seeds
    (evaluation.two_level_ci over the per-clip hits), its other metrics with the seeds' mean bounds."""
    out, keys = [], ["scale", "protocol", "split", "metric"]
    for system, m in metrics.groupby("system", sort=False):
        if m["seed"].nunique() == 1:
            out.append(m.assign(n_seeds=1))
            continue
        g = m.groupby(keys, dropna=False, sort=False).agg(
            value=("value", "mean"), ci_low=("ci_low", "mean"), ci_high=("ci_high", "mean"), n=("n", "max")
        )
        g = g.reset_index()
        h = hits.get(system)
        for i, r in g[g["metric"].str.startswith("recall@")].iterrows() if h is not None else ():
            sel = h[
                _scale_is(h["scale"], r["scale"])
                & (h["protocol"] == r["protocol"])
                & (h["split"] == r["split"])
                & (h["k"] == int(r["metric"].split("@")[1]))
            ]
            wide = _by_clip_and_seed(sel)
            ci = two_level_ci(wide.to_numpy(), wide.index.get_level_values("identity"), n_boot, seed)
            g.loc[i, ["value", "ci_low", "ci_high"]] = ci[:3]
        out.append(g.assign(system=system, n_seeds=m["seed"].nunique()))
    return pd.concat(out, ignore_index=True)[[*METRIC_COLUMNS, "n_seeds"]]


SEED_COLUMNS = ["system", "title", "scale", "seeds", "per_seed", "mean", "sd", "ci_low", "ci_high", "id_low", "id_high"]


def seed_table(
    metrics: pd.DataFrame, hits: dict, best: dict, titles=None, n_boot=1000, seed=0, protocol=PROTOCOLS[0]
) -> pd.DataFrame:
    """Training noise, per system at its chosen scale (test clips, identity protocol, recall@1): each seed's value,
    their mean and standard deviation, the interval resampling identities and seeds (two-level) and the one
    resampling identities alone (of the seed mean: what a one-seed report would claim)."""
    rows = []
    view = metrics[(metrics["protocol"] == protocol) & (metrics["metric"] == "recall@1")]
    for system, scale in best.items():
        m = view[(view["system"] == system) & _scale_is(view["scale"], scale)].sort_values("seed")
        h = hits.get(system)
        if m.empty or h is None:
            continue
        sel = h[_scale_is(h["scale"], scale) & (h["protocol"] == protocol) & (h["k"] == 1)]
        wide = _by_clip_and_seed(sel)
        ids = wide.index.get_level_values("identity")
        _, lo, hi, _ = two_level_ci(wide.to_numpy(), ids, n_boot, seed)
        _, id_lo, id_hi, _ = two_level_ci(wide.to_numpy().mean(1, keepdims=True), ids, n_boot, seed)
        v = m["value"].to_numpy()
        rows.append(
            [system, (titles or {}).get(system, system), scale, len(v), ", ".join(f"{x:.3f}" for x in v), v.mean()]
            + [v.std(ddof=1) if len(v) > 1 else np.nan, lo, hi, id_lo, id_hi]
        )
    return pd.DataFrame(rows, columns=SEED_COLUMNS)


def pretty_seeds(t: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "system": t["title"],
            "scale": t["scale"].map(_fmt_scale),
            "seeds": t["seeds"],
            "recall@1 per seed": t["per_seed"],
            "mean": t["mean"].map(lambda v: f"{v:.3f}"),
            "sd across seeds": t["sd"].map(lambda v: "–" if pd.isna(v) else f"{v:.3f}"),
            "95 % CI (identities and seeds)": [f"[{a:.3f}, {b:.3f}]" for a, b in zip(t["ci_low"], t["ci_high"])],
            "95 % CI (identities only)": [f"[{a:.3f}, {b:.3f}]" for a, b in zip(t["id_low"], t["id_high"])],
        }
    )


def hits_at(hits: pd.DataFrame | None, scale, protocol) -> pd.DataFrame | None:
    """One (scale, protocol) of a system's hits."""
    return None if hits is None else hits[_scale_is(hits["scale"], scale) & (hits["protocol"] == protocol)]


def _systems(cfg) -> dict:
    from slf_utils import layout

    return layout.load_systems(cfg["systems_file"], layout.load_layout(cfg))


def system_titles(cfg) -> dict:
    try:
        return {k: v.title for k, v in _systems(cfg).items()}
    except Exception:  # noqa: BLE001  (titles are cosmetic: a report from metrics alone still works)
        return {}


def recall_at(metrics: pd.DataFrame, system, scale, ks=KS) -> dict | None:
    m = metrics[(metrics["system"] == system) & _scale_is(metrics["scale"], scale)]
    r = {k: m.loc[m["metric"] == f"recall@{k}", "value"] for k in ks}
    if any(v.empty for v in r.values()):
        return None
    return {k: float(v.iloc[0]) for k, v in r.items()}


def _scale_is(col: pd.Series, scale) -> pd.Series:
    if pd.isna(scale):
        return col.isna()
    return np.isclose(col.astype(float), float(scale))


def _at(metrics: pd.DataFrame, system, scale, metric) -> tuple:
    """(value, ci_low, ci_high) of one row of a protocol view, NaNs where there is none."""
    r = metrics[(metrics["system"] == system) & (metrics["metric"] == metric) & _scale_is(metrics["scale"], scale)]
    return tuple(float(r[c].iloc[0]) for c in ("value", "ci_low", "ci_high")) if len(r) else (np.nan,) * 3


def best_scales(metrics: pd.DataFrame, guide_min: dict | None = None) -> dict:
    """{system: scale} maximising recall@1 in a protocol view, ties broken by recall@3 then the smaller scale.
    `guide_min` {system: g}: for these (the super-resolution systems) only scales whose guide_top1 is at least g
    compete, while any does: a scale at which the outputs no longer reproduce their guide is not a super-resolution
    of that guide, however well it is recognised. Systems without a scale (the reference rows) map to NaN."""
    out = {}
    for system, m in metrics.groupby("system", sort=False):
        r = m[m["metric"].isin(["recall@1", "recall@3", "guide_top1"])].pivot_table(
            index="scale", columns="metric", values="value", dropna=False
        )
        if r.empty or "recall@1" not in r:
            out[system] = np.nan
            continue
        r = r.reset_index().assign(r3=r.get("recall@3", pd.Series(0, index=r.index)).to_numpy())
        g = (guide_min or {}).get(system)
        if exists(g) and "guide_top1" in r and (r["guide_top1"] >= g).any():
            r = r[r["guide_top1"] >= g]
        r = r.sort_values(["recall@1", "r3", "scale"], ascending=[False, False, True])
        out[system] = float(r["scale"].iloc[0])
    return out


# ---------------------------------------------------------------------------------------------- tables
def _cell(value, lo, hi, metric) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    digits = 1 if metric in ("psnr", "age_rmse") else 3
    s = f"{value:.{digits}f}"
    if exists(lo) and not np.isnan(lo):
        s += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return s


def _fmt_scale(s) -> str:
    return "–" if pd.isna(s) else f"{float(s):g}"


def metrics_table(metrics: pd.DataFrame, scales: dict, titles: dict | None = None) -> pd.DataFrame:
    """Wide table of one protocol view: one row per system at scales[system]; per metric `value`, `_lo`, `_hi`
    columns; plus the exact chance recall@1 of the gallery and the number of gallery clips the system could not
    sample (misses)."""
    titles = titles or {}
    rows = []
    for system, scale in scales.items():
        m = metrics[(metrics["system"] == system)]
        at = m[_scale_is(m["scale"], scale)].set_index("metric")
        row = {"system": system, "title": titles.get(system, system), "scale": scale}
        for name in TABLE_METRICS:
            if name in at.index:
                r = at.loc[name]
                row |= {name: r["value"], f"{name}_lo": r["ci_low"], f"{name}_hi": r["ci_high"]}
        constant = m[m["scale"].isna()].set_index("metric")["value"]
        row["chance@1"] = constant.get("chance@1")
        row["unsampled"] = constant.get("n_unsampled", 0)
        row["n"] = int(at["n"].max()) if len(at) else 0
        rows.append(row)
    return pd.DataFrame(rows)


def protocol_tables(metrics: pd.DataFrame, scales: dict, titles: dict | None = None) -> pd.DataFrame:
    """metrics_table of each protocol at scales[protocol], stacked with a `protocol` column (identity first)."""
    return pd.concat(
        [metrics_table(at_protocol(metrics, p), scales[p], titles).assign(protocol=p) for p in PROTOCOLS],
        ignore_index=True,
    )


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no tabulate dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join("" if v is None else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def pretty_table(table: pd.DataFrame) -> pd.DataFrame:
    """Value [CI] strings for Markdown and notebooks."""
    out = pd.DataFrame({"system": table["title"], "scale": table["scale"].map(_fmt_scale)})
    if "protocol" in table:
        out.insert(0, "protocol", table["protocol"])
    for name in TABLE_METRICS:
        if name in table:
            out[name] = [
                _cell(v, lo, hi, name) for v, lo, hi in zip(table[name], table[f"{name}_lo"], table[f"{name}_hi"])
            ]
    out["chance@1"] = table["chance@1"].map(lambda v: "–" if pd.isna(v) else f"{v:.3f}")
    if table["unsampled"].fillna(0).any():
        out["unsampled (misses)"] = table["unsampled"].map(lambda v: "–" if pd.isna(v) else f"{v:.0f}")
    out["n"] = table["n"]
    return out


def headline_table(
    metrics: pd.DataFrame,
    best: dict,
    titles: dict | None = None,
    modes: dict | None = None,
    optimistic: dict | None = None,
) -> pd.DataFrame:
    """The summary's first table, of one protocol view of the test clips (the report passes the identity
    protocol's): each system at its best scale (chosen on the validation clips), the reference rows with them;
    recall@1 with its interval, recall@3, guide_top1 (of systems that are given the guide: super-resolution and
    bicubic), recall@1 as a multiple of the exact chance of this protocol and gallery, as a share of identity_mean's
    (the closed-set ceiling), and, with `optimistic` ({system: the scale best on the test clips themselves}), that
    best-on-test recall@1, biased upwards by the selection."""
    name, ceiling = _ceiling(metrics)
    rows = []
    for system, scale in best.items():
        v, lo, hi = _at(metrics, system, scale, "recall@1")
        chance = _at(metrics, system, np.nan, "chance@1")[0]
        rows.append(
            {
                "system": system,
                "title": (titles or {}).get(system, system),
                "scale": scale,
                "recall@1": v,
                "recall@1_lo": lo,
                "recall@1_hi": hi,
                "recall@3": _at(metrics, system, scale, "recall@3")[0],
                "guide_top1": _at(metrics, system, scale, "guide_top1")[0]
                if modes is None or modes.get(system) == "super_resolution" or system == FLOOR
                else np.nan,
                "chance@1": chance,
                "x_chance": times_chance(v, chance),
                "of_ceiling": v / ceiling if ceiling > 0 else np.nan,
                "ceiling": name,
                "best_on_test_scale": (optimistic or {}).get(system, np.nan),
                "best_on_test@1": _at(metrics, system, (optimistic or {}).get(system, scale), "recall@1")[0]
                if exists(optimistic)
                else np.nan,
            }
        )
    return pd.DataFrame(rows)


def pretty_headline(table: pd.DataFrame) -> pd.DataFrame:
    def num(fmt):
        return lambda v: "–" if pd.isna(v) else fmt.format(v)

    return pd.DataFrame(
        {
            "system": table["title"],
            "scale": [
                ("reference" if sys_ in REFERENCES else "no scale") if pd.isna(s) else f"{s:g}"
                for sys_, s in zip(table["system"], table["scale"])
            ],
            "recall@1 [95 % CI]": [
                _cell(v, lo, hi, "recall@1")
                for v, lo, hi in zip(table["recall@1"], table["recall@1_lo"], table["recall@1_hi"])
            ],
            "recall@3": table["recall@3"].map(num("{:.3f}")),
            "guide_top1": table["guide_top1"].map(num("{:.2f}")),
            "chance@1": table["chance@1"].map(num("{:.3f}")),
            "× chance": table["x_chance"].map(num("{:.1f}")),
            f"vs {table['ceiling'].iloc[0] if len(table) else CEILING}": table["of_ceiling"].map(num("{:.0%}")),
            "best on test (optimistic)": [
                "–" if pd.isna(v) or pd.isna(s) else f"{v:.3f} (scale {s:g})"
                for v, s in zip(table["best_on_test@1"], table["best_on_test_scale"])
            ],
        }
    )


def system_modes(cfg) -> dict:
    return {k: v.mode for k, v in _systems(cfg).items()}


def system_notes(cfg) -> dict:
    """{system: note} of the systems whose systems.yaml entry has a `note` (a caveat the report must print)."""
    try:
        return {k: v.note for k, v in _systems(cfg).items() if v.note}
    except Exception:  # noqa: BLE001  (notes, like titles, need the systems file; a report from metrics alone works)
        return {}


NOTE_MARK = " †"


def times_chance(v: float, chance: float) -> float:
    """recall as a multiple of chance; NaN where chance is 0: under the identity protocol a test set of one clip per
    speaker (the paper's 118-clip list) has no other image of the speaker to find, so nothing can hit there."""
    return v / chance if chance > 0 else np.nan


def note_lines(notes: dict, titles: dict, systems) -> list[str]:
    """Footnotes ('† Title: note') of the systems in `systems` that have a note."""
    return [f"† {titles.get(s, s)}: {' '.join(notes[s].split())}" for s in dict.fromkeys(systems) if s in notes]


def _ceiling(metrics) -> tuple[str, float]:
    """(name, recall@1) of the ceiling rows are shown against: identity_mean, or where it cannot exist (unseen
    speakers: no training face of the query's identity) attribute_mean, what knowing the attributes gives."""
    v = _at(metrics, CEILING, np.nan, "recall@1")[0]
    return (CEILING, v) if not np.isnan(v) else (OPEN_CEILING, _at(metrics, OPEN_CEILING, np.nan, "recall@1")[0])


def learning_checks(
    metrics: pd.DataFrame, best: dict, modes: dict, titles: dict | None = None, guide_min: float = 0.9
) -> pd.DataFrame:
    """Does each system learn? Judged in one protocol view (the report passes the choosing clips' identity protocol
    wherever they can hit under it, lead_protocol): recall@1 at its best scale against chance (ratio, CI lower end
    above chance) and at scale 0, where the feature rows are ignored (a generation system must be at chance there:
    the exact binomial interval of its hits contains it). A super-resolution system must also
    clear the bicubic floor (recall@1 at least bicubic's) and keep its guide (guide_top1 at least `guide_min`);
    identity_mean's recall@1 is the ceiling every system is shown against. `passes`: every check that applies holds.
    A system of several seeds (`n_seeds`, combine_seeds) is judged on its seed mean. Reference rows are not judged."""
    floor = _at(metrics, FLOOR, np.nan, "recall@1")[0]
    name, ceiling = _ceiling(metrics)
    rows = []
    for system, scale in best.items():
        if system in REFERENCES or modes.get(system) in ("reference", "none"):
            continue
        chance = _at(metrics, system, np.nan, "chance@1")[0]
        if pd.isna(scale) and np.isnan(_at(metrics, system, scale, "recall@1")[0]):
            continue  # nothing scored
        sr = modes.get(system) == "super_resolution"
        v, lo, hi = _at(metrics, system, scale, "recall@1")
        v0, lo0, hi0 = _at(metrics, system, 0.0, "recall@1")
        at0 = metrics[
            (metrics["system"] == system) & (metrics["metric"] == "recall@1") & _scale_is(metrics["scale"], 0.0)
        ]
        # at chance: chance inside the exact (Clopper-Pearson) interval of the hit count; a percentile bootstrap of
        # 0 hits is [0, 0] and would call 0 of 40 queries "below" a chance of 0.017 (expected 0.7 hits). Several
        # seeds: the hits of every seed on every clip (v0 is their mean), each an independent query at chance
        trials = int(at0["n"].iloc[0]) * int(at0.get("n_seeds", pd.Series([1])).fillna(1).iloc[0]) if len(at0) else 0
        blo, bhi = _binomial_interval(round(v0 * trials), trials) if trials else (lo0, hi0)
        guide = _at(metrics, system, scale, "guide_top1")[0]
        rows.append(
            {
                "system": system,
                "title": (titles or {}).get(system, system),
                "mode": modes.get(system, ""),
                "chance@1": chance,
                "best_scale": scale,
                "recall@1": v,
                "recall@1_lo": lo,
                "recall@1_hi": hi,
                "x_chance": times_chance(v, chance),
                "ci_above_chance": bool(lo > chance),
                "scale0_recall@1": v0,
                "scale0_lo": lo0,
                "scale0_hi": hi0,
                # only a generation system should be at chance there; super-resolution keeps what the guide gives
                "scale0_at_chance": bool(blo <= chance <= bhi)
                if modes.get(system) == "generation" and not np.isnan(v0)
                else None,
                "floor@1": floor,
                "above_floor": bool(v >= floor) if sr and not np.isnan(floor) else None,
                "guide_top1": guide,
                "guide_kept": bool(guide >= guide_min) if sr and not np.isnan(guide) else None,
                "ceiling@1": ceiling,
                "of_ceiling": v / ceiling if ceiling > 0 else np.nan,
                "ceiling": name,
            }
        )
        judged = [rows[-1][c] for c in ("ci_above_chance", "scale0_at_chance", "above_floor", "guide_kept")]
        rows[-1]["passes"] = all(c for c in judged if c is not None)
    return pd.DataFrame(rows)


def lead_protocol(metrics: pd.DataFrame) -> str:
    """The protocol a view of one split is read under: `identity`, unless no query of it can hit under it (one
    gallery clip per speaker, as the paper's 118-clip test list: chance 0), then `paper`. The report reads the
    headline, seeds and sample grids under the test clips' and the learning checks under the choosing clips'
    (VoxCeleb2's validation speakers have 3 clips each: identity, while the test list leads with paper)."""
    chance = metrics[(metrics["metric"] == "chance@1") & (metrics["protocol"] == PROTOCOLS[0])]["value"]
    return PROTOCOLS[0] if chance.empty or chance.max() > 0 else PROTOCOLS[1]


def _binomial_interval(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Clopper-Pearson interval of k successes in n trials."""
    from scipy.stats import beta

    lo = beta.ppf(alpha / 2, k, n - k + 1) if k > 0 else 0.0
    hi = beta.ppf(1 - alpha / 2, k + 1, n - k) if k < n else 1.0
    return float(lo), float(hi)


def pretty_checks(checks: pd.DataFrame, guide_min: float = 0.9) -> pd.DataFrame:
    def yes(b):
        return "–" if b is None or (isinstance(b, float) and np.isnan(b)) else ("yes" if b else "**no**")

    return pd.DataFrame(
        {
            "system": checks["title"],
            "mode": checks["mode"],
            "best scale": checks["best_scale"].map(lambda s: "no scale" if pd.isna(s) else f"{s:g}"),
            "recall@1 [95 % CI]": [
                _cell(v, lo, hi, "recall@1")
                for v, lo, hi in zip(checks["recall@1"], checks["recall@1_lo"], checks["recall@1_hi"])
            ],
            "× chance": checks["x_chance"].map(lambda x: "–" if pd.isna(x) else f"{x:.1f}"),
            "CI above chance": checks["ci_above_chance"].map(yes),
            "scale 0 recall@1": [
                _cell(v, lo, hi, "recall@1")
                for v, lo, hi in zip(checks["scale0_recall@1"], checks["scale0_lo"], checks["scale0_hi"])
            ],
            "scale 0 at chance": checks["scale0_at_chance"].map(yes),
            "≥ bicubic": checks["above_floor"].map(yes),
            f"guide_top1 ≥ {guide_min:g}": [
                "–" if pd.isna(g) else f"{g:.2f} {yes(ok)}" for g, ok in zip(checks["guide_top1"], checks["guide_kept"])
            ],
            f"vs {checks['ceiling'].iloc[0] if len(checks) else CEILING}": checks["of_ceiling"].map(
                lambda x: "–" if pd.isna(x) else f"{x:.0%}"
            ),
            "passes": checks["passes"].map(yes),
        }
    )


# ---------------------------------------------------------------------------------------------- differences
DIFF_COLUMNS = [
    "scales",
    "protocol",
    "a",
    "b",
    "title_a",
    "title_b",
    "scale_a",
    "scale_b",
    "k",
    "difference",
    "ci_low",
    "ci_high",
    "n_clips",
    "n_identities",
    "seeds_a",
    "seeds_b",
    "seed_pairs",
    "per_seed",
]


def difference_pairs(pairs, modes: dict, found) -> list[tuple]:
    """`pairs` (report.differences: [a, b] or [a, b, factor]) plus every super-resolution system minus bicubic
    (factor `method`), without the pairs whose systems were not both evaluated. Returns (a, b, factor or None)."""
    pairs = [(p[0], p[1], p[2] if len(p) > 2 else None) for p in pairs]
    pairs += [(s, FLOOR, "method") for s in found if modes.get(s) == "super_resolution"]
    seen, out = set(), []
    for a, b, f in pairs:
        if a in found and b in found and a != b and (a, b) not in seen:
            seen.add((a, b))
            out.append((a, b, f))
    return out


def recipe_differences(cfg, pairs) -> pd.DataFrame:
    """Every way the two systems of each pair differ (diffusion.Recipe.flat), with the factor the pair names and whether
    the pair differs in more than it (`one_factor` False: a flag). Columns a, b, factor, key, value_a, value_b,
    within_factor, one_factor."""
    from slf_utils import diffusion

    cols = ["a", "b", "factor", "key", "value_a", "value_b", "within_factor", "one_factor"]
    recipes, rows = {}, []
    for a, b, factor in pairs:
        for s in (a, b):
            if s not in recipes:
                recipes[s] = diffusion.resolve_recipe(cfg, s).flat()
        ra, rb = recipes[a], recipes[b]
        allowed = FACTORS.get(factor, ())
        diff = [k for k in dict.fromkeys([*ra, *rb]) if str(ra.get(k)) != str(rb.get(k))]
        within = {k: any(k.startswith(p) for p in allowed) for k in diff}
        one = bool(factor in FACTORS and all(within.values()))
        rows += [[a, b, factor, k, ra.get(k), rb.get(k), within[k], one] for k in diff]
        if not diff:
            rows.append([a, b, factor, "(none)", None, None, True, factor in FACTORS])
    return pd.DataFrame(rows, columns=cols)


def pretty_recipe_differences(rd: pd.DataFrame, titles: dict | None = None) -> str:
    """Markdown: per pair, its factor, a flag when it differs in more, and every differing key."""
    titles = titles or {}
    lines = []
    for (a, b), g in rd.groupby(["a", "b"], sort=False):
        factor, one = g["factor"].iloc[0], bool(g["one_factor"].iloc[0])
        head = f"**{titles.get(a, a)} − {titles.get(b, b)}** (factor: `{factor}`)"
        if factor is None or pd.isna(factor):
            head += " — **no factor named** (report.differences: [a, b, factor])"
        elif factor == "method":
            head += " — whole pipelines, not a one-factor ablation"
        elif not one:
            outside = ", ".join(f"`{k}`" for k in g.loc[~g["within_factor"], "key"])
            head += f" — **FLAG: differs in more than {factor}**: {outside}"
        else:
            head += " — one factor"
        lines += [head, ""]
        shown = g[g["key"] != "(none)"]
        if shown.empty:
            lines += ["* identical recipes", ""]
            continue
        done = set()
        for r in shown.itertuples():
            enc = ".".join(r.key.split(".")[:2]) if r.key.startswith("encoder.") else None
            part = shown[shown["key"].str.startswith(f"{enc}.")] if enc else None
            one_sided = enc and (part["value_a"].isna().all() or part["value_b"].isna().all())
            if one_sided and enc not in done:  # an encoder only one system reads: one line, not each setting
                done.add(enc)
                side = "b" if part["value_a"].isna().all() else "a"
                lines.append(
                    f"* `{enc}` (the encoder that writes {enc.split('.')[1]}): read by {side} only, "
                    f"{len(part)} settings"
                )
            elif not one_sided:
                lines.append(f"* `{r.key}`: {r.value_a!r} vs {r.value_b!r}")
        lines.append("")
    return "\n".join(lines)


def seed_pairs(wa: pd.DataFrame, wb: pd.DataFrame) -> list[tuple]:
    """The runs of a and b (hits as clips x seeds) whose differences are averaged: seed by seed over the seeds both
    have where both have several; otherwise every run of a against every run of b (a one-run reference, or a system
    with one seed, against each seed of the other: independent runs, so each pairing is fair)."""
    shared = [x for x in wa.columns if x in wb.columns]
    if wa.shape[1] > 1 and wb.shape[1] > 1 and shared:
        return [(x, x) for x in shared]
    return [(x, y) for x in wa.columns for y in wb.columns]


def differences_table(
    pairs, scales: dict, hits: dict, titles: dict | None = None, ks=(1, 3), n_boot=1000, seed=0
) -> pd.DataFrame:
    """recall@k of a minus b on the gallery clips both scored, for each pair (a, b) at scales[(label, protocol)] =
    {system: scale}; hits = {system: hits.csv frame, with a `seed` column}. The difference is the mean over the
    pairs of runs (seed_pairs: the seed mean), its interval resamples identities and those pairs
    (evaluation.two_level_ci, as a system's own recall over seeds); `per_seed`: each pair's difference."""
    titles = titles or {}
    rows = []
    for (by, protocol), scale_of in scales.items():
        for a, b, *_ in pairs:
            ha, hb = hits_at(hits.get(a), scale_of[a], protocol), hits_at(hits.get(b), scale_of[b], protocol)
            if ha is None or hb is None:
                continue
            for k in ks:
                wa, wb = _by_clip_and_seed(ha[ha["k"] == k]), _by_clip_and_seed(hb[hb["k"] == k])
                common = wa.index.intersection(wb.index)
                if common.empty:
                    continue
                runs = seed_pairs(wa, wb)
                d_clip = np.stack([wa.loc[common, x].to_numpy() - wb.loc[common, y].to_numpy() for x, y in runs], 1)
                known = ~np.isnan(d_clip).any(1)  # two_level_ci's clips: scored in every run
                ids = common.get_level_values("identity")
                d, lo, hi, n = two_level_ci(d_clip, ids, n_boot, seed)
                per_seed = ", ".join(f"{v:+.3f}" for v in d_clip[known].mean(0)) if known.any() else ""
                head = (by, protocol, a, b, titles.get(a, a), titles.get(b, b), scale_of[a], scale_of[b], k)
                tail = (d, lo, hi, n, ids[known].nunique(), wa.shape[1], wb.shape[1], len(runs), per_seed)
                rows.append(dict(zip(DIFF_COLUMNS, head + tail)))
    return pd.DataFrame(rows, columns=DIFF_COLUMNS)


def pretty_differences(diff: pd.DataFrame) -> pd.DataFrame:
    """One row per (scales, protocol, pair): Δrecall@k [95 % CI] columns (the seed mean; intervals over identities
    and seeds), and how many seeds each side has."""
    rows = []
    for (by, protocol, _, _), g in diff.groupby(["scales", "protocol", "a", "b"], sort=False):
        first = g.iloc[0]
        one = first.get("one_factor")
        flag = " ⚑" if one is not None and not pd.isna(one) and not bool(one) else ""
        row = {
            "scales": by,
            "protocol": protocol,
            "a − b": f"{first['title_a']} − {first['title_b']}{flag}",
            "factor": first.get("factor") or "–",
            "at scales": f"{_fmt_scale(first['scale_a'])} vs {_fmt_scale(first['scale_b'])}",
            "seeds (a, b)": f"{first['seeds_a']}, {first['seeds_b']}",
        }
        for r in g.itertuples():
            row[f"Δrecall@{r.k} [95 % CI]"] = f"{r.difference:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]"
        rows.append(row)
    return pd.DataFrame(rows)


def pretty_seed_differences(diff: pd.DataFrame, protocol: str, k: int = 1) -> pd.DataFrame:
    """seeds.md's differences: each pair at its best scales, one protocol, recall@k: the seed mean with its interval
    over identities and seeds, and beside it each pair of runs' difference."""
    d = diff[(diff["scales"] == "best") & (diff["protocol"] == protocol) & (diff["k"] == k)]
    return pd.DataFrame(
        {
            "a − b": d["title_a"] + " − " + d["title_b"],
            "at scales": [f"{_fmt_scale(x)} vs {_fmt_scale(y)}" for x, y in zip(d["scale_a"], d["scale_b"])],
            "seeds (a, b)": [f"{x}, {y}" for x, y in zip(d["seeds_a"], d["seeds_b"])],
            f"Δrecall@{k}, seed mean [95 % CI, identities and seeds]": [
                f"{v:+.3f} [{lo:+.3f}, {hi:+.3f}]" for v, lo, hi in zip(d["difference"], d["ci_low"], d["ci_high"])
            ],
            "each pair of runs": d["per_seed"],
        }
    )


# ---------------------------------------------------------------------------------------------- significance table
def significance_table(
    cfg, metrics: pd.DataFrame, weights: dict, scales_by: str, scale_of: dict, protocol="paper", hits=None
) -> pd.DataFrame:
    """S of every input whose two systems were both evaluated, in the `protocol` view of the metrics, at
    scale_of[system] for each system (`scales_by` says how these scales were chosen). Bootstrap CIs (over
    identities) when the hits of both systems exist (`hits`: {system: hits frame}, default read from disk)."""
    rep = {**REPORT_EXTRAS, **cfg["report"]}
    metrics = at_protocol(metrics, protocol)
    ks = list(weights)
    rows = []
    for key, title, with_sys, without_sys, paper in INPUTS:
        if with_sys not in scale_of or without_sys not in scale_of:
            continue
        sa, sb = scale_of[with_sys], scale_of[without_sys]
        ra, rb = recall_at(metrics, with_sys, sa, ks), recall_at(metrics, without_sys, sb, ks)
        if ra is None or rb is None:
            continue
        s = significance(ra, rb, weights)
        lo = hi = float("nan")
        hits_of = (lambda s: hits.get(s)) if exists(hits) else (lambda s: load_hits(cfg, s))
        ha, hb = hits_at(hits_of(with_sys), sa, protocol), hits_at(hits_of(without_sys), sb, protocol)
        if exists(ha) and exists(hb):
            lo, hi = bootstrap_significance(ha, hb, weights, rep["bootstrap"], rep["seed"])
        row = {
            "protocol": protocol,
            "key": key,
            "input": title,
            "with": with_sys,
            "without": without_sys,
            "scales": scales_by,
            "scale_with": sa,
            "scale_without": sb,
        }
        for k in ks:
            row[f"R_all@{k}"], row[f"R_without@{k}"] = ra[k], rb[k]
            row[f"R_inc@{k}"] = recall_increase(ra[k], rb[k])
        row |= {
            "S": s,
            "S_ci_low": lo,
            "S_ci_high": hi,
            "S_text": fmt_s(s),
            "band": band(s),
            "paper_S": paper,
            "paper_band": band(paper),
            "weights": describe_weights(weights),
        }
        rows.append(row)
    return pd.DataFrame(rows)


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


# ---------------------------------------------------------------------------------------------- figures
def save_figure(fig, out_dir: Path, stem: str) -> list[Path]:
    """PNG and PDF, each written atomically."""
    paths = []
    for ext in ("png", "pdf"):
        p = Path(out_dir) / f"{stem}.{ext}"
        atomic_write(p, lambda tmp, ext=ext: fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight"))
        paths.append(p)
    return paths


def plot_recall_vs_scale(
    metrics: pd.DataFrame, titles: dict | None = None, ks=(1, 3), protocols=PROTOCOLS, references=REFERENCES
):
    """Fig. 8, one row of panels per protocol (identity first), one column per k: recall@k vs conditional scale for
    every system with its 95 % band, the reference rows (no scale) as dotted horizontal lines with their bands
    across the sweep, other systems without a scale (direct decoders) as dash-dotted ones, exact chance k/N
    dashed."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure

    titles = titles or {}
    fig = Figure(figsize=(5.2 * len(ks) + 2.6, 3.6 * len(protocols)), layout="constrained")
    axes = fig.subplots(len(protocols), len(ks), squeeze=False, sharex=True)
    scaled = metrics[metrics["scale"].notna()]
    xs = np.sort(scaled["scale"].astype(float).unique()) if len(scaled) else np.array([0.0, 8.0])
    xlim = (xs.min(), xs.max()) if len(xs) > 1 else (xs[0] - 0.5, xs[0] + 0.5)
    names = list(dict.fromkeys(metrics["system"]))
    # one colour per system, the same in every panel; past ten systems the default cycle would repeat, so tab20
    palette = [f"C{i}" for i in range(10)] if len(names) <= 10 else [to_hex(c) for c in colormaps["tab20"].colors]
    colour = {s: palette[i % len(palette)] for i, s in enumerate(names)}
    for row, protocol in zip(axes, protocols):
        view = at_protocol(metrics, protocol)
        for ax, k in zip(row, ks):
            name = f"recall@{k}"
            for system, m in view.groupby("system", sort=False):
                r = m[m["metric"] == name].sort_values("scale")
                if r.empty:
                    continue
                label, c = titles.get(system, system), colour[system]
                if r["scale"].isna().all():  # a reference row or a direct decoder: the same at every scale
                    v, lo, hi = r[["value", "ci_low", "ci_high"]].iloc[0]
                    ref = system in references
                    style, tag = (":", "reference") if ref else ("-.", "no scale")
                    ax.hlines(v, *xlim, colors=c, linestyles=style, lw=1.6, label=f"{label} ({tag})")
                    if not np.isnan(lo):
                        ax.fill_between(xlim, lo, hi, color=c, alpha=0.1)
                    continue
                ax.plot(r["scale"], r["value"], marker="o", color=c, label=label)
                ax.fill_between(r["scale"].astype(float), r["ci_low"], r["ci_high"], color=c, alpha=0.15)
            chance = view[view["metric"] == f"chance@{k}"]["value"].dropna().unique()
            n = view.loc[view["metric"] == f"chance@{k}", "n"].max()
            for c in chance[:1]:
                ax.axhline(c, color="k", ls="--", lw=1, label="chance k/N (exact)")
                ax.annotate(
                    f"chance {c:.3f}", (xlim[1], c), xytext=(-2, 3), textcoords="offset points", ha="right", fontsize=7
                )
            if len(chance) > 1:
                ax.text(0.01, 0.01, "systems differ in N: chance line of the first", transform=ax.transAxes, fontsize=7)
            if protocol == protocols[-1]:
                ax.set_xlabel("conditional scale")
            ax.set_ylabel(name)
            # zoom to the data: recall on a small CPU demo is far below 1
            top = pd.concat([view.loc[view["metric"] == name, c] for c in ("value", "ci_high")]).max()
            ax.set_ylim(0, min(1.02, 1.15 * top + 0.02) if pd.notna(top) else 1.02)
            ax.set_xticks(xs)
            panel = "abcdefgh"[list(protocols).index(protocol) * len(ks) + list(ks).index(k)]
            n_text = f", n = {int(n)} test clips" if len(chance) else ""
            ax.set_title(f"({panel}) {protocol} protocol, recall@{k}{n_text}", fontsize=9)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.ravel()[1:]:  # systems missing from the first panel still get an entry
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, fontsize=8, loc="outside right upper")
    return fig


def mosaic(rows: list[list], cell: int = 64, gap: int = 3) -> np.ndarray:
    """One RGB canvas of equally sized cells (nearest-neighbour, so an 8x8 guide stays 8x8 blocks); missing
    images are left light grey."""
    from PIL import Image

    nr, nc = len(rows), max(len(r) for r in rows)
    canvas = np.full((nr * (cell + gap) - gap, nc * (cell + gap) - gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = i * (cell + gap), j * (cell + gap)
            if exists(img):
                im = Image.fromarray(np.asarray(img, np.uint8)).resize((cell, cell), Image.Resampling.NEAREST)
                canvas[y : y + cell, x : x + cell] = np.asarray(im.convert("RGB"))
            else:
                canvas[y : y + cell, x : x + cell] = 235
    return canvas


def _grid_figure(rows: list[list], col_titles: list[str], row_titles: list[str], title: str, cell: int = 64):
    """A sample grid as one image (one Axes: fast to lay out and small as PDF), titled columns and rows."""
    from matplotlib.figure import Figure

    gap = 3
    canvas = mosaic(rows, cell, gap)
    nr, nc = len(rows), len(col_titles)
    fig = Figure(figsize=(1.15 * nc + 1.6, 1.15 * nr + 0.9))
    ax = fig.add_axes([0.14, 0.02, 0.84, 0.84])
    ax.imshow(canvas, interpolation="nearest")
    # long system names wrap instead of running into the next column's
    col_titles = [textwrap.fill(t, 14, break_long_words=False) for t in col_titles]
    ax.set_xticks([j * (cell + gap) + cell / 2 for j in range(nc)], col_titles, fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks([i * (cell + gap) + cell / 2 for i in range(nr)], row_titles, fontsize=6)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.suptitle(title, fontsize=10)
    return fig


def _samples(cfg, system) -> pd.DataFrame | None:
    p = eval_dir(cfg, system) / "samples.csv"
    return pd.read_csv(p, dtype={"clip_id": str, "identity": str}) if p.exists() else None


def example_clips(samples_by_system: dict, n: int) -> list:
    """Test clips every plotted system generated, one per identity first, in a stable order."""
    common = None
    ident = {}
    for s in samples_by_system.values():
        ids = set(s["clip_id"])
        common = ids if common is None else common & ids
        ident |= dict(zip(s["clip_id"], s["identity"]))
    picked, seen = [], set()
    for cid in sorted(common or []):
        if ident[cid] not in seen:
            picked.append(cid)
            seen.add(ident[cid])
    return picked[:n]


def _real_and_guides(cfg, clip_ids):
    try:
        from slf_utils.store import open_store

        arrays = open_store(cfg).load_stacked("preprocess", clip_ids)
        return list(arrays["face"]), list(arrays["guide"])
    except Exception:  # noqa: BLE001  (no store beside the results: grids show generated faces only)
        return [None] * len(clip_ids), [None] * len(clip_ids)


def _image_at(cfg, system, samples, clip_id, scale):
    r = samples[(samples["clip_id"] == clip_id) & _scale_is(samples["scale"], scale)]
    return read_image(eval_dir(cfg, system) / r["image"].iloc[0]) if len(r) else None


def plot_sample_grid(cfg, best: dict, titles: dict | None = None, n: int = 6):
    """Fig. 6: real | 8x8 guide | the image reference rows (bicubic, identity mean) | each system at its best scale,
    one row per test clip. None without samples."""
    titles = titles or {}
    # real_face is the grid's `real` column already
    order = [s for s in REFERENCES if s in best and s != "real_face"] + [s for s in best if s not in REFERENCES]
    samples = {s: _samples(cfg, s) for s in order}
    samples = {s: d for s, d in samples.items() if exists(d) and len(d)}
    if not samples:
        return None
    clips = example_clips(samples, n)
    real, guides = _real_and_guides(cfg, clips)
    rows = [
        [r, g] + [_image_at(cfg, s, samples[s], c, best[s]) for s in samples] for c, r, g in zip(clips, real, guides)
    ]
    cols = ["real", "8x8 guide"] + [
        f"{titles.get(s, s)}\n({scale_label(best[s], 'reference' if s in REFERENCES else 'no scale')})" for s in samples
    ]
    return _grid_figure(rows, cols, clips, "Faces of each system at its best conditional scale, and the references")


def plot_scale_grid(cfg, system, titles: dict | None = None, n: int = 6):
    """Fig. 7: one system across its conditional scales. None without samples."""
    titles = titles or {}
    samples = _samples(cfg, system)
    if not exists(samples) or samples.empty:
        return None
    scales = sorted(samples["scale"].astype(float).unique())
    clips = example_clips({system: samples}, n)
    real, guides = _real_and_guides(cfg, clips)
    rows = [[r, g] + [_image_at(cfg, system, samples, c, s) for s in scales] for c, r, g in zip(clips, real, guides)]
    cols = ["real", "8x8 guide"] + [scale_label(s) for s in scales]
    return _grid_figure(rows, cols, clips, f"{titles.get(system, system)} across conditional scales")


# ---------------------------------------------------------------------------------------------- run (notebook 05)
def report_dir(cfg) -> Path:
    return Path(cfg["results"]) / "report"


def _write_table(out: Path, stem: str, table: pd.DataFrame, pretty: pd.DataFrame) -> dict:
    atomic_write_text(out / f"{stem}.csv", table.to_csv(index=False))
    atomic_write_text(out / f"{stem}.md", markdown_table(pretty))
    return {"csv": out / f"{stem}.csv", "md": out / f"{stem}.md"}


def run(cfg, log=print) -> dict:
    """Notebook 05: write `<results>/report/` from every evaluated system of cfg['systems']. Returns
    {'metrics', 'best' (the identity protocol's best scales), 'best_by_protocol', 'headline', 'checks',
    'differences', 'tables': {name: (table, pretty)}, 'significance': {...}, 'figures': {name: [paths]},
    'summary': path}."""
    rep = {**REPORT_EXTRAS, **cfg["report"]}
    out = report_dir(cfg)
    per_seed = load_all(cfg)
    hits = {s: load_hits(cfg, s) for s in dict.fromkeys(per_seed["system"])}
    # a system of several seeds enters every table as the mean over seeds, with intervals over identities and seeds
    everything = combine_seeds(per_seed, hits, rep["bootstrap"], rep["seed"]) if len(per_seed) else per_seed
    # every choice (best scales, learning checks) is made on the validation clips, every number reported is of the
    # test clips; a grid without validation clips chooses on the test clips and says so
    metrics, val = at_split(everything, "test"), at_split(everything, "val")
    chosen_on = "val" if len(val) else "test"
    choose = val if len(val) else metrics
    titles = system_titles(cfg)
    result = {
        "metrics": metrics,
        "validation": val,
        "chosen_on": chosen_on,
        "tables": {},
        "significance": {},
        "figures": {},
    }
    found = list(dict.fromkeys(metrics["system"]))
    missing = [s for s in cfg["systems"] if s not in found]
    if missing:
        log(f"report: no metrics yet for {', '.join(missing)}")
    if metrics.empty:
        atomic_write_text(out / "summary.md", "# Report\n\nNo evaluated system yet.\n")
        result["summary"] = out / "summary.md"
        return result

    ks = sorted({int(m.split("@")[1]) for m in metrics["metric"] if m.startswith("recall@")})
    weights = k_weights(rep["k_weights"], ks)
    modes = system_modes(cfg)
    hits = {s: None if (h := hits.get(s)) is None else at_split(h, "test") for s in found}
    lead = result["lead_protocol"] = lead_protocol(metrics)
    main = at_protocol(metrics, lead)
    keep_guide = {s: float(rep["guide_top1_min"]) for s, m in modes.items() if m == "super_resolution"}
    # a system evaluated before validation clips existed (no val rows) falls back to its test rows, and is named
    best_by = {
        p: {**best_scales(at_protocol(metrics, p), keep_guide), **best_scales(at_protocol(choose, p), keep_guide)}
        for p in PROTOCOLS
    }
    result["chosen_on_test"] = sorted(set(found) - set(choose["system"])) if chosen_on == "val" else []
    best = best_by[lead]
    on_test = best_scales(main, keep_guide) if chosen_on == "val" else None  # optimistic: chosen on what it reports
    chosen = float(rep["chosen_scale"])
    chosen_of = {s: (chosen if not pd.isna(best[s]) else np.nan) for s in found}
    result["seeds"] = seed_table(at_split(per_seed, "test"), hits, best, titles, rep["bootstrap"], rep["seed"], lead)
    chosen_by = dict.fromkeys(PROTOCOLS, chosen_of)
    result |= {"best": best, "best_by_protocol": best_by}

    fig = plot_recall_vs_scale(metrics, titles, ks=[k for k in (1, 3) if k in ks])
    result["figures"]["recall_vs_scale"] = save_figure(fig, out, "recall_vs_scale")

    notes = {s: n for s, n in system_notes(cfg).items() if s in found}
    marked = {s: t + NOTE_MARK if s in notes else t for s, t in {**{s: s for s in found}, **titles}.items()}
    result["headline"] = headline_table(main, best, marked, modes, on_test)
    result["notes"] = note_lines(notes, titles, found)
    _write_table(out, "headline", result["headline"], pretty_headline(result["headline"]))
    if result["notes"]:  # under the table, where it is read (make demo and the grid runner print headline.md)
        text = markdown_table(pretty_headline(result["headline"])) + "\n" + "\n\n".join(result["notes"]) + "\n"
        atomic_write_text(out / "headline.md", text)
    # the checks read the identity protocol wherever the choosing clips can hit under it, though the test clips may
    # not (VoxCeleb2's one clip per test speaker, 3 per validation speaker): under the paper protocol a system that
    # keeps its guide finds the query's own image and would pass without knowing anyone
    check = result["check_protocol"] = lead_protocol(choose)
    checks = learning_checks(at_protocol(choose, check), best_by[check], modes, titles, float(rep["guide_top1_min"]))
    result["checks"] = checks
    if not checks.empty:
        _write_table(out, "learning_checks", checks, pretty_checks(checks, float(rep["guide_top1_min"])))

    for stem, scales in (("table_best_scale", best_by), (f"table_scale_{chosen:g}", chosen_by)):
        table = protocol_tables(metrics, scales, titles)
        pretty = pretty_table(table)
        result["tables"][stem] = (table, pretty)
        _write_table(out, stem, table, pretty)

    pairs = difference_pairs(rep["differences"], modes, found)
    scales = {("best", p): best_by[p] for p in PROTOCOLS} | {(f"chosen {chosen:g}", p): chosen_of for p in PROTOCOLS}
    diff = differences_table(pairs, scales, hits, titles, [k for k in (1, 3) if k in ks], rep["bootstrap"], rep["seed"])
    factor_of = {(a, b): f for a, b, f in pairs}
    diff["factor"] = [factor_of.get((a, b)) for a, b in zip(diff["a"], diff["b"])]
    recipes = recipe_differences(cfg, pairs)
    one = recipes.groupby(["a", "b"])["one_factor"].first().to_dict() if len(recipes) else {}
    diff["one_factor"] = [one.get((a, b)) for a, b in zip(diff["a"], diff["b"])]
    result["differences"], result["recipe_differences"] = diff, recipes
    _write_table(out, "differences", diff, pretty_differences(diff))
    atomic_write_text(out / "recipe_differences.csv", recipes.to_csv(index=False))
    text = markdown_table(pretty_differences(diff)) if len(diff) else "No pair has both systems evaluated.\n"
    text += "\n## How the two systems of each pair differ\n\n" + pretty_recipe_differences(recipes, titles)
    atomic_write_text(out / "differences.md", text)
    if len(result["seeds"]):
        _write_table(out, "seeds", result["seeds"], pretty_seeds(result["seeds"]))
        if result["seeds"]["seeds"].max() > 1:  # with the differences over seeds, each pair of runs' beside
            atomic_write_text(out / "seeds.md", "\n".join(_seed_lines(result)) + "\n")

    for stem, by, scales in (
        ("significance_best_scale", "best", best_by),
        (f"significance_scale_{chosen:g}", f"chosen {chosen:g}", chosen_by),
    ):
        sig = pd.concat(
            [significance_table(cfg, metrics, weights, by, scales[p], p, hits) for p in PROTOCOLS], ignore_index=True
        )
        result["significance"][stem] = sig
        if not sig.empty:
            _write_table(out, stem, sig, pretty_significance(sig))

    n = int(rep["n_examples"])
    grid = plot_sample_grid(cfg, best, titles, n)
    if exists(grid):
        result["figures"]["samples_systems"] = save_figure(grid, out, "samples_systems")
    scaled = [s for s in found if not pd.isna(best[s])]
    across = default(rep["scales_system"], "full_input" if "full_input" in scaled else (scaled or [None])[0])
    grid = plot_scale_grid(cfg, across, titles, n) if exists(across) else None
    if exists(grid):
        result["figures"]["samples_scales"] = save_figure(grid, out, "samples_scales")

    result["summary"] = write_summary(out, cfg, metrics, result, weights, missing, chosen)
    log(f"report: {len(found)} system(s) -> {out}")
    return result


def _seed_lines(result) -> list[str]:
    seeds = result.get("seeds")
    if seeds is None or seeds.empty or seeds["seeds"].max() < 2:
        return [
            "One training run per system (one seed): every interval covers the test identities only, not the noise "
            "of training (set `grid.seeds: [0, 1, 2]` to measure it).",
            "",
        ]
    lead, diff = result["lead_protocol"], result.get("differences")
    lines = [
        markdown_table(pretty_seeds(seeds)),
        f"Each system at its chosen scale, test clips, {lead} protocol: recall@1 of each training seed (initial "
        "weights, data order, training and sampling noise), their spread, and two intervals of the seed mean: one "
        "that resamples identities and seeds (the one every table uses) and one over identities alone (what a "
        "one-seed report would claim).",
        "",
    ]
    if diff is not None and len(diff):
        lines += [
            markdown_table(pretty_seed_differences(diff, lead)),
            f"Paired differences at the best scales (test clips, {lead} protocol): the mean over the pairs of runs "
            "(two systems of several seeds: seed by seed where both have it; a one-run reference: against every seed "
            "of the other), its interval resampling identities and those pairs, and beside it each pair's "
            "difference.",
            "",
        ]
    return lines


def _choice_line(result) -> str:
    if result["chosen_on"] == "val":
        n = result["validation"]
        n = int(n.loc[n["metric"] == "recall@1", "n"].max()) if len(n) else 0
        late = result.get("chosen_on_test")
        return (
            f"Best scales are chosen on the {n} validation clips; every number is of the test clips at those scales. "
            "`best on test` is the recall@1 at the scale best on the test clips themselves: biased upwards by the "
            "selection, shown only to say by how much."
            + (f" Evaluated without validation clips (chosen on test, optimistic): {', '.join(late)}." if late else "")
        )
    return (
        "**This grid has no validation clips** (`data.validation`): best scales are chosen on the test clips, so "
        "every best-scale number is optimistic."
    )


def _unseen_line(cfg) -> str:
    k = n_folds(cfg)
    store = Path(cfg["results"]) / "store" / "store.sqlite"
    roles = roles_line(cfg, open_store(cfg).clips()) if store.exists() else ""  # folds.fold_roles: who is what
    chosen = "; scales chosen on validation speakers, never reported" if cfg["data"]["validation"]["identities"] else ""
    return (
        f"**Unseen speakers** (`data.identity_folds`: {k} folds over identities): each fold's models trained on the "
        "training clips of the other folds' identities only (never a gallery image) and answered its own identities' "
        f"queries, so no test or validation identity was seen in training (each identity tested once){chosen}. "
        "identity_mean does not exist here (no training face of the speaker: skipped); attribute_mean (the mean "
        "training face of the query's gender and ethnicity, from the fold's training identities) is what knowing the "
        f"attributes gives, the ceiling of a voice that tells only them. {roles}"
    ).rstrip()


def write_summary(out: Path, cfg, metrics, result, weights, missing, chosen) -> Path:
    rep = {**REPORT_EXTRAS, **cfg["report"]}
    best_table, best_pretty = result["tables"]["table_best_scale"]
    lines = [f"# Report: {cfg['name']}", ""]
    lines += [
        f"## {result['lead_protocol'].capitalize()} protocol: each system at its best conditional scale, with the "
        "reference rows",
        "",
        *(
            []
            if result["lead_protocol"] == PROTOCOLS[0]
            else [
                "**Led by the paper protocol**: no test speaker has a second gallery clip, so under the identity "
                "protocol no query can hit (chance 0; the paper's one clip per test speaker). The learning checks "
                f"read the {result['check_protocol']} protocol of the {result['chosen_on']} clips.",
                "",
            ]
        ),
        _choice_line(result),
        "",
        *([_unseen_line(cfg), ""] if n_folds(cfg) else []),
        markdown_table(pretty_headline(result["headline"])),
        *[line + "\n" for line in result.get("notes", [])],
        "Identity protocol: the query's own real image is left out of its ranking, so a hit is another image of the "
        "same person. 95 % intervals resample identities. Reference rows: bicubic = the 8x8 guide upscaled (the "
        "floor of super-resolution), identity_mean = the mean training face of the speaker (the closed-set "
        "ceiling), real_face (where evaluated) = the query's own real face, a perfect reconstruction (under the "
        "paper protocol it finds itself; under the identity protocol it must look more like the person's other "
        "images than anyone's), random = a random ordering of the gallery clips (an uninformative system, ranked "
        "like every other). chance@1: the exact expected recall@1 of such a system under this protocol and "
        "gallery (under the identity protocol the query's identity has one gallery clip fewer, so it is below "
        "1/N). `vs identity_mean` (`vs attribute_mean` where identity_mean does not exist: unseen speakers): "
        "recall@1 as a share of the ceiling's.",
        "",
        f"Systems evaluated: {', '.join(dict.fromkeys(best_table['system']))}.",
    ]
    unscaled = [s for s, v in result["best"].items() if pd.isna(v) and s not in REFERENCES]
    if unscaled:
        lines += [
            f"No conditional scale (`no scale`: a direct decoder draws one face per clip): {', '.join(unscaled)}; "
            "one point, a dash-dotted horizontal line in the figure."
        ]
    if missing:
        lines += [f"Not evaluated yet (skipped): {', '.join(missing)}."]
    if not result["checks"].empty:
        lines += [
            "",
            f"## Does each system learn? recall@1 against chance ({result['checks']['chance@1'].iloc[0]:.3f}), "
            f"the bicubic floor and the identity-mean ceiling ({result['check_protocol']} protocol, "
            f"{result['chosen_on']} clips)",
            "",
            markdown_table(pretty_checks(result["checks"], float(rep["guide_top1_min"]))),
            "Judged on the clips that choose ("
            + result["chosen_on"]
            + "), at the scale chosen there"
            + (
                f", under the {result['check_protocol']} protocol"
                + (
                    " (the validation speakers have other clips to find; the test speakers do not, which is why the "
                    "headline leads with the paper protocol)"
                    if result["check_protocol"] != result["lead_protocol"]
                    else ""
                )
                + "."
                if result["chosen_on"] == "val"
                else f": this grid has no validation clips, so the best of {metrics['scale'].dropna().nunique()} "
                "scales is picked on the test clips and its recall is optimistic."
            )
            + " At scale 0 the feature rows are ignored: a generation system should be at chance there, a "
            "super-resolution system at what the 8x8 guide alone gives. A super-resolution system should reach "
            f"bicubic's recall@1 and keep its guide (guide_top1 ≥ {float(rep['guide_top1_min']):g}).",
        ]
    lines += ["", "## Recall at each system's best conditional scale, both protocols", ""]
    lines += [
        markdown_table(
            best_pretty[
                [
                    c
                    for c in best_pretty.columns
                    if c in ("protocol", "system", "scale", "recall@1", "recall@3", "recall@5", "recall@10")
                    or c in ("guide_top1", "chance@1", "unsampled (misses)", "n")
                ]
            ]
        ),
        f"Best scale = the scale with the highest recall@1 on the {result['chosen_on']} clips under that protocol "
        "(ties: recall@3, then the smaller scale); for a super-resolution system only scales that keep its guide "
        "(guide_top1 ≥ "
        f"{float(cfg['report']['guide_top1_min']):g}) compete, where any does. Tables at the chosen scale "
        f"{chosen:g}: `table_scale_{chosen:g}.md`.",
        "",
        "## Training seeds",
        "",
        *_seed_lines(result),
        "## Paired differences of recall (a − b on the same clips, 95 % bootstrap over identities and seeds)",
        "",
        "The difference is the mean over pairs of runs: two systems of several seeds pair seed by seed where both "
        "have the seed, a one-run system or reference pairs with every seed of the other (`seeds (a, b)`: how many "
        "each side has; `seeds.md`: each pair's difference); the interval resamples identities and those pairs, and "
        "with one seed per system it covers the test identities only. "
        "⚑: the two systems differ in more than the factor the pair names (`differences.md` lists every way).",
        "",
    ]
    diff = result["differences"]
    lines += [markdown_table(pretty_differences(diff)) if not diff.empty else "No pair has both systems evaluated."]
    lines += [
        "",
        "## Significance of each input (paper Eq. 3/4)",
        "",
        f"Weights over k (`report.k_weights` = {cfg['report'].get('k_weights')!r}; the paper does not give "
        f"its weights): {describe_weights(weights)}.",
        "",
    ]
    for stem, sig in result["significance"].items():
        if sig.empty:
            lines += [f"{stem}: no input has both of its systems evaluated.", ""]
            continue
        lines += [f"### {stem}", "", markdown_table(pretty_significance(sig))]
    lines += [
        "With few test identities a recall difference of a few points is noise: read S with its interval.",
        "",
        "## Figures",
        "",
    ]
    for name, paths in result["figures"].items():
        lines += [f"* {name}: " + ", ".join(f"`{p.name}`" for p in paths)]
    return atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
