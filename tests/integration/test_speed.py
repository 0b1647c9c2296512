"""Speed levers (issue 29): model.trainer.compile and channels_last are validated on load, applied by
imagen_trainer.make_trainer (the trainer training and benchmarks/train_speed.py use), and leave checkpoints
resumable."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from slf_utils import diffusion, imagen_trainer, recipe, sampling
from slf_utils.basics import ParamsError
from slf_utils.config import load_params
from slf_utils.synthetic import synthetic_store

TRAIN = {"steps": 2, "batch_size": 4, "lr": 3e-3, "ema": False, "seed": 0, "checkpoint_every": 2}


@pytest.mark.parametrize(
    "trainer, message",
    [
        ({"compile": "yes"}, "model.trainer.compile must be false, true or auto, got 'yes'"),
        ({"compile": 1}, "model.trainer.compile must be false, true or auto, got 1"),
        ({"channels_last": "true"}, "model.trainer.channels_last must be true or false, got 'true'"),
        ({"fused": True}, "model.trainer: Adam runs foreach or fused, not both"),  # tiny sets foreach: true
    ],
)
def test_a_bad_speed_lever_is_refused_naming_the_key(trainer, message):
    with pytest.raises(ParamsError, match=message):
        recipe.resolve_preset({"preset": "tiny", "trainer": trainer})
    for ok in (False, True, "auto"):
        recipe.resolve_preset({"preset": "tiny", "trainer": {"compile": ok, "channels_last": ok is True}})


def test_make_trainer_applies_the_levers_and_imagen_trainer_never_sees_them():
    preset = recipe.resolve_preset({"preset": "tiny", "trainer": {"compile": True, "channels_last": True}})
    assert "compile" not in imagen_trainer.trainer_options(
        preset
    ) and "channels_last" not in imagen_trainer.trainer_options(preset)
    imagen = diffusion.build_imagen("generation", preset)
    unet = imagen.unets[0]
    keys = list(unet.state_dict())
    trainer = imagen_trainer.make_trainer(imagen, 1, preset, {**TRAIN, "lr_schedule": "cosine", "warmup_steps": 0})
    convs = [m.weight for m in unet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    assert "forward" in vars(unet)  # the compiled forward, which imagen-pytorch's p_losses calls
    assert list(unet.state_dict()) == keys  # checkpoints keep the eager unet's keys
    assert trainer.scheduler0.T_max == TRAIN["steps"] and trainer.get_lr(1) == pytest.approx(3e-3)
    # without the key: eager
    eager = diffusion.build_imagen("generation", recipe.resolve_preset({"preset": "tiny"}))
    imagen_trainer.make_trainer(
        eager, 1, recipe.resolve_preset({"preset": "tiny"}), {**TRAIN, "lr_schedule": "constant", "warmup_steps": 0}
    )
    assert "forward" not in vars(eager.unets[0])


def test_a_checkpoint_resumes_with_a_speed_lever_switched_but_not_with_a_learned_setting(tmp_path):
    synthetic_store(tmp_path / "results" / "store", n_identities=4, clips_per_identity=4, face_size=16)

    def params(steps, **trainer):
        p = tmp_path / "t.yaml"
        model = {"preset": "tiny", "trainer": trainer}
        p.write_text(
            yaml.safe_dump(
                {"name": "t", "results": str(tmp_path / "results"), "model": model, "train": {**TRAIN, "steps": steps}}
            )
        )
        return load_params(p)

    diffusion.train(params(2), "no_image_guide")
    r = diffusion.train(params(4, channels_last=True), "no_image_guide")
    assert r["steps"] == {"1": 4}
    assert pd.read_csv(Path(r["model_dir"]) / "loss.csv")["step"].tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="different preset"):
        diffusion.train(params(6, max_grad_norm=0.5), "no_image_guide")


@pytest.mark.parametrize("mode", ["generation", "super_resolution"])
def test_all_scales_in_one_pass_give_the_faces_of_one_call_per_scale(mode):
    """sampling.sample with a list of scales: every scale of a clip in the same pass (scales 0 and 1 with one unet
    pass, the others with two), the noise of one call per scale; 5 clips in seeding chunks of 4 and passes of one
    clip x 3 scales, so the tiled noise must take the right rows of its chunk's draw."""
    preset = recipe.resolve_preset({"preset": "tiny", "unet_common": {"attn_pool_text": True}})
    torch.manual_seed(0)
    imagen = diffusion.build_imagen(mode, preset).eval()
    for p in imagen.parameters():  # zero-initialised output convs would make every prediction 0
        p.data.normal_(0, 0.2)
    g = torch.Generator().manual_seed(1)
    X = torch.zeros(5, 256, 768)
    X[:, :40] = torch.randn(5, 40, 768, generator=g)
    guides = (torch.rand(5, 8, 8, 3, generator=g) * 255).byte().numpy() if mode == "super_resolution" else None
    scales = [0.0, 1.0, 2.5]
    kw = {"guides": guides, "steps": 4, "seed": 3, "batch_size": 4}
    one_by_one = np.stack([sampling.sample(imagen, X, cond_scale=s, **kw) for s in scales])
    together = sampling.sample(imagen, X, cond_scale=scales, **kw)
    assert together.shape == one_by_one.shape == (3, 5, 16, 16, 3)
    diff = np.abs(together.astype(int) - one_by_one.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99  # the same faces; a pixel may round the other way
    assert not np.array_equal(together[0], together[2])  # the scales differ
    assert sampling.ip.torch is torch and getattr(sampling._ROWS, "scales", None) is None  # patches undone


def test_compile_auto_compiles_on_cuda_and_on_a_cpu_with_a_compiler_for_a_long_training(monkeypatch, tmp_path):
    long, short = imagen_trainer.AUTO_COMPILE_STEPS, imagen_trainer.AUTO_COMPILE_STEPS - 1
    assert imagen_trainer.compiles(True, "cpu", 1) and not imagen_trainer.compiles(False, "cuda", 10**6)
    assert imagen_trainer.compiles("auto", "cuda", 1)
    monkeypatch.setattr(imagen_trainer.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert imagen_trainer.compiles("auto", "cpu", long) and not imagen_trainer.compiles("auto", "cpu", short)
    with monkeypatch.context() as m:  # a compiler but no Python.h (a system Python without -dev): trains eager
        m.setattr(imagen_trainer.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
        assert not imagen_trainer.compiles("auto", "cpu", long)
    monkeypatch.setattr(imagen_trainer.shutil, "which", lambda name: None)  # no C++ compiler: inductor cannot build
    assert not imagen_trainer.compiles("auto", "cpu", long)
    with pytest.raises(RuntimeError, match="model.trainer.compile: true on a CPU needs a C\\+\\+ compiler"):
        imagen_trainer.compiles(True, "cpu", long)
    assert imagen_trainer.compiles(True, "cuda", 1)  # a GPU compiles with Triton
