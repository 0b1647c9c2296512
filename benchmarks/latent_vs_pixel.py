"""Latent against pixel diffusion at the same training budget: seconds per training step, side by side.

    python benchmarks/latent_vs_pixel.py [--preset demo] [--configs 16:2,32:4,64:8] [--batch 16] [--steps 20]

For each SIZE:DOWNSAMPLE the same unet (the preset's first) is trained on the same batch of feature matrices, once on
SIZE x SIZE x 3 faces (pixel diffusion) and once on SIZE/DOWNSAMPLE x SIZE/DOWNSAMPLE x 4 latents (model preset key
`latent`), with the same ImagenTrainer settings; the median seconds of a step (forward, backward, Adam) after a
warm-up. Latent training reads latents precomputed once from the training faces (diffusion.train does the same), so
the autoencoder costs its own training (`latent.steps` steps, timed here per step too) plus one encoding pass, not a
per-step encode. Recall and samples of latent systems come from a grid's report (e.g. speaker_embeddings_only_latent
beside speaker_embeddings_only).
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from imagen_pytorch import ImagenTrainer

from slf_utils import autoencoder, diffusion, recipe


def _step_seconds(imagen, images, X, steps: int) -> float:
    trainer = ImagenTrainer(imagen, only_train_unet_number=1, use_ema=False, lr=1e-3, verbose=False)
    times = []
    for i in range(steps + 1):
        torch.manual_seed(i)
        t = time.perf_counter()
        trainer(images, text_embeds=X, unet_number=1, max_batch_size=len(images))
        trainer.update(unet_number=1)
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))  # the first step warms up


def _autoencoder_step_seconds(size, latent, batch, steps) -> tuple[float, int]:
    model = autoencoder.Autoencoder(latent["channels"], latent["downsample"], latent["width"])
    optim = torch.optim.Adam(model.parameters(), lr=latent["lr"])
    x = torch.rand(batch, 3, size, size)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        recon, mean, logvar = model(x)
        loss = torch.nn.functional.mse_loss(recon, x) + latent["kl_weight"] * autoencoder._kl(mean, logvar)
        optim.zero_grad()
        loss.backward()
        optim.step()
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:])), sum(p.numel() for p in model.parameters())


def compare(preset_name, size, downsample, batch, steps, channels=4, width=32) -> dict:
    base = recipe.resolve_preset({"preset": preset_name})
    base["unets"] = base["unets"][:1]
    base.pop("latent", None)
    pixel = copy.deepcopy(base)
    pixel["generation"] = {"image_sizes": [size]}
    latent_cfg = autoencoder.check_config({"channels": channels, "downsample": downsample, "width": width})
    latent = {**copy.deepcopy(pixel), "latent": latent_cfg}
    rng = np.random.default_rng(0)
    X = torch.zeros(batch, 256, base["text_embed_dim"])
    X[:, :40] = torch.from_numpy(rng.normal(size=(batch, 40, base["text_embed_dim"])).astype(np.float32))
    torch.manual_seed(0)
    px = diffusion.build_imagen("generation", pixel)
    t_pixel = _step_seconds(px, torch.rand(batch, 3, size, size), X, steps)
    torch.manual_seed(0)
    lt = diffusion.build_imagen("generation", latent)
    s = size // downsample
    t_latent = _step_seconds(lt, torch.rand(batch, channels, s, s), X, steps)
    t_ae, ae_params = _autoencoder_step_seconds(size, latent_cfg, batch, max(3, steps // 2))
    return {
        "preset": preset_name,
        "size": size,
        "pixel_shape": [3, size, size],
        "latent_shape": [channels, s, s],
        "batch": batch,
        "pixel_s_per_step": t_pixel,
        "latent_s_per_step": t_latent,
        "speedup": t_pixel / t_latent,
        "autoencoder_s_per_step": t_ae,
        "autoencoder_parameters": ae_params,
        "unet_parameters": sum(p.numel() for p in lt.unets[0].parameters()),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="demo", help="model preset whose first unet both runs use")
    ap.add_argument("--configs", default="16:2,32:4,64:8", help="SIZE:DOWNSAMPLE pairs, comma-separated")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run (after one warm-up step)")
    ap.add_argument("--width", type=int, default=32, help="autoencoder width (latent.width)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for pair in args.configs.split(","):
        size, d = (int(v) for v in pair.split(":"))
        rows.append(compare(args.preset, size, d, args.batch, args.steps, width=args.width))
    print(f"preset {args.preset}, batch {args.batch}, {args.threads} thread(s), median of {args.steps} steps")
    print(f"{'pixel':>12} {'latent':>10} {'pixel s':>9} {'latent s':>9} {'speedup':>8} {'AE s/step':>10}")
    for r in rows:
        print(
            f"{'x'.join(map(str, r['pixel_shape'])):>12} {'x'.join(map(str, r['latent_shape'])):>10} "
            f"{r['pixel_s_per_step']:9.4f} {r['latent_s_per_step']:9.4f} {r['speedup']:7.2f}x "
            f"{r['autoencoder_s_per_step']:10.4f}"
        )
    return {"rows": rows}


if __name__ == "__main__":
    main()
