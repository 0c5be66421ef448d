"""Flow matching: the noise path between a clean latent and Gaussian noise, and the noise levels
training draws. `x_sigma = (1 - sigma) x0 + sigma noise`; the model learns the velocity `noise - x0`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x0 + sigma noise; sigma broadcasts from the left."""
    sigma = sigma.view(*sigma.shape, *([1] * (x0.dim() - sigma.dim())))
    return (1 - sigma) * x0 + sigma * noise


def logit_normal(n: int, shift: float = 1.0) -> torch.Tensor:
    """(n,) noise levels sigmoid(N(0, 1)) on the CPU; shift > 1 moves them toward 1 (SD3's shift)."""
    sigma = torch.sigmoid(torch.randn(n))
    return sigma if shift == 1.0 else shift * sigma / (1 + (shift - 1) * sigma)


def noised_context(video: torch.Tensor, clean_ratio: float, sigma_max: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference's clean-context ratio: each frame of `video` (B, N, ...) stays clean (timestep
    -1) with probability `clean_ratio`, else it is noised at sigma_max * logit-normal and carries
    that timestep, so an encoder learns to read imperfect context such as its own generated frames.
    Returns (frames, timesteps (B, N) or None when every frame is clean)."""
    if clean_ratio >= 1.0:
        return video, None
    b, n = video.shape[:2]
    sigma = (sigma_max * logit_normal(b * n)).view(b, n).to(video.device)
    clean = torch.rand(b, n, device=video.device) < clean_ratio
    sigma = torch.where(clean, torch.zeros_like(sigma), sigma)
    noisy = add_noise(video, torch.randn_like(video), sigma)
    return noisy, torch.where(clean, torch.full_like(sigma, -1.0), sigma * 1000.0)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in float32; with `weight` (broadcast to pred's shape, >= 0) the
    weighted mean sum(w e^2) / sum(w), so the loss keeps its scale whatever the weights."""
    if weight is None:
        return F.mse_loss(pred.float(), target.float())
    weight = weight.float().expand_as(pred)
    return ((pred.float() - target.float()).pow(2) * weight).sum() / weight.sum()
