"""The demo corpus's voices: two Debian packages of KDE's children's games fetched (`apt-get download`, no root)
and unpacked (`dpkg-deb -x`, or in Python), one voice set per language folder, their utterances as 16 kHz audio and
each set's median F0 (cached beside the .deb files). slf_utils.demo_corpus pairs them with faces; slf_utils.espeak
fetches and unpacks espeak-ng the same way.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slf_utils.basics import atomic_write_json, exists, params_hash

log = logging.getLogger(__name__)

# Where each package keeps its per-language folders (one native speaker each).
PACKAGES = {"klettres-data": "usr/share/klettres", "ktuberling-data": "usr/share/ktuberling/sounds"}
AUDIO_EXTS = (".ogg", ".wav")  # ktuberling's `nn` set is Opus-only: left out, as the spec counts OGG/WAV sets
SR = 16000
F0_VERSION = 2  # bump when the F0 / duration estimate changes: invalidates the cache


class DemoCorpusError(RuntimeError):
    """The demo corpus cannot be built; the message says what to do."""


@dataclass(frozen=True)
class VoiceSet:
    name: str  # e.g. "klettres/fr", "ktuberling/sr"
    package: str
    language: str  # e.g. "fr", "pt" (from pt_BR), "sr" (from sr@latin)
    files: tuple[str, ...]  # distinct utterances, paths relative to the voices folder, sorted


# ----------------------------------------------------------------------------------------------- voices: fetch


def _hand_download_hint(debs_dir: Path) -> str:
    urls = " and ".join(f"https://packages.debian.org/stable/all/{p}/download" for p in PACKAGES)
    return f"download the .deb files by hand ({urls}) and put them in {debs_dir}"


def apt_download(apt: str, pkgs: list[str], debs_dir: Path) -> subprocess.CompletedProcess:
    # apt-get download writes into the working directory: a private folder, so a killed download leaves no
    # half-written .deb where the next build would trust it.
    with tempfile.TemporaryDirectory(dir=debs_dir, prefix=".apt-") as tmp:
        os.chmod(tmp, 0o755)  # apt's unprivileged `_apt` user must be able to write here when we are root
        r = subprocess.run([apt, "download", *pkgs], cwd=tmp, capture_output=True, text=True)
        if r.returncode == 0:
            for deb in Path(tmp).glob("*.deb"):
                os.replace(deb, debs_dir / deb.name)
        return r


def _find_debs(debs_dir: Path) -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        debs = sorted(debs_dir.glob(f"{pkg}_*.deb"))
        if debs:
            found[pkg] = debs[-1]
    return found


def fetch_debs(debs_dir) -> dict[str, Path]:
    """The two voice packages as .deb files in `debs_dir`, downloaded with `apt-get download` (no root) if absent."""
    debs_dir = Path(debs_dir)
    debs_dir.mkdir(parents=True, exist_ok=True)
    for stale in debs_dir.glob(".apt-*"):  # left by a killed download
        shutil.rmtree(stale, ignore_errors=True)
    found = _find_debs(debs_dir)
    missing = [p for p in PACKAGES if p not in found]
    if not missing:
        return found
    apt = shutil.which("apt-get")
    if not exists(apt):
        raise DemoCorpusError(
            f"apt-get not found: the demo corpus needs the Debian packages {', '.join(missing)}. Run the build on a "
            f"Debian/Ubuntu machine (apt-get and dpkg are part of the base system there), or "
            f"{_hand_download_hint(debs_dir)}."
        )
    log.info("downloading %s with apt-get", " ".join(missing))
    r = apt_download(apt, missing, debs_dir)
    if r.returncode != 0 and "Unable to locate package" in r.stderr + r.stdout:
        # A fresh machine often has empty package lists.
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            log.info("package lists look empty: running apt-get update")
            up = subprocess.run([apt, "update"], capture_output=True, text=True)
            if up.returncode == 0:
                r = apt_download(apt, missing, debs_dir)
        else:
            raise DemoCorpusError(
                f"apt-get cannot find {', '.join(missing)}: the package lists are probably empty. Run "
                f"`sudo apt-get update` once (or {_hand_download_hint(debs_dir)}), then build again."
            )
    if r.returncode != 0:
        raise DemoCorpusError(
            f"`apt-get download {' '.join(missing)}` failed:\n{(r.stderr or r.stdout).strip()}\n"
            f"Alternatively {_hand_download_hint(debs_dir)}."
        )
    found = _find_debs(debs_dir)
    still = [p for p in PACKAGES if p not in found]
    if still:
        raise DemoCorpusError(f"apt-get reported success but {', '.join(still)} is not in {debs_dir}")
    return found


def _extract_deb_python(deb: Path, dest: Path):
    """`dpkg-deb -x` for machines without dpkg: a .deb is an ar archive holding data.tar.{xz,gz,bz2}."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise DemoCorpusError(f"{deb} is not a Debian package")
    pos = 8
    while pos + 60 <= len(data):
        name = data[pos : pos + 16].decode().strip().rstrip("/")
        size = int(data[pos + 48 : pos + 58].decode().strip())
        body = data[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise DemoCorpusError(f"{deb}: zstd-compressed package; install dpkg (dpkg-deb) to unpack it")
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                tar.extractall(dest, filter="data")
            return
        pos += 60 + size + (size % 2)
    raise DemoCorpusError(f"{deb}: no data archive inside")


def unpack_voices(debs: dict[str, Path], voices_dir) -> Path:
    """Unpack the packages into `voices_dir` (once: a marker names the .deb files it came from)."""
    voices_dir = Path(voices_dir)
    marker = voices_dir / ".unpacked.json"
    want = sorted(p.name for p in debs.values())
    if marker.exists() and json.loads(marker.read_text()) == want:
        return voices_dir
    if voices_dir.exists():
        shutil.rmtree(voices_dir)
    voices_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in voices_dir.parent.glob(f"{voices_dir.name}.partial-*"):  # left by a killed build
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=voices_dir.parent, prefix=f"{voices_dir.name}.partial-"))
    try:
        dpkg = shutil.which("dpkg-deb")
        if exists(dpkg):
            procs = [
                subprocess.Popen([dpkg, "-x", str(deb), str(tmp)], stderr=subprocess.PIPE, text=True)
                for deb in debs.values()
            ]
            for deb, p in zip(debs.values(), procs):
                _, err = p.communicate()
                if p.returncode != 0:
                    raise DemoCorpusError(f"dpkg-deb -x {deb} failed: {err.strip()}")
        else:
            for deb in debs.values():
                _extract_deb_python(deb, tmp)
        (tmp / ".unpacked.json").write_text(json.dumps(want))
        os.replace(tmp, voices_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return voices_dir


def _language(folder: str) -> str:
    # pt_BR -> pt, en_GB -> en, sr@latin -> sr: the language, not the locale
    return folder.split("@")[0].split("_")[0].lower()


def find_voice_sets(voices_dir) -> list[VoiceSet]:
    """Every language folder with OGG/WAV clips in the unpacked packages, one voice set each. Byte-identical
    clips are kept once (within a set) and sets identical to an earlier one are dropped (ktuberling ships the same
    Serbian recordings under sr, sr@latin, sr@ijekavian, sr@ijekavianlatin)."""
    voices_dir = Path(voices_dir)
    sets, seen = [], set()
    for pkg, base in PACKAGES.items():
        root = voices_dir / base
        if not root.is_dir():
            raise DemoCorpusError(f"{root} not found: is {pkg} unpacked in {voices_dir}?")
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            files, hashes = [], set()
            for f in sorted(folder.rglob("*")):
                if f.suffix.lower() in AUDIO_EXTS and f.is_file():
                    h = hashlib.md5(f.read_bytes()).hexdigest()
                    if h not in hashes:
                        hashes.add(h)
                        files.append(f.relative_to(voices_dir).as_posix())
            key = frozenset(hashes)
            if not files or key in seen:
                continue
            seen.add(key)
            short = pkg.removesuffix("-data")
            sets.append(VoiceSet(f"{short}/{folder.name}", pkg, _language(folder.name), tuple(files)))
    return sets


# -------------------------------------------------------------------------------------------- voices: audio


def _stable_int(*parts) -> int:
    return int(hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()[:12], 16)


def _rng(seed: int, *parts) -> np.random.Generator:
    return np.random.default_rng([int(seed), _stable_int(*parts)])


@functools.lru_cache(maxsize=1024)
def load_utterance(path: str) -> np.ndarray:
    """One clip as 16 kHz mono float32, leading/trailing silence trimmed (klettres pads letters of ~0.4 s to 2-6 s),
    loudness evened out so that concatenated utterances sound like one recording session."""
    import librosa
    import soundfile as sf
    import soxr

    y, sr = sf.read(path, dtype="float32", always_2d=True)
    y = y.mean(axis=1)
    if sr != SR:
        y = soxr.resample(y, sr, SR).astype(np.float32)
    y, _ = librosa.effects.trim(y, top_db=30)
    rms = float(np.sqrt(np.mean(y**2))) if len(y) else 0.0
    if rms > 1e-5:
        y = y * min(0.1 / rms, 0.95 / float(np.abs(y).max()))
    return y.astype(np.float32)


def _voice_key(vs: VoiceSet, voices_dir: Path) -> str:
    return params_hash([F0_VERSION, vs.files, [(voices_dir / f).stat().st_size for f in vs.files]])


def _probe(vs: VoiceSet, voices_dir: Path, n: int = 8) -> dict:
    """Median F0 (pYIN) and mean trimmed utterance length from `n` evenly spaced utterances of a set."""
    import librosa

    idx = np.unique(np.linspace(0, len(vs.files) - 1, min(n, len(vs.files))).round().astype(int))
    ys = [load_utterance(str(voices_dir / vs.files[i])) for i in idx]
    y = np.concatenate(ys)[: 6 * SR]
    # coarse pitch grid (1/4 semitone) and 20 ms hop: ~30x cheaper than librosa's defaults, same medians;
    # fmin 70 Hz keeps mains hum in noisy recordings from passing as a voice
    f0, voiced, _ = librosa.pyin(y, fmin=70, fmax=500, sr=SR, frame_length=1024, hop_length=320, resolution=0.25)
    f0 = f0[voiced & np.isfinite(f0)]
    return {
        "f0": round(float(np.median(f0)), 2) if len(f0) else 0.0,
        "mean_seconds": round(float(np.mean([len(u) for u in ys])) / SR, 4),
    }


def voice_stats(sets: list[VoiceSet], voices_dir, cache_file) -> dict[str, dict]:
    """{set name: {"f0": median Hz, "mean_seconds": trimmed utterance length}}, cached in a json beside the .debs
    so rebuilds (and other corpora built from the same packages) do not run pYIN again."""
    voices_dir, cache_file = Path(voices_dir), Path(cache_file)
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    out, changed = {}, False
    for vs in sets:
        key = _voice_key(vs, voices_dir)
        hit = cache.get(vs.name)
        if not (isinstance(hit, dict) and hit.get("key") == key):
            log.info("F0 of %s", vs.name)
            hit = {"key": key, **_probe(vs, voices_dir)}
            cache[vs.name] = hit
            changed = True
        out[vs.name] = {"f0": hit["f0"], "mean_seconds": hit["mean_seconds"]}
    if changed:
        atomic_write_json(cache_file, cache)
    return out
