"""Loading a trained diffusion model and sampling it (notebook 04): classifier-free guidance with the conditional and
null passes in one batch, a pass of several guidance scales at once with the noise of one call per scale, the face
prior and latent decoding undone.

* imagen-pytorch trains in continuous time: `timesteps` only sets how many steps sampling takes, so `sample(steps=)`
  changes it per call without retraining.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from pathlib import Path

import imagen_pytorch.imagen_pytorch as ip
import numpy as np
import torch
from imagen_pytorch import Unet

from slf_utils import autoencoder
from slf_utils.basics import exists
from slf_utils.diffusion import _cpu_state, _ema_weights, build_imagen, load_checkpoint, mode_of
from slf_utils.training_data import FacePrior


# ---------------------------------------------------------------------- loading and sampling
def load_model(model_dir, device=None):
    """(imagen, meta) from a model folder: weights_only checkpoint load; EMA weights (if trained with EMA) ride
    along as `imagen.ema_state` for `sample(use_ema=True)`, a face prior as `imagen.face_prior` and a latent
    autoencoder as `imagen.latent_codec` (both used by `sample`). meta: system, mode, keep, preset, steps, stats
    (normalisation statistics for `Layout.build`), face_prior (none, mean, attribute_mean), latent, provenance."""
    model_dir = Path(model_dir)
    ck = load_checkpoint(model_dir)
    imagen = build_imagen(ck["mode"], ck["preset"])
    for k, sd in ck["unets"].items():
        imagen.unets[int(k) - 1].load_state_dict(sd)
    imagen.ema_state = {int(k): _ema_weights(sd) for k, sd in ck.get("ema", {}).items()}
    imagen.face_prior = FacePrior.from_state(ck["face_prior"]) if ck.get("face_prior") else None
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    latent = ck["preset"].get("latent")
    imagen.latent_codec = autoencoder.load(model_dir / autoencoder.FILE, device) if latent else None
    imagen.to(device).eval()
    stats = {}
    if (model_dir / "norm_stats.npz").exists():
        with np.load(model_dir / "norm_stats.npz") as z:
            stats = {k: z[k] for k in z.files}
    prov = model_dir / "provenance.json"
    meta = {
        "system": ck["system"],
        "mode": ck["mode"],
        "keep": list(ck["keep"]),
        "preset": ck["preset"],
        "steps": {int(k): v for k, v in ck["steps"].items()},
        "stats": stats,
        "model_dir": str(model_dir),
        "has_ema": bool(imagen.ema_state),
        "face_prior": ck["preset"].get("face_prior", "none"),
        "latent": latent,
        "provenance": json.loads(prov.read_text()) if prov.exists() else {},
    }
    return imagen, meta


_CFG_MASK = threading.local()
_PROB_MASK_LIKE = ip.prob_mask_like


def _prob_mask_like(shape, prob, device):
    """imagen-pytorch draws its classifier-free-guidance keep mask here; during a batched guidance pass it is
    fixed: first half conditional, second half null."""
    mask = getattr(_CFG_MASK, "mask", None)
    if mask is not None and tuple(shape) == tuple(mask.shape):
        return mask.to(device)
    return _PROB_MASK_LIKE(shape, prob, device)


def _memoised(fn, same):
    """fn(x), recomputed only when x differs from the previous call's input (`same(last, x)` says when not)."""
    last = {}

    def call(x):
        if "x" not in last or not same(last["x"], x):
            last["x"], last["y"] = x, fn(x)
        return last["y"]

    return call


def _same_tensor(a, b):
    # inference tensors (torch.inference_mode) keep no version counter
    return a is b and (a.is_inference() or a._version == b._version)


def _equal_tensor(a, b):
    return a.shape == b.shape and (a is b or torch.equal(a, b))


def _guided_forward(
    unet, x, time_, *, cond_scale=1.0, remove_parallel_component=False, keep_parallel_frac=0.0, _doubled=None, **kwargs
):
    """Classifier-free guidance null + (cond - null) * s with the conditional and null passes in one batch.
    s = 1: conditional only; s = 0: null only (the feature rows are ignored exactly). In a pass of several scales
    (_ROWS.scales: one scale per row) each row gets its own s."""
    scales = getattr(_ROWS, "scales", None)
    if scales is not None and len(scales) == len(x):
        return _rowwise_guided_forward(unet, x, time_, scales, _doubled, **kwargs)
    if cond_scale == 1:
        return unet.forward(x, time_, **kwargs)
    if cond_scale == 0:
        return unet.forward(x, time_, cond_drop_prob=1.0, **kwargs)
    b = x.shape[0]

    def twice(t):
        return torch.cat((t, t)) if torch.is_tensor(t) and t.ndim and t.shape[0] == b else t

    def twice_kw(k, v):  # the feature rows, guide and noise level are the same tensors at every step: double once
        if _doubled is None or not torch.is_tensor(v):
            return twice(v)
        if k not in _doubled or not _same_tensor(_doubled[k][0], v):
            _doubled[k] = (v, twice(v))
        return _doubled[k][1]

    _CFG_MASK.mask = torch.cat((torch.ones(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)))
    try:
        out = unet.forward(twice(x), twice(time_), cond_drop_prob=0.5, **{k: twice_kw(k, v) for k, v in kwargs.items()})
    finally:
        _CFG_MASK.mask = None
    cond, null = out[:b], out[b:]
    return null + (cond - null) * cond_scale


_ROWS = threading.local()  # a pass of several scales: .scales (one per row), .noise (_TiledNoise)


def _rowwise_guided_forward(unet, x, time_, scales, _doubled, **kwargs):
    """Guidance with a scale per row: one forward of the conditional rows (s != 0) and the null rows (s != 1), then
    null + (cond - null) * s row by row (s = 1 rows are their conditional output, s = 0 rows their null output,
    exactly, as one call per scale gives them)."""
    cond, null = (scales != 0).nonzero().squeeze(1), (scales != 1).nonzero().squeeze(1)
    n = len(x)

    def pick(t):
        return torch.cat((t[cond], t[null])) if torch.is_tensor(t) and t.ndim and t.shape[0] == n else t

    def pick_kw(k, v):  # the feature rows, guide and noise level are the same tensors at every step: gather once
        if _doubled is None or not torch.is_tensor(v):
            return pick(v)
        if k not in _doubled or not _same_tensor(_doubled[k][0], v):
            _doubled[k] = (v, pick(v))
        return _doubled[k][1]

    _CFG_MASK.mask = torch.cat((torch.ones(len(cond), dtype=torch.bool), torch.zeros(len(null), dtype=torch.bool)))
    try:
        out = unet.forward(pick(x), pick(time_), cond_drop_prob=0.5, **{k: pick_kw(k, v) for k, v in kwargs.items()})
    finally:
        _CFG_MASK.mask = None
    c, u = out.new_zeros((n, *out.shape[1:])), out.new_zeros((n, *out.shape[1:]))
    c[cond], u[null] = out[: len(cond)], out[len(cond) :]
    return u + (c - u) * scales.to(out).view(-1, *[1] * (out.ndim - 1))


class _TiledNoise:
    """imagen-pytorch's `torch` during a pass of several scales: a noise draw for the pass's rows (scales x clips,
    scale-major) is the draw of one call of the whole seeding chunk (`chunk` clips), its rows [lo, hi) taken and
    repeated once per scale. The generator then advances exactly as in one call per scale, so every scale of a clip
    gets the noise that call gives it."""

    def __init__(self, chunk: int, lo: int, hi: int, copies: int):
        self.chunk, self.lo, self.hi, self.copies = chunk, lo, hi, copies

    def __getattr__(self, name):
        return getattr(torch, name)

    def _tile(self, shape, memory_format=torch.contiguous_format, **kw):
        # randn_like fills a tensor in its memory order (a guide is channels-last): draw the chunk in the same layout
        shape = tuple(shape)
        rows = (self.chunk, *shape[1:]) if shape and shape[0] == (self.hi - self.lo) * self.copies else shape
        noise = torch.empty(rows, memory_format=memory_format, **kw).normal_()
        if rows == shape:
            return noise
        return noise[self.lo : self.hi].repeat(self.copies, *[1] * (len(shape) - 1))

    def randn(self, *shape, **kw):
        return self._tile(shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape, **kw)

    def randn_like(self, x):
        return self._tile(x.shape, _layout(x), dtype=x.dtype, device=x.device)


def _layout(x: torch.Tensor):
    """The memory format of an image batch: channels-last or contiguous."""
    cl = x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if cl else torch.contiguous_format


@contextlib.contextmanager
def _rows(scales, noise: _TiledNoise):
    """A pass of several scales: per-row guidance scales and tiled noise draws inside imagen-pytorch."""
    _ROWS.scales, ip.torch = scales, noise
    try:
        yield
    finally:
        _ROWS.scales, ip.torch = None, torch


@contextlib.contextmanager
def _sampling(imagen, steps, use_ema, batched_cfg=True):
    """Temporarily: `steps` sampling steps per unet, EMA weights, batched guidance."""
    saved_steps = [s.num_timesteps for s in imagen.noise_schedulers]
    saved_weights, patched = {}, []
    try:
        if exists(steps):
            for s in imagen.noise_schedulers:
                s.num_timesteps = int(steps)
        if use_ema:
            ema = getattr(imagen, "ema_state", None)
            if not ema:
                raise ValueError("this model has no EMA weights (trained with train.ema: false): use use_ema=False")
            for k, sd in ema.items():
                unet = imagen.unets[k - 1]
                saved_weights[k] = _cpu_state(unet)
                unet.load_state_dict(sd)
        for unet in imagen.unets:
            if not isinstance(unet, Unet):
                continue
            patched.append(unet)
            # the feature-row path (projection, attention pooling over 256 rows) does not depend on the noisy
            # image or the time: compute it once per batch instead of at every denoising step (~2x faster on CPU)
            unet.text_to_cond.forward = _memoised(unet.text_to_cond.forward, _same_tensor)
            if exists(unet.attn_pool):
                unet.attn_pool.forward = _memoised(unet.attn_pool.forward, _equal_tensor)
            if batched_cfg:
                guided = functools.partial(_guided_forward, unet, _doubled={})
                unet.forward_with_cond_scale = guided
        if batched_cfg:
            ip.prob_mask_like = _prob_mask_like
        yield
    finally:
        for s, n in zip(imagen.noise_schedulers, saved_steps):
            s.num_timesteps = n
        for k, sd in saved_weights.items():
            imagen.unets[k - 1].load_state_dict(sd)
        for unet in patched:
            unet.__dict__.pop("forward_with_cond_scale", None)
            unet.text_to_cond.__dict__.pop("forward", None)
            if exists(unet.attn_pool):
                unet.attn_pool.__dict__.pop("forward", None)
        ip.prob_mask_like = _PROB_MASK_LIKE


def sample(
    imagen,
    text_embeds,
    cond_scale,
    guides=None,
    steps=50,
    seed=0,
    use_ema=False,
    lowres_sample_noise_level=None,
    batch_size=64,
    labels=None,
) -> np.ndarray:
    """Faces (B, S, S, 3) uint8 for feature matrices `text_embeds` (B, 256, 768). Super-resolution models start
    from `guides` (B, g, g, 3) uint8, noised to `lowres_sample_noise_level` (None: the preset's). `steps` sampling
    steps per unet (None: the preset's `timesteps`); guidance null + (cond - null) * cond_scale with both passes
    batched. Deterministic for (seed, batch_size). A model with a face prior (`imagen.face_prior`) samples residuals
    and adds the mean face back; under attribute_mean, `labels` (a DataFrame, one row per sample, with the prior's
    attribute columns) pick each sample's mean face. A latent model (`imagen.latent_codec`) samples latents and
    decodes them.

    `cond_scale` a list of scales: faces (len(cond_scale), B, S, S, 3), every scale of a clip in the same pass
    (at most batch_size images a pass), with the noise and so the faces of one call per scale (float noise aside)."""
    mode = mode_of(imagen)
    if mode == "super_resolution" and guides is None:
        raise ValueError("a super-resolution model samples from image guides: pass guides (B, 8, 8, 3) uint8")
    if mode == "generation" and guides is not None:
        raise ValueError("a generation model takes no image guides")
    X = torch.as_tensor(np.asarray(text_embeds, np.float32))
    if guides is not None:
        guides = torch.as_tensor(np.asarray(guides)).permute(0, 3, 1, 2).float().div(255.0)
        if len(guides) != len(X):
            raise ValueError(f"{len(guides)} guides for {len(X)} feature matrices")
    device = imagen.device
    prior, codec = getattr(imagen, "face_prior", None), getattr(imagen, "latent_codec", None)
    groups = prior.groups_of(labels, n=len(X)) if prior is not None else None
    if groups is not None and len(groups) != len(X):
        raise ValueError(f"{len(groups)} label rows for {len(X)} feature matrices")
    many = isinstance(cond_scale, (list, tuple, np.ndarray))
    scales = [float(s) for s in (cond_scale if many else [cond_scale])]
    per_pass = max(1, batch_size // len(scales)) if many else batch_size  # clips per pass
    size = codec.image_size if codec is not None else imagen.image_sizes[-1]
    outs = []
    with _sampling(imagen, steps, use_ema), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i in range(0, len(X), batch_size):  # a seeding chunk: its noise is a function of (seed, i)
            n = min(batch_size, len(X) - i)
            for lo in range(0, n, per_pass):
                hi = min(n, lo + per_pass)
                torch.manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
                rows = slice(i + lo, i + hi)
                if not many:
                    img = _sample_pass(imagen, X[rows], guides, groups, rows, cond_scale, lowres_sample_noise_level)
                else:
                    per_row = torch.tensor(scales).repeat_interleave(hi - lo)
                    with _rows(per_row, _TiledNoise(n, lo, hi, len(scales))):
                        # imagen checks that a scale other than 1 has guidance; the rows' own scales come from _ROWS
                        some = next((s for s in scales if s != 1), 1.0)
                        img = _sample_pass(
                            imagen, X[rows], guides, groups, rows, some, lowres_sample_noise_level, len(scales)
                        )
                faces = (img.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
                outs.append(faces.reshape(len(scales), hi - lo, *faces.shape[1:]))
    out = np.concatenate(outs, axis=1) if outs else np.zeros((len(scales), 0, size, size, 3), np.uint8)
    return out if many else out[0]


def _sample_pass(imagen, X, guides, groups, rows, cond_scale, noise_level, copies=1) -> torch.Tensor:
    """One imagen.sample of the clips `rows` (their feature matrices X), `copies` times over (scale-major: a pass of
    several scales), the face prior and latent decoding undone: (copies x clips, 3, S, S) in [0, 1]."""
    device, prior, codec = imagen.device, getattr(imagen, "face_prior", None), getattr(imagen, "latent_codec", None)
    g = np.tile(groups[rows], copies) if groups is not None else None
    kw = dict(
        text_embeds=(X.repeat(copies, 1, 1) if copies > 1 else X).to(device),
        cond_scale=cond_scale,
        use_tqdm=False,
        lowres_sample_noise_level=noise_level,  # None: Imagen's own (the preset's)
        cfg_remove_parallel_component=False,
    )
    if guides is not None:
        start = guides[rows]
        if copies > 1:  # in the guides' layout (channels-last: they come from (B, g, g, 3)), as a one-scale call has it
            start = start.repeat(copies, 1, 1, 1).contiguous(memory_format=_layout(start))
        start = start.to(device)
        if prior is not None:  # in residual space, as imagen made the low-res condition in training
            start = prior.to_model(start, g, resize=imagen.resize_to)
        kw.update(start_at_unet_number=2, start_image_or_video=start)
    img = imagen.sample(**kw)
    if prior is not None:
        img = prior.from_model(img, g, resize=imagen.resize_to)
    if codec is not None:
        img = codec.from_model(img)
    return img
