"""The report (notebook 05): from whatever `<results>/<system>/eval/metrics.csv` exist, the paper's Fig. 8 (recall vs
conditional scale with bootstrap bands and the chance line), its tables (each system at its best scale and at a
chosen scale), the significance S of each input (Eq. 3/4) beside the paper's values, and sample grids (Fig. 6, 7).

Significance (paper Eq. 3/4): R_inc,k = (R_k^all - R_k^without P) / R_k^without P x 100 and S = sum_k w_k R_inc,k with
normalised weights w. The paper does not give its weights; they are `report.k_weights` (default `inverse`:
w_k proportional to 1/k) and every output says which were used. R_k^without = 0 makes R_inc,k infinite
(S = inf, "unbounded") when R_k^all > 0, and undefined (that k left out of the mean) when both are 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from slf_utils.config import atomic_write, atomic_write_text, default, exists
from slf_utils.evaluation import KS, eval_dir, load_metrics
from slf_utils.preprocessing import read_image

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
    "gender_acc",
    "ethnicity_acc",
    "age_group_acc",
    "age_rmse",
    "psnr",
    "ssim",
)
# Keys read with .get() so a params file without them still works.
REPORT_EXTRAS = {"n_examples": 6, "scales_system": None, "bootstrap": 1000, "seed": 0}


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
    """Paired percentile bootstrap of S over the test clips both systems scored (hit frames of one scale each:
    clip_id, k, hit). Returns (ci_low, ci_high); infinite resamples count as +inf in the percentiles."""
    a = hits_all.pivot_table(index="clip_id", columns="k", values="hit")
    b = hits_without.pivot_table(index="clip_id", columns="k", values="hit")
    common = a.index.intersection(b.index)
    ks = [k for k in weights if k in a.columns and k in b.columns]
    if len(common) < 2 or len(ks) != len(weights):
        return float("nan"), float("nan")
    a, b = a.loc[common, ks].to_numpy(float), b.loc[common, ks].to_numpy(float)
    rng = np.random.default_rng(seed)
    n = len(common)
    idx = rng.integers(0, n, (n_boot, n))
    ra, rb = a[idx].mean(1), b[idx].mean(1)  # (n_boot, len(ks))
    s = np.array([significance(dict(zip(ks, x)), dict(zip(ks, y)), weights) for x, y in zip(ra, rb)])
    s = s[~np.isnan(s)]
    if not len(s):
        return float("nan"), float("nan")
    # inverted_cdf: an order statistic, no interpolation between a finite and an infinite resample
    lo, hi = np.quantile(s, [alpha / 2, 1 - alpha / 2], method="inverted_cdf")
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------------- reading results
def load_all(cfg) -> pd.DataFrame:
    """Every finished `<system>/eval/metrics.csv` of cfg['systems'] in one tidy table (missing ones skipped)."""
    frames = []
    for name in cfg["systems"]:
        p = eval_dir(cfg, name) / "metrics.csv"
        if p.exists():
            frames.append(load_metrics(p))
    if not frames:
        return pd.DataFrame(columns=["system", "scale", "metric", "value", "ci_low", "ci_high", "n"])
    return pd.concat(frames, ignore_index=True)


def load_hits(cfg, system) -> pd.DataFrame | None:
    p = eval_dir(cfg, system) / "hits.csv"
    return pd.read_csv(p, dtype={"clip_id": str, "identity": str, "system": str}) if p.exists() else None


def system_titles(cfg) -> dict:
    try:
        from slf_utils import layout

        systems = layout.load_systems(cfg["systems_file"], layout.Layout.load(cfg["layout"]))
        return {k: v.title for k, v in systems.items()}
    except Exception:  # noqa: BLE001  (titles are cosmetic: a report from metrics alone still works)
        return {}


def recall_at(metrics: pd.DataFrame, system, scale, ks=KS) -> dict | None:
    m = metrics[(metrics["system"] == system) & _scale_is(metrics["scale"], scale)]
    r = {k: m.loc[m["metric"] == f"recall@{k}", "value"] for k in ks}
    if any(v.empty for v in r.values()):
        return None
    return {k: float(v.iloc[0]) for k, v in r.items()}


def _scale_is(col: pd.Series, scale) -> pd.Series:
    if not exists(scale) or (isinstance(scale, float) and np.isnan(scale)):
        return col.isna()
    return np.isclose(col.astype(float), float(scale))


def best_scales(metrics: pd.DataFrame) -> dict:
    """{system: scale} maximising recall@1, ties broken by recall@3 then the smaller scale. Systems without a
    scale (random selection) map to NaN."""
    out = {}
    for system, m in metrics.groupby("system", sort=False):
        r = m[m["metric"].isin(["recall@1", "recall@3"])].pivot_table(
            index="scale", columns="metric", values="value", dropna=False
        )
        if r.empty or "recall@1" not in r:
            out[system] = np.nan
            continue
        r = r.reset_index().assign(r3=r.get("recall@3", pd.Series(0, index=r.index)).to_numpy())
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


def metrics_table(metrics: pd.DataFrame, scales: dict, titles: dict | None = None) -> pd.DataFrame:
    """Wide table: one row per system at scales[system]; per metric `value`, `_lo`, `_hi` columns; plus the
    exact chance recall@1 of the system's test set."""
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
        chance = m.set_index("metric")["value"].get("chance@1")
        row["chance@1"] = chance
        row["n"] = int(at["n"].max()) if len(at) else 0
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no tabulate dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join("" if v is None else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def pretty_table(table: pd.DataFrame) -> pd.DataFrame:
    """Value [CI] strings for Markdown and notebooks."""
    out = pd.DataFrame(
        {"system": table["title"], "scale": table["scale"].map(lambda s: "–" if pd.isna(s) else f"{s:g}")}
    )
    for name in TABLE_METRICS:
        if name in table:
            out[name] = [
                _cell(v, lo, hi, name) for v, lo, hi in zip(table[name], table[f"{name}_lo"], table[f"{name}_hi"])
            ]
    out["chance@1"] = table["chance@1"].map(lambda v: "–" if pd.isna(v) else f"{v:.3f}")
    out["n"] = table["n"]
    return out


def system_modes(cfg) -> dict:
    from slf_utils import layout

    systems = layout.load_systems(cfg["systems_file"], layout.Layout.load(cfg["layout"]))
    return {k: v.mode for k, v in systems.items()}


def learning_checks(metrics: pd.DataFrame, best: dict, modes: dict, titles: dict | None = None) -> pd.DataFrame:
    """Does each system learn? recall@1 at its best scale against chance (ratio, CI lower end above chance) and at
    scale 0, where the feature rows are ignored: a generation system must be at chance there (CI contains it)."""
    rows = []
    for system, scale in best.items():
        if pd.isna(scale):
            continue
        m = metrics[metrics["system"] == system]
        chance = float(m.loc[m["metric"] == "chance@1", "value"].iloc[0])

        def r1(at, m=m):
            r = m[(m["metric"] == "recall@1") & _scale_is(m["scale"], at)]
            return tuple(float(r[c].iloc[0]) for c in ("value", "ci_low", "ci_high")) if len(r) else (np.nan,) * 3

        v, lo, hi = r1(scale)
        v0, lo0, hi0 = r1(0.0)
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
                "x_chance": v / chance,
                "ci_above_chance": bool(lo > chance),
                "scale0_recall@1": v0,
                "scale0_lo": lo0,
                "scale0_hi": hi0,
                # only a generation system should be at chance there; super-resolution keeps what the guide gives
                "scale0_at_chance": bool(lo0 <= chance <= hi0)
                if modes.get(system) == "generation" and not np.isnan(v0)
                else None,
            }
        )
    return pd.DataFrame(rows)


def pretty_checks(checks: pd.DataFrame) -> pd.DataFrame:
    def yes(b):
        return "–" if b is None or (isinstance(b, float) and np.isnan(b)) else ("yes" if b else "**no**")

    return pd.DataFrame(
        {
            "system": checks["title"],
            "mode": checks["mode"],
            "best scale": checks["best_scale"].map(lambda s: f"{s:g}"),
            "recall@1 [95 % CI]": [
                _cell(v, lo, hi, "recall@1")
                for v, lo, hi in zip(checks["recall@1"], checks["recall@1_lo"], checks["recall@1_hi"])
            ],
            "× chance": checks["x_chance"].map(lambda x: f"{x:.1f}"),
            "CI above chance": checks["ci_above_chance"].map(yes),
            "scale 0 recall@1": [
                _cell(v, lo, hi, "recall@1")
                for v, lo, hi in zip(checks["scale0_recall@1"], checks["scale0_lo"], checks["scale0_hi"])
            ],
            "scale 0 at chance": checks["scale0_at_chance"].map(yes),
        }
    )


def significance_table(cfg, metrics: pd.DataFrame, weights: dict, scales_by: str, scale_of: dict) -> pd.DataFrame:
    """S of every input whose two systems were both evaluated, at scale_of[system] for each system
    (`scales_by` says how these scales were chosen). Bootstrap CIs when hits.csv of both systems exist."""
    rep = {**REPORT_EXTRAS, **cfg["report"]}
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
        ha, hb = load_hits(cfg, with_sys), load_hits(cfg, without_sys)
        if exists(ha) and exists(hb):
            ha, hb = ha[_scale_is(ha["scale"], sa)], hb[_scale_is(hb["scale"], sb)]
            lo, hi = bootstrap_significance(ha, hb, weights, rep["bootstrap"], rep["seed"])
        row = {
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
            "input": sig["input"],
            "with vs without": sig["with"] + " vs " + sig["without"],
            "scales": [f"{a:g} vs {b:g}" for a, b in zip(sig["scale_with"], sig["scale_without"])],
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


def plot_recall_vs_scale(metrics: pd.DataFrame, titles: dict | None = None, ks=(1, 3)):
    """Fig. 8: recall@k vs conditional scale for every system, 95 % bootstrap bands, exact chance k/N dashed,
    the random-selection system (no scale) as a dotted line with its band across the sweep."""
    from matplotlib.figure import Figure

    titles = titles or {}
    fig = Figure(figsize=(6 * len(ks), 4.4), layout="constrained")
    axes = fig.subplots(1, len(ks), squeeze=False)[0]
    scaled = metrics[metrics["scale"].notna()]
    xs = np.sort(scaled["scale"].astype(float).unique()) if len(scaled) else np.array([0.0, 8.0])
    xlim = (xs.min(), xs.max()) if len(xs) > 1 else (xs[0] - 0.5, xs[0] + 0.5)
    for ax, k in zip(axes, ks):
        name = f"recall@{k}"
        for i, (system, m) in enumerate(metrics.groupby("system", sort=False)):
            r = m[m["metric"] == name].sort_values("scale")
            if r.empty:
                continue
            label = titles.get(system, system)
            if r["scale"].isna().all():  # random selection: the same at every scale
                v, lo, hi = r[["value", "ci_low", "ci_high"]].iloc[0]
                ax.hlines(v, *xlim, colors="gray", linestyles=":", label=f"{label} (empirical)")
                if not np.isnan(lo):
                    ax.fill_between(xlim, lo, hi, color="gray", alpha=0.12)
                continue
            color = f"C{i % 10}"
            ax.plot(r["scale"], r["value"], marker="o", color=color, label=label)
            ax.fill_between(r["scale"].astype(float), r["ci_low"], r["ci_high"], color=color, alpha=0.15)
        chance = metrics[metrics["metric"] == f"chance@{k}"]["value"].dropna().unique()
        n = metrics.loc[metrics["metric"] == f"chance@{k}", "n"].max()
        for c in chance[:1]:
            ax.axhline(c, color="k", ls="--", lw=1, label="chance k/N (exact)")
            ax.annotate(
                f"chance {c:.3f}", (xlim[1], c), xytext=(-2, 3), textcoords="offset points", ha="right", fontsize=7
            )
        if len(chance) > 1:
            ax.text(0.01, 0.01, "systems differ in N: chance line of the first", transform=ax.transAxes, fontsize=7)
        ax.set_xlabel("conditional scale")
        ax.set_ylabel(name)
        # zoom to the data: recall on a small CPU demo is far below 1
        top = pd.concat([metrics.loc[metrics["metric"] == name, c] for c in ("value", "ci_high")]).max()
        ax.set_ylim(0, min(1.02, 1.15 * top + 0.02) if pd.notna(top) else 1.02)
        ax.set_xticks(xs)
        panel = f"({'abcdefgh'[list(ks).index(k)]}) " if len(ks) > 1 else ""
        ax.set_title(f"{panel}recall@{k}" + (f", n = {int(n)} test clips" if len(chance) else ""))
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, loc="best")
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
    """Fig. 6: real | 8x8 guide | each system at its best scale, one row per test clip. None without samples."""
    titles = titles or {}
    samples = {s: _samples(cfg, s) for s, sc in best.items() if not pd.isna(sc)}
    samples = {s: d for s, d in samples.items() if exists(d) and len(d)}
    if not samples:
        return None
    clips = example_clips(samples, n)
    real, guides = _real_and_guides(cfg, clips)
    rows = [
        [r, g] + [_image_at(cfg, s, samples[s], c, best[s]) for s in samples] for c, r, g in zip(clips, real, guides)
    ]
    cols = ["real", "8x8 guide"] + [f"{titles.get(s, s)}\n(scale {best[s]:g})" for s in samples]
    return _grid_figure(rows, cols, clips, "Generated faces, each system at its best conditional scale")


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
    cols = ["real", "8x8 guide"] + [f"scale {s:g}" for s in scales]
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
    {'metrics', 'best', 'checks', 'tables': {name: (table, pretty)}, 'significance': {...},
    'figures': {name: [paths]}, 'summary': path}."""
    rep = {**REPORT_EXTRAS, **cfg["report"]}
    out = report_dir(cfg)
    metrics = load_all(cfg)
    titles = system_titles(cfg)
    result = {"metrics": metrics, "tables": {}, "significance": {}, "figures": {}}
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
    best = best_scales(metrics)
    chosen = float(rep["chosen_scale"])
    chosen_of = {s: (chosen if not pd.isna(best[s]) else np.nan) for s in found}
    result["best"] = best

    fig = plot_recall_vs_scale(metrics, titles, ks=[k for k in (1, 3) if k in ks])
    result["figures"]["recall_vs_scale"] = save_figure(fig, out, "recall_vs_scale")

    checks = learning_checks(metrics, best, system_modes(cfg), titles)
    result["checks"] = checks
    if not checks.empty:
        _write_table(out, "learning_checks", checks, pretty_checks(checks))

    for stem, scales in (("table_best_scale", best), (f"table_scale_{chosen:g}", chosen_of)):
        table = metrics_table(metrics, scales, titles)
        pretty = pretty_table(table)
        result["tables"][stem] = (table, pretty)
        _write_table(out, stem, table, pretty)

    for stem, by, scales in (
        ("significance_best_scale", "best", best),
        (f"significance_scale_{chosen:g}", f"chosen {chosen:g}", chosen_of),
    ):
        sig = significance_table(cfg, metrics, weights, by, scales)
        result["significance"][stem] = sig
        if not sig.empty:
            _write_table(out, stem, sig, pretty_significance(sig))

    n = int(rep["n_examples"])
    grid = plot_sample_grid(cfg, best, titles, n)
    if exists(grid):
        result["figures"]["samples_best_scale"] = save_figure(grid, out, "samples_best_scale")
    scaled = [s for s in found if not pd.isna(best[s])]
    across = default(rep["scales_system"], "full_input" if "full_input" in scaled else (scaled or [None])[0])
    grid = plot_scale_grid(cfg, across, titles, n) if exists(across) else None
    if exists(grid):
        result["figures"]["samples_across_scales"] = save_figure(grid, out, "samples_across_scales")

    result["summary"] = write_summary(out, cfg, metrics, result, weights, missing, chosen)
    log(f"report: {len(found)} system(s) -> {out}")
    return result


def write_summary(out: Path, cfg, metrics, result, weights, missing, chosen) -> Path:
    best_table, best_pretty = result["tables"]["table_best_scale"]
    lines = [f"# Report: {cfg['name']}", ""]
    lines += [f"Systems evaluated: {', '.join(best_table['system'])}."]
    if missing:
        lines += [f"Not evaluated yet (skipped): {', '.join(missing)}."]
    lines += ["", "## Recall at each system's best conditional scale (95 % bootstrap CI over test clips)", ""]
    lines += [
        markdown_table(
            best_pretty[
                [
                    c
                    for c in best_pretty.columns
                    if c in ("system", "scale", "recall@1", "recall@3", "recall@5", "recall@10", "chance@1", "n")
                ]
            ]
        )
    ]
    lines += [
        f"Best scale = the scale with the highest recall@1 (ties: recall@3, then the smaller scale). Tables "
        f"at the chosen scale {chosen:g}: `table_scale_{chosen:g}.md`.",
        "",
    ]
    if not result["checks"].empty:
        lines += [
            f"## Does each system learn? recall@1 against chance ({result['checks']['chance@1'].iloc[0]:.3f})",
            "",
            markdown_table(pretty_checks(result["checks"])),
            "The best scale is picked on these same test clips, so its recall is slightly optimistic (the best of "
            f"{metrics['scale'].dropna().nunique()} scales); the table at the chosen scale has no such selection. "
            "At scale 0 the feature rows are ignored: a generation system should be at chance there, a "
            "super-resolution system at what the 8x8 guide alone gives.",
            "",
        ]
    lines += [
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
