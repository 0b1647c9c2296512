"""What a diffusion model trains on, read from the store: the faces and guides (the preprocessed crops, resized
only), the training clips, the training batches, and the face prior (model.face_prior)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from slf_utils.basics import exists
from slf_utils.folds import training_ids
from slf_utils.layout import Layout
from slf_utils.preprocessing import resize

CACHE_BYTES = 8 * 2**30  # above this, training batches are read from the store per step instead of precomputed


# ---------------------------------------------------------------------- data
def load_faces(store, clip_ids, size: int, chunk: int = 1024) -> np.ndarray:
    """(N, size, size, 3) uint8 training/evaluation faces: the store's preprocessed crops (stage `preprocess`, key
    `face`), only resized - never cropped again, so training and evaluation see the same crop."""
    clip_ids = list(clip_ids)
    out = np.zeros((len(clip_ids), size, size, 3), np.uint8)
    for i in range(0, len(clip_ids), chunk):
        faces = store.load_stacked("preprocess", clip_ids[i : i + chunk], keys=["face"])["face"]
        for j, f in enumerate(faces):
            out[i + j] = f if f.shape[0] == size else resize(f, size)
    return out


def load_guides(store, clip_ids) -> np.ndarray:
    """(N, g, g, 3) uint8 stored 8x8 image guides (made from the same crop as the faces)."""
    return store.load_stacked("preprocess", list(clip_ids), keys=["guide"])["guide"]


def train_clip_ids(store, layout: Layout, keep, cfg=None, fold=None, who=None) -> list[str]:
    """Training clips (of identity fold `fold`, folds.training_clips: never a gallery clip) that have a face and every
    stage the kept constituents need; `who` names the model in a refusal."""
    return training_ids(store, layout.stages(keep), cfg, fold, who)


class _Batches:
    """Training batches: precomputed blocks and faces when they fit in CACHE_BYTES (a batch is then an index
    operation), else one `load_stacked` per stage and batch."""

    def __init__(self, store, layout, keep, stats, clip_ids, size, cache=None):
        self.store, self.layout, self.keep, self.stats, self.ids, self.size = store, layout, keep, stats, clip_ids, size
        per_clip = size * size * 3 + sum(
            4 * layout.constituents[n].n_rows * layout.constituents[n].width for n in layout.expand(keep)
        )
        self.cached = per_clip * len(clip_ids) <= CACHE_BYTES if cache is None else cache
        if self.cached:
            self.blocks = layout.precompute(store, clip_ids, keep, stats)
            self.faces = load_faces(store, clip_ids, size)
            self.buffers = {}  # batch size -> two matrices, used in turn
        else:
            self.labels = store.clips().set_index("clip_id")

    def __len__(self):
        return len(self.ids)

    def get(self, index, drop=None):
        if self.cached:
            # Every batch writes the same blocks, so a buffer stays zero elsewhere and is reused without zeroing
            # (the memset of 786 KB per sample dominated batch assembly). Two buffers in turn: a batch stays
            # valid while the next one is assembled.
            shape = (len(index), self.layout.rows, self.layout.cols)
            bufs = self.buffers.setdefault(len(index), [np.zeros(shape, np.float32), np.zeros(shape, np.float32)])
            bufs.reverse()
            X, faces = self.blocks.batch(index, drop, out=bufs[0]), self.faces[index]
        else:
            ids = [self.ids[i] for i in index]
            blocks = self.layout.blocks(self.store, ids, self.keep, self.stats, labels=self.labels)
            X = self.layout.assemble(blocks, self.keep, drop=drop, n=len(ids))
            faces = load_faces(self.store, ids, self.size)
        images = torch.from_numpy(faces).permute(0, 3, 1, 2).float().div_(255.0)
        return images, torch.from_numpy(X)


# ---------------------------------------------------------------------- face prior
class FacePrior:
    """`model.face_prior` (SCLDM's statistical face prior, seeds/scldm-abstract.txt): the diffusion model learns the
    residual x - mu instead of the face x, and sampling adds mu back, so the component every face shares is not
    generated and the condition only has to explain the differences.

    * `mean`: mu is the pixel mean of the system's training faces. `attribute_mean`: mu is the mean of the training
      faces whose clips share the sample's labels (`face_prior_attributes`, default gender x ethnicity; age in
      decades; a missing label is a value of its own); at sampling the TEST clip's labels pick mu, and a combination
      no training clip has falls back to the global mean. It uses labels: compare it only with systems that see the
      attributes too (e.g. Full Input), never with speech-only ones.
    * Computed once when training starts, from the training faces at the largest image size of the cascade, and
      saved in the checkpoint (`face_prior`); sampling uses that mu. A smaller unet's mu is the area resize of it
      (imagen resizes its training images the same way, and an area resize is linear: the resize of a residual is
      the residual of the resized face from the resized mu).
    * Into imagen's [0, 1]: m = gain (x - mu) + 1/2, clipped to [0, 1]; imagen works on 2m - 1 = 2 gain (x - mu).
      With gain 1 (the default) that is 2 (x - mu), exactly the varying part of the pixel baseline's 2x - 1 = 2 (x - mu)
      + (2 mu - 1): the same signal-to-noise ratio at every noise level, so prior vs pixel compares the mean alone.
      The price is clipping where |x - mu| > 1/2 (`clipped_share` measures it; a few pixels of a face). Gain 1/2
      (checkpoints from before, which store no gain) never clips but halves the amplitude: a 4x lower signal-to-noise
      ratio, and sampler error doubled in output pixels. Back: x = mu + (m - 1/2) / gain, clipped to [0, 1]. A model
      that predicts a zero residual samples mu itself.
    * Cascades and guides, consistently in residual space: every image imagen sees is a residual, its low-resolution
      conditions included. In training imagen derives the low-res condition from the residual image it is given,
      i.e. the guide's residual from mu at the guide size; so super-resolution sampling starts from the stored guide
      mapped the same way, (guide - area(mu, 8)) / 2 + 1/2 (same information as the guide: mu is known), and a
      generation cascade's second unet is conditioned on the first unet's residual output, as in training. With gain 1
      the guide enters the unet at the amplitude of a plain image's varying part.
    """

    def __init__(self, kind: str, attributes, means: torch.Tensor, keys, counts, gain: float = 1.0):
        self.kind, self.attributes, self.gain = kind, list(attributes), float(gain)
        self.means = means.float()  # (1 + groups, 3, S, S) in [0, 1]; row 0: the global mean
        self.keys = list(keys)  # group keys of rows 1..
        self.counts = [int(c) for c in counts]  # training faces per row
        self._index = {k: i + 1 for i, k in enumerate(self.keys)}

    @property
    def size(self) -> int:
        return int(self.means.shape[-1])

    def key_of(self, labels) -> str:
        """A clip's group key from its labels (a mapping or a row)."""
        parts = []
        for a in self.attributes:
            v = labels.get(a) if hasattr(labels, "get") else None
            if v is None or (not isinstance(v, str) and pd.isna(v)):
                v = "?"
            elif a == "age":
                v = f"{int(float(v) // 10 * 10)}s"
            parts.append(f"{a}={str(v).strip().lower()}")
        return "|".join(parts)

    def groups_of(self, labels=None, n=None) -> np.ndarray:
        """Row of `means` per sample: 0 (global) under `mean` or for an unseen combination; labels: a DataFrame (or
        list of mappings) with the attribute columns, one row per sample."""
        if self.kind == "mean":
            return np.zeros(len(labels) if labels is not None else int(n), np.int64)
        if labels is None:
            raise ValueError(
                "model.face_prior attribute_mean picks each sample's mean face from its clip's labels "
                f"({', '.join(self.attributes)}): pass labels= (one row per feature matrix)"
            )
        rows = labels.to_dict("records") if isinstance(labels, pd.DataFrame) else list(labels)
        missing = [a for a in self.attributes if rows and a not in rows[0]]
        if missing:
            raise ValueError(f"face prior: labels have no column(s) {missing}")
        return np.array([self._index.get(self.key_of(r), 0) for r in rows], np.int64)

    @classmethod
    def fit(cls, kind, attributes, store, clip_ids, size: int, chunk: int = 1024) -> FacePrior:
        """Means of the training faces (the store's crops resized to `size`, as training loads them), read in
        chunks: global and, under attribute_mean, per label combination."""
        clip_ids = list(clip_ids)
        prior = cls(kind, attributes, torch.zeros(1, 3, size, size), [], [0])
        labels = store.clips().set_index("clip_id").loc[clip_ids].reset_index()
        keys = [prior.key_of(r) for r in labels.to_dict("records")] if kind == "attribute_mean" else [""] * len(labels)
        names = sorted(set(keys)) if kind == "attribute_mean" else []
        index = {k: i + 1 for i, k in enumerate(names)}
        group = np.array([index.get(k, 0) for k in keys], np.int64)
        sums = np.zeros((1 + len(names), size, size, 3))
        counts = np.bincount(group, minlength=1 + len(names))
        counts[0] = len(clip_ids)
        for i in range(0, len(clip_ids), chunk):
            faces = load_faces(store, clip_ids[i : i + chunk], size).astype(np.float64)
            sums[0] += faces.sum(0)
            if names:
                np.add.at(sums, group[i : i + chunk], faces)
        means = sums / np.maximum(counts, 1)[:, None, None, None] / 255.0
        return cls(kind, attributes, torch.from_numpy(means).float().permute(0, 3, 1, 2), names, counts)

    def mu(self, groups, size=None, resize=None) -> torch.Tensor:
        """(B, 3, s, s) mean faces of rows `groups`; at another size through `resize` (imagen.resize_to)."""
        m = self.means[torch.as_tensor(np.asarray(groups), dtype=torch.long)]
        if exists(size) and size != self.size:
            m = resize(m, size)
        return m

    def to_model(self, images, groups, resize=None) -> torch.Tensor:
        """Faces (B, 3, s, s) in [0, 1] -> imagen's [0, 1]: gain (x - mu) + 1/2, clipped."""
        mu = self.mu(groups, images.shape[-1], resize).to(images.device)
        return (self.gain * (images - mu) + 0.5).clamp(0, 1)

    def from_model(self, m, groups, resize=None) -> torch.Tensor:
        """imagen's output (B, 3, s, s) in [0, 1] -> faces: mu + (m - 1/2) / gain, clipped to [0, 1]."""
        mu = self.mu(groups, m.shape[-1], resize).to(m.device)
        return (mu + (m - 0.5) / self.gain).clamp(0, 1)

    def clipped_share(self, images, groups, resize=None) -> float:
        """Share of the pixels of faces (B, 3, s, s) whose residual leaves imagen's range at this gain."""
        mu = self.mu(groups, images.shape[-1], resize).to(images.device)
        return float(((self.gain * (images - mu)).abs() > 0.5).float().mean())

    def state(self) -> dict:
        """Plain data and tensors for the checkpoint (torch.load(weights_only=True) reads it)."""
        return {
            "kind": self.kind,
            "attributes": self.attributes,
            "means": self.means.clone(),
            "keys": self.keys,
            "counts": self.counts,
            "gain": self.gain,
        }

    @classmethod
    def from_state(cls, d: dict) -> FacePrior:
        # a checkpoint without a gain was trained on (x - mu) / 2 + 1/2
        return cls(d["kind"], d["attributes"], d["means"], d["keys"], d["counts"], d.get("gain", 0.5))
