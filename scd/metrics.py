"""Frame quality against ground truth: PSNR and SSIM per frame, on float frames in [0, 1]."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PSNR_CAP = 100.0  # dB; a perfect frame counts as this in averages instead of +inf


def uint8_to_unit(frames: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).double() / 255.0


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-frame PSNR in dB of (N, C, H, W); identical frames give +inf."""
    mse = (pred.double() - target.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def _gaussian(size: int, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-frame SSIM of (N, C, H, W): Gaussian window 11 (sigma 1.5; shrunk to the frame if it is
    smaller), K1 0.01, K2 0.03, 'valid' windows only, per channel then averaged."""
    x, y = pred.double(), target.double()
    n, c, h, w = x.shape
    size = min(11, h, w)
    g = _gaussian(size)
    window = (g[:, None] * g[None, :]).expand(c, 1, size, size).contiguous()
    blur = lambda t: F.conv2d(t, window, groups=c)
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) of `values`, linearly interpolated (numpy's); NaN when empty."""
    if len(values) == 0:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))
