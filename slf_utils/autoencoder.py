"""The latent autoencoder of latent diffusion (model preset key `latent`; SCLDM, seeds/scldm-abstract.txt): the
imagen unets run on its latents instead of pixels, and sampled latents are decoded to faces at the end.

* A small convolutional VAE, KL-regularised as Stable Diffusion's (LDM's KL-f8) but trained on reconstruction (mean
  squared error in [0, 1]) and a weak KL term only, no perceptual or adversarial loss. The encoder gives a mean and a
  log-variance per latent entry; training decodes a sample `mean + sd * noise`, so the decoder learns to tolerate
  small latent errors (which diffusion samples have); the KL term (`kl_weight` x the mean over latent entries of
  KL(q(z|x) || N(0, 1))) keeps that noise from collapsing to zero. The diffusion model is trained on the posterior
  means (deterministic: precomputed once for all training faces).
* Size: `downsample` (a power of 2) halvings, each a residual block and a stride-2 convolution; channel widths
  `width` x 1, 2, 4, 4, ...; the decoder mirrors it with nearest upsampling. S x S x 3 -> S/d x S/d x channels.
* imagen-pytorch expects images in [0, 1] (it works on 2m - 1 internally and clamps its predictions of the clean
  image to [-1, 1] at sampling). Latents are standardised per channel with the training latents' mean and standard
  deviation and mapped by m = clip((z - mean_c) / (range_sd * sd_c), -1, 1) / 2 + 1/2: imagen's [-1, 1] then holds
  +-`range_sd` standard deviations (3: all but ~0.3 % of a Gaussian; the clip only touches those tails, and imagen's
  own clamp would cut them at sampling anyway). Inverse: z = mean_c + range_sd * sd_c * (2m - 1), then decode.
* One autoencoder per system model folder (`autoencoder.pt` beside `checkpoint.pt`), trained from that system's
  training faces before its unets, resumable from its own checkpoint; its per-channel statistics are computed once
  when its training ends and saved with it. (Sharing one per grid would save its training time, at the cost of a
  cross-system dependency; the training budget is `latent.steps`, small beside the unet's.)
* A pretrained VAE (diffusers `AutoencoderKL.from_pretrained`) is not offered: diffusers is not installed in the
  workbook's environment.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from slf_utils.basics import ParamsError, atomic_write, exists

FORMAT = "slf-autoencoder/1"
FILE = "autoencoder.pt"
# preset key `latent`: its keys and defaults (a preset names only what it changes)
DEFAULTS = {
    "channels": 4,  # latent channels (imagen's `channels`)
    "downsample": 8,  # output size / latent size, a power of 2
    "width": 32,  # channels of the first level (doubled per level, at most 4x)
    "steps": 2000,  # autoencoder training steps (before the unets)
    "lr": 1e-3,  # Adam
    "batch_size": 32,
    "kl_weight": 1e-4,  # weight of the mean KL per latent entry beside the mean squared error per pixel value
    "range_sd": 3.0,  # standard deviations of a latent channel mapped onto imagen's [-1, 1]
    "seed": 0,
}


def check_config(latent, where: str = "model.latent") -> dict:
    """The preset's `latent` section with its defaults filled in; ParamsError naming the key when wrong."""
    if not isinstance(latent, dict):
        raise ParamsError(f"{where} must be null (pixel diffusion) or a mapping, got {latent!r}")
    unknown = set(latent) - set(DEFAULTS)
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {sorted(unknown)} (known: {', '.join(sorted(DEFAULTS))})")
    cfg = {**DEFAULTS, **latent}
    for key in ("channels", "downsample", "width", "steps", "batch_size", "seed"):
        v = cfg[key]
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= (0 if key in ("steps", "seed") else 1)):
            raise ParamsError(
                f"{where}.{key} must be a {'non-negative' if key in ('steps', 'seed') else 'positive'} "
                f"integer, got {v!r}"
            )
    d = cfg["downsample"]
    if d < 2 or d & (d - 1):
        raise ParamsError(f"{where}.downsample must be a power of 2 (2, 4, 8, ...), got {d!r}")
    for key in ("lr", "kl_weight", "range_sd"):
        v = cfg[key]
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and (v > 0 or key == "kl_weight")):
            raise ParamsError(
                f"{where}.{key} must be a {'non-negative' if key == 'kl_weight' else 'positive'} number, got {v!r}"
            )
        cfg[key] = float(v)
    return cfg


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(c, 8), c)


class _Res(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block = nn.Sequential(
            _norm(c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1), _norm(c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1)
        )

    def forward(self, x):
        return x + self.block(x)


class Autoencoder(nn.Module):
    """S x S x 3 images in [0, 1] <-> S/downsample x S/downsample x channels latents (see the module docstring)."""

    def __init__(self, channels: int = 4, downsample: int = 8, width: int = 32):
        super().__init__()
        levels = int(round(math.log2(downsample)))
        widths = [width * min(2**i, 4) for i in range(levels + 1)]
        enc = [nn.Conv2d(3, widths[0], 3, padding=1)]
        for i in range(levels):
            enc += [_Res(widths[i]), nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1)]
        enc += [_Res(widths[-1]), _norm(widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], 2 * channels, 1)]
        dec = [nn.Conv2d(channels, widths[-1], 3, padding=1), _Res(widths[-1])]
        for i in reversed(range(levels)):
            dec += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(widths[i + 1], widths[i], 3, padding=1),
                _Res(widths[i]),
            ]
        dec += [_norm(widths[0]), nn.SiLU(), nn.Conv2d(widths[0], 3, 3, padding=1)]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)
        self.channels, self.downsample = channels, downsample

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance) of q(z | x) for images (B, 3, S, S) in [0, 1]."""
        mean, logvar = self.encoder(x * 2 - 1).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S), about [0, 1] (not clamped: the training loss sees the raw output)."""
        return (self.decoder(z) + 1) / 2

    def forward(self, x, generator=None):
        mean, logvar = self.encode(x)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.decode(mean + torch.exp(0.5 * logvar) * noise), mean, logvar


def _kl(mean, logvar) -> torch.Tensor:
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()


def _images(faces_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(faces_uint8)).permute(0, 3, 1, 2).float().div_(255.0)


class LatentCodec:
    """A trained autoencoder and its training latents' per-channel statistics: images <-> imagen's [0, 1] range."""

    def __init__(self, model: Autoencoder, mean, std, range_sd: float, image_size: int):
        self.model = model.eval()
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.range_sd, self.image_size = float(range_sd), int(image_size)

    @property
    def channels(self) -> int:
        return self.model.channels

    @property
    def latent_size(self) -> int:
        return self.image_size // self.model.downsample

    @property
    def device(self):
        return self.mean.device

    def to(self, device) -> LatentCodec:
        self.model.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> imagen's [0, 1]: clip((z - mean_c) / (range_sd * sd_c), -1, 1) / 2 + 1/2."""
        return ((z - self.mean) / (self.range_sd * self.std)).clamp(-1, 1) / 2 + 0.5

    def unscale(self, m: torch.Tensor) -> torch.Tensor:
        """The inverse of `scale` (exact inside the clip): mean_c + range_sd * sd_c * (2m - 1)."""
        return self.mean + self.range_sd * self.std * (2 * m - 1)

    @torch.no_grad()
    def to_model(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) in [0, 1] -> scaled posterior-mean latents (B, C, S/d, S/d) in [0, 1]."""
        return self.scale(self.model.encode(images.to(self.device))[0])

    @torch.no_grad()
    def from_model(self, m: torch.Tensor) -> torch.Tensor:
        """imagen's output (B, C, S/d, S/d) in [0, 1] -> decoded images (B, 3, S, S) in [0, 1]."""
        return self.model.decode(self.unscale(m.to(self.device))).clamp(0, 1)

    def encode_faces(self, faces_uint8: np.ndarray, chunk: int = 256) -> torch.Tensor:
        """Scaled latents (N, C, S/d, S/d) of uint8 faces (N, S, S, 3), on the CPU."""
        out = [self.to_model(_images(faces_uint8[i : i + chunk])).cpu() for i in range(0, len(faces_uint8), chunk)]
        return torch.cat(out) if out else torch.zeros(0, self.channels, self.latent_size, self.latent_size)


def _save(path, obj):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def train(
    faces: np.ndarray, config: dict, path, *, data_key: str = "", checkpoint_every: int = 500, device=None, log=None
) -> tuple[LatentCodec, dict]:
    """Train (or resume, or load) the autoencoder of `config` (a checked `latent` section) on uint8 faces
    (N, S, S, 3) into `path`, then compute the training latents' per-channel statistics. `data_key` names the
    training data (e.g. a hash of the clip ids): a checkpoint of another configuration, size or data is refused.
    Returns (codec, info: steps, seconds per step, final loss, reconstruction PSNR on the training faces)."""
    path = Path(path)
    cfg = check_config(config)
    size = int(faces.shape[1])
    if size % cfg["downsample"]:
        raise ParamsError(f"model.latent.downsample {cfg['downsample']} does not divide the image size {size}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ident = {"config": cfg, "image_size": size, "data_key": data_key}
    ck = torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None
    if ck is not None:
        if ck.get("format") != FORMAT:
            raise ValueError(f"{path}: not an autoencoder checkpoint of this workbook (format {ck.get('format')!r})")
        theirs = {k: ck[k] for k in ident}
        if {**theirs, "config": {**theirs["config"], "steps": 0}} != {**ident, "config": {**cfg, "steps": 0}}:
            diff = [k for k in ident if theirs[k] != ident[k]]
            raise ValueError(
                f"{path}: the autoencoder was trained with a different {', '.join(diff)}; delete it (and the model "
                "folder's checkpoint.pt, whose unets were trained on its latents) to start over"
            )
        if ck["step"] > cfg["steps"] or (ck.get("mean") is not None and ck["step"] != cfg["steps"]):
            raise ValueError(
                f"{path}: the autoencoder finished at step {ck['step']}, model.latent.steps is now {cfg['steps']}: "
                "its latents (and the unets trained on them) would change; train into another model folder"
            )
    torch.manual_seed(cfg["seed"])
    model = Autoencoder(cfg["channels"], cfg["downsample"], cfg["width"])
    optim = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    state = ck or {"format": FORMAT, **ident, "step": 0, "losses": [], "mean": None, "std": None}
    if ck is not None:
        model.load_state_dict(ck["state"])
        optim.load_state_dict(ck["optim"])
    model.to(device).train()
    for group in optim.state.values():  # Adam's moments follow the model to its device
        for k, v in group.items():
            if torch.is_tensor(v) and k != "step":
                group[k] = v.to(device)
    n, bsz, times = len(faces), cfg["batch_size"], []
    for step in range(int(state["step"]), cfg["steps"]):
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg["seed"], step])  # per-step draws: a resumed run draws the same batches
        x = _images(faces[rng.choice(n, size=bsz, replace=n < bsz)]).to(device)
        gen = torch.Generator(device=device).manual_seed(int(rng.integers(2**62)))
        recon, mean, logvar = model(x, generator=gen)
        loss = F.mse_loss(recon, x) + cfg["kl_weight"] * _kl(mean, logvar)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        state["losses"].append(loss.item())
        state["step"] = step + 1
        times.append(time.perf_counter() - t0)
        if state["step"] % max(1, checkpoint_every) == 0 and state["step"] < cfg["steps"]:
            _save(path, {**state, "state": _cpu(model), "optim": optim.state_dict()})
        if log and (step + 1) % 500 == 0:
            log(f"autoencoder step {step + 1}/{cfg['steps']}: loss {np.mean(state['losses'][-50:]):.5f}")
    model.eval()
    codec = LatentCodec(model, torch.zeros(cfg["channels"]), torch.ones(cfg["channels"]), cfg["range_sd"], size)
    psnr = None
    if state.get("mean") is None or times:
        with torch.no_grad():
            z, se = [], 0.0
            for i in range(0, n, 256):
                x = _images(faces[i : i + 256]).to(device)
                mean = model.encode(x)[0]
                z.append(mean.cpu())
                se += float(((model.decode(mean).clamp(0, 1) - x) ** 2).sum())
        z = torch.cat(z)
        state["mean"] = z.mean(dim=(0, 2, 3))
        state["std"] = z.std(dim=(0, 2, 3)).clamp_min(1e-6)
        state["psnr"] = psnr = float(10 * np.log10(1.0 / max(se / faces.size, 1e-12)))
        _save(path, {**state, "state": _cpu(model), "optim": optim.state_dict()})
    psnr = state.get("psnr", psnr)
    codec.mean = state["mean"].view(1, -1, 1, 1).to(device)
    codec.std = state["std"].view(1, -1, 1, 1).to(device)
    info = {
        "steps": int(state["step"]),
        "seconds_per_step": float(np.median(times[1:] or times)) if times else None,
        "final_loss": float(np.mean(state["losses"][-20:])) if state["losses"] else None,
        "train_psnr": psnr,
        "latent_shape": [cfg["channels"], size // cfg["downsample"], size // cfg["downsample"]],
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return codec, info


def _cpu(module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def load(path, device=None) -> LatentCodec:
    """The codec of a finished autoencoder checkpoint."""
    path = Path(path)
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if ck.get("format") != FORMAT or ck.get("mean") is None:
        raise ValueError(f"{path}: not a finished autoencoder of this workbook")
    cfg = ck["config"]
    model = Autoencoder(cfg["channels"], cfg["downsample"], cfg["width"])
    model.load_state_dict(ck["state"])
    codec = LatentCodec(model, ck["mean"], ck["std"], cfg["range_sd"], ck["image_size"])
    return codec.to(torch.device(device or "cpu")) if exists(device) else codec


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 image stacks."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def is_finished(path) -> bool:
    """Whether `path` holds an autoencoder whose training and latent statistics are done."""
    path = Path(path)
    return path.exists() and torch.load(path, map_location="cpu", weights_only=True).get("mean") is not None
