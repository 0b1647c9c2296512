"""The 256 x 768 feature matrix (the paper's Table 1) and the ablation systems, both declared in `params/`.

`Layout.load(path)` reads and validates the declaration; `layout.fit(store, train_ids)` computes normalisation
statistics; `layout.build(store, ids, keep, stats)` assembles a batch of matrices with one `load_stacked` per stage
(no per-sample queries). Training uses `layout.precompute(...)`: every constituent's normalised block for all
training clips once, after which a batch is a few fancy-index copies (`Blocks.batch`). A constituent that is not
kept leaves zero rows, which imagen-pytorch masks to its learned null token: an ablation is "these rows are zero".
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from slf_utils.basics import ParamsError, default, exists, params_hash, read_yaml, resolve

ENCODERS = ("age", "onehot", "array")
# Which frames of an array fill a constituent's rows (`select:`): `first` in stored order; for sliding windows
# (`source.bounds` names the stage's (W, 2) [start, length] array) `longest_first` (the longest windows first, then
# shorter ones, each length in time order) or `pool_per_length` (one row per window length, the mean of its windows,
# longest first).
SELECTIONS = ("first", "longest_first", "pool_per_length")
NORMALISERS = ("none", "standard")
MODES = ("generation", "super_resolution", "reference", "none")  # none: random selection, before `reference`
# How a trained system turns its feature rows into a face (`decoder:` in systems.yaml): `diffusion` (the imagen model
# of the grid's preset, slf_utils.diffusion) or `direct` (a feed-forward embedding -> face network trained with an L1
# loss, slf_utils.face_decoder: Speech2Face's face decoder; no conditional scale).
DECODERS = ("diffusion", "direct")
_CONSTITUENT_KEYS = {
    "rows",
    "col",
    "width",
    "encoder",
    "source",
    "classes",
    "aliases",
    "unknown",
    "normalise",
    "scale",
    "overflow",
    "select",
    "wrap",
}
_SYSTEM_KEYS = {"title", "mode", "keep", "drop", "paper_no", "decoder", "train_on", "note", "model"}
_STD_FLOOR = 1e-6  # a constant column (std 0) stays at 0 instead of exploding


def _is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and not v.strip())


def _norm_label(v) -> str:
    """Canonical spelling of a class label: 'Man' -> 'man', 'latino_hispanic' -> 'latino hispanic',
    'pt_BR' -> 'pt-br'."""
    return re.sub(r"\s+", " ", str(v).strip().lower().replace("_", "-"))


@dataclass
class Constituent:
    name: str
    rows: tuple[int, int]
    col: int
    width: int
    encoder: str
    source: dict
    normalise: str = "none"
    scale: float = 1.0
    classes: list = field(default_factory=list)
    aliases: dict = field(default_factory=dict)
    unknown: str = "error"
    overflow: str = "error"
    select: str = "first"
    wrap: bool = False  # one vector per clip spread over consecutive rows, `width` columns each

    @property
    def n_rows(self) -> int:
        return self.rows[1] - self.rows[0]

    @property
    def stage(self):
        return self.source.get("stage")

    def class_index(self, label):
        """Column of a label, or None (missing / unknown with unknown=zero). Matching ignores case, '_' vs '-'
        and ' ' vs '-'; a region suffix falls back to the language ('pt-br' -> 'pt')."""
        if _is_missing(label):
            return None
        lut = self._lut()
        s = _norm_label(label)
        for cand in (s, s.replace("-", " "), s.replace(" ", "-"), re.split(r"[-@. ]", s)[0]):
            if cand in lut:
                return lut[cand]
        if self.unknown == "error":
            raise ValueError(f"{self.name}: unknown label {label!r} (classes: {', '.join(self.classes)})")
        return None

    def _lut(self) -> dict:
        if not hasattr(self, "_lut_cache"):
            lut = {_norm_label(c): i for i, c in enumerate(self.classes)}
            lut.update({_norm_label(c).replace("-", " "): i for i, c in enumerate(self.classes)})
            for a, c in self.aliases.items():
                lut.setdefault(_norm_label(a), lut[_norm_label(c)])
            self._lut_cache = lut
        return self._lut_cache


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
        rows, cols = int(raw.get("rows", 256)), int(raw.get("cols", 768))
        if rows > 256 or cols > 768 or rows < 1 or cols < 1:
            raise ParamsError(f"{where}: the matrix is at most 256 x 768, got rows={rows}, cols={cols}")
        if not isinstance(raw.get("constituents"), dict) or not raw["constituents"]:
            raise ParamsError(f"{where}: `constituents` must be a non-empty mapping")
        cons = {name: _constituent(name, spec, where, rows, cols) for name, spec in raw["constituents"].items()}
        _check_overlaps(cons, where)
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
        return Layout(cons, self.groups, self.rows, self.cols, self.clip, self.attribute_dropout, self.path, self.raw)

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
                    x = _vectors(c, arrays[c.source["key"]]).astype(np.float64)  # (clips, D)
                else:
                    a, valid = _frames(
                        c, arrays[c.source["key"]], lengths[c.source["key"]], warn=False, bounds=_bounds(c, arrays)
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
                v = _vectors(c, arrays[c.source["key"]])
                if c.normalise == "standard":
                    v = (v - stats[f"{n}.mean"]) / stats[f"{n}.std"]
                block = _wrap(c, v * np.float32(c.scale))
            elif c.encoder == "array":
                arrays, lengths = loaded[c.stage]
                a, valid = _frames(c, arrays[c.source["key"]], lengths[c.source["key"]], bounds=_bounds(c, arrays))
                if c.normalise == "standard":
                    a = (a - stats[f"{n}.mean"]) / stats[f"{n}.std"]
                a = np.where(valid[..., None], a * np.float32(c.scale), 0.0)
                block = np.zeros((len(clip_ids), c.n_rows, c.width), np.float32)
                block[:, : a.shape[1], : a.shape[2]] = a
            else:
                col = labels.loc[clip_ids, c.source["label"]].to_numpy(object)
                block = _encode_labels(c, col) * np.float32(c.scale)
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


# ---------------------------------------------------------------------- helpers
def _bounds(c: Constituent, arrays: dict):
    """The stacked window bounds (N, W, 2) a `select` other than `first` needs, from the same stage's arrays."""
    if c.select == "first":
        return None
    key = c.source["bounds"]
    if key not in arrays:
        raise KeyError(
            f"{c.name}: select: {c.select} needs the window bounds array '{key}' (source.bounds) in store stage "
            f"'{c.stage}', which has {sorted(arrays)}"
        )
    return arrays[key]


def _select_windows(c: Constituent, a: np.ndarray, lengths: np.ndarray, bounds) -> tuple[np.ndarray, np.ndarray]:
    """Window embeddings (N, W, d) reordered (`longest_first`) or pooled per window length (`pool_per_length`),
    with their new lengths. `bounds` (N, W, 2) = [start, length] per window (seconds); padding windows go last."""
    bounds = np.asarray(bounds, np.float64)
    if bounds.ndim != 3 or bounds.shape[:2] != a.shape[:2] or bounds.shape[2] < 2:
        raise ValueError(
            f"{c.name}: window bounds '{c.source['bounds']}' have shape {bounds.shape}, expected "
            f"({a.shape[0]}, {a.shape[1]}, 2) for {c.stage}/{c.source['key']} {a.shape}"
        )
    valid = np.arange(a.shape[1])[None, :] < lengths[:, None]
    size = np.round(bounds[..., 1], 6)  # seconds stored as float32: equal lengths compare equal after rounding
    if c.select == "longest_first":
        # sort by (padding last, longest first, earliest start first); keep only what can fill rows when the
        # rest would be truncated anyway (overflow: error still sees every window and refuses)
        order = np.lexsort((bounds[..., 0], -size, ~valid), axis=-1)
        if c.overflow == "truncate":
            order = order[:, : c.n_rows]
        return np.take_along_axis(a, order[..., None], axis=1), lengths
    # pool_per_length: every distinct length of the batch, longest first; a clip's rows are its own lengths
    sizes = np.unique(size[valid])[::-1]
    member = (size[..., None] == sizes) & valid[..., None]  # (N, W, L)
    count = member.sum(1)  # (N, L)
    pooled = np.einsum("nwd,nwl->nld", a, member.astype(np.float32)) / np.maximum(count, 1)[..., None]
    order = np.argsort(count == 0, axis=1, kind="stable")  # the clip's present lengths first, still longest first
    return np.take_along_axis(pooled, order[..., None], axis=1).astype(np.float32), (count > 0).sum(1)


def _frames(c: Constituent, a: np.ndarray, lengths: np.ndarray, warn=True, bounds=None):
    """A stacked array as (N, frames, d) float32 limited to the constituent's rows, and (N, frames) validity.
    A constituent with `select` other than `first` chooses its frames among windows with `bounds` (N, W, 2)."""
    a = np.asarray(a, np.float32)
    if a.ndim == 2:  # one vector per clip, e.g. a whole-clip embedding -> one row
        a = a[:, None, :]
        lengths = np.ones(len(a), np.int64)
    if a.ndim != 3:
        raise ValueError(f"{c.name}: expected (N, frames, d) arrays from {c.stage}, got shape {a.shape}")
    if a.shape[2] > c.width:
        raise ValueError(
            f"{c.name}: {c.stage}/{c.source['key']} has {a.shape[2]} columns, the layout reserves "
            f"{c.width} (params: width)"
        )
    lengths = np.asarray(lengths)
    if c.select != "first":
        a, lengths = _select_windows(c, a, lengths, bounds)
    if a.shape[1] > c.n_rows:
        if c.overflow == "error":
            raise ValueError(f"{c.name}: {a.shape[1]} frames do not fit its {c.n_rows} rows (overflow: error)")
        if warn and c.select == "first":  # another `select` declares which frames it keeps: nothing to warn about
            warnings.warn(
                f"{c.name}: {int((lengths > c.n_rows).sum())} clip(s) have more than {c.n_rows} frames; "
                f"the first {c.n_rows} are used",
                stacklevel=3,
            )
        a = a[:, : c.n_rows]
    valid = np.arange(a.shape[1])[None, :] < lengths[:, None]
    return a, valid


def _vectors(c: Constituent, a) -> np.ndarray:
    """(N, D) float32: the one vector per clip a `wrap` constituent reads (a stored (D,) array, or (1, D))."""
    a = np.asarray(a, np.float32)
    if a.ndim == 3 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 2:
        raise ValueError(
            f"{c.name}: wrap spreads one vector per clip over rows; {c.stage}/{c.source['key']} has shape "
            f"{a.shape[1:]} per clip (params: wrap)"
        )
    return a


def _wrap(c: Constituent, v: np.ndarray) -> np.ndarray:
    """(N, n_rows, width) block of vectors (N, D): entries [r*width, (r+1)*width) fill row r, the last row's tail
    and any rows after it stay zero. More entries than n_rows*width: `overflow: error` refuses, `truncate` keeps the
    first ones with a warning."""
    n, d = v.shape
    room = c.n_rows * c.width
    if d > room:
        need = -(-d // c.width)
        if c.overflow == "error":
            raise ValueError(
                f"{c.name}: a {d}-d vector needs {need} rows of {c.width} columns, the layout reserves {c.n_rows} "
                f"(rows {c.rows[0]}-{c.rows[1] - 1}; overflow: error)"
            )
        warnings.warn(f"{c.name}: {d}-d vectors truncated to the {room} entries of {c.n_rows} rows", stacklevel=3)
        v, d = v[:, :room], room
    flat = np.zeros((n, room), np.float32)
    flat[:, :d] = v
    return flat.reshape(n, c.n_rows, c.width)


def _encode_labels(c: Constituent, values) -> np.ndarray:
    """(N, 1, width) float32 rows of a label constituent."""
    out = np.zeros((len(values), 1, c.width), np.float32)
    if c.encoder == "age":
        for i, v in enumerate(values):
            if _is_missing(v):
                out[i, 0, 1] = 1.0  # the missing flag keeps the row non-zero: "age unknown" is information
            else:
                out[i, 0, 0] = float(v) / 100.0
        return out
    unknown = set()
    for i, v in enumerate(values):
        j = c.class_index(v)
        if j is None:
            if not _is_missing(v):
                unknown.add(str(v))
            continue
        out[i, 0, j] = 1.0
    if unknown:
        warnings.warn(f"{c.name}: labels outside the class list left empty: {sorted(unknown)}", stacklevel=3)
    return out


def _constituent(name, spec, where, max_rows, max_cols) -> Constituent:
    key = f"{where}: constituents.{name}"
    if not isinstance(spec, dict):
        raise ParamsError(f"{key} must be a mapping")
    extra = set(spec) - _CONSTITUENT_KEYS
    if extra:
        raise ParamsError(f"{key}: unknown key(s) {sorted(extra)} (known: {', '.join(sorted(_CONSTITUENT_KEYS))})")
    enc = spec.get("encoder")
    if enc not in ENCODERS:
        raise ParamsError(f"{key}.encoder must be one of {', '.join(ENCODERS)}, got {enc!r}")
    rows = spec.get("rows")
    if not (isinstance(rows, list) and len(rows) == 2 and all(isinstance(r, int) for r in rows)):
        raise ParamsError(f"{key}.rows must be [start, end), got {rows!r}")
    if not 0 <= rows[0] < rows[1] <= max_rows:
        raise ParamsError(f"{key}.rows {rows} must lie within [0, {max_rows}) and be non-empty")
    if enc != "array" and rows[1] - rows[0] != 1:
        raise ParamsError(f"{key}.rows: a {enc} constituent takes exactly one row, got {rows}")
    source = spec.get("source") or {}
    if enc == "array" and not (isinstance(source.get("stage"), str) and isinstance(source.get("key"), str)):
        raise ParamsError(f"{key}.source must give the store `stage` and array `key`, got {source!r}")
    if enc != "array" and not isinstance(source.get("label"), str):
        raise ParamsError(f"{key}.source must name the clip-table `label`, got {source!r}")
    classes = [str(c) for c in spec.get("classes") or []]
    aliases = {str(a): str(c) for a, c in (spec.get("aliases") or {}).items()}
    if enc == "onehot":
        if not classes:
            raise ParamsError(f"{key}.classes: a onehot constituent needs its class list")
        normed = [_norm_label(c) for c in classes]
        dup = sorted({c for c in normed if normed.count(c) > 1})
        if dup:
            raise ParamsError(f"{key}.classes: duplicate classes {dup} would share a column")
        for a, c in aliases.items():
            if _norm_label(c) not in normed:
                raise ParamsError(f"{key}.aliases.{a}: '{c}' is not one of its classes")
    natural = {"age": 2, "onehot": len(classes)}.get(enc)
    width = spec.get("width", natural)
    if not isinstance(width, int) or width < 1:
        raise ParamsError(f"{key}.width must be a positive int, got {width!r}")
    if exists(natural) and width < natural:
        raise ParamsError(f"{key}.width {width} is smaller than its {natural} columns")
    col = spec.get("col", 0)
    if not isinstance(col, int) or col < 0 or col + width > max_cols:
        raise ParamsError(f"{key}: columns [{col}, {col + width}) exceed the {max_cols} columns")
    norm = spec.get("normalise", "none")
    if norm not in NORMALISERS:
        raise ParamsError(f"{key}.normalise must be one of {', '.join(NORMALISERS)}, got {norm!r}")
    if norm == "standard" and enc != "array":
        raise ParamsError(f"{key}.normalise: standard applies to array constituents only")
    scale = spec.get("scale", 1.0)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ParamsError(f"{key}.scale must be a number, got {scale!r}")
    unknown = spec.get("unknown", "error")
    overflow = spec.get("overflow", "error")
    if unknown not in ("error", "zero") or overflow not in ("error", "truncate"):
        raise ParamsError(f"{key}: unknown must be error|zero and overflow error|truncate")
    select = spec.get("select", "first")
    if select not in SELECTIONS:
        raise ParamsError(f"{key}.select must be one of {', '.join(SELECTIONS)}, got {select!r}")
    if select != "first" and enc != "array":
        raise ParamsError(f"{key}.select: {select} applies to array constituents only")
    wrap = spec.get("wrap", False)
    if not isinstance(wrap, bool):
        raise ParamsError(f"{key}.wrap must be true or false, got {wrap!r}")
    if wrap and (enc != "array" or select != "first"):
        raise ParamsError(f"{key}.wrap: spreads one stored vector over rows: encoder array with select first only")
    if select != "first" and not isinstance(source.get("bounds"), str):
        raise ParamsError(
            f"{key}.source.bounds: select: {select} needs the stage's window bounds array ([start, length] per "
            f"window, e.g. bounds: window), got {source.get('bounds')!r}"
        )
    return Constituent(
        name,
        (rows[0], rows[1]),
        col,
        width,
        enc,
        dict(source),
        norm,
        float(scale),
        classes,
        aliases,
        unknown,
        overflow,
        select,
        wrap,
    )


def _check_overlaps(cons: dict, where):
    items = list(cons.values())
    for i, a in enumerate(items):
        for b in items[i + 1 :]:
            rows = a.rows[0] < b.rows[1] and b.rows[0] < a.rows[1]
            cols = a.col < b.col + b.width and b.col < a.col + a.width
            if rows and cols:
                raise ParamsError(
                    f"{where}: constituents '{a.name}' (rows {a.rows[0]}-{a.rows[1] - 1}, cols {a.col}-"
                    f"{a.col + a.width - 1}) and '{b.name}' (rows {b.rows[0]}-{b.rows[1] - 1}, cols {b.col}-"
                    f"{b.col + b.width - 1}) overlap"
                )


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
        if not isinstance(spec, dict):
            raise ParamsError(f"{key} must be a mapping")
        extra = set(spec) - _SYSTEM_KEYS
        if extra:
            raise ParamsError(f"{key}: unknown key(s) {sorted(extra)} (known: {', '.join(sorted(_SYSTEM_KEYS))})")
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


# ---------------------------------------------------------------------- synthetic data
def synthetic_store(
    root,
    n_identities=4,
    clips_per_identity=4,
    face_size=32,
    guide_size=8,
    speaker_dim=256,
    windows=5,
    frames=(79, 81),
    seed=0,
    layout: Layout | None = None,
    audio_seconds=24.0,
    face_dim=128,
    voice_noise=1.0,
    contrastive_dim=128,
):
    """A Store filled with random arrays shaped like the layout's sources and faces whose colours depend on the
    identity: for tests, benchmarks and trying the pipeline without data. Half of each identity's clips are
    `test`. With a `layout`, window and frame counts fill its speaker_windows, pyaudio and mel rows exactly.
    `windows`: a count (3 s windows at 1 s steps) or the (size, hop) pairs of `features.windows`, cut from a clip
    of `audio_seconds` as notebook 02 does; `speaker_windows/window` holds their [start, length] in seconds.
    With `face_dim` (0: none), the Speech2Face stages: `face_embedding` (the identity's own unit vector x 10 plus a
    little noise: the true embedding determines the face's identity) and `voice_face_embedding` (the same plus noise
    of sd `voice_noise` per entry: a voice encoder's imperfect prediction), drawn from a generator of their own so the
    other arrays are the same with or without them. With `contrastive_dim` (0: none), the `contrastive_speech` stage
    (slf_utils.contrastive): a unit vector near the identity's own, from a generator of its own too. Returns the
    Store."""
    import pandas as pd

    if exists(layout):
        c = layout.constituents
        windows = c["speaker_windows"].n_rows if "speaker_windows" in c else windows
        frames = tuple(c[n].n_rows if n in c else f for n, f in zip(("pyaudio", "mel"), frames))

    from slf_utils.features import window_bounds
    from slf_utils.preprocessing import SAMPLE_RATE, guide_of
    from slf_utils.store import Store

    if isinstance(windows, (int, np.integer)):
        bounds = np.stack([np.arange(windows), np.full(windows, 3.0)], 1).astype(np.float32)
    else:
        bounds = (window_bounds(int(round(audio_seconds * SAMPLE_RATE)), windows) / SAMPLE_RATE).astype(np.float32)

    store = Store(Path(root))
    rng = np.random.default_rng(seed)
    genders, eths = ["Man", "woman"], ["asian", "indian", "black", "white", "middle eastern", "latino hispanic"]
    langs = ["fr", "pt_BR", "es", "en", "de"]
    rows = []
    for i in range(n_identities):
        for j in range(clips_per_identity):
            rows.append(
                {
                    "clip_id": f"id{i:05d}/yt{j:03d}/{j:05d}",
                    "identity": f"id{i:05d}",
                    "split": "train" if j < max(1, clips_per_identity // 2) else "test",
                    "gender": genders[i % 2],
                    "age": float(20 + 7 * i) if i % 3 else None,
                    "ethnicity": eths[i % len(eths)],
                    "language": langs[i % len(langs)],
                }
            )
    store.add_clips(pd.DataFrame(rows))
    yy, xx = np.mgrid[0:face_size, 0:face_size] / face_size
    for r in rows:
        i = int(r["identity"][2:])
        voice = rng.normal(size=speaker_dim).astype(np.float32) + i
        colour = np.array([(i * 67) % 256, (i * 131 + 60) % 256, (i * 29 + 120) % 256], np.float32)
        blob = np.exp(-((yy - 0.5) ** 2 + (xx - 0.5) ** 2) / 0.08)[..., None]
        face = np.clip(blob * colour + (1 - blob) * 40 + rng.normal(0, 4, (face_size, face_size, 3)), 0, 255)
        face = face.astype(np.uint8)
        store.put(r["clip_id"], "preprocess", {"face": face, "guide": guide_of(face, guide_size)}, "synthetic")
        store.put(r["clip_id"], "audio", {"audio": np.zeros(160, np.float32)}, "synthetic")  # its own stage
        store.put(r["clip_id"], "speaker", {"embedding": voice}, "synthetic")
        store.put(
            r["clip_id"],
            "speaker_windows",
            {"embedding": voice + rng.normal(0, 0.1, (len(bounds), speaker_dim)).astype(np.float32), "window": bounds},
            "synthetic",
        )
        n = int(rng.integers(frames[0] - 3, frames[0] + 1))
        store.put(r["clip_id"], "pyaudio", {"frames": rng.normal(i, 1, (n, 68)).astype(np.float32)}, "synthetic")
        n = int(rng.integers(frames[1] - 3, frames[1] + 1))
        store.put(r["clip_id"], "mel", {"frames": rng.normal(-20 + i, 3, (n, 128)).astype(np.float32)}, "synthetic")
    if face_dim:
        s2f = np.random.default_rng(seed + 7919)
        axes = s2f.normal(size=(n_identities, face_dim))
        axes = 10 * axes / np.linalg.norm(axes, axis=1, keepdims=True)
        for r in rows:
            true = axes[int(r["identity"][2:])] + s2f.normal(0, 0.1, face_dim)
            pred = true + s2f.normal(0, voice_noise, face_dim)
            store.put(r["clip_id"], "face_embedding", {"embedding": true.astype(np.float32)}, "synthetic")
            store.put(r["clip_id"], "voice_face_embedding", {"embedding": pred.astype(np.float32)}, "synthetic")
    if contrastive_dim:
        ct = np.random.default_rng(seed + 104729)
        axes = ct.normal(size=(n_identities, contrastive_dim))
        for r in rows:
            e = axes[int(r["identity"][2:])] + ct.normal(0, 0.3, contrastive_dim)
            e = (e / np.linalg.norm(e)).astype(np.float32)
            store.put(r["clip_id"], "contrastive_speech", {"embedding": e}, "synthetic")
    return store
