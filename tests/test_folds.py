"""Unseen speakers on a manifest corpus (data.identity_folds): folds over identities, each fold's models trained
without its identities, every identity tested once against one gallery, and the reference rows read per fold."""

from collections import Counter

import numpy as np
import pytest
import torch
import yaml

from slf_utils import diffusion, evaluation, face_decoder
from slf_utils import voice_encoder as V
from slf_utils.config import ParamsError, load_params
from slf_utils.layout import synthetic_store
from slf_utils.preprocessing import fold_view, identity_folds, seeded_folds, training_clips
from slf_utils.store import Store, open_store

torch.set_num_threads(1)
FOLDS = 3


def write_params(tmp_path, folds=FOLDS, **extra):
    p = tmp_path / "open.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "name": "open",
                "results": str(tmp_path / "results"),
                "data": {"identity_folds": {"folds": folds, "seed": 0}},
                "model": {"preset": "tiny"},
                "train": {"steps": 2, "batch_size": 4, "ema": False, "seed": 0, "checkpoint_every": 2},
                "face_decoder": {"steps": 3, "batch_size": 4, "perceptual": 0.0},
                "evaluate": {"scales": [1], "sampling_steps": 2, "bootstrap": 20},
                **extra,
            }
        )
    )
    return p


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """7 identities x 4 clips (2 train, 2 test each): folds of 3, 2 and 2 identities."""
    tmp = tmp_path_factory.mktemp("open")
    synthetic_store(tmp / "results" / "store", n_identities=7, clips_per_identity=4, face_size=32)
    return tmp, load_params(write_params(tmp))


def test_every_identity_is_in_one_fold_and_tested_exactly_once(project):
    tmp, cfg = project
    store = open_store(cfg)
    fold_of = identity_folds(cfg, store.clips())
    assert sorted(Counter(fold_of.values()).values()) == [2, 2, 3]  # balanced: sizes differ by at most one
    assert fold_of == seeded_folds(store.clips()["identity"], FOLDS, 0)  # the same deal as the encoders' folds
    queries = evaluation.eval_clips(store)
    parts = evaluation.model_parts(cfg, "full_input", store, queries)
    assert [d.name for d, _ in parts] == ["fold0", "fold1", "fold2"]
    tested = Counter(i for _, part in parts for i in set(part["identity"]))
    assert set(tested) == set(queries["identity"]) and set(tested.values()) == {1}
    assert sorted(c for _, part in parts for c in part["clip_id"]) == sorted(queries["clip_id"])
    for k, (_, part) in enumerate(parts):
        view = fold_view(store.clips(), fold_of, k)
        mine = view["identity"].map(fold_of) == k
        assert not (view[mine]["split"] == "train").any()  # its identities: queries or unused, never trained on
        assert (view[~mine]["split"] == "train").all()  # the other identities: every clip (all their images)
        assert set(part["identity"]) == {i for i, f in fold_of.items() if f == k}


def test_closed_set_is_unchanged_and_folds_are_validated(project, tmp_path):
    tmp, _ = project
    closed = load_params(write_params(tmp, folds=0))
    store = open_store(closed)
    assert identity_folds(closed, store.clips()) == {}
    assert training_clips(store, closed, None)["clip_id"].tolist() == store.clips(split="train")["clip_id"].tolist()
    queries = evaluation.eval_clips(store)
    [(model_dir, part)] = evaluation.model_parts(closed, "full_input", store, queries)
    assert model_dir.name == "model" and len(part) == len(queries)
    with pytest.raises(ParamsError, match="identity_folds.folds.*0 .closed set. or at least 2"):
        load_params(write_params(tmp_path, folds=1))


def _recording_reads(monkeypatch):
    read = set()
    load_stacked, get = Store.load_stacked, Store.get

    def rec_stacked(self, stage, clip_ids, *a, **k):
        read.update(clip_ids)
        return load_stacked(self, stage, clip_ids, *a, **k)

    def rec_get(self, clip_id, stage):
        read.add(clip_id)
        return get(self, clip_id, stage)

    monkeypatch.setattr(Store, "load_stacked", rec_stacked)
    monkeypatch.setattr(Store, "get", rec_get)
    return read


@pytest.mark.parametrize("system", ["no_image_guide", "face_to_face_direct"])
def test_no_test_identity_clip_is_read_by_its_folds_training(project, monkeypatch, tmp_path, system):
    """Every store read of fold k's training is recorded: none is a clip of fold k's identities, and every clip of
    the other identities (their test clips too) is read."""
    _, cfg = project
    store = open_store(cfg)
    fold_of = identity_folds(cfg, store.clips())
    clips = store.clips()
    read = _recording_reads(monkeypatch)
    trainer = face_decoder._train if system.endswith("direct") else diffusion._train
    for k in range(FOLDS):
        read.clear()
        if trainer is diffusion._train:
            trainer(cfg, system, tmp_path / f"fold{k}", None, k)
        else:
            trainer(cfg, system, tmp_path / f"fold{k}", False, k, print)
        held = set(clips.loc[clips["identity"].map(fold_of) == k, "clip_id"])
        others = set(clips["clip_id"]) - held
        assert read and not read & held
        assert others <= read


def test_each_fold_model_answers_its_own_identities_and_identity_mean_is_skipped(project):
    _, cfg = project
    result = diffusion.train(cfg, "no_image_guide")
    assert [r["model_dir"].rsplit("/", 1)[-1] for r in result["folds"]] == ["fold0", "fold1", "fold2"]
    metrics = evaluation.run(cfg, "no_image_guide")
    store = open_store(cfg)
    n = len(evaluation.eval_clips(store))
    samples = evaluation._existing_samples(evaluation.eval_dir(cfg, "no_image_guide"))
    assert len(samples) == n and samples["clip_id"].is_unique
    prov = evaluation.json.loads((evaluation.eval_dir(cfg, "no_image_guide") / "provenance.json").read_text())
    fold_of = identity_folds(cfg, store.clips())
    assert [p["split"]["fold"] for p in prov["model_provenance"]] == [0, 1, 2]
    for p, k in zip(prov["model_provenance"], range(FOLDS)):  # trained on every clip of the other identities
        assert p["split"]["train_clips"] == 4 * sum(f != k for f in fold_of.values())
    assert metrics["metric"].eq("recall@1").any()
    ref = evaluation.run(cfg, "identity_mean")
    unsampled = ref[(ref["metric"] == "n_unsampled") & (ref["split"] == "test")]["value"].iloc[0]
    assert unsampled == n  # no query's identity has a training face


def test_attribute_mean_under_folds_is_the_mean_of_the_other_folds_faces_of_its_gender(project):
    _, cfg = project
    store = open_store(cfg)
    fold_of = identity_folds(cfg, store.clips())
    queries = evaluation.eval_clips(store)
    g = evaluation.prepare_gallery(cfg, store, evaluation.make_embedder(cfg, store))
    ids, images = evaluation.reference_images("attribute_mean", store, g, 32, cfg)
    assert ids == queries["clip_id"].tolist()
    clips = store.clips()
    faces = store.load_stacked("preprocess", clips["clip_id"].tolist(), keys=["face"])["face"].astype(np.float64)
    for cid, img in list(zip(ids, images))[::3]:
        q = clips.set_index("clip_id").loc[cid]
        k = fold_of[q["identity"]]
        same = (clips["identity"].map(fold_of) != k) & (clips["gender"] == q["gender"])
        same &= clips["ethnicity"] == q["ethnicity"]
        if not same.any():  # no training face of that gender and ethnicity: gender alone
            same = (clips["identity"].map(fold_of) != k) & (clips["gender"] == q["gender"])
        want = np.round(faces[same.to_numpy()].mean(0)).astype(np.uint8)
        np.testing.assert_array_equal(img, want)
    assert evaluation.reference_images("identity_mean", store, g, 32, cfg) == ([], [])


def test_encoders_route_every_clip_to_the_model_that_never_saw_its_identity(project):
    _, cfg = project
    store = open_store(cfg)
    excluded = {}

    def ensure(exclude, mdir):
        excluded[mdir] = set(exclude)
        return (None, None, {"model_hash": str(mdir)})

    models, folds, prov = V.fold_models(cfg, store, ensure, log=lambda *_: None)
    clips = store.clips()
    fold_of = identity_folds(cfg, clips)
    assert folds == {c: fold_of[i] for c, i in zip(clips["clip_id"], clips["identity"])}  # held-out clips too
    for k in range(FOLDS):
        assert excluded[f"fold{k}"] == {c for c, f in folds.items() if f == k}
    assert prov["crossfit"]["of"] == "identities" and "without its identity's fold" in prov["values"]


def test_a_direct_decoder_trains_and_decodes_per_fold(project):
    _, cfg = project
    result = face_decoder.train(cfg, "face_to_face_direct", log=lambda *_: None)
    assert [r["fold"] for r in result["folds"]] == [0, 1, 2]
    metrics = evaluation.run(cfg, "face_to_face_direct", log=lambda *_: None)
    store = open_store(cfg)
    queries = evaluation.eval_clips(store)
    samples = evaluation._existing_samples(evaluation.eval_dir(cfg, "face_to_face_direct"))
    assert samples["clip_id"].tolist() == queries["clip_id"].tolist()  # the queries' order, whatever the folds
    # each query's face is its own fold's decoder's
    fold_of = identity_folds(cfg, store.clips())
    q = queries.iloc[0]
    own = face_decoder.decode(
        cfg,
        "face_to_face_direct",
        [q["clip_id"]],
        store,
        directory=result["folds"][fold_of[q["identity"]]]["model_dir"],
    )[0]
    np.testing.assert_array_equal(
        own, evaluation.read_image(evaluation.eval_dir(cfg, "face_to_face_direct") / samples["image"].iloc[0])
    )
    assert metrics["metric"].eq("recall@1").any()


def test_rows_are_shown_against_attribute_mean_where_identity_mean_cannot_exist():
    from slf_utils import report

    def row(system, v):
        return [system, np.nan, "identity", "test", "recall@1", v, v - 0.1, v + 0.1, 10]

    cols = evaluation.METRIC_COLUMNS
    closed = evaluation.pd.DataFrame([row("identity_mean", 0.6), row("attribute_mean", 0.2)], columns=cols)
    assert report._ceiling(closed) == ("identity_mean", 0.6)
    unseen = evaluation.pd.DataFrame([row("attribute_mean", 0.2), row("x", 0.1)], columns=cols)
    assert report._ceiling(unseen) == ("attribute_mean", 0.2)
    table = report.headline_table(unseen, {"x": np.nan, "attribute_mean": np.nan})
    assert table.set_index("system").loc["x", "of_ceiling"] == pytest.approx(0.5)
    assert "vs attribute_mean" in report.pretty_headline(table).columns
