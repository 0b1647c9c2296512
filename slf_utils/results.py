"""Where a grid's outputs live: one object for the results layout, which every step asks for a path instead of
building its own.

    results/<grid>/
        store/                      the feature store (slf_utils.store)
        report/                     notebook 05
        runs/                       the executed notebooks of the grid-wide steps
        .grid.lock                  one grid writer at a time
        <encoder>/                  a trained encoder's stage (notebooks 06, 07): one per grid, read by every seed
        <system>/[seed<s>/]         one run of a system (seed<s>/ for a seed that is not grid.seeds' first)
            model/[fold<k>/]        the trained model (one per identity fold), its recipe.json
            eval/                   notebook 04: images, samples, metrics, hits
            runs/                   the executed notebooks of its grid steps
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Results:
    root: Path
    seeds: tuple[int, ...] = ()
    seed: int = 0

    @classmethod
    def of(cls, cfg) -> Results:
        """The results layout of a loaded grid file `cfg`: its `results`, grid.seeds and train.seed."""
        seeds = (cfg.get("grid") or {}).get("seeds") or ()
        return cls(Path(cfg["results"]), tuple(int(s) for s in seeds), int((cfg.get("train") or {}).get("seed", 0)))

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def steps(self) -> Path:
        """The executed notebooks of the grid-wide steps (preprocess, features, report)."""
        return self.root / "runs"

    @property
    def lock(self) -> Path:
        return self.root / ".grid.lock"

    def system(self, name: str) -> Path:
        """One run of a system: results/<system>/, or results/<system>/seed<s>/ for a train.seed that is not the first
        of grid.seeds (so a one-seed grid's folders are a many-seed grid's first seed)."""
        base = self.root / name
        return base if not self.seeds or self.seed == self.seeds[0] else base / f"seed{self.seed}"

    def model(self, name: str, fold: int | None = None) -> Path:
        """A system's trained model, or with identity folds the one trained without fold `fold`."""
        d = self.system(name) / "model"
        return d if fold is None else d / f"fold{fold}"

    def eval(self, name: str) -> Path:
        return self.system(name) / "eval"

    def runs(self, name: str) -> Path:
        return self.system(name) / "runs"

    def encoder(self, name: str) -> Path:
        """A trained encoder's folder (its metrics, hits and figures): one per grid, whatever the seed."""
        return self.root / name

    def encoder_model(self, name: str) -> Path:
        return self.encoder(name) / "model"

    def models(self, sub: str = "") -> list[Path]:
        """Every trained model folder of the grid (all systems and seeds), `sub` below each (e.g. /fold0)."""
        return sorted([*self.root.glob(f"*/model{sub}"), *self.root.glob(f"*/seed*/model{sub}")])
