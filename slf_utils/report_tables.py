"""The report's tables of one protocol view, each with its pretty form for Markdown and notebooks: the metrics table
of every system at a chosen scale (and both protocols stacked), the headline (each system at its best scale against
chance and the ceiling), the learning checks (does each system learn?), the training seeds, and the seed means a
system of several runs enters every table as. Reference rows (bicubic, identity_mean, real_face, random) and direct
decoders have no scale (NaN) and a row in every table. A system's `note` (systems.yaml; e.g. face_to_face: it is fed
its own real face's embedding, so it sees the answer) marks its title with a dagger and is printed under the
headline in headline.md and summary.md.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from slf_utils.basics import exists
from slf_utils.parameters import DEFAULTS
from slf_utils.references import CEILING, FLOOR, OPEN_CEILING, REFERENCES
from slf_utils.retrieval import PROTOCOLS
from slf_utils.stats import binomial_interval, two_level_ci
from slf_utils.tables import (
    METRIC_COLUMNS,
    _at,
    _by_clip_and_seed,
    _cell,
    _fmt_scale,
    _scale_is,
    at_protocol,
)

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

NOTE_MARK = " †"


def combine_seeds(metrics: pd.DataFrame, hits: dict, n_boot=1000, seed=0) -> pd.DataFrame:
    """One row per (system, scale, protocol, split, metric), with `n_seeds`: a system of one seed as it is; of
    several, the mean over seeds, its recall@k with an interval that resamples identities and seeds
    (stats.two_level_ci over the per-clip hits), its other metrics with the seeds' mean bounds."""
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
        blo, bhi = binomial_interval(round(v0 * trials), trials) if trials else (lo0, hi0)
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
