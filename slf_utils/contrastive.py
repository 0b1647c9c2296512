"""SCLDM-style contrastive pre-training of a speech encoder and a face encoder (notebook 07), and the aligned speech
embedding as a store stage.

SCLDM (seeds/scldm-abstract.txt) pre-trains its speech encoder and its face encoder contrastively, so that what a
voice says about a face (age, gender, identity) lies in a space shared with the face, and conditions its diffusion
model on the speech side. Here the pair is trained on the training split with CLIP's loss, the aligned speech
embedding of every clip becomes a store stage, and a layout constituent puts it in the feature matrix (system
`contrastive_speech`), comparable with `speaker_embeddings_only` (the raw speaker embedding in the same model).

Encoders (`contrastive.*`):
* speech (`speech_encoder`): `mlp`, the stored speaker embeddings (`speech_inputs`: `speaker` and/or the mean of
  `speaker_windows`), standardised on the training clips, through Linear-ReLU-Dropout-Linear (the voice encoder's
  MLPEncoder); or `mel_conv`, the stored log-mel frames (`mel`/`frames`, standardised per bin) through 1-d
  convolutions in time (`mel_channels`, kernel 3, ReLU), a mean over the clip's valid frames and the same head.
* face (`face_encoder`): `cnn`, a small CNN trained from scratch on the stored face (`preprocess`/`face`) downsized
  to `face_px` (conv3x3-BN-ReLU-maxpool blocks of `channels` widths, flattened, Linear-ReLU-Dropout-Linear; training
  faces flipped and shifted by up to 2 px when `augment`); or `recogniser`, the frozen recogniser embedding of the
  face (stage `face_embedding`, `speech2face.face_model`, computed with voice_encoder.run_face_embeddings) through a
  trainable projection head (the MLP above).
Both end in `dim` entries and are compared by cosine.

Loss (`info_nce`): CLIP's symmetric InfoNCE, logits = exp(s) * cos(speech_i, face_j) with a learnable logit scale
s = ln(1/temperature), initialised from `temperature`, clamped after every step to exp(s) <= `max_logit_scale` (CLIP:
100), the mean of the speech->face and face->speech cross-entropies. Positives (`positives`): `clip`, a clip's speech
and the same clip's face only (CLIP); `identity` (default), every face of the same identity in the batch, the target
spread evenly over them (a multi-positive InfoNCE, as supervised contrastive learning). The default is `identity`
because the bench asks whether a voice finds its speaker's face, and a clip has several siblings: with clip
positives, another clip of the same person in the batch is a negative, and the loss pushes apart the faces of one
person that retrieval should bring together (on the demo corpus, 7 training clips per identity over 40 identities:
a batch of 64 holds a sibling for most clips).

Store stage `contrastive_speech`, key `embedding` (D,) float32: the L2-normalised speech embedding of every clip
with the speech inputs, train and test. Its parameter hash includes the model's hash (and the inputs' hashes), so a
retrained model rewrites it and a reused one writes nothing. `run_speech_stage`.

Evaluation on its own (`evaluate`: encoder_stage.evaluate, as the voice encoder's): the queries are the speech
embeddings of a split's clips (read back from the stage), the gallery the face encoder's embeddings of every clip of
the split with a face; with identity folds each fold's queries are ranked among its own clips' faces, embedded by the
pair that never saw the fold (the space its queries are in). Ceiling rows (system `contrastive_face`): each face's
own embedding as the query. `recall_table` puts these rows beside the voice encoder's (`voice_encoder/metrics.csv`,
notebook 06) in one tidy table with a `method` column. The galleries differ (the contrastive face encoder's space, the
recogniser's space): both rank the same test clips' faces (same chance and N), each scored in its own space.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from slf_utils import encoder_stage as S
from slf_utils import recognisers, retrieval, stats, tables
from slf_utils import voice_encoder as V
from slf_utils.basics import exists, params_hash
from slf_utils.folds import identity_folds, n_folds
from slf_utils.folds import training_clips as training_split  # this module's training_clips adds the pair's inputs
from slf_utils.results import Results
from slf_utils.store import Store, open_store

STAGE = "contrastive_speech"
SYSTEM = "contrastive"
CEILING = "contrastive_face"  # each face's own face-encoder embedding as the query
FACE_IMAGE_STAGE = "preprocess"
MEL_STAGE = "mel"
SPEECH_ENCODERS = ("mlp", "mel_conv")
FACE_ENCODERS = ("cnn", "recogniser")
POSITIVES = ("identity", "clip")
# the parameters the model depends on: only these enter its hash (checkpoint_every does not)
COMMON_KEYS = (
    *("speech_encoder", "face_encoder", "dim", "hidden", "dropout", "positives", "temperature", "max_logit_scale"),
    *("steps", "batch_size", "lr", "weight_decay", "seed"),
)
ENCODER_KEYS = {"mlp": ("speech_inputs",), "mel_conv": ("mel_channels",), "cnn": ("face_px", "channels", "augment")}
TABLE_COLUMNS = ["method", "role", "embedding_space", "split", "protocol", "metric", "value", "ci_low", "ci_high", "n"]


def hashed_params(ct: dict) -> dict:
    keys = (*COMMON_KEYS, *ENCODER_KEYS.get(ct["speech_encoder"], ()), *ENCODER_KEYS.get(ct["face_encoder"], ()))
    return {k: ct[k] for k in keys}


# ---------------------------------------------------------------------------------------------- loss
def info_nce(speech, face, logit_scale, identities=None) -> tuple[torch.Tensor, dict]:
    """CLIP's symmetric InfoNCE of a batch of B speech embeddings (B, D) and the B faces of the same clips (B, D).

    logits[i, j] = exp(logit_scale) * cos(speech_i, face_j). Without `identities` the positive of speech i is face i
    (and of face j speech j): the loss is the mean over both directions of the cross-entropy with the diagonal as
    target. With `identities` (B labels) every pair of the same identity is positive and a row's target is spread
    evenly over its positives (the matrix is symmetric, so the same holds for the columns). Returns (loss,
    {speech_to_face, face_to_speech, temperature}), the two directions' losses and 1 / exp(logit_scale)."""
    s, f = F.normalize(speech, dim=1), F.normalize(face, dim=1)
    logits = logit_scale.exp() * s @ f.T
    if exists(identities):
        ids = torch.as_tensor(np.unique(np.asarray(identities), return_inverse=True)[1].ravel(), device=logits.device)
        pos = (ids[:, None] == ids[None, :]).to(logits.dtype)
    else:
        pos = torch.eye(len(s), dtype=logits.dtype, device=logits.device)
    target = pos / pos.sum(1, keepdim=True)
    s2f = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    f2s = -(target.T * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    parts = {"speech_to_face": s2f, "face_to_speech": f2s, "temperature": 1 / logit_scale.detach().exp()}
    return (s2f + f2s) / 2, parts


# ---------------------------------------------------------------------------------------------- models
class MelConv(nn.Module):
    """Log-mel frames (B, T, F) with their valid lengths (B,) -> (B, out_dim): per-bin standardisation (training
    statistics, buffers), 1-d convolutions in time (kernel 3, ReLU), the mean over the valid frames, then
    Linear-ReLU-Dropout-Linear. Padded frames are zeroed before each convolution, so a clip's embedding does not
    depend on the padding of the batch it is in."""

    def __init__(self, n_mels: int, out_dim: int, channels, hidden: int = 256, dropout: float = 0.0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_mels))
        self.register_buffer("std", torch.ones(n_mels))
        convs, prev = [], n_mels
        for c in channels:
            convs.append(nn.Conv1d(prev, c, 3, padding=1))
            prev = c
        self.convs = nn.ModuleList(convs)
        self.head = nn.Sequential(nn.Linear(prev, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))

    def forward(self, frames, lengths):
        mask = (torch.arange(frames.shape[1], device=frames.device)[None] < lengths[:, None]).to(frames.dtype)
        h = ((frames - self.mean) / self.std * mask[..., None]).transpose(1, 2)  # (B, F, T)
        for conv in self.convs:
            h = torch.relu(conv(h)) * mask[:, None]
        pooled = h.sum(2) / lengths.clamp(min=1)[:, None].to(h.dtype)
        return self.head(pooled)


class FaceCNN(nn.Module):
    """Faces (B, 3, px, px) in [0, 1] -> (B, out_dim): per-channel standardisation (training statistics, buffers),
    conv3x3-BN-ReLU-maxpool2 blocks, flattened (the layout of a small face matters), Linear-ReLU-Dropout-Linear."""

    def __init__(self, out_dim: int, channels, px: int = 32, hidden: int = 256, dropout: float = 0.0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(3, 1, 1))
        self.register_buffer("std", torch.ones(3, 1, 1))
        layers, prev, side = [], 3, px
        for c in channels:
            layers += [nn.Conv2d(prev, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            prev, side = c, side // 2
        self.conv = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(prev * side * side, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, faces):
        return self.head(self.conv((faces - self.mean) / self.std))


class ContrastivePair(nn.Module):
    """The speech encoder, the face encoder and CLIP's learnable logit scale, ln(1/temperature)."""

    def __init__(self, speech: nn.Module, face: nn.Module, temperature: float = 0.07):
        super().__init__()
        self.speech, self.face = speech, face
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / temperature))))


def build_pair(meta: dict) -> ContrastivePair:
    """A randomly initialised pair from a model's meta (load its state dict next)."""
    d, hidden, dropout = meta["dim"], meta["hidden"], meta["dropout"]
    if meta["speech_encoder"] == "mlp":
        speech = V.MLPEncoder(meta["n_speech_in"], d, hidden, dropout)
    elif meta["speech_encoder"] == "mel_conv":
        speech = MelConv(meta["n_speech_in"], d, meta["mel_channels"], hidden, dropout)
    else:
        raise ValueError(f"contrastive.speech_encoder must be one of {', '.join(SPEECH_ENCODERS)}")
    if meta["face_encoder"] == "cnn":
        face = FaceCNN(d, meta["channels"], meta["face_px"], hidden, dropout)
    elif meta["face_encoder"] == "recogniser":
        face = V.MLPEncoder(meta["n_face_in"], d, hidden, dropout)  # the projection head of the frozen embedding
    else:
        raise ValueError(f"contrastive.face_encoder must be one of {', '.join(FACE_ENCODERS)}")
    return ContrastivePair(speech, face, meta["temperature"])


def load_model(directory) -> tuple[ContrastivePair, dict]:
    """(pair in eval mode, meta) of a trained model folder (`contrastive/model`)."""
    directory = Path(directory)
    meta = json.loads((directory / "meta.json").read_text())
    model = build_pair(meta)
    model.load_state_dict(torch.load(directory / "pair.pt", weights_only=True))
    return model.eval(), meta


# ---------------------------------------------------------------------------------------------- inputs
def speech_stages(ct: dict) -> list[str]:
    return list(ct["speech_inputs"]) if ct["speech_encoder"] == "mlp" else [MEL_STAGE]


def face_stage(ct: dict) -> str:
    return V.FACE_STAGE if ct["face_encoder"] == "recogniser" else FACE_IMAGE_STAGE


class MelInputs:
    """Stored log-mel frames of some clips, zero-padded (N, T, F), with their lengths."""

    def __init__(self, frames: np.ndarray, lengths: np.ndarray):
        self.x = torch.from_numpy(np.ascontiguousarray(frames, np.float32))
        self.n = torch.from_numpy(np.asarray(lengths, np.int64))

    def __len__(self):
        return len(self.x)

    def batch(self, idx, rng=None):
        idx = np.asarray(idx)
        return self.x[idx], self.n[idx]


class FaceImages:
    """Stored faces downsized to `px` (uint8 in memory, 3 px^2 bytes a clip). In training (an rng given, `augment`)
    each face is flipped left-right with probability 1/2 and shifted by up to 2 px (edge-padded)."""

    def __init__(self, faces: np.ndarray, augment: bool = False):
        self.x = torch.from_numpy(np.ascontiguousarray(faces)).permute(0, 3, 1, 2).contiguous()  # (N, 3, px, px)
        self.augment = augment

    def __len__(self):
        return len(self.x)

    def batch(self, idx, rng=None):
        x = self.x[np.asarray(idx)].float() / 255
        if rng is None or not self.augment:
            return (x,)
        flip = rng.random(len(x)) < 0.5
        x[flip] = x[flip].flip(-1)
        px, pad = x.shape[-1], 2
        padded = F.pad(x, (pad,) * 4, mode="replicate")
        out = torch.empty_like(x)
        for i, (dy, dx) in enumerate(rng.integers(0, 2 * pad + 1, (len(x), 2))):
            out[i] = padded[i, :, dy : dy + px, dx : dx + px]
        return (out,)


def load_faces(store: Store, clip_ids, px: int) -> np.ndarray:
    """(N, px, px, 3) uint8: the stored faces area-averaged (antialiased bilinear) to px, CHUNK clips at a time."""
    out = np.zeros((len(clip_ids), px, px, 3), np.uint8)
    for start in range(0, len(clip_ids), S.CHUNK):
        ids = list(clip_ids[start : start + S.CHUNK])
        x = torch.from_numpy(store.load_stacked(FACE_IMAGE_STAGE, ids, keys=["face"])["face"]).permute(0, 3, 1, 2)
        if x.shape[-1] != px:
            x = F.interpolate(x.float(), size=(px, px), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + len(ids)] = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def speech_inputs(store: Store, clip_ids, ct: dict):
    if ct["speech_encoder"] == "mlp":
        return S.VectorInputs(S.vector_inputs(store, list(clip_ids), ct["speech_inputs"]))
    arr, lens = store.load_stacked(MEL_STAGE, list(clip_ids), with_lengths=True, keys=["frames"])
    return MelInputs(arr["frames"], lens["frames"])


def face_inputs(store: Store, clip_ids, ct: dict, augment: bool = False):
    if ct["face_encoder"] == "recogniser":
        return S.VectorInputs(store.load_stacked(V.FACE_STAGE, list(clip_ids), keys=["embedding"])["embedding"])
    return FaceImages(load_faces(store, list(clip_ids), ct["face_px"]), augment)


def with_face(store: Store, ct: dict, face_hash: str | None = None) -> set[str]:
    """Clips with the face encoder's input (of `face_hash`, the face_embedding stage's parameter hash, for the
    recogniser)."""
    if ct["face_encoder"] == "recogniser":
        return store.done(V.FACE_STAGE, face_hash)
    return S.clips_with(store, [FACE_IMAGE_STAGE])


def _standardise(module: nn.Module, inputs):
    """Set a fresh encoder's input statistics (buffers `mean`, `std`) from its training inputs."""
    if isinstance(inputs, FaceImages):
        x = inputs.x.float() / 255
        mean, std = x.mean((0, 2, 3)).view(3, 1, 1), x.std((0, 2, 3)).view(3, 1, 1)
    elif isinstance(inputs, MelInputs):
        valid = torch.arange(inputs.x.shape[1])[None] < inputs.n[:, None]
        frames = inputs.x[valid]
        mean, std = frames.mean(0), frames.std(0)
    else:
        mean, std = inputs.x.mean(0), inputs.x.std(0)
    module.mean.copy_(mean)
    module.std.copy_(std + 1e-6)


# ---------------------------------------------------------------------------------------------- training
def train_pair(model: ContrastivePair, speech, faces, identities, ct, log=print, checkpoint=None, key=None):
    """Adam on `info_nce` for `ct['steps']` steps of `ct['batch_size']` training clips (encoder_stage.train), the
    logit scale clamped to [0, ln max_logit_scale] after each step (CLIP). Returns the loss per step (step, loss,
    speech_to_face, face_to_speech, temperature)."""
    identities = np.asarray(identities)
    by_identity = ct["positives"] == "identity"
    max_scale = float(np.log(ct["max_logit_scale"]))

    def batch_loss(idx, rng):
        s = model.speech(*speech.batch(idx, rng))
        f = model.face(*faces.batch(idx, rng))
        return info_nce(s, f, model.logit_scale, identities[idx] if by_identity else None)

    @torch.no_grad()
    def clamp():
        model.logit_scale.clamp_(0, max_scale)

    args = (model, ct, len(identities), batch_loss, SYSTEM, log, checkpoint, key)
    return S.train(*args, after_step=clamp, shown=[("temperature", "T")])


def embed(encoder: nn.Module, inputs) -> np.ndarray:
    """(N, D) L2-normalised embeddings of every item of `inputs`, in order."""
    return S.predict(encoder, inputs, 256, unit=True)


def training_clips(cfg, store: Store, face_hash: str | None = None) -> tuple[list, list]:
    """(clip ids, identities) of the training split with both the speech inputs and the face input (of
    `face_hash`, the face_embedding stage's parameter hash, for the recogniser)."""
    usable = S.clips_with(store, speech_stages(cfg["contrastive"]))
    train = training_split(store, who=f"{SYSTEM} pair")  # the train split: never a gallery clip
    train = train[train["clip_id"].isin(usable & with_face(store, cfg["contrastive"], face_hash))]
    return train["clip_id"].tolist(), train["identity"].tolist()


def ensure_model(cfg, store: Store, face_hash: str | None = None, log=print, exclude=(), mdir=None):
    """Train the pair on the training split's clips with both inputs (less `exclude`: a cross-fitting fold), unless
    `mdir` (default `contrastive/model/`) holds one trained with the same parameters on the same arrays
    (encoder_stage.ensure_model). Returns (model, meta, loss per step, trained now)."""
    ct = cfg["contrastive"]
    ids, idents = training_clips(cfg, store, face_hash)
    exclude = set(exclude)
    ids, idents = [c for c in ids if c not in exclude], [i for c, i in zip(ids, idents) if c not in exclude]
    if len(ids) < 2:
        raise RuntimeError(
            f"{store}: {len(ids)} training clip(s) have both the speech inputs {speech_stages(ct)} and the face input "
            f"({face_stage(ct)}); contrastive training needs at least 2 (run notebooks 01 and 02 first)"
        )
    stages = [*speech_stages(ct), face_stage(ct)]
    key = params_hash({"pair": hashed_params(ct), "data": S.data_fingerprint(store, stages, ids)})
    mdir = Path(mdir) if exists(mdir) else Results.of(cfg).encoder_model(SYSTEM)

    def fresh():
        speech = speech_inputs(store, ids, ct)
        faces = face_inputs(store, ids, ct, augment=ct["augment"])
        meta = {k: ct[k] for k in ("speech_encoder", "face_encoder", "dim", "hidden", "dropout", "temperature")}
        meta.update({k: ct[k] for k in ("speech_inputs", "mel_channels", "face_px", "channels")})
        meta["n_speech_in"] = int(speech.x.shape[-1])
        meta["n_face_in"] = int(faces.x.shape[-1]) if ct["face_encoder"] == "recogniser" else None
        torch.manual_seed(ct["seed"])  # the initial weights too
        model = build_pair(meta)
        with torch.no_grad():
            _standardise(model.speech, speech)
            _standardise(model.face, faces)

        def fit(checkpoint):
            history = train_pair(model, speech, faces, idents, ct, log, checkpoint, key)
            return history, {
                "face_stage_hash": face_hash,
                "final_temperature": float(1 / model.logit_scale.detach().exp()),
            }

        return model, meta, fit

    what = f"{ct['speech_encoder']} speech + {ct['face_encoder']} face encoders"
    args = (load_model, fresh, hashed_params(ct), what, SYSTEM, log)
    return S.ensure_model(mdir, key, ids, sorted(set(idents)), *args, weights="pair.pt")


def stage_hash(store: Store, meta: dict) -> str:
    """The stage's parameter hash: the model's and its speech inputs' (their stages' parameter hashes)."""
    stages = speech_stages(meta)
    return params_hash({"model": meta["model_hash"], "inputs": {s: S.input_hash(store, s) for s in stages}})


ALIGN_CLIPS = 20_000  # at most this many clips fit a fold's rotation onto the full model's space


def _rotation(store: Store, src, dst, fit: list, meta: dict, rng) -> np.ndarray:
    """(D, D) orthogonal R taking pair `src`'s speech space onto pair `dst`'s (orthogonal Procrustes), fitted on the
    clips `fit` (at most ALIGN_CLIPS of them, drawn with `rng`): clips both pairs trained on."""
    fit = [fit[i] for i in np.sort(rng.permutation(len(fit))[:ALIGN_CLIPS])]
    inputs = speech_inputs(store, fit, meta)
    u, _, vt = np.linalg.svd(embed(src.speech, inputs).T @ embed(dst.speech, inputs))
    return (u @ vt).astype(np.float32)


def fold_rotations(store: Store, models: dict, folds: dict, seed: int = 0) -> dict:
    """{fold: (D, D) orthogonal R} of the closed set's cross-fitting folds: each fold pair learns a space of its own
    (only the cosines are trained), so its speech embeddings are rotated onto the full pair's, fitted on the clips
    that both trained on (the fold's training clips)."""
    full, meta = models[None][:2]
    usable = S.clips_with(store, speech_stages(meta))
    rng = np.random.default_rng(seed)
    return {
        f: _rotation(
            store, models[f][0], full, sorted(c for c, g in folds.items() if g != f and c in usable), meta, rng
        )
        for f in models
        if f is not None and not isinstance(f, tuple)
    }


def _unit(e: np.ndarray) -> np.ndarray:
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def run_speech_stage(cfg, store: Store, models: dict, folds: dict, crossfit: dict, log=print) -> dict:
    """The `contrastive_speech` stage for every clip with the speech inputs, train and test, where it is missing or
    was made by other models (`models`, `folds`: encoder_stage.fold_models). Closed set: a training clip's embedding
    from the pair that left its fold out, rotated onto the full pair's space (fold_rotations), a held-out clip's from
    the full pair. Identity folds: each clip's from the pair without its fold, in that pair's space (no pair that saw
    it is involved: notebook 07 ranks each fold's queries against that pair's faces); and the nested stages
    `contrastive_speech.fold<k>` fold k's models read: fold k's clips from the pair without fold k, a clip of fold j
    from the pair without folds j and k rotated onto the fold-k pair (fitted on the clips both trained on, none of
    fold k's). Returns a summary (params_hash, computed, done, fold_stages)."""
    meta = models[None][1]
    hashes = {S.key_label(f): m[1]["model_hash"] for f, m in models.items()}
    rotations = fold_rotations(store, models, folds, int(cfg["crossfit"]["seed"]))

    def with_fold(f, part):
        e = embed(models[f][0].speech, speech_inputs(store, part, meta))
        return e if f is None or isinstance(f, tuple) else _unit(e @ rotations[f])

    alignment = (
        "identity folds: each clip in the space of the pair without its fold (unrotated); fold stages: the pair "
        "without folds j and k rotated onto the pair without fold k (orthogonal Procrustes on clips both trained on)"
        if n_folds(cfg)
        else "each fold pair's speech space rotated onto the full pair's (orthogonal Procrustes)"
    )
    prov = {"speech_encoder": meta["speech_encoder"], "train_hash": meta["train_hash"], **crossfit}
    prov["alignment"] = alignment
    summary = {"model_hash": meta["model_hash"], "fold_model_hashes": hashes, "embedding_dim": meta["dim"]}
    sh, stages = stage_hash(store, meta), speech_stages(meta)
    h = params_hash({"stage": sh, "folds": folds, "models": hashes})
    out = S.fill_stage(store, STAGE, h, stages, lambda ids: S.routed(ids, folds, with_fold), summary, prov, log)
    nested = _nested_embedder(cfg, store, models, folds, meta)
    args = (models, folds, nested, stages, {**summary, "stage": sh}, prov, log)
    out["fold_stages"] = S.write_fold_stages(cfg, store, STAGE, *args)
    return out


def _nested_embedder(cfg, store: Store, models: dict, folds: dict, meta: dict):
    """predict_with(outer, key, ids) of encoder_stage.write_fold_stages: the speech embeddings of pair `key`, rotated
    onto the pair without fold `outer` where `key` is another (the rotation fitted once, on the training clips of the
    folds neither pair left out, seeded by crossfit.seed and the outer fold)."""
    usable = S.clips_with(store, speech_stages(meta))
    train = set(training_split(store, who=f"{SYSTEM} pair alignment")["clip_id"]) & usable
    rotations = {}

    def predict_with(outer, key, ids):
        e = embed(models[key][0].speech, speech_inputs(store, ids, meta))
        if key == (outer,):
            return e
        if (outer, key) not in rotations:
            fit = sorted(c for c in train if folds[c][0] not in key)
            rng = np.random.default_rng([int(cfg["crossfit"]["seed"]), outer, *key])
            rotations[outer, key] = _rotation(store, models[key][0], models[(outer,)][0], fit, meta, rng)
        return _unit(e @ rotations[outer, key])

    return predict_with


# ---------------------------------------------------------------------------------------------- evaluation
def _face_gallery(cfg, store: Store, model, ids, idents, ct, models) -> tuple[np.ndarray, list | None]:
    """(face-encoder embeddings of `ids`, groups): the pair's, or with identity folds each clip's by the pair without
    its fold (the space its queries are in), each query then ranked among its own fold's clips (groups)."""
    if not n_folds(cfg) or models is None:
        return embed(model.face, face_inputs(store, ids, ct)), None
    fold_of = identity_folds(cfg, store.clips())
    groups = [fold_of[i] for i in idents]
    out = None
    for k in sorted(set(groups)):
        at = [i for i, g in enumerate(groups) if g == k]
        e = embed(models[(k,)][0].face, face_inputs(store, [ids[i] for i in at], ct))
        out = np.zeros((len(ids), e.shape[1]), np.float32) if out is None else out
        out[at] = e
    return out, groups


def evaluate(cfg, store: Store, model: ContrastivePair, meta: dict, speech_hash: str, face_hash=None, models=None):
    """Speech -> face retrieval in the shared space for each split (see the module's docstring,
    encoder_stage.evaluate): (metrics, hits), with a `split` column beside the tables' columns. With identity folds
    and `models` (encoder_stage.fold_models'), each fold's queries are ranked against its own clips' faces in the
    space of the pair without that fold."""

    def gallery(ids, idents):
        return _face_gallery(cfg, store, model, ids, idents, cfg["contrastive"], models)

    faces = with_face(store, cfg["contrastive"], face_hash)
    return S.evaluate(cfg, store, SYSTEM, CEILING, STAGE, speech_hash, faces, gallery, unit=True)


def recall_table(cfg, metrics: pd.DataFrame | None = None) -> pd.DataFrame:
    """One tidy table of speech -> face embedding-space retrieval, the contrastive pair's rows beside the
    Speech2Face-style voice encoder's (notebook 06, `voice_encoder/metrics.csv`): columns TABLE_COLUMNS, `method`
    `contrastive` or `voice_encoder`, `role` `method` or `ceiling` (a real face's own embedding as the query:
    `contrastive_face`, `real_face_embedding`), `embedding_space` the gallery each is ranked in. `metrics`: the
    contrastive rows (default: read from `contrastive/metrics.csv`). Where the voice encoder has not run, its rows
    are absent and `table.attrs['missing']` says so (nothing is computed for it here)."""
    space = {"cnn": "contrastive face encoder (CNN)", "recogniser": "contrastive projection of the recogniser"}
    ct = cfg["contrastive"]
    path = Results.of(cfg).encoder(SYSTEM) / "metrics.csv"
    if metrics is None:
        metrics = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=S.METRICS_COLUMNS)
    parts, missing = [], []
    if len(metrics):
        parts.append(_tidy(metrics, SYSTEM, CEILING, space[ct["face_encoder"]]))
    else:
        missing.append(f"contrastive: {path} not found (run notebook 07)")
    ve = Results.of(cfg).encoder(V.SYSTEM) / "metrics.csv"
    if ve.exists():
        prov = ve.with_name("provenance.json")
        face_model = cfg["speech2face"]["face_model"]
        if prov.exists():
            face_model = json.loads(prov.read_text()).get("face_embeddings", {}).get("face_model", face_model)
        parts.append(_tidy(pd.read_csv(ve), V.SYSTEM, V.CEILING, f"face recogniser ({face_model})"))
    else:
        missing.append(f"voice_encoder: {ve} not found (run notebook 06): its rows are missing")
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=TABLE_COLUMNS)
    table.attrs["missing"] = missing
    return table


def _tidy(metrics: pd.DataFrame, system: str, ceiling: str, space: str) -> pd.DataFrame:
    m = metrics[metrics["system"].isin([system, ceiling])].copy()
    m["role"] = np.where(m["system"] == system, "method", "ceiling")
    m["method"] = system
    m["embedding_space"] = space
    return m[TABLE_COLUMNS].reset_index(drop=True)


def comparison(table: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Notebook 07's view of `recall_table`: one row per method and protocol of `split`, recall@k value [95 % CI],
    chance@1, the ceiling's recall@1, the mean cosine of a query to its own face and the gallery size."""
    out = []
    t = table[table["split"] == split]
    for method in dict.fromkeys(t["method"]):
        m = t[t["method"] == method]
        for p in retrieval.PROTOCOLS:
            view = tables.at_protocol(m[m["role"] == "method"], p).set_index("metric")
            ceiling = m[(m["role"] == "ceiling") & (m["protocol"] == p)].set_index("metric")
            row = {"method": method, "embedding_space": m["embedding_space"].iloc[0], "protocol": p}
            out.append({**row, **S.recall_row(view, ceiling)})
    return pd.DataFrame(out)


def differences(cfg, hits: pd.DataFrame | None = None) -> pd.DataFrame:
    """recall@k of the contrastive pair minus the voice encoder's on the same clips (per split, protocol and k),
    with a paired bootstrap interval over identities (stats.paired_difference): columns split, protocol,
    metric, difference, ci_low, ci_high, n. `hits`: the contrastive hits (default: `contrastive/hits.csv`). Empty
    where either method's hits are missing."""
    cols = ["split", "protocol", "metric", "difference", "ci_low", "ci_high", "n"]
    ve_path, ct_path = (Results.of(cfg).encoder(s) / "hits.csv" for s in (V.SYSTEM, SYSTEM))
    if hits is None and ct_path.exists():
        hits = pd.read_csv(ct_path)
    if hits is None or not ve_path.exists():
        return pd.DataFrame(columns=cols)
    ev = recognisers.eval_params(cfg)
    a = hits[hits["system"] == SYSTEM]
    b = pd.read_csv(ve_path)
    b = b[b["system"] == V.SYSTEM]
    keys = ["split", "protocol", "k", "clip_id"]
    m = a.merge(b, on=keys, suffixes=("_a", "_b"))
    rows = []
    for (split, protocol, k), g in m.groupby(["split", "protocol", "k"], sort=False):
        d = stats.paired_difference(g["hit_a"], g["hit_b"], g["identity_a"], ev["bootstrap"], ev["seed"])
        rows.append([split, protocol, f"recall@{k}", *d])
    return pd.DataFrame(rows, columns=cols)


# ---------------------------------------------------------------------------------------------- notebook 07
def run(cfg, store: Store | None = None, log=print) -> dict:
    """Notebook 07: (with `face_encoder: recogniser`, the face_embedding stage), the contrastive pair (trained or
    reused), the `contrastive_speech` stage for every clip, its speech -> face retrieval under both protocols and the
    table beside the voice encoder's. Writes `contrastive/` (model/, metrics.csv, hits.csv, provenance.json).
    Returns {metrics, table (tidy, recall_table), comparison (test split), differences (contrastive - voice
    encoder, paired), loss, stage, model (its meta), trained, model_dir, missing}."""
    t0 = time.time()
    store = store if exists(store) else open_store(cfg)
    ct = cfg["contrastive"]
    faces = V.run_face_embeddings(cfg, store, log) if ct["face_encoder"] == "recogniser" else None
    face_hash = faces["params_hash"] if faces else None
    mdir = Results.of(cfg).encoder_model(SYSTEM)
    models, folds, crossfit = S.fold_models(
        cfg,
        store,
        lambda exclude, sub: ensure_model(cfg, store, face_hash, log, exclude, mdir / sub if sub else None),
        log,
    )
    model, meta, history, trained = models[None]
    stage = run_speech_stage(cfg, store, models, folds, crossfit, log)
    metrics, hits = evaluate(cfg, store, model, meta, stage["params_hash"], face_hash, models)
    queries, gallery = f"the {STAGE} stage of the split's clips", "the face encoder's embeddings of the split's clips"
    retrieval_ = {"metric": "cosine", "ks": recognisers.eval_params(cfg)["ks"], "queries": queries, "gallery": gallery}
    prov = {"face_embeddings": faces, "stage": stage, "model": meta, "retrieval": retrieval_}
    S.write_results(cfg, SYSTEM, metrics, hits, prov, t0, log, what="speech->face ")
    table = recall_table(cfg, metrics)
    for note in table.attrs["missing"]:
        log(note)
    diff = differences(cfg, hits)
    return {
        "metrics": metrics,
        "table": table,
        "comparison": comparison(table),
        "differences": diff,
        "missing": table.attrs["missing"],
        "loss": history,
        "stage": stage,
        "face_embeddings": faces,
        "model": meta,
        "trained": trained,
        "model_dir": str(mdir),
    }


def plot_training(result: dict):
    """The InfoNCE loss per step (running mean) with the learned temperature, beside recall@k on the test split
    under the identity protocol of each method of the table, with intervals, chance and the ceilings."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    loss, ax = result["loss"], axes[0]
    if len(loss):
        S.plot_loss(ax, loss)
        tx = ax.twinx()
        tx.plot(loss["step"], loss["temperature"], color="C3", lw=1, label="temperature")
        tx.set_ylabel("temperature", color="C3")
    ax.set(title="contrastive pre-training: symmetric InfoNCE", xlabel="step", ylabel="loss")
    ax.legend(fontsize=8, loc="upper right")
    t = tables.at_protocol(result["table"], "identity")
    t = t[t["split"] == "test"]
    ax = axes[1]
    for i, method in enumerate(dict.fromkeys(t["method"])):
        m = t[t["method"] == method]
        r = m[(m["role"] == "method") & m["metric"].str.startswith("recall@")]
        S.plot_recall(ax, r, i, label=method, color=f"C{i}")
        c = m[(m["role"] == "ceiling") & m["metric"].str.startswith("recall@")]
        ax.plot(S.at_k(c, "recall@"), c["value"], "--", color=f"C{i}", lw=0.8)
        if i == 0:
            c = m[m["metric"].str.startswith("chance@")]
            ax.plot(S.at_k(c, "chance@"), c["value"], ":", color="0.4", label="chance")
    S.finish_recall(ax, "test speech->face recall@k, identity protocol\n(dashed: real faces as queries)")
    return fig
