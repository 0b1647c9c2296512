"""Image fidelity of a generated face against the real one: PSNR, SSIM (as scikit-image's Gaussian-window SSIM), the
bicubic upscale that face detectors need for small faces, and guide consistency: each output area-downsampled to the
guide size (as the stored guide, preprocessing.guide_of), `guide_rmse` (grey levels, against its own guide) and
`guide_top1` (its own guide is the nearest of all test guides in pixel L2). A super-resolution system should keep
guide_top1 near 1.
"""

from __future__ import annotations

import cv2
import numpy as np

from slf_utils.preprocessing import guide_of


def _float_pair(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    return a, b


def psnr(a, b, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical images)."""
    a, b = _float_pair(a, b)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def ssim(a, b, data_range: float = 255.0, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004): Gaussian window sigma 1.5 (truncated at 3.5 sigma), K1 0.01,
    K2 0.03, population covariances, border of half a window excluded, mean over channels. Equals
    skimage.metrics.structural_similarity(..., gaussian_weights=True, use_sample_covariance=False)."""
    from scipy.ndimage import gaussian_filter  # 1 s to import: only where SSIM is scored

    a, b = _float_pair(a, b)
    if a.ndim == 3:
        return float(np.mean([ssim(a[..., c], b[..., c], data_range, sigma) for c in range(a.shape[-1])]))
    truncate = 3.5
    pad = int(truncate * sigma + 0.5)
    if min(a.shape) < 2 * pad + 1:
        raise ValueError(f"ssim: image {a.shape} smaller than the {2 * pad + 1}-pixel window")

    def filt(x):
        return gaussian_filter(x, sigma=sigma, truncate=truncate, mode="reflect")

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ux, uy = filt(a), filt(b)
    vx, vy, vxy = filt(a * a) - ux * ux, filt(b * b) - uy * uy, filt(a * b) - ux * uy
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return float(s[pad:-pad, pad:-pad].mean())


def upscale(img: np.ndarray, target: int) -> np.ndarray:
    """Bicubic upscale so the longer side is `target` (never downscales): face detectors miss 32 px faces."""
    h, w = img.shape[:2]
    if not target or max(h, w) >= target:
        return img
    s = target / max(h, w)
    return cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_CUBIC)


def guide_consistency(images, guides, own=None) -> dict[str, np.ndarray]:
    """Does an output keep its guide? Each image area-downsampled to the guide size (as the stored guide:
    preprocessing.guide_of), then per image `guide_rmse`, its RMSE in grey levels against its own guide
    guides[own[i]] (default own[i] = i), and `guide_top1`, 1 when its own guide is the nearest (pixel L2) of all
    `guides` (ties count as nearest)."""
    guides = np.asarray(guides)
    own = np.arange(len(images)) if own is None else np.asarray(own, dtype=np.int64)
    if not len(images):
        return {"guide_rmse": np.zeros(0), "guide_top1": np.zeros(0)}
    small = np.stack([guide_of(im, guides.shape[1]) for im in images]).reshape(len(images), -1).astype(np.float64)
    g = guides.reshape(len(guides), -1).astype(np.float64)
    # |a - b|^2 expanded: a (queries x gallery) matrix instead of a (queries x gallery x pixels) one
    d = (small**2).sum(1)[:, None] + (g**2).sum(1)[None] - 2 * small @ g.T
    rows = np.arange(len(own))
    return {
        "guide_rmse": np.sqrt(((small - g[own]) ** 2).mean(1)),
        "guide_top1": (d[rows, own] <= d.min(1)).astype(np.float64),
    }
