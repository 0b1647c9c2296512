"""The 256 x 768 feature matrix (the paper's Table 1) and the ablation systems, both declared in `params/`; one
constituent's declaration and rows: slf_utils.constituents.

`Layout.load(path)` reads and validates the declaration; `layout.fit(store, train_ids)` computes normalisation
statistics; `layout.build(store, ids, keep, stats)` assembles a batch of matrices with one `load_stacked` per stage
(no per-sample queries). Training uses `layout.precompute(...)`: every constituent's normalised block for all
training clips once, after which a batch is a few fancy-index copies (`Blocks.batch`). A constituent that is not
kept leaves zero rows, which imagen-pytorch masks to its learned null token: an ablation is "these rows are zero".
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import numpy as np

from slf_utils.basics import ParamsError, default, exists, params_hash, read_yaml, resolve
from slf_utils.constituents import (
    check_entry,
    check_overlaps,
    encode_labels,
    frames,
    parse_constituent,
    stage_bounds,
    vectors,
    wrap_vectors,
)

MODES = ("generation", "super_resolution", "reference", "none")  # none: random selection, before `reference`
# How a trained system turns its feature rows into a face (`decoder:` in systems.yaml): `diffusion` (the imagen model
# of the grid's preset, slf_utils.diffusion) or `direct` (a feed-forward embedding -> face network trained with an L1
# loss, slf_utils.face_decoder: Speech2Face's face decoder; no conditional scale).
DECODERS = ("diffusion", "direct")
_SYSTEM_KEYS = {"title", "mode", "keep", "drop", "paper_no", "decoder", "train_on", "note", "model"}
_STD_FLOOR = 1e-6  # a constant column (std 0) stays at 0 instead of exploding


@dataclass(frozen=True)
class System:
    name: str
    title: str
    mode: str
    keep: tuple
    paper_no: int | None = None
    decoder: str = "diffusion"
    # direct decoder: the constituent its decoder is trained from (default: the one it keeps, which it is fed at test)
    train_on: str | None = None
    note: str | None = None  # a caveat the report prints beside the system (e.g. that it sees the answer)
    # model options of this system (recipe.system_model merges them over the grid's `model`), e.g. face_prior
    model: dict = field(default_factory=dict, hash=False)


class Layout:
    def __init__(
        self,
        constituents: dict,
        groups: dict,
        rows=256,
        cols=768,
        clip=10.0,
        attribute_dropout="attributes",
        path=None,
        raw=None,
    ):
        self.constituents = constituents
        self.groups = groups
        self.rows, self.cols, self.clip = rows, cols, clip
        self.attribute_dropout = attribute_dropout
        self.path = path
        self.raw = raw or {}
        self.redirects = {}  # {declared stage: stage read instead} (with_stages)

    def __repr__(self):
        return f"Layout({', '.join(self.constituents)}; {self.rows}x{self.cols})"

    @property
    def names(self) -> list[str]:
        return list(self.constituents)

    @property
    def hash(self) -> str:
        return params_hash(self.raw)

    # ------------------------------------------------------------------ loading and validation
    @classmethod
    def load(cls, path, drop=()) -> Layout:
        """The layout declared in `path`, less the constituents in `drop` (a grid's `layout_drop`: rows no system
        of that grid may see; they stay zero, and the layout's hash changes with them)."""
        path = resolve(path)
        raw = read_yaml(path)
        where = str(path)
        if drop:
            unknown = sorted(set(drop) - set(raw.get("constituents") or {}))
            if unknown:
                raise ParamsError(f"layout_drop: unknown constituent(s) {unknown} of {where}")
            raw = {**raw, "constituents": {k: v for k, v in raw["constituents"].items() if k not in drop}}
            raw["groups"] = {g: [m for m in ms or [] if m not in drop] for g, ms in (raw.get("groups") or {}).items()}
            raw["dropped"] = sorted(drop)
        return cls.from_raw(raw, path)

    @classmethod
    def from_raw(cls, raw: dict, path=None) -> Layout:
        """The layout of a parsed declaration `raw` (a layout file's contents, or the copy a recipe.json keeps),
        validated; errors name `path`."""
        where = str(path)
        rows, cols = int(raw.get("rows", 256)), int(raw.get("cols", 768))
        if rows > 256 or cols > 768 or rows < 1 or cols < 1:
            raise ParamsError(f"{where}: the matrix is at most 256 x 768, got rows={rows}, cols={cols}")
        if not isinstance(raw.get("constituents"), dict) or not raw["constituents"]:
            raise ParamsError(f"{where}: `constituents` must be a non-empty mapping")
        cons = {name: parse_constituent(name, spec, where, rows, cols) for name, spec in raw["constituents"].items()}
        check_overlaps(cons, where)
        groups = raw.get("groups") or {}
        for g, members in groups.items():
            if g in cons:
                raise ParamsError(f"{where}: group '{g}' has the name of a constituent")
            for m in members or []:
                if m not in cons:
                    raise ParamsError(f"{where}: groups.{g}: unknown constituent '{m}' (known: {', '.join(cons)})")
        groups = {g: list(m or []) for g, m in groups.items()}
        drop = raw.get("attribute_dropout", "attributes")
        layout = cls(cons, groups, rows, cols, float(raw.get("clip", 10.0)), drop, path, raw)
        layout.expand(drop or [], where=f"{where}: attribute_dropout")
        return layout

    def expand(self, names, where="keep") -> tuple:
        """Constituent names (in layout order) of a list of constituent and group names."""
        if isinstance(names, str):
            names = [names]
        out = set()
        for n in names:
            if n in self.constituents:
                out.add(n)
            elif n in self.groups:
                out.update(self.groups[n])
            else:
                known = ", ".join([*self.constituents, *self.groups])
                raise ParamsError(f"{where}: unknown constituent '{n}' (known: {known})")
        return tuple(n for n in self.constituents if n in out)

    def with_stages(self, stages: dict) -> Layout:
        """The same layout with the constituents of the store stages in `stages` ({stage: stage to read instead})
        reading the other stage, e.g. an identity fold's copy of a trained encoder's stage (folds.fold_stage). The
        declaration and its hash are unchanged: the matrix is the same, only where its values come from."""
        cons = {
            n: replace(c, source={**c.source, "stage": stages[c.stage]}) if c.stage in stages else c
            for n, c in self.constituents.items()
        }
        out = Layout(cons, self.groups, self.rows, self.cols, self.clip, self.attribute_dropout, self.path, self.raw)
        used = {c.stage for c in self.constituents.values()}
        out.redirects = self.redirects | {a: b for a, b in stages.items() if a in used and a != b}
        return out

    @property
    def dropout_constituents(self) -> tuple:
        return self.expand(self.attribute_dropout or [])

    def system_stages(self, system) -> list[str]:
        """Store stages a system reads: its kept constituents' and, for a direct decoder, its `train_on`'s."""
        return self.stages([*system.keep, *([system.train_on] if exists(system.train_on) else [])])

    def row_mask(self, keep) -> np.ndarray:
        """(rows,) bool: the rows a system with `keep` may fill."""
        m = np.zeros(self.rows, bool)
        for n in self.expand(keep):
            c = self.constituents[n]
            m[c.rows[0] : c.rows[1]] = True
        return m

    def stages(self, keep) -> list[str]:
        """Store stages the kept constituents read (array constituents only; labels live in the clips table)."""
        return list(
            dict.fromkeys(self.constituents[n].stage for n in self.expand(keep) if exists(self.constituents[n].stage))
        )

    # ------------------------------------------------------------------ statistics
    def fit(self, store, clip_ids, keep=None, chunk: int = 2048) -> dict:
        """Per-column mean/std (float32) over the valid frames of `clip_ids` for every `standard` constituent
        (all kept ones; default: all). Streaming sums in float64, `chunk` clips at a time."""
        keep = self.expand(default(keep, self.names))
        clip_ids = list(clip_ids)
        stats = {"layout_hash": np.array(self.hash)}
        for n in keep:
            c = self.constituents[n]
            if c.normalise != "standard":
                continue
            s = ss = None
            count = 0
            for i in range(0, len(clip_ids), chunk):
                arrays, lengths = store.load_stacked(c.stage, clip_ids[i : i + chunk], with_lengths=True)
                if c.wrap:  # statistics per entry of the vector, before it is spread over rows
                    x = vectors(c, arrays[c.source["key"]]).astype(np.float64)  # (clips, D)
                else:
                    a, valid = frames(
                        c, arrays[c.source["key"]], lengths[c.source["key"]], warn=False, bounds=stage_bounds(c, arrays)
                    )
                    x = a[valid].astype(np.float64)  # (frames, d)
                s = x.sum(0) if s is None else s + x.sum(0)
                ss = (x**2).sum(0) if ss is None else ss + (x**2).sum(0)
                count += x.shape[0]
            if not count:
                raise ValueError(f"fit: constituent '{n}' has no frames in the {len(clip_ids)} clip(s)")
            mean = s / count
            std = np.sqrt(np.maximum(ss / count - mean**2, 0.0))
            stats[f"{n}.mean"] = mean.astype(np.float32)
            stats[f"{n}.std"] = np.where(std < _STD_FLOOR, 1.0, std).astype(np.float32)
        return stats

    # ------------------------------------------------------------------ building matrices
    def blocks(self, store, clip_ids, keep, stats, labels=None) -> dict:
        """{name: (N, n_rows, width) float32} normalised, scaled, clipped blocks of the kept constituents.
        One `load_stacked` per stage and one clip-table read for all labels."""
        keep = self.expand(keep)
        clip_ids = list(clip_ids)
        self._check_stats(keep, stats)
        out = {}
        need_labels = [n for n in keep if "label" in self.constituents[n].source]
        if need_labels and labels is None:
            labels = store.clips().set_index("clip_id")
        loaded = {}
        for stage in self.stages(keep):
            loaded[stage] = store.load_stacked(stage, clip_ids, with_lengths=True)
        for n in keep:
            c = self.constituents[n]
            if c.encoder == "array" and c.wrap:
                arrays, _ = loaded[c.stage]
                v = vectors(c, arrays[c.source["key"]])
                if c.normalise == "standard":
                    v = (v - stats[f"{n}.mean"]) / stats[f"{n}.std"]
                block = wrap_vectors(c, v * np.float32(c.scale))
            elif c.encoder == "array":
                arrays, lengths = loaded[c.stage]
                a, valid = frames(c, arrays[c.source["key"]], lengths[c.source["key"]], bounds=stage_bounds(c, arrays))
                if c.normalise == "standard":
                    a = (a - stats[f"{n}.mean"]) / stats[f"{n}.std"]
                a = np.where(valid[..., None], a * np.float32(c.scale), 0.0)
                block = np.zeros((len(clip_ids), c.n_rows, c.width), np.float32)
                block[:, : a.shape[1], : a.shape[2]] = a
            else:
                col = labels.loc[clip_ids, c.source["label"]].to_numpy(object)
                block = encode_labels(c, col) * np.float32(c.scale)
            out[n] = np.clip(block, -self.clip, self.clip, out=block)
        return out

    def assemble(self, blocks: dict, keep, index=None, drop=None, n=None, out=None) -> np.ndarray:
        """(B, rows, cols) float32 matrices from blocks (optionally rows `index` of them; `n` = B when no
        constituent is kept). `drop`: {name: (B,) bool} zeroes that constituent in those samples (attribute
        dropout). `out`: a buffer that is zero outside the kept constituents' blocks (e.g. the previous batch of
        the same system): only the blocks are written, which saves zeroing 786 KB per sample."""
        keep = self.expand(keep)
        b = len(index) if index is not None else len(next(iter(blocks.values()))) if blocks else n
        X = np.zeros((b, self.rows, self.cols), np.float32) if out is None else out
        for name in keep:
            c = self.constituents[name]
            blk = blocks[name] if index is None else blocks[name][index]
            if drop is not None and name in drop:
                blk = blk * ~drop[name][:, None, None]
            X[:, c.rows[0] : c.rows[1], c.col : c.col + c.width] = blk
        return X

    def build(self, store, clip_ids, keep, stats) -> np.ndarray:
        """(B, rows, cols) float32 feature matrices of `clip_ids` with only the `keep` constituents filled."""
        clip_ids = list(clip_ids)
        return self.assemble(self.blocks(store, clip_ids, keep, stats), keep, n=len(clip_ids))

    def precompute(self, store, clip_ids, keep, stats) -> Blocks:
        """All blocks of `clip_ids` once, so that training batches are index operations (`Blocks.batch`)."""
        return Blocks(self, self.expand(keep), self.blocks(store, clip_ids, keep, stats), list(clip_ids))

    def _check_stats(self, keep, stats):
        if "layout_hash" in stats and str(stats["layout_hash"]) != self.hash:
            warnings.warn("normalisation statistics were fitted with a different layout file", stacklevel=3)
        for n in keep:
            if self.constituents[n].normalise == "standard" and f"{n}.mean" not in stats:
                raise KeyError(f"no normalisation statistics for constituent '{n}' (fit the layout with it kept)")

    # ------------------------------------------------------------------ documentation
    def table(self):
        """The layout as a table (one row per constituent): the paper's Table 1."""
        import pandas as pd

        rows = []
        for c in self.constituents.values():
            src = c.source.get("label") and f"label {c.source['label']}" or f"{c.stage}/{c.source.get('key')}"
            rows.append(
                {
                    "constituent": c.name,
                    "rows": f"{c.rows[0]}-{c.rows[1] - 1}",
                    "columns": f"{c.col}-{c.col + c.width - 1}",
                    "encoder": c.encoder + (" (wrap)" if c.wrap else ""),
                    "source": src,
                    "normalise": c.normalise,
                    "scale": c.scale,
                    "groups": ", ".join(g for g, m in self.groups.items() if c.name in m and g != "all"),
                }
            )
        return pd.DataFrame(rows)


class Blocks:
    """Precomputed normalised blocks of a clip list: `batch(index, drop)` is the training path."""

    def __init__(self, layout: Layout, keep: tuple, blocks: dict, clip_ids: list):
        self.layout, self.keep, self.blocks, self.clip_ids = layout, keep, blocks, clip_ids

    def __len__(self):
        return len(self.clip_ids)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks.values())

    def batch(self, index, drop=None, out=None) -> np.ndarray:
        return self.layout.assemble(self.blocks, self.keep, index=np.asarray(index), drop=drop, out=out)


def load_layout(cfg) -> Layout:
    """The layout of a grid: `cfg['layout']` less `cfg['layout_drop']`."""
    return Layout.load(cfg["layout"], drop=tuple(cfg.get("layout_drop") or ()))


def load_systems(path, layout: Layout) -> dict[str, System]:
    """{name: System} from systems.yaml; names and groups are checked against the layout."""
    path = resolve(path)
    raw = read_yaml(path)
    out = {}
    for name, spec in raw.items():
        key = f"{path}: {name}"
        check_entry(spec, key, _SYSTEM_KEYS)
        mode = spec.get("mode")
        if mode not in MODES:
            raise ParamsError(f"{key}.mode must be one of {', '.join(MODES)}, got {mode!r}")
        keep = set(
            layout.expand(spec.get("keep", ["all"] if "all" in layout.groups else layout.names), where=f"{key}.keep")
        )
        keep -= set(layout.expand(spec.get("drop", []), where=f"{key}.drop"))
        paper_no = spec.get("paper_no")
        if exists(paper_no) and not isinstance(paper_no, int):
            raise ParamsError(f"{key}.paper_no must be an int or null, got {paper_no!r}")
        keep = tuple(n for n in layout.names if n in keep)
        decoder, train_on = _decoder(spec, mode, keep, layout, key)
        note = spec.get("note")
        if exists(note) and not isinstance(note, str):
            raise ParamsError(f"{key}.note must be a string, got {note!r}")
        model = spec.get("model") or {}
        if not isinstance(model, dict) or (
            model and (mode not in ("generation", "super_resolution") or decoder != "diffusion")
        ):
            raise ParamsError(
                f"{key}.model: a mapping of model preset options, for diffusion systems only; got {model!r}"
            )
        out[name] = System(name, str(spec.get("title", name)), mode, keep, paper_no, decoder, train_on, note, model)
    return out


def _decoder(spec: dict, mode: str, keep: tuple, layout: Layout, key: str) -> tuple[str, str | None]:
    """(decoder, train_on) of a system entry. `decoder: direct` (slf_utils.face_decoder) maps one stored vector to a
    face: mode generation, exactly one kept array constituent (the vector it is fed), and `train_on`, the constituent
    it is trained from (default: the same), laid out in the same rows x columns shape."""
    decoder = spec.get("decoder", "diffusion")
    if decoder not in DECODERS:
        raise ParamsError(f"{key}.decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    train_on = spec.get("train_on")
    if decoder != "direct":
        if exists(train_on):
            raise ParamsError(f"{key}.train_on: only a direct decoder is trained on another constituent")
        return decoder, None
    if mode != "generation":
        raise ParamsError(
            f"{key}.mode: a direct decoder draws a face from its input alone: mode generation, got {mode}"
        )
    vectors = [n for n in keep if layout.constituents[n].encoder == "array"]
    if len(keep) != 1 or len(vectors) != 1:
        raise ParamsError(
            f"{key}.keep: a direct decoder is fed exactly one array constituent (a stored vector), got {list(keep)}"
        )
    c = layout.constituents[keep[0]]
    if not (c.wrap or c.n_rows == 1):
        raise ParamsError(f"{key}.keep: a direct decoder reads one vector: '{keep[0]}' must be wrap or a single row")
    train_on = default(train_on, keep[0])
    if train_on not in layout.constituents:
        raise ParamsError(f"{key}.train_on: unknown constituent '{train_on}' (known: {', '.join(layout.names)})")
    a, b = layout.constituents[keep[0]], layout.constituents[train_on]
    if b.encoder != "array" or (a.n_rows, a.width, a.wrap) != (b.n_rows, b.width, b.wrap):
        raise ParamsError(
            f"{key}.train_on: '{train_on}' must be an array constituent laid out like '{keep[0]}' "
            f"({a.n_rows} rows x {a.width} columns, wrap {a.wrap})"
        )
    return decoder, train_on


# ---------------------------------------------------------------------- figure
def plot_layout(layout: Layout, keep=None):
    """Which rows and columns of the 256 x 768 matrix hold what (the paper's Table 1 as a picture): the whole
    matrix below, the single-row constituents enlarged above. With `keep`, constituents a system drops are drawn
    hatched. Returns the figure."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    kept = set(layout.expand(keep)) if exists(keep) else set(layout.names)
    small = [c for c in layout.constituents.values() if c.n_rows < 4]
    zoom = max([c.rows[1] for c in small], default=0) + 1
    fig = Figure(figsize=(11, 6.5), layout="constrained")
    axes = fig.subplots(2, 1, height_ratios=[1, 3]) if small else [None, fig.add_subplot()]
    handles = []
    for i, (name, c) in enumerate(layout.constituents.items()):
        color, on = f"C{i % 10}", name in kept
        style = dict(facecolor=color if on else "white", edgecolor=color, hatch=None if on else "///")
        for ax in axes:
            if ax is not None:
                ax.add_patch(Rectangle((c.col, c.rows[0]), c.width, c.n_rows, alpha=0.85, lw=1, **style))
        rows = f"row {c.rows[0]}" if c.n_rows == 1 else f"rows {c.rows[0]}-{c.rows[1] - 1}"
        enc = c.encoder + (", wrap" if c.wrap else "")
        label = f"{name}: {rows}, cols {c.col}-{c.col + c.width - 1} ({enc}, {c.normalise})"
        handles.append(Patch(label=label + ("" if on else " - dropped"), **style))
        if c.n_rows >= 8:
            axes[1].text(c.col + c.width / 2, (c.rows[0] + c.rows[1]) / 2, name, ha="center", va="center")
        elif c.n_rows >= 4 or axes[0] is None:  # a few rows below the enlarged panel (e.g. a wrapped embedding)
            axes[1].text(c.col + c.width / 2, (c.rows[0] + c.rows[1]) / 2, name, ha="center", va="center", fontsize=6)
        else:
            axes[0].text(c.col + c.width + 6, (c.rows[0] + c.rows[1]) / 2, name, va="center", fontsize=8)
    for ax, top in zip(axes, (zoom, layout.rows)):
        if ax is None:
            continue
        ax.set_xlim(0, layout.cols)
        ax.set_ylim(top, 0)
        ax.set_ylabel("row")
    if axes[0] is not None:
        axes[0].set_yticks(range(zoom))
        axes[0].set_title(f"rows 0-{zoom - 1} enlarged", fontsize=9)
    axes[1].set_xlabel("column")
    fig.suptitle(
        f"Speech and additional attributes feature vector ({layout.rows} x {layout.cols}); "
        "blank = zero rows, masked to the null token"
    )
    fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False)
    return fig
