"""Speech2Face on the SLF bench (issue 12): the wrap encoder that lays a face embedding over rows, the systems and
their `decoder`, the direct face decoder, the grid's voice-encoder step and `grid.reuse`, the compare grid's report
(direct decoders as one point, the note that face_to_face sees the answer), and the compare grid end to end."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from slf_utils import evaluation, face_decoder, figures, grid, report, report_tables
from slf_utils.basics import ROOT, ParamsError
from slf_utils.config import load_params
from slf_utils.layout import Layout, load_systems
from slf_utils.preprocessing import guide_of
from slf_utils.results import Results
from slf_utils.synthetic import synthetic_store

LAYOUT = ROOT / "params" / "layout.yaml"
SYSTEMS = ROOT / "params" / "systems.yaml"
S2F = ["face_to_face", "speech_to_face", "face_to_face_direct", "speech_to_face_direct"]
QUIET = dict(log=lambda *a: None)


def write_layout(tmp_path, change, name="layout.yaml"):
    raw = yaml.safe_load(LAYOUT.read_text())
    change(raw)
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def spot_store(root, n_identities=4, clips_per_identity=4, voice_noise=1.0, face_dim=128):
    """synthetic_store whose faces are a bright spot at a place of the identity's own (eigenfaces, which standardise
    each image, see where the spot is, not the colour synthetic_store varies); its face_embedding determines the
    identity, its voice_face_embedding adds noise of sd `voice_noise` per entry."""
    store = synthetic_store(
        root, n_identities, clips_per_identity, face_size=32, face_dim=face_dim, voice_noise=voice_noise
    )
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:32, 0:32] / 32
    places = [(0.35 + 0.3 * (i % 2), 0.35 + 0.15 * (i // 2)) for i in range(n_identities)]
    for cid, ident in store.clips()[["clip_id", "identity"]].itertuples(index=False):
        y, x = places[int(ident[2:])]
        spot = np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 0.006)[..., None]
        face = np.clip(40 + 180 * spot + rng.normal(0, 3, (32, 32, 3)), 0, 255).astype(np.uint8)
        store.put(cid, "preprocess", {"face": face, "guide": guide_of(face, 8)}, "synthetic")
    return store


def grid_file(tmp_path, name="s2f", **sections):
    cfg = {
        "name": name,
        "results": str(tmp_path / "results"),
        "model": {"preset": "tiny"},
        "evaluate": {"face_model": "eigenfaces", "bootstrap": 50, "attributes": "none", "scales": [0, 2]},
        "face_decoder": {"steps": 300, "batch_size": 8, "hidden": 64, "channels": 32, "lr": 3e-3},
        "report": {"bootstrap": 50, "differences": [["face_to_face_direct", "speech_to_face_direct"]]},
        **sections,
    }
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


# ---------------------------------------------------------------------------------------------- the wrap encoder
def test_wrap_spreads_a_vgg_face_vector_over_six_rows(tmp_path):
    """A 4096-d vector (VGG-Face) fills rows 224-229 of face_embedding, 768 entries a row in order, the last row's
    tail zero; `standard` normalises each entry with the training split's statistics; a 128-d one (Dlib) fills the
    first 128 columns of one row; the rows after stay zero."""
    store = synthetic_store(tmp_path / "store", n_identities=3, clips_per_identity=4, face_size=16, face_dim=4096)
    lay = Layout.load(LAYOUT)
    train = store.clips(split="train")["clip_id"].tolist()
    stats = lay.fit(store, train, ["face_embedding"])
    assert stats["face_embedding.mean"].shape == (4096,)
    X = lay.build(store, train, ["face_embedding"], stats)
    raw = store.load_stacked("face_embedding", train)["embedding"]
    want = (raw - raw.mean(0)) / raw.std(0)
    rows = X[:, 224:230].reshape(len(train), -1)
    np.testing.assert_allclose(rows[:, :4096], want, atol=1e-3)
    assert not rows[:, 4096:].any() and not X[:, 230:].any() and not X[:, :224].any()
    assert (np.abs(X[:, 224:230]).sum(-1) > 0).all()  # every row carries data: none is masked

    small = synthetic_store(tmp_path / "small", n_identities=3, clips_per_identity=2, face_size=16, face_dim=128)
    ids = small.clips()["clip_id"].tolist()
    both = ["face_embedding", "voice_face_embedding"]
    X = lay.build(small, ids, both, lay.fit(small, ids, both))
    assert X[:, 224, :128].any() and not X[:, 224, 128:].any() and not X[:, 225:230].any()
    assert X[:, 230, :128].any() and not X[:, 231:].any()


def test_wrap_overflow_and_validation(tmp_path):
    store = synthetic_store(tmp_path / "store", n_identities=2, clips_per_identity=2, face_size=16, face_dim=4096)
    ids = store.clips()["clip_id"].tolist()
    five = write_layout(tmp_path, lambda r: r["constituents"]["face_embedding"].update(rows=[224, 229]), "five.yaml")
    lay = Layout.load(five)
    with pytest.raises(ValueError, match=r"4096-d vector needs 6 rows of 768 columns, the layout reserves 5"):
        lay.build(store, ids, ["face_embedding"], lay.fit(store, ids, ["face_embedding"]))

    def truncate(r):
        r["constituents"]["face_embedding"].update(rows=[224, 229], overflow="truncate", normalise="none")

    lay = Layout.load(write_layout(tmp_path, truncate, "trunc.yaml"))
    with pytest.warns(UserWarning, match="truncated to the 3840 entries"):
        X = lay.build(store, ids, ["face_embedding"], {})
    raw = store.load_stacked("face_embedding", ids)["embedding"]
    np.testing.assert_allclose(X[:, 224:229].reshape(len(ids), -1), raw[:, :3840], rtol=1e-6)

    for change, match in (
        (lambda c: c.update(wrap="yes"), "wrap must be true or false"),
        (lambda c: c.update(select="longest_first", source={**c["source"], "bounds": "window"}), "wrap: spreads"),
    ):
        p = write_layout(tmp_path, lambda r, change=change: change(r["constituents"]["face_embedding"]), "bad.yaml")
        with pytest.raises(ParamsError, match=match):
            Layout.load(p)
    p = write_layout(tmp_path, lambda r: r["constituents"]["gender"].update(wrap=True), "bad.yaml")
    with pytest.raises(ParamsError, match="constituents.gender.wrap"):
        Layout.load(p)
    # a whole-clip vector stage is required: sliding windows are frames, not one vector
    mel = {"stage": "mel", "key": "frames"}
    p = write_layout(tmp_path, lambda r: r["constituents"]["face_embedding"].update(source=mel))
    lay = Layout.load(p)
    with pytest.raises(ValueError, match="wrap spreads one vector per clip"):
        lay.fit(store, ids, ["face_embedding"])


# ---------------------------------------------------------------------------------------------- systems
def test_speech2face_systems_and_their_decoders():
    lay = Layout.load(LAYOUT)
    systems = load_systems(SYSTEMS, lay)
    got = {s: (systems[s].mode, systems[s].decoder, systems[s].keep, systems[s].train_on) for s in S2F}
    assert got == {
        "face_to_face": ("generation", "diffusion", ("face_embedding",), None),
        "speech_to_face": ("generation", "diffusion", ("voice_face_embedding",), None),
        "face_to_face_direct": ("generation", "direct", ("face_embedding",), "face_embedding"),
        "speech_to_face_direct": ("generation", "direct", ("voice_face_embedding",), "face_embedding"),
    }
    assert all("sees the answer" in systems[s].note for s in ("face_to_face", "face_to_face_direct"))
    # the true face embedding is the answer: no SLF system sees it
    for name, s in systems.items():
        if name not in S2F:
            assert not {"face_embedding", "voice_face_embedding"} & set(s.keep), name
            assert s.decoder == "diffusion"
    assert set(lay.system_stages(systems["speech_to_face_direct"])) == {"voice_face_embedding", "face_embedding"}


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"mode": "generation", "decoder": "vae", "keep": ["face_embedding"]}, "decoder must be one of"),
        ({"mode": "super_resolution", "decoder": "direct", "keep": ["face_embedding"]}, "mode generation"),
        ({"mode": "generation", "decoder": "direct", "keep": ["face_embedding", "speaker"]}, "exactly one array"),
        ({"mode": "generation", "decoder": "direct", "keep": ["gender"]}, "exactly one array"),
        ({"mode": "generation", "decoder": "direct", "keep": ["mel"]}, "must be wrap or a single row"),
        ({"mode": "generation", "keep": ["face_embedding"], "train_on": "face_embedding"}, "only a direct decoder"),
        ({"mode": "generation", "decoder": "direct", "keep": ["face_embedding"], "train_on": "speaker"}, "laid out"),
        ({"mode": "generation", "decoder": "direct", "keep": ["face_embedding"], "train_on": "nose"}, "unknown"),
        ({"mode": "generation", "keep": ["face_embedding"], "note": 3}, "note must be a string"),
    ],
)
def test_invalid_decoder_declarations_fail_naming_the_key(tmp_path, entry, match):
    p = tmp_path / "systems.yaml"
    p.write_text(yaml.safe_dump({"bad": {"title": "Bad", **entry}}))
    with pytest.raises(ParamsError, match=match):
        load_systems(p, Layout.load(LAYOUT))


# ---------------------------------------------------------------------------------------------- direct decoder
def test_direct_decoder_reduces_its_loss_and_beats_the_mean_face(tmp_path):
    """Trained on the true embeddings of the training faces, the decoder's L1 falls and it reproduces its training
    faces far better than the mean face (what a decoder blind to its input would learn); the second direct system
    (same train_on, same parameters) reuses it instead of training again; decode() is deterministic."""
    spot_store(tmp_path / "results" / "store")
    cfg = load_params(grid_file(tmp_path))
    r = face_decoder.train(cfg, "face_to_face_direct", **QUIET)
    loss = pd.read_csv(Path(r["model_dir"]) / "loss.csv")
    assert len(loss) == 300 and loss["l1"].head(20).mean() > 3 * loss["l1"].tail(20).mean()
    assert r["train_l1"] < 0.5 * r["mean_face_l1"], r
    assert (r["in_dim"], r["size"]) == (128, 16)  # the tiny preset's output size
    again = face_decoder.train(cfg, "face_to_face_direct", **QUIET)
    assert again["reused"] == "this model dir" and again["model_hash"] == r["model_hash"]
    other = face_decoder.train(cfg, "speech_to_face_direct", **QUIET)
    assert "face_to_face_direct" in other["reused"] and other["model_hash"] == r["model_hash"]
    ids = ["id00000/yt002/00002", "id00001/yt003/00003"]
    a = face_decoder.decode(cfg, "face_to_face_direct", ids)
    assert a.shape == (2, 16, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, face_decoder.decode(cfg, "face_to_face_direct", ids))
    # a changed parameter is another decoder
    cfg2 = load_params(grid_file(tmp_path), {"face_decoder": {"steps": 10}})
    assert face_decoder.train(cfg2, "face_to_face_direct", **QUIET)["reused"] is None


def test_perceptual_loss_from_a_local_vgg_state_dict(tmp_path):
    """face_decoder.perceptual with weights the test creates (torchvision's ImageNet VGG-16 cannot be downloaded
    here): its term is computed and trained on."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    path = tmp_path / "vgg16_features.pt"
    torch.save(make_layers(cfgs["D"])[:16].state_dict(), path)
    fd = {**load_params(grid_file(tmp_path))["face_decoder"], "steps": 3, "perceptual": 0.1}
    fd["perceptual_source"] = str(path)
    model = face_decoder.FaceDecoder(8, 16, hidden=16, base=4, channels=16)
    x = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    faces = np.random.default_rng(1).integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
    hist = face_decoder.fit(model, x, faces, fd, **QUIET)
    assert len(hist) == 3 and (hist["perceptual"] > 0).all()
    np.testing.assert_allclose(hist["loss"], hist["l1"] + 0.1 * hist["perceptual"], rtol=1e-5)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Both direct systems on a synthetic store whose predicted embeddings are mostly noise, evaluated like every
    system, with the reference rows, and the report."""
    tmp = tmp_path_factory.mktemp("compared")
    spot_store(tmp / "results" / "store", n_identities=6, clips_per_identity=4, voice_noise=10.0)
    systems = ["face_to_face_direct", "speech_to_face_direct", "identity_mean", "random"]
    cfg = load_params(grid_file(tmp, systems=systems))
    for s in systems[:2]:
        face_decoder.train(cfg, s, **QUIET)
    metrics = {s: evaluation.run(cfg, s, **QUIET) for s in systems}
    return cfg, metrics, report.run(cfg, **QUIET)


def recall1(m, protocol="identity"):
    r = m[(m["metric"] == "recall@1") & (m["protocol"] == protocol)]
    assert len(r) == 1 and r["scale"].isna().all()  # one point: no conditional scale
    return float(r["value"].iloc[0])


def test_face_to_face_beats_speech_to_face(compared):
    """The same decoder fed the true embedding recovers the identity; fed a noisy prediction it does not."""
    cfg, metrics, _ = compared
    f2f, s2f = recall1(metrics["face_to_face_direct"]), recall1(metrics["speech_to_face_direct"])
    assert f2f >= 0.75 and f2f > s2f + 0.4, (f2f, s2f)  # measured: 1.0 against 0.25 (chance 1/6)
    out = Results.of(cfg).eval("face_to_face_direct")
    samples = pd.read_csv(out / "samples.csv")
    assert len(samples) == 12 and samples["scale"].isna().all() and (out / samples["image"].iloc[0]).exists()
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["decoder"].startswith("direct") and prov["model_provenance"]["train_on"] == "face_embedding"


def test_report_draws_direct_decoders_as_one_point_and_says_face_to_face_sees_the_answer(compared):
    cfg, _, res = compared
    out = Results.of(cfg).report
    headline = (out / "headline.md").read_text()
    assert "Face to Face (direct decoder, true embedding) †" in headline and "no scale" in headline
    assert "sees the answer" in headline and "sees the answer" in (out / "summary.md").read_text()
    checks = res["checks"].set_index("system")
    assert set(checks.index) == {"face_to_face_direct", "speech_to_face_direct"}  # judged; the references are not
    assert bool(checks.loc["face_to_face_direct", "ci_above_chance"])
    assert "no scale" in set(report_tables.pretty_checks(checks.reset_index())["best scale"])
    table = res["tables"]["table_best_scale"][0]
    assert {"face_to_face_direct", "speech_to_face_direct"} <= set(table["system"])
    diff = res["differences"]
    assert len(diff[(diff["a"] == "face_to_face_direct") & (diff["protocol"] == "identity")]) == 4  # 2 scales x k
    fig = figures.plot_recall_vs_scale(res["metrics"], report.system_titles(cfg))
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "Face to Face (direct decoder, true embedding) (no scale)" in labels
    assert "Identity mean face (reference)" in labels


# ---------------------------------------------------------------------------------------------- grid
def test_voice_encoder_step_comes_before_the_trainings_that_need_it_and_no_others(tmp_path):
    from slf_utils import voice_encoder

    assert set(grid.VOICE_ENCODER_STAGES) == {voice_encoder.FACE_STAGE, voice_encoder.VOICE_STAGE}
    assert grid.NOTEBOOK["voice_encoder"] == "06_voice_encoder.ipynb"
    systems = ["full_input", "random", *S2F]
    p = grid_file(tmp_path, systems=systems)
    _, steps = grid.plan(p)
    names = [s.name for s in steps]
    by = {s.name: s for s in steps}
    ve = names.index("voice_encoder")
    assert names.index("features") < ve and by["voice_encoder"].deps == ["features"]
    for s in S2F:
        assert names.index(f"train:{s}") > ve and "voice_encoder" in by[f"train:{s}"].deps
    assert by["train:full_input"].deps == ["features"] and by["evaluate:random"].deps == ["features"]
    # the two direct systems train one decoder (same train_on and face_decoder): the second waits and copies it
    assert by["train:speech_to_face_direct"].deps == ["features", "voice_encoder", "train:face_to_face_direct"]
    assert by["train:face_to_face_direct"].deps == ["features", "voice_encoder"]
    assert by["voice_encoder"].priority > max(s.priority for s in steps if s.kind == "train")
    # without a Speech2Face system there is no voice-encoder step, and full_input's steps are the same
    _, plain = grid.plan(grid_file(tmp_path, name="plain", systems=["full_input", "random"]))
    assert "voice_encoder" not in [s.name for s in plain]
    plain = {s.name: s.hash for s in plain}
    for n in ("preprocess", "features", "train:full_input", "evaluate:full_input", "evaluate:random"):
        assert plain[n] == by[n].hash, n
    # --only a Speech2Face system plans the encoder too
    assert "voice_encoder" in [s.name for s in grid.plan(p, only="speech_to_face")[1]]

    def hashes(over):
        return {s.name: s.hash for s in grid.plan(p, over)[1]}

    base = hashes({})
    ve_changed = hashes({"speech2face": {"voice_encoder": {"hidden": 32}}})
    assert ve_changed["voice_encoder"] != base["voice_encoder"]
    assert all(ve_changed[f"train:{s}"] != base[f"train:{s}"] for s in S2F)
    assert ve_changed["train:full_input"] == base["train:full_input"]
    assert hashes({"evaluate": {"scales": [0, 3]}})["voice_encoder"] == base["voice_encoder"]
    fd = hashes({"face_decoder": {"steps": 7}})
    assert [n for n in base if fd[n] != base[n] and n.startswith("train")] == [
        "train:face_to_face_direct",
        "train:speech_to_face_direct",
    ]
    tr = hashes({"train": {"steps": 7}})
    assert tr["train:face_to_face"] != base["train:face_to_face"]
    assert tr["train:face_to_face_direct"] == base["train:face_to_face_direct"]


def test_compare_grid_shares_its_slf_steps_with_the_demo_grid():
    """params/compare.yaml declares what it shares with params/demo.yaml exactly as the demo does: the same hashes,
    so grid.reuse copies a finished demo's steps instead of running them again."""
    demo = {s.name: s.hash for s in grid.plan(ROOT / "params" / "demo.yaml")[1]}
    cfg, steps = grid.plan(ROOT / "params" / "compare.yaml")
    compare = {s.name: s.hash for s in steps}
    shared = ["preprocess", "features"] + [
        f"{k}:{s}" for s in ("full_input", "speaker_embeddings_only") for k in ("train", "evaluate")
    ]
    shared += [f"evaluate:{s}" for s in ("bicubic", "identity_mean", "random")]
    assert {n: compare[n] for n in shared} == {n: demo[n] for n in shared}
    assert cfg["grid"]["reuse"] == [str(ROOT / "results" / "demo")]
    assert set(cfg["systems"]) >= {*S2F, "full_input", "speaker_embeddings_only", "bicubic", "identity_mean"}


def test_reuse_copies_a_finished_step_of_another_grid(tmp_path):
    other, here = tmp_path / "other", tmp_path / "here"
    p = grid_file(tmp_path, results=str(here), systems=["full_input", "random"], grid={"reuse": [str(other)]})
    _, steps = grid.plan(p)
    by = {s.name: s for s in steps}

    def finish(step, root, files):
        rel = step.run_dir.relative_to(here)
        stem = Path(grid.NOTEBOOK[step.kind]).stem
        (root / rel).mkdir(parents=True, exist_ok=True)
        (root / rel / f"{stem}.json").write_text(json.dumps({"status": "done", "hash": step.hash, "seconds": 5}))
        (root / rel / f"{stem}.log").write_text("log")
        for f in files:
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            (root / f).write_text(f)

    finish(by["preprocess"], other, ["store/store.sqlite", "store/arrays/a.npz"])
    finish(by["features"], other, [])
    finish(by["train:full_input"], other, ["full_input/model/checkpoint.pt"])
    assert grid.reused(by["preprocess"]) and grid.reused(by["features"]) and grid.reused(by["train:full_input"])
    assert (here / "store" / "arrays" / "a.npz").stat().st_ino == (other / "store" / "arrays" / "a.npz").stat().st_ino
    assert (here / "store" / "store.sqlite").stat().st_ino != (other / "store" / "store.sqlite").stat().st_ino
    assert (here / "full_input" / "model" / "checkpoint.pt").read_text() == "full_input/model/checkpoint.pt"
    assert by["train:full_input"].is_done() and by["preprocess"].record()["reused_from"] == str(other)
    assert (by["features"].run_dir / "02_extract_features.log").read_text() == "log"
    # a step done there with other parameters, and the report, are not reused
    finish(by["evaluate:full_input"], other, ["full_input/eval/metrics.csv"])
    (other / "full_input" / "runs" / "04_evaluate.json").write_text(json.dumps({"status": "done", "hash": "x"}))
    assert not grid.reused(by["evaluate:full_input"]) and not (here / "full_input" / "eval").exists()
    finish(by["report"], other, [])
    assert not grid.reused(by["report"])
    # the store is never replaced: a grid with a store of its own runs its store steps itself
    shutil.rmtree(here / "runs")
    assert not grid.reused(by["preprocess"]) and not grid.reused(by["features"])


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_compare_grid_end_to_end_on_the_tiny_preset(tmp_path, demo_corpus_small):
    """The compare grid's systems through `grid.run` on the 4-identity demo corpus (tiny preset): the voice
    encoder runs after features and before the Speech2Face trainings, every step finishes, the report holds every
    system with the direct decoders as one point; then a second grid reusing the first copies every step but the
    report."""
    from tests.e2e.test_grid import records, tiny_grid

    compare = yaml.safe_load((ROOT / "params" / "compare.yaml").read_text())
    systems = ["full_input", "speaker_embeddings_only", *S2F, "bicubic", "identity_mean", "random"]
    assert set(systems) <= set(compare["systems"])
    extra = dict(
        systems=systems,
        speech2face={"face_model": "eigenfaces", "voice_encoder": {"steps": 50, "batch_size": 8, "hidden": 32}},
        face_decoder={"steps": 50, "batch_size": 8, "hidden": 32, "channels": 16},
        report={
            "bootstrap": 50,
            "differences": [p for p in compare["report"]["differences"] if set(p) <= set(systems)],
        },
    )
    p = tiny_grid(tmp_path, demo_corpus_small, name="compare", **extra)
    table = grid.run(p)
    assert (table["status"] == "done").all(), table
    results = tmp_path / "results" / "compare"
    started = {(r["step"], r["system"]): r["started"] for r in records(results).values()}
    ve = started[("voice_encoder", None)]
    assert started[("features", None)] < ve
    assert all(started[("train", s)] > ve for s in S2F)
    m = pd.concat([pd.read_csv(results / s / "eval" / "metrics.csv") for s in systems])
    assert set(m["system"]) == set(systems)
    direct = m[m["system"].str.endswith("_direct") & (m["metric"] == "recall@1")]
    # 2 systems x 2 protocols x 2 splits (validation clips choose, test clips report)
    assert len(direct) == 8 and direct["scale"].isna().all() and set(direct["split"]) == {"val", "test"}
    assert set(m[(m["system"] == "face_to_face") & m["scale"].notna()]["scale"]) == {0, 3}
    headline = (results / "report" / "headline.md").read_text()
    assert "sees the answer" in headline and "no scale" in headline

    reuse = {"scheduler": "sequential", "reuse": [str(results)]}
    again = tiny_grid(tmp_path, demo_corpus_small, name="again", grid=reuse, **extra)
    table = grid.run(again)
    assert (table["status"] == "done").all(), table
    recs = records(tmp_path / "results" / "again")
    assert {(r["step"], r["system"]) for r in recs.values() if "reused_from" not in r} == {("report", None)}
    a = pd.read_csv(results / "speech_to_face" / "eval" / "metrics.csv")
    b = pd.read_csv(tmp_path / "results" / "again" / "speech_to_face" / "eval" / "metrics.csv")
    pd.testing.assert_frame_equal(a, b)
