"""The known-answer corpus (issue 26): synthetic faces, voices carrying the face code at a known strength."""

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from slf_utils import espeak, grid
from slf_utils import known_answer as ka
from slf_utils import known_answer_checks as checks
from slf_utils import preprocessing as P
from slf_utils.basics import ParamsError
from slf_utils.config import load_params
from slf_utils.recognisers import face_code_of, face_embedder, load_code_basis
from slf_utils.references import read_codes
from slf_utils.results import Results
from slf_utils.store import Store


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------ settings


def _grid(tmp_path, data: dict, name="g"):
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"name": name, "data": data}, sort_keys=False))
    return p


def _ka_data(tmp_path, **ka_over):
    root = tmp_path / "corpus"
    return {"kind": "manifest", "root": str(root), "manifest": str(root / "manifest.csv"), "known_answer": ka_over}


@pytest.mark.parametrize(
    "ka_over, data_over, message",
    [
        ({"build": True, "link_strength": 1.5}, {}, "data.known_answer.link_strength must be float in [0, 1], got 1.5"),
        ({"build": True, "link_strength": -0.1}, {}, "data.known_answer.link_strength must be float in [0, 1]"),
        (
            {"build": True, "identities": 5},
            {"identity_folds": {"folds": 3}, "validation": {"per_identity": 0}},
            "known_answer.identities 5 is too few",
        ),
        ({"build": True, "identities": 6, "code_components": 7}, {}, "data.known_answer.code_components 7 needs more"),
        ({"build": True, "images_per_identity": 2}, {}, "known_answer.images_per_identity must be int in [3, 100]"),
        ({"build": True, "code_components": 8}, {}, "data.known_answer.code_components must be int in [1, 7]"),
        ({"build": True}, {"kind": "voxceleb"}, "data.known_answer.build builds a manifest corpus"),
        ({"build": True}, {"demo_corpus": {"build": True}}, "data.known_answer.build builds a manifest corpus"),
        ({"build": True}, {"manifest": "elsewhere.csv"}, "data.manifest must be data.root/manifest.csv"),
        ({"build": True, "identites": 40}, {}, "unknown key 'data.known_answer.identites'"),
    ],
)
def test_bad_settings_are_refused_at_load_with_the_key_named(tmp_path, ka_over, data_over, message):
    p = _grid(tmp_path, {**_ka_data(tmp_path, **ka_over), **data_over})
    with pytest.raises(ParamsError) as e:
        load_params(p)
    assert message in str(e.value) and str(p) in str(e.value)


def test_good_settings_load_and_the_built_manifest_is_not_an_input_file(tmp_path):
    folds = {"identity_folds": {"folds": 3, "seed": 0}, "validation": {"per_identity": 0}}
    cfg = load_params(_grid(tmp_path, {**_ka_data(tmp_path, build=True, identities=8), **folds}))
    assert cfg["data"]["known_answer"]["identities"] == 8 and cfg["data"]["known_answer"]["link_strength"] == 1.0
    # the manifest the builder writes is the preprocess step's output: its settings are hashed (with `data`), not it
    assert "data.manifest" not in grid._input_files(cfg, ("data",))
    other = load_params(_grid(tmp_path, {**_ka_data(tmp_path, build=True, identities=8, link_strength=0.5), **folds}))
    steps = [grid._step("preprocess", None, c, [], tmp_path) for c in (cfg, other)]
    assert steps[0].hash != steps[1].hash


def test_the_command_line_refuses_bad_settings_naming_the_key(tmp_path, capsys):
    assert ka.main(["build", str(tmp_path / "c"), "--link-strength", "2"]) == 1
    assert "data.known_answer.link_strength must be float in [0, 1], got 2.0" in capsys.readouterr().err
    with pytest.raises(ParamsError, match="code_components must be fewer than"):
        ka.settings(identities=4, code_components=5)


# -------------------------------------------------------------------------------------------------- voices


def test_voice_parameters_follow_the_code_and_stay_in_range():
    lo, mid, hi = (espeak.voice_params(np.full(7, v)) for v in (-9.0, 0.0, 9.0))
    assert lo == espeak.voice_params(np.full(7, -espeak.CODE_SCALE))  # clipped at the ends of the ranges
    for k in espeak.VOICE_AXES:
        assert lo[k] < mid[k] < hi[k], k
    assert 60 < lo["pitch"] < 80 and 190 < hi["pitch"] < 220
    # one component moves its own coordinate only; a short code leaves the rest in the middle
    one = espeak.voice_params([0, 0, 2.0])
    assert [k for k in espeak.VOICE_AXES if one[k] != mid[k]] == ["f12_tilt"]
    text = espeak.variant_text(espeak.voice_params([1.25, 0, 1.25], pitch_jitter=1.03))
    assert "pitch 163 273" in text and "formant 1 106 100 100" in text and "formant 2 94 100 100" in text
    assert len(espeak.sentences()) >= 300 and len(set(espeak.sentences())) == len(espeak.sentences())


def test_dependency_listing_takes_one_choice_per_alternative(monkeypatch):
    out = "a\n  |Depends: b\n  Depends: c\n  Depends: d\n  Depends: <virt>\n    e\nb\n  Depends: d\n"

    class R:
        returncode, stdout, stderr = 0, out, ""

    monkeypatch.setattr(espeak.subprocess, "run", lambda *a, **k: R)
    assert espeak._depends(["a", "b"]) == {"a": [["b", "c"], ["d"], ["<virt>"]], "b": [["d"]]}


def test_no_apt_get_and_no_espeak_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(espeak.shutil, "which", lambda name: None)
    with pytest.raises(espeak.EspeakError, match="apt-get not found: .* espeak-ng, libespeak-ng1, espeak-ng-data"):
        espeak.install(tmp_path / "debs", tmp_path / "espeak")


def test_without_apt_get_a_system_espeak_ng_is_used_with_a_copy_of_its_data(ka_cache, tmp_path, monkeypatch):
    unpacked = espeak.install(ka_cache / "debs", ka_cache / "espeak")
    # stands for /usr/bin/espeak-ng: the unpacked one, finding its libraries and (by default) its data
    system = tmp_path / "bin" / "espeak-ng"
    system.parent.mkdir()
    libs, data = unpacked.env["LD_LIBRARY_PATH"], unpacked.env["ESPEAK_DATA_PATH"]
    system.write_text(
        f'#!/bin/sh\nLD_LIBRARY_PATH={libs} ESPEAK_DATA_PATH="${{ESPEAK_DATA_PATH:-{data}}}" exec {unpacked.exe} "$@"\n'
    )
    system.chmod(0o755)
    monkeypatch.setattr(espeak.shutil, "which", lambda name: str(system) if name == "espeak-ng" else None)
    esp = espeak.install(tmp_path / "no-debs", tmp_path / "espeak")
    assert esp.exe == str(system) and esp.root is None
    assert esp.variants.is_relative_to(tmp_path / "espeak") and (esp.variants.parent.parent.parent / "phontab").exists()
    assert len(espeak.synthesise(esp, "Hello there.", espeak.voice_params([1.0]))) > espeak.SR // 4


def test_espeak_runs_without_root_and_the_code_changes_the_voice(ka_cache):
    esp = espeak.install(ka_cache / "debs", ka_cache / "espeak")
    assert "eSpeak NG" in esp.version
    text = espeak.sentences()[0]
    a, b = (espeak.synthesise(esp, text, espeak.voice_params(np.full(7, v))) for v in (-2.0, 2.0))
    assert 1.0 < len(a) / espeak.SR < 6 and 0.5 < len(a) / len(b) < 3  # speed is one of the coordinates
    assert not list(esp.variants.iterdir())  # per-clip variant files are removed


# --------------------------------------------------------------------------------------------------- build


def test_same_seed_same_corpus_other_seed_other_corpus(tmp_path, ka_cache):
    small = {"identities": 5, "images_per_identity": 3, "link_strength": 0.5, "code_components": 3}
    built = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        faces = ka.faces_path(ka.settings(seed=seed, **small), ka_cache)
        faces.unlink(missing_ok=True)  # made again: the faces themselves are compared, not a cached copy
        ka.build(tmp_path / name, cache=ka_cache, progress=False, seed=seed, **small)
        built[name] = {f: (tmp_path / name / f).read_bytes() for f in ("manifest.csv", "codes.csv", "images.csv")}
        built[name]["faces"] = np.load(faces)["faces"]
    for f in ("manifest.csv", "codes.csv", "images.csv"):
        assert built["a"][f] == built["b"][f], f
    assert np.array_equal(built["a"]["faces"], built["b"]["faces"])
    assert built["a"]["codes.csv"] != built["c"]["codes.csv"]
    assert not np.array_equal(built["a"]["faces"], built["c"]["faces"])
    # a finished corpus is not made again
    t = time.time()
    ka.build(tmp_path / "a", cache=ka_cache, progress=False, seed=0, **small)
    assert time.time() - t < 1


def test_manifest_passes_the_workbook_loaders_and_a_preprocessing_run(ka_small, tmp_path):
    clips = P.read_manifest(ka_small / "manifest.csv")
    assert len(clips) == 90 and clips.identity.nunique() == 30
    assert all(Path(v).exists() for v in clips.video) and all(Path(f).exists() for f in clips.face)
    per_id = clips.groupby("identity").split.value_counts().unstack()
    assert (per_id["train"] == 1).all() and (per_id["test"] == 2).all()  # images_per_identity - 2 train, 2 held out
    assert set(clips.gender) <= {"man", "woman"}
    codes = rows(ka_small / "codes.csv")
    assert [r["gender"] for r in codes] == list(clips.groupby("identity").gender.first())
    assert {"man", "woman"} == set(clips.gender)  # both genders among 30 identities
    images = rows(ka_small / "images.csv")
    assert len(images) == 90 and all(int(r["w"]) > 20 for r in images)
    lic = (ka_small / "LICENSES.md").read_text()
    assert "Microsoft Research Use of Data Agreement" in lic and "GPL-3" in lic and "MIT" in lic
    assert (ka_small / "licenses" / "espeak-ng.copyright").exists()

    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(
        yaml.safe_dump(
            {
                "name": "ka",
                "results": str(tmp_path / "results"),
                "data": {"kind": "manifest", "manifest": str(ka_small / "manifest.csv"), "root": str(ka_small)},
                "preprocess": {"audio_seconds": 3.0, "face_size": 64, "detector_backend": "opencv"},
            }
        )
    )
    cfg = load_params(grid_file)
    first = sorted(clips.clip_id)[:6]
    P.run(cfg, clip_ids=first)
    store = Store(Results.of(cfg).store)
    assert store.rejects().empty
    done = store.clips(stage="preprocess")
    assert sorted(done.clip_id) == first
    # the oracle's projection reads the workbook's own crops like the builder's: the same code, up to the video codec
    faces = store.load_stacked("preprocess", first, keys=["face"])["face"]
    basis = load_code_basis(ka_small / "code_basis.npz")
    ours = face_code_of(faces, basis)
    rows_, mine = ka.corpus_crops(ka_small, first)
    assert [r["clip_id"] for r in rows_] == first
    theirs = face_code_of(mine, basis)
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.95


def test_identities_are_distinct_and_their_variants_recognisable(ka_small, ka_cache, ka_small_settings):
    codes = rows(ka_small / "codes.csv")
    distinct = np.array([float(r["distinctness"]) for r in codes])
    assert (distinct >= ka.settings()["min_distance"]).all()
    # recomputed from the kept candidates' own faces: the recorded distances are the recogniser's
    faces = np.load(ka.faces_path(ka.settings(**ka_small_settings), ka_cache))
    frames = [ka.frame_of(f) for f in ka.generate(faces["latent"])]
    emb, _ = face_embedder("Dlib", ka.DETECTOR).embed(frames)
    d = np.linalg.norm(emb[:, None] - emb[None], axis=2) + np.diag(np.full(len(emb), np.inf))
    assert np.allclose(d.min(1), distinct, atol=1e-4)
    stats = json.loads((ka_small / ".build" / "stats.json").read_text())
    assert stats["candidates_tried"] >= stats["candidates_detected"] >= 30
    # each image against all others: its identity's other images come first far above chance (1/30)
    assert checks.reidentification(ka_small) > 0.5
    # each image's own face code names its identity far above chance too (the oracle reference's ceiling)
    assert checks.code_identification(ka_small) > 0.4


def test_planted_code_is_recoverable_at_strength_1_and_not_at_0(ka_small, ka_small_null):
    r2 = {}
    for s, corpus in ((1.0, ka_small), (0.0, ka_small_null)):
        clips = [c for c in rows(corpus / "manifest.csv") if int(c["image"]) <= 2]  # 60 clips: 2 an identity
        ids, codes = read_codes(corpus)
        code_of = dict(zip(ids, codes))
        emb = checks.voice_embeddings(corpus, clips)
        groups = [c["identity"] for c in clips]
        r2[s] = checks.code_recovery(emb, groups, np.stack([code_of[g] for g in groups]))
    assert r2[1.0] > 0.25 and r2[0.0] < 0.1 and r2[1.0] - r2[0.0] > 0.3, r2
    # same faces, same noise: the strengths differ in the voices only
    assert rows(ka_small / "images.csv") == rows(ka_small_null / "images.csv")
    face_codes = [[r["face_1"] for r in rows(c / "codes.csv")] for c in (ka_small, ka_small_null)]
    assert face_codes[0] == face_codes[1]


def test_voice_code_mixes_face_code_and_noise_at_the_strength():
    face = np.random.default_rng(0).standard_normal((2000, 7))
    for s in (0.0, 0.5, 1.0):
        v = ka.voice_codes(face, s, seed=3)
        assert abs(v.std() - 1) < 0.05
        assert abs(np.corrcoef(face.ravel(), v.ravel())[0, 1] - s) < 0.05
    assert np.array_equal(ka.voice_codes(face, 1.0, 3), face)


def test_a_detector_that_keeps_too_few_faces_is_refused(monkeypatch):
    s = ka.settings(identities=8, candidates_per_identity=1.0)
    with pytest.raises(ka.KnownAnswerError, match=r"only 0 of 8 candidate faces had a face the detector \(opencv\)"):
        with monkeypatch.context() as m:
            m.setattr(ka, "detect", lambda frame: None)
            ka.select_identities(s)
    with pytest.raises(ka.KnownAnswerError, match=r"distinct .* lower data.known_answer.identities or min_distance"):
        ka.select_identities({**s, "min_distance": 2.0})


def test_ensure_builds_what_the_grid_asks_for_and_leaves_a_finished_corpus(
    ka_small, ka_cache, ka_small_settings, tmp_path
):
    data = {
        "kind": "manifest",
        "root": str(ka_small),
        "manifest": str(ka_small / "manifest.csv"),
        "known_answer": {"build": True, "cache": str(ka_cache), "link_strength": 1.0, **ka_small_settings},
    }
    cfg = load_params(_grid(tmp_path, data))
    before = (ka_small / "manifest.csv").stat().st_mtime_ns
    t = time.time()
    ka.ensure(cfg)
    assert time.time() - t < 1 and (ka_small / "manifest.csv").stat().st_mtime_ns == before
