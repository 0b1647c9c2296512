"""SCLDM-style contrastive pre-training (slf_utils.contrastive, notebook 07): CLIP's InfoNCE by hand, the encoders
on a 4-identity synthetic store, the `contrastive_speech` stage and its constituent, resumable training, the grid's
contrastive step, and notebook 07 under papermill on the small demo corpus."""

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from slf_utils import contrastive as C
from slf_utils import encoder_stage as S
from slf_utils import grid, layout
from slf_utils import voice_encoder as V
from slf_utils.basics import ROOT, ParamsError
from slf_utils.config import load_params
from slf_utils.parameters import DEFAULTS
from slf_utils.results import Results
from slf_utils.synthetic import synthetic_store

QUIET = dict(log=lambda *a: None)
SMALL = {"steps": 100, "batch_size": 8, "hidden": 64, "dim": 32, "channels": [8, 16], "mel_channels": [16]}


def grid_file(tmp_path, name="ct", **sections) -> Path:
    cfg = {"name": name, "results": str(tmp_path / "results" / name), **sections}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def small_cfg(tmp_path, name="ct", folds=0, **contrastive):
    crossfit = {"folds": folds, "unit": "clip", "seed": 0}
    return load_params(
        grid_file(tmp_path, name, evaluate={"bootstrap": 50}, contrastive={**SMALL, **contrastive}, crossfit=crossfit)
    )


def recall(metrics, split, protocol, k=1, system=C.SYSTEM) -> float:
    m = metrics[(metrics["split"] == split) & (metrics["protocol"] == protocol) & (metrics["metric"] == f"recall@{k}")]
    return float(m[m["system"] == system]["value"].iloc[0])


# ------------------------------------------------------------------------------------------------ parameters
def test_contrastive_defaults_and_bad_values_named_in_the_error(tmp_path):
    ct = load_params(grid_file(tmp_path))["contrastive"]
    assert (ct["speech_encoder"], ct["face_encoder"], ct["positives"]) == ("mlp", "cnn", "identity")
    assert ct == DEFAULTS["contrastive"]
    for bad, key in (
        ({"face_encoder": "vgg"}, r"contrastive\.face_encoder"),
        ({"speech_encoder": "ast"}, r"contrastive\.speech_encoder"),
        ({"positives": "batch"}, r"contrastive\.positives"),
        ({"speech_inputs": ["mel"]}, r"contrastive\.speech_inputs"),
        ({"face_px": 4}, r"contrastive\.face_px"),
        ({"batch_size": 1}, r"contrastive\.batch_size"),
        ({"temperature": 0.001}, r"temperature"),
        ({"steps": "many"}, r"contrastive\.steps"),
    ):
        with pytest.raises(ParamsError, match=key):
            load_params(grid_file(tmp_path, contrastive=bad))


# ------------------------------------------------------------------------------------------------ loss
def test_info_nce_on_a_hand_worked_batch():
    """speech (3, 0), (0, 1) -> unit s0 = (1, 0), s1 = (0, 1); faces f0 = (0.6, 0.8), f1 = (0, 1); temperature 0.1
    (logit scale ln 10): logits = 10 s.f = [[6, 0], [8, 10]].
    speech->face, target the diagonal: row 0 -log(e^6 / (e^6 + e^0)) = ln(1 + e^-6) = 0.0024757, row 1
    ln(1 + e^-2) = 0.1269280: mean 0.0647018. face->speech (the columns): col 0 [6, 8] -> ln(1 + e^2) = 2.1269280,
    col 1 [0, 10] -> ln(1 + e^-10) = 0.0000454: mean 1.0634867. Loss: the mean of the two, 0.5640943.
    One identity for both clips: every pair is positive, each target 1/2, so a row's loss is logsumexp(row) - mean(row):
    (6, 0) -> 3.0024757, (8, 10) -> 1.1269280, (6, 8) -> 1.1269280, (0, 10) -> 5.0000454; mean 2.5640943."""
    s = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    f = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    scale = torch.tensor(math.log(10.0), requires_grad=True)
    loss, parts = C.info_nce(s, f, scale)
    s2f = (math.log1p(math.exp(-6)) + math.log1p(math.exp(-2))) / 2
    f2s = (math.log1p(math.exp(2)) + math.log1p(math.exp(-10))) / 2
    assert float(parts["speech_to_face"]) == pytest.approx(s2f, abs=1e-6) == pytest.approx(0.0647018, abs=1e-6)
    assert float(parts["face_to_speech"]) == pytest.approx(f2s, abs=1e-6) == pytest.approx(1.0634867, abs=1e-6)
    assert float(loss) == pytest.approx(0.5640943, abs=1e-6)
    assert float(parts["temperature"]) == pytest.approx(0.1)
    loss.backward()
    assert scale.grad is not None and float(scale.grad) != 0  # the temperature is learnt
    # distinct identities are the clip positives; one identity spreads the target over both faces
    assert float(C.info_nce(s, f, torch.tensor(math.log(10.0)), ["a", "b"])[0]) == pytest.approx(0.5640943, abs=1e-6)
    lse = lambda x, y: max(x, y) + math.log1p(math.exp(-abs(x - y)))  # noqa: E731
    same = (lse(6, 0) - 3 + lse(8, 10) - 9 + lse(6, 8) - 7 + lse(0, 10) - 5) / 4
    got = float(C.info_nce(s, f, torch.tensor(math.log(10.0)), ["a", "a"])[0])
    assert got == pytest.approx(same, abs=1e-6) and got == pytest.approx(2.5640943, abs=1e-6)


# ------------------------------------------------------------------------------------------------ encoders, stage
def test_encoders_separate_four_identities_and_the_stage_is_rewritten_only_for_a_new_model(tmp_path, monkeypatch):
    """MLP speech + CNN face encoders on a 4-identity synthetic store (faces coloured by identity, speaker embeddings
    offset by identity): train speech->face recall@1 = 1 under both protocols; the stage holds a unit (D,) float32
    vector for every clip, train and test, which the layout puts in row 240; a rerun trains and writes nothing;
    other steps retrain and rewrite every clip."""
    cfg = small_cfg(tmp_path)
    store = synthetic_store(Results.of(cfg).store, n_identities=4, clips_per_identity=4)
    res = C.run(cfg, store, **QUIET)
    m = res["metrics"]
    assert recall(m, "train", "paper") == 1.0 and recall(m, "train", "identity") == 1.0
    assert res["trained"] and res["model"]["n_train_clips"] == 8 and res["model"]["n_train_identities"] == 4
    ids = store.clips()["clip_id"].tolist()
    assert res["stage"]["done"] == 16 and set(store.clips(stage=C.STAGE)["clip_id"]) == set(ids)
    e = store.load_stacked(C.STAGE, ids)["embedding"]
    assert e.shape == (16, 32) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert store.provenance(C.STAGE)["params_hash"] == res["stage"]["params_hash"]
    on_disk = pd.read_csv(Path(cfg["results"]) / "contrastive" / "metrics.csv")
    assert set(on_disk["split"]) == {"train", "test"} and {"paper", "identity", "both"} == set(on_disk["protocol"])
    assert {C.SYSTEM, C.CEILING} == set(on_disk["system"])
    assert {"recall@1", "chance@1", "cosine_to_own_face", "n_unsampled"} <= set(on_disk["metric"])
    # no voice encoder in this grid: its rows are missing and the table says so
    assert set(res["table"]["method"]) == {C.SYSTEM} and any("voice_encoder" in n for n in res["missing"])
    assert list(res["comparison"]["protocol"]) == ["identity", "paper"]

    lay = layout.Layout.load(ROOT / "params" / "layout.yaml")
    keep = ("contrastive_speech",)
    train = store.clips(split="train")["clip_id"].tolist()
    x = lay.build(store, ids, keep, lay.fit(store, train, keep))
    filled = np.flatnonzero(np.abs(x).sum((0, 2)))
    assert list(filled) == [240] and not np.abs(x[:, 240, 32:]).any()

    def no_training(*a, **k):
        raise AssertionError("a model trained with the same parameters was trained again")

    with monkeypatch.context() as mp:
        mp.setattr(C, "train_pair", no_training)
        again = C.run(cfg, store, **QUIET)
    assert not again["trained"] and again["stage"]["computed"] == 0
    assert again["stage"]["params_hash"] == res["stage"]["params_hash"]
    pd.testing.assert_frame_equal(again["metrics"], res["metrics"])

    changed = C.run(small_cfg(tmp_path, steps=110), store, **QUIET)
    assert changed["trained"] and changed["model"]["model_hash"] != res["model"]["model_hash"]
    assert changed["stage"]["computed"] == 16 and changed["stage"]["params_hash"] != res["stage"]["params_hash"]
    assert len(store.done(C.STAGE, changed["stage"]["params_hash"])) == 16


def test_mel_conv_and_recogniser_encoders_separate_four_identities(tmp_path):
    """The other two encoders: temporal convolutions on the stored mel frames, and a projection head on the frozen
    face_embedding stage (synthetic_store writes it under the hash `synthetic`)."""
    cfg = small_cfg(tmp_path, speech_encoder="mel_conv", face_encoder="recogniser", steps=150)
    store = synthetic_store(Results.of(cfg).store, n_identities=4, clips_per_identity=4)
    model, meta, history, trained = C.ensure_model(cfg, store, "synthetic", **QUIET)
    assert trained and meta["n_speech_in"] == 128 and meta["n_face_in"] == 128
    assert history["loss"].iloc[-10:].mean() < history["loss"].iloc[:10].mean()
    stage = C.run_speech_stage(cfg, store, {None: (model, meta)}, {}, {}, **QUIET)
    assert stage["done"] == 16
    metrics, _ = C.evaluate(cfg, store, model, meta, stage["params_hash"], "synthetic")
    assert recall(metrics, "train", "paper") == 1.0 and recall(metrics, "train", "identity") == 1.0
    # padded frames do not change a clip's embedding
    ids = store.clips()["clip_id"].tolist()
    one = C.embed(model.speech, C.speech_inputs(store, ids[:1], meta))
    np.testing.assert_allclose(one[0], store.get(ids[0], C.STAGE)["embedding"], atol=1e-5)


def test_an_interrupted_training_resumes_where_it_stopped(tmp_path):
    """Killed at step 25 of 30 (checkpoints every 10), the training resumes at step 20 and ends exactly where an
    uninterrupted one does (weights, logit scale, dropout and batch order restored)."""
    rng = np.random.default_rng(0)
    xs, xf = rng.normal(size=(12, 5)).astype(np.float32), rng.normal(size=(12, 6)).astype(np.float32)
    idents = np.repeat(["a", "b", "c", "d"], 3)
    ct = {**DEFAULTS["contrastive"], "steps": 30, "batch_size": 5, "checkpoint_every": 10, "dropout": 0.2}
    meta = {**ct, "speech_encoder": "mlp", "face_encoder": "recogniser", "n_speech_in": 5, "n_face_in": 6}
    meta.update(dim=4, hidden=8)

    def fresh():
        torch.manual_seed(0)
        return C.build_pair(meta)

    class Killed(S.VectorInputs):
        calls = 0

        def batch(self, idx, rng=None):
            Killed.calls += 1
            if Killed.calls > 25:
                raise KeyboardInterrupt
            return super().batch(idx, rng)

    quiet, ck = (lambda *a: None), tmp_path / "checkpoint.pt"
    whole = fresh()
    expected = C.train_pair(whole, S.VectorInputs(xs), S.VectorInputs(xf), idents, ct, quiet)
    with pytest.raises(KeyboardInterrupt):
        C.train_pair(fresh(), Killed(xs), S.VectorInputs(xf), idents, ct, quiet, checkpoint=ck, key="a")
    assert torch.load(ck, weights_only=False)["step"] == 20
    said, resumed = [], fresh()
    history = C.train_pair(resumed, S.VectorInputs(xs), S.VectorInputs(xf), idents, ct, said.append, ck, "a")
    assert any("resuming training at step 20" in s for s in said)
    pd.testing.assert_frame_equal(history, expected)
    for a, b in zip(resumed.state_dict().values(), whole.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert float(whole.logit_scale) <= math.log(ct["max_logit_scale"])


# ------------------------------------------------------------------------------------------------ grid
def test_grid_plans_the_contrastive_step_before_the_trainings_that_read_its_stage(tmp_path):
    assert grid.NOTEBOOK["contrastive"] == "07_contrastive.ipynb" and grid.CONTRASTIVE_STAGES == (C.STAGE,)
    systems = ["contrastive_speech", "speaker_embeddings_only", "speech_to_face", "random"]
    p = grid_file(tmp_path, systems=systems)
    _, steps = grid.plan(p)
    names = [s.name for s in steps]
    by = {s.name: s for s in steps}
    ct = names.index("contrastive")
    assert names.index("features") < ct < names.index("train:contrastive_speech")
    assert by["contrastive"].deps == ["features"]  # the CNN face encoder does not wait for notebook 06
    assert by["train:contrastive_speech"].deps == ["features", "contrastive"]
    assert by["train:speaker_embeddings_only"].deps == ["features"]
    assert "contrastive" not in by["train:speech_to_face"].deps
    assert by["contrastive"].priority > max(s.priority for s in steps if s.kind == "train")
    assert by["contrastive"].run_dir == Path(tmp_path / "results" / "ct" / "contrastive" / "runs")
    # without a system reading the stage there is no contrastive step, and the other steps are the same
    _, plain = grid.plan(grid_file(tmp_path, name="plain", systems=systems[1:]))
    assert "contrastive" not in [s.name for s in plain]
    for s in plain:
        assert s.name == "report" or s.hash == by[s.name].hash, s.name
    assert "contrastive" in [s.name for s in grid.plan(p, only="contrastive_speech")[1]]

    def hashes(over):
        return {s.name: s.hash for s in grid.plan(p, over)[1]}

    base = hashes({})
    changed = hashes({"contrastive": {"steps": 7}})
    assert {n for n in base if changed[n] != base[n]} == {
        "contrastive",
        "train:contrastive_speech",
        "evaluate:contrastive_speech",
        "report",
    }
    assert hashes({"evaluate": {"scales": [0, 3]}})["contrastive"] == base["contrastive"]
    assert hashes({"speech2face": {"face_model": "eigenfaces"}})["contrastive"] == base["contrastive"]
    # the recogniser face encoder reads notebook 06's face_embedding stage: it waits for it, and its settings count
    rec = {"contrastive": {"face_encoder": "recogniser"}}
    by = {s.name: s for s in grid.plan(p, rec)[1]}
    assert by["contrastive"].deps == ["features", "voice_encoder"]
    other = {"contrastive": {"face_encoder": "recogniser"}, "speech2face": {"face_model": "eigenfaces"}}
    assert hashes(other)["contrastive"] != by["contrastive"].hash
    alone = {s.name: s for s in grid.plan(grid_file(tmp_path, name="alone", systems=systems[:1]), rec)[1]}
    assert alone["contrastive"].deps == ["features"]  # no notebook 06 in the grid: notebook 07 embeds the faces


# ------------------------------------------------------------------------------------------------ notebook 07
@pytest.fixture(scope="module")
def demo_grid(tmp_path_factory, demo_corpus_small):
    """The 4-identity demo corpus preprocessed (64 px faces, 3 s audio) with its speaker embeddings."""
    from slf_utils import features, preprocessing

    tmp = tmp_path_factory.mktemp("ct_demo")
    manifest = Path(demo_corpus_small)
    p = grid_file(
        tmp,
        name="tiny",
        data={"kind": "manifest", "manifest": str(manifest), "root": str(manifest.parent)},
        preprocess={"audio_seconds": 3, "face_size": 64},
        evaluate={"bootstrap": 100},
        speech2face={"face_model": "eigenfaces", "voice_encoder": {"steps": 100, "batch_size": 16, "hidden": 64}},
        contrastive={"steps": 150, "batch_size": 16, "hidden": 128},
        grid={"scheduler": "sequential"},
    )
    cfg = load_params(p)
    preprocessing.run(cfg)
    features.run(cfg)
    return p, cfg


@pytest.mark.slow
def test_notebook_07_runs_under_papermill_beside_the_voice_encoder(demo_grid, tmp_path):
    """Notebook 07 on the small demo corpus (mlp speech encoder, CNN face encoder), after the voice encoder
    (eigenfaces, to stay quick): the stage for every clip with a speaker embedding, the model, metrics.csv, and one
    table with both methods in the executed notebook."""
    import papermill as pm

    from slf_utils.store import open_store

    p, cfg = demo_grid
    V.run(cfg, **QUIET)
    t = time.time()
    pm.execute_notebook(
        str(ROOT / "notebooks" / "07_contrastive.ipynb"),
        str(tmp_path / "07.ipynb"),
        parameters={"params_file": str(p), "overrides": {}},
        cwd=str(ROOT),
        kernel_name="python3",
        progress_bar=False,
    )
    print(f"notebook 07: {time.time() - t:.1f} s")
    store = open_store(cfg)
    assert len(store.clips(stage=C.STAGE)) == len(store.clips(stage="speaker"))
    out = Path(cfg["results"]) / "contrastive"
    m = pd.read_csv(out / "metrics.csv")
    print(m[m["metric"].isin(["recall@1", "chance@1", "cosine_to_own_face"])].to_string())
    assert recall(m, "train", "paper") > 0.9
    assert json.loads((out / "model" / "meta.json").read_text())["dim"] == 128
    table = C.recall_table(cfg)
    assert set(table["method"]) == {C.SYSTEM, V.SYSTEM} and not table.attrs["missing"]
    assert len(C.differences(cfg)) == 16  # 2 splits x 2 protocols x 4 k
    executed = (tmp_path / "07.ipynb").read_text()
    assert "recall@1" in executed and "voice_encoder" in executed and "image/png" in executed


def test_cross_fitted_contrastive_stage_is_out_of_fold_and_in_the_full_pairs_space(tmp_path):
    """With folds, a training clip's speech embedding comes from the pair that left it out, rotated onto the full
    pair's space: training clips then score like test clips (in-sample they are fitted far closer to their face),
    and the rotated fold embeddings point where the full pair's do for the clips both trained on."""
    out = {}
    for folds in (0, 4):
        cfg = small_cfg(tmp_path, f"ct{folds}", folds=folds)
        store = synthetic_store(Results.of(cfg).store, n_identities=4, clips_per_identity=4)
        m = C.run(cfg, store, **QUIET)["metrics"]
        out[folds] = m[m["metric"] == "cosine_to_own_face"].set_index("split")["value"]
    assert out[0]["train"] - out[0]["test"] > 0.1  # in-sample: fitted
    assert out[4]["train"] < out[4]["test"] + 0.05  # out of fold: no closer than a test clip
    assert out[4]["test"] == pytest.approx(out[0]["test"], abs=1e-5)  # held-out clips: the full pair's
    prov = store.provenance(C.STAGE)
    assert prov["crossfit"]["clips_out_of_fold"] == 8 and "Procrustes" in prov["alignment"]
