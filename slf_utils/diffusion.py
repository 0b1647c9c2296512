"""The conditional diffusion model (imagen-pytorch 2.1.0): the cascade and its training (notebook 03).

Presets and recipes: slf_utils.recipe; what a model trains on: slf_utils.training_data; the trainer's precision and
speed levers: slf_utils.imagen_trainer; loading and sampling: slf_utils.sampling.

* Generation: `Imagen(unets, image_sizes)` sampled from noise. Super-resolution: a `NullUnet` stands for the 8x8
  guide, the real unets are trained, and sampling starts at unet 2 from the guide.
* Checkpoints hold state dicts and plain Python data only (`torch.load(weights_only=True)` reads them).
* Multi-GPU: ImagenTrainer is built on Accelerate, so `accelerate launch -m slf_utils.diffusion train PARAMS SYSTEM
  --unet N` runs the same code on every GPU (one unet per launch: ImagenTrainer allows one trainer per process when
  distributed). Each process draws its own batches, so the effective batch is batch_size x processes. Processes on
  CPUs (gloo): `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...` (`--cpu --num_processes N`
  starts a single process unless given an mpirun hostfile); tests/e2e/test_distributed.py checks the all-reduce.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import imagen_pytorch.imagen_pytorch as ip
import numpy as np
import pandas as pd
import torch
from imagen_pytorch import Imagen, NullUnet, Unet
from tqdm.auto import tqdm

from slf_utils import autoencoder
from slf_utils.basics import (
    ParamsError,
    atomic_save_npz,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    exists,
    params_hash,
    provenance,
)
from slf_utils.config import load_params
from slf_utils.folds import n_folds
from slf_utils.imagen_trainer import _processes, compiles, make_trainer
from slf_utils.recipe import Recipe, resolve_recipe, write_recipe
from slf_utils.results import Results
from slf_utils.store import open_store
from slf_utils.training_data import FacePrior, _Batches, load_faces, train_clip_ids

CHECKPOINT = "checkpoint.pt"
FORMAT = "slf-imagen/1"


# ---------------------------------------------------------------------- model
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


# ---------------------------------------------------------------------- training


def train(cfg, system_name, out_dir=None, unets=None) -> dict:
    """Train one system (notebook 03) into `out_dir` (default results/<name>/<system>/model): one ImagenTrainer
    per unet, resuming from checkpoint.pt where present. `unets`: unet numbers to train (default all). With identity
    folds (data.identity_folds: unseen speakers) one model per fold in `fold<k>/`, each trained on the other folds'
    identities; the result is the last fold's, with every fold's under `folds`."""
    out = Path(out_dir) if exists(out_dir) else Results.of(cfg).model(system_name)
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
        write_recipe(r, out)
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


# ---------------------------------------------------------------------- command line (for accelerate launch)
def main(argv=None):
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
