"""Issue 11.5: `accelerate launch` trains one unet in two processes whose gradients are all-reduced (CPU, gloo)."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from slf_utils.basics import ROOT
from slf_utils.synthetic import synthetic_store

# diffusion.main (the `python -m slf_utils.diffusion` entry point) with one addition: after training, every rank
# saves its own copy of the trained unet and the losses of its own batches. Only rank 0 writes the checkpoint.
RANK_DUMP = """
import sys

import torch

from slf_utils import diffusion, imagen_trainer

train_unet = diffusion._train_unet


def dumping(imagen, k, recipe, data, state, records, out):
    result = train_unet(imagen, k, recipe, data, state, records, out)
    p = imagen_trainer._processes()
    torch.save(
        {
            "rank": p.process_index,
            "processes": p.num_processes,
            "distributed_type": str(p.distributed_type),
            "unet": diffusion._cpu_state(imagen.unets[k - 1]),
            "losses": [r["loss"] for r in records if r["unet"] == k],
        },
        f"{out}/rank{p.process_index}.pt",
    )
    return result


diffusion._train_unet = dumping
diffusion.main(sys.argv[1:])
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes_all_reduce_gradients(tmp_path):
    """Each rank draws its own batches (the batch seed includes the rank), so the two copies of the unet end equal
    only if every step's gradients were averaged across the processes.

    On CPU, `accelerate launch --cpu --num_processes 2` starts ONE process (its simple launcher spreads CPU
    processes only through mpirun); `--multi_gpu` is accelerate's torchrun launcher, and ACCELERATE_USE_CPU=1 keeps
    its processes on the CPU, in a gloo process group (imagen_trainer._processes)."""
    synthetic_store(tmp_path / "results" / "store", n_identities=4, clips_per_identity=4, face_size=32)
    params = tmp_path / "t.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "results": str(tmp_path / "results"),
                "model": {"preset": "tiny"},
                "train": {"steps": 3, "batch_size": 2, "lr": 3e-3, "ema": True, "seed": 0, "checkpoint_every": 100},
            }
        )
    )
    script = tmp_path / "train_dumping_ranks.py"
    script.write_text(textwrap.dedent(RANK_DUMP))
    out = tmp_path / "model"
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    r = subprocess.run(
        [
            *(sys.executable, "-m", "accelerate.commands.launch"),
            *("--multi_gpu", "--num_processes", "2", "--num_machines", "1"),
            *("--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())),
            *(str(script), "train", str(params), "full_input", "--unet", "2", "--out", str(out)),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    printed = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 2 and all(p["steps"] == {"2": 3} for p in printed), r.stdout  # one line per rank

    ranks = [torch.load(out / f"rank{i}.pt", weights_only=True) for i in range(2)]
    assert [d["rank"] for d in ranks] == [0, 1] and {d["processes"] for d in ranks} == {2}
    assert {d["distributed_type"] for d in ranks} == {"DistributedType.MULTI_CPU"}
    # different data on each rank ...
    assert ranks[0]["losses"] != ranks[1]["losses"]
    # ... and the same weights: the gradients were all-reduced
    w0, w1 = ranks[0]["unet"], ranks[1]["unet"]
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    # rank 0 wrote the checkpoint; the record says two processes (the effective batch is batch_size x 2)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["steps"] == {"2": 3} and all(torch.equal(ck["unets"]["2"][k], w0[k]) for k in w0)
    assert json.loads((out / "provenance.json").read_text())["processes"] == 2
