"""Diffusion model: presets, both cascade modes, training (loss, resume, NaN), checkpoints, sampling, notebook 03."""

import inspect
import json
import math
from pathlib import Path

import helpers
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from slf_utils import diffusion, imagen_trainer, recipe, sampling, training_data
from slf_utils.basics import ROOT, ParamsError
from slf_utils.config import load_params
from slf_utils.layout import Layout, load_systems
from slf_utils.store import open_store
from slf_utils.synthetic import synthetic_store

TINY_UNET = {
    "dim": 8,
    "cond_dim": 16,
    "dim_mults": [1, 2],
    "num_resnet_blocks": 1,
    "layer_attns": [False, False],
    "layer_cross_attns": [False, True],
}
# for 128 px: downsample to 16 px before any (cross-)attention, or a CPU step takes seconds
CASCADE_UNET = {
    "dim": 8,
    "cond_dim": 16,
    "dim_mults": [1, 2, 2, 2],
    "num_resnet_blocks": 1,
    "layer_attns": False,
    "layer_cross_attns": [False, False, False, True],
}


def write_params(tmp_path, name="t", **train):
    return helpers.write_params(tmp_path, name, train={"steps": 4, "ema": True, **train})


@pytest.fixture(scope="module")
def trained(project):
    """Tiny full_input (super-resolution) and no_image_guide (generation) models, 4 steps each."""
    cfg = load_params(write_params(project))
    return cfg, {s: diffusion.train(cfg, s) for s in ("full_input", "no_image_guide")}


def test_paper_preset_is_spec_section_6():
    p = recipe.resolve_preset({"preset": "paper"})
    u1, u2 = p["unets"]
    assert u1 == {
        "dim": 192,
        "cond_dim": 512,
        "dim_mults": [1, 2, 4, 8],
        "num_resnet_blocks": 3,
        "layer_attns": [False, True, True, True],
        "layer_cross_attns": [False, True, True, True],
    }
    assert u2 == {
        "dim": 128,
        "cond_dim": 512,
        "dim_mults": [1, 2, 4, 8],
        "num_resnet_blocks": [2, 4, 8, 8],
        "layer_attns": [False, False, False, True],
        "layer_cross_attns": [False, False, False, True],
    }
    assert p["generation"]["image_sizes"] == [32, 128] and p["super_resolution"]["image_sizes"] == [8, 32, 128]
    assert p["text_embed_dim"] == 768 and p["timesteps"] == 1000


def test_small_presets_keep_attention_at_the_lowest_resolution_and_overrides_apply():
    for name in ("demo", "tiny"):
        p = recipe.resolve_preset({"preset": name})
        for u in p["unets"]:
            assert not any(u["layer_attns"][:-1]), f"{name}: self-attention above the lowest resolution"
    p = recipe.resolve_preset({"preset": "tiny", "timesteps": 3, "generation": {"image_sizes": [32]}})
    assert p["timesteps"] == 3 and p["generation"]["image_sizes"] == [32] and p["name"] == "tiny"
    with pytest.raises(ParamsError, match="unknown key"):
        recipe.resolve_preset({"preset": "tiny", "dimm": 3})
    with pytest.raises(ParamsError, match="no preset 'huge'"):
        recipe.resolve_preset({"preset": "huge"})


@pytest.mark.parametrize("mode, sizes", [("generation", [32, 128]), ("super_resolution", [8, 32, 128])])
def test_tiny_cascade_trains_and_samples_with_guidance(mode, sizes):
    """Issue 2: both cascade modes train on (B, 256, 768) feature matrices, one ImagenTrainer per unet, and sample
    with cond_scale != 1."""
    from imagen_pytorch import ImagenTrainer

    preset = recipe.resolve_preset({"preset": "tiny", "unets": [CASCADE_UNET] * 2, mode: {"image_sizes": sizes}})
    torch.manual_seed(0)
    imagen = diffusion.build_imagen(mode, preset)
    assert imagen.image_sizes == tuple(sizes) and diffusion.trained_unets(imagen) == (
        [1, 2] if mode == "generation" else [2, 3]
    )
    images = torch.rand(2, 3, 128, 128)
    X = torch.zeros(2, 256, 768)
    X[:, :40] = torch.randn(2, 40, 768)
    for k in diffusion.trained_unets(imagen):
        trainer = ImagenTrainer(imagen, only_train_unet_number=k, use_ema=False, lr=1e-3, verbose=False)
        for _ in range(2):
            loss = trainer(images, text_embeds=X, unet_number=k)
            trainer.update(unet_number=k)
        assert math.isfinite(loss)
    guides = (np.random.default_rng(0).random((2, 8, 8, 3)) * 255).astype(np.uint8) if mode != "generation" else None
    out = sampling.sample(imagen, X, cond_scale=3.0, guides=guides, steps=2, seed=0)
    assert out.shape == (2, 128, 128, 3) and out.dtype == np.uint8


def test_batched_guidance_equals_two_passes():
    from imagen_pytorch import Unet

    torch.manual_seed(0)
    unet = Unet(**TINY_UNET, text_embed_dim=768, attn_heads=2, attn_dim_head=8).eval()
    for p in unet.parameters():  # zero-initialised output conv would make every prediction 0
        p.data.normal_(0, 0.2)
    x, t = torch.randn(3, 3, 16, 16), torch.rand(3)
    X = torch.randn(3, 256, 768)
    kw = {"text_embeds": X, "text_mask": X.abs().sum(-1) > 0}
    with torch.no_grad():
        cond = unet.forward(x, t, cond_drop_prob=0.0, **kw)
        null = unet.forward(x, t, cond_drop_prob=1.0, **kw)
        with sampling._sampling(
            diffusion.build_imagen("generation", recipe.resolve_preset({"preset": "tiny"})), None, False
        ):
            guided = sampling._guided_forward(unet, x, t, cond_scale=2.5, **kw)
            zero = sampling._guided_forward(unet, x, t, cond_scale=0.0, **kw)
    assert torch.allclose(guided, null + (cond - null) * 2.5, atol=1e-4)
    assert torch.equal(zero, null)


def test_feature_row_path_is_computed_once_per_batch_with_the_same_faces(monkeypatch):
    from imagen_pytorch.imagen_pytorch import PerceiverResampler

    preset = recipe.resolve_preset({"preset": "tiny", "unet_common": {"attn_pool_text": True}})
    torch.manual_seed(0)
    imagen = diffusion.build_imagen("generation", preset).eval()
    for p in imagen.parameters():
        p.data.normal_(0, 0.2)
    X = torch.randn(3, 256, 768)
    X[:, 40:] = 0  # masked rows, as in a system that keeps few constituents
    unet = imagen.unets[0]
    calls, pool = [], PerceiverResampler.forward
    monkeypatch.setattr(PerceiverResampler, "forward", lambda self, *a, **k: calls.append(1) or pool(self, *a, **k))
    # batch_size 2: the second batch has other rows, so a stale cache would show
    memo = [sampling.sample(imagen, X, cond_scale=s, steps=4, seed=0, batch_size=2) for s in (0.0, 1.0, 2.5)]
    assert len(calls) == 3 * 2  # once per batch and scale, not once per step
    assert "forward" not in vars(unet.text_to_cond) and "forward" not in vars(unet.attn_pool)
    monkeypatch.setattr(sampling, "_memoised", lambda fn, same: fn)
    plain = [sampling.sample(imagen, X, cond_scale=s, steps=4, seed=0, batch_size=2) for s in (0.0, 1.0, 2.5)]
    for a, b in zip(memo, plain):
        assert np.array_equal(a, b)
    assert not np.array_equal(memo[0], memo[2])


def test_training_batches_reuse_buffers_correctly(project):
    cfg = load_params(write_params(project))
    store, layout = open_store(cfg), Layout.load(cfg["layout"])
    keep = load_systems(cfg["systems_file"], layout)["full_input"].keep
    ids = training_data.train_clip_ids(store, layout, keep)
    stats = layout.fit(store, ids, keep)
    cached = training_data._Batches(store, layout, keep, stats, ids, 16, cache=True)
    fresh = training_data._Batches(store, layout, keep, stats, ids, 16, cache=False)
    rng = np.random.default_rng(0)
    for _ in range(4):
        index = rng.choice(len(ids), 4, replace=False)
        drop = {n: rng.random(4) < 0.5 for n in layout.dropout_constituents}
        (a_img, a_x), (b_img, b_x) = cached.get(index, drop), fresh.get(index, drop)
        assert torch.equal(a_x, b_x) and torch.equal(a_img, b_img)


def test_training_lowers_the_loss(project, tmp_path):
    cfg = load_params(write_params(project, name="lower", steps=10, ema=False, checkpoint_every=100))
    result = diffusion.train(cfg, "no_image_guide", out_dir=tmp_path / "model")
    store = open_store(cfg)
    layout = Layout.load(cfg["layout"])
    keep = load_systems(cfg["systems_file"], layout)["no_image_guide"].keep
    ids = training_data.train_clip_ids(store, layout, keep)
    imagen, meta = sampling.load_model(result["model_dir"])
    X = layout.build(store, ids, keep, meta["stats"])
    images = torch.from_numpy(training_data.load_faces(store, ids, 16)).permute(0, 3, 1, 2).float() / 255
    torch.manual_seed(0)  # train() seeds the initial weights with train.seed
    initial = diffusion.build_imagen("generation", meta["preset"])
    before = diffusion.evaluate_loss(initial, images, X, 1, seeds=range(4))
    after = diffusion.evaluate_loss(imagen, images, X, 1, seeds=range(4))
    assert after < 0.9 * before, (before, after)
    assert result["steps"] == {"1": 10} and set(result["final_loss"]) == {"1"}


def test_training_writes_the_model_folder(trained):
    cfg, results = trained
    for system, r in results.items():
        d = ROOT / r["model_dir"]
        assert {p.name for p in d.iterdir()} >= {
            "checkpoint.pt",
            "provenance.json",
            "norm_stats.npz",
            "loss.csv",
            "loss.png",
        }
        ck = torch.load(d / "checkpoint.pt", weights_only=True)  # state dicts and plain data only
        assert ck["system"] == system and ck["steps"] == ({"2": 4} if system == "full_input" else {"1": 4})
        prov = json.loads((d / "provenance.json").read_text())
        assert prov["system"] == system and prov["seed"] == 0 and prov["preset_name"] == "tiny"
        assert prov["split"]["train_clips"] == 8 and "git_revision" in prov and "torch" in prov["packages"]
        loss = pd.read_csv(d / "loss.csv")
        assert loss["step"].tolist() == [1, 2, 3, 4] and np.isfinite(loss["loss"]).all()
        assert 0 <= r["data_wait_share"][next(iter(r["data_wait_share"]))] < 1


def test_resume_continues_from_the_saved_step_and_matches_an_uninterrupted_run(project, tmp_path):
    straight = diffusion.train(
        load_params(write_params(project, name="a", steps=3)), "full_input", out_dir=tmp_path / "straight"
    )
    first = diffusion.train(
        load_params(write_params(project, name="b", steps=2)), "full_input", out_dir=tmp_path / "resumed"
    )
    assert first["steps"] == {"2": 2}
    resumed = diffusion.train(
        load_params(write_params(project, name="b", steps=3)), "full_input", out_dir=tmp_path / "resumed"
    )
    assert resumed["steps"] == {"2": 3}
    loss = pd.read_csv(tmp_path / "resumed" / "loss.csv")
    assert loss["step"].tolist() == [1, 2, 3]
    a = diffusion.load_checkpoint(straight["model_dir"])
    b = diffusion.load_checkpoint(resumed["model_dir"])
    for key, w in a["unets"]["2"].items():
        assert torch.allclose(w, b["unets"]["2"][key], atol=1e-6), key
    for key, w in a["ema"]["2"].items():
        assert torch.allclose(w.float(), b["ema"]["2"][key].float(), atol=1e-6), key


def test_cosine_schedule_decays_to_zero_and_resumes_where_it_stopped(project, tmp_path):
    kw = {"ema": False, "lr_schedule": "cosine", "warmup_steps": 0}
    straight = diffusion.train(
        load_params(write_params(project, name="cs", steps=4, **kw)), "full_input", tmp_path / "s"
    )
    ck = diffusion.load_checkpoint(straight["model_dir"])
    sched = ck["schedulers"]["2"]["scheduler1"]
    assert sched["last_epoch"] == 4 and sched["T_max"] == 4 and sched["_last_lr"][0] < 1e-9
    diffusion.train(load_params(write_params(project, name="cr", steps=2, **kw)), "full_input", tmp_path / "r")
    resumed = diffusion.train(
        load_params(write_params(project, name="cr", steps=4, **kw)), "full_input", tmp_path / "r"
    )
    b = diffusion.load_checkpoint(resumed["model_dir"])
    assert b["schedulers"]["2"]["scheduler1"]["last_epoch"] == 4
    # the first run had decayed to 0 over its 2 steps: its weights differ from the straight run's
    assert not torch.allclose(ck["unets"]["2"]["final_conv.weight"], b["unets"]["2"]["final_conv.weight"])
    with pytest.raises(ParamsError, match="train.lr_schedule"):
        load_params(write_params(project, name="bad", lr_schedule="linear"))


def test_resume_refuses_a_different_configuration(project, tmp_path):
    diffusion.train(load_params(write_params(project, name="c", steps=1)), "full_input", out_dir=tmp_path / "m")
    with pytest.raises(ValueError, match="different system"):
        diffusion.train(load_params(write_params(project, name="c", steps=2)), "no_audio", out_dir=tmp_path / "m")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(project, tmp_path, monkeypatch):
    real, calls = diffusion._loss_step, []

    def failing(*args, **kwargs):
        calls.append(1)
        return float("nan") if len(calls) == 3 else real(*args, **kwargs)

    monkeypatch.setattr(diffusion, "_loss_step", failing)
    cfg = load_params(write_params(project, name="nan", steps=6))
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 3.*last good checkpoint.*step 2"):
        diffusion.train(cfg, "full_input", out_dir=tmp_path / "m")
    assert diffusion.load_checkpoint(tmp_path / "m")["steps"] == {"2": 2}
    assert pd.read_csv(tmp_path / "m" / "loss.csv")["step"].tolist() == [1, 2]


def test_random_selection_trains_nothing(project):
    cfg = load_params(write_params(project))
    assert diffusion.train(cfg, "random")["trained"] is False


def test_cond_scale_zero_ignores_the_feature_rows(trained):
    cfg, results = trained
    store = open_store(cfg)
    ids = store.clips(split="test")["clip_id"].tolist()[:3]
    for system, r in results.items():
        imagen, meta = sampling.load_model(r["model_dir"])
        guides = training_data.load_guides(store, ids) if meta["mode"] == "super_resolution" else None
        X1 = np.random.default_rng(1).normal(size=(3, 256, 768)).astype(np.float32)
        X2 = np.zeros_like(X1)
        X2[:, :5] = 3.0
        same = [sampling.sample(imagen, X, 0.0, guides=guides, steps=3, seed=7) for X in (X1, X2)]
        assert np.array_equal(*same), system
        guided = [sampling.sample(imagen, X, 4.0, guides=guides, steps=3, seed=7) for X in (X1, X2)]
        assert not np.array_equal(*guided), system
        again = sampling.sample(imagen, X1, 4.0, guides=guides, steps=3, seed=7)
        assert np.array_equal(again, guided[0])  # deterministic for a seed


def test_sampling_steps_and_ema_are_sampling_parameters(trained):
    _, results = trained
    imagen, meta = sampling.load_model(results["no_image_guide"]["model_dir"])
    assert meta["has_ema"] and meta["preset"]["timesteps"] == 8
    unet = imagen.unets[0]
    calls = []
    original = unet.forward
    unet.forward = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    X = np.ones((2, 256, 768), np.float32)
    for steps in (2, 5):
        calls.clear()
        sampling.sample(imagen, X, 2.0, steps=steps, seed=0)
        assert len(calls) == steps  # one batched (cond + null) forward per step
    del unet.forward
    assert [s.num_timesteps for s in imagen.noise_schedulers] == [8]
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    a = sampling.sample(imagen, X, 2.0, steps=3, seed=0, use_ema=True)
    b = sampling.sample(imagen, X, 2.0, steps=3, seed=0, use_ema=False)
    assert not np.array_equal(a, b)
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in weights.items())  # online weights restored


def test_d_training_and_evaluation_use_the_stored_crop_and_guide(project):
    """The stored face is only resized (never cropped again), and the low-resolution condition imagen-pytorch makes
    from it in training ('area' resize) equals the stored 8x8 guide that sampling starts from."""
    from slf_utils import evaluation, image_metrics, preprocessing, recognisers, references

    store = open_store({"results": str(project / "results")})
    ids = store.clips(split="test")["clip_id"].tolist()
    stored = store.load_stacked("preprocess", ids)
    assert np.array_equal(training_data.load_faces(store, ids, 32), stored["face"])
    assert np.array_equal(training_data.load_guides(store, ids), stored["guide"])
    faces16 = training_data.load_faces(store, ids, 16)
    assert np.array_equal(faces16[0], preprocessing.resize(stored["face"][0], 16))
    imagen = diffusion.build_imagen("super_resolution", recipe.resolve_preset({"preset": "tiny"}))
    x = torch.from_numpy(faces16).permute(0, 3, 1, 2).float() / 255
    lowres = imagen.resize_to(x, 8) * 255
    assert (lowres.permute(0, 2, 3, 1).numpy() - stored["guide"]).__abs__().max() <= 1.0
    source = "".join(inspect.getsource(m) for m in (evaluation, image_metrics, recognisers, references))
    assert "crop_face" not in source and "face_and_guide" not in source  # evaluation never re-crops


@pytest.mark.slow
def test_notebook_03_runs_for_a_generation_and_a_super_resolution_system(project, tmp_path):
    import papermill as pm

    params = write_params(project, name="nb", steps=2)
    results = tmp_path / "results"
    results.mkdir()
    (results / "store").symlink_to(project / "results" / "store")
    for system in ("no_image_guide", "full_input"):
        out = tmp_path / f"03_{system}.ipynb"
        pm.execute_notebook(
            str(ROOT / "notebooks" / "03_train.ipynb"),
            str(out),
            cwd=str(ROOT / "notebooks"),
            parameters={"params_file": str(params), "system": system, "overrides": {"results": str(results)}},
            kernel_name="python3",
            progress_bar=False,
        )
        assert diffusion.load_checkpoint(results / system / "model")["steps"] in ({"1": 2}, {"2": 2})
        text = out.read_text()
        assert "image/png" in text  # layout figure and loss curve


def test_lowres_noise_options_are_validated_and_used():
    p = recipe.resolve_preset({"preset": "paper"})
    assert p["lowres_aug_range"] == [0.0, 1.0] and p["lowres_sample_noise_level"] == 0.2  # imagen-pytorch's
    for bad in ([0.5, 0.2], [0, 1.5], [0.1], "0,1"):
        with pytest.raises(ParamsError, match="lowres_aug_range"):
            recipe.resolve_preset({"preset": "tiny", "lowres_aug_range": bad})
    with pytest.raises(ParamsError, match="lowres_sample_noise_level"):
        recipe.resolve_preset({"preset": "tiny", "lowres_sample_noise_level": -0.1})
    preset = recipe.resolve_preset({"preset": "tiny", "lowres_aug_range": [0.1, 0.3], "lowres_sample_noise_level": 0})
    imagen = diffusion.build_imagen("super_resolution", preset)
    t = imagen.lowres_noise_schedule.sample_random_times(10000, device=torch.device("cpu"))
    assert 0.1 <= t.min() and t.max() <= 0.3 and abs(t.mean().item() - 0.2) < 0.01
    assert imagen.lowres_sample_noise_level == 0
    paper_like = {"preset": "paper", "unets": [TINY_UNET], "super_resolution": {"image_sizes": [8, 16]}}
    full = diffusion.build_imagen("super_resolution", recipe.resolve_preset(paper_like))
    assert type(full.lowres_noise_schedule).__name__ == "GaussianDiffusionContinuousTimes"  # untouched default


@pytest.mark.slow
def test_tiny_super_resolution_model_reproduces_its_guide(tmp_path):
    """Issue 10: with the guide's training noise held to [0, 0.2] of the schedule and no noise at sampling, a tiny
    super-resolution model trained on a handful of faces returns faces whose 8x8 area average is their own guide:
    nearest among all guides, and within a few grey levels."""
    import cv2

    from slf_utils.preprocessing import guide_of

    store = synthetic_store(tmp_path / "results" / "store", n_identities=6, clips_per_identity=2, face_size=16)
    rng = np.random.default_rng(1)
    ids = store.clips()["clip_id"].tolist()
    for cid in ids:  # every clip its own face: smooth random patterns, so guides differ between clips
        face = cv2.resize(rng.uniform(0, 255, (4, 4, 3)).astype(np.float32), (16, 16), interpolation=cv2.INTER_CUBIC)
        face = np.clip(face, 0, 255).astype(np.uint8)
        store.put(cid, "preprocess", {"face": face, "guide": guide_of(face, 8)}, "t")
    p = tmp_path / "sr.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "name": "sr",
                "results": str(tmp_path / "results"),
                "model": {
                    "preset": "tiny",
                    "lowres_aug_range": [0.0, 0.2],
                    "lowres_sample_noise_level": 0.0,
                    "imagen": {"pred_objectives": "v"},
                },
                "train": {"steps": 300, "batch_size": 8, "lr": 3e-3, "ema": False, "seed": 0, "checkpoint_every": 300},
            }
        )
    )
    cfg = load_params(p)
    diffusion.train(cfg, "pure_sr")
    imagen, _ = sampling.load_model(tmp_path / "results" / "pure_sr" / "model")
    guides = training_data.load_guides(store, ids)
    out = sampling.sample(imagen, np.zeros((len(ids), 256, 768), np.float32), 1.0, guides=guides, steps=8, seed=0)
    small = np.stack([cv2.resize(o, (8, 8), interpolation=cv2.INTER_AREA) for o in out]).astype(float)
    d = ((small[:, None] - guides[None].astype(float)) ** 2).sum((2, 3, 4))
    assert (d.argmin(1) == np.arange(len(ids))).all()
    own = np.sqrt(np.diag(d).mean() / small[0].size)
    others = np.sqrt(d[~np.eye(len(ids), dtype=bool)].mean() / small[0].size)
    assert own < 0.3 * others, (own, others)  # grey levels: close to its own guide, far from the others


def test_feature_noise_leaves_masked_rows_zero_and_the_batch_buffer_alone():
    X = torch.zeros(4, 256, 768)
    X[:, 4, :256] = torch.randn(4, 256)
    X[:, 5:12, :256] = torch.randn(4, 7, 256)
    before = X.clone()
    noisy = diffusion._feature_noise(X, 0.5, np.random.default_rng(0))
    assert torch.equal(X, before)  # the reused buffer is not touched
    assert not noisy[:, 12:].any() and not noisy[:, :4].any() and not noisy[:, 4:12, 256:].any()
    d = (noisy - X)[:, 4:12, :256]
    assert abs(d.std().item() - 0.5) < 0.02 and abs(d.mean().item()) < 0.02


def test_two_seeds_give_different_weights_and_one_seed_twice_the_same(project, tmp_path):
    """train.seed (which grid.seeds sets) decides initial weights, data order and noise: the same seed twice gives
    the same weights, another seed other weights; each seed after the grid's first has its own folder."""
    weights = {}
    for name, seed in (("s0", 0), ("s0again", 0), ("s1", 1)):
        cfg = load_params(write_params(project, name=name, steps=2, seed=seed, ema=False))
        r = diffusion.train(cfg, "no_image_guide", out_dir=tmp_path / name)
        weights[name] = diffusion.load_checkpoint(r["model_dir"])["unets"]["1"]
    same = all(torch.equal(w, weights["s0again"][k]) for k, w in weights["s0"].items())
    differ = any(not torch.allclose(w, weights["s1"][k]) for k, w in weights["s0"].items())
    assert same and differ
    from slf_utils.config import seed_overrides
    from slf_utils.results import Results

    path = write_params(project, name="seeds")
    base = Path(load_params(path)["results"]) / "x"
    assert Results.of(load_params(path)).system("x") == base  # no grid.seeds: one run, the system's folder
    many = {"grid": {"seeds": [3, 5]}}
    assert Results.of(load_params(path, {**many, **seed_overrides(3)})).system("x") == base  # the first seed
    fifth = Results.of(load_params(path, {**many, **seed_overrides(5)}))
    assert fifth.system("x") == base / "seed5" and fifth.model("x", 2) == base / "seed5" / "model" / "fold2"
    assert fifth.encoder("x") == base and fifth.eval("x") == base / "seed5" / "eval"  # an encoder: one per grid


def test_precision_auto_is_bf16_on_a_bf16_cuda_device_and_fp32_elsewhere(monkeypatch):
    paper = recipe.resolve_preset({"preset": "paper"})
    assert paper["trainer"]["precision"] == "auto"
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert imagen_trainer.training_precision("auto") == "fp32"
    assert imagen_trainer.trainer_options(paper) == {"max_grad_norm": None}  # fp32: no mixed precision for Accelerate
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert imagen_trainer.training_precision("auto") == "bf16"
    assert imagen_trainer.trainer_options(paper) == {"max_grad_norm": None, "precision": "bf16"}
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # ImagenTrainer trains on the CPU then
    assert imagen_trainer.training_precision("auto") == "fp32"
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
    assert imagen_trainer.training_precision("auto") == "fp32"
    assert [imagen_trainer.training_precision(p) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    with pytest.raises(ParamsError, match="model.trainer.precision must be one of auto, fp32, bf16, fp16"):
        recipe.resolve_preset({"preset": "tiny", "trainer": {"precision": "half"}})


@pytest.mark.parametrize("requested, used", [("auto", "fp32"), ("bf16", "bf16")])
def test_the_precision_used_is_in_the_provenance(project, tmp_path, requested, used, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_params(write_params(project, name=f"p{requested}", steps=2))
    cfg["model"]["trainer"] = {"precision": requested}
    r = diffusion.train(cfg, "no_image_guide", out_dir=tmp_path / requested)
    assert r["precision"] == {"requested": requested, "used": used}
    prov = json.loads((tmp_path / requested / "provenance.json").read_text())
    assert prov["precision"] == {"requested": requested, "used": used} and prov["device"] == "cpu"
    assert np.isfinite(pd.read_csv(tmp_path / requested / "loss.csv")["loss"]).all()
