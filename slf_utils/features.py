"""Notebook 02: per-clip audio features, each constituent its own store stage with its own parameter hash.

Stages (arrays per CONTRACTS.md):
* `speaker` — whole-clip speaker embedding (D,); `speaker_windows` — sliding-window embeddings (W, D) plus
  `window` (W, 2) = [start, length] in seconds, from the backend named by features.speaker_backend
  (slf_utils.speech_models).
* `pyaudio` — pyAudioAnalysis short-term features (F, 68); `mel` — librosa log-mel power (F, n_mels) on the same
  frames (window/step in seconds at 16 kHz, no centring, so both have F = 1 + (N - win) // step frames).
* `language` — only with `features.language: speechbrain`: the lang-id log-posteriors; the label itself goes to
  the clips table (`labels` mode keeps the manifest's language).

A stage's hash covers its own parameters and the audio length, so changing `n_mels` recomputes only `mel`.
"""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from slf_utils.basics import exists, params_hash, provenance
from slf_utils.parallel import get_client, run_clips
from slf_utils.preprocessing import SAMPLE_RATE
from slf_utils.speech_models import (
    LANGUAGE_HUB,
    SPEAKER_HUB,
    language_id,
    source_id,
    speaker_backend,
    speaker_embeddings,
)
from slf_utils.store import AUDIO_STAGE, Store, open_store, safe_key

STAGES = ("speaker", "speaker_windows", "pyaudio", "mel", "language")


# ------------------------------------------------------------------ parameters
def stage_params(cfg) -> dict[str, dict]:
    """{stage: the parameters its arrays depend on} for the stages this configuration computes."""
    f = cfg["features"]
    audio = {"audio_seconds": cfg["preprocess"]["audio_seconds"], "sr": SAMPLE_RATE}
    speaker = {"backend": f["speaker_backend"], "source": source_id(f["speaker_backend"], f["speaker_source"])}
    frames = {"frame_window": f["frame_window"], "frame_step": f["frame_step"]}
    out = {
        "speaker": {**speaker, **audio},
        "speaker_windows": {**speaker, "windows": [list(map(float, w)) for w in f["windows"]], **audio},
        "pyaudio": {**frames, **audio},
        "mel": {**frames, "n_mels": f["n_mels"], **audio},
    }
    if f["language"] == "speechbrain":
        out["language"] = {"source": str(f.get("language_source") or LANGUAGE_HUB), **audio}
    elif f["language"] != "labels":
        raise ValueError(f"features.language must be labels or speechbrain, got {f['language']!r}")
    return out


# ------------------------------------------------------------------ classical features
def frame_count(n_samples: int, window: float, step: float, sr: int = SAMPLE_RATE) -> int:
    win, hop = int(round(window * sr)), int(round(step * sr))
    return 0 if n_samples < win else 1 + (n_samples - win) // hop


def pyaudio_features(audio: np.ndarray, window: float = 0.5, step: float = 0.3, sr: int = SAMPLE_RATE):
    """pyAudioAnalysis short-term features, 34 + 34 deltas, as (F, 68) float32: `short_term_features`, the
    library's `ShortTermFeatures.feature_extraction(..., deltas=True)` computed over all frames at once."""
    feats = short_term_features(audio, sr, int(round(window * sr)), int(round(step * sr)))
    return np.ascontiguousarray(feats, dtype=np.float32)


def pyaudio_features_reference(audio: np.ndarray, window: float = 0.5, step: float = 0.3, sr: int = SAMPLE_RATE):
    """The same (F, 68) float32 from pyAudioAnalysis itself (its per-frame loop), as the paper's code computed
    them: the reference for `pyaudio_features` in the tests and the benchmark."""
    from pyAudioAnalysis import ShortTermFeatures

    _cache_chroma_init(ShortTermFeatures)
    feats, _ = ShortTermFeatures.feature_extraction(
        np.asarray(audio, np.float64), sr, int(round(window * sr)), int(round(step * sr)), deltas=True
    )
    return np.ascontiguousarray(feats.T, dtype=np.float32)


def _cache_chroma_init(module):
    """pyAudioAnalysis rebuilds its chroma tables for every frame (half of its run time); they depend only on
    (num_fft, sampling_rate) and are never modified, so a cached copy gives the same features."""
    if not hasattr(module.chroma_features_init, "cache_info"):
        module.chroma_features_init = lru_cache(maxsize=8)(module.chroma_features_init)


_EPS = float(np.finfo(np.float64).eps)  # pyAudioAnalysis' eps (sys.float_info.epsilon)


def short_term_features(signal: np.ndarray, sr: int, window: int, step: int) -> np.ndarray:
    """pyAudioAnalysis' `ShortTermFeatures.feature_extraction(signal, sr, window, step, deltas=True)` (window and
    step in samples), transposed to (F, 68) float64, vectorised over frames: one real FFT of all frames (strided
    views of the signal, no copies), the MFCC filterbank from its nonzero weights, the chroma fold as one scatter
    and sum. Each feature follows the library's formula and operation order (its normalisation of the signal, eps
    placement, frames at 0, step, ... while a whole window fits, first delta 0): all values but the MFCCs' matched
    the library's to the bit in our checks, the MFCCs differ by float64 rounding (filterbank sums in another order),
    and the float32 frames that `pyaudio_features` stores came out the same.

    Columns: zcr, energy, energy entropy, spectral centroid, spread, entropy, flux, rolloff, 13 MFCCs, 12 chroma,
    chroma std, then the 34 deltas (frame minus previous frame)."""
    from scipy.fft import rfft
    from scipy.fftpack import dct

    window, step = int(window), int(step)
    x = np.array(signal, np.float64)  # a copy: the library's int16 scaling, then its `dc_normalize`
    x /= 2.0**15
    x -= x.mean()
    x /= np.abs(x).max() + 1e-10
    if len(x) < window:
        raise ValueError(f"signal of {len(x)} samples is shorter than one {window}-sample window")
    frames = np.lib.stride_tricks.sliding_window_view(x, window)[::step]  # (F, window) views of x
    n = frames.shape[0]
    num_fft = window // 2
    chroma_map, chroma_div, chroma_width = _chroma_tables(num_fft, sr)
    out = np.zeros((n, 68))
    feats = out[:, :34]

    # time domain. Sign changes |diff(sign)| (0, 1 or 2) are integers: summed exactly as int8 / int64.
    sign = np.sign(x).astype(np.int8)
    changes = np.lib.stride_tricks.sliding_window_view(np.abs(sign[1:] - sign[:-1]), window - 1)[::step]
    feats[:, 0] = changes.sum(axis=1, dtype=np.int64) / 2 / (window - 1.0)
    power = np.lib.stride_tricks.sliding_window_view(x**2, window)[::step]
    energy = power.sum(axis=1)
    feats[:, 1] = energy / np.float64(window)
    feats[:, 2] = _block_entropy(power, energy)

    # frequency domain: |FFT| of the first num_fft bins, divided by num_fft
    mag = np.abs(rfft(frames, axis=1)[:, :num_fft]) / num_fft
    ind = np.arange(1, num_fft + 1) * (sr / (2.0 * num_fft))
    peak = mag.max(axis=1, keepdims=True)
    xt = mag / np.where(peak == 0, _EPS, peak)
    den = xt.sum(axis=1) + _EPS
    centroid = (ind * xt).sum(axis=1) / den
    spread = np.sqrt((((ind - centroid[:, None]) ** 2) * xt).sum(axis=1) / den)
    feats[:, 3] = centroid / (sr / 2.0)
    feats[:, 4] = spread / (sr / 2.0)
    spec = mag**2
    spec_energy = spec.sum(axis=1)
    feats[:, 5] = _block_entropy(spec, spec_energy)
    norm = mag / (mag + _EPS).sum(axis=1)[:, None]
    feats[1:, 6] = (np.diff(norm, axis=0) ** 2).sum(axis=1)  # frame 0: flux against itself, 0
    above = np.cumsum(spec, axis=1) + _EPS > (0.90 * spec_energy)[:, None]
    feats[:, 7] = np.where(above.any(axis=1), above.argmax(axis=1) / float(num_fft), 0.0)

    # MFCCs: log10 of the triangular filterbank, DCT-II (orthonormal), first 13
    mspec = np.log10(_filterbank(mag, sr, num_fft) + _EPS)
    feats[:, 8:21] = dct(mspec, type=2, norm="ortho", axis=-1)[:, :13]

    # chroma: the library's fold of the power spectrum onto 12 classes (see `_chroma_tables`), then its std
    folded = np.zeros((n, chroma_width))
    folded[:, chroma_map[1]] = spec[:, chroma_map[0]]
    folded /= chroma_div
    chroma = folded.reshape(n, -1, 12).sum(axis=1)
    chroma /= np.where(spec_energy == 0, _EPS, spec_energy)[:, None]
    feats[:, 21:33] = chroma
    feats[:, 33] = chroma.std(axis=1)

    out[1:, 34:] = feats[1:] - feats[:-1]
    return out


def _block_entropy(power: np.ndarray, total: np.ndarray, n_blocks: int = 10) -> np.ndarray:
    """pyAudioAnalysis' `energy_entropy` / `spectral_entropy` of each row, given the row's squares and their sum:
    entropy (bits) of the energies of `n_blocks` equal consecutive blocks (a remainder is dropped), each block
    summed element by element in order, as the library's column sums of its (len, n_blocks) reshape do."""
    n, width = power.shape
    block = width // n_blocks
    blocks = power[:, : block * n_blocks].reshape(n, n_blocks, block).transpose(0, 2, 1)
    sub = np.ascontiguousarray(blocks).sum(axis=1) / (total + _EPS)[:, None]
    return -(sub * np.log2(sub + _EPS)).sum(axis=1)


def _filterbank(mag: np.ndarray, sr: int, num_fft: int) -> np.ndarray:
    """`mag @ fbank.T` for the MFCC filterbank (F, 40), from its nonzero weights only (each bin feeds at most two
    filters): a tenth of the work of the dense product, and plain sums in bin order (no BLAS threads)."""
    cols, weights, first, rows = _filterbank_sparse(sr, num_fft)
    out = np.zeros((mag.shape[0], len(_mfcc_filter_banks(sr, num_fft))))
    if len(cols):
        out[:, rows] = np.add.reduceat(mag[:, cols] * weights, first, axis=1)
    return out


@lru_cache(maxsize=8)
def _filterbank_sparse(sr: int, num_fft: int):
    """The MFCC filterbank's nonzero (columns, weights) filter by filter, where each filter's run starts, and
    which filters have any."""
    fbank = _mfcc_filter_banks(sr, num_fft)
    rows, cols = np.nonzero(fbank)  # row-major: filter by filter, bins in order
    rows_with = np.unique(rows)
    first = np.searchsorted(rows, rows_with)
    return cols, fbank[rows, cols], first, rows_with


@lru_cache(maxsize=8)
def _mfcc_filter_banks(sr: int, num_fft: int, lowfreq=133.33, linc=200 / 3, logsc=1.0711703, n_lin=13, n_log=27):
    """pyAudioAnalysis' `mfcc_filter_banks` (from scikits.talkbox): (40, num_fft) triangular filters."""
    total = n_lin + n_log
    freqs = np.zeros(total + 2)
    freqs[:n_lin] = lowfreq + np.arange(n_lin) * linc
    freqs[n_lin:] = freqs[n_lin - 1] * logsc ** np.arange(1, n_log + 3)
    heights = 2.0 / (freqs[2:] - freqs[0:-2])
    fbank = np.zeros((total, num_fft))
    nfreqs = np.arange(num_fft) / (1.0 * num_fft) * sr
    for i in range(total):
        low, cent, high = freqs[i], freqs[i + 1], freqs[i + 2]
        lid = np.arange(np.floor(low * num_fft / sr) + 1, np.floor(cent * num_fft / sr) + 1, dtype=int)
        rid = np.arange(np.floor(cent * num_fft / sr) + 1, np.floor(high * num_fft / sr) + 1, dtype=int)
        fbank[i][lid] = heights[i] / (cent - low) * (nfreqs[lid] - low)
        fbank[i][rid] = heights[i] / (high - cent) * (high - nfreqs[rid])
    fbank.setflags(write=False)
    return fbank


@lru_cache(maxsize=8)
def _chroma_tables(num_fft: int, sr: int):
    """pyAudioAnalysis' `chroma_features` as a fixed fold: bin f has pitch class number c(f) = round(12 log2(f_Hz /
    27.5)); the library writes power[f] to slot c(f) of a num_fft-long vector (a negative c counts from the end; of
    the bins sharing a slot the last one wins), divides slot k by the bin count of c(k), zero-pads to a multiple of
    12 and sums every 12th slot. Returns ((bins, slots) that are written, the divisors, the padded width)."""
    freqs = np.array([((f + 1) * sr) / (2 * num_fft) for f in range(num_fft)])
    num_chroma = np.round(12.0 * np.log2(freqs / 27.50)).astype(int)
    if num_chroma.max() >= num_fft:  # the library's other branch fails on its own (shape mismatch)
        raise ValueError(f"pyAudioAnalysis chroma features are undefined for {num_fft} FFT bins at {sr} Hz")
    per_chroma = np.zeros(num_fft)
    for u in np.unique(num_chroma):
        idx = np.nonzero(num_chroma == u)
        per_chroma[idx] = idx[0].shape
    slots = num_chroma % num_fft
    last = {int(k): f for f, k in enumerate(slots)}  # later bins overwrite earlier ones
    bins, written = np.array(list(last.values())), np.array(list(last))
    div = np.ones(int(np.ceil(num_fft / 12.0) * 12))
    div[:num_fft] = per_chroma[num_chroma]
    return (bins, written), div, len(div)


def log_mel(audio: np.ndarray, window: float = 0.5, step: float = 0.3, n_mels: int = 128, sr: int = SAMPLE_RATE):
    """Log (dB) mel power spectrogram on the same frames as `pyaudio_features`: (F, n_mels) float32."""
    import librosa

    win, hop = int(round(window * sr)), int(round(step * sr))
    s = librosa.feature.melspectrogram(
        y=np.asarray(audio, np.float32),
        sr=sr,
        n_fft=win,
        hop_length=hop,
        win_length=win,
        center=False,
        n_mels=n_mels,
        power=2.0,
    )
    return np.ascontiguousarray(librosa.power_to_db(s, ref=1.0, amin=1e-10, top_db=None).T, dtype=np.float32)


# ------------------------------------------------------------------ one clip, many clips
def model_dir(store_root, source) -> Path:
    """Where SpeechBrain collects (symlinks) a model's files: inside the store, one folder per source."""
    return Path(store_root) / "models" / safe_key(str(source))


def models(fp: dict, store_root):
    """The models the stages in `fp` need, loaded once per process (driver or Dask worker)."""
    f = fp["features"]
    out = {}
    if "speaker" in fp["stages"] or "speaker_windows" in fp["stages"]:
        src = f["speaker_source"]
        savedir = model_dir(store_root, src or SPEAKER_HUB) if f["speaker_backend"] == "speechbrain" else None
        out["speaker"] = speaker_backend(f["speaker_backend"], src, savedir)
    if "language" in fp["stages"]:
        src = f.get("language_source") or LANGUAGE_HUB
        out["language"] = language_id(src, model_dir(store_root, src))
    return out


def extract_all(audio: np.ndarray, stages, f: dict, mdl: dict) -> tuple[dict, dict]:
    """Compute `stages` for one clip's audio: ({stage: arrays}, {labels for the clips table})."""
    arrays, labels = {}, {}
    if "speaker" in stages or "speaker_windows" in stages:
        whole, win, bounds = speaker_embeddings(
            audio, mdl["speaker"], f["windows"], whole="speaker" in stages, sliding="speaker_windows" in stages
        )
        if whole is not None:
            arrays["speaker"] = {"embedding": whole}
        if win is not None:
            arrays["speaker_windows"] = {"embedding": win, "window": (bounds / SAMPLE_RATE).astype(np.float32)}
    if "pyaudio" in stages:
        arrays["pyaudio"] = {"frames": pyaudio_features(audio, f["frame_window"], f["frame_step"])}
    if "mel" in stages:
        arrays["mel"] = {"frames": log_mel(audio, f["frame_window"], f["frame_step"], f["n_mels"])}
    if "language" in stages:
        code, logp = mdl["language"].identify(audio)
        arrays["language"] = {"logprobs": logp}
        labels["language"] = code
    return arrays, labels


def extract_clip(item: dict, fp: dict, store_root: str) -> dict:
    """Worker function: one clip's pending stages. Reads its audio from the store (shared filesystem), returns
    the arrays to the driver, which writes them. Bad audio is a per-stage reason, model loading errors raise."""
    mdl = models(fp, store_root)
    cid = item["clip_id"]
    out = {"clip_id": cid, "arrays": {}, "reasons": {}, "labels": {}}
    try:
        audio = Store(store_root).get(cid, AUDIO_STAGE)["audio"]
        arrays, labels = extract_all(audio, item["stages"], fp["features"], mdl)
        out["arrays"], out["labels"] = arrays, labels
    except Exception as e:  # recorded per stage and retried next run; the other clips carry on
        out["reasons"] = {s: f"error: {type(e).__name__}: {e}" for s in item["stages"]}
    return out


def run(cfg, store: Store | None = None, client=None, clip_ids=None) -> pd.DataFrame:
    """Compute every feature stage for every preprocessed clip where it is missing or its parameters changed.
    Returns the store's per-stage summary."""
    store = store if exists(store) else open_store(cfg)
    sp = stage_params(cfg)
    hashes = {s: params_hash(p) for s, p in sp.items()}
    fp = {"features": cfg["features"], "stages": list(sp)}
    mdl = models(fp, store.root)  # fail fast (and once) on a missing model, before any clip
    for s, p in sp.items():
        extra = {"stage": s, "params": p, "params_hash": hashes[s]}
        if s.startswith("speaker"):
            extra["model"] = mdl["speaker"].describe()
        if s == "language":
            extra["model"] = {"backend": "speechbrain", "source": mdl["language"].source}
        store.set_provenance(s, provenance(extra))
    clips = store.clips(stage="preprocess")
    if exists(clip_ids):
        clips = clips[clips.clip_id.isin(set(clip_ids))]
    finished = {s: store.finished(s, h) for s, h in hashes.items()}
    items = []
    for cid in clips.clip_id:
        todo = [s for s in sp if cid not in finished[s]]
        if todo:
            items.append({"clip_id": cid, "stages": todo})
    t0 = time.time()
    for res in run_clips(
        extract_clip, items, client=get_client(cfg, client), desc="features", fp=fp, store_root=str(store.root)
    ):
        cid = res["clip_id"]
        if res["labels"]:
            store.update_labels(cid, **res["labels"])
        for s, arrays in res["arrays"].items():
            store.put(cid, s, arrays, hashes[s])
        for s, reason in res["reasons"].items():
            store.reject(cid, s, reason, hashes[s], retry=True)
    elapsed = time.time() - t0
    for s in sp:
        prov = store.provenance(s)
        n = sum(s in it["stages"] for it in items)
        prov.update(
            {
                "clips_processed": n,
                "seconds": round(elapsed, 2),
                "clips_per_s": round(len(items) / elapsed, 3) if items and elapsed > 0 else None,
            }
        )
        store.set_provenance(s, prov)
    return store.summary()


def plot_example(store: Store, clip_id=None):
    """One clip's constituents: log-mel and pyAudioAnalysis frames, and the cosine similarity of its window
    embeddings to its whole-clip embedding."""
    import matplotlib.pyplot as plt

    done = store.clips(stage="mel")
    if done.empty:
        return None
    clip_id = clip_id or done.clip_id.iloc[0]
    mel = store.get(clip_id, "mel")["frames"]
    pa = store.get(clip_id, "pyaudio")["frames"]
    whole = store.get(clip_id, "speaker")["embedding"]
    win = store.get(clip_id, "speaker_windows")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    im = axes[0].imshow(mel.T, origin="lower", aspect="auto", cmap="magma")
    axes[0].set(title="log-mel power (dB)", xlabel="frame (0.3 s step)", ylabel="mel band")
    fig.colorbar(im, ax=axes[0])
    z = (pa - pa.mean(0)) / (pa.std(0) + 1e-8)  # per-feature z-score: the 68 features have very different scales
    im = axes[1].imshow(z.T, origin="lower", aspect="auto", cmap="coolwarm", vmin=-3, vmax=3)
    axes[1].set(title="pyAudioAnalysis (z-scored)", xlabel="frame", ylabel="feature")
    fig.colorbar(im, ax=axes[1])
    sim = win["embedding"] @ whole / (np.linalg.norm(win["embedding"], axis=1) * np.linalg.norm(whole) + 1e-8)
    for length in np.unique(win["window"][:, 1]):
        m = win["window"][:, 1] == length
        axes[2].plot(win["window"][m, 0], sim[m], "o-", label=f"{length:g} s")
    axes[2].set(title="window vs whole-clip embedding", xlabel="window start (s)", ylabel="cosine")
    axes[2].legend(title="window", fontsize=7)
    fig.suptitle(clip_id, fontsize=9)
    fig.tight_layout()
    return fig


def summary(store: Store) -> pd.DataFrame:
    """Done/rejected counts, clips/s and the model of every feature stage."""
    table = store.summary().reindex([s for s in STAGES if s in store.summary().index])
    prov = {s: store.provenance(s) for s in table.index}
    table["clips_per_s"] = [prov[s].get("clips_per_s") for s in table.index]
    table["params_hash"] = [prov[s].get("params_hash") for s in table.index]
    table["model"] = [json_model(prov[s].get("model")) for s in table.index]
    return table


def json_model(m) -> str | None:
    return None if not m else f"{m.get('backend')}:{m.get('source')}" + (f" ({m['dim']}-d)" if m.get("dim") else "")
