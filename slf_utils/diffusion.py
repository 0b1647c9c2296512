"""The conditional diffusion model (imagen-pytorch 2.1.0): presets, training (notebook 03), loading and sampling.

* Generation: `Imagen(unets, image_sizes)` sampled from noise. Super-resolution: a `NullUnet` stands for the 8x8
  guide, the real unets are trained, and sampling starts at unet 2 from the guide.
* imagen-pytorch trains in continuous time: `timesteps` only sets how many steps sampling takes, so `sample(steps=)`
  changes it per call without retraining.
* Checkpoints hold state dicts and plain Python data only (`torch.load(weights_only=True)` reads them).
* Multi-GPU: ImagenTrainer is built on Accelerate, so `accelerate launch -m slf_utils.diffusion train PARAMS SYSTEM
  --unet N` runs the same code on every GPU (one unet per launch: ImagenTrainer allows one trainer per process when
  distributed). Each process draws its own batches, so the effective batch is batch_size x processes. Processes on
  CPUs (gloo): `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...` (`--cpu --num_processes N`
  starts a single process unless given an mpirun hostfile); tests/e2e/test_distributed.py checks the all-reduce.
* Model options (preset keys, overridable per grid, per system in systems.yaml and per grid system_overrides):
  `face_prior` (the model learns the residual from a mean face: FacePrior) and `latent` (the unets run on the latents
  of a small autoencoder, slf_utils.autoencoder; generation only).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import shutil
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import imagen_pytorch.imagen_pytorch as ip
import numpy as np
import pandas as pd
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from einops import rearrange
from imagen_pytorch import Imagen, ImagenTrainer, NullUnet, Unet
from tqdm.auto import tqdm

from slf_utils import autoencoder
from slf_utils.basics import (
    ParamsError,
    _get,
    atomic_save_npz,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    deep_merge,
    exists,
    params_hash,
    provenance,
    read_yaml,
    resolve,
)
from slf_utils.config import system_dir
from slf_utils.folds import fold_stage, n_folds, training_ids
from slf_utils.layout import Layout, System, load_layout, load_systems
from slf_utils.store import open_store

CHECKPOINT = "checkpoint.pt"
FORMAT = "slf-imagen/1"
PRESET_KEYS = {
    "unets",
    "unet_common",
    "generation",
    "super_resolution",
    "text_embed_dim",
    "timesteps",
    "resize_mode",
    "imagen",
    "trainer",
    "cond_drop_prob",
    "lowres_aug_range",
    "lowres_sample_noise_level",
    "face_prior",
    "face_prior_attributes",
    "latent",
    "name",
}
FACE_PRIORS = ("none", "mean", "attribute_mean")
# model.trainer.precision: auto (bf16 mixed precision where the device has it, else fp32), fp32, bf16 or fp16
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# model.trainer.compile auto: a CPU training compiles its unet from this many steps on (diffusion.compiles)
AUTO_COMPILE_STEPS = 2000
PRIOR_ATTRIBUTES = ("gender", "ethnicity", "age", "language")  # clip labels; age in decades
CACHE_BYTES = 8 * 2**30  # above this, training batches are read from the store per step instead of precomputed


# ---------------------------------------------------------------------- presets and model
def load_presets(path=None) -> dict:
    return read_yaml(resolve(path or "params/presets.yaml"))


def resolve_preset(model_cfg: dict) -> dict:
    """The grid file's `model` section -> a full preset: `preset` names one of presets.yaml (or `presets_file`),
    every other key overrides it."""
    model_cfg = dict(model_cfg or {})
    name = model_cfg.pop("preset", "demo")
    path = resolve(model_cfg.pop("presets_file", "params/presets.yaml"))
    presets = load_presets(path)
    if name not in presets:
        raise ParamsError(f"{path}: no preset '{name}' (presets: {', '.join(presets)})")
    preset = deep_merge(presets[name], model_cfg)
    preset["name"] = name
    unknown = set(preset) - PRESET_KEYS
    if unknown:
        raise ParamsError(
            f"{path}: model/preset '{name}': unknown key(s) {sorted(unknown)} (known: {', '.join(sorted(PRESET_KEYS))})"
        )
    lo_hi = preset.setdefault("lowres_aug_range", [0.0, 1.0])
    if not (
        isinstance(lo_hi, (list, tuple))
        and len(lo_hi) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in lo_hi)
        and 0 <= lo_hi[0] <= lo_hi[1] <= 1
    ):
        raise ParamsError(
            f"{path}: model/preset '{name}': lowres_aug_range must be [low, high] with 0 <= low <= high <= 1, "
            f"got {lo_hi!r}"
        )
    level = preset.setdefault("lowres_sample_noise_level", 0.2)
    if not (isinstance(level, (int, float)) and not isinstance(level, bool) and 0 <= level <= 1):
        raise ParamsError(
            f"{path}: model/preset '{name}': lowres_sample_noise_level must be a number in [0, 1], got {level!r}"
        )
    _check_model_options(preset, f"{path}: model/preset '{name}'")
    return preset


def _check_model_options(preset: dict, where: str):
    """face_prior, face_prior_attributes and latent (absent keys mean none / pixel diffusion: presets and checkpoints
    written before these options existed stay valid and resumable)."""
    prior = preset.get("face_prior", "none")
    if prior not in FACE_PRIORS:
        raise ParamsError(f"{where}: model.face_prior must be one of {', '.join(FACE_PRIORS)}, got {prior!r}")
    attrs = preset.get("face_prior_attributes", ["gender", "ethnicity"])
    if not (
        isinstance(attrs, list)
        and attrs
        and len(set(attrs)) == len(attrs)
        and all(a in PRIOR_ATTRIBUTES for a in attrs)
    ):
        raise ParamsError(
            f"{where}: model.face_prior_attributes must be a non-empty list of distinct clip labels among "
            f"{', '.join(PRIOR_ATTRIBUTES)}, got {attrs!r}"
        )
    trainer = preset.get("trainer", {})
    precision = trainer.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise ParamsError(f"{where}: model.trainer.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    compile_ = trainer.get("compile", False)
    if not (isinstance(compile_, bool) or compile_ == "auto"):
        raise ParamsError(f"{where}: model.trainer.compile must be false, true or auto, got {compile_!r}")
    if not isinstance(trainer.get("channels_last", False), bool):
        raise ParamsError(
            f"{where}: model.trainer.channels_last must be true or false, got {trainer['channels_last']!r}"
        )
    if trainer.get("foreach") and trainer.get("fused"):
        raise ParamsError(f"{where}: model.trainer: Adam runs foreach or fused, not both: set one of them to false")
    if preset.get("latent") is None:
        return
    preset["latent"] = latent = autoencoder.check_config(preset["latent"], f"{where}: model.latent")
    if prior != "none":
        raise ParamsError(
            f"{where}: model.face_prior {prior!r} with model.latent: the face prior is a pixel-space residual; "
            "use one or the other"
        )
    sizes = preset.get("generation", {}).get("image_sizes", [])
    bad = [s for s in sizes if s % latent["downsample"] or s // latent["downsample"] < 4]
    if bad:
        raise ParamsError(
            f"{where}: model.latent.downsample {latent['downsample']} must divide every generation image size into "
            f"latents of at least 4 x 4, got image_sizes {sizes}"
        )


class _RangedTimes(ip.GaussianDiffusionContinuousTimes):
    """The low-res noise schedule with its training draw restricted to [low, high] of the schedule. imagen-pytorch
    draws the guide's noise-augmentation level uniformly over the whole schedule (0..1): at 8x8, most batches then
    see a guide drowned in noise and a super-resolution model learns to ignore it (issue 10: guide top-1 0.07 with
    the full range, 1.00 with [0, 0.2])."""

    def __init__(self, *, noise_schedule, low, high):
        super().__init__(noise_schedule=noise_schedule)
        self.low, self.high = float(low), float(high)

    def sample_random_times(self, batch_size, *, device):
        return torch.zeros((batch_size,), device=device).float().uniform_(self.low, self.high)


def build_imagen(mode: str, preset: dict) -> Imagen:
    """An untrained Imagen cascade. mode: `generation` (unets at preset.generation.image_sizes) or
    `super_resolution` (NullUnet at the guide size + unets at the larger preset.super_resolution.image_sizes)."""
    if mode not in ("generation", "super_resolution"):
        raise ValueError(f"build_imagen: mode must be generation or super_resolution, got {mode!r}")
    sizes = tuple(preset[mode]["image_sizes"])
    latent, channels = preset.get("latent"), {}
    if latent:
        # the unets run on latents: image sizes / downsample, latent channels; sample() decodes the output
        if mode != "generation":
            raise ParamsError(
                f"preset '{preset.get('name')}': model.latent: latent diffusion is generation only (a super-resolution "
                f"system's guide conditioning in latent space is out of scope), got a {mode} system"
            )
        sizes = tuple(s // latent["downsample"] for s in sizes)
        channels = {"channels": latent["channels"]}
    unets = [
        Unet(**{**preset.get("unet_common", {}), **u, "text_embed_dim": preset["text_embed_dim"]})
        for u in preset["unets"]
    ]
    if mode == "super_resolution":
        unets = [NullUnet(), *unets]
    if len(unets) != len(sizes):
        raise ValueError(
            f"preset '{preset.get('name')}': {mode} needs one image size per unet"
            f"{' (plus the guide size)' if mode == 'super_resolution' else ''}: {len(unets)} unet(s), "
            f"image_sizes {list(sizes)}"
        )
    imagen = Imagen(
        unets=unets,
        image_sizes=sizes,
        text_embed_dim=preset["text_embed_dim"],
        timesteps=preset.get("timesteps", 1000),
        cond_drop_prob=preset.get("cond_drop_prob", 0.1),
        resize_mode=preset.get("resize_mode", "nearest"),
        lowres_sample_noise_level=float(preset.get("lowres_sample_noise_level", 0.2)),
        **channels,
        **preset.get("imagen", {}),
    )
    low, high = preset.get("lowres_aug_range", (0.0, 1.0))
    if (low, high) != (0, 1):
        imagen.lowres_noise_schedule = _RangedTimes(
            noise_schedule=preset.get("imagen", {}).get("lowres_noise_schedule", "linear"), low=low, high=high
        )
    return imagen


def mode_of(imagen: Imagen) -> str:
    return "super_resolution" if isinstance(imagen.unets[0], NullUnet) else "generation"


def trained_unets(imagen: Imagen) -> list[int]:
    """Unet numbers (1-based) that are real unets: SR 2..n, generation 1..n."""
    return [i + 1 for i, u in enumerate(imagen.unets) if not isinstance(u, NullUnet)]


def training_precision(requested: str = "fp32") -> str:
    """model.trainer.precision -> what trains: `auto` is bf16 mixed precision on a CUDA device that supports it
    (Ampere and later: about twice the matmul rate of fp32 on tensor cores, the same exponent range, no loss
    scaling) and fp32 elsewhere - on a CPU bf16 autocast gains little (README: which to use where), so it is used
    there only when asked. ImagenTrainer trains on CUDA when there is one unless ACCELERATE_USE_CPU is set."""
    if requested != "auto":
        return requested
    on_cuda = torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")
    return "bf16" if on_cuda and torch.cuda.is_bf16_supported() else "fp32"


def trainer_options(preset: dict) -> dict:
    """The preset's ImagenTrainer arguments, its precision resolved (Accelerate's mixed_precision; fp32 = none) and
    the workbook's own speed levers (compile, channels_last: make_trainer applies them) left out."""
    opts = {k: v for k, v in preset.get("trainer", {}).items() if k not in ("compile", "channels_last")}
    precision = training_precision(opts.pop("precision", "fp32"))
    return opts | ({} if precision == "fp32" else {"precision": precision})


def make_trainer(imagen, k: int, preset: dict, t_cfg: dict) -> ImagenTrainer:
    """The ImagenTrainer of unet k as training runs it (benchmarks/train_speed.py times this one): the preset's
    trainer options (model.trainer), train.lr, train.ema, the learning-rate schedule, and the speed levers
    model.trainer.channels_last and model.trainer.compile."""
    # train.lr_schedule cosine: the learning rate decays to 0 over train.steps; a constant rate leaves the last
    # weights as noisy as the last batches (on the demo, recall moved by +-0.05 between checkpoints)
    schedule = {"cosine_decay_max_steps": int(t_cfg["steps"])} if t_cfg["lr_schedule"] == "cosine" else {}
    warmup = int(t_cfg["warmup_steps"])
    options = trainer_options(preset)
    _allow_precision(options)
    unet = imagen.unets[k - 1]
    if preset.get("trainer", {}).get("channels_last", False):
        unet.to(memory_format=torch.channels_last)
    trainer = ImagenTrainer(
        imagen,
        only_train_unet_number=k,
        use_ema=bool(t_cfg["ema"]),
        lr=float(t_cfg["lr"]),
        verbose=False,
        **schedule,
        **({"warmup_steps": warmup} if warmup else {}),
        **options,
    )
    if compiles(preset.get("trainer", {}).get("compile", False), trainer.device, int(t_cfg["steps"])):
        _compile_unet(unet)
    return trainer


def compiles(requested, device, steps: int) -> bool:
    """model.trainer.compile -> whether the unet is compiled. `auto`: on a CUDA device, and on a CPU with a C++
    compiler (inductor writes C++ there) for a training of at least AUTO_COMPILE_STEPS steps. Measured on the demo's
    unets (benchmarks/train_speed.py, a loaded machine): a compiled CPU step takes ~0.55x an eager one, after a
    first step that compiles for minutes with an empty inductor cache and ~20 s with a filled one; so a compiled
    training with an empty cache pays back after ~3,000 steps, with a filled one after a few hundred."""
    if requested is False:
        return False
    if torch.device(device).type == "cuda":
        return True
    import torch._inductor.config as inductor  # only here: importing inductor takes a while

    compilers = [c for c in inductor.cpp.cxx if c]
    if requested is True and not any(shutil.which(c) for c in compilers):
        raise RuntimeError(
            f"model.trainer.compile: true on a CPU needs a C++ compiler (inductor writes C++; none of {compilers} "
            "found): install one (g++), or set compile: auto, which trains eager without one"
        )
    return requested is True or (steps >= AUTO_COMPILE_STEPS and any(shutil.which(c) for c in compilers))


def _compile_unet(unet):
    """torch.compile (inductor) of a unet's forward. imagen-pytorch calls `unet.forward` directly (p_losses), so the
    instance's forward is replaced rather than the module wrapped: state-dict keys, checkpoints and Accelerate's
    wrappers stay as they are with eager. fallback_random: random draws inside the unet (the cond-drop mask) come
    from torch's generator as in eager, so a compiled run draws what the eager run draws."""
    # einops registers a backend per tensor type on first use and the compiled graph is guarded on that registry:
    # register tensors and parameters now, or the first eager use after the first compiled call recompiles it all
    for t in (torch.zeros(1), torch.nn.Parameter(torch.zeros(1))):
        rearrange(t, "a -> a")
    unet.forward = torch.compile(unet.forward, options={"fallback_random": True})


def _allow_precision(options: dict):
    """Accelerate keeps one mixed-precision setting per process (AcceleratorState) and refuses a trainer with another
    one: two systems of different precision trained from one notebook, or a benchmark of both. A lone process
    forgets the old setting; launched processes keep theirs."""
    from accelerate.state import AcceleratorState

    held = AcceleratorState._shared_state.get("_mixed_precision")
    if exists(held) and held != options.get("precision", "no") and _processes().num_processes == 1:
        AcceleratorState._reset_state()


# ---------------------------------------------------------------------- data
def load_faces(store, clip_ids, size: int, chunk: int = 1024) -> np.ndarray:
    """(N, size, size, 3) uint8 training/evaluation faces: the store's preprocessed crops (stage `preprocess`, key
    `face`), only resized - never cropped again, so training and evaluation see the same crop."""
    from slf_utils.preprocessing import resize

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


# ---------------------------------------------------------------------- checkpoints
def _save(path, obj):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(model_dir) -> dict:
    return torch.load(Path(model_dir) / CHECKPOINT, map_location="cpu", weights_only=True)


def _cpu_state(module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _ema_weights(ema_state: dict) -> dict:
    """The averaged unet's weights out of an ema_pytorch.EMA state dict."""
    return {k.removeprefix("ema_model."): v for k, v in ema_state.items() if k.startswith("ema_model.")}


def _processes() -> PartialState:
    """This process's place among the launched ones. `accelerate launch` marks CPU processes with ACCELERATE_USE_CPU,
    which only `Accelerator` reads: a bare `PartialState()` made first (as train() does, before ImagenTrainer) fixes
    the shared state without it, and on a machine without GPUs every process then trains alone as rank 0 of 1,
    ungrouped, all writing the same checkpoint. Passing the flag on makes them join one gloo process group."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


# ---------------------------------------------------------------------- training
def system_model(cfg, system) -> dict:
    """The `model` section a system trains with: the grid's `model`, then the system's own `model` options in
    systems.yaml (e.g. face_prior: mean for full_input_prior), then the grid's system_overrides.<system>.model:
    the most specific wins."""
    return deep_merge(deep_merge(cfg["model"], getattr(system, "model", None) or {}), _override_model(cfg, system))


# the stages a trained encoder writes, and the parameter sections that encoder is trained with
ENCODER_SECTIONS = {
    "voice_face_embedding": ("speech2face.voice_encoder", "crossfit"),
    "contrastive_speech": ("contrastive", "crossfit"),
}


def _flat(d, prefix: str) -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    return {k: v for key, val in d.items() for k, v in _flat(val, f"{prefix}.{key}").items()}


@dataclass(frozen=True)
class Recipe:
    """One system resolved from a grid file and validated once (resolve_recipe): what training, evaluation and the
    benchmarks take as it is. `preset`: the model preset with the system's own options and the grid's
    system_overrides; `train`: the training settings (`train`, or `face_decoder` for a direct decoder) with the
    system's overrides; `fold`: the identity fold it is trained without (data.identity_folds), None in the closed set.
    `flat()` is everything the system is made from as dotted keys, `hash` its digest: two systems' recipes differ
    exactly where the systems do (report.differences lists it), and any training setting changes the hash while an
    evaluation setting does not."""

    name: str
    system: System
    layout: Layout
    preset: dict | None
    train: dict
    fold: int | None = None
    cfg: dict = field(default=None, repr=False, compare=False)  # the grid's data and encoder sections, for reads

    @property
    def mode(self) -> str:
        return self.system.mode

    @property
    def seed(self) -> int:
        return int(self.train.get("seed", 0))

    @property
    def trained(self) -> bool:
        return self.mode not in ("none", "reference")

    @property
    def who(self) -> str:
        """The model this recipe makes, in messages: the system and its identity fold."""
        return self.name if self.fold is None else f"{self.name} (identity fold {self.fold})"

    def flat(self) -> dict:
        out = {"mode": self.mode, "decoder": self.system.decoder}
        if not self.trained:
            return out
        stages, keep = self.layout.stages(self.system.keep), ", ".join(self.layout.expand(self.system.keep))
        out |= {
            "keep": keep,
            "stages": ", ".join(stages),
            # what it is trained from: a diffusion model its kept constituents, a direct decoder its train_on (so
            # two decoders trained and fed alike differ in the decoder alone)
            "train_on": keep if self.system.train_on is None else ", ".join(self.layout.expand(self.system.train_on)),
        }
        for stage in self.layout.system_stages(self.system):  # the encoders of its training inputs too
            for section in ENCODER_SECTIONS.get(stage, ()):
                out |= _flat(_get(self.cfg, section), f"encoder.{stage}.{section}")
        out |= _flat({"face_prior": "none", "latent": None} | self.preset, "model")
        out |= _flat(self.train, "face_decoder" if self.system.decoder == "direct" else "train")
        if self.fold is not None:
            out |= {"fold": self.fold} | _flat(self.cfg["data"]["identity_folds"], "data.identity_folds")
        return out

    @property
    def hash(self) -> str:
        return params_hash(self.flat())


def resolve_recipe(cfg, system_name: str, fold: int | None = None) -> Recipe:
    """The Recipe of a system of the grid `cfg` (for identity fold `fold`), refused with the reason where the
    system's options do not fit together or do not fit the grid. A fold's recipe reads the trained encoders' stages
    from that fold's copies (folds.fold_stage: nested cross-fitting, none of their encoders saw the fold)."""
    layout = load_layout(cfg)
    if fold is not None and n_folds(cfg):
        layout = layout.with_stages({s: fold_stage(s, fold) for s in ENCODER_SECTIONS})
    systems = load_systems(cfg["systems_file"], layout)
    if system_name not in systems:
        raise ParamsError(f"{cfg['systems_file']}: no system '{system_name}' (systems: {', '.join(systems)})")
    system = systems[system_name]
    scfg = deep_merge(cfg, (cfg.get("system_overrides") or {}).get(system_name) or {})
    section = "face_decoder" if system.decoder == "direct" else "train"
    if system.mode in ("none", "reference"):
        return Recipe(system_name, system, layout, None, {}, fold, cfg)
    preset = resolve_preset(system_model(cfg, system))
    if system.decoder != "direct":
        preset["cond_drop_prob"] = float(scfg["train"]["cond_drop_prob"])
    if preset.get("latent") and system.mode != "generation":
        raise ParamsError(
            f"{system_name}: model.latent: latent diffusion is generation only (a super-resolution system's guide "
            f"conditioning in latent space is out of scope), and {system_name} is a {system.mode} system"
        )
    # e.g. a demo-scale model option of systems.yaml in a 128 px grid: its faces would not match the gallery's
    grid_model = deep_merge(cfg["model"], _override_model(cfg, system))
    out_size, grid_size = (
        preset[system.mode]["image_sizes"][-1],
        resolve_preset(grid_model)[system.mode]["image_sizes"][-1],
    )
    if out_size != grid_size:
        raise ParamsError(
            f"{system_name}: its model options ({cfg['systems_file']}: model {system.model}) make {out_size} px faces, "
            f"the grid's model {grid_size} px: set system_overrides.{system_name}.model in the grid file"
        )
    return Recipe(system_name, system, layout, preset, dict(scfg[section]), fold, cfg)


def _override_model(cfg, system) -> dict:
    return ((cfg.get("system_overrides") or {}).get(system.name) or {}).get("model") or {}


def train(cfg, system_name, out_dir=None, unets=None) -> dict:
    """Train one system (notebook 03) into `out_dir` (default results/<name>/<system>/model): one ImagenTrainer
    per unet, resuming from checkpoint.pt where present. `unets`: unet numbers to train (default all). With identity
    folds (data.identity_folds: unseen speakers) one model per fold in `fold<k>/`, each trained on the other folds'
    identities; the result is the last fold's, with every fold's under `folds`."""
    out = Path(out_dir) if exists(out_dir) else system_dir(cfg, system_name) / "model"
    if not n_folds(cfg):
        return _train(cfg, system_name, out, unets, None)
    folds = [_train(cfg, system_name, out / f"fold{k}", unets, k) for k in range(n_folds(cfg))]
    return {**folds[-1], "folds": folds}


@dataclass
class TrainingSet:
    """What a recipe trains on (training_set): the clips, their normalisation statistics, the batches, and `encode`,
    the transform of a batch's faces into what the unets learn (face-prior residuals or latents; None: the faces)."""

    ids: list
    stats: dict
    batches: _Batches
    prior: FacePrior | None = None
    encode: object = None
    latent_info: dict | None = None


def training_set(r: Recipe, store, out: Path, ck: dict | None = None) -> TrainingSet:
    """The TrainingSet of recipe `r`: its training clips (the train split, or its fold's, with a face and every stage
    its constituents need), the normalisation fitted on them (or, resumed, the one saved in `out`), the face prior or
    the latent autoencoder (trained into `out`) where the model options ask for one."""
    ids = train_clip_ids(store, r.layout, r.system.keep, r.cfg, r.fold, r.who)
    if not ids:
        raise ValueError(
            f"{r.name}: no training clips with {['preprocess', *r.layout.stages(r.system.keep)]} done in {store.root}"
        )
    stats_path = out / "norm_stats.npz"
    if ck is not None and stats_path.exists():  # a resumed model keeps the normalisation it was trained with
        with np.load(stats_path) as z:
            stats = {k: z[k] for k in z.files}
    else:
        stats = r.layout.fit(store, ids, r.system.keep)
        atomic_save_npz(stats_path, **stats)
    size = max(r.preset[r.mode]["image_sizes"])
    data = TrainingSet(ids, stats, _Batches(store, r.layout, r.system.keep, stats, ids, size))
    if r.preset.get("face_prior", "none") != "none":
        if ck is not None and "face_prior" in ck:  # a resumed model keeps its mean faces
            data.prior = FacePrior.from_state(ck["face_prior"])
        else:
            attrs = r.preset.get("face_prior_attributes", ["gender", "ethnicity"])
            data.prior = FacePrior.fit(r.preset["face_prior"], attrs, store, ids, size)
        groups = data.prior.groups_of(store.clips().set_index("clip_id").loc[ids].reset_index())

        def encode_prior(images, index):
            return data.prior.to_model(images, groups[index])

        data.encode = encode_prior
    if r.preset.get("latent"):
        ae_path = out / autoencoder.FILE
        if ck is not None and ck["steps"] and not ae_path.exists():
            raise FileNotFoundError(
                f"{ae_path}: the unets of {out / CHECKPOINT} were trained on its latents, and it is gone"
            )
        if _processes().num_processes > 1 and not autoencoder.is_finished(ae_path):
            raise RuntimeError(
                f"{r.name}: train the autoencoder in one process first: python -m slf_utils.diffusion train "
                f"PARAMS {r.name} --autoencoder-only"
            )
        faces = load_faces(store, ids, size)
        codec, data.latent_info = autoencoder.train(
            faces,
            r.preset["latent"],
            ae_path,
            data_key=params_hash({"clips": ids, "size": size}),
            checkpoint_every=int(r.train["checkpoint_every"]),
        )
        latents = codec.encode_faces(faces)  # posterior means of every training face, once
        del faces

        def encode_latent(images, index):
            return latents[torch.as_tensor(index)]

        data.encode = encode_latent
    return data


def _train(cfg, system_name, out: Path, unets, fold) -> dict:
    """Train one model of a system (one fold's, with identity folds) into `out`: resolve its recipe, build its
    training set, build the cascade (seeded), resume, train each unet, write the provenance."""
    r = resolve_recipe(cfg, system_name, fold)
    if not r.trained:
        return {"system": system_name, "mode": "none", "model_dir": None, "trained": False}
    system, layout, preset, t_cfg = r.system, r.layout, r.preset, r.train
    store = open_store(cfg)
    ck_path = out / CHECKPOINT
    ck = load_checkpoint(out) if ck_path.exists() else None
    if ck is not None:
        _check_resume(ck, system, preset, layout, ck_path)
    # the prior or the autoencoder before the seed below: the autoencoder seeds its own training
    data = training_set(r, store, out, ck)
    ids, prior, latent_info = data.ids, data.prior, data.latent_info

    torch.manual_seed(int(t_cfg["seed"]))  # the initial weights too are a function of the seed
    imagen = build_imagen(system.mode, preset)
    if ck is not None:
        for k, sd in ck["unets"].items():
            imagen.unets[int(k) - 1].load_state_dict(sd)
    to_train = list(unets) if exists(unets) else trained_unets(imagen)
    bad = [k for k in to_train if k not in trained_unets(imagen)]
    if bad:
        raise ValueError(f"{system_name}: unet(s) {bad} cannot be trained (trainable: {trained_unets(imagen)})")
    if _processes().num_processes > 1 and len(to_train) > 1:
        # ImagenTrainer allows a single trainer per process when distributed
        raise RuntimeError(
            f"{system_name}: distributed training trains one unet per launch: "
            f"accelerate launch -m slf_utils.diffusion train PARAMS {system_name} --unet N "
            f"for N in {to_train}, one after the other"
        )

    state = ck or {
        "format": FORMAT,
        "system": system_name,
        "mode": system.mode,
        "keep": list(system.keep),
        "preset": preset,
        "layout_hash": layout.hash,
        "seed": int(t_cfg["seed"]),
        "steps": {},
        "unets": {},
        "ema": {},
        "optim": {},
    }
    if prior is not None:
        state.setdefault("face_prior", prior.state())
    records = _read_losses(out, state["steps"])
    timing = {}
    for k in to_train:
        timing[k] = _train_unet(imagen, k, r, data, state, records, out)
    if _processes().is_main_process:
        _write_losses(out, records)
    info = {
        "system": system_name,
        "title": system.title,
        "mode": system.mode,
        "keep": list(system.keep),
        "paper_no": system.paper_no,
        "preset_name": preset["name"],
        "preset": preset,
        "seed": int(t_cfg["seed"]),
        "train": dict(t_cfg),
        "recipe_hash": r.hash,  # everything the model is made from (Recipe.flat), the data aside
        "params_file": cfg.get("params_file"),
        "layout_hash": layout.hash,
        # fold: data.identity_folds, trained without that fold's identities (None: the closed set's train split)
        "split": {"train_clips": len(ids), "train_ids_hash": params_hash(ids), "store": str(store.root), "fold": fold},
        "steps": {str(k): v for k, v in state["steps"].items()},
        "seconds_per_step": {str(k): t["seconds_per_step"] for k, t in timing.items()},
        "data_wait_share": {str(k): t["data_wait_share"] for k, t in timing.items()},
        "device": next((t["device"] for t in timing.values()), None),
        # requested (model.trainer.precision) and used: auto is bf16 or fp32 by the device
        "precision": {
            "requested": preset.get("trainer", {}).get("precision", "fp32"),
            "used": next((t["precision"] for t in timing.values()), None),
        },
        "compiled": any(t["compiled"] for t in timing.values()),  # model.trainer.compile resolved
        "processes": _processes().num_processes,  # the effective batch is batch_size x processes
        "batch_cache": "precomputed" if data.batches.cached else "per-step store reads",
        "face_prior": None
        if prior is None
        else {"kind": prior.kind, "attributes": prior.attributes, "groups": dict(zip(prior.keys, prior.counts[1:]))},
        "latent": latent_info,
    }
    if _processes().is_main_process:
        atomic_write_json(out / "provenance.json", provenance(info))
        fig = plot_loss(out)
        atomic_write(out / "loss.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return {
        **info,
        "model_dir": str(out),
        "checkpoint_bytes": ck_path.stat().st_size if ck_path.exists() else 0,
        "final_loss": _final_losses(records),
    }


def _check_resume(ck, system, preset, layout, path):
    if ck.get("format") != FORMAT:
        raise ValueError(f"{path}: not a checkpoint of this workbook (format {ck.get('format')!r})")
    mismatch = [
        k
        for k, a, b in (
            ("system", ck["system"], system.name),
            ("mode", ck["mode"], system.mode),
            ("keep", list(ck["keep"]), list(system.keep)),
            ("preset", _learned(ck["preset"]), _learned(preset)),
            ("layout", ck["layout_hash"], layout.hash),
        )
        if a != b
    ]
    if mismatch:
        raise ValueError(
            f"{path}: the checkpoint was trained with a different {', '.join(mismatch)}; "
            "train into another results folder or delete this model folder to start over"
        )


def _learned(preset: dict) -> dict:
    """The preset less the speed levers, which change how fast a model trains, not what it learns: a checkpoint
    trained eager resumes compiled and back."""
    trainer = {k: v for k, v in preset.get("trainer", {}).items() if k not in ("compile", "channels_last")}
    return {**preset, "trainer": trainer}


def _train_unet(imagen, k, r: Recipe, data: TrainingSet, state, records, out) -> dict:
    """Train unet k of recipe `r` on `data` (data.encode: what the unet learns instead of the batch's faces)."""
    layout, system, preset, t_cfg, batches, encode = r.layout, r.system, r.preset, r.train, data.batches, data.encode
    steps, bsz = int(t_cfg["steps"]), int(t_cfg["batch_size"])
    accum, every, seed = max(1, int(t_cfg.get("grad_accum", 1))), int(t_cfg["checkpoint_every"]), int(t_cfg["seed"])
    p_drop, noise_sd = float(t_cfg["attribute_dropout"]), float(t_cfg["feature_noise"])
    droppable = [n for n in layout.dropout_constituents if n in system.keep] if p_drop > 0 else []
    trainer = make_trainer(imagen, k, preset, t_cfg)
    key = str(k)
    start = int(state["steps"].get(key, 0))
    if key in state["optim"]:
        getattr(trainer, f"optim{k - 1}").load_state_dict(state["optim"][key])
    for name in (f"scheduler{k - 1}", f"warmup{k - 1}"):
        if exists(getattr(trainer, name, None)) and name in state.get("schedulers", {}).get(key, {}):
            getattr(trainer, name).load_state_dict(state["schedulers"][key][name])
    if t_cfg["lr_schedule"] == "cosine":
        # a run resumed with more steps goes on from the rate it had reached and ends at 0 at its new last step
        # (one that had already decayed to 0 stays there: extend a cosine run before it ends, or start anew)
        getattr(trainer, f"scheduler{k - 1}").T_max = steps
    if trainer.use_ema and key in state["ema"]:
        trainer.ema_unets[k - 1].load_state_dict(state["ema"][key])
    elif trainer.use_ema and start:
        warnings.warn(
            f"unet {k}: resuming with EMA on but the checkpoint has no EMA weights: EMA restarts", stacklevel=2
        )
    rank = trainer.accelerator.process_index
    n = len(batches)
    times = []  # (step seconds, data seconds) of this run
    # only the main process shows a bar; elsewhere tqdm's own default (and TQDM_DISABLE) decides
    bar = tqdm(
        range(start, steps),
        initial=start,
        total=steps,
        desc=f"{system.name} unet {k}",
        **({} if trainer.is_main else {"disable": True}),
    )
    for step in bar:
        t0 = time.perf_counter()
        rng = np.random.default_rng([seed, k, step, rank])  # per-step seeds: a resumed run draws the same batches
        index = rng.choice(n, size=bsz * accum, replace=n < bsz * accum)
        drop = {name: rng.random(len(index)) < p_drop for name in droppable}
        images, X = batches.get(index, drop)
        if encode is not None:
            images = encode(images, index)
        if noise_sd > 0:
            X = _feature_noise(X, noise_sd, rng)
        torch.manual_seed(int(np.random.SeedSequence([seed, k, step, rank]).generate_state(1)[0]))
        t1 = time.perf_counter()
        loss = _loss_step(trainer, images, X, k, bsz)
        if not math.isfinite(loss):
            _write_losses(out, records)
            kept = (
                f"the last good checkpoint ({out / CHECKPOINT}, step {state['steps'][key]}) is kept"
                if key in state["steps"]
                else "no checkpoint was written"
            )
            raise FloatingPointError(
                f"{system.name}: unet {k} loss is {loss} at step {step + 1}; training stopped, "
                f"{kept}. Lower train.lr, set model.trainer.max_grad_norm, or check the "
                "features (norm_stats.npz)."
            )
        trainer.update(unet_number=k)
        t2 = time.perf_counter()
        times.append((t2 - t0, t1 - t0))
        records.append({"unet": k, "step": step + 1, "loss": loss, "seconds": t2 - t0, "data_seconds": t1 - t0})
        bar.set_postfix(loss=f"{loss:.4f}")
        state["steps"][key] = step + 1
        if (step + 1) % every == 0 or step + 1 == steps:
            _checkpoint(trainer, imagen, k, state, out, records)
    t = np.array(times[1:] or times).reshape(-1, 2)  # the first step warms up (allocations, Accelerate)
    return {
        "seconds_per_step": float(np.median(t[:, 0])) if len(t) else None,
        "data_wait_share": float(t[:, 1].sum() / t[:, 0].sum()) if len(t) else None,
        "device": str(trainer.device),
        "precision": {"no": "fp32"}.get(trainer.accelerator.mixed_precision, trainer.accelerator.mixed_precision),
        "compiled": compiles(preset.get("trainer", {}).get("compile", False), trainer.device, steps),
    }


def _feature_noise(X: torch.Tensor, sd: float, rng) -> torch.Tensor:
    """X + N(0, sd^2) on its non-zero entries (zero rows stay zero: imagen-pytorch masks them to the null token).
    The rows are standardised per column, so sd is in units of the training spread. A model sees each training
    clip's features only as they are; test clips of the same speaker differ from them (on the demo, recall 0.75
    from training clips' rows, 0.53 from test clips'): noise makes nearby rows map to the same face."""
    x = X.numpy()
    rows = np.flatnonzero(np.abs(x).sum(-1).reshape(-1) > 0)
    noisy = x.copy()  # the batch buffer is reused: never change it in place
    flat = noisy.reshape(-1, x.shape[-1])
    nz = flat[rows] != 0
    flat[rows] += (rng.standard_normal((len(rows), x.shape[-1])).astype(np.float32) * sd) * nz
    return torch.from_numpy(noisy)


def _loss_step(trainer, images, X, k, micro_batch) -> float:
    """One forward/backward (gradient accumulation over chunks of `micro_batch` inside ImagenTrainer)."""
    return trainer(images, text_embeds=X, unet_number=k, max_batch_size=micro_batch)


def _checkpoint(trainer, imagen, k, state, out, records):
    if not trainer.is_main:
        return
    key = str(k)
    state["unets"] = {str(i): _cpu_state(imagen.unets[i - 1]) for i in trained_unets(imagen)}
    state["optim"][key] = getattr(trainer, f"optim{k - 1}").state_dict()
    state.setdefault("schedulers", {})[key] = {
        name: getattr(trainer, name).state_dict()
        for name in (f"scheduler{k - 1}", f"warmup{k - 1}")
        if exists(getattr(trainer, name, None))
    }
    if trainer.use_ema:
        state["ema"][key] = _cpu_state(trainer.ema_unets[k - 1])
    _save(out / CHECKPOINT, {k2: v for k2, v in state.items() if not k2.startswith("_")})
    _write_losses(out, records)


def _read_losses(out, steps) -> list[dict]:
    """Loss rows of a previous run up to the checkpointed step of each unet (later rows were not kept)."""
    p = Path(out) / "loss.csv"
    if not p.exists() or not steps:
        return []
    df = pd.read_csv(p)
    limit = df["unet"].astype(str).map(lambda u: steps.get(u, 0))
    return df[df["step"] <= limit].to_dict("records")


def _write_losses(out, records):
    cols = ["unet", "step", "loss", "seconds", "data_seconds"]
    atomic_write_text(Path(out) / "loss.csv", pd.DataFrame(records, columns=cols).to_csv(index=False))


def _final_losses(records, last=20) -> dict:
    df = pd.DataFrame(records, columns=["unet", "step", "loss"])
    return {str(u): float(g.sort_values("step")["loss"].tail(last).mean()) for u, g in df.groupby("unet")}


def plot_loss(model_dir, smooth: int = 25):
    """Loss per step (thin) and its running mean over `smooth` steps, one line per unet. Returns the figure."""
    from matplotlib.figure import Figure

    df = pd.read_csv(Path(model_dir) / "loss.csv")
    fig = Figure(figsize=(7, 3.5), layout="constrained")
    ax = fig.add_subplot()
    for i, (u, g) in enumerate(df.groupby("unet")):
        g = g.sort_values("step")
        ax.plot(g["step"], g["loss"], color=f"C{i}", alpha=0.25, lw=0.8)
        ax.plot(g["step"], g["loss"].rolling(smooth, min_periods=1).mean(), color=f"C{i}", label=f"unet {u}")
    ax.set_xlabel("step")
    ax.set_ylabel("diffusion loss")
    ax.set_yscale("log")
    ax.set_title(f"training loss - {Path(model_dir).parent.name}")
    if not df.empty:
        ax.legend()
    return fig


@torch.no_grad()
def evaluate_loss(imagen, images, text_embeds, unet_number, seeds=range(8)) -> float:
    """Mean diffusion loss of a fixed batch over fixed noise draws (`seeds`): a deterministic validation loss,
    comparable between checkpoints. images: (B, 3, S, S) float in [0, 1]."""
    was_training = imagen.training
    imagen.eval()
    losses = []
    with torch.random.fork_rng(devices=[]):
        for s in seeds:
            torch.manual_seed(s)
            losses.append(
                imagen(
                    images.to(imagen.device),
                    text_embeds=torch.as_tensor(text_embeds).to(imagen.device),
                    unet_number=unet_number,
                ).item()
            )
    imagen.train(was_training)
    return float(np.mean(losses))


# ---------------------------------------------------------------------- loading and sampling
def load_model(model_dir, device=None):
    """(imagen, meta) from a model folder: weights_only checkpoint load; EMA weights (if trained with EMA) ride
    along as `imagen.ema_state` for `sample(use_ema=True)`, a face prior as `imagen.face_prior` and a latent
    autoencoder as `imagen.latent_codec` (both used by `sample`). meta: system, mode, keep, preset, steps, stats
    (normalisation statistics for `Layout.build`), face_prior (none, mean, attribute_mean), latent, provenance."""
    model_dir = Path(model_dir)
    ck = load_checkpoint(model_dir)
    imagen = build_imagen(ck["mode"], ck["preset"])
    for k, sd in ck["unets"].items():
        imagen.unets[int(k) - 1].load_state_dict(sd)
    imagen.ema_state = {int(k): _ema_weights(sd) for k, sd in ck.get("ema", {}).items()}
    imagen.face_prior = FacePrior.from_state(ck["face_prior"]) if ck.get("face_prior") else None
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    latent = ck["preset"].get("latent")
    imagen.latent_codec = autoencoder.load(model_dir / autoencoder.FILE, device) if latent else None
    imagen.to(device).eval()
    stats = {}
    if (model_dir / "norm_stats.npz").exists():
        with np.load(model_dir / "norm_stats.npz") as z:
            stats = {k: z[k] for k in z.files}
    prov = model_dir / "provenance.json"
    meta = {
        "system": ck["system"],
        "mode": ck["mode"],
        "keep": list(ck["keep"]),
        "preset": ck["preset"],
        "steps": {int(k): v for k, v in ck["steps"].items()},
        "stats": stats,
        "model_dir": str(model_dir),
        "has_ema": bool(imagen.ema_state),
        "face_prior": ck["preset"].get("face_prior", "none"),
        "latent": latent,
        "provenance": json.loads(prov.read_text()) if prov.exists() else {},
    }
    return imagen, meta


_CFG_MASK = threading.local()
_PROB_MASK_LIKE = ip.prob_mask_like


def _prob_mask_like(shape, prob, device):
    """imagen-pytorch draws its classifier-free-guidance keep mask here; during a batched guidance pass it is
    fixed: first half conditional, second half null."""
    mask = getattr(_CFG_MASK, "mask", None)
    if mask is not None and tuple(shape) == tuple(mask.shape):
        return mask.to(device)
    return _PROB_MASK_LIKE(shape, prob, device)


def _memoised(fn, same):
    """fn(x), recomputed only when x differs from the previous call's input (`same(last, x)` says when not)."""
    last = {}

    def call(x):
        if "x" not in last or not same(last["x"], x):
            last["x"], last["y"] = x, fn(x)
        return last["y"]

    return call


def _same_tensor(a, b):
    # inference tensors (torch.inference_mode) keep no version counter
    return a is b and (a.is_inference() or a._version == b._version)


def _equal_tensor(a, b):
    return a.shape == b.shape and (a is b or torch.equal(a, b))


def _guided_forward(
    unet, x, time_, *, cond_scale=1.0, remove_parallel_component=False, keep_parallel_frac=0.0, _doubled=None, **kwargs
):
    """Classifier-free guidance null + (cond - null) * s with the conditional and null passes in one batch.
    s = 1: conditional only; s = 0: null only (the feature rows are ignored exactly). In a pass of several scales
    (_ROWS.scales: one scale per row) each row gets its own s."""
    scales = getattr(_ROWS, "scales", None)
    if scales is not None and len(scales) == len(x):
        return _rowwise_guided_forward(unet, x, time_, scales, _doubled, **kwargs)
    if cond_scale == 1:
        return unet.forward(x, time_, **kwargs)
    if cond_scale == 0:
        return unet.forward(x, time_, cond_drop_prob=1.0, **kwargs)
    b = x.shape[0]

    def twice(t):
        return torch.cat((t, t)) if torch.is_tensor(t) and t.ndim and t.shape[0] == b else t

    def twice_kw(k, v):  # the feature rows, guide and noise level are the same tensors at every step: double once
        if _doubled is None or not torch.is_tensor(v):
            return twice(v)
        if k not in _doubled or not _same_tensor(_doubled[k][0], v):
            _doubled[k] = (v, twice(v))
        return _doubled[k][1]

    _CFG_MASK.mask = torch.cat((torch.ones(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)))
    try:
        out = unet.forward(twice(x), twice(time_), cond_drop_prob=0.5, **{k: twice_kw(k, v) for k, v in kwargs.items()})
    finally:
        _CFG_MASK.mask = None
    cond, null = out[:b], out[b:]
    return null + (cond - null) * cond_scale


_ROWS = threading.local()  # a pass of several scales: .scales (one per row), .noise (_TiledNoise)


def _rowwise_guided_forward(unet, x, time_, scales, _doubled, **kwargs):
    """Guidance with a scale per row: one forward of the conditional rows (s != 0) and the null rows (s != 1), then
    null + (cond - null) * s row by row (s = 1 rows are their conditional output, s = 0 rows their null output,
    exactly, as one call per scale gives them)."""
    cond, null = (scales != 0).nonzero().squeeze(1), (scales != 1).nonzero().squeeze(1)
    n = len(x)

    def pick(t):
        return torch.cat((t[cond], t[null])) if torch.is_tensor(t) and t.ndim and t.shape[0] == n else t

    def pick_kw(k, v):  # the feature rows, guide and noise level are the same tensors at every step: gather once
        if _doubled is None or not torch.is_tensor(v):
            return pick(v)
        if k not in _doubled or not _same_tensor(_doubled[k][0], v):
            _doubled[k] = (v, pick(v))
        return _doubled[k][1]

    _CFG_MASK.mask = torch.cat((torch.ones(len(cond), dtype=torch.bool), torch.zeros(len(null), dtype=torch.bool)))
    try:
        out = unet.forward(pick(x), pick(time_), cond_drop_prob=0.5, **{k: pick_kw(k, v) for k, v in kwargs.items()})
    finally:
        _CFG_MASK.mask = None
    c, u = out.new_zeros((n, *out.shape[1:])), out.new_zeros((n, *out.shape[1:]))
    c[cond], u[null] = out[: len(cond)], out[len(cond) :]
    return u + (c - u) * scales.to(out).view(-1, *[1] * (out.ndim - 1))


class _TiledNoise:
    """imagen-pytorch's `torch` during a pass of several scales: a noise draw for the pass's rows (scales x clips,
    scale-major) is the draw of one call of the whole seeding chunk (`chunk` clips), its rows [lo, hi) taken and
    repeated once per scale. The generator then advances exactly as in one call per scale, so every scale of a clip
    gets the noise that call gives it."""

    def __init__(self, chunk: int, lo: int, hi: int, copies: int):
        self.chunk, self.lo, self.hi, self.copies = chunk, lo, hi, copies

    def __getattr__(self, name):
        return getattr(torch, name)

    def _tile(self, shape, memory_format=torch.contiguous_format, **kw):
        # randn_like fills a tensor in its memory order (a guide is channels-last): draw the chunk in the same layout
        shape = tuple(shape)
        rows = (self.chunk, *shape[1:]) if shape and shape[0] == (self.hi - self.lo) * self.copies else shape
        noise = torch.empty(rows, memory_format=memory_format, **kw).normal_()
        if rows == shape:
            return noise
        return noise[self.lo : self.hi].repeat(self.copies, *[1] * (len(shape) - 1))

    def randn(self, *shape, **kw):
        return self._tile(shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape, **kw)

    def randn_like(self, x):
        return self._tile(x.shape, _layout(x), dtype=x.dtype, device=x.device)


def _layout(x: torch.Tensor):
    """The memory format of an image batch: channels-last or contiguous."""
    cl = x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if cl else torch.contiguous_format


@contextlib.contextmanager
def _rows(scales, noise: _TiledNoise):
    """A pass of several scales: per-row guidance scales and tiled noise draws inside imagen-pytorch."""
    _ROWS.scales, ip.torch = scales, noise
    try:
        yield
    finally:
        _ROWS.scales, ip.torch = None, torch


@contextlib.contextmanager
def _sampling(imagen, steps, use_ema, batched_cfg=True):
    """Temporarily: `steps` sampling steps per unet, EMA weights, batched guidance."""
    saved_steps = [s.num_timesteps for s in imagen.noise_schedulers]
    saved_weights, patched = {}, []
    try:
        if exists(steps):
            for s in imagen.noise_schedulers:
                s.num_timesteps = int(steps)
        if use_ema:
            ema = getattr(imagen, "ema_state", None)
            if not ema:
                raise ValueError("this model has no EMA weights (trained with train.ema: false): use use_ema=False")
            for k, sd in ema.items():
                unet = imagen.unets[k - 1]
                saved_weights[k] = _cpu_state(unet)
                unet.load_state_dict(sd)
        for unet in imagen.unets:
            if not isinstance(unet, Unet):
                continue
            patched.append(unet)
            # the feature-row path (projection, attention pooling over 256 rows) does not depend on the noisy
            # image or the time: compute it once per batch instead of at every denoising step (~2x faster on CPU)
            unet.text_to_cond.forward = _memoised(unet.text_to_cond.forward, _same_tensor)
            if exists(unet.attn_pool):
                unet.attn_pool.forward = _memoised(unet.attn_pool.forward, _equal_tensor)
            if batched_cfg:
                guided = functools.partial(_guided_forward, unet, _doubled={})
                unet.forward_with_cond_scale = guided
        if batched_cfg:
            ip.prob_mask_like = _prob_mask_like
        yield
    finally:
        for s, n in zip(imagen.noise_schedulers, saved_steps):
            s.num_timesteps = n
        for k, sd in saved_weights.items():
            imagen.unets[k - 1].load_state_dict(sd)
        for unet in patched:
            unet.__dict__.pop("forward_with_cond_scale", None)
            unet.text_to_cond.__dict__.pop("forward", None)
            if exists(unet.attn_pool):
                unet.attn_pool.__dict__.pop("forward", None)
        ip.prob_mask_like = _PROB_MASK_LIKE


def sample(
    imagen,
    text_embeds,
    cond_scale,
    guides=None,
    steps=50,
    seed=0,
    use_ema=False,
    lowres_sample_noise_level=None,
    batch_size=64,
    labels=None,
) -> np.ndarray:
    """Faces (B, S, S, 3) uint8 for feature matrices `text_embeds` (B, 256, 768). Super-resolution models start
    from `guides` (B, g, g, 3) uint8, noised to `lowres_sample_noise_level` (None: the preset's). `steps` sampling
    steps per unet (None: the preset's `timesteps`); guidance null + (cond - null) * cond_scale with both passes
    batched. Deterministic for (seed, batch_size). A model with a face prior (`imagen.face_prior`) samples residuals
    and adds the mean face back; under attribute_mean, `labels` (a DataFrame, one row per sample, with the prior's
    attribute columns) pick each sample's mean face. A latent model (`imagen.latent_codec`) samples latents and
    decodes them.

    `cond_scale` a list of scales: faces (len(cond_scale), B, S, S, 3), every scale of a clip in the same pass
    (at most batch_size images a pass), with the noise and so the faces of one call per scale (float noise aside)."""
    mode = mode_of(imagen)
    if mode == "super_resolution" and guides is None:
        raise ValueError("a super-resolution model samples from image guides: pass guides (B, 8, 8, 3) uint8")
    if mode == "generation" and guides is not None:
        raise ValueError("a generation model takes no image guides")
    X = torch.as_tensor(np.asarray(text_embeds, np.float32))
    if guides is not None:
        guides = torch.as_tensor(np.asarray(guides)).permute(0, 3, 1, 2).float().div(255.0)
        if len(guides) != len(X):
            raise ValueError(f"{len(guides)} guides for {len(X)} feature matrices")
    device = imagen.device
    prior, codec = getattr(imagen, "face_prior", None), getattr(imagen, "latent_codec", None)
    groups = prior.groups_of(labels, n=len(X)) if prior is not None else None
    if groups is not None and len(groups) != len(X):
        raise ValueError(f"{len(groups)} label rows for {len(X)} feature matrices")
    many = isinstance(cond_scale, (list, tuple, np.ndarray))
    scales = [float(s) for s in (cond_scale if many else [cond_scale])]
    per_pass = max(1, batch_size // len(scales)) if many else batch_size  # clips per pass
    size = codec.image_size if codec is not None else imagen.image_sizes[-1]
    outs = []
    with _sampling(imagen, steps, use_ema), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i in range(0, len(X), batch_size):  # a seeding chunk: its noise is a function of (seed, i)
            n = min(batch_size, len(X) - i)
            for lo in range(0, n, per_pass):
                hi = min(n, lo + per_pass)
                torch.manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
                rows = slice(i + lo, i + hi)
                if not many:
                    img = _sample_pass(imagen, X[rows], guides, groups, rows, cond_scale, lowres_sample_noise_level)
                else:
                    per_row = torch.tensor(scales).repeat_interleave(hi - lo)
                    with _rows(per_row, _TiledNoise(n, lo, hi, len(scales))):
                        # imagen checks that a scale other than 1 has guidance; the rows' own scales come from _ROWS
                        some = next((s for s in scales if s != 1), 1.0)
                        img = _sample_pass(
                            imagen, X[rows], guides, groups, rows, some, lowres_sample_noise_level, len(scales)
                        )
                faces = (img.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
                outs.append(faces.reshape(len(scales), hi - lo, *faces.shape[1:]))
    out = np.concatenate(outs, axis=1) if outs else np.zeros((len(scales), 0, size, size, 3), np.uint8)
    return out if many else out[0]


def _sample_pass(imagen, X, guides, groups, rows, cond_scale, noise_level, copies=1) -> torch.Tensor:
    """One imagen.sample of the clips `rows` (their feature matrices X), `copies` times over (scale-major: a pass of
    several scales), the face prior and latent decoding undone: (copies x clips, 3, S, S) in [0, 1]."""
    device, prior, codec = imagen.device, getattr(imagen, "face_prior", None), getattr(imagen, "latent_codec", None)
    g = np.tile(groups[rows], copies) if groups is not None else None
    kw = dict(
        text_embeds=(X.repeat(copies, 1, 1) if copies > 1 else X).to(device),
        cond_scale=cond_scale,
        use_tqdm=False,
        lowres_sample_noise_level=noise_level,  # None: Imagen's own (the preset's)
        cfg_remove_parallel_component=False,
    )
    if guides is not None:
        start = guides[rows]
        if copies > 1:  # in the guides' layout (channels-last: they come from (B, g, g, 3)), as a one-scale call has it
            start = start.repeat(copies, 1, 1, 1).contiguous(memory_format=_layout(start))
        start = start.to(device)
        if prior is not None:  # in residual space, as imagen made the low-res condition in training
            start = prior.to_model(start, g, resize=imagen.resize_to)
        kw.update(start_at_unet_number=2, start_image_or_video=start)
    img = imagen.sample(**kw)
    if prior is not None:
        img = prior.from_model(img, g, resize=imagen.resize_to)
    if codec is not None:
        img = codec.from_model(img)
    return img


# ---------------------------------------------------------------------- command line (for accelerate launch)
def main(argv=None):
    from slf_utils.config import load_params

    ap = argparse.ArgumentParser(prog="python -m slf_utils.diffusion", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train one system (as notebook 03 does)")
    t.add_argument("params")
    t.add_argument("system")
    t.add_argument("--unet", type=int, action="append", help="unet number to train (repeatable; default all)")
    t.add_argument("--out", default=None)
    t.add_argument(
        "--autoencoder-only", action="store_true", help="latent models: train the autoencoder only (before a launch)"
    )
    args = ap.parse_args(argv)
    cfg = load_params(args.params)
    result = train(cfg, args.system, out_dir=args.out, unets=[] if args.autoencoder_only else args.unet)
    print(json.dumps({k: result[k] for k in ("system", "model_dir", "steps", "seconds_per_step")}, default=str))


if __name__ == "__main__":
    main()
