"""The paper grid's compute, from measured FLOPs: forward and backward FLOPs per training sample of each paper unet
(torch.utils.flop_counter.FlopCounterMode over one training step of imagen-pytorch), scaled to params/paper.yaml
(train.steps x train.batch_size per unet; evaluate.sampling_steps x scales x test clips for sampling), and the GPU
hours that takes at a stated sustained throughput - or, with --time-steps, at the throughput measured on this machine.

    python benchmarks/paper_flops.py                      # meta device: exact shapes, no memory, ~1 min
    python benchmarks/paper_flops.py --device cpu         # the same count on real tensors (~12 GB, minutes)
    python benchmarks/paper_flops.py --peak-tflops 312 --mfu 0.4   # another GPU (A100 bf16 dense)
    python benchmarks/paper_flops.py --time-steps 10 --precision bf16 --train-batch 32   # + measured step times

What is counted: FlopCounterMode counts matrix products (linear, convolution, attention) - 2 FLOPs per
multiply-add - and neither the elementwise ops (normalisation, activations, the loss) nor the optimizer; that is
also how model-FLOPs utilisation (MFU) is defined, so FLOPs / (peak x MFU) is the time at that utilisation. FLOPs
per sample are independent of the batch (checked: --batch changes nothing per sample) and of the feature rows kept
(masked rows are computed too). Sampling: one unet forward per step and image, two with classifier-free guidance
(the conditional and the null pass; the workbook batches them), one at scales 0 and 1 (sampling._guided_forward).

What is measured (--time-steps N): each trained unet in an ImagenTrainer set up as diffusion._train_unet sets it up
(the preset's trainer options, train.lr and train.ema; CUDA when there is one, else the CPU), --warmup untimed
steps, then the median of N timed ones (forward + backward in chunks of --micro-batch, optimizer and EMA update;
CUDA synchronised before each clock read) on random images and feature rows (40 of 256 filled) of the real shapes.
Achieved TFLOP/s = the counted fwd+bwd FLOPs x batch / seconds per step - what the step really costs (elementwise
ops, optimizer, EMA) is in the seconds, not the FLOPs, as MFU counts - and MFU = that / the --gpu / --peak-tflops
peak. The measured GPU hours scale each unet's FLOPs of train.steps x train.batch_size at its measured rate (a
smaller --train-batch than the grid's assumes that rate holds at the grid's batch).
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def time_unet(
    mode: str, preset: dict, k: int, batch: int, micro: int, steps: int, warmup=3, precision="fp32", lr=1e-4, ema=False
) -> dict:
    """Seconds per training step of unet k of the `mode` cascade in an ImagenTrainer as diffusion._train_unet makes
    it (on the device Accelerate picks: CUDA when there is one): the median of `steps` steps after `warmup`."""
    import gc

    from imagen_pytorch import ImagenTrainer

    from slf_utils import diffusion, imagen_trainer

    torch.manual_seed(0)
    imagen = diffusion.build_imagen(mode, preset)
    # explicit either way, so that the label says what ran whatever the preset's trainer options set
    mixed = {"fp16": False, "precision": "bf16" if precision == "bf16" else "no"}
    trainer = ImagenTrainer(
        imagen,
        only_train_unet_number=k,
        use_ema=ema,
        lr=lr,
        verbose=False,
        **{**imagen_trainer.trainer_options(preset), **mixed},  # the speed levers (compile, ...) are not its arguments
    )
    dev = trainer.device
    cuda = dev.type == "cuda"
    size, dim = max(preset[mode]["image_sizes"]), preset["text_embed_dim"]
    # made on the device: the host copy is the data loader's share of a step (train's data_wait_share), not the unet's
    images = torch.rand(batch, 3, size, size, device=dev)
    X = torch.zeros(batch, 256, dim, device=dev)
    X[:, :40] = torch.randn(batch, 40, dim, device=dev)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    sync = torch.cuda.synchronize if cuda else lambda: None  # CUDA kernels run ahead of the clock
    times = []
    for _ in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        trainer(images, text_embeds=X, unet_number=k, max_batch_size=micro)
        trainer.update(unet_number=k)
        sync()
        times.append(time.perf_counter() - t0)
    out = {
        "seconds_per_step": statistics.median(times[warmup:]),
        "step_seconds": times[warmup:],
        "device": str(dev),
        "peak_memory_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None,
    }
    del trainer, imagen, images, X
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
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
    ap.add_argument("--time-steps", type=int, default=0, help="also time this many training steps per unet (0: off)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before them (allocations, autotuning)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="of the timed steps (Accelerate)")
    ap.add_argument("--train-batch", type=int, default=None, help="timed batch (default: the grid's)")
    ap.add_argument("--micro-batch", type=int, default=None, help="its chunks (default: train.batch_size, as train)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)

    import slf_utils  # noqa: F401  (offline switches before imagen_pytorch)
    from slf_utils import recipe
    from slf_utils.config import load_params
    from slf_utils.layout import load_layout, load_systems

    cfg = load_params(args.params)
    preset = recipe.resolve_preset(cfg["model"])
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
    out = {**res, "peak_tflops": peak, "mfu": args.mfu, "device": args.device}
    if args.time_steps > 0:
        out["timing"] = _timing(res, cfg, preset, peak, hours, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


def _timing(res: dict, cfg: dict, preset: dict, peak: float, hours, args) -> dict:
    """Time each unet's training step (time_unet), print the measured table and grid totals, and return them."""
    # one step of train is batch_size x grad_accum samples in chunks of batch_size (diffusion._train_unet)
    batch = args.train_batch or res["batch"]
    micro = args.micro_batch or min(batch, int(cfg["train"]["batch_size"]))
    t_cfg = {"lr": float(cfg["train"]["lr"]), "ema": bool(cfg["train"]["ema"])}
    rows = []
    for r in res["rows"]:
        t = time_unet(r["mode"], preset, r["unet"], batch, micro, args.time_steps, args.warmup, args.precision, **t_cfg)
        rate = (r["forward"] + r["backward"]) * batch / t["seconds_per_step"]  # achieved model FLOP/s
        on_gpu = t["device"].startswith("cuda")
        rows.append(
            {
                "mode": r["mode"],
                "unet": r["unet"],
                "image_size": r["image_size"],
                "batch": batch,
                **t,
                "achieved_tflops": rate / 1e12,
                "mfu": rate / (peak * 1e12) if on_gpu else None,  # a GPU's peak says nothing of a CPU
                "train_hours": r["train_flops"] / rate / 3600,
                # forwards at the training step's rate: sampling batches are smaller, so a lower bound
                "sample_hours": r["sample_flops"] / rate / 3600,
            }
        )
    cuda = any(r["device"].startswith("cuda") for r in rows)
    n = res["systems"]
    info = {
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "precision": args.precision,
        "batch": batch,
        "micro_batch": micro,
        "warmup": args.warmup,
        "steps": args.time_steps,
        "rows": rows,
        "total_train_hours": sum(r["train_hours"] * n[r["mode"]] for r in rows),
        "total_sample_hours": sum(r["sample_hours"] * n[r["mode"]] for r in rows),
    }
    print(
        f"\nmeasured on {info['device_name']} (torch {info['torch']}, {args.precision}): median of "
        f"{args.time_steps} steps after {args.warmup} warm-up, batch {batch} in chunks of {micro}; MFU against "
        f"{peak:g} TFLOP/s\n"
    )
    head = (
        "| cascade | unet | px | batch | s/step (measured, device) | achieved TFLOP/s | MFU | "
        f"GPU-h for {res['steps']:,} steps at this rate | peak GiB |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        mem = "-" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f}"
        print(
            f"| {r['mode']} | {r['unet']} | {r['image_size']} | {batch} | {r['seconds_per_step']:.3g} "
            f"({r['device']}) | {_num(r['achieved_tflops'])} | {mfu} | {_num(r['train_hours'])} | {mem} |"
        )
    print(
        f"\ngrid at the measured rates: training {_num(info['total_train_hours'])} GPU-h "
        f"(against {_num(hours(res['total_train_flops']))} at {args.mfu:.0%} MFU), sampling "
        f"{_num(info['total_sample_hours'])} GPU-h at the training steps' rates (a lower bound)"
    )
    return info


if __name__ == "__main__":
    main()
