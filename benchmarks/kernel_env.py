"""A grid step's kernel environment against the one Dask hands its workers: demo-preset training steps, side by side.

    python benchmarks/kernel_env.py [--steps 150] [--rounds 2] [--system speaker_embeddings_only]

Dask's nanny starts workers with `distributed.nanny.pre-spawn-environ` (MALLOC_TRIM_THRESHOLD_=65536 among it), and a
papermill kernel started from a worker inherits it. `notebook_run.kernel_environ` drops the malloc setting. Each round
trains `--steps` steps in a fresh process under each environment (alternating, a synthetic store in a temporary folder)
and reads the process's wall time, user and system CPU and minor page faults; printed are the medians and their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from slf_utils import diffusion
from slf_utils.config import load_params
train = {"steps": int(sys.argv[4]), "checkpoint_every": 10**6}
cfg = load_params(sys.argv[1], {"results": sys.argv[2], "train": train})
r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
diffusion.train(cfg, sys.argv[3], out_dir=sys.argv[5])
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall": time.perf_counter() - t, "user": r1.ru_utime - r0.ru_utime,
                  "sys": r1.ru_stime - r0.ru_stime, "minflt": r1.ru_minflt - r0.ru_minflt}))
"""


def dask_worker_environ() -> dict:
    """os.environ plus what Dask's nanny sets before it spawns a worker."""
    import dask.config
    import distributed  # noqa: F401  (registers the distributed config defaults)

    pre = dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}
    return dict(os.environ) | {k: str(v) for k, v in pre.items()}


def run(env: dict, params: str, results: str, system: str, steps: int, tmp: Path) -> dict:
    out = tempfile.mkdtemp(dir=tmp)
    args = [sys.executable, "-c", CHILD, params, results, system, str(steps), out]
    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    from slf_utils.notebook_run import kernel_environ
    from slf_utils.synthetic import synthetic_store

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--system", default="speaker_embeddings_only")
    ap.add_argument("--clips", type=int, default=64, help="synthetic store size (4 clips an identity)")
    args = ap.parse_args(argv)

    dask_env = dask_worker_environ()
    envs = {"Dask worker's": dask_env, "grid kernel's": kernel_environ(1, dask_env)}
    print(f"Dask worker adds: {json.dumps({k: v for k, v in dask_env.items() if os.environ.get(k) != v})}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = tmp / "params.yaml"
        params.write_text(f"name: bench\nlayout: {ROOT / 'params' / 'layout.yaml'}\nmodel: {{preset: demo}}\n")
        # the demo's face size: preprocessing stores 64 px crops, the demo preset trains at 16 px
        synthetic_store(tmp / "results" / "store", n_identities=max(1, args.clips // 4), face_size=64)
        res = {name: [] for name in envs}
        for _ in range(args.rounds):
            for name, env in envs.items():
                res[name].append(run(env, str(params), str(tmp / "results"), args.system, args.steps, tmp))
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in res.items()}
    print(f"{args.steps} training steps of {args.system} (demo preset, one thread), median of {args.rounds} rounds")
    print("| environment | wall s | user s | sys s | minor page faults |\n|---|---|---|---|---|")
    for name, m in med.items():
        print(f"| {name} | {m['wall']:.1f} | {m['user']:.1f} | {m['sys']:.1f} | {m['minflt']:,.0f} |")
    a, b = med["Dask worker's"], med["grid kernel's"]
    ratio = f"wall {a['wall'] / b['wall']:.2f}x, page faults {a['minflt'] / b['minflt']:.1f}x"
    print(f"\nDask worker's / grid kernel's: {ratio}")
    return med


if __name__ == "__main__":
    main()
