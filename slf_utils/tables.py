"""The one tidy table every system ends as: rows of system x scale x protocol x split x metric with value, interval
and n (`metrics.csv`), and the per-clip hits beside it (`hits.csv`). Row builders (a metric's bootstrap row, the
recall rows of a protocol's hits, constant rows, the exact chance rows), the views (one protocol, one split, one
system at one scale), the readers of a system's eval files, and the Markdown and cell formatting the notebooks and
the report share. Rows that do not depend on the ranking (chance, n_unsampled, psnr, ssim, attributes, guide
consistency) carry protocol `both`, once: a protocol's view of the table is its own rows plus the `both` rows
(`at_protocol`). Held-out clips (folds.HELD_OUT): `val` ones choose, `test` ones report; every row names its split.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from slf_utils.basics import exists
from slf_utils.folds import HELD_OUT
from slf_utils.retrieval import KS, chance_hits
from slf_utils.stats import bootstrap_ci

BOTH = "both"  # the protocol of rows that do not depend on it

METRIC_COLUMNS = ["system", "scale", "protocol", "split", "metric", "value", "ci_low", "ci_high", "n"]

HIT_COLUMNS = ["system", "scale", "protocol", "split", "clip_id", "identity", "k", "hit"]


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


def at_split(table: pd.DataFrame, split: str) -> pd.DataFrame:
    """The rows of one split (`val`, `test`) of a metrics or hits table."""
    return table[table["split"] == split]


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


def scale_label(scale, none: str = "reference") -> str:
    """'scale 3'; a row without a scale is named `none` ('reference', or 'no scale' for a direct decoder)."""
    return none if pd.isna(scale) else f"scale {float(scale):g}"


def _scale_is(col: pd.Series, scale) -> pd.Series:
    if pd.isna(scale):
        return col.isna()
    return np.isclose(col.astype(float), float(scale))


def _at(metrics: pd.DataFrame, system, scale, metric) -> tuple:
    """(value, ci_low, ci_high) of one row of a protocol view, NaNs where there is none."""
    r = metrics[(metrics["system"] == system) & (metrics["metric"] == metric) & _scale_is(metrics["scale"], scale)]
    return tuple(float(r[c].iloc[0]) for c in ("value", "ci_low", "ci_high")) if len(r) else (np.nan,) * 3


def recall_at(metrics: pd.DataFrame, system, scale, ks=KS) -> dict | None:
    m = metrics[(metrics["system"] == system) & _scale_is(metrics["scale"], scale)]
    r = {k: m.loc[m["metric"] == f"recall@{k}", "value"] for k in ks}
    if any(v.empty for v in r.values()):
        return None
    return {k: float(v.iloc[0]) for k, v in r.items()}


def hits_at(hits: pd.DataFrame | None, scale, protocol) -> pd.DataFrame | None:
    """One (scale, protocol) of a system's hits."""
    return None if hits is None else hits[_scale_is(hits["scale"], scale) & (hits["protocol"] == protocol)]


def _by_clip_and_seed(hits: pd.DataFrame) -> pd.DataFrame:
    """Hits (one k) as clips x seeds, indexed by (clip_id, identity)."""
    return hits.pivot_table(index=["clip_id", "identity"], columns="seed", values="hit")


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no tabulate dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join("" if v is None else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


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
