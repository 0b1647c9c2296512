"""A trained encoder's store stage: the skeleton the voice encoder (notebook 06, slf_utils.voice_encoder) and the
contrastive pair (notebook 07, slf_utils.contrastive) share, each keeping its own networks, inputs and loss.

Such a stage is a grid step of its own (DESIGN.md): an encoder trained on the training split (`train`: seeded epochs
of shuffled clips, Adam, resumable from a checkpoint), reused when its `meta.json` says it was trained with the same
parameters on the same arrays (`ensure_model`), cross-fitted so that no downstream model reads an in-sample value
(`fold_models`; nested under identity folds, `write_fold_stages`), its values written for every clip with its inputs
(`fill_stage`), then scored on its own in embedding space (`evaluate`: recall@k of the speaker's identity under the
bench's two protocols, identity-cluster bootstrap intervals, exact chance, the mean cosine of a query to its own
face, the ceiling of a perfect encoder) into `results/<grid>/<system>/` (`write_results`: metrics.csv, hits.csv,
provenance.json; the model, its loss curve and its provenance in `model/`).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from slf_utils import recognisers, retrieval, tables
from slf_utils.basics import atomic_write, atomic_write_json, atomic_write_text, exists, params_hash, provenance
from slf_utils.folds import (
    HELD_OUT,
    encoder_key,
    encoder_keys,
    fold_stage,
    identity_folds,
    key_name,
    n_folds,
    seeded_folds,
)
from slf_utils.results import Results
from slf_utils.store import AUDIO_STAGE, Store

SPLITS = ("test", "train")
CHUNK = 256  # clips read, embedded and written at a time
METRICS_COLUMNS = tables.METRIC_COLUMNS  # its `split`: train or test


# ---------------------------------------------------------------------------------------------- inputs
def clips_with(store: Store, stages) -> set[str]:
    """Clips whose every one of `stages` is done."""
    out = None
    for s in stages:
        ids = set(store.clips(stage=s)["clip_id"])
        out = ids if out is None else out & ids
    return out or set()


def vector_inputs(store: Store, clip_ids, stages) -> np.ndarray:
    """(N, F) float32: the stored embeddings of `stages` concatenated (`speaker_windows`: the mean of a clip's
    windows)."""
    parts = []
    for s in stages:
        if s == "speaker_windows":
            arr, lens = store.load_stacked(s, clip_ids, with_lengths=True, keys=["embedding"])
            e, n = arr["embedding"], lens["embedding"]
            mask = (np.arange(e.shape[1])[None] < n[:, None])[..., None]
            parts.append((e * mask).sum(1) / np.maximum(n, 1)[:, None])
        else:
            parts.append(store.load_stacked(s, clip_ids, keys=["embedding"])["embedding"].reshape(len(clip_ids), -1))
    return np.concatenate(parts, 1).astype(np.float32)


class VectorInputs:
    """Stored vectors of some clips. Every inputs class's `batch(idx, rng)` is the tuple of the encoder's arguments
    (an rng given: a training batch, which may be augmented)."""

    def __init__(self, x: np.ndarray):
        self.x = torch.from_numpy(np.ascontiguousarray(x, np.float32))

    def __len__(self):
        return len(self.x)

    def batch(self, idx, rng=None):
        return (self.x[np.asarray(idx)],)


def input_hash(store: Store, stage: str):
    return store.provenance("preprocess" if stage == AUDIO_STAGE else stage).get("params_hash")


def data_fingerprint(store: Store, stages, clip_ids) -> str:
    """Which versions of which arrays a model was trained on: each clip's (params hash, write sequence) per stage."""
    want, h = set(clip_ids), hashlib.sha1()
    for s in stages:
        st = store.status(s)
        st = st[st["clip_id"].isin(want) & (st["status"] == "done")].sort_values("clip_id")
        h.update(s.encode())
        h.update(st[["clip_id", "params_hash", "seq"]].to_csv(index=False).encode())
    return h.hexdigest()[:12]


# ---------------------------------------------------------------------------------------------- training
def save_torch(path: Path, obj):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def file_hash(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def save_training(checkpoint, key, model, opt, rng, order, pos, step, history):
    """A resumable training state (model, optimizer, both RNGs, the epoch's order and position, the loss so far),
    tagged with `key` so that a run with other settings does not resume from it."""
    state = {"key": key, "model": model.state_dict(), "optimizer": opt.state_dict()}
    state.update({"rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()})
    state.update({"order": order, "pos": pos, "step": step, "history": history})
    save_torch(Path(checkpoint), state)


def resume_training(checkpoint, key, model, opt, rng):
    """Restore `save_training`'s state into model, optimizer and RNGs when `checkpoint` holds one of this `key`:
    (order, pos, step, history), else None."""
    if not (exists(checkpoint) and Path(checkpoint).exists()):
        return None
    ck = torch.load(checkpoint, weights_only=False)
    if ck.get("key") != key:
        return None
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    rng.bit_generator.state = ck["rng"]
    torch.set_rng_state(ck["torch_rng"])
    return ck["order"], ck["pos"], ck["step"], ck["history"]


def train(
    model, hp: dict, n: int, batch_loss, system: str, log=print, checkpoint=None, key=None, after_step=None, shown=()
):
    """Adam (`hp`: lr, weight_decay) on `batch_loss(idx, rng)` -> (loss, {term: value}) for `hp['steps']` steps of
    `hp['batch_size']` of the `n` training items (seeded epochs of shuffled items), `after_step()` after each. With
    `checkpoint` (a path) the state is saved every `checkpoint_every` steps and a checkpoint of the same `key` is
    resumed from. Logged ten times with the terms of `shown` ((term, label) pairs). Returns the loss per step
    (columns step, loss and each term)."""
    torch.manual_seed(hp["seed"])
    rng = np.random.default_rng(hp["seed"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=hp["lr"], weight_decay=hp["weight_decay"])
    bs, steps = min(hp["batch_size"], n), hp["steps"]
    order, pos, start, history = rng.permutation(n), 0, 0, []
    resumed = resume_training(checkpoint, key, model, opt, rng)
    if exists(resumed):
        order, pos, start, history = resumed
        log(f"{system}: resuming training at step {start} of {steps}")
    model.train()
    every, t0 = max(1, steps // 10), time.time()
    for step in range(start, steps):
        if pos + bs > n:
            order, pos = rng.permutation(n), 0
        idx = order[pos : pos + bs]
        pos += bs
        loss, parts = batch_loss(idx, rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if exists(after_step):
            after_step()
        history.append({"step": step + 1, "loss": loss.item(), **{k: float(v.detach()) for k, v in parts.items()}})
        if (step + 1) % every == 0 or step + 1 == steps:
            h = history[-1]
            terms = "".join(f" {label} {h[k]:.4f}" for k, label in shown)
            log(f"{system}: step {step + 1}/{steps} loss {h['loss']:.4f}{terms} ({time.time() - t0:.1f} s)")
        if exists(checkpoint) and (step + 1) % hp["checkpoint_every"] == 0 and step + 1 < steps:
            save_training(checkpoint, key, model, opt, rng, order, pos, step + 1, history)
    model.eval()
    return pd.DataFrame(history)


@torch.no_grad()
def predict(model, inputs, batch_size: int = 64, unit: bool = False) -> np.ndarray:
    """(N, D) encoder outputs for every item of `inputs`, in order (`unit`: L2-normalised)."""
    model.eval()
    out = []
    for i in range(0, len(inputs), batch_size):
        y = model(*inputs.batch(np.arange(i, min(i + batch_size, len(inputs)))))
        out.append(F.normalize(y, dim=1) if unit else y)
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, 0), np.float32)


def ensure_model(mdir, key, ids, idents, load, fresh, params, what, system, log=print, weights="encoder.pt"):
    """The model of `mdir` when its meta says it was trained with `key` (its parameters and arrays; `load(mdir)` ->
    (model in eval mode, meta)), else a new one: `fresh()` -> (model with its initial weights, meta, fit) and
    `fit(checkpoint)` -> (loss per step, facts) trains it on the clips `ids` of the identities `idents` (sorted),
    resuming a checkpoint of the same key. Its weights (`weights`), loss.csv, provenance.json (`params` and meta) and
    meta.json (last: a model exists once its meta does) are written, the meta completed with train_hash, model_hash,
    `facts`, what it learnt from, seconds and final loss. Returns (model, meta, loss per step, trained now)."""
    if (mdir / "meta.json").exists() and (mdir / weights).exists():
        if json.loads((mdir / "meta.json").read_text()).get("train_hash") == key:
            model, meta = load(mdir)
            log(f"{system}: model {meta['model_hash']} already trained with these parameters: reused")
            # whom it learnt from: the nested cross-fitting's provenance checks it (fold_stage_provenance)
            return model, meta | {"train_identities": idents}, pd.read_csv(mdir / "loss.csv"), False
    t0 = time.time()
    (mdir / "meta.json").unlink(missing_ok=True)  # the old model is gone once training starts
    model, meta, fit = fresh()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(
        f"{system}: training {what} ({n_params:,} parameters) on {len(ids)} clips of {len(idents)} identities for "
        f"{params['steps']} steps"
    )
    history, facts = fit(mdir / "checkpoint.pt")
    seconds = round(time.time() - t0, 1)
    save_torch(mdir / weights, model.state_dict())
    meta.update({"train_hash": key, "model_hash": file_hash(mdir / weights), **facts})
    meta.update({"n_train_clips": len(ids), "n_train_identities": len(idents), "train_identities": idents})
    meta.update({"trainable_parameters": int(n_params), "seconds": seconds})
    meta["final_loss"] = float(history["loss"].iloc[-1]) if len(history) else None
    atomic_write_text(mdir / "loss.csv", history.to_csv(index=False))
    atomic_write_json(mdir / "provenance.json", provenance({"params": params, **meta}))
    atomic_write_json(mdir / "meta.json", meta)
    (mdir / "checkpoint.pt").unlink(missing_ok=True)
    log(f"{system}: trained in {seconds} s, final loss {meta['final_loss']:.4f}, model {meta['model_hash']}")
    return model, meta, history, True


# ---------------------------------------------------------------------------------------------- cross-fitting
def crossfit_folds(clips: pd.DataFrame, cf: dict) -> tuple[dict, str]:
    """({training clip id: fold}, unit) of `crossfit` ({folds, unit, seed}): folds of clips or of identities (`auto`:
    identities when no held-out identity is a training identity, the open-set regime; clips otherwise, where the
    test clips' speakers are in training too), assigned by a seeded permutation. folds < 2: {} (no cross-fitting)."""
    train = clips[clips["split"] == "train"]
    unit = cf["unit"]
    if unit == "auto":
        held = set(clips.loc[clips["split"].isin(HELD_OUT), "identity"])
        unit = "clip" if held & set(train["identity"]) else "identity"
    if int(cf["folds"]) < 2:
        return {}, unit
    keys = train["clip_id"] if unit == "clip" else train["identity"]
    fold_of = seeded_folds(keys, cf["folds"], cf["seed"])
    return {c: fold_of[k] for c, k in zip(train["clip_id"], keys)}, unit


def fill_stage(store: Store, stage: str, h: str, inputs, compute, summary: dict, prov: dict, log=print) -> dict:
    """Write `stage` (array `embedding`) for every clip with all of `inputs` that has no row of parameter hash `h`:
    `compute(ids)` gives their (n, D) rows, CHUNK clips a transaction. Provenance is `prov` plus the returned
    summary (stage, params_hash, `summary`, computed, done, seconds)."""
    t0 = time.time()
    finished = store.finished(stage, h)
    todo = sorted(c for c in clips_with(store, inputs) if c not in finished)
    for start in range(0, len(todo), CHUNK):
        ids = todo[start : start + CHUNK]
        store.put_many(stage, [(c, {"embedding": e}) for c, e in zip(ids, compute(ids))], h)
    out = {"stage": stage, "params_hash": h, **summary, "computed": len(todo), "done": len(store.done(stage, h))}
    out["seconds"] = round(time.time() - t0, 2)
    store.set_provenance(stage, provenance({**prov, **out}))
    if todo:
        log(f"{stage}: {len(todo)} clips written in {out['seconds']} s")
    return out


def fold_models(cfg, store: Store, ensure, log=print) -> tuple[dict, dict, dict]:
    """The encoders of a cross-fitted stage: ({None: the one trained on every training clip, key: one trained without
    some clips}, {clip: the key of the encoder that writes its value in the stage}, provenance). `ensure(exclude,
    subfolder)` trains (or reuses) one encoder: ensure_model's (model, meta, ...).

    Closed set: key i is cross-fitting fold i (`crossfit`): a training clip from the encoder of the fold that left it
    out, a held-out clip from the full encoder. Identity folds (nested cross-fitting): a key is the tuple of identity
    folds left out (folds.encoder_keys: each fold, each pair; subfolders `fold1`, `fold0-2`); the stage holds each
    clip's value from the encoder without its own fold (the encoders' own evaluation), and fold k's models read
    fold_stage(stage, k) (outer_routes, write_fold_stages)."""
    clips = store.clips()
    if n_folds(cfg) == 2:  # fold j's training clips under outer fold k: an encoder trained on neither j nor k
        raise ValueError(
            "data.identity_folds.folds is 2: nested cross-fitting of a trained encoder's stage needs at least 3 "
            "identity folds (the encoder that writes fold j's training clips for fold k's models leaves out both)"
        )
    if n_folds(cfg):
        fold_of = identity_folds(cfg, clips)
        fold_of_clip = {c: fold_of[i] for c, i in zip(clips["clip_id"], clips["identity"])}
        folds, keys = {c: encoder_key(f, None) for c, f in fold_of_clip.items()}, encoder_keys(n_folds(cfg))
        how = {"folds": n_folds(cfg), "unit": "identity", "seed": cfg["data"]["identity_folds"]["seed"]}
        how |= {
            "of": "identities",
            "nested": "per outer fold k: fold k's clips from the encoder without fold k, a "
            "clip of fold j from the encoder without folds j and k (stages <stage>.fold<k>)",
        }
    else:
        folds, unit = crossfit_folds(clips, cfg["crossfit"])
        fold_of_clip, keys, how = folds, sorted(set(folds.values())), {**cfg["crossfit"], "unit": unit}
    models = {None: ensure((), None)}
    for i, key in enumerate(keys):
        out = set(key) if isinstance(key, tuple) else {key}
        log(f"cross-fitting: encoder {i + 1} of {len(keys)}, without fold(s) {sorted(out)}")
        sub = key_name(key) if isinstance(key, tuple) else f"fold{key}"
        models[key] = ensure({c for c, f in fold_of_clip.items() if f in out}, sub)
    prov = {
        "crossfit": {**how, "clips_out_of_fold": len(folds)},
        "values": "every clip from the encoder trained without its identity's fold (data.identity_folds); fold k's "
        "models read <stage>.fold<k> (nested: no value from an encoder that saw fold k)"
        if n_folds(cfg)
        else "training clips: the encoder of the fold that left them out; held-out clips: the encoder of all "
        "training clips"
        if folds
        else "every clip from the encoder of all training clips (no cross-fitting: training clips are in-sample)",
    }
    return models, folds, prov


def key_label(key) -> str:
    """An encoder's key in provenance: None (every training clip), a cross-fitting fold, or folds.key_name."""
    return key_name(key) if isinstance(key, tuple) else str(key)


def outer_routes(cfg, folds: dict) -> dict:
    """{outer fold k: {clip: the key of the encoder whose value of it fold k's models read}} (nested cross-fitting,
    folds.encoder_key) from fold_models' `folds`; {} in the closed set."""
    if not n_folds(cfg):
        return {}
    return {k: {c: encoder_key(key[0], k) for c, key in folds.items()} for k in range(n_folds(cfg))}


def fold_stage_provenance(route: dict, metas: dict, outer: int) -> dict:
    """What fold `outer`'s stage was made from: every encoder it reads (its model hash, the identity folds it was
    trained without and the identities it was trained on) and which encoder wrote the clips of each identity fold."""
    used = sorted(set(route.values()))
    return {
        "outer_fold": outer,
        "encoders": {
            key_name(k): {
                "without_folds": list(k),
                "model_hash": metas[k]["model_hash"],
                "train_identities": metas[k].get("train_identities"),
            }
            for k in used
        },
        # a clip of identity fold j: the encoder without folds j and `outer` (fold `outer`'s own: without it alone)
        "values_of_fold": {str((set(k) - {outer} or {outer}).pop()): key_name(k) for k in used},
    }


def write_fold_stages(cfg, store, stage, models, folds, predict_with, inputs, summary, prov, log) -> dict:
    """Nested cross-fitting's stages: for every outer fold k, fold_stage(stage, k) holds each clip's value from the
    encoder outer_routes names (`predict_with(k, key, ids)` computes them), with fold_stage_provenance. {k:
    fill_stage summary}, {} in the closed set."""
    metas = {k: m[1] for k, m in models.items()}
    out = {}
    for k, route in outer_routes(cfg, folds).items():
        h = params_hash(
            {
                "stage": summary,
                "outer": k,
                "models": {key_label(c): metas[c]["model_hash"] for c in set(route.values())},
                "routes": {c: key_label(v) for c, v in route.items()},
            }
        )

        def compute(ids, k=k, route=route):
            return routed(ids, route, lambda key, part: predict_with(k, key, part))

        p = {**prov, **fold_stage_provenance(route, metas, k)}
        out[k] = fill_stage(store, fold_stage(stage, k), h, inputs, compute, summary, p, log)
    return out


def routed(ids, folds: dict, predict_with) -> np.ndarray:
    """Rows of `ids` in order, each computed by `predict_with(fold, ids of that fold)` (fold None: held-out or not
    cross-fitted)."""
    groups = {}
    for i, c in enumerate(ids):
        groups.setdefault(folds.get(c), []).append(i)
    out = [None] * len(ids)
    for f, idx in groups.items():
        for i, row in zip(idx, predict_with(f, [ids[i] for i in idx])):
            out[i] = row
    return np.stack(out)


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate(cfg, store, system, ceiling, stage, stage_hash, with_face, gallery, metric="cosine", unit=False):
    """Embedding-space retrieval of each split: (metrics, hits), with a `split` column beside the tables' columns.
    The queries are `stage`'s values (of `stage_hash`) of the split's clips, the gallery `gallery(ids, idents)` ->
    (faces (N, D), groups: per-fold galleries or None) of its clips in `with_face` (a gallery clip without a query is
    a miss); recall@k of the speaker's identity under both protocols (`paper`: the whole gallery, `identity`: the
    query's own face left out), identity-cluster bootstrap intervals, exact chance, the mean cosine of a query to its
    own face (`unit`: both are unit vectors) and the ceiling rows (system `ceiling`: each face as its own query)."""
    ev = recognisers.eval_params(cfg)
    ks, boot, seed = ev["ks"], ev["bootstrap"], ev["seed"]
    voices = store.done(stage, stage_hash)
    rows, hit_frames = [], []
    for split in SPLITS:
        g = store.clips(split=split)
        g = g[g["clip_id"].isin(with_face)]
        if g.empty:
            continue
        ids, idents = g["clip_id"].tolist(), g["identity"].tolist()
        faces, groups = gallery(ids, idents)
        q = [c for c in ids if c in voices]
        queries = store.load_stacked(stage, q, keys=["embedding"])["embedding"] if q else np.zeros((0, 1))
        own = retrieval.own_entries(q, ids)
        hits = retrieval.protocol_hits(queries, own, faces, idents, ks, metric, groups)
        r = tables.recall_rows(system, np.nan, hits, boot, seed, idents)
        r += tables.chance_rows(system, idents, ks, groups=groups)
        cos = np.full(len(ids), np.nan)
        if q:
            a, b = queries, faces[own]
            dot = (a * b).sum(1)
            cos[own] = dot if unit else dot / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        r.append(tables.metric_row(system, np.nan, "cosine_to_own_face", cos, boot, seed, clusters=idents))
        r.append(tables.constant_row(system, "n_unsampled", float(len(ids) - len(q)), len(ids)))
        top = retrieval.protocol_hits(faces, np.arange(len(ids)), faces, idents, ks, metric, groups)
        r += tables.recall_rows(ceiling, np.nan, top, boot, seed, idents)
        rows += [{**x, "split": split} for x in r]
        for s, h in ((system, hits), (ceiling, top)):
            hit_frames.append(tables.hit_frame(s, np.nan, ids, idents, h).assign(split=split))
    metrics = pd.DataFrame(rows, columns=METRICS_COLUMNS)
    hits = pd.concat(hit_frames, ignore_index=True) if hit_frames else pd.DataFrame(columns=tables.HIT_COLUMNS)
    return metrics, hits


def cell(r) -> str:
    return f"{r['value']:.3f}" + (f" [{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if pd.notna(r["ci_low"]) else "")


def recall_row(view: pd.DataFrame, ceiling: pd.DataFrame) -> dict:
    """One row of a recall table from a method's metrics of one protocol and its ceiling's (both indexed by metric):
    recall@k value [95 % CI], chance@1, the ceiling's recall@1, the mean cosine to the own face, the gallery size."""
    row = {k: cell(view.loc[k]) for k in view.index if k.startswith("recall@")}
    row["chance@1"] = round(float(view.loc["chance@1", "value"]), 3)
    row["ceiling@1"] = cell(ceiling.loc["recall@1"]) if "recall@1" in ceiling.index else ""
    if "cosine_to_own_face" in view.index:
        row["cosine_to_own_face"] = cell(view.loc["cosine_to_own_face"])
    row["n"] = int(view.loc["chance@1", "n"])
    return row


def write_results(cfg, system: str, metrics, hits, prov: dict, t0: float, log=print, what="", ceiling=None):
    """`<system>/` metrics.csv, hits.csv and provenance.json (`prov` between the system and the intervals), and a
    line a split: recall@1 under both protocols, chance and (with `ceiling`) the ceiling's under `identity`."""
    out = Results.of(cfg).encoder(system)
    atomic_write_text(out / "metrics.csv", metrics.to_csv(index=False))
    atomic_write_text(out / "hits.csv", hits.to_csv(index=False))
    ev = recognisers.eval_params(cfg)
    ci = f"95 % percentile bootstrap over identities, {ev['bootstrap']} resamples, seed {ev['seed']}"
    prov = {"system": system, **prov, "ci": ci, "seconds": round(time.time() - t0, 1)}
    atomic_write_json(out / "provenance.json", provenance(prov))

    def fmt(row):
        return f"{row['value']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"

    for split in SPLITS:
        mine = metrics[(metrics["split"] == split) & (metrics["system"] == system)]
        r1 = mine[mine["metric"] == "recall@1"].set_index("protocol")
        if not len(r1):
            continue
        note = f"chance {mine[mine['metric'] == 'chance@1']['value'].iloc[0]:.3f}"
        if exists(ceiling):
            top = metrics[(metrics["split"] == split) & (metrics["system"] == ceiling)]
            top = top[(top["metric"] == "recall@1") & (top["protocol"] == "identity")].iloc[0]
            note += f"; real faces, identity protocol: {top['value']:.3f}"
        r1 = f"identity {fmt(r1.loc['identity'])}, paper {fmt(r1.loc['paper'])}"
        log(f"{system}: {split} {what}recall@1 {r1} ({note})")


# ---------------------------------------------------------------------------------------------- figures
def plot_loss(ax, loss: pd.DataFrame):
    """The training loss per step and its running mean."""
    ax.plot(loss["step"], loss["loss"], color="0.75", lw=0.8, label="per step")
    ax.plot(loss["step"], loss["loss"].rolling(max(1, len(loss) // 50), min_periods=1).mean(), label="mean")


def at_k(rows: pd.DataFrame, prefix: str) -> pd.Series:
    return rows["metric"].str.removeprefix(prefix).astype(int)


def plot_recall(ax, r: pd.DataFrame, i: int, **kw):
    """recall@k rows `r` with their intervals, the i-th series (offset a little in k)."""
    err = np.stack([r["value"] - r["ci_low"], r["ci_high"] - r["value"]])
    ax.errorbar(at_k(r, "recall@").to_numpy() + 0.1 * i, r["value"], yerr=err, marker="o", capsize=3, **kw)


def finish_recall(ax, title: str):
    ax.set(title=title, xlabel="k", ylabel="recall", ylim=(0, 1.05))
    ax.legend(fontsize=8)
    ax.figure.tight_layout()
