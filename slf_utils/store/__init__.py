"""The feature store: one SQLite index (clips, labels, per-stage status, rejects, provenance), one `.npz` per clip
and stage (the only copy of its arrays), and append-only training caches that index those files. Format, the
crash-safety protocol, the writer lock, the caches, `check` and `migrate`, and measured disk figures:
docs/store.md.

Modules, each importing only those above it: `files` (temp-fsync-rename, the npz layout, `__meta__`) -> `index`
(SQLite rows, `put_many`, `get`) -> `labels` (the clips table), `caches` (`load_stacked`) -> `check` -> `api`
(`Store`, `open_store`) -> `migration` (`migrate`, the format-1 builder) -> `cli` (`python -m slf_utils.store
check|migrate ROOT`). The writer lock is house-wide: `slf_utils.locks`."""

from slf_utils.locks import StoreLocked, WriterLock
from slf_utils.store.api import Store, open_store
from slf_utils.store.caches import SEGMENT_ROWS
from slf_utils.store.cli import main
from slf_utils.store.files import META, StoreError, safe_key
from slf_utils.store.index import AUDIO_STAGE, JOURNAL_MODES, SCHEMA_VERSION, StoreFormatError
from slf_utils.store.labels import (
    CLIP_COLUMNS,
    ETHNICITIES,
    LABEL_COLUMNS,
    normalise_ethnicity,
    normalise_gender,
)
from slf_utils.store.migration import migrate

__all__ = [
    "AUDIO_STAGE",
    "CLIP_COLUMNS",
    "ETHNICITIES",
    "JOURNAL_MODES",
    "LABEL_COLUMNS",
    "META",
    "SCHEMA_VERSION",
    "SEGMENT_ROWS",
    "Store",
    "StoreError",
    "StoreFormatError",
    "StoreLocked",
    "WriterLock",
    "main",
    "migrate",
    "normalise_ethnicity",
    "normalise_gender",
    "open_store",
    "safe_key",
]
