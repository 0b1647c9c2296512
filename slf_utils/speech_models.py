"""The pretrained speech models of notebook 02: speaker embeddings of a clip and of its sliding windows, and
language identification.

Speaker backends are small adapters behind `SpeakerBackend`, chosen by name: `resemblyzer` (GE2E, 256-d, weights
ship in its wheel) or `speechbrain` (ECAPA, 192-d, hub id or local folder). The whole clip and every window of a
clip go through the model together (`speaker_embeddings`). `LanguageID` is SpeechBrain's CommonLanguage ECAPA.
"""

from __future__ import annotations

import threading
from functools import lru_cache

import numpy as np

from slf_utils.basics import exists, resolve
from slf_utils.preprocessing import SAMPLE_RATE

SPEAKER_HUB = "speechbrain/spkrec-ecapa-voxceleb"
LANGUAGE_HUB = "speechbrain/lang-id-commonlanguage_ecapa"
_MODEL_LOCK = threading.Lock()  # one model object per process; Dask threads take turns

# CommonLanguage's 45 class names -> ISO 639 codes, so lang-id labels match manifest labels ("fr").
COMMONLANGUAGE_CODES = {
    "Arabic": "ar",
    "Basque": "eu",
    "Breton": "br",
    "Catalan": "ca",
    "Chinese_China": "zh-CN",
    "Chinese_Hongkong": "zh-HK",
    "Chinese_Taiwan": "zh-TW",
    "Chuvash": "cv",
    "Czech": "cs",
    "Dhivehi": "dv",
    "Dutch": "nl",
    "English": "en",
    "Esperanto": "eo",
    "Estonian": "et",
    "French": "fr",
    "Frisian": "fy",
    "Georgian": "ka",
    "German": "de",
    "Greek": "el",
    "Hakha_Chin": "cnh",
    "Indonesian": "id",
    "Interlingua": "ia",
    "Italian": "it",
    "Japanese": "ja",
    "Kabyle": "kab",
    "Kinyarwanda": "rw",
    "Kyrgyz": "ky",
    "Latvian": "lv",
    "Maltese": "mt",
    "Mangolian": "mn",
    "Persian": "fa",
    "Polish": "pl",
    "Portuguese": "pt",
    "Romanian": "ro",
    "Romansh_Sursilvan": "rm",
    "Russian": "ru",
    "Sakha": "sah",
    "Slovenian": "sl",
    "Spanish": "es",
    "Swedish": "sv",
    "Tamil": "ta",
    "Tatar": "tt",
    "Turkish": "tr",
    "Ukranian": "uk",
    "Welsh": "cy",
}


def source_id(backend, source):
    if backend == "speechbrain":
        return str(source or SPEAKER_HUB)
    return str(source) if exists(source) else "bundled"


# ------------------------------------------------------------------ speaker embeddings
def window_bounds(n_samples: int, windows, sr: int = SAMPLE_RATE) -> np.ndarray:
    """(W, 2) int [start, length] in samples: for each (size, hop) in seconds the windows that fit in the clip,
    in order. A window longer than the clip is replaced by the whole clip, once (so W does not depend on how
    much longer it is, and a 6 s demo clip still gets one row for the 12 s and 24 s sizes)."""
    out = []
    for size, hop in windows:
        win, step = int(round(size * sr)), int(round(hop * sr))
        if win >= n_samples:
            out.append((0, n_samples))
            continue
        out += [(s, win) for s in range(0, n_samples - win + 1, step)]
    return np.array(out, dtype=np.int64).reshape(-1, 2)


class SpeakerBackend:
    """Speaker embeddings for a list of 16 kHz mono float32 segments, as (N, D) float32."""

    name = "base"
    dim = 0

    def __init__(self, source=None):
        self.source = source

    def embed(self, segments: list[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"backend": self.name, "source": source_id(self.name, self.source), "dim": self.dim}


class ResemblyzerBackend(SpeakerBackend):
    """Resemblyzer GE2E (weights in its wheel, or a `.pt` file as source).

    Gives `VoiceEncoder.embed_utterance(segment)` for every segment (to float rounding), with less work when the
    segments are windows of one clip: the STFT frames that lie inside a segment are the clip's own frames, so
    they are computed once per clip (only frames touching a segment's edges are recomputed, as the library
    would, with its zero padding); partial utterances (1.6 s) with identical mel input are embedded once; and
    all remaining partials of all segments go through the LSTM in one batch: one forward pass per clip."""

    name = "resemblyzer"
    dim = 256

    def __init__(self, source=None):
        super().__init__(source)
        from resemblyzer import VoiceEncoder

        self.model = VoiceEncoder(device="cpu", verbose=False, weights_fpath=resolve(source) if source else None)
        self.model.eval()

    def prepare(self, audio: np.ndarray) -> np.ndarray:
        """Resemblyzer's volume normalisation, without its silence trimming: windows keep their positions."""
        from resemblyzer.audio import normalize_volume
        from resemblyzer.hparams import audio_norm_target_dBFS

        return normalize_volume(np.asarray(audio, np.float32), audio_norm_target_dBFS, increase_only=True)

    def embed(self, segments, rate=1.3, min_coverage=0.75, clip=None, starts=None):
        """Embeddings of `segments`. When they are windows of `clip` starting at sample `starts`, the clip's
        STFT is shared (see the class docstring)."""
        import torch

        shared = _ClipMel(clip) if clip is not None else None
        keys, batch, owner = {}, [], []
        for i, wav in enumerate(segments):
            wav_slices, mel_slices = self.model.compute_partial_slices(len(wav), rate, min_coverage)
            length = max(len(wav), wav_slices[-1].stop)  # embed_utterance pads to the last partial
            start = starts[i] if shared is not None else None
            mel = shared.segment(start, len(wav), length) if shared is not None else _mel_of(wav, length)
            for sl in mel_slices:
                part = mel[sl]
                key = part.tobytes()
                if key not in keys:
                    keys[key] = len(batch)
                    batch.append(part)
                owner.append((i, keys[key]))
        with _MODEL_LOCK, torch.inference_mode():
            # chunks of 32 partials: the LSTM's working set stays in cache (about 8 % faster than one batch, same
            # values: each partial is computed on its own)
            stacked = torch.from_numpy(np.stack(batch))
            partial = torch.cat([self.model(stacked[i : i + 32]) for i in range(0, len(stacked), 32)]).numpy()
        raw = np.zeros((len(segments), partial.shape[1]), np.float64)
        count = np.zeros(len(segments))
        for i, j in owner:
            raw[i] += partial[j]
            count[i] += 1
        raw = (raw / count[:, None]).astype(np.float32)  # np.mean of float32 partials, as the library does
        return (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float32)


@lru_cache(maxsize=1)
def _resemblyzer_consts():
    import librosa
    from resemblyzer import hparams as hp

    n_fft = int(hp.sampling_rate * hp.mel_window_length / 1000)
    hop = int(hp.sampling_rate * hp.mel_window_step / 1000)
    basis = librosa.filters.mel(sr=hp.sampling_rate, n_fft=n_fft, n_mels=hp.mel_n_channels)
    window = librosa.filters.get_window("hann", n_fft, fftbins=True)
    return n_fft, hop, basis, window


def _power_frames(padded: np.ndarray, first: int, count: int) -> np.ndarray:
    """Power spectra (count, 1 + n_fft/2) of frames first..first+count-1 of an already centre-padded signal,
    computed like librosa.stft (float64 window product and FFT, stored as complex64)."""
    n_fft, hop, _, window = _resemblyzer_consts()
    idx = (first + np.arange(count))[:, None] * hop + np.arange(n_fft)[None]
    spec = np.fft.rfft(window * padded[idx], axis=1).astype(np.complex64)
    return np.abs(spec) ** 2


def _mel_of(wav: np.ndarray, length: int) -> np.ndarray:
    """`resemblyzer.audio.wav_to_mel_spectrogram` of `wav` zero-padded to `length`: (frames, 40) float32."""
    n_fft, hop, basis, _ = _resemblyzer_consts()
    padded = np.zeros(length + n_fft, np.float32)
    padded[n_fft // 2 : n_fft // 2 + len(wav)] = wav
    power = _power_frames(padded, 0, 1 + length // hop)
    return (power @ basis.T).astype(np.float32)


class _ClipMel:
    """The mel frames of windows of one clip, reusing the clip's STFT frames wherever a window's frame sees only
    samples inside the window (then it is the very same computation)."""

    def __init__(self, clip: np.ndarray):
        n_fft, hop, basis, _ = _resemblyzer_consts()
        self.clip = np.asarray(clip, np.float32)
        padded = np.zeros(len(clip) + n_fft, np.float32)
        padded[n_fft // 2 : n_fft // 2 + len(clip)] = self.clip
        self.basis = np.ascontiguousarray(basis.T)
        self.mel = _power_frames(padded, 0, 1 + len(clip) // hop) @ self.basis

    def segment(self, start: int, n: int, length: int) -> np.ndarray:
        n_fft, hop, _, _ = _resemblyzer_consts()
        frames = 1 + length // hop
        if start % hop:
            return _mel_of(self.clip[start : start + n], length)
        half = n_fft // 2
        t = np.arange(frames)
        inside = (t * hop - half >= 0) & (t * hop + half <= n)
        mel = np.empty((frames, self.mel.shape[1]), np.float32)
        mel[inside] = self.mel[start // hop + t[inside]]
        edge = np.flatnonzero(~inside)
        if len(edge):
            padded = np.zeros(length + n_fft, np.float32)
            padded[half : half + n] = self.clip[start : start + n]
            for run in np.split(edge, np.flatnonzero(np.diff(edge) > 1) + 1):
                mel[run] = _power_frames(padded, int(run[0]), len(run)) @ self.basis
        return mel


def load_speechbrain(source, savedir):
    """`EncoderClassifier.from_hparams` from a hub id or a local folder. A local folder holding a hub
    hyperparams.yaml still names the hub in `pretrained_path`; it is pointed at the folder instead."""
    from speechbrain.inference.classifiers import EncoderClassifier

    local = resolve(source)
    overrides = {}
    if local.is_dir():
        source = str(local)
        if "pretrained_path:" in (local / "hyperparams.yaml").read_text():
            overrides["pretrained_path"] = source
    model = EncoderClassifier.from_hparams(
        source=str(source), savedir=str(savedir), overrides=overrides, run_opts={"device": "cpu"}
    )
    model.eval()
    return model


class SpeechBrainBackend(SpeakerBackend):
    """SpeechBrain ECAPA-TDNN (`speechbrain/spkrec-ecapa-voxceleb` or a local folder with the same files).

    Segments of equal length (all windows of one size) are one batch without padding, so each embedding is what
    `encode_batch` gives for that segment alone; mixing lengths would need zero padding, which changes ECAPA's
    convolutions near the end and costs up to 4x the compute for 3 s windows padded to 24 s."""

    name = "speechbrain"
    dim = 192

    def __init__(self, source=None, savedir=None):
        super().__init__(source or SPEAKER_HUB)
        self.model = load_speechbrain(self.source, savedir)

    def embed(self, segments):
        import torch

        out = [None] * len(segments)
        by_len = {}
        for i, s in enumerate(segments):
            by_len.setdefault(len(s), []).append(i)
        with _MODEL_LOCK, torch.inference_mode():
            for idx in by_len.values():
                batch = torch.from_numpy(np.stack([segments[i] for i in idx]).astype(np.float32))
                emb = self.model.encode_batch(batch).squeeze(1).numpy()
                for j, i in enumerate(idx):
                    out[i] = emb[j]
        return np.stack(out).astype(np.float32)


BACKENDS = {"resemblyzer": ResemblyzerBackend, "speechbrain": SpeechBrainBackend}


@lru_cache(maxsize=4)
def speaker_backend(name: str, source=None, savedir=None) -> SpeakerBackend:
    """The backend called `name`, loaded once per process."""
    if name not in BACKENDS:
        raise ValueError(f"features.speaker_backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "speechbrain":
        return SpeechBrainBackend(source, savedir)
    return BACKENDS[name](source)


def speaker_embeddings(audio, backend: SpeakerBackend, windows, whole=True, sliding=True):
    """(whole-clip embedding (D,) or None, window embeddings (W, D) or None, bounds (W, 2) samples), all from one
    `backend.embed` call; identical segments (windows that fell back to the whole clip) are computed once."""
    audio = backend.prepare(audio) if hasattr(backend, "prepare") else np.asarray(audio, np.float32)
    bounds = window_bounds(len(audio), windows) if sliding else np.zeros((0, 2), np.int64)
    spans = ([(0, len(audio))] if whole else []) + [tuple(b) for b in bounds]
    unique = list(dict.fromkeys(spans))
    segments = [audio[s : s + n] for s, n in unique]
    if isinstance(backend, ResemblyzerBackend):
        emb = backend.embed(segments, clip=audio, starts=[s for s, _ in unique])
    else:
        emb = backend.embed(segments)
    row = {span: i for i, span in enumerate(unique)}
    e_whole = emb[row[(0, len(audio))]] if whole else None
    e_win = emb[[row[tuple(b)] for b in bounds]] if sliding else None
    return e_whole, e_win, bounds


# ------------------------------------------------------------------ language
class LanguageID:
    """SpeechBrain language identification (CommonLanguage ECAPA, 45 languages) from a hub id or local folder."""

    def __init__(self, source=None, savedir=None):
        self.source = source or LANGUAGE_HUB
        self.model = load_speechbrain(self.source, savedir)

    def identify(self, audio) -> tuple[str, np.ndarray]:
        """(language code, log-posteriors (n_classes,) float32)."""
        import torch

        with _MODEL_LOCK, torch.inference_mode():
            out_prob, _, _, labels = self.model.classify_batch(torch.from_numpy(np.asarray(audio, np.float32))[None])
        label = labels[0]
        return COMMONLANGUAGE_CODES.get(label, str(label).lower()), out_prob[0].numpy().astype(np.float32)


@lru_cache(maxsize=2)
def language_id(source=None, savedir=None) -> LanguageID:
    return LanguageID(source, savedir)
