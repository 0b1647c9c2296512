"""A store of random arrays shaped like the layout's sources, for tests, benchmarks and trying the pipeline without
data: faces whose colours depend on the identity, speaker embeddings near an identity's own, Speech2Face and
contrastive stages near the identity's own vectors. Nothing here runs on real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from slf_utils.basics import exists
from slf_utils.layout import Layout
from slf_utils.preprocessing import SAMPLE_RATE, guide_of
from slf_utils.speech_models import window_bounds
from slf_utils.store import Store


def synthetic_store(
    root,
    n_identities=4,
    clips_per_identity=4,
    face_size=32,
    guide_size=8,
    speaker_dim=256,
    windows=5,
    frames=(79, 81),
    seed=0,
    layout: Layout | None = None,
    audio_seconds=24.0,
    face_dim=128,
    voice_noise=1.0,
    contrastive_dim=128,
):
    """A Store filled with random arrays shaped like the layout's sources and faces whose colours depend on the
    identity: for tests, benchmarks and trying the pipeline without data. Half of each identity's clips are
    `test`. With a `layout`, window and frame counts fill its speaker_windows, pyaudio and mel rows exactly.
    `windows`: a count (3 s windows at 1 s steps) or the (size, hop) pairs of `features.windows`, cut from a clip
    of `audio_seconds` as notebook 02 does; `speaker_windows/window` holds their [start, length] in seconds.
    With `face_dim` (0: none), the Speech2Face stages: `face_embedding` (the identity's own unit vector x 10 plus a
    little noise: the true embedding determines the face's identity) and `voice_face_embedding` (the same plus noise
    of sd `voice_noise` per entry: a voice encoder's imperfect prediction), drawn from a generator of their own so the
    other arrays are the same with or without them. With `contrastive_dim` (0: none), the `contrastive_speech` stage
    (slf_utils.contrastive): a unit vector near the identity's own, from a generator of its own too. Returns the
    Store."""
    if exists(layout):
        c = layout.constituents
        windows = c["speaker_windows"].n_rows if "speaker_windows" in c else windows
        frames = tuple(c[n].n_rows if n in c else f for n, f in zip(("pyaudio", "mel"), frames))

    if isinstance(windows, (int, np.integer)):
        bounds = np.stack([np.arange(windows), np.full(windows, 3.0)], 1).astype(np.float32)
    else:
        bounds = (window_bounds(int(round(audio_seconds * SAMPLE_RATE)), windows) / SAMPLE_RATE).astype(np.float32)

    store = Store(Path(root))
    rng = np.random.default_rng(seed)
    genders, eths = ["Man", "woman"], ["asian", "indian", "black", "white", "middle eastern", "latino hispanic"]
    langs = ["fr", "pt_BR", "es", "en", "de"]
    rows = []
    for i in range(n_identities):
        for j in range(clips_per_identity):
            rows.append(
                {
                    "clip_id": f"id{i:05d}/yt{j:03d}/{j:05d}",
                    "identity": f"id{i:05d}",
                    "split": "train" if j < max(1, clips_per_identity // 2) else "test",
                    "gender": genders[i % 2],
                    "age": float(20 + 7 * i) if i % 3 else None,
                    "ethnicity": eths[i % len(eths)],
                    "language": langs[i % len(langs)],
                }
            )
    store.add_clips(pd.DataFrame(rows))
    yy, xx = np.mgrid[0:face_size, 0:face_size] / face_size
    for r in rows:
        i = int(r["identity"][2:])
        voice = rng.normal(size=speaker_dim).astype(np.float32) + i
        colour = np.array([(i * 67) % 256, (i * 131 + 60) % 256, (i * 29 + 120) % 256], np.float32)
        blob = np.exp(-((yy - 0.5) ** 2 + (xx - 0.5) ** 2) / 0.08)[..., None]
        face = np.clip(blob * colour + (1 - blob) * 40 + rng.normal(0, 4, (face_size, face_size, 3)), 0, 255)
        face = face.astype(np.uint8)
        store.put(r["clip_id"], "preprocess", {"face": face, "guide": guide_of(face, guide_size)}, "synthetic")
        store.put(r["clip_id"], "audio", {"audio": np.zeros(160, np.float32)}, "synthetic")  # its own stage
        store.put(r["clip_id"], "speaker", {"embedding": voice}, "synthetic")
        store.put(
            r["clip_id"],
            "speaker_windows",
            {"embedding": voice + rng.normal(0, 0.1, (len(bounds), speaker_dim)).astype(np.float32), "window": bounds},
            "synthetic",
        )
        n = int(rng.integers(frames[0] - 3, frames[0] + 1))
        store.put(r["clip_id"], "pyaudio", {"frames": rng.normal(i, 1, (n, 68)).astype(np.float32)}, "synthetic")
        n = int(rng.integers(frames[1] - 3, frames[1] + 1))
        store.put(r["clip_id"], "mel", {"frames": rng.normal(-20 + i, 3, (n, 128)).astype(np.float32)}, "synthetic")
    if face_dim:
        s2f = np.random.default_rng(seed + 7919)
        axes = s2f.normal(size=(n_identities, face_dim))
        axes = 10 * axes / np.linalg.norm(axes, axis=1, keepdims=True)
        for r in rows:
            true = axes[int(r["identity"][2:])] + s2f.normal(0, 0.1, face_dim)
            pred = true + s2f.normal(0, voice_noise, face_dim)
            store.put(r["clip_id"], "face_embedding", {"embedding": true.astype(np.float32)}, "synthetic")
            store.put(r["clip_id"], "voice_face_embedding", {"embedding": pred.astype(np.float32)}, "synthetic")
    if contrastive_dim:
        ct = np.random.default_rng(seed + 104729)
        axes = ct.normal(size=(n_identities, contrastive_dim))
        for r in rows:
            e = axes[int(r["identity"][2:])] + ct.normal(0, 0.3, contrastive_dim)
            e = (e / np.linalg.norm(e)).astype(np.float32)
            store.put(r["clip_id"], "contrastive_speech", {"embedding": e}, "synthetic")
    return store
