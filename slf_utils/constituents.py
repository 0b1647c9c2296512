"""One constituent of the feature matrix (a block of rows and columns of `params/layout.yaml`): its declaration, read
and checked (`parse_constituent`, `check_overlaps`), and how its rows are made for a batch of clips: the frames of a
stored array (`frames`, with the window selections of `select:`), a vector spread over rows (`vectors`,
`wrap_vectors`) or encoded labels (`encode_labels`). slf_utils.layout assembles the constituents into matrices."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import numpy as np

from slf_utils.basics import ParamsError, exists

ENCODERS = ("age", "onehot", "array")
# Which frames of an array fill a constituent's rows (`select:`): `first` in stored order; for sliding windows
# (`source.bounds` names the stage's (W, 2) [start, length] array) `longest_first` (the longest windows first, then
# shorter ones, each length in time order) or `pool_per_length` (one row per window length, the mean of its windows,
# longest first).
SELECTIONS = ("first", "longest_first", "pool_per_length")
NORMALISERS = ("none", "standard")
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


def stage_bounds(c: Constituent, arrays: dict):
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


def frames(c: Constituent, a: np.ndarray, lengths: np.ndarray, warn=True, bounds=None):
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


def vectors(c: Constituent, a) -> np.ndarray:
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


def wrap_vectors(c: Constituent, v: np.ndarray) -> np.ndarray:
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


def encode_labels(c: Constituent, values) -> np.ndarray:
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


def check_entry(spec, key: str, known) -> None:
    """One entry of the layout or systems file: a mapping of known keys only, refused naming `key` otherwise."""
    if not isinstance(spec, dict):
        raise ParamsError(f"{key} must be a mapping")
    extra = set(spec) - set(known)
    if extra:
        raise ParamsError(f"{key}: unknown key(s) {sorted(extra)} (known: {', '.join(sorted(known))})")


def parse_constituent(name, spec, where, max_rows, max_cols) -> Constituent:
    key = f"{where}: constituents.{name}"
    check_entry(spec, key, _CONSTITUENT_KEYS)
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


def check_overlaps(cons: dict, where):
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
