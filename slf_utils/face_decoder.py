"""The direct face decoder (systems with `decoder: direct`): Speech2Face's last stage, embedding -> face.

Speech2Face (Oh et al. 2019; the seed project, seeds/speech2face-pytorch-readme.txt) draws a face from a face
embedding with a feed-forward decoder (after Cole et al. 2017) trained on real faces from their TRUE embeddings; its
Speech-to-Face pipeline feeds that same decoder the voice encoder's prediction at test time. Here:

* Input: one stored vector per clip, the system's kept constituent (`face_embedding` or `voice_face_embedding`,
  params/layout.yaml), normalised like the diffusion systems see it (`standard`: per entry, statistics of the
  training split) by the layout itself. The decoder is trained from `train_on` (systems.yaml; default the kept
  constituent); a system fed another constituent (speech_to_face_direct: trained on face_embedding, fed
  voice_face_embedding) normalises its input with the training constituent's statistics, so the decoder sees its
  input in the space it was trained in (the voice encoder scales its predictions to the true embeddings' norm).
* Network (`face_decoder` in the grid file): Linear(D, hidden)-ReLU-Linear(hidden, channels x base x base)-ReLU, then
  upsampling blocks (nearest x2, 3x3 conv, BatchNorm, ReLU; channels halved, at least 16) until the side reaches the
  model preset's output size, a 3x3 conv to RGB and a sigmoid (a bilinear resize where the size is not base x 2^n).
* Loss: L1 between the output and the real face (in [0, 1]), plus `perceptual` x the L1 distance of VGG-16 features
  (relu1_2, relu2_2, relu3_3; `perceptual_source`: torchvision's ImageNet weights, downloaded where there is
  internet, or a local state_dict of `vgg16().features[:16]`). Off by default (the CPU demo has no VGG weights).
* Training: Adam with a cosine (or constant) learning rate, batches drawn with replacement from the training split's
  clips that have a face and the training constituent, seeded per step (a resumed run draws the same batches), each
  input plus Gaussian noise of sd `input_noise` (standardised units). A test face's embedding is not any training
  face's: without noise the decoder maps each training embedding to its own image and an unseen one to a blend of
  unrelated ones; with noise a neighbourhood of embeddings maps to the face they share (demo, face_to_face_direct,
  identity recall@1: 0.608 without noise, 0.633 at 0.5, 0.700 at 1.0; 4,000 steps instead of 2,000 change nothing).
  Writes `<results>/<system>/model/`: decoder.pt, norm_stats.npz, meta.json (with `train_hash`: parameters, layout
  entry, output size and the training data), loss.csv, loss.png, provenance.json; checkpoint.pt while it trains. A
  model dir holding the same `train_hash` is reused; so is another system's of the same grid (both direct systems
  train one and the same decoder: it is copied, not trained twice, when one is already finished).
* No conditional scale: evaluation draws one face per test clip and stores it with scale NaN, like a reference row
  (the report draws it as a horizontal line).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from slf_utils.basics import (
    atomic_save_npz,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    exists,
    params_hash,
    provenance,
)
from slf_utils.folds import n_folds, training_ids
from slf_utils.layout import Layout
from slf_utils.preprocessing import resize, to_rgb
from slf_utils.recipe import output_size, resolve_recipe, trained_recipe, write_recipe
from slf_utils.results import Results
from slf_utils.store import Store, open_store

MODEL = "decoder.pt"
CHECKPOINT = "checkpoint.pt"
FORMAT = "slf-face-decoder/1"
VGG_LAYERS = (3, 8, 15)  # relu1_2, relu2_2, relu3_3 of torchvision's vgg16().features
# the face_decoder parameters the weights depend on (checkpoint_every does not change them)
HASHED = (
    "hidden",
    "base",
    "channels",
    "steps",
    "batch_size",
    "lr",
    "lr_schedule",
    "weight_decay",
    "input_noise",
    "seed",
)


# ---------------------------------------------------------------------------------------------- network
class FaceDecoder(nn.Module):
    """embedding (B, D) -> faces (B, 3, size, size) in [0, 1]."""

    def __init__(self, in_dim: int, size: int, hidden: int = 512, base: int = 4, channels: int = 128):
        super().__init__()
        base = min(base, size)
        self.size, self.base, self.channels = size, base, channels
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, channels * base * base), nn.ReLU()
        )
        blocks, c, side = [], channels, base
        while side < size:
            out = max(16, c // 2)
            blocks += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(c, out, 3, padding=1),
                nn.BatchNorm2d(out),
                nn.ReLU(),
            ]
            c, side = out, side * 2
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(c, 3, 3, padding=1)
        self.side = side

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mlp(z).view(len(z), self.channels, self.base, self.base)
        x = self.head(self.blocks(x))
        if self.side != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


class Perceptual(nn.Module):
    """Sum over VGG-16 relu1_2, relu2_2, relu3_3 of the mean L1 distance of features (ImageNet-normalised inputs)."""

    def __init__(self, source=None):
        super().__init__()
        import torchvision

        if exists(source):
            features = torchvision.models.vgg16().features[: VGG_LAYERS[-1] + 1]
            features.load_state_dict(torch.load(source, map_location="cpu", weights_only=True))
        else:
            try:
                features = torchvision.models.vgg16(weights="IMAGENET1K_V1").features[: VGG_LAYERS[-1] + 1]
            except Exception as e:  # offline: no weights to download
                raise RuntimeError(
                    "face_decoder.perceptual needs VGG-16 weights: torchvision's could not be loaded "
                    f"({type(e).__name__}: {e}); set face_decoder.perceptual_source to a local state_dict of "
                    "torchvision.models.vgg16().features[:16], or face_decoder.perceptual: 0"
                ) from e
        self.features = features.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x, y = (a - self.mean) / self.std, (b - self.mean) / self.std
        loss = a.new_zeros(())
        for i, layer in enumerate(self.features):
            x, y = layer(x), layer(y)
            if i in VGG_LAYERS:
                loss = loss + (x - y).abs().mean()
        return loss


# ---------------------------------------------------------------------------------------------- data
def input_dim(layout: Layout, name: str, stats: dict) -> int:
    """Entries of the constituent's vector the decoder reads: the fitted statistics' length (`standard`), else the
    whole block (rows x width, zero-padded)."""
    c = layout.constituents[name]
    return int(len(stats[f"{name}.mean"])) if f"{name}.mean" in stats else c.n_rows * c.width


def vectors(layout: Layout, store: Store, clip_ids, name: str, stats: dict, dim: int) -> np.ndarray:
    """(N, dim) float32: the constituent's normalised, scaled, clipped block of each clip, flattened (a `wrap`
    block unwraps to the stored vector's order)."""
    block = layout.blocks(store, list(clip_ids), [name], stats)[name]
    return np.ascontiguousarray(block.reshape(len(block), -1)[:, :dim])


def stats_for(stats: dict, train_on: str, name: str) -> dict:
    """The training constituent's statistics under the name of the constituent fed at test."""
    if name == train_on:
        return stats
    out = {k: v for k, v in stats.items() if not k.startswith(f"{train_on}.")}
    for part in ("mean", "std"):
        if f"{train_on}.{part}" in stats:
            out[f"{name}.{part}"] = stats[f"{train_on}.{part}"]
    return out


def load_faces(store: Store, clip_ids, size: int) -> np.ndarray:
    """(N, size, size, 3) uint8 stored face crops (`preprocess`/`face`), resized only."""
    faces = store.load_stacked("preprocess", list(clip_ids), keys=["face"])["face"]
    return np.stack([to_rgb(f) if f.shape[0] == size else resize(to_rgb(f), size) for f in faces])


def _to_images(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


# ---------------------------------------------------------------------------------------------- training
def _recipe(cfg, system_name, fold=None):
    """The system's recipe.Recipe (its `train` is the face_decoder section, the system's overrides merged)."""
    r = resolve_recipe(cfg, system_name, fold)
    if r.system.decoder != "direct":
        raise ValueError(f"{system_name}: decoder {r.system.decoder}, not direct (slf_utils.diffusion trains it)")
    return r


def train_hash(r, store: Store, ids, size: int) -> str:
    """What the decoder of recipe `r` depends on: its parameters, the training constituent's layout entry, the output
    size and the training data (clip ids and the stages' parameter hashes)."""
    fd, layout, system = r.train, r.layout, r.system
    stages = ["preprocess", *layout.stages([system.train_on])]
    return params_hash(
        {
            "format": FORMAT,
            "face_decoder": {k: fd[k] for k in (*HASHED, "perceptual")}
            | ({"perceptual_source": fd["perceptual_source"]} if fd["perceptual"] else {}),
            "constituent": layout.raw["constituents"][system.train_on],
            "size": size,
            "clips": ids,
            "stages": {s: store.provenance(s).get("params_hash") for s in stages},
        }
    )


def _finished(directory: Path, key: str) -> dict | None:
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("train_hash") == key and (directory / MODEL).exists() else None


def _sibling(cfg, mine: Path, key: str, fold=None) -> Path | None:
    """Another system's model dir of this grid (the same fold's) holding a finished decoder with the same
    train_hash."""
    sub = "" if fold is None else f"/fold{fold}"
    for d in Results.of(cfg).models(sub):
        if d != mine and _finished(d, key):
            return d
    return None


def _lr(fd: dict, step: int) -> float:
    if fd["lr_schedule"] == "cosine":
        return fd["lr"] * 0.5 * (1 + math.cos(math.pi * step / fd["steps"]))
    return fd["lr"]


def fit(model: FaceDecoder, x: np.ndarray, faces: np.ndarray, fd: dict, out: Path | None = None, key=None, log=print):
    """Train `model` on inputs x (N, D) and faces (N, size, size, 3) uint8 for fd['steps'] steps, resuming from
    out/checkpoint.pt when it holds the same `key`. Returns the loss per step (step, loss, l1, perceptual)."""
    device = next(model.parameters()).device
    xs = torch.from_numpy(x).to(device)
    ys = torch.from_numpy(faces).permute(0, 3, 1, 2).float().div(255).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=fd["lr"], weight_decay=fd["weight_decay"])
    perceptual = Perceptual(fd["perceptual_source"]).to(device) if fd["perceptual"] > 0 else None
    rows, start = [], 0
    ck = out / CHECKPOINT if exists(out) else None
    if exists(ck) and ck.exists():
        state = torch.load(ck, map_location="cpu", weights_only=True)
        if state.get("key") == key:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optim"])
            start = int(state["step"])
            rows = [dict(zip(("step", "loss", "l1", "perceptual"), r)) for r in state["rows"]]
            log(f"face decoder: resumed at step {start}")
    model.train()
    bsz = min(int(fd["batch_size"]), len(xs))
    for step in range(start, int(fd["steps"])):
        g = torch.Generator().manual_seed(int(fd["seed"]) * 1_000_003 + step)
        idx = torch.randint(0, len(xs), (bsz,), generator=g).to(device)
        for group in opt.param_groups:
            group["lr"] = _lr(fd, step)
        x = xs[idx]
        if fd["input_noise"] > 0:  # the same generator: a resumed run draws the same noise
            x = x + fd["input_noise"] * torch.randn(x.shape, generator=g).to(device)
        pred = model(x)
        l1 = (pred - ys[idx]).abs().mean()
        p = perceptual(pred, ys[idx]) if exists(perceptual) else torch.zeros(())
        loss = l1 + fd["perceptual"] * p
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rows.append({"step": step + 1, "loss": loss.item(), "l1": l1.item(), "perceptual": p.item()})
        done = step + 1
        if exists(ck) and (done % int(fd["checkpoint_every"]) == 0) and done < int(fd["steps"]):
            state = {
                "key": key,
                "step": done,
                "model": model.state_dict(),
                "optim": opt.state_dict(),
                "rows": [[r["step"], r["loss"], r["l1"], r["perceptual"]] for r in rows],
            }
            atomic_write(ck, lambda tmp, state=state: torch.save(state, tmp))
    model.eval()
    return pd.DataFrame(rows, columns=["step", "loss", "l1", "perceptual"])


def train(cfg, system_name, out_dir=None, log=print) -> dict:
    """Notebook 03 for a direct-decoder system: train (or reuse) its decoder in `<results>/<system>/model/`, or with
    identity folds (data.identity_folds) one per fold in `model/fold<k>/`, each on the other folds' identities.
    Returns what notebook 03 shows (model_dir, steps, final_loss, seconds_per_step, device, checkpoint_bytes, ...;
    with folds the last fold's, and every fold's under `folds`)."""
    out = Path(out_dir) if exists(out_dir) else Results.of(cfg).model(system_name)
    if not n_folds(cfg):
        return _train(cfg, system_name, out, out_dir is None, None, log)
    folds = [_train(cfg, system_name, out / f"fold{k}", out_dir is None, k, log) for k in range(n_folds(cfg))]
    return {**folds[-1], "folds": folds}


def _train(cfg, system_name, out: Path, share: bool, fold, log) -> dict:
    """Train (or reuse: this folder's, or with `share` another system's of the grid) one decoder into `out`."""
    r = _recipe(cfg, system_name, fold)
    layout, system, fd = r.layout, r.system, r.train
    store = open_store(cfg)
    size = output_size(cfg, system.mode)
    ids = training_ids(store, layout.stages([system.train_on]), cfg, fold, r.who)
    if not ids:
        raise ValueError(
            f"{system_name}: no training clip has a face and {layout.stages([system.train_on])} in {store.root} "
            "(the voice_encoder step, notebook 06, fills the Speech2Face stages)"
        )
    key = train_hash(r, store, ids, size)
    meta = _finished(out, key)
    reused = "this model dir" if meta else None
    if meta is None and share and exists(sibling := _sibling(cfg, out, key, fold)):
        out.mkdir(parents=True, exist_ok=True)
        for name in (MODEL, "norm_stats.npz", "loss.csv", "loss.png", "provenance.json", "meta.json"):
            if (sibling / name).exists():
                shutil.copy2(sibling / name, out / name)
        owner = sibling.parent if fold is None else sibling.parent.parent
        meta, reused = _finished(out, key), f"{owner.name}'s (same train_hash)"
    if meta is not None:
        write_recipe(r, out)  # this system's own recipe, also where it shares another system's decoder
        log(f"{system_name}: decoder {meta['model_hash']} trained with these parameters: reused from {reused}")
        return _result(out, meta, system_name, reused)

    t0 = time.time()
    torch.manual_seed(int(fd["seed"]))
    stats = layout.fit(store, ids, [system.train_on])
    dim = input_dim(layout, system.train_on, stats)
    x = vectors(layout, store, ids, system.train_on, stats, dim)
    faces = load_faces(store, ids, size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = FaceDecoder(dim, size, fd["hidden"], fd["base"], fd["channels"]).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{system_name}: direct decoder ({n_params:,} parameters) {dim}-d -> {size} px on {len(ids)} clips")
    out.mkdir(parents=True, exist_ok=True)
    history = fit(model, x, faces, fd, out, key, log)
    seconds = time.time() - t0
    atomic_save_npz(out / "norm_stats.npz", **stats)
    atomic_write(out / MODEL, lambda tmp: torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp))
    atomic_write_text(out / "loss.csv", history.to_csv(index=False))
    with torch.no_grad():
        pred = torch.cat([model(torch.from_numpy(x[i : i + 256]).to(device)).cpu() for i in range(0, len(x), 256)])
    target = torch.from_numpy(faces).permute(0, 3, 1, 2).float().div(255)
    mean_face = target.mean(0, keepdim=True)
    meta = {
        "format": FORMAT,
        "train_hash": key,
        "model_hash": hashlib.sha1((out / MODEL).read_bytes()).hexdigest()[:12],
        "system": system_name,
        "train_on": system.train_on,
        "in_dim": dim,
        "size": size,
        "architecture": {k: fd[k] for k in ("hidden", "base", "channels")},
        "steps": int(fd["steps"]),
        "n_train_clips": len(ids),
        "fold": fold,  # data.identity_folds: trained without this fold's identities (None: closed set)
        "trainable_parameters": int(n_params),
        "final_loss": float(history["loss"].tail(20).mean()) if len(history) else None,
        # how well it reproduces its training faces, beside the mean face (what an input-blind decoder learns)
        "train_l1": float((pred - target).abs().mean()),
        "mean_face_l1": float((mean_face - target).abs().mean()),
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, len(history)), 4),
        "device": device,
    }
    prov = {"params": {k: fd[k] for k in fd}, "params_file": cfg.get("params_file"), "layout_hash": layout.hash, **meta}
    write_recipe(r, out)
    atomic_write_json(out / "provenance.json", provenance(prov))
    fig = plot_loss(out)
    atomic_write(out / "loss.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    atomic_write_json(out / "meta.json", meta)  # last: a model exists once its meta does
    (out / CHECKPOINT).unlink(missing_ok=True)
    log(
        f"{system_name}: trained {len(history)} steps in {seconds:.0f} s; training faces L1 {meta['train_l1']:.4f} "
        f"(mean face {meta['mean_face_l1']:.4f})"
    )
    return _result(out, meta, system_name, None)


def _result(out: Path, meta: dict, system_name: str, reused) -> dict:
    return {
        **meta,
        "system": system_name,
        "model_dir": str(out),
        "reused": reused,
        "data_wait_share": None,
        "checkpoint_bytes": (out / MODEL).stat().st_size,
    }


def load_model(directory) -> tuple[FaceDecoder, dict, dict]:
    """(decoder in eval mode, meta, normalisation statistics) of a trained model dir."""
    directory = Path(directory)
    meta = json.loads((directory / "meta.json").read_text())
    arch = meta["architecture"]
    model = FaceDecoder(meta["in_dim"], meta["size"], arch["hidden"], arch["base"], arch["channels"])
    model.load_state_dict(torch.load(directory / MODEL, map_location="cpu", weights_only=True))
    with np.load(directory / "norm_stats.npz", allow_pickle=False) as z:
        stats = {k: z[k] for k in z.files}
    return model.eval(), meta, stats


def decode(
    cfg, system_name, clip_ids, store: Store | None = None, batch_size: int = 256, directory=None, fold=None
) -> np.ndarray:
    """(N, size, size, 3) uint8 faces of `clip_ids` from the system's kept constituent (evaluation, notebook 04), by
    the decoder in `directory` (default the system's model dir; a fold's with identity folds, `fold` its index: the
    constituent is then read from that fold's stages, folds.fold_stage)."""
    directory = Path(directory) if exists(directory) else Results.of(cfg).model(system_name)
    r = trained_recipe(cfg, system_name, directory, fold)  # the system as this decoder was trained
    layout, system = r.layout, r.system
    store = store if exists(store) else open_store(cfg)
    model, meta, stats = load_model(directory)
    name = system.keep[0]
    if meta["train_on"] != system.train_on:
        raise ValueError(
            f"{directory}: its weights were trained on {meta['train_on']} but its recipe says {system.train_on}: "
            f"the folder mixes two trainings; retrain {r.who} (notebook 03)"
        )
    stats = stats_for(stats, system.train_on, name)
    x = vectors(layout, store, clip_ids, name, stats, meta["in_dim"])
    with torch.no_grad():
        out = [_to_images(model(torch.from_numpy(x[i : i + batch_size]))) for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, meta["size"], meta["size"], 3), np.uint8)


def plot_loss(model_dir, smooth: int = 25):
    """The training loss per step and its running mean."""
    from matplotlib.figure import Figure

    loss = pd.read_csv(Path(model_dir) / "loss.csv")
    fig = Figure(figsize=(6, 3.2), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(loss["step"], loss["loss"], color="0.75", lw=0.8, label="per step")
    ax.plot(loss["step"], loss["loss"].rolling(smooth, min_periods=1).mean(), label=f"mean of {smooth}")
    ax.set(xlabel="step", ylabel="L1 (+ perceptual)", title="direct face decoder: training loss", yscale="log")
    ax.legend(fontsize=8)
    return fig
