"""Pixels <-> latents. Pixel-space models see frames in [-1, 1] as their latents; latent models
carry an autoencoder in their folder's `codec/` (DC-AE through diffusers)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from scd.errors import CheckpointError
from scd.models import CodecConfig
from scd.weights import load_state, read_tensors

CODEC_DIR = "codec"
DCAE_CONFIG = "config.json"
DCAE_WEIGHTS = "diffusion_pytorch_model.safetensors"
DCAE_SCALING_FACTOR = 0.2889  # FAR's DC-AE latents (its options/model_cfg/dcae/*.json)
class PixelCodec:
    """The identity on [-1, 1] pixels: latents are the frames themselves."""

    scale = 1
    clamp = 1.0  # generated frames are bounded to the pixel range before they become context

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> latents (N, 3, H, W)."""
        return pixels

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (N, 3, H, W) -> pixels (N, 3, H, W) in [-1, 1], clamped."""
        return latents.float().clamp(-1, 1)

    def to(self, device=None, dtype=None) -> "PixelCodec":
        return self


# ----------------------------------------------------------------------------- DC-AE

def autoencoder_dc_class():
    """diffusers' AutoencoderDC, imported on first use: diffusers is the optional extra `dcae`."""
    try:
        from diffusers import AutoencoderDC
    except ImportError:
        raise CheckpointError("this model's autoencoder (DC-AE) needs diffusers, which is not installed: "
                              "run `pip install 'scd[dcae]'`") from None
    return AutoencoderDC


def dcae_downsample(config: dict) -> int:
    """Pixels per latent along each side: every encoder stage after the first halves the size."""
    try:
        return 2 ** (len(config["encoder_block_out_channels"]) - 1)
    except (KeyError, TypeError):
        raise CheckpointError("the DC-AE config has no encoder_block_out_channels list") from None


def read_dcae_config(path: Path) -> dict:
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read the DC-AE config {path}: {err}") from None
    if not isinstance(config, dict) or config.get("_class_name", "AutoencoderDC") not in ("AutoencoderDC", "MyAutoencoderDC"):
        raise CheckpointError(f"{path} is not an AutoencoderDC config (diffusers layout)")
    return config


def build_dcae(config: dict, tensors: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """An AutoencoderDC of `config` holding `tensors`, in eval mode; strict: every missing,
    unexpected or mis-shaped tensor is a CheckpointError. FAR's DC-AE `.pth` state dicts load as they are."""
    cls = autoencoder_dc_class()
    try:
        autoencoder = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    except Exception as err:  # diffusers raises ValueError, TypeError, KeyError... for a bad config
        raise CheckpointError(f"{source}: the DC-AE config describes no valid AutoencoderDC ({err})") from None
    load_state(autoencoder, tensors, source)
    return autoencoder.eval().requires_grad_(False)


class DCAECodec:
    """DC-AE (diffusers' AutoencoderDC): pixels (N, 3, H, W) in [-1, 1] <-> latents
    (N, C, H / s, W / s) multiplied by the scaling factor, the units the models were trained in."""

    def __init__(self, autoencoder: torch.nn.Module, scaling_factor: float = DCAE_SCALING_FACTOR,
                 downsample: int | None = None, chunk: int = 16):
        self.autoencoder = autoencoder
        self.scaling_factor = float(scaling_factor)
        self.scale = downsample or dcae_downsample(dict(autoencoder.config))
        self.clamp = None  # latents have no fixed range
        self.chunk = chunk  # frames per autoencoder call: bounds activation memory on long prompts

    @classmethod
    def from_folder(cls, folder: Path, scaling_factor: float = DCAE_SCALING_FACTOR,
                    downsample: int | None = None) -> "DCAECodec":
        """Load `folder/config.json` + `folder/diffusion_pytorch_model.safetensors` (diffusers layout)."""
        folder = Path(folder)
        for name in (DCAE_CONFIG, DCAE_WEIGHTS):
            if not (folder / name).is_file():
                raise CheckpointError(f"the codec folder {folder} has no {name}: convert the model again "
                                      "with its codec to re-attach the autoencoder")
        config = read_dcae_config(folder / DCAE_CONFIG)
        actual = dcae_downsample(config)
        if downsample is not None and downsample != actual:
            raise CheckpointError(f"config.json says the codec downsamples {downsample}x but {folder} is a "
                                  f"{actual}x DC-AE: fix codec.downsample in config.json")
        autoencoder = build_dcae(config, read_tensors(folder / DCAE_WEIGHTS), str(folder / DCAE_WEIGHTS))
        return cls(autoencoder, scaling_factor, actual)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> scaled latents (N, C, H / s, W / s) in the autoencoder's dtype."""
        with torch.no_grad():
            parts = [self.autoencoder.encode(p.to(self.dtype)).latent for p in pixels.split(self.chunk)]
        return torch.cat(parts) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, C, h, w) -> pixels (N, 3, h * s, w * s) in [-1, 1], float32, clamped."""
        with torch.no_grad():
            parts = [self.autoencoder.decode((z / self.scaling_factor).to(self.dtype)).sample
                     for z in latents.split(self.chunk)]
        return torch.cat(parts).float().clamp(-1, 1)

    def to(self, device=None, dtype=None) -> "DCAECodec":
        # nn.Module's own .to: diffusers' override logs a warning on every dtype cast
        torch.nn.Module.to(self.autoencoder, device=device, dtype=dtype)
        return self


class FrameStreamDecoder:
    """Decodes a stream's latents (B, n, C, h, w) -> frames (B, n, 3, H, W) in [-1, 1] with a codec
    that decodes every frame alone (the pixel identity, DC-AE): what the Wan VAE's stream decoder
    does with its causal cache, so a stream decodes alike whatever its codec."""

    def __init__(self, codec):
        self.codec = codec

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latents.flatten(0, 1)).unflatten(0, latents.shape[:2])


def stream_decoder(codec):
    """The codec's decoder for one stream: its own (a causal video codec's), else frame by frame."""
    own = getattr(codec, "stream_decoder", None)
    return own() if own is not None else FrameStreamDecoder(codec)


def load_codec(codec: CodecConfig, folder: Path | None = None, base: Path | None = None):
    """The codec a model config names; a DC-AE's weights are in `folder/codec/`, the Wan VAE's in
    the model's base folder (`base/vae/`)."""
    if codec.is_pixel:
        return PixelCodec()
    if codec.type == "wan":
        from scd.wan_vae import WanVAE  # deferred: diffusers is the optional extra `wan`

        if base is None:
            raise CheckpointError("this Wan model decodes through its base's VAE: give the base (a folder in the "
                                  "layout of Wan-AI/Wan2.1-T2V-1.3B-Diffusers, or that Hub repo)", parameter="base")
        return WanVAE.from_base(base)
    if folder is None or not (Path(folder) / CODEC_DIR).is_dir():
        where = f"{folder}" if folder is not None else "this model"
        raise CheckpointError(f"{where} works on DC-AE latents but has no {CODEC_DIR}/ folder: attach the "
                              "autoencoder by converting the model again with its codec")
    return DCAECodec.from_folder(Path(folder) / CODEC_DIR, codec.scaling_factor or DCAE_SCALING_FACTOR,
                                 codec.downsample)
