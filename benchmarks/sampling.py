"""Sampling speed benchmarks on one trained demo system.

1. Steps: recall@1 and wall time of sampling every test clip at one conditional scale with 1000 sampling steps (the
   reference code's setting) against fewer steps (250, 100, 50). imagen-pytorch trains in continuous time, so the
   step count is free at evaluation; the question is whether recall@1 stays inside the 1000-step 95 % bootstrap CI.
2. Guidance: the time of one guided denoising step of the system's last unet with the conditional and null passes
   batched into one forward (what `sampling.sample` does) against imagen-pytorch's two forwards one after the other.
3. Scales: every scale of the sweep sampled one pass per scale against all scales in one pass
   (`evaluate.batch_scales`): the time ratio, the largest pixel difference, recall@1 per scale of both.

Steps and scales run `evaluation.generate`, the code notebook 04 runs, into a temporary folder.

Needs a trained system (notebook 03) and its store:
    python benchmarks/sampling.py --params params/demo.yaml --system full_input
    python benchmarks/sampling.py --steps 1000,50 --max-clips 16        # quicker
    python benchmarks/sampling.py --only guidance --batch 16 --repeats 20
    python benchmarks/sampling.py --only scales --max-clips 40 --rounds 2
    python benchmarks/sampling.py --quick    # smoke run: steps 8,4 on 8 clips, batch 2, 2 repeats (any model)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import slf_utils  # noqa: E402,F401  (offline switches before imagen-pytorch & co)
from slf_utils import diffusion, evaluation, recipe, recognisers, retrieval, sampling, stats  # noqa: E402
from slf_utils.basics import deep_merge  # noqa: E402
from slf_utils.config import load_params  # noqa: E402
from slf_utils.store import open_store  # noqa: E402


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


# (full run, --quick): what an option is when it is not given. Quick mode checks that the benchmark runs (tests,
# a new machine); its numbers say nothing about the trade-off.
DEFAULTS = {
    "steps": ([1000, 250, 100, 50], [8, 4]),
    "max_clips": (None, 8),
    "batch": (16, 2),
    "repeats": (10, 2),
    "rounds": (2, 1),
}


def _bench_setup(cfg, system_name, max_clips=None, log=print):
    """(store, clips, gallery, embedder) of a system's evaluation, at most `max_clips` clips."""
    ev = recognisers.eval_params(cfg)
    store = open_store(cfg)
    r = recipe.resolve_recipe(cfg, system_name)  # the system as training resolved it
    clips = evaluation.eval_clips(store, r.layout, r.system.keep)
    if max_clips:
        # one clip per identity first, so that a small run still has as many identities as it can; the gallery
        # shrinks with it (chance = 1/N of these identities)
        order = clips.groupby("identity").cumcount().sort_values(kind="stable").index
        clips = clips.loc[order[:max_clips]].sort_values("clip_id").reset_index(drop=True)
    embedder = recognisers.make_embedder(cfg, store)
    gallery = evaluation.prepare_gallery(cfg, store, embedder, None, clips)
    n_ids = len(set(gallery.identities))
    log(
        f"{system_name}: {len(clips)} test clips, {n_ids} identities (chance recall@1 {1 / n_ids:.3f}), "
        f"face model {ev['face_model']}"
    )
    return store, clips, gallery, embedder


def _generated(cfg, system_name, clips, store, scales, evaluate: dict, out) -> tuple[float, dict]:
    """Seconds and {scale: images} of evaluation.generate (the code notebook 04 runs) with `evaluate` settings set,
    writing into `out` instead of the system's eval folder."""
    c = deep_merge(cfg, {"evaluate": evaluate})
    t = time.perf_counter()
    samples = evaluation.generate(c, system_name, clips, store, scales=scales, log=lambda *a: None, out=out)
    seconds = time.perf_counter() - t
    ids = clips["clip_id"].tolist()
    return seconds, {s: np.stack(images) for s, images, _ in evaluation._scales_of(Path(out), samples, scales, ids)}


def _recall1(cfg, gallery, embedder, images) -> tuple:
    ev = recognisers.eval_params(cfg)
    emb, _ = embedder.embed(images)
    hits = retrieval.retrieval_hits(emb, gallery.identities, gallery.embeddings, gallery.identities, (1,), ev["metric"])
    return stats.bootstrap_ci(hits[1].astype(float), ev["bootstrap"], ev["seed"])


def steps_benchmark(cfg, system_name, steps_list, scale, max_clips=None, log=print) -> list[dict]:
    """recall@1 [CI] and seconds per steps count; the first entry of steps_list is the reference."""
    store, clips, gallery, embedder = _bench_setup(cfg, system_name, max_clips, log)
    log(f"  scale {scale:g}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for steps in steps_list:
            seconds, images = _generated(
                cfg, system_name, clips, store, [scale], {"sampling_steps": steps}, Path(tmp) / f"steps{steps}"
            )
            value, lo, hi, n = _recall1(cfg, gallery, embedder, images[scale])
            rows.append({"steps": steps, "seconds": seconds, "recall@1": value, "ci_low": lo, "ci_high": hi, "n": n})
            log(f"  {steps:5d} steps: {seconds:8.1f} s  recall@1 {value:.3f} [{lo:.3f}, {hi:.3f}]")
    ref = rows[0]
    for r in rows:
        r["speedup"] = ref["seconds"] / r["seconds"]
        r["inside_reference_ci"] = bool(ref["ci_low"] <= r["recall@1"] <= ref["ci_high"])
    return rows


def scales_benchmark(cfg, system_name, scales=None, max_clips=None, rounds=2, steps=None, log=print) -> dict:
    """evaluation.generate at every scale of the sweep, one pass per scale against every scale in one pass
    (evaluate.batch_scales), interleaved for `rounds` rounds on the same clips, seed and steps: the time ratio, the
    largest pixel difference of the faces, and recall@1 per scale of both. steps: sampling steps (default
    evaluate.sampling_steps)."""
    ev = recognisers.eval_params(cfg)
    scales = [float(s) for s in (scales or ev["scales"])]
    steps = steps or ev["sampling_steps"]
    store, clips, gallery, embedder = _bench_setup(cfg, system_name, max_clips, log)
    times, images = {False: [], True: []}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            for batched in (False, True) if i % 2 == 0 else (True, False):
                out = Path(tmp) / f"{batched}{i}"
                settings = {"batch_scales": batched, "sampling_steps": steps}
                seconds, images[batched] = _generated(cfg, system_name, clips, store, scales, settings, out)
                times[batched].append(seconds)
    per, together = float(np.median(times[False])), float(np.median(times[True]))
    diff = max(int(np.abs(images[False][s].astype(int) - images[True][s]).max()) for s in scales)
    recall = {
        s: (_recall1(cfg, gallery, embedder, images[False][s])[0], _recall1(cfg, gallery, embedder, images[True][s])[0])
        for s in scales
    }
    res = {
        "scales": scales,
        "clips": len(clips),
        "batch_size": ev["batch_size"],
        "sampling_steps": steps,
        "per_scale_s": per,
        "batched_s": together,
        "speedup": per / together,
        "max_pixel_diff": diff,
        "recall@1": {str(s): r for s, r in recall.items()},
        "same_recall": all(a == b for a, b in recall.values()),
    }
    log(
        f"  all {len(scales)} scales of {len(clips)} clips: one pass per scale {per:.1f} s, all in one pass "
        f"{together:.1f} s -> x{per / together:.2f} (median of {rounds}); faces differ by at most {diff} of 255; "
        f"recall@1 {'the same at every scale' if res['same_recall'] else 'differs: ' + str(recall)}"
    )
    return res


def guidance_benchmark(cfg, system_name, batch=16, scale=3.0, repeats=10, log=print) -> dict:
    """Seconds per guided denoising step of the last unet: both passes batched vs one after the other."""

    model_dir = Path(cfg["results"]) / system_name / "model"
    if (model_dir / "checkpoint.pt").exists():
        imagen, _ = sampling.load_model(model_dir)
        source = str(model_dir)
    else:  # no trained model: the preset's untrained unets cost the same per step
        system = recipe.resolve_recipe(cfg, system_name).system
        imagen = diffusion.build_imagen(system.mode, recipe.resolve_preset(cfg["model"]))
        imagen.eval()
        source = "untrained preset " + str(cfg["model"].get("preset"))
    k = diffusion.trained_unets(imagen)[-1]
    unet = imagen.unets[k - 1]
    size = imagen.image_sizes[k - 1]
    g = torch.Generator().manual_seed(0)
    text = torch.randn(batch, 256, 768, generator=g)
    text[:, 200:] = 0  # zero rows are masked, as in the real feature matrices
    kw = {"text_embeds": text, "text_mask": (text != 0).any(-1)}
    if unet.lowres_cond:
        kw |= {
            "lowres_cond_img": torch.rand(batch, 3, size, size, generator=g) * 2 - 1,
            "lowres_noise_times": torch.full((batch,), 0.2),
        }
    xt = torch.randn(batch, 3, size, size, generator=g)
    t = torch.rand(batch, generator=g)

    def sequential():  # imagen-pytorch's own method: conditional forward, then null forward
        return type(unet).forward_with_cond_scale(unet, xt, t, cond_scale=scale, remove_parallel_component=False, **kw)

    def batched():  # diffusion's patched method: one forward of the doubled batch
        return unet.forward_with_cond_scale(xt, t, cond_scale=scale, **kw)

    def timed(fn):
        fn()  # warm-up
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts))

    # sampling._sampling installs the batched guidance exactly as sampling.sample uses it (steps, EMA untouched)
    with torch.inference_mode(), sampling._sampling(imagen, None, False):
        diff = (sequential() - batched()).abs().max().item()
        seq, bat = timed(sequential), timed(batched)
    res = {
        "unet": k,
        "image_size": size,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "source": source,
        "sequential_s": seq,
        "batched_s": bat,
        "speedup": seq / bat,
        "max_abs_diff": diff,
    }
    log(
        f"guided step, unet {k} ({size} px, batch {batch}, {res['threads']} thread(s), {source}): "
        f"sequential {seq * 1000:.1f} ms, batched {bat * 1000:.1f} ms -> x{seq / bat:.2f}; "
        f"outputs differ by at most {diff:.2e}"
    )
    return res


def main(argv=None) -> dict:
    """Run the benchmarks; returns {"steps": steps_benchmark rows, "guidance": guidance_benchmark dict, "scales":
    scales_benchmark dict} (the ones run)."""

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params/demo.yaml")
    ap.add_argument("--system", default="full_input")
    ap.add_argument("--steps", type=_ints, help="comma list; the first is the reference (default 1000,250,100,50)")
    ap.add_argument("--scale", type=float, default=None, help="conditional scale (default report.chosen_scale)")
    ap.add_argument("--max-clips", type=int, help="only the first N test clips (faster, noisier; default all)")
    ap.add_argument("--batch", type=int, help="batch of the guided-step benchmark (default 16)")
    ap.add_argument("--repeats", type=int, help="timed repeats of the guided step (default 10)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=["steps", "guidance", "scales"], default=None)
    ap.add_argument("--scales", type=_ints, help="scales benchmark: comma list (default evaluate.scales)")
    ap.add_argument("--rounds", type=int, help="scales benchmark: rounds of both variants (default 2)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: steps 8,4, 8 clips, guided-step batch 2 and 2 repeats unless given (numbers meaningless)",
    )
    args = ap.parse_args(argv)
    for key, (full, quick) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    torch.set_num_threads(args.threads)
    cfg = load_params(args.params)
    scale = args.scale if args.scale is not None else float(cfg["report"]["chosen_scale"])
    out = {}
    if args.only in (None, "steps"):
        rows = out["steps"] = steps_benchmark(cfg, args.system, args.steps, scale, args.max_clips)
        ref = rows[0]
        print(
            f"\nreference: {ref['steps']} steps, recall@1 {ref['recall@1']:.3f} "
            f"[{ref['ci_low']:.3f}, {ref['ci_high']:.3f}], {ref['seconds']:.1f} s"
        )
        print(f"{'steps':>6} {'seconds':>9} {'speedup':>8} {'recall@1':>9}  inside reference CI")
        for r in rows:
            print(
                f"{r['steps']:6d} {r['seconds']:9.1f} {r['speedup']:7.1f}x {r['recall@1']:9.3f}  "
                f"{'yes' if r['inside_reference_ci'] else 'NO'}"
            )
    if args.only in (None, "guidance"):
        out["guidance"] = guidance_benchmark(cfg, args.system, args.batch, scale, args.repeats)
    if args.only in (None, "scales"):
        steps = args.steps[-1] if args.quick else None  # quick: the fewest steps asked for
        out["scales"] = scales_benchmark(cfg, args.system, args.scales, args.max_clips, args.rounds, steps)
    return out


if __name__ == "__main__":
    main()
