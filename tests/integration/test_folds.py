"""Unseen speakers on a manifest corpus (data.identity_folds, slf_utils.folds): folds over identities, each fold's
models trained on the other folds' `train` clips only (never a gallery clip), validation speakers apart from test
speakers in every fold, per-fold galleries with their exact chance, nested cross-fitting of the encoder stages, and
the scored embeddings following a retrained fold."""

import itertools
import json
import shutil
from collections import Counter
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from slf_utils import contrastive as C
from slf_utils import (
    diffusion,
    evaluation,
    face_decoder,
    folds,
    recipe,
    recognisers,
    references,
    report_tables,
    retrieval,
    summary,
    tables,
)
from slf_utils import encoder_stage as S
from slf_utils import voice_encoder as V
from slf_utils.basics import ParamsError
from slf_utils.config import load_params
from slf_utils.folds import (
    HELD_OUT,
    check_training_set,
    fold_roles,
    fold_stage,
    fold_view,
    identity_folds,
    seeded_folds,
    training_clips,
    training_ids,
)
from slf_utils.preprocessing import assign_validation
from slf_utils.results import Results
from slf_utils.store import Store, open_store
from slf_utils.synthetic import synthetic_store

torch.set_num_threads(1)
FOLDS = 3
QUIET = dict(log=lambda *a: None)
NO_VALIDATION = {"per_identity": 0, "identities": 0}


def write_params(tmp_path, folds=FOLDS, validation=NO_VALIDATION, name="open", **extra):
    p = tmp_path / f"{name}.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "results": str(tmp_path / "results"),
                "data": {"identity_folds": {"folds": folds, "seed": 0}, "validation": validation},
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
    """The demo's shape: 7 identities x 4 clips (2 train, 2 test each), no validation speakers: folds of 3, 2, 2."""
    tmp = tmp_path_factory.mktemp("open")
    synthetic_store(tmp / "results" / "store", n_identities=7, clips_per_identity=4, face_size=32)
    return tmp, load_params(write_params(tmp))


VOX_VALIDATION = {"per_identity": 0, "identities": 3, "clips_per_identity": 2, "seed": 0}


@pytest.fixture(scope="module")
def voxceleb_like(tmp_path_factory):
    """VoxCeleb's shape: 9 identities x 6 clips (3 train, 3 held out), 3 of them validation speakers (2 held-out clips
    `val`, 1 `unused`), the splits written as preprocessing writes them (assign_validation, then add_clips)."""
    tmp = tmp_path_factory.mktemp("vox")
    store = synthetic_store(tmp / "results" / "store", n_identities=9, clips_per_identity=6, face_size=32)
    store.add_clips(assign_validation(store.clips()[["clip_id", "identity", "split"]], VOX_VALIDATION, FOLDS))
    return tmp, load_params(write_params(tmp, validation=VOX_VALIDATION))


def demo_table(folds=FOLDS):
    """The demo manifest's shape without its media: 40 identities x 10 clips (7 train, 3 held out), 10 validation
    speakers with all 3 held-out clips `val` (params/demo-open.yaml)."""
    rows = [(f"s{i:02d}/c{j}", f"s{i:02d}", "train" if j < 7 else "test") for i in range(40) for j in range(10)]
    clips = pd.DataFrame(rows, columns=["clip_id", "identity", "split"])
    v = {"per_identity": 0, "identities": 10, "clips_per_identity": 3, "seed": 0}
    cfg = {"data": {"identity_folds": {"folds": folds, "seed": 0, "gallery": "fold"}, "validation": v}}
    return cfg, assign_validation(clips, v, folds)


# ------------------------------------------------------------------------------------------------ folds and roles
def test_every_identity_is_in_one_fold_and_tested_exactly_once(project):
    tmp, cfg = project
    store = open_store(cfg)
    fold_of = identity_folds(cfg, store.clips())
    assert sorted(Counter(fold_of.values()).values()) == [2, 2, 3]  # balanced: sizes differ by at most one
    assert fold_of == seeded_folds(store.clips()["identity"], FOLDS, 0)  # no validation speakers: the encoders' deal
    queries = evaluation.eval_clips(store)
    parts = evaluation.model_parts(cfg, "full_input", store, queries)
    assert [(d.name, k) for d, _, k in parts] == [("fold0", 0), ("fold1", 1), ("fold2", 2)]
    tested = Counter(i for _, part, _ in parts for i in set(part["identity"]))
    assert set(tested) == set(queries["identity"]) and set(tested.values()) == {1}
    assert sorted(c for _, part, _ in parts for c in part["clip_id"]) == sorted(queries["clip_id"])
    for k, (_, part, _) in enumerate(parts):
        view = fold_view(store.clips(), fold_of, k)
        mine = view["identity"].map(fold_of) == k
        assert not (view[mine]["split"] == "train").any()  # its identities: queries or unused, never trained on
        # the other identities: their training clips only (their held-out clips are gallery images: unused)
        assert (view[~mine]["split"] == "train").sum() == (store.clips()[~mine]["split"] == "train").sum()
        assert not (view[~mine]["split"].isin(HELD_OUT)).any()
        assert set(part["identity"]) == {i for i, f in fold_of.items() if f == k}


def test_closed_set_is_unchanged_and_folds_are_validated(project, tmp_path):
    tmp, _ = project
    closed = load_params(write_params(tmp, folds=0, name="closed"))
    store = open_store(closed)
    assert identity_folds(closed, store.clips()) == {}
    assert training_clips(store, closed, None)["clip_id"].tolist() == store.clips(split="train")["clip_id"].tolist()
    queries = evaluation.eval_clips(store)
    [(model_dir, part, fold)] = evaluation.model_parts(closed, "full_input", store, queries)
    assert model_dir.name == "model" and len(part) == len(queries) and fold is None
    with pytest.raises(ParamsError, match="identity_folds.folds.*0 .closed set. or at least 2"):
        load_params(write_params(tmp_path, folds=1))


def test_per_identity_validation_with_folds_is_refused_at_load(tmp_path):
    with pytest.raises(ParamsError, match=r"data\.validation\.per_identity.*use data\.validation\.identities"):
        load_params(write_params(tmp_path, validation={"per_identity": 1}))
    with pytest.raises(ParamsError, match=r"data\.validation\.identities is 2: with 3 identity folds"):
        load_params(write_params(tmp_path, validation={"per_identity": 0, "identities": 2}))
    with pytest.raises(ParamsError, match=r"data\.identity_folds\.gallery"):
        load_params(write_params(tmp_path, data={"identity_folds": {"folds": 3, "gallery": "everyone"}}))
    cfg = load_params(write_params(tmp_path, validation={"per_identity": 0, "identities": 3}))
    assert cfg["data"]["identity_folds"]["gallery"] == "fold"  # the default: per-fold galleries
    closed = load_params(write_params(tmp_path, folds=0, validation={"per_identity": 1}))  # the closed set keeps it
    assert closed["data"]["validation"]["per_identity"] == 1


@pytest.mark.parametrize("shape", ["demo", "voxceleb"])
def test_validation_and_test_identities_are_disjoint_in_every_fold_and_every_fold_has_both(shape, voxceleb_like):
    if shape == "demo":
        cfg, clips = demo_table()
        n_val, n_test, per_val = 10, 30, 3
    else:
        tmp, cfg = voxceleb_like
        clips = open_store(cfg).clips()
        n_val, n_test, per_val = 3, 6, 2
    fold_of = identity_folds(cfg, clips)
    val_ids = set(clips.loc[clips["split"] == "val", "identity"])
    test_ids = set(clips.loc[clips["split"] == "test", "identity"])
    assert len(val_ids) == n_val and len(test_ids) == n_test and not val_ids & test_ids
    for ident in val_ids:  # c held-out clips `val`, the other held-out clips `unused`, the training clips `train`
        mine = clips[clips["identity"] == ident]["split"]
        assert (mine == "val").sum() == per_val and (mine == "train").sum() == (7 if shape == "demo" else 3)
        assert set(mine) <= {"val", "unused", "train"}
    assert sorted(Counter(fold_of.values()).values()) == sorted(
        Counter(seeded_folds(clips["identity"], FOLDS, 0).values()).values()
    )  # sizes still differ by at most one
    roles = fold_roles(cfg, clips)
    assert len(roles) == FOLDS and (roles["test_identities"] > 0).all() and (roles["validation_identities"] > 0).all()
    assert roles["test_identities"].sum() == n_test and roles["validation_identities"].sum() == n_val
    for r in roles.itertuples():
        mine = {i for i, f in fold_of.items() if f == r.fold}
        train = training_clips_of(clips, fold_of, r.fold)
        assert not set(train["identity"]) & mine  # training identities: never a test or validation one of the fold
        assert r.training_identities == len(set(fold_of) - mine) == train["identity"].nunique()
        assert set(train["split"]) == {"train"}
    # the choice (val rows, every fold's) never reads an identity that is reported (test rows)
    assert not set(clips.loc[clips["split"] == "val", "identity"]) & set(
        clips.loc[clips["split"] == "test", "identity"]
    )
    line = folds.roles_line(cfg, clips)
    if shape == "demo":  # 90 test queries of 30 identities against the closed set's 80 of 40
        assert "90 test queries of 30 identities, against 80 of 40" in line and "1.15x wider" in line
    else:  # the report's Unseen speakers paragraph says it, from the store
        assert line in summary._unseen_line(cfg) and "scales chosen on validation speakers" in summary._unseen_line(cfg)


def training_clips_of(clips, fold_of, k):
    view = fold_view(clips, fold_of, k)
    return view[view["split"] == "train"]


# ------------------------------------------------------------------------------------------------ no gallery clip
def _recording_reads(monkeypatch):
    read = {}
    load_stacked, get = Store.load_stacked, Store.get

    def rec_stacked(self, stage, clip_ids, *a, **k):
        read.setdefault(stage, set()).update(clip_ids)
        return load_stacked(self, stage, clip_ids, *a, **k)

    def rec_get(self, clip_id, stage):
        read.setdefault(stage, set()).add(clip_id)
        return get(self, clip_id, stage)

    monkeypatch.setattr(Store, "load_stacked", rec_stacked)
    monkeypatch.setattr(Store, "get", rec_get)
    return read


def _train_fold(cfg, system, out, k):
    if system.endswith("direct"):
        return face_decoder._train(cfg, system, out, False, k, lambda *_: None)
    return diffusion._train(cfg, system, out, None, k)


@pytest.mark.parametrize(
    "shape,system",
    [("demo", "no_image_guide"), ("demo", "face_to_face_direct"), ("voxceleb", "face_to_face_direct")],
)
def test_no_gallery_clip_is_read_by_a_folds_training(project, voxceleb_like, monkeypatch, tmp_path, shape, system):
    """Every store read of fold k's training is recorded: none is a clip of fold k's identities, none is a gallery
    (val, test) or unused clip of any identity, and every training clip of the other identities is read."""
    _, cfg = project if shape == "demo" else voxceleb_like
    store = open_store(cfg)
    clips = store.clips()
    fold_of = identity_folds(cfg, clips)
    read = _recording_reads(monkeypatch)
    for k in range(FOLDS):
        read.clear()
        _train_fold(cfg, system, tmp_path / f"fold{k}", k)
        seen = set().union(*read.values())
        held = set(clips.loc[clips["identity"].map(fold_of) == k, "clip_id"])
        others = set(clips.loc[(clips["identity"].map(fold_of) != k) & (clips["split"] == "train"), "clip_id"])
        assert seen and not seen & held
        assert not seen & set(clips.loc[clips["split"] != "train", "clip_id"])
        assert others <= seen


def test_a_planted_gallery_clip_is_refused_with_its_name(project, monkeypatch, tmp_path):
    _, cfg = project
    store = open_store(cfg)
    clips = store.clips()
    fold_of = identity_folds(cfg, clips)
    planted = clips.loc[(clips["identity"].map(fold_of) == 0) & (clips["split"] == "test"), "clip_id"].iloc[0]
    with pytest.raises(ValueError, match=f"x: its training set holds 1 gallery clip.*{planted}"):
        check_training_set(clips, [planted, *clips.loc[clips["split"] == "train", "clip_id"]], "x")
    view = folds.fold_view

    def leaky(c, f, k):  # a fold view that forgets one of fold 0's test images is a gallery image
        out = view(c, f, k)
        return out.assign(split=np.where(out["clip_id"] == planted, "train", out["split"]))

    monkeypatch.setattr(folds, "fold_view", leaky)
    with pytest.raises(ValueError, match=rf"face_to_face_direct \(identity fold 1\): .*gallery.*{planted}"):
        _train_fold(cfg, "face_to_face_direct", tmp_path / "d1", 1)
    with pytest.raises(ValueError, match=rf"no_image_guide \(identity fold 2\): .*{planted}"):
        _train_fold(cfg, "no_image_guide", tmp_path / "n2", 2)
    other = clips[(clips["identity"].map(fold_of) == 1) & (clips["split"] == "test")]
    gallery = SimpleNamespace(clip_ids=other["clip_id"].tolist(), identities=other["identity"].tolist())
    with pytest.raises(ValueError, match=rf"attribute_mean \(identity fold 1\): .*{planted}"):
        references.reference_images("attribute_mean", store, gallery, 32, cfg)
    assert not (tmp_path / "d1" / "meta.json").exists() and not (tmp_path / "n2" / "checkpoint.pt").exists()


def test_each_fold_model_answers_its_own_identities_and_identity_mean_is_skipped(project):
    _, cfg = project
    result = diffusion.train(cfg, "no_image_guide")
    assert [r["model_dir"].rsplit("/", 1)[-1] for r in result["folds"]] == ["fold0", "fold1", "fold2"]
    metrics = evaluation.run(cfg, "no_image_guide", **QUIET)
    store = open_store(cfg)
    n = len(evaluation.eval_clips(store))
    samples = evaluation._existing_samples(Results.of(cfg).eval("no_image_guide"))
    assert len(samples) == n and samples["clip_id"].is_unique
    prov = json.loads((Results.of(cfg).eval("no_image_guide") / "provenance.json").read_text())
    fold_of = identity_folds(cfg, store.clips())
    assert [p["split"]["fold"] for p in prov["model_provenance"]] == [0, 1, 2]
    for p, k in zip(prov["model_provenance"], range(FOLDS)):  # the other identities' training clips (2 each) only
        assert p["split"]["train_clips"] == 2 * sum(f != k for f in fold_of.values())
    assert [r["fold"] for r in prov["fold_roles"]] == [0, 1, 2] and "own identity fold" in prov["gallery"]["ranked_in"]
    assert metrics["metric"].eq("recall@1").any()
    ref = evaluation.run(cfg, "identity_mean", **QUIET)
    unsampled = ref[(ref["metric"] == "n_unsampled") & (ref["split"] == "test")]["value"].iloc[0]
    assert unsampled == n  # no query's identity has a training face


def test_attribute_mean_under_folds_is_the_mean_of_the_other_folds_training_faces_of_its_gender(project):
    _, cfg = project
    store = open_store(cfg)
    fold_of = identity_folds(cfg, store.clips())
    queries = evaluation.eval_clips(store)
    g = evaluation.prepare_gallery(cfg, store, recognisers.make_embedder(cfg, store))
    ids, images = references.reference_images("attribute_mean", store, g, 32, cfg)
    assert ids == queries["clip_id"].tolist()
    clips = store.clips()
    faces = store.load_stacked("preprocess", clips["clip_id"].tolist(), keys=["face"])["face"].astype(np.float64)
    for cid, img in list(zip(ids, images))[::3]:
        q = clips.set_index("clip_id").loc[cid]
        k = fold_of[q["identity"]]
        train = (clips["identity"].map(fold_of) != k) & (clips["split"] == "train")  # never a gallery face
        same = train & (clips["gender"] == q["gender"]) & (clips["ethnicity"] == q["ethnicity"])
        if not same.any():  # no training face of that gender and ethnicity: gender alone
            same = train & (clips["gender"] == q["gender"])
        want = np.round(faces[same.to_numpy()].mean(0)).astype(np.uint8)
        np.testing.assert_array_equal(img, want)
    assert references.reference_images("identity_mean", store, g, 32, cfg) == ([], [])


# ------------------------------------------------------------------------------------------------ per-fold galleries
def test_per_fold_gallery_ranks_each_query_among_its_own_fold_and_chance_is_exact():
    """Toy gallery: fold A holds a, a, b; fold B holds c, c, d, d, e. Each query's nearest image is of the other fold
    (planted): with one gallery it misses, with per-fold galleries it is never ranked against it. Chance is the hand
    count in the query's own fold."""
    ids = np.array(["a", "a", "b", "c", "c", "d", "d", "e"])
    groups = ["A", "A", "A", "B", "B", "B", "B", "B"]
    rng = np.random.default_rng(0)
    g = rng.normal(size=(8, 4)).astype(np.float32) * 10
    own = np.arange(8)
    q = g[[3, 4, 5, 0, 1, 2, 0, 1]] + 0.01  # each query sits on an image of the other fold
    nn = retrieval.ranked_neighbours(q, own, g, "l2", groups)
    for i, row in enumerate(nn):
        ranked = row[row >= 0]
        assert {groups[j] for j in ranked} == {groups[i]} and len(ranked) == groups.count(groups[i])
    one = retrieval.ranked_neighbours(q, own, g, "l2")
    assert all(groups[one[i][0]] != groups[i] for i in range(8))  # one gallery: the planted neighbour comes first
    hits = retrieval.protocol_hits(q, own, g, ids, (1, 2), "l2", groups)
    assert hits["paper"][2][:3].all()  # fold A has 2 identities: top-2 of its own fold always holds the query's
    chance = retrieval.chance_hits(ids, ks=(1, 2), groups=groups)
    third, half, fifth, quarter = 1 / 3, 1 / 2, 1 / 5, 1 / 4
    np.testing.assert_allclose(chance["paper"][1], [2 * third, 2 * third, third, 2 * fifth, 2 * fifth, 2 * fifth,
                                                    2 * fifth, fifth])  # fmt: skip
    np.testing.assert_allclose(chance["identity"][1], [half, half, 0, quarter, quarter, quarter, quarter, 0])
    # k = 2 by counting every ordering of the fold's clips (own clip left out under `identity`)
    for i in range(8):
        for protocol in retrieval.PROTOCOLS:
            pool = [j for j in range(8) if groups[j] == groups[i] and not (protocol == "identity" and j == i)]
            hit = Fraction(0)
            orders = list(itertools.permutations(pool))
            for order in orders:
                first = list(dict.fromkeys(ids[j] for j in order))[:2]
                hit += ids[i] in first
            assert chance[protocol][2][i] == pytest.approx(float(hit / len(orders))), (i, protocol)
    one_gallery = retrieval.chance_hits(ids, ks=(1,))
    assert one_gallery["paper"][1][0] == pytest.approx(2 / 8)  # without folds: 2 of all 8 clips
    # the random row orders its own fold only, and matches the exact chance on average
    queries = np.tile(own, 2000)
    r = retrieval.random_selection_hits(ids[queries], ids, (1,), 0, None, groups, queries)
    np.testing.assert_allclose(r[1].reshape(2000, -1).mean(0), chance["paper"][1], atol=0.04)


def test_every_query_is_ranked_among_its_own_folds_faces_in_the_evaluation(project, monkeypatch):
    _, cfg = project
    store = open_store(cfg)
    fold_of = identity_folds(cfg, store.clips())
    gallery = evaluation.eval_clips(store)
    fold = gallery["identity"].map(fold_of).to_numpy()
    calls = []
    ranked = retrieval.ranked_neighbours

    def spy(queries, own, emb, metric="l2", groups=None):
        nn = ranked(queries, own, emb, metric, groups)
        calls.append((np.asarray(own), nn))
        return nn

    monkeypatch.setattr(retrieval, "ranked_neighbours", spy)
    metrics = evaluation.run(cfg, "bicubic", **QUIET)
    assert calls
    for own, nn in calls:
        for i, row in zip(own, nn):
            assert set(fold[row[row >= 0]]) == {fold[i]}  # never an image of another fold's identity
    want = retrieval.chance_hits(gallery["identity"], ks=(1,), groups=fold.tolist())
    test = (gallery["split"] == "test").to_numpy()
    got = metrics[(metrics["metric"] == "chance@1") & (metrics["split"] == "test")].set_index("protocol")["value"]
    for p in retrieval.PROTOCOLS:
        assert got[p] == pytest.approx(want[p][1][test].mean())
    assert got["paper"] > 1 / len(set(gallery["identity"]))  # smaller galleries: above one gallery's 1/N


# ------------------------------------------------------------------------------------------------ nested cross-fitting
def nested_cfg(tmp, **extra):
    s2f = {"face_model": "eigenfaces", "voice_encoder": {"steps": 30, "batch_size": 8, "hidden": 32}}
    ct = {"steps": 20, "batch_size": 8, "hidden": 32, "dim": 16, "channels": [8, 16]}
    return load_params(write_params(tmp, name="nested", speech2face=s2f, contrastive=ct, **extra))


@pytest.fixture(scope="module")
def nested(tmp_path_factory):
    """9 identities x 4 clips, 3 folds of 3; notebook 06's and 07's encoders trained with nested cross-fitting."""
    tmp = tmp_path_factory.mktemp("nested")
    synthetic_store(tmp / "results" / "store", n_identities=9, clips_per_identity=4, face_size=32)
    cfg = nested_cfg(tmp)
    return cfg, V.run(cfg, **QUIET), C.run(cfg, **QUIET)


@pytest.mark.parametrize("stage", [V.VOICE_STAGE, C.STAGE])
def test_nested_crossfitting_no_fold_k_input_comes_from_an_encoder_that_saw_fold_k(nested, stage):
    """Asserted on the provenance each fold stage records: every value fold k's models read (their training clips and
    their queries) was written by an encoder whose training identities exclude fold k's, and exclude the clip's own
    fold's (inner cross-fitting)."""
    cfg, _, _ = nested
    store = open_store(cfg)
    clips = store.clips()
    fold_of = identity_folds(cfg, clips)
    ident = dict(zip(clips["clip_id"], clips["identity"]))
    trainings = set()
    for k in range(FOLDS):
        prov = store.provenance(fold_stage(stage, k))
        assert prov["outer_fold"] == k
        enc = prov["encoders"]
        trainings |= {e["model_hash"] for e in enc.values()}
        fold_k = {i for i, f in fold_of.items() if f == k}
        r = recipe.resolve_recipe(cfg, "speech_to_face" if stage == V.VOICE_STAGE else "contrastive_speech", k)
        assert r.layout.stages(r.system.keep) == [fold_stage(stage, k)]  # fold k's recipe reads its own copy
        read = training_ids(store, r.layout.stages(r.system.keep), cfg, k)
        queries = clips.loc[clips["identity"].isin(fold_k) & clips["split"].isin(HELD_OUT), "clip_id"]
        assert (
            read and len(queries) and set(read) | set(queries) <= store.done(fold_stage(stage, k), prov["params_hash"])
        )
        for c in [*read, *queries]:
            j = fold_of[ident[c]]
            writer = enc[prov["values_of_fold"][str(j)]]
            seen = set(writer["train_identities"])
            assert seen and not seen & fold_k, (k, c)  # never saw fold k
            assert not seen & {i for i, f in fold_of.items() if f == j}, (k, c)  # nor the clip's own fold
    assert len(trainings) == FOLDS + FOLDS * (FOLDS - 1) // 2  # K + K(K-1)/2 distinct encoders


def test_nested_stage_values_of_fold_k_clips_are_the_outer_encoders(nested):
    """Fold k's own clips read the same value from its stage as the encoder's own evaluation (the encoder without
    fold k, unrotated); a training clip of fold j != k reads another one (the encoder without j and k)."""
    cfg, _, _ = nested
    store = open_store(cfg)
    clips = store.clips()
    fold_of = identity_folds(cfg, clips)
    for stage in (V.VOICE_STAGE, C.STAGE):
        ids = clips["clip_id"].tolist()
        base = store.load_stacked(stage, ids, keys=["embedding"])["embedding"]
        for k in range(FOLDS):
            mine = (clips["identity"].map(fold_of) == k).to_numpy()
            per = store.load_stacked(fold_stage(stage, k), ids, keys=["embedding"])["embedding"]
            np.testing.assert_allclose(per[mine], base[mine], atol=1e-6)
            assert not np.allclose(per[~mine], base[~mine], atol=1e-3)
    assert "without folds j and k rotated onto the pair without fold k" in store.provenance(C.STAGE)["alignment"]


def test_a_direct_decoder_of_fold_k_trains_on_and_decodes_from_its_fold_stage(nested, monkeypatch, tmp_path):
    cfg, _, _ = nested
    read = _recording_reads(monkeypatch)
    face_decoder._train(cfg, "speech_to_face_direct", tmp_path / "fold1", False, 1, lambda *_: None)
    assert "face_embedding" in read and V.VOICE_STAGE not in read  # trained on true embeddings, as published
    read.clear()
    store = open_store(cfg)
    fold_of = identity_folds(cfg, store.clips())
    ids = [c for c, i in zip(store.clips()["clip_id"], store.clips()["identity"]) if fold_of[i] == 1][:2]
    face_decoder.decode(cfg, "speech_to_face_direct", ids, store, directory=tmp_path / "fold1", fold=1)
    assert set(read) == {fold_stage(V.VOICE_STAGE, 1)}


def test_nested_crossfitting_needs_three_folds(tmp_path):
    cfg = load_params(write_params(tmp_path, folds=2))
    synthetic_store(tmp_path / "results" / "store", n_identities=4, clips_per_identity=2, face_size=32)
    with pytest.raises(ValueError, match="folds is 2: nested cross-fitting .* at least 3"):
        S.fold_models(cfg, open_store(cfg), lambda exclude, sub: None)


# ------------------------------------------------------------------------------------------------ caches
def test_retraining_one_fold_changes_the_scored_embeddings(project, monkeypatch):
    """The per-scale embedding cache is keyed by every fold's sample hash: retrain a fold that does not hold the
    first query, resample, and its new faces' embeddings are the ones scored (the other folds' are unchanged)."""
    _, cfg = project
    system = "speaker_embeddings_only"
    diffusion.train(cfg, system)
    scored = []
    score = evaluation.score_scale

    def spy(*a, **k):
        scored.append((list(k["clip_ids"]), k["embeddings"][0].copy()))
        return score(*a, **k)

    monkeypatch.setattr(evaluation, "score_scale", spy)
    evaluation.run(cfg, system, **QUIET)
    store = open_store(cfg)
    fold_of = identity_folds(cfg, store.clips())
    ids, before = scored[-1]
    fold = np.array([fold_of[c.split("/")[0]] for c in ids])
    k = next(f for f in range(FOLDS) if f != fold[0])
    model = evaluation.Results.of(cfg).model(system)
    shutil.rmtree(model / f"fold{k}")
    seed1 = load_params(cfg["params_file"], {"train": {"seed": 1}})
    diffusion._train(seed1, system, model / f"fold{k}", None, k)  # fold k retrained, the others untouched
    evaluation.run(cfg, system, **QUIET)
    ids2, after = scored[-1]
    assert ids2 == ids
    assert not np.allclose(after[fold == k], before[fold == k])  # its new faces are scored
    np.testing.assert_allclose(after[fold != k], before[fold != k])
    out = Results.of(cfg).eval(system)
    samples = evaluation._existing_samples(out).set_index("clip_id").loc[ids]
    images = [evaluation.read_image(out / p) for p in samples["image"]]
    np.testing.assert_allclose(after, recognisers.make_embedder(cfg, store).embed(images)[0], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ direct decoders
def test_a_direct_decoder_trains_and_decodes_per_fold(project):
    _, cfg = project
    result = face_decoder.train(cfg, "face_to_face_direct", log=lambda *_: None)
    assert [r["fold"] for r in result["folds"]] == [0, 1, 2]
    metrics = evaluation.run(cfg, "face_to_face_direct", log=lambda *_: None)
    store = open_store(cfg)
    queries = evaluation.eval_clips(store)
    samples = evaluation._existing_samples(Results.of(cfg).eval("face_to_face_direct"))
    assert samples["clip_id"].tolist() == queries["clip_id"].tolist()  # the queries' order, whatever the folds
    # each query's face is its own fold's decoder's
    fold_of = identity_folds(cfg, store.clips())
    q = queries.iloc[0]
    k = fold_of[q["identity"]]
    own = face_decoder.decode(
        cfg, "face_to_face_direct", [q["clip_id"]], store, directory=result["folds"][k]["model_dir"], fold=k
    )[0]
    np.testing.assert_array_equal(
        own, evaluation.read_image(Results.of(cfg).eval("face_to_face_direct") / samples["image"].iloc[0])
    )
    assert metrics["metric"].eq("recall@1").any()


def test_rows_are_shown_against_attribute_mean_where_identity_mean_cannot_exist():

    def row(system, v):
        return [system, np.nan, "identity", "test", "recall@1", v, v - 0.1, v + 0.1, 10]

    cols = tables.METRIC_COLUMNS
    closed = evaluation.pd.DataFrame([row("identity_mean", 0.6), row("attribute_mean", 0.2)], columns=cols)
    assert report_tables._ceiling(closed) == ("identity_mean", 0.6)
    unseen = evaluation.pd.DataFrame([row("attribute_mean", 0.2), row("x", 0.1)], columns=cols)
    assert report_tables._ceiling(unseen) == ("attribute_mean", 0.2)
    table = report_tables.headline_table(unseen, {"x": np.nan, "attribute_mean": np.nan})
    assert table.set_index("system").loc["x", "of_ceiling"] == pytest.approx(0.5)
    assert "vs attribute_mean" in report_tables.pretty_headline(table).columns
