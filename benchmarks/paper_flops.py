"""The paper grid's compute, from measured FLOPs: forward and backward FLOPs per training sample of each paper unet
(torch.utils.flop_counter.FlopCounterMode over one training step of imagen-pytorch), scaled to params/paper.yaml
(train.steps x train.batch_size per unet; evaluate.sampling_steps x scales x test clips for sampling), and the GPU
hours that takes at a stated sustained throughput.

    python benchmarks/paper_flops.py                      # meta device: exact shapes, no memory, ~1 min
    python benchmarks/paper_flops.py --device cpu         # the same count on real tensors (~12 GB, minutes)
    python benchmarks/paper_flops.py --peak-tflops 312 --mfu 0.4   # another GPU (A100 bf16 dense)

What is counted: FlopCounterMode counts matrix products (linear, convolution, attention) - 2 FLOPs per
multiply-add - and neither the elementwise ops (normalisation, activations, the loss) nor the optimizer; that is
also how model-FLOPs utilisation (MFU) is defined, so FLOPs / (peak x MFU) is the time at that utilisation. FLOPs
per sample are independent of the batch (checked: --batch changes nothing per sample) and of the feature rows kept
(masked rows are computed too). Sampling: one unet forward per step and image, two with classifier-free guidance
(the conditional and the null pass; the workbook batches them), one at scales 0 and 1 (diffusion._guided_forward).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

# dense (no sparsity) tensor-core peaks, TFLOP/s, from NVIDIA's data sheets (SXM parts)
PEAKS = {"H100 bf16": 989.4, "A100 bf16": 312.0}


def _num(x: float) -> str:
    """3 significant digits, thousands separated."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def unet_flops(mode: str, preset: dict, batch: int = 2, device: str = "meta") -> dict:
    """{unet number: {"forward": FLOPs per sample, "backward": FLOPs per sample, "params": n}} for one training step
    of each trained unet of the `mode` cascade, built by the workbook's builder."""
    from slf_utils import diffusion

    with torch.device(device):
        torch.manual_seed(0)
        imagen = diffusion.build_imagen(mode, preset)
        size = max(preset[mode]["image_sizes"])
        images = torch.rand(batch, 3, size, size)
        X = torch.zeros(batch, 256, preset["text_embed_dim"])
        X[:, :40] = torch.randn(batch, 40, preset["text_embed_dim"])
    out = {}
    for k in diffusion.trained_unets(imagen):
        unet = imagen.unets[k - 1]
        with FlopCounterMode(display=False) as fwd:
            # the unet is passed in (as ImagenTrainer does): Imagen.get_unet would move the others to the CPU
            loss = imagen(images, text_embeds=X, unet_number=k, unet=unet)
        with FlopCounterMode(display=False) as bwd:
            loss.backward()
        unet.zero_grad(set_to_none=True)
        out[k] = {
            "forward": fwd.get_total_flops() / batch,
            "backward": bwd.get_total_flops() / batch,
            "params": sum(p.numel() for p in unet.parameters()),
            "image_size": imagen.image_sizes[k - 1],
        }
    return out


def grid_compute(per_mode: dict, cfg: dict, n_systems: dict, test_clips: int) -> dict:
    """Totals for params/paper.yaml: training FLOPs per unet (3 passes: forward + backward) x batch x steps, and
    evaluation FLOPs per system (unet forwards over sampling steps x scales x clips)."""
    steps, batch = int(cfg["train"]["steps"]), int(cfg["train"]["batch_size"]) * int(cfg["train"].get("grad_accum", 1))
    scales = [float(s) for s in cfg["evaluate"]["scales"]]
    passes = sum(1 if s in (0.0, 1.0) else 2 for s in scales)  # unguided at 0 (null only) and 1 (conditional only)
    sampling_steps = int(cfg["evaluate"]["sampling_steps"])
    rows = []
    for mode, unets in per_mode.items():
        for k, f in unets.items():
            train = (f["forward"] + f["backward"]) * batch * steps
            sample = f["forward"] * sampling_steps * passes * test_clips
            rows.append({"mode": mode, "unet": k, **f, "train_flops": train, "sample_flops": sample})
    total_train = sum(r["train_flops"] * n_systems[r["mode"]] for r in rows)
    total_sample = sum(r["sample_flops"] * n_systems[r["mode"]] for r in rows)
    return {
        "rows": rows,
        "steps": steps,
        "batch": batch,
        "sampling_steps": sampling_steps,
        "scales": scales,
        "passes_per_step": passes,
        "test_clips": test_clips,
        "systems": n_systems,
        "total_train_flops": total_train,
        "total_sample_flops": total_sample,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params/paper.yaml")
    ap.add_argument("--device", default="meta", help="meta (shapes only, no memory) or cpu")
    ap.add_argument("--batch", type=int, default=2, help="batch of the counted step (FLOPs are per sample)")
    ap.add_argument("--test-clips", type=int, default=118, help="the SLF evaluation set")
    ap.add_argument("--gpu", default="H100 bf16", help=f"one of {list(PEAKS)} (or give --peak-tflops)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense peak of the assumed GPU, TFLOP/s")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed sustained share of the peak")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)

    import slf_utils  # noqa: F401  (offline switches before imagen_pytorch)
    from slf_utils import diffusion
    from slf_utils.config import load_params
    from slf_utils.layout import load_layout, load_systems

    cfg = load_params(args.params)
    preset = diffusion.resolve_preset(cfg["model"])
    systems = load_systems(cfg["systems_file"], load_layout(cfg))
    n_systems = {m: sum(systems[s].mode == m for s in cfg["systems"]) for m in ("generation", "super_resolution")}
    t0 = time.perf_counter()
    per_mode = {m: unet_flops(m, preset, args.batch, args.device) for m in ("generation", "super_resolution")}
    seconds = time.perf_counter() - t0
    res = grid_compute(per_mode, cfg, n_systems, args.test_clips)
    peak = args.peak_tflops or PEAKS[args.gpu]
    rate = peak * 1e12 * args.mfu  # sustained FLOP/s
    hours = lambda flops: flops / rate / 3600

    print(f"preset '{preset['name']}', counted on {args.device} at batch {args.batch} in {seconds:.0f} s")
    print(
        f"assumed GPU: {args.gpu if not args.peak_tflops else f'{peak:g} TFLOP/s peak'}, {peak:g} TFLOP/s dense peak "
        f"x {args.mfu:.0%} MFU = {rate / 1e12:.0f} TFLOP/s sustained"
    )
    print(
        f"training: {res['steps']:,} steps x batch {res['batch']} per unet; sampling: {res['sampling_steps']} steps x "
        f"{len(res['scales'])} scales ({res['passes_per_step']} unet passes per step and image over the scales) x "
        f"{res['test_clips']} clips per system\n"
    )
    head = (
        "| cascade | unet | px | parameters | fwd GFLOP/sample | fwd+bwd GFLOP/sample | training PFLOP | "
        "GPU-h training | sampling PFLOP | GPU-h sampling |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in res["rows"]:
        cells = (r["forward"] / 1e9, (r["forward"] + r["backward"]) / 1e9, r["train_flops"] / 1e15)
        cells += (hours(r["train_flops"]), r["sample_flops"] / 1e15, hours(r["sample_flops"]))
        print(
            f"| {r['mode']} | {r['unet']} | {r['image_size']} | {r['params'] / 1e6:.0f} M | "
            + " | ".join(_num(c) for c in cells)
            + " |"
        )
    n = res["systems"]
    print(
        f"\ngrid ({n['super_resolution']} super-resolution + {n['generation']} generation systems): training "
        f"{res['total_train_flops'] / 1e18:,.1f} EFLOP = {hours(res['total_train_flops']):,.0f} GPU-h, sampling "
        f"{res['total_sample_flops'] / 1e15:,.0f} PFLOP = {hours(res['total_sample_flops']):,.1f} GPU-h"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**res, "peak_tflops": peak, "mfu": args.mfu, "device": args.device}, f, indent=1)


if __name__ == "__main__":
    main()
