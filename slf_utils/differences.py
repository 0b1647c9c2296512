"""Paired differences between systems: recall@k of system a minus system b on the same gallery clips, the mean over
pairs of runs (a one-run reference against every seed of a seeded system, two seeded systems seed by seed), with a
95 % paired bootstrap interval over identities and seeds, for the pairs of `report.differences` and every
super-resolution system minus bicubic (`difference_pairs`), and the Markdown forms of these differences and of how
the two systems of each pair differ (the recipes, report.recipe_differences).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from slf_utils.references import FLOOR
from slf_utils.stats import two_level_ci
from slf_utils.tables import _by_clip_and_seed, _fmt_scale, hits_at

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
    (stats.two_level_ci, as a system's own recall over seeds); `per_seed`: each pair's difference."""
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
