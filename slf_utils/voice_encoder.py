"""Speech2Face (Oh et al., CVPR 2019) on the SLF bench, its data side and its voice encoder (notebook 06).

Speech2Face is voice encoder -> face embedding -> face decoder. This module makes the two store stages the rest of
the system reads and trains the encoder between them; the face decoder and the systems that draw faces from the
predicted embedding live elsewhere.

Store stages (both key `embedding`, (D,) float32, one row per clip, train and test):
* `face_embedding` — the face recogniser's embedding of each clip's real stored face (`preprocess`/`face`), by
  `speech2face.face_model` through recognisers.face_embedder (`Dlib`, 128-d, offline with the weights shipped by
  face-recognition-models; `VGG-Face`, 4096-d, as the paper; `eigenfaces` for tiny synthetic faces). Detection and
  upscaling follow `evaluate.detector_backend` / `evaluate.upscale_to`, like the evaluation's gallery. A face the
  recogniser cannot find (deepface's `detected` flag False) is rejected with the reason; an unexpected error is
  recorded and retried on the next run. `run_face_embeddings`.
* `voice_face_embedding` — the trained encoder's prediction for every clip with its inputs: the L2-normalised
  output scaled to the median norm of the training faces' embeddings (the loss fixes only its direction; the scale
  keeps it where a decoder trained on real embeddings expects it). Its parameter hash includes the model's hash, so
  a retrained model rewrites it. `run`. Cross-fitted (`crossfit`): a training clip's prediction comes from an encoder
  trained without its fold (`model/fold<i>/`), held-out clips' from the encoder trained on every training clip, so a
  model trained downstream on this stage sees inputs as far from the truth as the ones it is tested on (in-sample, an
  MLP reproduces its training targets almost exactly: it would train on Face-to-Face's input and be tested on
  Speech-to-Face's). Layout normalisation is then fitted on those cross-fitted values too. With identity folds the
  cross-fitting is nested (encoder_stage.fold_models): fold k's models read `voice_face_embedding.fold<k>`, whose
  every value comes from an encoder that never saw fold k (its own clips from the encoder without fold k, a clip of
  fold j from the one without folds j and k), its provenance naming each encoder's folds and training identities.

Voice encoder backends (`speech2face.voice_encoder.backend`), all trained from the training split's clips that have
a face embedding:
* `mlp` — the stored speaker embeddings (`speaker`, and/or the mean of `speaker_windows`), standardised on the
  training clips, through Linear-ReLU-Dropout-Linear. Cheap: the default, and what a CPU demo can afford.
* `ve_conv` — the paper's convolutional voice encoder (its Table 1) on a `seconds`-long window of the `audio` stage
  (random in training, the clip's start for predictions; a shorter clip loops): STFT with a 25 ms Hann window,
  10 ms hop, 512 points; `power_law` input (the paper's: real and imaginary parts, each sgn(x)|x|^0.3) or
  `log_mel`; 4x4 conv-ReLU-BN blocks of `channels` widths, 2x1 max-pooling in time after each block but the first
  two and the last two, stride 2 in the last two, average over time, then FC `hidden` -> FC D. The paper's widths
  are 64 64 128 128 128 256 512 512 with 4096-wide FCs; the default is a quarter of that, trained from scratch.
* `ast` — transformers' Audio Spectrogram Transformer (`ASTModel.from_pretrained(ast_source)`, a hub id or a local
  folder written by `save_pretrained`; an `ASTForAudioClassification` folder loads too, its classifier ignored)
  with a regression head LayerNorm-Linear to D on its pooled output, fine-tuned (`ast_freeze`: the head only), as
  the seed project's best encoder. Its feature extractor comes from the folder, else from the model's config.

Loss: `speech2face_loss`, the paper's terms with their weights as parameters. Only the embedding terms are available
here (l2 of the normalised vectors is the paper's lambda_1 term); the decoder-activation and classifier-distillation
terms are implemented but need the face decoder's first layer and a face classifier over identities, which the
encoder's training does not have (Dlib has no classifier head), so their weights must stay 0.

Evaluation of the encoder on its own (`evaluate`): for each split, the queries are the predicted embeddings of its
clips, the gallery the real-face embeddings of every clip of the split with one (a gallery clip without a prediction
is a miss); recall@k of the speaker's identity under the bench's two protocols (`paper`: the whole gallery;
`identity`: the query's own face left out), with identity-cluster bootstrap intervals, exact chance (the expected
recall of a random ordering of the gallery each query is ranked in, retrieval.chance_hits) and the mean
cosine between a prediction and its own face's embedding. The ceiling rows (system `real_face_embedding`) query with
each real face's own embedding, as a perfect encoder would: 1 under `paper`, the recogniser's own identity recall
under `identity`. Written to `results/<grid>/voice_encoder/metrics.csv` (tables.METRIC_COLUMNS plus `split`) beside
`hits.csv` and `provenance.json`; the model, its loss curve and its provenance are in `voice_encoder/model/`.
"""

from __future__ import annotations

import json
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from slf_utils import encoder_stage as S
from slf_utils import recognisers, retrieval, tables
from slf_utils.basics import default, exists, params_hash, provenance, resolve
from slf_utils.folds import per_fold_gallery, training_clips
from slf_utils.preprocessing import SAMPLE_RATE
from slf_utils.results import Results
from slf_utils.store import AUDIO_STAGE, Store, open_store

FACE_STAGE = "face_embedding"
VOICE_STAGE = "voice_face_embedding"
SYSTEM = "voice_encoder"
CEILING = "real_face_embedding"  # each real face's own embedding as the query: what a perfect encoder would score
BACKENDS = ("mlp", "ve_conv", "ast")
AST_HUB = "MIT/ast-finetuned-audioset-10-10-0.4593"
N_FFT, WIN, HOP = 512, 400, 160  # the paper's STFT at 16 kHz: 25 ms Hann window, 10 ms hop, 512-point FFT
# the parameters each backend's model depends on (besides the common ones): only these enter its hash
COMMON_KEYS = ("backend", "dropout", "steps", "batch_size", "lr", "weight_decay", "seed", "loss")
BACKEND_KEYS = {
    "mlp": ("inputs", "hidden"),
    "ve_conv": ("channels", "spectrogram", "n_mels", "seconds", "hidden"),
    "ast": ("ast_source", "ast_freeze", "seconds"),
}


def _version(pkg):
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------- face embeddings
def make_face_embedder(cfg, store) -> recognisers.FaceEmbedder:
    """The recogniser of `speech2face.face_model`, with the evaluation's detector, upscaling and eigenfaces settings
    (eigenfaces are fitted on the store's real training faces)."""
    ev = {**cfg["evaluate"], "face_model": cfg["speech2face"]["face_model"]}
    return recognisers.make_embedder({**cfg, "evaluate": ev}, store)


def face_embedding_params(store: Store, embedder: recognisers.FaceEmbedder) -> dict:
    """What the stage's arrays depend on: the recogniser (name, detector, upscaling, deepface version; the eigenfaces
    fit) and the stored faces (the preprocess stage's parameter hash)."""
    recogniser = {k: v for k, v in embedder.describe().items() if k != "embedding_dim"}
    recogniser["deepface_version"] = _version("deepface") if embedder.name not in recognisers.FITTED else None
    return {"recogniser": recogniser, "preprocess": store.provenance("preprocess").get("params_hash")}


def _embed_chunk(embedder, ids, faces):
    """[(clip ids, embeddings, detected)] and {clip id: error} of one chunk; a failing chunk is retried face by
    face so that one bad image costs one clip."""
    try:
        return [(ids, *embedder.embed(list(faces)))], {}
    except Exception:
        out, errors = [], {}
        for cid, face in zip(ids, faces):
            try:
                out.append(([cid], *embedder.embed([face])))
            except Exception as e:  # recorded and retried next run; the other faces carry on
                errors[cid] = f"error: {type(e).__name__}: {e}"
        return out, errors


def run_face_embeddings(cfg, store: Store | None = None, log=print) -> dict:
    """The `face_embedding` stage for every clip with a preprocessed face, train and test, where it is missing or
    its parameters changed. Returns a summary: face_model, embedding_dim, params_hash, computed (this run), done,
    rejected (with these parameters), seconds."""
    t0 = time.time()
    store = store if exists(store) else open_store(cfg)
    clips = store.clips(stage="preprocess")
    if clips.empty:
        raise RuntimeError(f"{store}: no preprocessed clips: run notebook 01 first")
    embedder = make_face_embedder(cfg, store)
    p = face_embedding_params(store, embedder)
    h = params_hash(p)
    finished = store.finished(FACE_STAGE, h)
    todo = [c for c in clips["clip_id"] if c not in finished]
    reason = f"{embedder.name}: no face found in the stored crop ({embedder.info.get('detector_backend')} detector)"
    if todo:
        log(f"{FACE_STAGE}: {len(todo)} of {len(clips)} faces to embed with {embedder.name}")
    for start in range(0, len(todo), S.CHUNK):
        ids = todo[start : start + S.CHUNK]
        faces = store.load_stacked("preprocess", ids, keys=["face"])["face"]
        results, errors = _embed_chunk(embedder, ids, faces)
        for rid, emb, det in results:
            store.put_many(FACE_STAGE, [(c, {"embedding": e}) for c, e, d in zip(rid, emb, det) if d], h)
            for c in (c for c, d in zip(rid, det) if not d):
                store.reject(c, FACE_STAGE, reason, h)
        for c, why in errors.items():
            store.reject(c, FACE_STAGE, why, h, retry=True)
    done = store.done(FACE_STAGE, h)
    dim = embedder.dim
    if dim is None and done:  # nothing embedded in this run: the dimension of a stored embedding
        dim = int(store.get(next(iter(done)), FACE_STAGE)["embedding"].shape[0])
    summary = {
        "stage": FACE_STAGE,
        "face_model": embedder.name,
        "embedding_dim": dim,
        "params_hash": h,
        "computed": len(todo),
        "done": len(done),
        "rejected": len(store.finished(FACE_STAGE, h) - done),
        "seconds": round(time.time() - t0, 2),
    }
    prov = {"params": p, "deepface_version": _version("deepface"), "clips_processed": len(todo), **summary}
    store.set_provenance(FACE_STAGE, provenance(prov))
    if todo:
        log(f"{FACE_STAGE}: {summary['done']} done, {summary['rejected']} rejected, {dim}-d, {summary['seconds']} s")
    return summary


# ---------------------------------------------------------------------------------------------- loss
def speech2face_loss(pred, target, weights: dict, decoder_layer=None, classifier=None):
    """The Speech2Face loss (Oh et al. 2019, Eq. 1) of predicted face embeddings `pred` (B, D) against the real
    faces' embeddings `target` (B, D), each term averaged over the batch. Returns (total, {term: value}).

    With p = pred/|pred| and t = target/|target| (L2-normalised):
    * `l1`: sum_d |p - t|; `l2`: sum_d (p - t)^2 (the paper's lambda_1 term, 0.025 beside its decoder term);
      `cosine`: 1 - p.t (= l2 / 2 for unit vectors).
    * `decoder`: sum |dec(pred) - dec(target)|, the L1 distance of the face decoder's first-layer activations
      (`decoder_layer`: a module or function of raw embeddings), the paper's main term (weight 1).
    * `classifier`: the distillation loss -sum_i softmax(c(target)/T)_i log softmax(c(pred)/T)_i of a face
      classifier's logits (`classifier`), T = weights['temperature'] (the paper: lambda_2 = 200, T = 2).
    A term of weight 0 is not computed; a positive weight without its network is an error."""
    p, t = F.normalize(pred, dim=1), F.normalize(target, dim=1)
    parts = {}
    if weights.get("l1", 0):
        parts["l1"] = (p - t).abs().sum(1).mean()
    if weights.get("l2", 0):
        parts["l2"] = ((p - t) ** 2).sum(1).mean()
    if weights.get("cosine", 0):
        parts["cosine"] = (1 - (p * t).sum(1)).mean()
    for term, net in (("decoder", decoder_layer), ("classifier", classifier)):
        if weights.get(term, 0) and net is None:
            raise ValueError(f"loss.{term} = {weights[term]} needs the face {term} network; none was given")
    if weights.get("decoder", 0):
        parts["decoder"] = (decoder_layer(pred) - decoder_layer(target).detach()).abs().sum(1).mean()
    if weights.get("classifier", 0):
        temp = float(weights.get("temperature", 2.0))
        teacher = F.softmax(classifier(target).detach() / temp, dim=1)
        parts["classifier"] = -(teacher * F.log_softmax(classifier(pred) / temp, dim=1)).sum(1).mean()
    total = sum(weights[k] * v for k, v in parts.items())
    return total, parts


def check_loss(ve: dict):
    """The decoder and classifier terms need networks the encoder's training does not have here."""
    for term, what in (("decoder", "the face decoder's first layer"), ("classifier", "a face classifier")):
        if ve["loss"][term]:
            raise ValueError(
                f"speech2face.voice_encoder.loss.{term} = {ve['loss'][term]}: this term needs {what}, which is not "
                "available when the voice encoder trains (a Dlib recogniser has no classifier head); set it to 0"
            )


# ---------------------------------------------------------------------------------------------- models
class MLPEncoder(nn.Module):
    """Stored speaker embedding(s) -> face embedding: standardised (training statistics, kept as buffers), then
    Linear-ReLU-Dropout-Linear."""

    def __init__(self, n_in: int, out_dim: int, hidden: int = 512, dropout: float = 0.0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_in))
        self.register_buffer("std", torch.ones(n_in))
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def spectrogram(audio: torch.Tensor, kind: str = "power_law", n_mels: int = 64) -> torch.Tensor:
    """(B, N) 16 kHz audio -> (B, C, T, F) with T = 1 + N // 160: `power_law`, the paper's input, C = 2 (real and
    imaginary parts of the STFT, each compressed to sgn(x)|x|^0.3), F = 257; `log_mel`, C = 1, ln(mel power + 1e-6),
    F = n_mels."""
    window = torch.hann_window(WIN, device=audio.device)
    s = torch.stft(audio, N_FFT, HOP, WIN, window=window, center=True, return_complex=True).transpose(1, 2)
    if kind == "power_law":
        parts = torch.stack([s.real, s.imag], 1)
        return parts.sign() * parts.abs().pow(0.3)
    if kind != "log_mel":
        raise ValueError(f"spectrogram must be power_law or log_mel, got {kind!r}")
    import torchaudio.functional as AF

    fb = AF.melscale_fbanks(N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, n_mels, SAMPLE_RATE).to(audio.device)
    return torch.log(s.abs().pow(2) @ fb + 1e-6).unsqueeze(1)


def _as_tensor(batch: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))


class VEConv(nn.Module):
    """The Speech2Face voice encoder (the paper's Table 1) on raw audio: spectrogram, 4x4 conv-ReLU-BN blocks (2x1
    max-pooling in time after each block but the first two and the last two, stride 2 in the last two), average
    over time, FC-ReLU-Dropout-FC. With the paper's eight widths this is its layer list."""

    featurize = staticmethod(_as_tensor)  # a batch of audio windows -> the forward's input

    def __init__(self, out_dim, channels, hidden=512, dropout=0.0, spectrogram="power_law", n_mels=64):
        super().__init__()
        self.kind, self.n_mels = spectrogram, n_mels
        in_ch, n_freq = (2, N_FFT // 2 + 1) if spectrogram == "power_law" else (1, n_mels)
        layers, prev, n = [nn.BatchNorm2d(in_ch, affine=False)], in_ch, len(channels)
        for i, c in enumerate(channels):
            if n > 2 and i >= n - 2:
                layers.append(nn.Conv2d(prev, c, 4, stride=2, padding=1))  # halves both axes
                n_freq //= 2
            else:
                layers += [nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(prev, c, 4)]  # "same" for an even kernel
            layers += [nn.ReLU(), nn.BatchNorm2d(c)]
            if 2 <= i < n - 2:
                layers.append(nn.MaxPool2d((2, 1), ceil_mode=True))
            prev = c
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Sequential(
            nn.Linear(prev * n_freq, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
        )

    def forward(self, audio):
        h = self.conv(spectrogram(audio, self.kind, self.n_mels)).mean(dim=2)  # AVGPOOL over time
        return self.fc(h.flatten(1))


class ASTEncoder(nn.Module):
    """An Audio Spectrogram Transformer with a regression head (LayerNorm, Dropout, Linear to D) on its pooled
    output, its input the feature extractor `fe`'s (`featurize`). `freeze`: only the head trains (the transformer
    stays in eval mode)."""

    def __init__(self, ast, fe, out_dim, dropout=0.0, freeze=False):
        super().__init__()
        self.ast, self.freeze, self.featurize = ast, freeze, _ast_featurize(fe)
        h = ast.config.hidden_size
        self.head = nn.Sequential(nn.LayerNorm(h), nn.Dropout(dropout), nn.Linear(h, out_dim))
        if freeze:
            self.ast.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze:
            self.ast.eval()
        return self

    def forward(self, input_values):
        return self.head(self.ast(input_values=input_values).pooler_output)


def load_ast(source=None):
    """(ASTModel, ASTFeatureExtractor) from a hub id or a local folder (relative paths against the project root).
    A folder without a preprocessor_config.json gets the feature extractor of the model's config."""
    from transformers import ASTFeatureExtractor, ASTModel

    source = source or AST_HUB
    local = resolve(source)
    src = str(local) if local.is_dir() else str(source)
    try:
        ast = ASTModel.from_pretrained(src)
    except OSError as e:
        raise RuntimeError(
            f"speech2face.voice_encoder.ast_source {source!r}: cannot load an AST model ({e}). Offline "
            "(SLF_OFFLINE=1) it must be a local folder written by save_pretrained"
        ) from e
    try:
        fe = ASTFeatureExtractor.from_pretrained(src)
    except OSError:
        fe = ASTFeatureExtractor(num_mel_bins=ast.config.num_mel_bins, max_length=ast.config.max_length)
    return ast, fe


def _ast_featurize(fe):
    def featurize(batch: np.ndarray) -> torch.Tensor:
        return fe(list(batch), sampling_rate=SAMPLE_RATE, return_tensors="pt")["input_values"]

    return featurize


def build_encoder(meta: dict) -> nn.Module:
    """The encoder of a model's meta (randomly initialised: load its state dict next)."""
    b = meta["backend"]
    if b == "mlp":
        return MLPEncoder(meta["n_in"], meta["out_dim"], meta["hidden"], meta["dropout"])
    if b == "ve_conv":
        args = (meta["channels"], meta["hidden"], meta["dropout"], meta["spectrogram"], meta["n_mels"])
        return VEConv(meta["out_dim"], *args)
    if b == "ast":
        from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

        ast = ASTModel(ASTConfig.from_dict(meta["ast_config"]))
        fe = ASTFeatureExtractor.from_dict(meta["ast_features"])
        return ASTEncoder(ast, fe, meta["out_dim"], meta["dropout"], meta["ast_freeze"])
    raise ValueError(f"speech2face.voice_encoder.backend must be one of {', '.join(BACKENDS)}, got {b!r}")


def new_encoder(ve: dict, out_dim: int, n_in: int | None = None):
    """(model, meta) of a fresh encoder for the voice_encoder parameters `ve`; an AST starts from its
    pretrained weights."""
    meta = {"backend": ve["backend"], "out_dim": int(out_dim), "dropout": ve["dropout"]}
    meta.update({k: ve[k] for k in BACKEND_KEYS[ve["backend"]]})
    if ve["backend"] == "mlp":
        meta["n_in"] = int(n_in)
    if ve["backend"] == "ast":
        ast, fe = load_ast(ve["ast_source"])
        meta["ast_config"] = json.loads(ast.config.to_json_string())
        meta["ast_features"] = fe.to_dict()
        return ASTEncoder(ast, fe, out_dim, ve["dropout"], ve["ast_freeze"]), meta
    return build_encoder(meta), meta


# ---------------------------------------------------------------------------------------------- inputs
def input_stages(ve: dict) -> list[str]:
    return list(ve["inputs"]) if ve["backend"] == "mlp" else [AUDIO_STAGE]


def audio_window(audio: np.ndarray, n: int, offset: int = 0) -> np.ndarray:
    """n samples from `offset`, the clip looped where it is shorter."""
    audio = np.asarray(audio, np.float32)
    if offset + n <= len(audio):
        return audio[offset : offset + n]
    return audio[(offset + np.arange(n)) % len(audio)]


class AudioInputs:
    """`seconds`-long windows of the clips' stored audio, read one clip at a time (the audio stage is never
    batched), the first `cache` clips kept in memory. In training (an rng given) each window starts at random."""

    def __init__(self, store: Store, clip_ids, seconds: float, featurize, cache: int = 1024):
        self.store, self.clip_ids, self.featurize = store, list(clip_ids), featurize
        self.n, self.cache, self._audio = int(round(seconds * SAMPLE_RATE)), cache, {}

    def __len__(self):
        return len(self.clip_ids)

    def audio(self, cid) -> np.ndarray:
        if cid in self._audio:
            return self._audio[cid]
        a = self.store.get(cid, AUDIO_STAGE)["audio"].astype(np.float32)
        if len(self._audio) < self.cache:
            self._audio[cid] = a
        return a

    def batch(self, idx, rng=None):
        windows = []
        for i in np.asarray(idx):
            a = self.audio(self.clip_ids[i])
            offset = int(rng.integers(0, max(1, len(a) - self.n + 1))) if rng is not None else 0
            windows.append(audio_window(a, self.n, offset))
        return (self.featurize(np.stack(windows)),)


def make_inputs(store, clip_ids, ve, model):
    if ve["backend"] == "mlp":
        return S.VectorInputs(S.vector_inputs(store, list(clip_ids), ve["inputs"]))
    return AudioInputs(store, clip_ids, ve["seconds"], model.featurize)


# ---------------------------------------------------------------------------------------------- training
def train_encoder(
    model, inputs, targets, ve, log=print, checkpoint=None, key=None, decoder_layer=None, classifier=None
) -> pd.DataFrame:
    """Adam on `speech2face_loss` for `ve['steps']` steps of `ve['batch_size']` clips (encoder_stage.train).
    Returns the loss per step (columns step, loss and each term)."""
    y = torch.from_numpy(np.ascontiguousarray(targets, np.float32))

    def batch_loss(idx, rng):
        return speech2face_loss(model(*inputs.batch(idx, rng)), y[idx], ve["loss"], decoder_layer, classifier)

    return S.train(model, ve, len(y), batch_loss, SYSTEM, log, checkpoint, key)


def scaled(pred: np.ndarray, scale: float) -> np.ndarray:
    """The stored prediction: direction of the encoder's output, length `scale` (the training faces' median
    embedding norm)."""
    return (pred / np.maximum(np.linalg.norm(pred, axis=1, keepdims=True), 1e-12) * scale).astype(np.float32)


def hashed_params(ve: dict) -> dict:
    return {k: ve[k] for k in (*COMMON_KEYS, *BACKEND_KEYS[ve["backend"]])}


def load_model(directory) -> tuple[nn.Module, dict]:
    """(model in eval mode, meta) of a trained encoder folder (`voice_encoder/model`)."""
    directory = Path(directory)
    meta = json.loads((directory / "meta.json").read_text())
    model = build_encoder(meta)
    model.load_state_dict(torch.load(directory / "encoder.pt", weights_only=True))
    return model.eval(), meta


def ensure_model(cfg, store: Store, face_hash: str, log=print, exclude=(), mdir=None):
    """Train the encoder on the training split's clips with a face embedding (of `face_hash`) and the inputs (less
    `exclude`: a cross-fitting fold), unless `mdir` (default `voice_encoder/model/`) holds one trained with the same
    parameters on the same arrays (encoder_stage.ensure_model). Returns (model, meta, loss per step, trained now)."""
    ve = cfg["speech2face"]["voice_encoder"]
    stages = input_stages(ve)
    faces = store.done(FACE_STAGE, face_hash)
    usable = S.clips_with(store, stages)
    mdir = Path(default(mdir, Results.of(cfg).encoder_model(SYSTEM)))
    train = training_clips(store, who=f"{SYSTEM} ({mdir.name})")  # the train split: never a gallery clip
    exclude = set(exclude)
    ids = [c for c in train["clip_id"] if c in faces and c in usable and c not in exclude]
    if not ids:
        raise RuntimeError(
            f"{store}: no training clip has both a face embedding and the encoder's inputs {stages} "
            "(run notebooks 01 and 02 first)"
        )
    key = params_hash({"encoder": hashed_params(ve), "data": S.data_fingerprint(store, [FACE_STAGE, *stages], ids)})
    idents = sorted(set(train.loc[train["clip_id"].isin(set(ids)), "identity"]))

    def fresh():
        targets = store.load_stacked(FACE_STAGE, ids, keys=["embedding"])["embedding"].astype(np.float32)
        x = S.vector_inputs(store, ids, ve["inputs"]) if ve["backend"] == "mlp" else None
        torch.manual_seed(ve["seed"])  # the initial weights too
        model, meta = new_encoder(ve, targets.shape[1], None if x is None else x.shape[1])
        if ve["backend"] == "mlp":
            model.mean.copy_(torch.from_numpy(x.mean(0)))
            model.std.copy_(torch.from_numpy(x.std(0) + 1e-6))
            inputs = S.VectorInputs(x)
        else:
            inputs = AudioInputs(store, ids, ve["seconds"], model.featurize)

        def fit(checkpoint):
            history = train_encoder(model, inputs, targets, ve, log, checkpoint, key)
            return history, {"scale": float(np.median(np.linalg.norm(targets, axis=1))), "face_stage_hash": face_hash}

        return model, meta, fit

    return S.ensure_model(mdir, key, ids, idents, load_model, fresh, hashed_params(ve), ve["backend"], SYSTEM, log)


def run_predictions(cfg, store: Store, models: dict, folds: dict, crossfit: dict, log=print) -> dict:
    """The `voice_face_embedding` stage for every clip with the encoder's inputs, train and test, where it is missing
    or was made by other models (`models`, `folds`: encoder_stage.fold_models), and its nested fold stages. Returns a
    summary (params_hash, computed, done, fold_stages)."""
    ve = cfg["speech2face"]["voice_encoder"]
    stages = input_stages(ve)
    meta = models[None][1]
    hashes = {S.key_label(f): m[1]["model_hash"] for f, m in models.items()}
    inputs = {s: S.input_hash(store, s) for s in stages}
    h = params_hash({"model": hashes, "folds": folds, "inputs": inputs})

    def with_fold(f, part):
        model, m = models[f][:2]
        return scaled(S.predict(model, make_inputs(store, part, ve, model), ve["batch_size"]), m["scale"])

    summary = {"model_hash": meta["model_hash"], "fold_model_hashes": hashes, "embedding_dim": meta["out_dim"]}
    prov = {"backend": ve["backend"], "train_hash": meta["train_hash"], "scale": meta["scale"], **crossfit}
    out = S.fill_stage(store, VOICE_STAGE, h, stages, lambda ids: S.routed(ids, folds, with_fold), summary, prov, log)
    args = (models, folds, lambda outer, key, part: with_fold(key, part), stages, {**summary, "inputs": inputs})
    out["fold_stages"] = S.write_fold_stages(cfg, store, VOICE_STAGE, *args, prov, log)
    return out


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate(cfg, store: Store, face_hash: str, voice_hash: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Embedding-space retrieval of each split (see the module's docstring, encoder_stage.evaluate): (metrics, hits),
    with a `split` column beside the tables' columns (tables.METRIC_COLUMNS)."""

    def gallery(ids, idents):  # the real faces' embeddings, per-fold galleries as notebook 04's
        faces = store.load_stacked(FACE_STAGE, ids, keys=["embedding"])["embedding"]
        return faces, retrieval.gallery_groups(cfg, store, idents)

    faces, metric = store.done(FACE_STAGE, face_hash), cfg["speech2face"]["voice_encoder"]["metric"]
    return S.evaluate(cfg, store, SYSTEM, CEILING, VOICE_STAGE, voice_hash, faces, gallery, metric)


def recall_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Notebook 06's view: per split and protocol, recall@k value [95 % CI], chance@1, the ceiling's recall@1 (the
    real face's own embedding as the query: under `paper` always 1, under `identity` what the recogniser itself
    gives), the mean cosine of a prediction to its own face's embedding, and the number of gallery clips."""
    out = []
    for split in (s for s in S.SPLITS if s in set(metrics["split"])):
        m = metrics[metrics["split"] == split]
        for p in retrieval.PROTOCOLS:
            view = tables.at_protocol(m[m["system"] == SYSTEM], p).set_index("metric")
            ceiling = m[(m["system"] == CEILING) & (m["protocol"] == p)].set_index("metric")
            out.append({"split": split, "protocol": p, **S.recall_row(view, ceiling)})
    return pd.DataFrame(out)


# ---------------------------------------------------------------------------------------------- notebook 06
def run(cfg, store: Store | None = None, log=print) -> dict:
    """Notebook 06: face embeddings, the voice encoder (trained or reused), its predictions for every clip, and its
    embedding-space retrieval under both protocols. Writes `voice_encoder/` (model/, metrics.csv, hits.csv,
    provenance.json). Returns {metrics, table, loss, face_embeddings, predictions, model (its meta), trained,
    model_dir}."""
    t0 = time.time()
    store = store if exists(store) else open_store(cfg)
    ve, mdir = cfg["speech2face"]["voice_encoder"], Results.of(cfg).encoder_model(SYSTEM)
    check_loss(ve)
    faces = run_face_embeddings(cfg, store, log)
    models, folds, crossfit = S.fold_models(
        cfg,
        store,
        lambda exclude, sub: ensure_model(cfg, store, faces["params_hash"], log, exclude, mdir / sub if sub else None),
        log,
    )
    _, meta, history, trained = models[None]
    predictions = run_predictions(cfg, store, models, folds, crossfit, log)
    metrics, hits = evaluate(cfg, store, faces["params_hash"], predictions["params_hash"])
    gallery = "real-face embeddings of the split's clips"
    gallery += ", each query ranked among its own identity fold's" if per_fold_gallery(cfg) else ""
    retrieval_ = {"metric": ve["metric"], "ks": recognisers.eval_params(cfg)["ks"], "gallery": gallery}
    prov = {"face_embeddings": faces, "predictions": predictions, "model": meta, "retrieval": retrieval_}
    S.write_results(cfg, SYSTEM, metrics, hits, prov, t0, log, ceiling=CEILING)
    return {
        "metrics": metrics,
        "table": recall_table(metrics),
        "loss": history,
        "face_embeddings": faces,
        "predictions": predictions,
        "model": meta,
        "trained": trained,
        "model_dir": str(mdir),
    }


def plot_training(result: dict):
    """Training loss per step (and a running mean) beside recall@k of both splits under the identity protocol,
    with intervals, the real faces' ceiling and chance."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    loss, ax = result["loss"], axes[0]
    if len(loss):
        S.plot_loss(ax, loss)
    ax.set(title=f"voice encoder ({result['model']['backend']}) training loss", xlabel="step", ylabel="loss")
    if len(loss) and (loss["loss"] > 0).all():
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    m = tables.at_protocol(result["metrics"], "identity")
    ceiling, m = m[m["system"] == CEILING], m[m["system"] == SYSTEM]
    ax = axes[1]
    for i, split in enumerate(s for s in S.SPLITS if s in set(m["split"])):
        S.plot_recall(ax, m[(m["split"] == split) & m["metric"].str.startswith("recall@")], i, label=split)
        c = m[(m["split"] == split) & m["metric"].str.startswith("chance@")]
        ax.plot(S.at_k(c, "chance@"), c["value"], ":", color=f"C{i}")
        c = ceiling[ceiling["split"] == split]
        ax.plot(S.at_k(c, "recall@"), c["value"], "--", color=f"C{i}", lw=0.8)
    S.finish_recall(ax, "recall@k, identity protocol\n(dashed: real faces as queries, dotted: chance)")
    return fig
