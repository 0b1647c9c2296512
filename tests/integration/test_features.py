"""Features (notebook 02): constituents, per-stage hashes, speaker backends (Resemblyzer, SpeechBrain from a local
folder with random weights of the real architecture), language id, Dask, and papermill runs of notebooks 01/02."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_preprocessing import GOOD, make_cfg, make_corpus

from slf_utils import features as F
from slf_utils import preprocessing as P
from slf_utils import speech_models as SM
from slf_utils.basics import ROOT, params_hash
from slf_utils.config import load_params
from slf_utils.results import Results
from slf_utils.store import Store

SR = 16000
DEFAULT_WINDOWS = [[3, 1], [6, 2], [12, 4], [24, 8]]

# The hub's hyperparams.yaml of speechbrain/spkrec-ecapa-voxceleb (format and architecture as published).
SPEAKER_YAML = """\
# ############################################################################
# Model: ECAPA big for Speaker verification
# ############################################################################

# Feature parameters
n_mels: 80

# Pretrain folder (HuggingFace)
pretrained_path: speechbrain/spkrec-ecapa-voxceleb

# Output parameters
out_n_neurons: 7205

# Model params
compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>

mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False

embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
    channels: [1024, 1024, 1024, 1024, 3072]
    kernel_sizes: [5, 3, 3, 3, 1]
    dilations: [1, 2, 3, 4, 1]
    attention_channels: 128
    lin_neurons: 192

classifier: !new:speechbrain.lobes.models.ECAPA_TDNN.Classifier
    input_size: 192
    out_neurons: !ref <out_n_neurons>

mean_var_norm_emb: !new:speechbrain.processing.features.InputNormalization
    norm_type: global
    std_norm: False

modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>
    mean_var_norm_emb: !ref <mean_var_norm_emb>
    classifier: !ref <classifier>

label_encoder: !new:speechbrain.dataio.encoder.CategoricalEncoder

pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
        mean_var_norm_emb: !ref <mean_var_norm_emb>
        classifier: !ref <classifier>
        label_encoder: !ref <label_encoder>
    paths:
        embedding_model: !ref <pretrained_path>/embedding_model.ckpt
        mean_var_norm_emb: !ref <pretrained_path>/mean_var_norm_emb.ckpt
        classifier: !ref <pretrained_path>/classifier.ckpt
        label_encoder: !ref <pretrained_path>/label_encoder.txt
"""

# The hub's hyperparams.yaml of speechbrain/lang-id-commonlanguage_ecapa.
LANGUAGE_YAML = """\
# #################################
# Basic inference parameters for speaker-id. We have first a network that
# computes some embeddings. On the top of that, we employ a classifier.
#
# Author:
#  * Mirco Ravanelli 2021
# #################################

# pretrain folders:
pretrained_path: speechbrain/lang-id-commonlanguage_ecapa

# Model parameters
n_mels: 80
sample_rate: 16000
n_classes: 45 # In this case, we have 45 languages
emb_dim: 192 # dimensionality of the embeddings

# Feature extraction
compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>

# Mean and std normalization of the input features
mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False

embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
    channels: [1024, 1024, 1024, 1024, 3072]
    kernel_sizes: [5, 3, 3, 3, 1]
    dilations: [1, 2, 3, 4, 1]
    attention_channels: 128
    lin_neurons: !ref <emb_dim>

classifier: !new:speechbrain.lobes.models.ECAPA_TDNN.Classifier
    input_size: !ref <emb_dim>
    out_neurons: !ref <n_classes>

label_encoder: !new:speechbrain.dataio.encoder.CategoricalEncoder

modules:
    compute_features: !ref <compute_features>
    embedding_model: !ref <embedding_model>
    classifier: !ref <classifier>
    mean_var_norm: !ref <mean_var_norm>

pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
        classifier: !ref <classifier>
        label_encoder: !ref <label_encoder>
    paths:
        embedding_model: !ref <pretrained_path>/embedding_model.ckpt
        classifier: !ref <pretrained_path>/classifier.ckpt
        label_encoder: !ref <pretrained_path>/label_encoder.txt
"""


def _ecapa():
    from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN

    return ECAPA_TDNN(
        80,
        channels=[1024, 1024, 1024, 1024, 3072],
        kernel_sizes=[5, 3, 3, 3, 1],
        dilations=[1, 2, 3, 4, 1],
        attention_channels=128,
        lin_neurons=192,
    )


def _label_encoder(labels, path):
    from speechbrain.dataio.encoder import CategoricalEncoder

    enc = CategoricalEncoder()
    enc.update_from_iterable(labels)
    enc.save(path)


@pytest.fixture(scope="module")
def ecapa_folders(tmp_path_factory):
    """Folders laid out like the two hub models: random weights of the real ECAPA architecture saved as the real
    checkpoint files, plus each model's hyperparams.yaml. The embedding weights are shared (saves seconds)."""
    from speechbrain.lobes.models.ECAPA_TDNN import Classifier
    from speechbrain.processing.features import InputNormalization

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ecapa")
    spk, lang = root / "spkrec-ecapa-voxceleb", root / "lang-id-commonlanguage_ecapa"
    spk.mkdir()
    lang.mkdir()
    torch.save(_ecapa().state_dict(), spk / "embedding_model.ckpt")
    torch.save(Classifier(input_size=192, out_neurons=7205).state_dict(), spk / "classifier.ckpt")
    norm = InputNormalization(norm_type="global", std_norm=False)
    norm(torch.randn(8, 1, 192), torch.ones(8))
    norm._save(spk / "mean_var_norm_emb.ckpt")
    _label_encoder([f"id{i:05d}" for i in range(7205)], spk / "label_encoder.txt")
    (spk / "hyperparams.yaml").write_text(SPEAKER_YAML)
    (lang / "embedding_model.ckpt").hardlink_to(spk / "embedding_model.ckpt")
    torch.save(Classifier(input_size=192, out_neurons=45).state_dict(), lang / "classifier.ckpt")
    _label_encoder(list(SM.COMMONLANGUAGE_CODES), lang / "label_encoder.txt")
    (lang / "hyperparams.yaml").write_text(LANGUAGE_YAML)
    return spk, lang


def _direct_ecapa(folder, wavs: np.ndarray) -> np.ndarray:
    """The model called directly: Fbank -> sentence mean normalisation -> ECAPA with the folder's weights."""
    from speechbrain.lobes.features import Fbank
    from speechbrain.processing.features import InputNormalization

    model = _ecapa()
    model.load_state_dict(torch.load(Path(folder) / "embedding_model.ckpt", weights_only=True))
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(np.atleast_2d(wavs).astype(np.float32))
        lens = torch.ones(len(x))
        feats = InputNormalization(norm_type="sentence", std_norm=False)(Fbank(n_mels=80)(x), lens)
        return model(feats, lens).squeeze(1).numpy()


# ------------------------------------------------------------------ constituents
@pytest.fixture(scope="module")
def feature_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("features")
    manifest = make_corpus(tmp / "corpus")
    cfg = make_cfg(tmp, manifest)
    P.run(cfg)
    F.run(cfg)
    return cfg, Store(Results.of(cfg).store)


def test_shapes_and_dtypes_of_every_constituent(feature_run):
    cfg, store = feature_run
    done = set(store.clips(stage="preprocess").clip_id)
    assert len(done) == len(GOOD) + 2
    n = 3 * SR  # audio_seconds 3; windows (1, .5), (2, 1), (4, 2): 5 + 2 + 1 (whole clip)
    frames = F.frame_count(n, 0.5, 0.3)
    assert frames == 9
    for cid in done:
        assert store.get(cid, "speaker")["embedding"].shape == (256,)
        w = store.get(cid, "speaker_windows")
        assert w["embedding"].shape == (8, 256) and w["window"].shape == (8, 2)
        assert w["window"][:, 1].tolist() == [1] * 5 + [2] * 2 + [3]
        assert store.get(cid, "pyaudio")["frames"].shape == (frames, 68)
        assert store.get(cid, "mel")["frames"].shape == (frames, 32)
        for stage in ("speaker", "speaker_windows", "pyaudio", "mel"):
            for k, a in store.get(cid, stage).items():
                assert a.dtype == np.float32 and np.isfinite(a).all(), (stage, k)
        e = store.get(cid, "speaker")["embedding"]
        assert abs(np.linalg.norm(e) - 1) < 1e-5
    # rejected clips get no features; language stays the manifest label
    assert set(store.clips(stage="mel").clip_id) == done
    assert (store.clips().language == "fr").all()
    batch = store.load_stacked("speaker_windows", sorted(done))
    assert batch["embedding"].shape == (len(done), 8, 256)
    prov = store.provenance("speaker")
    assert prov["model"] == {"backend": "resemblyzer", "source": "bundled", "dim": 256}
    assert prov["packages"]["resemblyzer"] and prov["git_revision"] and prov["params"]["audio_seconds"] == 3.0


def test_window_counts_for_a_24s_clip():
    b = SM.window_bounds(24 * SR, DEFAULT_WINDOWS)
    sizes = (b[:, 1] // SR).tolist()
    assert [sizes.count(s) for s in (3, 6, 12, 24)] == [22, 10, 4, 1]
    assert len(b) == 37 and (b.sum(axis=1) <= 24 * SR).all()
    assert (b[sizes.index(12) :][:4, 0] // SR).tolist() == [0, 4, 8, 12]
    # a 6 s clip: 4 + 1, and the 12 s and 24 s windows fall back to the whole clip once each
    assert (
        SM.window_bounds(6 * SR, DEFAULT_WINDOWS).tolist() == [[s * SR, 3 * SR] for s in range(4)] + [[0, 6 * SR]] * 3
    )


def test_pyaudio_and_mel_share_frames():
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.normal(size=24 * SR)).astype(np.float32)
    pa, mel = F.pyaudio_features(audio), F.log_mel(audio, n_mels=128)
    assert pa.shape == (79, 68) and mel.shape == (79, 128) and F.frame_count(len(audio), 0.5, 0.3) == 79
    assert pa.dtype == mel.dtype == np.float32
    # a tone at 1 kHz puts its energy in the mel band around 1 kHz in every frame
    t = np.arange(2 * SR) / SR
    m = F.log_mel(np.sin(2 * np.pi * 1000 * t).astype(np.float32), n_mels=64)
    import librosa

    band = np.argmin(np.abs(librosa.mel_frequencies(64, fmax=SR / 2) - 1000))
    assert (np.abs(m.argmax(axis=1) - band) <= 1).all()


def _pyaudioanalysis(audio, window, step):
    """pyAudioAnalysis itself: (F, 68) float64 and the feature names."""
    from pyAudioAnalysis import ShortTermFeatures

    feats, names = ShortTermFeatures.feature_extraction(np.asarray(audio, np.float64), SR, window, step, deltas=True)
    return feats.T, names


def _assert_same_as_pyaudioanalysis(audio, window=8000, step=4800):
    ref, names = _pyaudioanalysis(audio, window, step)
    ours = F.short_term_features(audio, SR, window, step)
    assert ours.shape == ref.shape == (F.frame_count(len(audio), window / SR, step / SR), 68)
    for j, name in enumerate(names):  # every column, float64: equal to rounding (MFCCs: sum order of the filterbank)
        np.testing.assert_allclose(ours[:, j], ref[:, j], rtol=1e-7, atol=1e-10, err_msg=name)
    return ours, ref


def test_short_term_features_equal_pyaudioanalysis_on_demo_speech(demo_corpus_small):
    """The vectorised short-term features against pyAudioAnalysis' per-frame loop on real speech (demo corpus clips,
    as decoded and as looped to 6 s and 24 s), every column; the stored float32 frames are the same numbers."""
    clips = P.read_manifest(demo_corpus_small)
    for row in clips.groupby("identity").head(1).head(3).itertuples():
        audio, _ = P.decode(row.video, frame=False)
        for a in (audio, P.fit_length(audio, 6), P.fit_length(audio, 24)):
            _assert_same_as_pyaudioanalysis(a)
            ours, ref = F.pyaudio_features(a), F.pyaudio_features_reference(a)
            assert ours.dtype == ref.dtype == np.float32 and ours.shape == ref.shape
            np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-12)
    ours, _ = _assert_same_as_pyaudioanalysis(P.fit_length(audio, 24))
    assert (ours[0, 34:] == 0).all() and ours[:, 6].min() >= 0  # first delta and first flux 0, as the library's


def test_short_term_features_equal_pyaudioanalysis_with_silence_and_other_frames():
    """Exact-zero silence (after the library's DC removal a constant: frames with only a DC bin), a tone, a DC
    offset and a loud click (its max scaling), under several window/step settings (odd window, step > window, one
    frame); an all-zero signal (zero spectra: the library's eps branches); a signal shorter than one window fails
    in both."""
    rng = np.random.default_rng(4)
    t = np.arange(10 * SR) / SR
    audio = (0.05 * rng.normal(size=len(t)) + 0.2 * np.sin(2 * np.pi * 440 * t) + 0.3).astype(np.float32)
    audio[: SR // 2] = 0
    audio[3 * SR : 5 * SR] = 0
    audio[-SR:] = 0
    audio[7 * SR] = 0.99
    ours, _ = _assert_same_as_pyaudioanalysis(audio)
    gap = [k for k in range(len(ours)) if 3 * SR <= k * 4800 <= 5 * SR - 8000]  # frames wholly in the 3-5 s gap
    assert len(gap) == 6 and (ours[gap, 0] == 0).all() and (ours[gap, 7] == 0).all()  # DC only: no zcr, rolloff 0
    for window, step in [(800, 400), (801, 333), (1024, 2048), (10 * SR, 1)]:
        _assert_same_as_pyaudioanalysis(audio, window, step)
    _assert_same_as_pyaudioanalysis(np.zeros(SR, np.float32))
    for extract in (lambda a: _pyaudioanalysis(a, 8000, 4800), lambda a: F.short_term_features(a, SR, 8000, 4800)):
        with pytest.raises(ValueError):
            extract(np.ones(7999, np.float32))


def test_resemblyzer_batched_equals_embed_utterance():
    backend = SM.speaker_backend("resemblyzer")
    rng = np.random.default_rng(1)
    audio = backend.prepare((0.05 * rng.normal(size=7 * SR)).astype(np.float32))
    whole, win, bounds = SM.speaker_embeddings(audio, backend, [[3, 1], [6, 2], [12, 4]])
    assert win.shape == (len(bounds), 256) == (5 + 1 + 1, 256)
    assert np.allclose(whole, backend.model.embed_utterance(audio), atol=1e-5)
    for (s, n), e in zip(bounds, win):
        assert np.allclose(e, backend.model.embed_utterance(audio[s : s + n]), atol=1e-5)


def test_same_voice_is_closer_than_different_voices(demo_corpus_small):
    """Two clips of one demo voice vs clips of other voices (real speech from the demo corpus)."""
    clips = P.read_manifest(demo_corpus_small)
    backend = SM.speaker_backend("resemblyzer")
    ids = clips.identity.unique()[:3]
    emb = {}
    for ident in ids:
        for row in clips[clips.identity == ident].head(2).itertuples():
            audio, _ = P.decode(row.video, frame=False)
            emb[row.clip_id] = (ident, SM.speaker_embeddings(audio, backend, [], sliding=False)[0])
    keys = list(emb)
    for a in keys:  # the other clip of the same voice is the nearest of all clips
        cos = {b: float(emb[a][1] @ emb[b][1]) for b in keys if b != a}
        twin = next(b for b in cos if emb[b][0] == emb[a][0])
        others = [c for b, c in cos.items() if emb[b][0] != emb[a][0]]
        assert cos[twin] > max(others), (a, cos)


# ------------------------------------------------------------------ SpeechBrain from a local folder
def test_speechbrain_loads_an_ecapa_model_from_a_local_folder(ecapa_folders, tmp_path):
    """Issue 2: SpeechBrain loads an ECAPA model from a local folder the test writes (no hub access)."""
    from speechbrain.inference.classifiers import EncoderClassifier

    spk, _ = ecapa_folders
    model = EncoderClassifier.from_hparams(
        source=str(spk), savedir=str(tmp_path / "save"), overrides={"pretrained_path": str(spk)}
    )
    wav = (0.1 * np.random.default_rng(0).normal(size=SR)).astype(np.float32)
    with torch.no_grad():
        emb = model.encode_batch(torch.from_numpy(wav)[None]).squeeze().numpy()
    assert emb.shape == (192,)
    assert np.allclose(emb, _direct_ecapa(spk, wav)[0], atol=1e-5)


def test_speechbrain_backend_equals_direct_model_call(ecapa_folders, tmp_path):
    spk, _ = ecapa_folders
    backend = SM.speaker_backend("speechbrain", str(spk), tmp_path / "models")
    assert backend.describe() == {"backend": "speechbrain", "source": str(spk), "dim": 192}
    rng = np.random.default_rng(2)
    audio = (0.1 * rng.normal(size=3 * SR)).astype(np.float32)
    whole, win, bounds = SM.speaker_embeddings(audio, backend, [[1, 1], [2, 1]])
    assert win.shape == (3 + 2, 192) and whole.shape == (192,)
    assert np.allclose(whole, _direct_ecapa(spk, audio)[0], atol=1e-4)
    direct = _direct_ecapa(spk, np.stack([audio[s : s + n] for s, n in bounds[:3]]))  # the 1 s windows
    assert np.allclose(win[:3], direct, atol=1e-4)
    assert np.allclose(win[3], _direct_ecapa(spk, audio[: 2 * SR])[0], atol=1e-4)


def test_speechbrain_speaker_and_language_through_the_store(ecapa_folders, feature_run, tmp_path):
    spk, lang = ecapa_folders
    cfg, store = feature_run
    h = {s: params_hash(p) for s, p in F.stage_params(cfg).items()}
    mtimes = {c: store.path(c, "pyaudio").stat().st_mtime_ns for c in store.done("pyaudio", h["pyaudio"])}
    cfg2 = {
        **cfg,
        "features": {
            **cfg["features"],
            "speaker_backend": "speechbrain",
            "speaker_source": str(spk),
            "language": "speechbrain",
            "language_source": str(lang),
        },
    }
    cid = "id00001/ytA/00001"
    F.run(cfg2, clip_ids=[cid])
    audio = store.get(cid, "audio")["audio"]
    assert np.allclose(store.get(cid, "speaker")["embedding"], _direct_ecapa(spk, audio)[0], atol=1e-4)
    assert store.get(cid, "speaker_windows")["embedding"].shape == (8, 192)
    assert store.provenance("speaker")["model"]["backend"] == "speechbrain"
    logp = store.get(cid, "language")["logprobs"]
    assert logp.shape == (45,) and logp.dtype == np.float32
    code = store.clips().set_index("clip_id").loc[cid, "language"]
    assert code == list(SM.COMMONLANGUAGE_CODES.values())[int(np.argmax(logp))]
    # the classical features did not depend on the speaker backend: untouched
    assert {c: store.path(c, "pyaudio").stat().st_mtime_ns for c in mtimes} == mtimes
    # back to the module's parameters for the tests that follow
    F.run(cfg, clip_ids=[cid])
    store.update_labels(cid, language="fr")
    assert store.get(cid, "speaker")["embedding"].shape == (256,)


# ------------------------------------------------------------------ reruns, hashes, Dask
def test_changing_a_mel_parameter_recomputes_only_mel(feature_run, monkeypatch):
    cfg, store = feature_run
    done = set(store.clips(stage="preprocess").clip_id)
    stages = ("speaker", "speaker_windows", "pyaudio", "mel")
    before = {(c, s): store.path(c, s).stat().st_mtime_ns for c in done for s in stages}
    seen = []
    real = F.extract_clip
    monkeypatch.setattr(F, "extract_clip", lambda item, **kw: seen.append(tuple(item["stages"])) or real(item, **kw))
    F.run(cfg)
    assert seen == []  # nothing to do
    cfg2 = {**cfg, "features": {**cfg["features"], "n_mels": 16}}
    F.run(cfg2)
    assert seen == [("mel",)] * len(done)
    after = {(c, s): store.path(c, s).stat().st_mtime_ns for c in done for s in stages}
    assert all(after[k] == before[k] for k in before if k[1] != "mel")
    assert all(store.get(c, "mel")["frames"].shape[1] == 16 for c in done)
    F.run(cfg)  # restore
    assert all(store.get(c, "mel")["frames"].shape[1] == 32 for c in done)
    assert store.check() == []


def test_dask_run_gives_the_same_features(feature_run, tmp_path):
    from distributed import Client, LocalCluster

    cfg, store = feature_run
    other_root = tmp_path / "results"
    shutil.copytree(Results.of(cfg).store, other_root / "store")
    other = Store(other_root / "store")
    for s in ("speaker", "speaker_windows", "pyaudio", "mel"):
        other.clear_stage(s)
    cfg2 = {**cfg, "results": str(other_root)}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            F.run(cfg2, client=client)
    for s in ("speaker", "speaker_windows", "pyaudio", "mel"):
        cols = ["clip_id", "status", "params_hash"]
        pd.testing.assert_frame_equal(store.status(s)[cols], other.status(s)[cols])
        for cid in store.done(s, store.status(s).params_hash.iloc[0]):
            a, b = store.get(cid, s), other.get(cid, s)
            assert all(np.allclose(a[k], b[k], atol=1e-5) for k in a), (s, cid)


# ------------------------------------------------------------------ notebooks
@pytest.mark.slow
def test_papermill_runs_of_01_and_02_populate_the_store(demo_corpus_small, tmp_path):
    import papermill as pm

    full = pd.read_csv(demo_corpus_small, dtype=str, keep_default_na=False)
    manifest = tmp_path / "slice.csv"  # two clips per identity; media paths stay relative to the corpus
    full.groupby("identity").head(2).to_csv(manifest, index=False)
    data = {"manifest": str(manifest), "root": str(Path(demo_corpus_small).parent)}
    overrides = {"results": str(tmp_path / "results"), "data": data, "preprocess": {"audio_seconds": 3}}
    params = {"params_file": "params/demo.yaml", "system": None, "overrides": overrides}
    for name in ("01_preprocess", "02_extract_features"):
        # from notebooks/ (papermill's cwd) while the params file path is relative to the project root
        pm.execute_notebook(
            ROOT / "notebooks" / f"{name}.ipynb",
            tmp_path / f"{name}.ipynb",
            parameters=params,
            cwd=str(ROOT / "notebooks"),
            kernel_name="python3",
            progress_bar=False,
        )
    store = Store(tmp_path / "results" / "store")
    n = len(pd.read_csv(manifest))
    assert len(store.clips()) == n == 2 * full.identity.nunique()
    done = set(store.clips(stage="preprocess").clip_id)
    assert len(done) == n, store.rejects()
    for s in ("speaker", "speaker_windows", "pyaudio", "mel"):
        assert set(store.clips(stage=s).clip_id) == done, s
    cfg = load_params("params/demo.yaml", overrides)
    assert store.root == Results.of(cfg).store
