"""Issue 13 items 3 and 4: the face prior (residual from a mean face) and latent diffusion (a small autoencoder)."""

import cv2
import helpers
import numpy as np
import pytest
import torch

from slf_utils import autoencoder, diffusion, recipe, references, sampling, training_data
from slf_utils.basics import ParamsError
from slf_utils.config import load_params
from slf_utils.layout import Layout, load_systems
from slf_utils.store import open_store

ATTRS = ["gender", "ethnicity"]
TINY_LATENT = {"downsample": 2, "width": 8, "steps": 3, "batch_size": 4, "lr": 3e-3}


def write_params(tmp_path, name="t", model=None, system_overrides=None, **train):
    return helpers.write_params(tmp_path, name, train=train, model=model, system_overrides=system_overrides or {})


def _faces01(store, ids, size=16):
    return torch.from_numpy(training_data.load_faces(store, ids, size)).permute(0, 3, 1, 2).float() / 255


def _uint8(x):
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("kind", ["mean", "attribute_mean"])
def test_face_prior_round_trip_and_means(project, kind):
    store = open_store({"results": str(project / "results")})
    train_ids = store.clips(split="train")["clip_id"].tolist()
    prior = training_data.FacePrior.fit(kind, ATTRS, store, train_ids, 16)
    clips = store.clips()
    faces = _faces01(store, clips["clip_id"].tolist())
    groups = prior.groups_of(clips)
    m = prior.to_model(faces, groups)
    assert m.min() >= 0 and m.max() <= 1  # imagen's input range
    # imagen's internal image (auto-normalised 2m - 1) is 2 (x - mu), the pixel baseline's 2x - 1 less its constant
    # 2 mu - 1: the same amplitude wherever the residual is not clipped
    residual, pixel = 2 * (faces - prior.mu(groups)), 2 * faces - 1
    inside = residual.abs() < 1
    assert torch.allclose((2 * m - 1)[inside], residual[inside], atol=1e-6)
    assert torch.allclose((2 * m - 1)[inside], (pixel - (2 * prior.mu(groups) - 1))[inside], atol=1e-6)
    assert prior.clipped_share(faces, groups) == pytest.approx(1 - inside.float().mean().item())
    back = _uint8(prior.from_model(m, groups))
    assert np.array_equal(back[inside.permute(0, 2, 3, 1).numpy()], _uint8(faces)[inside.permute(0, 2, 3, 1).numpy()])
    # a checkpoint from before (no gain) reads at gain 1/2: half the amplitude, never clipped
    old = training_data.FacePrior.from_state({k: v for k, v in prior.state().items() if k != "gain"})
    assert old.gain == 0.5 and torch.allclose(2 * old.to_model(faces, groups) - 1, faces - prior.mu(groups), atol=1e-6)
    train = _faces01(store, train_ids).double()
    assert torch.allclose(prior.means[0].double(), train.mean(0), atol=1e-6)  # the training faces' mean
    if kind == "mean":
        assert (groups == 0).all() and prior.keys == []
        return
    # one identity per gender x ethnicity here: each test clip's mean face is its identity's training mean
    assert len(prior.keys) == 4 and (groups > 0).all() and sum(prior.counts[1:]) == len(train_ids)
    means = references.identity_means(store, clips["identity"].unique(), 16)
    for ident, g in zip(clips["identity"], groups):
        own = prior.means[g].permute(1, 2, 0).numpy() * 255
        assert np.abs(own - means[ident]).max() <= 2.0  # identity_means rounds, then resizes the 32 px mean
    unseen = prior.groups_of([{"gender": "Man", "ethnicity": "white"}, {"gender": None, "ethnicity": "asian"}])
    assert (unseen == 0).all()  # an unseen combination falls back to the global mean
    with pytest.raises(ValueError, match="labels"):
        prior.groups_of(None, n=3)


def test_training_feeds_the_unet_residuals_and_sampling_adds_the_mean_back(project, tmp_path, monkeypatch):
    """The unet of a face-prior system trains on (x - mu)/2 + 1/2 of training faces; with its output zeroed and
    x_start prediction (a model that predicts a zero residual), sampling returns mu exactly - and the grey of
    imagen's zero without the prior."""
    seen, real = [], diffusion._loss_step
    monkeypatch.setattr(
        diffusion, "_loss_step", lambda trainer, images, *a: seen.append(images) or real(trainer, images, *a)
    )
    cfg = load_params(write_params(project, "gen", {"face_prior": "mean", "imagen": {"pred_objectives": "x_start"}}))
    result = diffusion.train(cfg, "no_image_guide", out_dir=tmp_path / "model")
    store = open_store(cfg)
    layout = Layout.load(cfg["layout"])
    keep = load_systems(cfg["systems_file"], layout)["no_image_guide"].keep
    ids = training_data.train_clip_ids(store, layout, keep)
    prior = training_data.FacePrior.fit("mean", ATTRS, store, ids, 16)
    mapped = prior.to_model(_faces01(store, ids), np.zeros(len(ids), int))
    for batch in seen:
        d = (batch[:, None] - mapped[None]).abs().flatten(2).amax(-1)  # each image is one training face, mapped
        assert (d.min(1).values < 1e-6).all()
    assert result["face_prior"]["kind"] == "mean"

    imagen, meta = sampling.load_model(result["model_dir"])
    assert meta["face_prior"] == "mean" and torch.allclose(imagen.face_prior.means, prior.means)
    imagen.unets[0].final_conv.weight.data.zero_()
    imagen.unets[0].final_conv.bias.data.zero_()
    X = np.random.default_rng(0).normal(size=(3, 256, 768)).astype(np.float32)
    out = sampling.sample(imagen, X, cond_scale=2.0, steps=4, seed=0)
    mu = _uint8(prior.means[[0, 0, 0]])
    assert out.shape == (3, 16, 16, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - mu).max() <= 1
    imagen.face_prior = None  # the same model read as a plain pixel model samples grey
    assert np.abs(sampling.sample(imagen, X, cond_scale=2.0, steps=4, seed=0).astype(int) - 128).max() <= 1


def test_super_resolution_with_the_attribute_prior(project, tmp_path):
    """attribute_mean on a super-resolution system, set by the grid's system_overrides: the guide the sampler starts
    from is mapped as imagen maps the training faces' low-res condition, and a zero-residual model returns each test
    clip's own group mean; attribute_mean without labels is refused."""
    over = {"full_input": {"model": {"face_prior": "attribute_mean", "imagen": {"pred_objectives": "x_start"}}}}
    cfg = load_params(write_params(project, "sr", system_overrides=over))
    result = diffusion.train(cfg, "full_input", out_dir=tmp_path / "model")
    imagen, meta = sampling.load_model(result["model_dir"])
    prior = imagen.face_prior
    assert meta["face_prior"] == "attribute_mean" and prior.attributes == ATTRS
    store = open_store(cfg)
    test = store.clips(split="test")
    ids = test["clip_id"].tolist()
    groups = prior.groups_of(test)
    guides = training_data.load_guides(store, ids)
    # training: imagen resizes the (residual) image it is given to the guide size; sampling: the stored guide, mapped
    lowres = imagen.resize_to(prior.to_model(_faces01(store, ids), groups), 8)
    start = prior.to_model(torch.from_numpy(guides).permute(0, 3, 1, 2).float() / 255, groups, imagen.resize_to)
    # at gain 1 a grey level of the guide is 1/255 in imagen's [0, 1]; where the full-size residual was clipped the
    # two differ (resize of a clipped image vs clip of a resized one)
    agree = (lowres - start).abs() <= 1.2 / 255
    assert agree.float().mean() > 0.95 and prior.clipped_share(_faces01(store, ids), groups) < 0.05
    unet = imagen.unets[1]
    unet.final_conv.weight.data.zero_()
    unet.final_conv.bias.data.zero_()
    X = np.zeros((len(ids), 256, 768), np.float32)
    starts, real = [], imagen.sample
    imagen.sample = lambda **kw: starts.append(kw["start_image_or_video"]) or real(**kw)
    out = sampling.sample(imagen, X, 1.0, guides=guides, steps=4, seed=0, labels=test)
    assert torch.allclose(starts[0], start, atol=1e-6)  # sample() starts from the guide mapped this way
    del imagen.sample
    assert np.abs(out.astype(int) - _uint8(prior.mu(groups))).max() <= 1
    rows = _uint8(prior.means).astype(float)  # each face is nearest its own group's mean of the 1 + 4 rows
    d = ((out[:, None].astype(float) - rows[None]) ** 2).sum((2, 3, 4))
    assert (d.argmin(1) == groups).all() and len(set(groups)) == 4
    with pytest.raises(ValueError, match="labels"):
        sampling.sample(imagen, X, 1.0, guides=guides, steps=2)


def _smooth_faces(n, size, seed=1):
    """Faces that share little: smooth random colour fields (the mean face explains almost nothing of them)."""
    rng = np.random.default_rng(seed)
    fields = rng.uniform(0, 255, (n, 4, 4, 3)).astype(np.float32)
    return np.stack(
        [np.clip(cv2.resize(f, (size, size), interpolation=cv2.INTER_CUBIC), 0, 255) for f in fields]
    ).astype(np.uint8)


def test_autoencoder_reconstructs_training_faces_far_better_than_the_mean_face(tmp_path):
    faces = _smooth_faces(16, 16)
    cfg = {"downsample": 2, "width": 16, "steps": 150, "batch_size": 8, "lr": 3e-3}
    codec, info = autoencoder.train(faces, cfg, tmp_path / "ae.pt")
    x = torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 255
    m = codec.to_model(x)
    assert m.shape == (16, 4, 8, 8) and m.min() >= 0 and m.max() <= 1
    # standardised per channel, +-3 sd onto imagen's [-1, 1]: centred on 1/2 with sd 1/6
    assert torch.allclose(m.mean((0, 2, 3)), torch.full((4,), 0.5), atol=0.02)
    assert torch.allclose(m.std((0, 2, 3)), torch.full((4,), 1 / 6), atol=0.03)
    with torch.no_grad():
        z = codec.model.encode(x)[0]
        direct = codec.model.decode(z).clamp(0, 1)
    inside = (m > 0) & (m < 1)  # the scaling is inverted exactly inside the clip, which cuts only the far tails
    assert inside.float().mean() > 0.99
    assert torch.allclose(codec.unscale(m)[inside], z[inside], atol=1e-5)
    assert autoencoder.psnr(_uint8(codec.from_model(m)), _uint8(direct)) > 35  # decoding imagen's range ~ latents'
    rec = _uint8(codec.from_model(m))
    mean_face = np.broadcast_to(faces.mean(0).round().astype(np.uint8), faces.shape)
    psnr, mean_psnr = autoencoder.psnr(rec, faces), autoencoder.psnr(mean_face, faces)
    # measured: ~30 dB after 150 steps; the mean face 12 dB
    assert psnr > 25 and mean_psnr < 15, (psnr, mean_psnr)
    assert abs(info["train_psnr"] - psnr) < 0.5 and info["latent_shape"] == [4, 8, 8]
    again = autoencoder.load(tmp_path / "ae.pt")  # the saved codec is the same
    assert torch.equal(again.to_model(x), m)


def test_autoencoder_resumes_where_it_stopped(tmp_path, monkeypatch):
    faces = _smooth_faces(8, 16)
    cfg = {"downsample": 2, "width": 8, "steps": 4, "batch_size": 4}
    straight, _ = autoencoder.train(faces, cfg, tmp_path / "a.pt")
    real, calls = autoencoder._kl, []

    def crash(*a):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(autoencoder, "_kl", crash)
    with pytest.raises(KeyboardInterrupt):
        autoencoder.train(faces, cfg, tmp_path / "b.pt", checkpoint_every=2)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(autoencoder, "_kl", real)
    resumed, info = autoencoder.train(faces, cfg, tmp_path / "b.pt", checkpoint_every=2)
    assert info["steps"] == 4
    for k, v in straight.model.state_dict().items():
        assert torch.allclose(v, resumed.model.state_dict()[k], atol=1e-6), k
    with pytest.raises(ValueError, match="different config"):
        autoencoder.train(faces, {**cfg, "width": 16}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="finished at step 4"):
        autoencoder.train(faces, {**cfg, "steps": 6}, tmp_path / "b.pt")


def test_latent_and_pixel_systems_train_and_sample(project, tmp_path, monkeypatch):
    seen, real = [], diffusion._loss_step
    monkeypatch.setattr(
        diffusion, "_loss_step", lambda trainer, images, *a: seen.append(images.shape) or real(trainer, images, *a)
    )
    over = {"speaker_embeddings_only": {"model": {"latent": TINY_LATENT}}}
    cfg = load_params(write_params(project, "lat", system_overrides=over))
    X = np.random.default_rng(0).normal(size=(3, 256, 768)).astype(np.float32)
    shapes = {}
    for system in ("speaker_embeddings_only", "no_image_guide"):
        seen.clear()
        result = diffusion.train(cfg, system, out_dir=tmp_path / system)
        shapes[system] = seen[0]
        imagen, meta = sampling.load_model(result["model_dir"])
        out = sampling.sample(imagen, X, cond_scale=2.0, steps=3, seed=0)
        assert out.shape == (3, 16, 16, 3) and out.dtype == np.uint8, system
        assert np.array_equal(out, sampling.sample(imagen, X, cond_scale=2.0, steps=3, seed=0))
    assert shapes == {"speaker_embeddings_only": (4, 4, 8, 8), "no_image_guide": (4, 3, 16, 16)}
    latent_dir = tmp_path / "speaker_embeddings_only"
    assert autoencoder.is_finished(latent_dir / autoencoder.FILE)
    imagen, meta = sampling.load_model(latent_dir)
    assert imagen.channels == 4 and imagen.image_sizes == (8,) and meta["latent"]["downsample"] == 2
    again = diffusion.train(
        cfg, "speaker_embeddings_only", out_dir=latent_dir
    )  # resumed: the finished autoencoder is only loaded
    assert again["latent"]["steps"] == 3 and again["latent"]["seconds_per_step"] is None


def test_model_options_per_system_and_their_errors(project, tmp_path):
    """systems.yaml's `model:` options reach training; invalid face_prior / latent keys name the key; a latent
    super-resolution system is refused."""
    layout = Layout.load("params/layout.yaml")
    systems = load_systems("params/systems.yaml", layout)
    assert systems["full_input_prior"].model == {"face_prior": "mean"}
    assert systems["full_input_prior"].keep == systems["full_input"].keep
    cfg = load_params(write_params(project, "opts"))
    assert recipe.system_model(cfg, systems["full_input_prior"]) == {"preset": "tiny", "face_prior": "mean"}
    assert recipe.system_model(cfg, systems["speaker_embeddings_only_latent"])["preset"] == "demo_latent"
    over = load_params(
        write_params(project, "opts2", system_overrides={"full_input_prior": {"model": {"face_prior": "none"}}})
    )
    assert recipe.system_model(over, systems["full_input_prior"])["face_prior"] == "none"  # the grid's wins

    for bad, key in (
        ({"face_prior": "median"}, "model.face_prior"),
        ({"face_prior": "attribute_mean", "face_prior_attributes": ["height"]}, "model.face_prior_attributes"),
        ({"latent": {"chanels": 4}}, "model.latent: unknown key"),
        ({"latent": {"downsample": 3}}, "model.latent.downsample"),
        ({"latent": {"downsample": 8}}, "model.latent.downsample"),  # 16 px -> 2 x 2 latents
        ({"latent": {"kl_weight": -1}}, "model.latent.kl_weight"),
        ({"latent": {"channels": 0}}, "model.latent.channels"),
        ({"latent": 4}, "model.latent must be"),
        ({"latent": {}, "face_prior": "mean"}, "model.face_prior"),
    ):
        with pytest.raises(ParamsError, match=key):
            recipe.resolve_preset({"preset": "tiny", **bad})
    latent = recipe.resolve_preset({"preset": "tiny", "latent": {"downsample": 2}})["latent"]
    assert latent == autoencoder.DEFAULTS | {"downsample": 2}
    sr = load_params(
        write_params(project, "srlat", system_overrides={"full_input": {"model": {"latent": TINY_LATENT}}})
    )
    with pytest.raises(ParamsError, match="latent diffusion is generation only"):
        diffusion.train(sr, "full_input", out_dir=tmp_path / "sr")
    paper = load_params(write_params(project, "big"))
    paper["model"] = {"preset": "paper"}
    with pytest.raises(ParamsError, match="make 16 px faces, the grid's model 128 px"):  # demo_latent, 128 px grid
        diffusion.train(paper, "speaker_embeddings_only_latent", out_dir=tmp_path / "big")


def test_latent_vs_pixel_benchmark_runs():
    import importlib.util

    from slf_utils.basics import ROOT

    spec = importlib.util.spec_from_file_location("bench_lvp", ROOT / "benchmarks" / "latent_vs_pixel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (row,) = mod.main(["--preset", "tiny", "--configs", "16:2", "--steps", "2", "--batch", "2", "--width", "8"])["rows"]
    assert row["pixel_shape"] == [3, 16, 16] and row["latent_shape"] == [4, 8, 8]
    assert row["pixel_s_per_step"] > 0 and row["latent_s_per_step"] > 0 and row["autoencoder_s_per_step"] > 0
