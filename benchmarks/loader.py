"""Data loading is not the bottleneck: our training-batch assembly against a reference-style loader.

    python benchmarks/loader.py [--params params/demo.yaml] [--system full_input] [--clips 256] [--batch 16]

Both read the same store and produce the same thing: a batch of (256, 768) feature matrices and training faces.
* reference-style: per sample one SQL query for the labels and one file read per stage, the matrix rebuilt from
  zeros constituent by constituent (what the reference code's dataset did);
* ours, per batch: `Layout.build` - one `load_stacked` per stage for the whole batch (used above CACHE_BYTES);
* ours, precomputed: every constituent's normalised block computed once, a batch is an index operation (what
  `diffusion.train` uses when the training set fits in memory).
Then the share of a demo-preset training step spent waiting for its batch. Without --params (or when that store
has no features yet) a synthetic store of --clips clips is built in a temporary folder.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from slf_utils import diffusion, recipe, training_data
from slf_utils.config import load_params
from slf_utils.layout import Layout, load_layout, load_systems
from slf_utils.preprocessing import resize
from slf_utils.store import open_store
from slf_utils.synthetic import synthetic_store


def reference_batch(store, con, layout, keep, stats, clip_ids, size):
    """One sample at a time: a query, a file per stage, a fresh matrix."""
    X, faces = [], []
    for cid in clip_ids:
        labels = dict(
            zip(
                ("gender", "age", "ethnicity", "language"),
                con.execute("SELECT gender, age, ethnicity, language FROM clips WHERE clip_id = ?", (cid,)).fetchone(),
            )
        )
        x = np.zeros((layout.rows, layout.cols), np.float32)
        for name in keep:
            c = layout.constituents[name]
            r0 = c.rows[0]
            if c.encoder == "age":
                age = labels["age"]
                x[r0, c.col : c.col + 2] = [0.0, 1.0] if age is None else [age / 100.0, 0.0]
            elif c.encoder == "onehot":
                j = c.class_index(labels[c.source["label"]])
                if j is not None:
                    x[r0, c.col + j] = 1.0
            else:
                a = store.get(cid, c.stage)[c.source["key"]].astype(np.float32)
                a = a[None] if a.ndim == 1 else a[: c.n_rows]
                a = (a - stats[f"{name}.mean"]) / stats[f"{name}.std"] * c.scale
                x[r0 : r0 + len(a), c.col : c.col + a.shape[1]] = np.clip(a, -layout.clip, layout.clip)
        X.append(x)
        face = store.get(cid, "preprocess")["face"]
        faces.append(face if face.shape[0] == size else resize(face, size))
    images = torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2).float().div_(255.0)
    return images, torch.from_numpy(np.stack(X))


def rate(fn, batches, batch_size):
    fn(batches[0])  # warm-up: caches, file system
    t = time.perf_counter()
    for b in batches:
        fn(b)
    dt = time.perf_counter() - t
    return len(batches) * batch_size / dt, dt / len(batches)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default=None, help="grid file whose store to use (default: synthetic store)")
    ap.add_argument("--system", default="full_input")
    ap.add_argument("--clips", type=int, default=256, help="clips of the synthetic store")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3, help="demo-preset training steps to time")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = load_params(args.params) if args.params else None
    layout = load_layout(cfg) if cfg else Layout.load("params/layout.yaml")
    system = load_systems(cfg["systems_file"] if cfg else "params/systems.yaml", layout)[args.system]
    store = open_store(cfg) if cfg else None
    ids = training_data.train_clip_ids(store, layout, system.keep) if store else []
    if len(ids) < args.batch:
        tmp = tempfile.mkdtemp(prefix="slf_loader_")
        print(f"building a synthetic store of {args.clips} clips in {tmp} ...", flush=True)
        store = synthetic_store(Path(tmp), n_identities=max(1, args.clips // 4), clips_per_identity=4, face_size=64)
        ids = training_data.train_clip_ids(store, layout, system.keep)
    preset = recipe.resolve_preset(cfg["model"] if cfg else {"preset": "demo"})
    size = max(preset[system.mode]["image_sizes"])
    stats = layout.fit(store, ids, system.keep)
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(ids), args.batch, replace=False) for _ in range(args.batches)]
    drop = {n: np.zeros(args.batch, bool) for n in layout.dropout_constituents if n in system.keep}

    t = time.perf_counter()
    cached = training_data._Batches(store, layout, system.keep, stats, ids, size, cache=True)
    precompute_s = time.perf_counter() - t
    per_batch = training_data._Batches(store, layout, system.keep, stats, ids, size, cache=False)
    con = sqlite3.connect(store.db)
    results = {
        "reference-style (per sample)": rate(
            lambda b: reference_batch(store, con, layout, system.keep, stats, [ids[i] for i in b], size),
            batches,
            args.batch,
        ),
        "ours, per batch (load_stacked)": rate(lambda b: per_batch.get(b, drop), batches, args.batch),
        "ours, precomputed (training)": rate(lambda b: cached.get(b, drop), batches, args.batch),
    }
    con.close()
    ref = results["reference-style (per sample)"][0]
    print(
        f"\nstore: {store.root} ({len(ids)} training clips), system {system.name}, batch {args.batch}, "
        f"{args.threads} thread(s); precomputing took {precompute_s:.2f} s ({cached.blocks.nbytes / 2**20:.0f} MiB)"
    )
    print(f"{'loader':34s} {'samples/s':>10s} {'ms/batch':>9s} {'vs reference':>13s}")
    for name, (sps, spb) in results.items():
        print(f"{name:34s} {sps:10.0f} {spb * 1e3:9.1f} {sps / ref:12.1f}x")

    # share of a demo-preset training step spent waiting for the batch
    from imagen_pytorch import ImagenTrainer

    torch.manual_seed(0)
    imagen = diffusion.build_imagen(system.mode, preset)
    k = diffusion.trained_unets(imagen)[-1]
    trainer = ImagenTrainer(imagen, only_train_unet_number=k, use_ema=False, lr=1e-4, verbose=False)
    data_s = step_s = 0.0
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        images, X = cached.get(batches[i % len(batches)], drop)
        t1 = time.perf_counter()
        trainer(images, text_embeds=X, unet_number=k)
        trainer.update(unet_number=k)
        t2 = time.perf_counter()
        if i:  # the first step warms up
            data_s, step_s = data_s + t1 - t0, step_s + t2 - t0
    print(
        f"\n{preset['name']} preset, {system.mode} unet {k}: {step_s / args.steps:.2f} s/step on {trainer.device}, "
        f"waiting for data {data_s / args.steps * 1e3:.1f} ms/step = {100 * data_s / step_s:.2f} % of the step"
    )
    return results


if __name__ == "__main__":
    main()
