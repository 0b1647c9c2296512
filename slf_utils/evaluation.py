"""Evaluation (notebook 04), the protocol: sample every held-out clip at every conditional scale, then ask a face
recogniser whether the generated face links back to the real one, and write each system's rows of the one tidy table
(tables: `metrics.csv`, with the per-clip hits beside it in `hits.csv`) and its samples (`samples.csv`, images/).
The scoring it calls lives on the floor below: retrieval and chance (retrieval), intervals (stats), image fidelity
(image_metrics), recognisers and attributes (recognisers), reference rows (references), rows and views (tables).

* One gallery per grid: the real faces (store stage `preprocess`, key `face`) of every held-out clip (`val` and
  `test`) that has one, the same clips for every system, embedded once. With identity folds and
  `data.identity_folds.gallery: fold` (the default) each query is ranked only among the gallery clips of its own
  fold's identities (`Gallery.groups`): every image it is ranked against is of a person its model never trained on
  (the paper's question, "which of the unseen speakers is it?"); `all`: among every gallery clip. A clip a system
  cannot sample (its features are missing; for `identity_mean`, its identity has no training face) is a miss for
  recall and left out of the other metrics; the metric `n_unsampled` counts them (also logged, and in provenance).
* A system with `decoder: direct` (slf_utils.face_decoder, Speech2Face's feed-forward decoder) has no conditional
  scale either: one face per test clip, stored and scored with scale NaN like a reference row (the report draws it
  as a horizontal line and gives it a row in every table), through the same scoring code.
* Every per-clip value is kept, so every mean comes with a seeded 95 % percentile-bootstrap interval that resamples
  identities, and the report bootstraps paired differences between systems on the same clips.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from slf_utils import face_decoder, recipe, sampling
from slf_utils.basics import (
    atomic_save_npz,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    default,
    exists,
    params_hash,
    provenance,
)
from slf_utils.folds import HELD_OUT, fold_roles, identity_folds, n_folds, roles_line
from slf_utils.image_metrics import guide_consistency, psnr, ssim
from slf_utils.preprocessing import read_image, resize, to_rgb
from slf_utils.recognisers import (
    ATTRIBUTE_METRICS,
    FaceEmbedder,
    attribute_agreement,
    attribute_estimator,
    eval_params,
    make_embedder,
)
from slf_utils.references import oracle_inputs, reference_images, reference_kind
from slf_utils.results import Results
from slf_utils.retrieval import (
    KS,
    PROTOCOLS,
    _members,
    _scatter,
    gallery_groups,
    oracle_hits,
    own_entries,
    protocol_hits,
    random_selection_hits,
)
from slf_utils.store import open_store, safe_key
from slf_utils.tables import (
    BOTH,
    HIT_COLUMNS,
    METRIC_COLUMNS,
    chance_rows,
    constant_row,
    hit_frame,
    metric_row,
    recall_rows,
    scale_label,
    split_masks,
)

# Held-out clips (folds.HELD_OUT): `val` ones choose (best scales, learning checks, settings), `test` ones report.
# Both are queries and both are in the one gallery of real faces (a val query may retrieve a test image: the gallery
# is data, the test queries' outputs are never read for a choice).

SAMPLE_COLUMNS = ["clip_id", "identity", "scale", "image", "sample_hash"]


@dataclass
class Gallery:
    """The real test faces once: embeddings, identities, guides and attribute references."""

    clip_ids: list
    identities: list
    faces: np.ndarray
    embeddings: np.ndarray
    detected: np.ndarray
    reference_attributes: pd.DataFrame | None = None
    guides: np.ndarray | None = None
    splits: list | None = None  # each clip's split (val / test); None: all test
    # each clip's identity fold where a query is ranked among its own fold's clips only (per-fold galleries,
    # gallery_groups); None: one gallery for every query
    groups: list | None = None


def score_scale(
    system,
    scale,
    generated,
    gallery: Gallery,
    embedder: FaceEmbedder,
    ks=KS,
    metric="l2",
    n_boot=1000,
    seed=0,
    estimator=None,
    upscale_to=None,
    embeddings=None,
    clip_ids=None,
    splits=None,
):
    """Metrics of one (system, scale): generated[i] is the face made for clip_ids[i] (default: every gallery clip,
    in gallery order). Every gallery clip counts: one without a face is a recall miss and left out (NaN) of the
    other metrics. Intervals resample identities. `splits`: each gallery clip's split (`val` or `test`, default all
    `test`): every metric is given per split. Returns (metric rows, hit frame over the gallery, generated-face
    embeddings)."""
    own = own_entries(default(clip_ids, gallery.clip_ids), gallery.clip_ids)
    splits = default(splits, gallery.splits)
    if embeddings is None:
        embeddings, detected = embedder.embed(generated)
    else:
        embeddings, detected = embeddings
    n, clusters = len(gallery.clip_ids), np.asarray(gallery.identities)
    hits = protocol_hits(embeddings, own, gallery.embeddings, gallery.identities, ks, metric, gallery.groups)
    rows = recall_rows(system, scale, hits, n_boot, seed, clusters, splits)
    parts = split_masks(splits, n)

    def row(name, values, stat="mean", boot=n_boot):
        per_clip = _scatter(np.asarray(values, np.float64), own, n, np.nan)
        return [metric_row(system, scale, name, per_clip[m], boot, seed, stat, BOTH, clusters[m], s) for s, m in parts]

    if embedder.info.get("detector_backend"):
        rows += row("face_detected", detected.astype(float), boot=0)
    gen = [to_rgb(g) for g in generated]
    size = gen[0].shape[0]
    real = [resize(to_rgb(gallery.faces[i]), size) for i in own]
    rows += row("psnr", [psnr(g, r) for g, r in zip(gen, real)])
    rows += row("ssim", [ssim(g, r) for g, r in zip(gen, real)])
    if exists(gallery.guides):
        guide = guide_consistency(gen, gallery.guides, own)
        rows += row("guide_rmse", guide["guide_rmse"], "rmse") + row("guide_top1", guide["guide_top1"])
    if exists(estimator) and exists(gallery.reference_attributes):
        agree = attribute_agreement(
            estimator(gen, upscale_to), gallery.reference_attributes.iloc[own].reset_index(drop=True)
        )
        rows += [
            r for name in ATTRIBUTE_METRICS for r in row(name, agree[name], "rmse" if name == "age_rmse" else "mean")
        ]
    frame = hit_frame(system, scale, gallery.clip_ids, gallery.identities, hits, splits)
    return rows, frame, (embeddings, detected)


def _model_fingerprint(model_dir: Path) -> dict:
    """What identifies the trained weights without hashing a multi-GB checkpoint: its size and mtime, and the
    model's provenance."""
    ck = model_dir / "checkpoint.pt"
    prov = model_dir / "provenance.json"
    return {
        "checkpoint": [ck.stat().st_size, ck.stat().st_mtime_ns] if ck.exists() else None,
        "provenance": params_hash(prov.read_text()) if prov.exists() else None,
    }


def load_norm_stats(model_dir: Path) -> dict:
    with np.load(Path(model_dir) / "norm_stats.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def write_image(path: Path, img: np.ndarray):
    atomic_write(path, lambda tmp: Image.fromarray(to_rgb(img)).save(tmp, format="PNG"))


def _write_csv(path, df: pd.DataFrame):
    atomic_write_text(path, df.to_csv(index=False))


def eval_clips(store, layout=None, keep=()) -> pd.DataFrame:
    """Held-out clips (`val` and `test`) with a face and every feature stage the kept constituents need (ordered by
    clip_id). Without a layout: every held-out clip with a face, the grid's one gallery."""
    clips = store.clips(stage="preprocess")
    clips = clips[clips["split"].isin(HELD_OUT)]
    if exists(layout):
        for stage in layout.stages(keep):
            clips = clips[clips["clip_id"].isin(set(store.clips(stage=stage)["clip_id"]))]
    if clips.empty:
        raise RuntimeError(f"{store}: no held-out clips with a face and the features {list(keep)} need")
    return clips.reset_index(drop=True)


def _reference_attributes(clips: pd.DataFrame, backend, estimator, gallery_faces, upscale_to):
    if not exists(estimator):
        return None
    if backend == "labels":
        return clips[["gender", "age", "ethnicity"]].reset_index(drop=True)
    return estimator([to_rgb(f) for f in gallery_faces], upscale_to)


def prepare_gallery(cfg, store, embedder: FaceEmbedder, estimator=None, clips=None) -> Gallery:
    """The grid's gallery of real faces (every held-out clip with a face, embedded once), with each clip's group
    where queries are ranked per fold (gallery_groups)."""
    ev = eval_params(cfg)
    clips = eval_clips(store) if clips is None else clips
    ids = clips["clip_id"].tolist()
    arrays = store.load_stacked("preprocess", ids, keys=["face", "guide"])
    emb, det = embedder.embed(arrays["face"])
    ref = _reference_attributes(clips, ev["attributes"], estimator, arrays["face"], ev["upscale_to"])
    splits = clips["split"].tolist() if "split" in clips else None
    idents = clips["identity"].tolist()
    groups = gallery_groups(cfg, store, idents)
    return Gallery(ids, idents, arrays["face"], emb, det, ref, arrays["guide"], splits, groups)


def _existing_samples(out: Path) -> pd.DataFrame:
    p = out / "samples.csv"
    return (
        pd.read_csv(p, dtype={"clip_id": str, "identity": str}) if p.exists() else pd.DataFrame(columns=SAMPLE_COLUMNS)
    )


def _scale_done(samples: pd.DataFrame, out: Path, scale, clip_ids, sample_hash) -> bool:
    rows = samples[(samples["scale"].astype(float) == float(scale)) & (samples["sample_hash"] == sample_hash)]
    if set(rows["clip_id"]) != set(clip_ids):
        return False
    return all((out / p).exists() for p in rows["image"])


def model_parts(cfg, system_name, store, clips: pd.DataFrame) -> list[tuple[Path, pd.DataFrame, int | None]]:
    """(model folder, the clips it answers, its identity fold): the system's one model for every clip (fold None),
    or with identity folds (data.identity_folds) each fold's model for its own identities' clips, which it never
    trained on."""
    model_dir = Results.of(cfg).model(system_name)
    fold_of = identity_folds(cfg, store.clips())
    if not fold_of:
        return [(model_dir, clips, None)]
    fold = clips["identity"].map(fold_of)
    return [(model_dir / f"fold{k}", clips[fold == k], int(k)) for k in sorted(set(fold))]


def generate(cfg, system_name, clips: pd.DataFrame, store, scales=None, log=print, out=None) -> pd.DataFrame:
    """Sample every clip at every scale (seeded; batched across clips by sampling.sample, and across scales with
    evaluate.batch_scales) with the model that answers it (model_parts), save the PNGs and samples.csv into `out`
    (default the system's eval folder). Scales whose images exist for the same sampling parameters are skipped.
    Returns samples."""
    ev = eval_params(cfg)
    out = Path(out) if exists(out) else Results.of(cfg).eval(system_name)
    samples = _existing_samples(out)
    for model_dir, part, fold in model_parts(cfg, system_name, store, clips):
        r = recipe.trained_recipe(cfg, system_name, model_dir, fold)  # the system as this model was trained
        system = r.system
        if system.mode not in ("generation", "super_resolution"):
            raise ValueError(f"{system_name}: mode {system.mode} has no model to sample")
        ids = part["clip_id"].tolist()
        sample_hash = params_hash(
            {
                "model": _model_fingerprint(model_dir),
                "steps": ev["sampling_steps"],
                "use_ema": ev["use_ema"],
                "lowres_sample_noise_level": ev["lowres_sample_noise_level"],
                "seed": ev["seed"],
                "clips": ids,
                "mode": system.mode,
                "keep": system.keep,
            }
        )
        todo = [s for s in default(scales, ev["scales"]) if not _scale_done(samples, out, s, ids, sample_hash)]
        if todo:
            sampler = load_sampler(r, model_dir, part, store)
        for group in [todo] if ev["batch_scales"] and todo else [[s] for s in todo]:
            t = time.time()
            images = sample_faces(sampler, part, group if len(group) > 1 else group[0], ev)
            for scale, faces in zip(group, images if len(group) > 1 else [images]):
                rows = write_samples(out, ids, part["identity"], faces, scale, sample_hash)
                # this part's rows of the scale, and those of clips no longer queried (as before folds: one scale's
                # rows are exactly the current clips')
                gone = samples["clip_id"].isin(ids) | ~samples["clip_id"].isin(clips["clip_id"])
                stale = (samples["scale"].astype(float) == float(scale)) & gone
                samples = pd.concat([samples[~stale], pd.DataFrame(rows)], ignore_index=True)
                _write_csv(out / "samples.csv", samples[SAMPLE_COLUMNS])  # after every scale: a run resumes
            where = "" if model_dir.name == "model" else f" ({model_dir.name})"
            at = f"scale {group[0]:g}" if len(group) == 1 else f"scales {', '.join(f'{s:g}' for s in group)}"
            each = " each" if len(group) > 1 else ""
            log(f"{system_name}: {at}{where}: {len(ids)} faces{each} in {time.time() - t:.1f} s")
    return samples


def load_sampler(r: recipe.Recipe, model_dir: Path, part: pd.DataFrame, store) -> tuple:
    """(imagen, feature matrix, guides or None) of one model (model_parts) and the clips `part` it answers, as
    generate samples them: the model loaded, the features built as its recipe `r` says (recipe.trained_recipe: the
    layout of its fold, the constituents it kept) with the statistics it was trained with."""
    system, ids = r.system, part["clip_id"].tolist()
    imagen, meta = sampling.load_model(model_dir)
    if set(meta.get("keep", system.keep)) != set(system.keep):
        raise ValueError(
            f"{model_dir}: its checkpoint keeps constituents {sorted(meta['keep'])} but its recipe "
            f"{sorted(system.keep)}: the folder mixes two trainings; retrain {r.who} (notebook 03)"
        )
    stats = meta.get("stats") or load_norm_stats(model_dir)
    x = r.layout.build(store, ids, system.keep, stats)
    sr = system.mode == "super_resolution"
    guides = store.load_stacked("preprocess", ids, keys=["guide"])["guide"] if sr else None
    return imagen, x, guides


def sample_faces(sampler: tuple, part: pd.DataFrame, scale, ev: dict) -> np.ndarray | list[np.ndarray]:
    """One scale's faces of the clips `part` (load_sampler's sampler), or with a list of scales each scale's faces
    from one pass, with the sampling parameters of `ev` (eval_params: steps, seed, EMA, low-res noise, batch size)."""
    imagen, x, guides = sampler
    return sampling.sample(
        imagen,
        x,
        cond_scale=[float(s) for s in scale] if isinstance(scale, (list, tuple)) else float(scale),
        guides=guides,
        steps=ev["sampling_steps"],
        seed=ev["seed"],
        use_ema=ev["use_ema"],
        lowres_sample_noise_level=ev["lowres_sample_noise_level"],
        batch_size=ev["batch_size"],
        labels=part,  # a face prior under attribute_mean picks each clip's mean face from its labels
    )


def write_samples(out: Path, ids, identities, images, scale, sample_hash) -> list[dict]:
    """Save one scale's images (a reference row's: scale NaN) and return their samples.csv rows."""
    rows = []
    for cid, ident, img in zip(ids, identities, images):
        rel = f"images/{safe_name(cid)}" + ("" if np.isnan(scale) else f"_s{scale:g}") + ".png"
        write_image(out / rel, img)
        rows.append({"clip_id": cid, "identity": ident, "scale": scale, "image": rel, "sample_hash": sample_hash})
    return rows


def safe_name(clip_id) -> str:
    return safe_key(clip_id)


def _cached_embeddings(out: Path, embedder: FaceEmbedder, images_key: str, images, log=print):
    """Embeddings of one scale's images, cached beside them (deepface costs ~0.3 s per face on one core)."""
    key = params_hash({"images": images_key, "embedder": embedder.describe() | {"embedding_dim": None}})
    path = out / "cache" / f"emb_{key}.npz"
    if path.exists():
        with np.load(path) as z:
            if embedder.dim is None:
                embedder.dim = int(z["embeddings"].shape[1])
            return z["embeddings"], z["detected"]
    emb, det = embedder.embed(images)
    atomic_save_npz(path, embeddings=emb, detected=det)
    return emb, det


def _scales_of(out: Path, samples: pd.DataFrame, scales, ids):
    """(scale, images, embedding-cache key) per scale, read lazily: one scale's images in memory at a time. The key
    covers every clip's sample hash (each fold's model has its own), so a fold retrained and resampled is noticed."""
    for scale in scales:
        at = samples[samples["scale"].astype(float) == float(scale)].set_index("clip_id").loc[ids]
        key = params_hash({"scale": scale, "hashes": at["sample_hash"].tolist(), "clips": ids})
        yield scale, [read_image(out / p) for p in at["image"]], key


def _reference_scale(cfg, kind: str, store, gallery: Gallery, out: Path) -> tuple[list, list]:
    """(clip ids, [(NaN, images, embedding-cache key)]) of an image reference row, its images and samples.csv
    written like a trained system's (the report's sample grid shows them)."""
    ids, images = reference_images(kind, store, gallery, recipe.output_size(cfg), cfg)
    # the images are cheap to remake and their bytes are the cache key: a changed store or size is noticed
    key = hashlib.sha1(np.stack(images).tobytes()).hexdigest()[:12] if ids else None
    ident = dict(zip(gallery.clip_ids, gallery.identities))
    rows = write_samples(out, ids, [ident[c] for c in ids], images, np.nan, key)
    _write_csv(out / "samples.csv", pd.DataFrame(rows, columns=SAMPLE_COLUMNS))
    return ids, ([(np.nan, images, key)] if ids else [])


def _direct_scale(cfg, system_name, store, clips: pd.DataFrame, out: Path) -> list:
    """[(NaN, images, embedding-cache key)] of a direct-decoder system (one deterministic forward pass per clip: cheap,
    so always redone), its images and samples.csv written like every system's."""
    ids, images = [], []
    for model_dir, part, fold in model_parts(cfg, system_name, store, clips):
        ids += part["clip_id"].tolist()
        images += list(
            face_decoder.decode(cfg, system_name, part["clip_id"].tolist(), store, directory=model_dir, fold=fold)
        )
    at = dict(zip(ids, images))  # back in the clips' order, whatever the folds
    ids = [c for c in clips["clip_id"] if c in at]
    images = [at[c] for c in ids]
    key = hashlib.sha1(np.stack(images).tobytes()).hexdigest()[:12] if ids else None
    rows = write_samples(out, ids, clips.set_index("clip_id").loc[ids, "identity"].tolist(), images, np.nan, key)
    _write_csv(out / "samples.csv", pd.DataFrame(rows, columns=SAMPLE_COLUMNS))
    return [(np.nan, images, key)] if ids else []


def _model_provenance(cfg, system_name, store, clips):
    """The trained model's provenance.json, or with identity folds a list of every fold's."""
    found = [
        json.loads((d / "provenance.json").read_text()) if (d / "provenance.json").exists() else None
        for d, _, _ in model_parts(cfg, system_name, store, clips)
    ]
    return found if identity_folds(cfg, store.clips()) else found[0]


def _fmt_ci(row) -> str:
    return f"{row['value']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"


def run(cfg, system_name, log=print) -> pd.DataFrame:
    """Notebook 04: score one system against the grid's gallery under both protocols, a trained system at every
    scale of `evaluate.scales`, a reference row once (scale NaN). Writes <system>/eval/ (images/, samples.csv,
    metrics.csv, hits.csv, provenance.json). Returns the metrics table."""
    t0 = time.time()
    ev = eval_params(cfg)
    out = Results.of(cfg).eval(system_name)
    store = open_store(cfg)
    # the system as the grid resolves it (its kind, the clips it answers); a trained model is sampled as its own
    # recipe.json says (generate)
    planned = recipe.resolve_recipe(cfg, system_name)
    lay, system = planned.layout, planned.system
    kind = reference_kind(system)
    clips = eval_clips(store)  # the gallery: the same clips for every system of the grid
    ids, idents, splits = clips["clip_id"].tolist(), clips["identity"].tolist(), clips["split"].to_numpy()
    per_identity = Counter(idents)
    n_ids, ks, boot, seed = len(per_identity), ev["ks"], ev["bootstrap"], ev["seed"]
    groups = gallery_groups(cfg, store, idents)  # per-fold galleries: each query ranked among its fold's clips
    prov = {
        "system": system_name,
        "mode": system.mode,
        "reference": kind,
        "evaluate": ev,
        "n_gallery_clips": len(ids),
        "n_clips_by_split": {s: int(m.sum()) for s, m in split_masks(splits, len(ids))},
        "n_identities": n_ids,
        "ks": ks,
        "recall": "top-k distinct identities; chance: the exact expected recall of a uniformly random ranking of the "
        "gallery clips each query is ranked in, under each protocol (chance_hits), averaged over the split's queries",
        "protocols": {
            "paper": "gallery = the real faces of the held-out (val and test) clips, the query's own included",
            "identity": "the query's own clip left out of its ranking: a hit is another image of the same person",
        },
        "gallery": {
            "ranked_in": "its own identity fold's held-out clips (data.identity_folds.gallery: fold)"
            if exists(groups)
            else "every held-out clip (one gallery)",
            "sizes": {
                str(g): {"clips": len(m), "identities": len(set(np.asarray(idents)[m]))}
                for g, m in _members(groups, len(ids)).items()
            },
        },
        "fold_roles": fold_roles(cfg, store.clips()).to_dict("records"),
        "fold_roles_line": roles_line(cfg, store.clips()),
        "splits": "val clips choose (best scales, learning checks), test clips report; both query one gallery",
        "identity_folds": dict(cfg["data"]["identity_folds"])
        | {"regime": "unseen speakers: each fold's models never saw its identities" if n_folds(cfg) else "closed set"},
        # their queries can never hit under the identity protocol (chance 0 for them)
        "single_clip_identities": sum(c == 1 for c in per_identity.values()),
        "ci": f"95 % percentile bootstrap over identities (all clips of a drawn identity), {boot} resamples, "
        f"seed {seed}",
        "notes": [],
    }

    def note(msg):
        prov["notes"].append(msg)
        log(f"{system_name}: {msg}")

    n_all = int(store.clips()["split"].isin(HELD_OUT).sum())
    if len(clips) < n_all:
        note(f"{n_all - len(clips)} of {n_all} held-out clips have no face: not in the gallery")
    rows, hit_frames = chance_rows(system_name, idents, ks, splits, groups), []
    if kind == "oracle":
        # no images: the planted codes of a known-answer corpus ranked like every system (oracle_hits)
        found = oracle_inputs(cfg, store, clips)
        sampled = ids if not isinstance(found, str) else []
        if isinstance(found, str):
            note(f"{found}: the oracle row is skipped")
        else:
            hits = oracle_hits(*found, idents, ks, seed, groups)
            rows += recall_rows(system_name, np.nan, hits, boot, seed, idents, splits)
            hit_frames.append(hit_frame(system_name, np.nan, ids, idents, hits, splits))
            prov["oracle"] = {"link_strength": found[2], "code_components": int(found[1].shape[1])}
    elif kind == "random":
        # no model, no images: one seeded random ordering of the gallery clips (of its group) per query
        own = np.arange(len(ids))
        hits = {
            p: random_selection_hits(idents, idents, ks, seed, own if p == "identity" else None, groups, own)
            for p in PROTOCOLS
        }
        rows += recall_rows(system_name, np.nan, hits, boot, seed, idents, splits)
        hit_frames.append(hit_frame(system_name, np.nan, ids, idents, hits, splits))
        sampled = ids
    else:
        embedder = make_embedder(cfg, store)
        estimator, attr_note = attribute_estimator(ev["attributes"], ev["detector_backend"])
        prov["attributes"] = {
            "backend": ev["attributes"],
            "estimator": attr_note if exists(estimator) else None,
            "note": None if exists(estimator) else attr_note,
        }
        gallery = prepare_gallery(cfg, store, embedder, estimator, clips)
        prov["gallery_face_detected"] = float(gallery.detected.mean())
        if kind:
            sampled, scales = _reference_scale(cfg, kind, store, gallery, out)
            prov["output_size"] = recipe.output_size(cfg)
            if not sampled:
                unseen = " (identity folds: every test identity is unseen in training)" if n_folds(cfg) else ""
                note(f"no test identity has training faces{unseen}: the {kind} row is skipped")
        elif system.decoder == "direct":
            sampled = eval_clips(store, lay, system.keep)["clip_id"].tolist()
            scales = _direct_scale(cfg, system_name, store, clips[clips["clip_id"].isin(sampled)], out)
            prov["decoder"] = "direct: one face per clip, no conditional scale (scale NaN)"
            prov["sample_hash"] = [scales[0][2]]
            prov["model_provenance"] = _model_provenance(cfg, system_name, store, clips)
        else:
            sampled = eval_clips(store, lay, system.keep)["clip_id"].tolist()
            samples = generate(cfg, system_name, clips[clips["clip_id"].isin(sampled)], store, log=log)
            scales = _scales_of(out, samples, ev["scales"], sampled)
            prov["sample_hash"] = sorted(set(samples["sample_hash"]))
            prov["model_provenance"] = _model_provenance(cfg, system_name, store, clips)
        for scale, images, key in scales:
            t = time.time()
            r, h, _ = score_scale(
                system_name,
                scale,
                images,
                gallery,
                embedder,
                ks,
                metric=ev["metric"],
                n_boot=boot,
                seed=seed,
                estimator=estimator,
                upscale_to=ev["upscale_to"],
                embeddings=_cached_embeddings(out, embedder, key, images),
                clip_ids=sampled,
            )
            rows += r
            hit_frames.append(h)
            r1 = {(x["split"], x["protocol"]): x for x in r if x["metric"] == "recall@1"}
            at = scale_label(scale, "reference" if kind else "no scale")
            log(
                f"{system_name}: {at}: recall@1 identity "
                + ", ".join(f"{s} {_fmt_ci(r1[s, 'identity'])}" for s, _ in split_masks(splits, len(ids)))
                + f"; paper test {_fmt_ci(r1['test', 'paper'])} scored in {time.time() - t:.1f} s"
            )
        prov["embedder"] = embedder.describe()
    n_unsampled = len(ids) - len(sampled)
    prov["n_unsampled"] = n_unsampled
    if n_unsampled and sampled:
        why = "identity without training faces" if kind == "identity_mean" else "features missing"
        note(f"{n_unsampled} of {len(ids)} gallery clips not sampled ({why}): recall misses, not in the other metrics")
    unsampled = ~np.isin(ids, sampled)
    rows += [
        constant_row(system_name, "n_unsampled", float(unsampled[m].sum()), int(m.sum()), BOTH, s)
        for s, m in split_masks(splits, len(ids))
    ]

    metrics = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    hits = pd.concat(hit_frames, ignore_index=True) if hit_frames else pd.DataFrame(columns=HIT_COLUMNS)
    _write_csv(out / "hits.csv", hits[HIT_COLUMNS])
    _write_csv(out / "metrics.csv", metrics)
    prov["seconds"] = round(time.time() - t0, 1)
    recipe.write_recipe(planned, out)  # what was scored, for the report and the controls (recipe.scored_recipes)
    atomic_write_json(out / "provenance.json", provenance(prov))
    return metrics
