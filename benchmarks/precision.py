"""fp32 against bf16 mixed precision (model.trainer.precision) for training steps, side by side in one process: the
demo preset's unet (super-resolution, 8 -> 16 px) and one unet of the paper preset, each in an ImagenTrainer as
diffusion._train_unet makes it (imagen_trainer.trainer_options, the precision replaced), on random faces and feature
rows (40 of 256 filled) of the real shapes. The CPU unless there is a CUDA device (Accelerate's choice, as in training).

    python benchmarks/precision.py                          # demo at batch 16, paper unet 1 (32 px) at batch 2
    python benchmarks/precision.py --paper-unet 2 --paper-mode super_resolution --steps 20 --paper-steps 1

Prints seconds per step (median of the timed steps after the warm-up ones) and fp32 / bf16 per preset.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch


def time_steps(mode: str, preset: dict, k: int, batch: int, precision: str, steps: int, warmup: int) -> dict:
    from imagen_pytorch import ImagenTrainer

    from slf_utils import diffusion, imagen_trainer

    torch.manual_seed(0)
    imagen = diffusion.build_imagen(mode, preset)
    options = imagen_trainer.trainer_options(
        {**preset, "trainer": {**preset.get("trainer", {}), "precision": precision}}
    )
    imagen_trainer._allow_precision(options)  # Accelerate keeps one precision per process: this one from now on
    trainer = ImagenTrainer(imagen, only_train_unet_number=k, use_ema=False, lr=1e-4, verbose=False, **options)
    size, dim = max(preset[mode]["image_sizes"]), preset["text_embed_dim"]
    images = torch.rand(batch, 3, size, size, device=trainer.device)
    X = torch.zeros(batch, 256, dim, device=trainer.device)
    X[:, :40] = torch.randn(batch, 40, dim, device=trainer.device)
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else lambda: None
    times, losses = [], []
    for _ in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        losses.append(diffusion._loss_step(trainer, images, X, k, batch))
        trainer.update(unet_number=k)
        sync()
        times.append(time.perf_counter() - t0)
    used = trainer.accelerator.mixed_precision
    del trainer, imagen
    gc.collect()
    return {
        "seconds_per_step": statistics.median(times[warmup:]),
        "step_seconds": [round(t, 3) for t in times],
        "loss": losses[-1],
        "mixed_precision": used,
        "device": str(images.device),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16, help="demo preset batch")
    ap.add_argument("--steps", type=int, default=30, help="timed demo steps per precision")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--paper-mode", default="generation", choices=("generation", "super_resolution"))
    ap.add_argument("--paper-unet", type=int, default=1, help="unet number of the paper cascade (1: 32 px)")
    ap.add_argument("--paper-batch", type=int, default=2)
    ap.add_argument("--paper-steps", type=int, default=1, help="timed paper steps per precision (0: skip)")
    ap.add_argument("--paper-warmup", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)

    import slf_utils  # noqa: F401  (offline switches before imagen_pytorch)
    from slf_utils import recipe

    runs = [("demo", "super_resolution", 2, args.batch, args.steps, args.warmup)]
    if args.paper_steps:
        runs.append(("paper", args.paper_mode, args.paper_unet, args.paper_batch, args.paper_steps, args.paper_warmup))
    rows = []
    for name, mode, k, batch, steps, warmup in runs:
        preset = recipe.resolve_preset({"preset": name})
        res = {p: time_steps(mode, preset, k, batch, p, steps, warmup) for p in ("fp32", "bf16")}
        row = {
            "preset": name,
            "mode": mode,
            "unet": k,
            "batch": batch,
            "threads": torch.get_num_threads(),
            "fp32_s": res["fp32"]["seconds_per_step"],
            "bf16_s": res["bf16"]["seconds_per_step"],
            "fp32_over_bf16": res["fp32"]["seconds_per_step"] / res["bf16"]["seconds_per_step"],
            "device": res["fp32"]["device"],
            "runs": res,
        }
        rows.append(row)
        print(
            f"{name} {mode} unet {k}, batch {batch}, {row['device']}, {row['threads']} threads: fp32 "
            f"{row['fp32_s']:.3f} s/step, bf16 {row['bf16_s']:.3f} s/step, fp32/bf16 {row['fp32_over_bf16']:.2f}x",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
