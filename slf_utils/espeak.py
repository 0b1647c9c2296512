"""espeak-ng without root, and voices whose timbre is a fixed function of a code (the known-answer corpus's voices).

espeak-ng comes from Debian as the demo's voice packages do: `apt-get download` of espeak-ng and the libraries it
needs that the machine lacks, `dpkg-deb -x` into a cache folder, the binary run with LD_LIBRARY_PATH and
ESPEAK_DATA_PATH pointing there. Without apt-get, a system espeak-ng is used if there is one.

A voice is an espeak-ng voice-variant file (written per clip into the unpacked data, `en+ka/<name>`): pitch base,
formant scale, F1/F2 tilt, F3/F4 shift, speed, tone and breath are each one coordinate of the code
(`voice_params`); pitch range and roughness stay fixed (measured: not recoverable from a speaker embedding).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from slf_utils.basics import atomic_write_json, exists
from slf_utils.demo_voices import apt_download, unpack_voices

PACKAGES = ("espeak-ng", "libespeak-ng1", "espeak-ng-data")
SR = 16000
SENTENCES = Path(__file__).resolve().parent / "assets" / "sentences.txt"
# The voice coordinates, in the order the code's components drive them; a code with fewer components leaves the
# others at their middle. `scale` is the code value (in standard deviations) that reaches the end of a range.
VOICE_AXES = ("pitch", "formant_scale", "f12_tilt", "f34_shift", "speed", "tone", "breath")
CODE_SCALE = 2.5
PITCH_RANGE = 110  # Hz, fixed: pitch range is not recoverable from the embedding
# espeak-ng's English formant table is scaled per formant (percent) by the variant; 0-8 as in its own variants
FORMANTS = range(9)


class EspeakError(RuntimeError):
    """espeak-ng cannot be installed or run; the message says what to do."""


@dataclass(frozen=True)
class Espeak:
    exe: str
    env: dict = field(default_factory=dict, hash=False, compare=False)
    variants: Path | None = None  # <data>/espeak-ng-data/voices/!v/ka: where per-clip variant files go
    version: str = ""
    root: Path | None = None  # where the Debian packages were unpacked (None: a system espeak-ng)


# ------------------------------------------------------------------------------------------------- install


def _installed_packages() -> set[str]:
    r = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\n"], capture_output=True, text=True)
    return {ln.split()[0].split(":")[0] for ln in r.stdout.splitlines() if ln.endswith(" installed")}


def _depends(pkgs: list[str]) -> dict[str, list[list[str]]]:
    """{package: its Depends groups (alternatives)} from `apt-cache depends` (recommends and the like left out)."""
    flags = [f"--no-{k}" for k in ("recommends", "suggests", "conflicts", "breaks", "replaces", "enhances")]
    r = subprocess.run(["apt-cache", "depends", *flags, *pkgs], capture_output=True, text=True)
    if r.returncode != 0:
        raise EspeakError(f"`apt-cache depends {' '.join(pkgs)}` failed: {(r.stderr or r.stdout).strip()}")
    out, pkg, alt = {}, None, False
    for line in r.stdout.splitlines():
        if not line.startswith(" "):
            pkg = line.strip()
            out[pkg], alt = [], False
        elif m := re.match(r"\s+(\|?)(Pre)?Depends: (\S+)", line):
            name = m.group(3)
            if alt:
                out[pkg][-1].append(name)
            else:
                out[pkg].append([name])
            alt = m.group(1) == "|"  # the next line is another choice for this dependency
    return out


def missing_closure(roots=PACKAGES) -> list[str]:
    """`roots` and everything they depend on that this machine does not have installed (one choice per
    alternative: the first real package), sorted."""
    have, need, todo = _installed_packages(), set(), list(roots)
    while todo:
        deps = _depends(todo)
        todo = []
        for pkg in deps:
            need.add(pkg)
        for groups in deps.values():
            for group in groups:
                if any(p.strip("<>") in have or p in need for p in group):
                    continue
                real = [p for p in group if not p.startswith("<")]
                if real and real[0] not in todo:
                    todo.append(real[0])
    return sorted(need)


def fetch_debs(debs_dir) -> dict[str, Path]:
    """espeak-ng's .deb files (and those of the libraries the machine lacks) in `debs_dir`, downloaded once with
    `apt-get download` (no root); the list is kept in `espeak-ng.json` so a second build asks apt nothing."""
    debs_dir = Path(debs_dir)
    debs_dir.mkdir(parents=True, exist_ok=True)
    listing = debs_dir / "espeak-ng.json"
    wanted = json.loads(listing.read_text()) if listing.exists() else None
    if wanted is None:
        if not exists(shutil.which("apt-get")) or not exists(shutil.which("dpkg-query")):
            raise EspeakError(
                f"apt-get not found: the known-answer corpus's voices need the Debian packages {', '.join(PACKAGES)} "
                f"(espeak-ng 1.51). Build on Debian/Ubuntu, install espeak-ng system-wide, or put the .deb files of "
                f"espeak-ng and the libraries it needs in {debs_dir} with a list of their package names in {listing}"
            )
        wanted = missing_closure()
    found = {p: sorted(debs_dir.glob(f"{p}_*.deb")) for p in wanted}
    missing = [p for p, debs in found.items() if not debs]
    if missing:
        r = apt_download(shutil.which("apt-get"), missing, debs_dir)
        if r.returncode != 0:
            raise EspeakError(
                f"`apt-get download {' '.join(missing)}` failed:\n{(r.stderr or r.stdout).strip()}\n"
                "(empty package lists? run `sudo apt-get update` once)"
            )
        found = {p: sorted(debs_dir.glob(f"{p}_*.deb")) for p in wanted}
        if not all(found.values()):
            lost = [p for p, d in found.items() if not d]
            raise EspeakError(f"apt-get reported success but {', '.join(lost)} is not in {debs_dir}")
    atomic_write_json(listing, wanted)
    return {p: debs[-1] for p, debs in found.items()}


def _lib_dirs(root: Path) -> list[str]:
    return sorted({str(p.parent) for p in root.rglob("*.so*") if p.is_file()})


def install(debs_dir, dest) -> Espeak:
    """espeak-ng unpacked from Debian packages into `dest` (once), or, when apt-get is missing, the system's
    espeak-ng with a copy of its data in `dest` (variant files are written into the data)."""
    dest = Path(dest)
    try:
        debs = fetch_debs(debs_dir)
    except EspeakError:
        system = shutil.which("espeak-ng")
        if not exists(system):
            raise
        return _system(system, dest)
    root = unpack_voices(debs, dest)
    data = next(root.rglob("espeak-ng-data/phontab"), None)
    exe = root / "usr" / "bin" / "espeak-ng"
    if data is None or not exe.is_file():
        raise EspeakError(f"{root}: no espeak-ng binary or espeak-ng-data after unpacking {', '.join(debs)}")
    libs = _lib_dirs(root) + [p for p in [os.environ.get("LD_LIBRARY_PATH")] if p]
    env = {"LD_LIBRARY_PATH": os.pathsep.join(libs), "ESPEAK_DATA_PATH": str(data.parent.parent)}
    return _checked(Espeak(str(exe), env, data.parent / "voices" / "!v" / "ka", root=root))


def _system(exe: str, dest: Path) -> Espeak:
    r = subprocess.run([exe, "--version"], capture_output=True, text=True)
    data = re.search(r"Data at: (\S+)", r.stdout)
    if r.returncode != 0 or not data:
        raise EspeakError(f"{exe} --version names no data folder: {(r.stdout or r.stderr).strip()}")
    copy = dest / "system" / "espeak-ng-data"
    if not (copy / "phontab").exists():
        tmp = copy.with_name(f".espeak-ng-data.{uuid.uuid4().hex}")
        shutil.copytree(data.group(1), tmp)
        os.replace(tmp, copy)
    return _checked(Espeak(exe, {"ESPEAK_DATA_PATH": str(copy.parent)}, copy / "voices" / "!v" / "ka"))


def _checked(esp: Espeak) -> Espeak:
    r = subprocess.run([esp.exe, "--version"], capture_output=True, text=True, env={**os.environ, **esp.env})
    if r.returncode != 0:
        raise EspeakError(f"{esp.exe} does not run: {(r.stderr or r.stdout).strip()}")
    esp.variants.mkdir(parents=True, exist_ok=True)
    return Espeak(esp.exe, esp.env, esp.variants, r.stdout.strip(), esp.root)


# --------------------------------------------------------------------------------------------------- voices


def voice_params(code, pitch_jitter: float = 1.0, speed_jitter: float = 1.0) -> dict:
    """The voice of a code (standard-deviation units, up to len(VOICE_AXES) components): each coordinate, clipped
    at +-CODE_SCALE, moves one voice parameter linearly across its range. Jitters multiply pitch and speed."""
    u = np.zeros(len(VOICE_AXES))
    code = np.asarray(code, float)[: len(VOICE_AXES)]
    u[: len(code)] = np.clip(code / CODE_SCALE, -1, 1)
    a = dict(zip(VOICE_AXES, u))
    return {
        "pitch": 120 * 2 ** (0.8 * a["pitch"]) * pitch_jitter,  # 69-209 Hz
        "formant_scale": 1 + 0.1 * a["formant_scale"],
        "f12_tilt": 0.12 * a["f12_tilt"],  # F1 up, F2 down
        "f34_shift": 0.12 * a["f34_shift"],
        "speed": 100 * 1.25 ** a["speed"] * speed_jitter,  # percent
        "tone": a["tone"],  # spectral tilt: amplitude x (f / 600 Hz) ** (0.5 tone)
        "breath": 3 * (1 + a["breath"]),  # 0-6
    }


def variant_text(p: dict) -> str:
    """An espeak-ng voice-variant file for voice parameters `p` (voice_params)."""
    lines = ["language variant", "name ka", f"pitch {round(p['pitch'])} {round(p['pitch']) + PITCH_RANGE}"]
    for n in FORMANTS:
        f = p["formant_scale"]
        f *= {1: 1 + p["f12_tilt"], 2: 1 - p["f12_tilt"], 3: 1 + p["f34_shift"], 4: 1 + p["f34_shift"]}.get(n, 1)
        lines.append(f"formant {n} {round(100 * f)} 100 100")
    lines.append(f"speed {round(p['speed'])}")
    tone = [(hz, round(100 * (hz / 600) ** (0.5 * p["tone"]))) for hz in (600, 1200, 2400, 4000)]
    lines.append("tone " + " ".join(f"{hz} {amp}" for hz, amp in tone))
    b = round(p["breath"])
    lines.append("breath 0 " + " ".join([str(b)] * 7))
    return "\n".join(lines) + "\n"


def _wav_pcm(data: bytes) -> tuple[np.ndarray, int]:
    """16-bit mono PCM of espeak-ng's --stdout WAV (streamed: its size fields are not to be trusted)."""
    if data[:4] != b"RIFF" or b"data" not in data[:200]:
        raise EspeakError(f"espeak-ng wrote no WAV ({len(data)} bytes)")
    sr = int.from_bytes(data[24:28], "little")
    start = data.index(b"data", 12) + 8
    body = data[start : start + (len(data) - start) // 2 * 2]
    return np.frombuffer(body, "<i2").astype(np.float32) / 32768, sr


def synthesise(esp: Espeak, text: str, params: dict) -> np.ndarray:
    """`text` spoken by the voice of `params` (voice_params), 16 kHz mono float32."""
    import soxr

    name = uuid.uuid4().hex[:10]  # one file per call (clips are made two at a time); espeak-ng: short names only
    path = esp.variants / name
    path.write_text(variant_text(params))
    try:
        r = subprocess.run(
            [esp.exe, "-v", f"en+ka/{name}", "--stdout", text], capture_output=True, env={**os.environ, **esp.env}
        )
    finally:
        path.unlink(missing_ok=True)
    if r.returncode != 0:
        raise EspeakError(f"espeak-ng failed: {r.stderr.decode(errors='replace').strip()}")
    y, sr = _wav_pcm(r.stdout)
    return soxr.resample(y, sr, SR).astype(np.float32) if sr != SR else y


@lru_cache(maxsize=1)
def sentences() -> tuple[str, ...]:
    """The shipped plain English sentences (written for this project), one a line."""
    return tuple(ln.strip() for ln in SENTENCES.read_text().splitlines() if ln.strip())
