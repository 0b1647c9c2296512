"""The `Store` a stage opens: its index (rows, `put_many`, `get`), labels (the clips table), training caches
(`load_stacked`) and `check`, one object over one folder. See docs/store.md."""

from __future__ import annotations

from slf_utils.results import Results
from slf_utils.store.check import Checks
from slf_utils.store.labels import Labels


class Store(Labels, Checks):
    """A feature store under `root` (`store.sqlite`, `arrays/`, `locks/`). `Store(root, journal_mode="wal")`; the
    methods come from `index.Index` (rows, writes, `get`, provenance), `labels.Labels` (clips), `caches.Caches`
    (`load_stacked`, `clear_stage`) and `check.Checks` (`check`, `size_bytes`)."""


def open_store(cfg) -> Store:
    return Store(Results.of(cfg).store, journal_mode=cfg.get("store", {}).get("journal_mode", "wal"))
