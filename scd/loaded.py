"""A model ready to run: the network, its codec (pixels <-> latents) and where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from scd.codecs import load_codec
from scd.errors import CheckpointError
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
    # a Wan model's base (text encoder, VAE): the folder, once resolved, and the Hub commit it is at
    base_folder: Path | None = None
    base_revision: str | None = None

    @property
    def codec(self):
        """Pixels (N, 3, H, W) in [-1, 1] <-> the model's latents (`scd.codecs`), loaded on first use
        (a DC-AE from the folder's `codec/`, the Wan VAE from the base)."""
        if self._codec is None:
            base = self.base() if self.config.codec.type == "wan" else None
            self._codec = load_codec(self.config.codec, self.folder, base)
        return self._codec

    def base(self) -> Path:
        """The folder of the base a text-conditioned model names (`config.base`): fetched from the
        Hub on first use (its tokenizer, text encoder and VAE; never the base transformer's weights)."""
        if self.base_folder is None:
            from scd import wan_reference  # deferred: only Wan models have a base

            if getattr(self.config, "base", None) is None:
                raise CheckpointError(f"{self.source} names no base (text encoder and VAE): give one",
                                      parameter="base")
            self.base_folder, self.base_revision = wan_reference.resolve_base(self.config.base,
                                                                              wan_reference.BASE_FILES)
        return self.base_folder

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
