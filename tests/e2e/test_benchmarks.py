"""The benchmarks run (issue 11): `benchmarks/sampling.py --quick` on a tiny trained system and a synthetic store."""

import importlib.util
import math

import pandas as pd
import pytest
import yaml

from slf_utils.basics import ROOT


def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_sampling_benchmark_quick_mode(tmp_path):
    """Train the tiny preset's full_input (super-resolution) for 4 steps on 4 identities x 4 clips, then run the
    sampling benchmark's command line in quick mode: one row per requested step count with a recall@1 in [0, 1]
    inside its CI, positive times, the guided-step timing of the last unet, and every scale in one pass against one
    pass per scale (evaluation.generate both times)."""
    from slf_utils import diffusion
    from slf_utils.config import load_params
    from slf_utils.layout import Layout
    from slf_utils.synthetic import synthetic_store

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

    out = load_benchmark("sampling").main(["--params", str(p), "--system", "full_input", "--quick", "--steps", "6,2"])

    rows = out["steps"]
    assert [r["steps"] for r in rows] == [6, 2]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("seconds", "recall@1", "ci_low", "ci_high", "speedup"))
        assert 0 <= r["ci_low"] <= r["recall@1"] <= r["ci_high"] <= 1
        assert r["n"] == 8  # the 8 test clips of the store (quick mode: at most 8)
        assert r["recall@1"] * 8 == pytest.approx(round(r["recall@1"] * 8))  # hits out of 8 clips
    ref, few = rows
    assert few["speedup"] == pytest.approx(ref["seconds"] / few["seconds"])
    assert few["speedup"] > 1.5  # a third of the unet calls (3x in theory; per-call overhead takes some)
    assert few["inside_reference_ci"] == (ref["ci_low"] <= few["recall@1"] <= ref["ci_high"])
    g = out["guidance"]
    assert g["batch"] == 2 and g["unet"] == 2 and g["image_size"] == 16 and g["threads"] == 1
    assert g["speedup"] == pytest.approx(g["sequential_s"] / g["batched_s"])
    assert g["max_abs_diff"] < 1e-4  # batched guidance is the same computation
    assert g["source"].endswith("model")  # the trained checkpoint, not the untrained preset
    s = out["scales"]  # every scale of the sweep, one pass per scale against all in one pass (evaluate.batch_scales)
    assert s["scales"] == [float(x) for x in cfg["evaluate"]["scales"]] and s["clips"] == 8 and s["sampling_steps"] == 2
    assert s["speedup"] == pytest.approx(s["per_scale_s"] / s["batched_s"])
    assert s["max_pixel_diff"] <= 1  # the same faces (the same noise per clip and scale), float rounding aside
    assert set(s["recall@1"]) == {str(x) for x in s["scales"]}


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
    batch = res["timing"]["batch"]
    for t, c in zip(rows, res["rows"]):
        assert t["device"] == "cpu" and t["mfu"] is None and len(t["step_seconds"]) == 1
        assert t["seconds_per_step"] == t["step_seconds"][0]  # the median of the one timed step
        # the rate is the counted FLOPs of the step over its time, and the hours the grid's FLOPs at that rate
        rate = t["achieved_tflops"] * 1e12
        assert rate * t["seconds_per_step"] == pytest.approx((c["forward"] + c["backward"]) * batch)
        assert t["train_hours"] * 3600 * rate == pytest.approx(c["train_flops"])
        assert 1e-4 < t["achieved_tflops"] < 5  # a CPU in fp32: far below any GPU, above nothing
    n = res["systems"]
    total = res["timing"]["total_train_hours"]
    assert total == pytest.approx(sum(t["train_hours"] * n[t["mode"]] for t in rows))
    # this CPU is slower than the assumed H100 at 40 % MFU, so the measured hours exceed the assumed ones
    assert total > res["total_train_flops"] / (res["peak_tflops"] * 1e12 * res["mfu"]) / 3600


@pytest.mark.slow
def test_kernel_env_benchmark_sees_the_page_faults_dasks_malloc_setting_costs():
    """`benchmarks/kernel_env.py`: the same training steps under a Dask worker's environment fault in more pages than
    under the grid kernel's (glibc returns freed blocks above 64 KB to the OS and takes them back every step)."""
    med = load_benchmark("kernel_env").main(["--steps", "20", "--rounds", "1", "--clips", "16"])
    dask, kernel = med["Dask worker's"], med["grid kernel's"]
    assert dask["minflt"] > 2 * kernel["minflt"] and dask["sys"] > kernel["sys"]


@pytest.mark.slow
def test_train_speed_compares_levers_side_by_side_on_the_trainer_training_builds():
    """`benchmarks/train_speed.py` on the demo generation unet (params/demo.yaml's speaker_embeddings_only, through
    imagen_trainer.make_trainer): a second eager run (`same`) learns exactly what eager learns, fused Adam the same
    within float noise, plain Adam (no foreach) exactly; every row has its ratio and projected whole training."""
    res = load_benchmark("train_speed").main(
        ["--setups", "demo_generation", "--levers", "same,fused,plain", "--steps", "3", "--warmup", "1"]
    )
    rows = {r["lever"]: r for r in res["demo_generation"]["rows"]}
    assert list(rows) == ["eager", "same", "fused", "plain"]
    eager = rows["eager"]
    assert eager["system"] == "speaker_embeddings_only" and eager["batch"] == 16 and eager["train_steps"] == 3500
    assert eager["eager_over_lever"] == 1 and eager["whole_training_ratio"] == 1 and eager["max_loss_diff"] == 0
    assert rows["same"]["max_loss_diff"] == 0 and rows["plain"]["max_loss_diff"] == 0  # the same arithmetic
    assert rows["fused"]["max_loss_diff"] < 1e-4  # at most float noise (another summation order), not another model
    for r in rows.values():
        assert len(r["step_seconds"]) == 4 and r["seconds_per_step"] > 0 and 0.1 < r["eager_over_lever"] < 10
        times = r["step_seconds"][1:]
        assert r["seconds_per_step"] == pytest.approx(sorted(times)[1], abs=1e-4)  # the median of the timed steps
        assert r["projected_train_s"] == pytest.approx(
            3500 * eager["seconds_per_step"] / r["eager_over_lever"] + max(r["first_step_extra_s"], 0)
        )


@pytest.mark.slow
def test_floor_headroom_scores_as_evaluation_does(tmp_path):
    """`benchmarks/floor_headroom.py` (issue 26) on a tiny trained Full Input: its bicubic, real-face and per-scale
    rows equal what notebook 04 scored for the same clips, and the mean of two scales' draws is scored beside them."""
    from slf_utils import diffusion
    from slf_utils import evaluation as ev
    from slf_utils.config import load_params
    from slf_utils.layout import Layout
    from slf_utils.results import Results
    from slf_utils.synthetic import synthetic_store

    p = tmp_path / "grid.yaml"
    spec = {
        "name": "headroom",
        "results": str(tmp_path / "results"),
        "systems": ["full_input", "bicubic", "real_face"],
        "model": {"preset": "tiny"},
        "train": {"steps": 4, "batch_size": 4, "lr": 3e-3, "seed": 0, "checkpoint_every": 4},
        "evaluate": {"face_model": "eigenfaces", "bootstrap": 100, "scales": [0, 1], "sampling_steps": 3},
    }
    p.write_text(yaml.safe_dump(spec))
    cfg = load_params(p)
    lay = Layout.load(cfg["layout"])
    synthetic_store(tmp_path / "results" / "store", n_identities=4, clips_per_identity=4, face_size=16, layout=lay)
    diffusion.train(cfg, "full_input")
    scored = {}
    for s in spec["systems"]:
        m = ev.run(cfg, s, log=lambda *a: None)
        m = m[(m["split"] == "test") & (m["protocol"] == "identity") & (m["metric"] == "recall@1")]
        scored |= {(s, None if pd.isna(x) else int(x)): v for x, v in zip(m["scale"], m["value"])}

    rows = load_benchmark("floor_headroom").main([str(p), "--system", "full_input", "--scales", "0,1"])
    got = {r["row"]: r for r in rows}
    draws = {f"full_input scale {x}" for x in (0, 1)} | {"full_input mean of scales 0,1"}
    assert set(got) == {"real_face", "bicubic"} | draws
    assert got["bicubic"]["recall@1"] == pytest.approx(scored["bicubic", None], abs=1e-4)
    assert got["real_face"]["recall@1"] == pytest.approx(scored["real_face", None], abs=1e-4)
    for x in (0, 1):
        assert got[f"full_input scale {x}"]["recall@1"] == pytest.approx(scored["full_input", x], abs=1e-4)
    assert 0 <= got["full_input mean of scales 0,1"]["recall@10"] <= 1
    assert (Results.of(cfg).eval("full_input") / "recipe.json").exists()  # what was scored, saved beside it
