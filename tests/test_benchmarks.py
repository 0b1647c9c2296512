"""The benchmarks run (issue 11): `benchmarks/sampling.py --quick` on a tiny trained system and a synthetic store."""

import importlib.util
import math

import pytest
import yaml

from slf_utils.config import ROOT


def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_sampling_benchmark_quick_mode(tmp_path):
    """Train the tiny preset's full_input (super-resolution) for 4 steps on 4 identities x 4 clips, then run the
    sampling benchmark's command line in quick mode: one row per requested step count with a recall@1 in [0, 1]
    inside its CI, positive times, and the guided-step timing of the last unet."""
    from slf_utils import diffusion
    from slf_utils.config import load_params
    from slf_utils.layout import Layout, synthetic_store

    p = tmp_path / "grid.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "name": "bench",
                "results": str(tmp_path / "results"),
                "systems": ["full_input"],
                "model": {"preset": "tiny"},
                "train": {"steps": 4, "batch_size": 4, "lr": 3e-3, "seed": 0, "checkpoint_every": 4},
                "evaluate": {"face_model": "eigenfaces", "bootstrap": 100, "batch_size": 8},
            }
        )
    )
    cfg = load_params(p)
    synthetic_store(
        tmp_path / "results" / "store",
        n_identities=4,
        clips_per_identity=4,
        face_size=16,
        layout=Layout.load(cfg["layout"]),
    )
    diffusion.train(cfg, "full_input")

    out = load_benchmark("sampling").main(["--params", str(p), "--system", "full_input", "--quick", "--steps", "3,2"])

    rows = out["steps"]
    assert [r["steps"] for r in rows] == [3, 2]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("seconds", "recall@1", "ci_low", "ci_high", "speedup"))
        assert r["seconds"] > 0 and 0 <= r["ci_low"] <= r["recall@1"] <= r["ci_high"] <= 1
        assert r["n"] == 8  # the 8 test clips of the store (quick mode: at most 8)
    assert rows[0]["speedup"] == 1 and rows[0]["inside_reference_ci"]
    g = out["guidance"]
    assert g["batch"] == 2 and g["unet"] == 2 and g["image_size"] == 16
    assert g["sequential_s"] > 0 and g["batched_s"] > 0 and g["speedup"] > 0
    assert g["max_abs_diff"] < 1e-4  # batched guidance is the same computation
    assert g["source"].endswith("model")  # the trained checkpoint, not the untrained preset


@pytest.mark.slow
def test_paper_flops_times_each_unet(tmp_path):
    """`benchmarks/paper_flops.py --time-steps` on the demo preset (CPU): a positive measured step time, achieved
    rate and GPU hours for every trained unet of both cascades, written to the json."""
    import json

    out = tmp_path / "flops.json"
    params = str(ROOT / "params" / "compare.yaml")
    load_benchmark("paper_flops").main(
        ["--params", params, *"--device cpu --time-steps 1 --warmup 0".split(), "--json", str(out)]
    )
    res = json.loads(out.read_text())
    rows = res["timing"]["rows"]
    assert [(r["mode"], r["unet"]) for r in rows] == [(r["mode"], r["unet"]) for r in res["rows"]] and rows
    assert all(r["seconds_per_step"] > 0 and r["achieved_tflops"] > 0 and r["train_hours"] > 0 for r in rows)
    assert res["timing"]["total_train_hours"] > 0


@pytest.mark.slow
def test_kernel_env_benchmark_sees_the_page_faults_dasks_malloc_setting_costs():
    """`benchmarks/kernel_env.py`: the same training steps under a Dask worker's environment fault in more pages than
    under the grid kernel's (glibc returns freed blocks above 64 KB to the OS and takes them back every step)."""
    med = load_benchmark("kernel_env").main(["--steps", "20", "--rounds", "1", "--clips", "16"])
    dask, kernel = med["Dask worker's"], med["grid kernel's"]
    assert dask["minflt"] > 2 * kernel["minflt"] and dask["sys"] > kernel["sys"]
