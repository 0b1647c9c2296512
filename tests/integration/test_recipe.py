"""One training path: a system resolved once into a Recipe (hashed) and a TrainingSet that training takes as they
are; the same seed gives the first losses it gave before the refactor (tests/data/first_losses.json)."""

import json
from pathlib import Path

import helpers
import numpy as np
import pandas as pd
import pytest
import torch

from slf_utils import diffusion, recipe
from slf_utils.basics import ParamsError
from slf_utils.config import load_params
from slf_utils.store import open_store

torch.set_num_threads(1)
FIRST_LOSSES = Path(__file__).parent / "data" / "first_losses.json"  # tests/integration/data


def write_params(tmp_path, train=None, **extra):
    # the settings the first losses were recorded with (5 steps at seed 7)
    train = {"steps": 5, "seed": 7, "checkpoint_every": 5, **(train or {})}
    return helpers.write_params(tmp_path, train=train, **extra)


def test_the_same_seed_gives_the_first_losses_recorded_before_the_refactor(project):
    """Recorded with the training code before Recipe/TrainingSet (commit 'Unseen speakers ...'): a super-resolution
    system, a generation system and one with the mean-face prior, 5 steps each at seed 7."""
    want = json.loads(FIRST_LOSSES.read_text())
    cfg = load_params(write_params(project))
    for system, per_unet in want.items():
        r = diffusion.train(cfg, system)
        got = pd.read_csv(Path(r["model_dir"]) / "loss.csv")
        for unet, losses in per_unet.items():
            mine = got[got["unet"].astype(str) == unet].sort_values("step")["loss"].to_numpy()
            np.testing.assert_allclose(mine, losses, rtol=1e-4, err_msg=f"{system} unet {unet}")


@pytest.mark.parametrize(
    "change, changes_hash",
    [
        ({"train": {"steps": 6}}, True),
        ({"train": {"lr": 1e-3}}, True),
        ({"train": {"seed": 1}}, True),
        ({"train": {"feature_noise": 0.5}}, True),
        ({"train": {"cond_drop_prob": 0.2}}, True),
        ({"model": {"face_prior": "mean"}}, True),
        ({"system_overrides": {"full_input": {"train": {"batch_size": 8}}}}, True),
        ({"evaluate": {"scales": [0, 2]}}, False),
        ({"evaluate": {"sampling_steps": 7, "seed": 3}}, False),
        ({"report": {"chosen_scale": 5}}, False),
        ({"system_overrides": {"pure_sr": {"train": {"steps": 9}}}}, False),  # another system's setting
    ],
)
def test_any_training_setting_changes_the_recipe_hash_and_evaluation_settings_do_not(
    project, tmp_path, change, changes_hash
):
    base = recipe.resolve_recipe(load_params(write_params(tmp_path)), "full_input")
    changed = recipe.resolve_recipe(load_params(write_params(tmp_path, **change)), "full_input")
    assert (base.hash != changed.hash) is changes_hash
    assert base.seed == 7 and base.fold is None


def test_a_recipe_is_validated_once_and_the_training_set_is_what_training_reads(project, tmp_path):
    cfg = load_params(write_params(project))
    with pytest.raises(ParamsError, match="no system 'nope'"):
        recipe.resolve_recipe(cfg, "nope")
    with pytest.raises(ParamsError, match="latent diffusion is generation only"):
        recipe.resolve_recipe(
            load_params(write_params(project, model={"preset": "tiny", "latent": {"downsample": 2}})), "full_input"
        )
    r = recipe.resolve_recipe(cfg, "speaker_embeddings_only_prior")
    assert r.preset["face_prior"] == "mean" and r.preset["cond_drop_prob"] == cfg["train"]["cond_drop_prob"]
    data = diffusion.training_set(r, open_store(cfg), tmp_path)
    assert data.ids == sorted(open_store(cfg).clips(split="train")["clip_id"])
    images, X = data.batches.get(np.arange(4))
    assert images.shape == (4, 3, 16, 16) and X.shape[0] == 4  # the tiny generation preset: 16 px
    residual = data.encode(images, np.arange(4))  # what the unet learns: the residual from the mean face
    mu = data.prior.mu(np.zeros(4, int), 16)
    torch.testing.assert_close(residual, (images - mu + 0.5).clamp(0, 1))
    out = diffusion.train(cfg, "speaker_embeddings_only_prior", out_dir=tmp_path / "m")
    assert out["recipe_hash"] == r.hash


@pytest.mark.slow
def test_a_compiled_unet_trains_to_the_recorded_first_losses(project, tmp_path):
    """model.trainer.compile: true (torch.compile, inductor) changes how fast, not what is learned: the
    super-resolution system's first five losses at seed 7 are the eager ones recorded in first_losses.json within
    float noise, and training says the unet was compiled (the first run in a fresh inductor cache compiles for ~1 min
    on one CPU thread; later runs read the cache)."""
    want = json.loads(FIRST_LOSSES.read_text())["full_input"]["2"]
    cfg = load_params(write_params(project, model={"preset": "tiny", "trainer": {"compile": True}}))
    r = diffusion.train(cfg, "full_input", out_dir=tmp_path / "compiled")
    got = pd.read_csv(tmp_path / "compiled" / "loss.csv").sort_values("step")["loss"].to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert r["compiled"] is True
    assert json.loads((tmp_path / "compiled" / "provenance.json").read_text())["compiled"] is True


@pytest.mark.parametrize("system, fold", [("full_input", None), ("full_input", 2), ("speech_to_face_direct", 1)])
def test_a_saved_recipe_loads_back_as_the_same_recipe_with_its_folds_stages(tmp_path, system, fold):
    """recipe.json alone rebuilds the Recipe evaluation samples with: the same hash, system and layout order, and a
    fold's model reads its fold's encoder stages (folds.fold_stage), as it was trained."""
    cfg = load_params("params/demo-open.yaml")
    r = recipe.resolve_recipe(cfg, system, fold)
    recipe.write_recipe(r, tmp_path)
    back = recipe.load_recipe(tmp_path)
    assert back.hash == r.hash and back.system == r.system and back.layout.names == r.layout.names
    assert [c.stage for c in back.layout.constituents.values()] == [c.stage for c in r.layout.constituents.values()]
    assert back.layout.redirects == (
        {}
        if fold is None
        else {
            "voice_face_embedding": f"voice_face_embedding.fold{fold}",
            "contrastive_speech": f"contrastive_speech.fold{fold}",
        }
    )
