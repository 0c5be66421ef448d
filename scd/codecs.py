"""Pixels <-> latents. Pixel-space models see frames in [-1, 1] as their latents; latent models
carry an autoencoder in their folder's `codec/` (DC-AE through diffusers)."""

from __future__ import annotations

from pathlib import Path

import torch

from scd.errors import CheckpointError


class PixelCodec:
    """The identity on [-1, 1] pixels: latents are the frames themselves."""

    scale = 1

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> latents (N, 3, H, W)."""
        return pixels

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (N, 3, H, W) -> pixels (N, 3, H, W) in [-1, 1], clamped."""
        return latents.float().clamp(-1, 1)

    def to(self, device=None, dtype=None) -> "PixelCodec":
        return self


def load_codec(codec: dict, folder: Path | None = None):
    """The codec a model config names: {"type": "pixel"} or {"type": "dcae", ...} with weights in
    `folder/codec/`."""
    kind = codec.get("type", "pixel")
    if kind == "pixel":
        return PixelCodec()
    raise CheckpointError(f"unknown codec type {kind!r} in config.json: this scd knows 'pixel'")
