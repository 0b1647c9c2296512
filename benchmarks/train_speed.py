"""Training speed levers (issue 29), side by side: training steps of a system's unet in the ImagenTrainer that
training builds (imagen_trainer.make_trainer, the recipe of params/<grid>.yaml resolved by recipe.resolve_recipe),
eager against each lever in one process, interleaved step by step in a new random order every round so that the
machine's noise hits all of them, on the same random batches of the real shapes from the same seed.

    python benchmarks/train_speed.py                                 # demo generation + super-resolution, paper unet
    python benchmarks/train_speed.py --setups demo_generation --levers compile,compile+fused --steps 40
    python benchmarks/train_speed.py --compile-cache                 # compiled: fresh processes, cold then warm cache
    python benchmarks/train_speed.py --two-trainings                 # 2 trainings at once: 1 vs 2 threads each
    python benchmarks/train_speed.py --profile --levers compile+fused   # torch.profiler top operators, eager vs levers

Levers (model.trainer keys of the preset, on top of the recipe's own trainer options with compile off; join them
with + to combine): same (a second eager run: the noise floor), compile (torch.compile of the unet, inductor),
channels_last, fused (Adam fused=True instead of foreach), plain (Adam without foreach: what foreach buys). Prints
per setup and lever: seconds per step (median of the timed steps), eager / lever (median of the step-by-step
ratios), the first step beyond a median one (compilation), the projected whole training of the recipe's
train.steps (first step included), and the largest loss difference to eager (a lever must not change what is
learned beyond float noise; trajectories drift apart slowly, so also over the first five steps). The paper's unet
(~10 GB with Adam and EMA) runs each variant in a fresh process of its own instead, one after the other.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from slf_utils import diffusion, imagen_trainer, recipe
from slf_utils.basics import ROOT
from slf_utils.config import load_params

# name: (grid file, system, unet number, batch (None: the recipe's), default timed steps)
SETUPS = {
    "demo_generation": ("params/demo.yaml", "speaker_embeddings_only", 1, None, 30),
    "demo_super_resolution": ("params/demo.yaml", "full_input", 2, None, 30),
    "paper": ("params/paper.yaml", "no_image_guide", 1, 2, 3),  # the paper's 32 px unet: slow on a CPU
}
# lever: the model.trainer keys it sets (None: delete the key)
LEVERS = {
    "same": {},  # a second eager run: the noise floor of the comparison (A/A)
    "compile": {"compile": True},
    "channels_last": {"channels_last": True},
    "fused": {"foreach": None, "fused": True},
    "plain": {"foreach": False},
}
ROWS_FILLED = 40  # feature rows of 256 that carry values (the rest are zero: imagen-pytorch masks them)


def recipe_of(setup: str):
    params, system, k, batch, steps = SETUPS[setup]
    r = recipe.resolve_recipe(load_params(ROOT / params), system)
    return r, k, batch or int(r.train["batch_size"]), steps


def with_trainer(preset: dict, changes: dict) -> dict:
    """The preset with model.trainer keys set (a value None deletes the key)."""
    out = copy.deepcopy(preset)
    trainer = out.setdefault("trainer", {})
    for key, value in changes.items():
        if value is None:
            trainer.pop(key, None)
        else:
            trainer[key] = value
    return out


def batch_of(step: int, batch: int, size: int, dim: int, seed: int):
    """The step's random faces (batch, 3, size, size) in [0, 1] and feature matrices (40 of 256 rows filled)."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    X = torch.zeros(batch, 256, dim)
    X[:, :ROWS_FILLED] = torch.randn(batch, ROWS_FILLED, dim, generator=g)
    return torch.rand(batch, 3, size, size, generator=g), X


class Run:
    """One variant: its own cascade (initial weights from the recipe's seed, as diffusion._train) and trainer."""

    def __init__(self, name, r, preset, k):
        self.name, self.k = name, k
        torch.manual_seed(r.seed)
        self.imagen = diffusion.build_imagen(r.mode, preset)
        self.trainer = imagen_trainer.make_trainer(self.imagen, k, preset, r.train)
        self.times, self.losses = [], []

    def step(self, images, X, seed: int):
        torch.manual_seed(seed)  # the same noise levels, noise and cond-drop draws in every variant
        t0 = time.perf_counter()
        loss = diffusion._loss_step(self.trainer, images, X, self.k, len(images))
        self.trainer.update(unet_number=self.k)
        self.times.append(time.perf_counter() - t0)
        self.losses.append(loss)


def compare(setup: str, levers: list[str], steps: int | None = None, warmup: int = 2, log=print) -> dict:
    """Eager and each lever on `setup`, interleaved; one row per lever against eager."""
    r, k, batch, default_steps = recipe_of(setup)
    steps = steps or default_steps
    base = with_trainer(r.preset, {"compile": False})
    runs = [Run("eager", r, base, k)] + [Run(name, r, _combined(base, name.split("+")), k) for name in levers]
    size, dim = r.preset[r.mode]["image_sizes"][k - 1], r.preset["text_embed_dim"]
    order = torch.Generator().manual_seed(0)
    for step in range(warmup + steps):
        images, X = batch_of(step, batch, size, dim, r.seed)
        # a new order every round: no variant always runs first, or right after another one
        for run in [runs[i] for i in torch.randperm(len(runs), generator=order)]:
            run.step(images, X, seed=r.seed * 1_000_003 + step)
    eager = runs[0]
    eager_med, total = statistics.median(eager.times[warmup:]), int(r.train["steps"])
    rows = []
    for run in runs:
        med = statistics.median(run.times[warmup:])
        # the median of the step-by-step ratios: steps taken moments apart share the machine's load
        ratio = statistics.median(a / b for a, b in zip(eager.times[warmup:], run.times[warmup:]))
        first_extra = run.times[0] - med
        diffs = [abs(a - b) for a, b in zip(run.losses, eager.losses)]
        rows.append(
            {
                "setup": setup,
                "system": r.name,
                "unet": k,
                "batch": batch,
                "lever": run.name,
                "threads": torch.get_num_threads(),
                "seconds_per_step": med,
                "eager_over_lever": ratio,
                "first_step_extra_s": first_extra,
                "train_steps": total,
                # a whole training at the eager step time / ratio, plus the first step's extra (compilation)
                "projected_train_s": total * eager_med / ratio + max(first_extra, 0.0),
                "loss_last": run.losses[-1],
                "max_loss_diff": max(diffs),
                "max_loss_diff_first5": max(diffs[:5]),
                "step_seconds": [round(t, 4) for t in run.times],
            }
        )
    e = rows[0]
    log(
        f"\n{setup}: {r.name} unet {k} ({size} px), batch {batch}, {torch.get_num_threads()} thread(s), "
        f"median of {steps} steps after {warmup}; whole training = {total} steps"
    )
    log(
        f"{'lever':>22} {'s/step':>8} {'eager/lever':>11} {'1st step +s':>11} {'training s':>10} {'whole x':>8} "
        f"{'loss@N':>8} {'max|dloss|':>10} {'first 5':>9}"
    )
    for row in rows:
        row["whole_training_ratio"] = e["projected_train_s"] / row["projected_train_s"]
        log(
            f"{row['lever']:>22} {row['seconds_per_step']:8.4f} {row['eager_over_lever']:10.2f}x "
            f"{row['first_step_extra_s']:11.1f} {row['projected_train_s']:10.0f} {row['whole_training_ratio']:7.2f}x "
            f"{row['loss_last']:8.4f} {row['max_loss_diff']:10.2e} {row['max_loss_diff_first5']:9.2e}"
        )
    if sum("compile" in run.name for run in runs) > 1:
        log("  (compiled variants of one graph share this process's compilation: the first to run pays it;")
        log("   what a fresh process pays, with an empty and a filled inductor cache: --compile-cache)")
    del runs
    return {"setup": setup, "rows": rows}


# ---------------------------------------------------------------------- child processes
def _child(args: list[str], threads: int, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads), *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict | None:
    """The child's last line of output as JSON (None if it is not)."""
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"child benchmark failed ({proc.args}):\n{err[-3000:]}")
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return None


def single(setup: str, lever: str | None, steps: int, warmup: int = 1) -> dict:
    """One variant alone (a child process): its first step and median step."""
    r, k, batch, _ = recipe_of(setup)
    preset = _combined(with_trainer(r.preset, {"compile": False}), lever.split("+") if lever else [])
    t0 = time.perf_counter()
    run = Run(lever or "eager", r, preset, k)
    build = time.perf_counter() - t0
    size, dim = r.preset[r.mode]["image_sizes"][k - 1], r.preset["text_embed_dim"]
    for step in range(warmup + steps):
        run.step(*batch_of(step, batch, size, dim, r.seed), seed=step)
    return {
        "first_step_s": run.times[0],
        "seconds_per_step": statistics.median(run.times[warmup:]),
        "build_s": build,
        "losses": run.losses,
    }


def sequential(setup: str, levers: list[str], steps: int, rounds: int = 2, log=print) -> dict:
    """Eager and each lever in fresh processes one after the other, the order reversed every round (a unet too big
    for two copies side by side in memory: the paper's): s/step (median over rounds of each process's median),
    eager / lever, the first step, the largest loss difference to eager over the same seeded steps."""
    names = ["eager", *levers]
    runs = {n: [] for n in names}
    for i in range(rounds):
        for n in names if i % 2 == 0 else names[::-1]:
            lever = [] if n == "eager" else ["--single-lever", n]
            runs[n].append(_result(_child(["--single", setup, "--steps", str(steps), *lever], torch.get_num_threads())))
    med = {n: statistics.median(x["seconds_per_step"] for x in v) for n, v in runs.items()}
    rows = []
    for n, v in runs.items():
        diff = max(abs(a - b) for a, b in zip(v[0]["losses"], runs["eager"][0]["losses"]))
        rows.append(
            {
                "setup": setup,
                "lever": n,
                "seconds_per_step": med[n],
                "eager_over_lever": med["eager"] / med[n],
                "first_step_s": statistics.median(x["first_step_s"] for x in v),
                "max_loss_diff": diff,
            }
        )
    log(f"\n{setup}: each variant in its own process, {rounds} rounds of {steps} steps, order reversed each round")
    log(f"{'lever':>14} {'s/step':>8} {'eager/lever':>11} {'1st step s':>10} {'max|dloss|':>10}")
    for row in rows:
        log(
            f"{row['lever']:>14} {row['seconds_per_step']:8.3f} {row['eager_over_lever']:10.2f}x "
            f"{row['first_step_s']:10.1f} {row['max_loss_diff']:10.2e}"
        )
    return {"setup": setup, "rows": rows}


def compile_cache(setup: str, steps: int = 10, log=print) -> dict:
    """Eager against compiled in a fresh process with an empty inductor cache, then in a second fresh process with
    the cache the first one wrote (a grid's later trainings): the first step's compilation, the step ratio and the
    whole training (the recipe's train.steps) with that compilation, eager / compiled."""
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = {"TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor")}
        for name in ("cold", "warm"):
            path = Path(tmp) / f"{name}.json"
            args = ["--setups", setup, "--levers", "compile", "--steps", str(steps), "--json", str(path)]
            _result(_child(args, 1, env))
            res[name] = json.loads(path.read_text())[setup]["rows"][1]
    log(f"\n{setup}: eager vs compiled in fresh processes, one thread, {steps} steps each")
    log(f"  {'cache':>6} {'1st step +s':>11} {'eager/compiled':>14} {'whole training':>14}")
    for name, row in res.items():
        log(
            f"  {name:>6} {row['first_step_extra_s']:11.1f} {row['eager_over_lever']:13.2f}x "
            f"{row['whole_training_ratio']:13.2f}x  ({row['train_steps']} steps)"
        )
    return res


def two_trainings(setup: str, steps: int, rounds: int = 2, log=print) -> dict:
    """Two trainings on this machine's cores: two processes at once with 1 thread each (grid.threads_per_worker 1,
    two workers), two at once with 2 threads each, and one alone with 2 threads (one worker: the trainings in turn).
    The configurations alternate for `rounds` rounds; seconds per step of the pair = what two trainings cost."""
    args = ["--single", setup, "--steps", str(steps)]
    out = {"2 x 1 thread at once": [], "2 x 2 threads at once": [], "1 x 2 threads in turn": []}
    for _ in range(rounds):
        for name in out:
            threads, n = (1, 2) if name.startswith("2 x 1") else (2, 2) if name.startswith("2 x 2") else (2, 1)
            res = [_result(p) for p in [_child(args, threads) for _ in range(n)]]
            per_step = [x["seconds_per_step"] for x in res]
            # at once: the pair advances one step each per max(step); in turn: two steps one after the other
            out[name].append(max(per_step) if n == 2 else 2 * per_step[0])
    res = {name: statistics.median(v) for name, v in out.items()}
    ref = res["2 x 1 thread at once"]
    log(f"\n{setup}: two trainings, seconds per step of both (median of {rounds} rounds of {steps} steps)")
    for name, s in res.items():
        log(f"  {name:>22}: {s:.4f} s  ({ref / s:.2f}x of 2 x 1 thread at once)")
    return res


def profile(setup: str, levers: list[str], steps: int = 20, warmup: int = 3, top: int = 10, log=print) -> dict:
    """torch.profiler over `steps` training steps (after `warmup`), eager and with the levers: the top operators by
    self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    r, k, batch, _ = recipe_of(setup)
    size, dim = r.preset[r.mode]["image_sizes"][k - 1], r.preset["text_embed_dim"]
    base = with_trainer(r.preset, {"compile": False})
    out = {}
    levers = [v for name in levers for v in name.split("+")]
    for name, preset in (("eager", base), ("+".join(levers) or "eager", _combined(base, levers))):
        run = Run(name, r, preset, k)
        for step in range(warmup):
            run.step(*batch_of(step, batch, size, dim, r.seed), seed=step)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for step in range(warmup, warmup + steps):
                run.step(*batch_of(step, batch, size, dim, r.seed), seed=step)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        rows = [
            {
                "op": e.key,
                "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                "share": e.self_cpu_time_total / total,
                "calls_per_step": e.count / steps,
            }
            for e in events[:top]
        ]
        out[name] = {"rows": rows, "self_cpu_ms_per_step": total / 1e3 / steps}
        log(
            f"\n{setup} {name}: top {top} operators by self CPU time, {steps} steps ({total / 1e3 / steps:.1f} ms/step)"
        )
        log(f"  {'operator':<48} {'ms/step':>8} {'share':>6} {'calls/step':>10}")
        for row in rows:
            log(
                f"  {row['op'][:48]:<48} {row['self_cpu_ms_per_step']:8.2f} {row['share']:6.1%} "
                f"{row['calls_per_step']:10.0f}"
            )
    return out


def _combined(preset: dict, levers: list[str]) -> dict:
    for name in levers:
        preset = with_trainer(preset, LEVERS[name])
    return preset


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setups", default="demo_generation,demo_super_resolution,paper", help="comma list of SETUPS")
    ap.add_argument(
        "--levers",
        default="compile,channels_last,fused,plain,compile+fused",
        help="comma list of LEVERS, or of combinations joined by + (compile+fused)",
    )
    ap.add_argument("--paper-levers", default="channels_last,fused", help="levers of the paper setup (slow to compile)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: per setup)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first includes compilation)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    ap.add_argument("--compile-cache", action="store_true", help="first compiled step in fresh processes instead")
    ap.add_argument("--two-trainings", action="store_true", help="thread settings for two trainings at once instead")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of --two-trainings and of the paper's processes")
    ap.add_argument("--profile", action="store_true", help="torch.profiler top operators instead (first setup)")
    ap.add_argument("--single", default=None, help=argparse.SUPPRESS)  # a child process: one setup, one variant
    ap.add_argument("--single-lever", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    setups = [s for s in args.setups.split(",") if s]
    levers = [v for v in args.levers.split(",") if v]
    bad = [s for s in setups if s not in SETUPS] + [p for v in levers for p in v.split("+") if p not in LEVERS]
    if bad:
        ap.error(f"unknown setup(s)/lever(s) {bad}: setups {list(SETUPS)}, levers {list(LEVERS)}")
    if args.single:
        res = single(args.single, args.single_lever, args.steps or 5)
        print(json.dumps(res))
        return res
    if args.profile:
        res = profile(setups[0], levers, steps=args.steps or 20)
    elif args.compile_cache:
        res = {s: compile_cache(s, args.steps or 10) for s in setups}
    elif args.two_trainings:
        res = {s: two_trainings(s, args.steps or 20, args.rounds) for s in setups}
    else:
        paper_levers = [v for v in args.paper_levers.split(",") if v]
        # the paper unet with Adam's state and EMA is ~10 GB: one process at a time, not copies side by side
        res = {
            s: sequential(s, paper_levers, args.steps or SETUPS[s][4], args.rounds)
            if s == "paper"
            else compare(s, levers, args.steps, args.warmup)
            for s in setups
        }
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
