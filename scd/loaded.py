"""A model ready to run: the network, its codec (pixels <-> latents) and where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from scd.codecs import load_codec
from scd.models import ModelConfig


@dataclass
class LoadedModel:
    """A model ready to run, its codec, and where it came from (for reports and model cards)."""

    model: torch.nn.Module
    config: ModelConfig
    source: str
    folder: Path | None = None
    revision: str | None = None
    _codec: object = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)  # what a user should know about how it was loaded

    @property
    def codec(self):
        """Pixels (N, 3, H, W) in [-1, 1] <-> the model's latents (`scd.codecs`), loaded on first use
        (a DC-AE from the folder's `codec/`)."""
        if self._codec is None:
            self._codec = load_codec(self.config.codec, self.folder)
        return self._codec

    def to(self, device, dtype) -> "LoadedModel":
        """Move the model and its codec."""
        self.model.to(device=device, dtype=dtype)
        self.codec.to(device, dtype)
        return self

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frames (F, 3, H, W) in [-1, 1] at the model's frame size -> latents (F, C, h, w) in the
        model's device and dtype."""
        weight = next(self.model.parameters())
        with torch.inference_mode():
            return self.codec.encode(pixels.to(device=weight.device, dtype=weight.dtype)).to(weight.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (N, C, h, w) -> frames (N, 3, H, W) float32 in [-1, 1]."""
        weight = next(self.model.parameters())
        with torch.inference_mode():
            return self.codec.decode(latents.to(weight.dtype))
