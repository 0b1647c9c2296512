"""The report's figures, each saved as PNG and PDF (`save_figure`): recall@k vs conditional scale for every system
with its bootstrap band, the reference rows and direct decoders as horizontal lines and the exact chance line, one
row of panels per protocol (the paper's Fig. 8); and the sample grids drawn as one mosaic image: real | 8x8 guide |
reference rows | each system at its best scale (Fig. 6), and one system across its scales (Fig. 7).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from slf_utils.basics import atomic_write, exists
from slf_utils.preprocessing import read_image
from slf_utils.references import REFERENCES
from slf_utils.results import Results
from slf_utils.retrieval import PROTOCOLS
from slf_utils.store import open_store
from slf_utils.tables import _scale_is, at_protocol, scale_label


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
    from matplotlib import colormaps  # matplotlib: 1.7 s to import, only where a figure is drawn
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
    from matplotlib.figure import Figure  # 1.7 s to import, only where a figure is drawn

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
    p = Results.of(cfg).eval(system) / "samples.csv"
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
        arrays = open_store(cfg).load_stacked("preprocess", clip_ids)
        return list(arrays["face"]), list(arrays["guide"])
    except Exception:  # noqa: BLE001  (no store beside the results: grids show generated faces only)
        return [None] * len(clip_ids), [None] * len(clip_ids)


def _image_at(cfg, system, samples, clip_id, scale):
    r = samples[(samples["clip_id"] == clip_id) & _scale_is(samples["scale"], scale)]
    return read_image(Results.of(cfg).eval(system) / r["image"].iloc[0]) if len(r) else None


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
