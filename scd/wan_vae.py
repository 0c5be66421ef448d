"""The Wan2.1 VAE (diffusers' AutoencoderKLWan): video pixels <-> the latents Wan models work in,
with decoding streamed chunk by chunk.

Units (Self-Forcing's `WanVAEWrapper`, diffusers' WanPipeline): model latents are the encoder's mean
normalised per channel, `(mu - latents_mean) / latents_std`, with the mean and std of the VAE's
config.json; decoding undoes that (`latents * std + mean`) before the VAE's decoder, whose pixels
are clamped to [-1, 1]. The VAE is causal in time: 8x spatial, 4x temporal, the first latent frame
one video frame and each later one four, so F video frames are 1 + (F - 1) // 4 latent frames and
n latent frames are 1 + 4 (n - 1) video frames.

Streaming: the decoder's causal 3D convolutions look two frames back. diffusers decodes a whole
latent video one latent frame at a time, carrying those frames in a feature cache
(`feat_cache`/`feat_idx`); `WanStreamDecoder` is that same loop with the cache kept between calls,
so each chunk's frames come out as soon as the chunk is denoised, equal to decoding the whole video
at once, with memory that does not grow with the video.

Shapes are frame-major, as the streaming loop's: pixels (B, F, 3, H, W), latents (B, n, C, h, w).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from scd.errors import CheckpointError, VideoError
from scd.weights import load_state, read_tensors

VAE_DIR = "vae"
VAE_CONFIG = "config.json"
VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"
TEMPORAL = 4  # video frames per latent frame after the first (diffusers' encode loop assumes it)


def latent_frames(video_frames: int) -> int:
    """Latent frames of `video_frames` (>= 1) video frames: 1 + (F - 1) // 4."""
    return 1 + (video_frames - 1) // TEMPORAL


def video_frames(latent_frames: int) -> int:
    """Video frames that `latent_frames` (>= 1) latent frames decode to: 1 + 4 (n - 1)."""
    return 1 + TEMPORAL * (latent_frames - 1)


def autoencoder_kl_wan_class():
    """diffusers' AutoencoderKLWan, imported on first use: diffusers is the optional extra `wan`."""
    try:
        from diffusers import AutoencoderKLWan
    except ImportError:
        raise CheckpointError("the Wan VAE needs diffusers >= 0.33 (AutoencoderKLWan), which is not installed: "
                              "run `pip install 'scd[wan]'`") from None
    return AutoencoderKLWan


def read_vae_config(path: Path) -> dict:
    """A Wan2.1 VAE's config.json, checked: an AutoencoderKLWan with 4x time, no patching (that is
    Wan2.2's VAE), and a latent mean and std per latent channel."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read the Wan VAE config {path}: {err}") from None
    if not isinstance(config, dict) or config.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        raise CheckpointError(f"{path} is not an AutoencoderKLWan config (diffusers layout)")
    z_dim = config.get("z_dim", 16)
    for name in ("latents_mean", "latents_std"):
        values = config.get(name)
        if not isinstance(values, list) or len(values) != z_dim or not all(isinstance(v, (int, float)) for v in values):
            raise CheckpointError(f"{path}: {name} must be a list of {z_dim} numbers (one per latent channel, z_dim)")
    if any(v <= 0 for v in config["latents_std"]):
        raise CheckpointError(f"{path}: every latents_std must be > 0")
    downsample = config.get("temperal_downsample", [False, True, True])
    if not isinstance(downsample, list) or 2 ** sum(bool(d) for d in downsample) != TEMPORAL:
        raise CheckpointError(f"{path}: the VAE must compress time 4x (two True in temperal_downsample), "
                              "as Wan2.1's does")
    if config.get("patch_size") is not None or config.get("is_residual"):
        raise CheckpointError(f"{path} is a Wan2.2-style VAE (patch_size / is_residual); scd runs Wan2.1's")
    return config


class WanVAE:
    """AutoencoderKLWan with Wan's latent normalisation: pixels (B, F, 3, H, W) in [-1, 1] <->
    latents (B, n, C, H / s, W / s), s = 8 for Wan2.1 (2 ** (len(dim_mult) - 1) in general)."""

    clamp = None  # latents have no fixed range

    def __init__(self, autoencoder: torch.nn.Module):
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        config = dict(autoencoder.config)
        self.channels = int(config["z_dim"])
        self.scale = 2 ** (len(config["dim_mult"]) - 1)  # pixels per latent along each side
        self.mean = torch.tensor(config["latents_mean"], dtype=torch.float32).view(1, 1, -1, 1, 1)  # (1, 1, C, 1, 1)
        self.std = torch.tensor(config["latents_std"], dtype=torch.float32).view(1, 1, -1, 1, 1)

    @classmethod
    def from_folder(cls, folder) -> "WanVAE":
        """Load `folder/config.json` + `folder/diffusion_pytorch_model.safetensors` (diffusers layout,
        a base's `vae/`); strict: every missing, unexpected or mis-shaped tensor is a CheckpointError."""
        folder = Path(folder)
        for name in (VAE_CONFIG, VAE_WEIGHTS):
            if not (folder / name).is_file():
                raise CheckpointError(f"the VAE folder {folder} has no {name}: download the base's vae/ again")
        config = read_vae_config(folder / VAE_CONFIG)
        cls_ = autoencoder_kl_wan_class()
        try:
            autoencoder = cls_.from_config({k: v for k, v in config.items() if not k.startswith("_")})
        except Exception as err:  # diffusers raises ValueError, TypeError, KeyError... for a bad config
            raise CheckpointError(f"{folder / VAE_CONFIG} describes no valid AutoencoderKLWan ({err})") from None
        load_state(autoencoder, read_tensors(folder / VAE_WEIGHTS), str(folder / VAE_WEIGHTS))
        return cls(autoencoder)

    @classmethod
    def from_base(cls, base) -> "WanVAE":
        """The VAE of a Wan base folder (Wan-AI/Wan2.1-T2V-1.3B-Diffusers layout): `base/vae/`."""
        folder = Path(base) / VAE_DIR
        if not folder.is_dir():
            raise CheckpointError(f"the base folder {base} has no {VAE_DIR}/ folder (the Wan VAE): download the "
                                  "whole base again, or point at a base in the Wan2.1 Diffusers layout")
        return cls.from_folder(folder)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device

    def to(self, device=None, dtype=None) -> "WanVAE":
        # nn.Module's own .to: diffusers' override logs a warning on every dtype cast
        torch.nn.Module.to(self.autoencoder, device=device, dtype=dtype)
        return self

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """The VAE's latent mean (B, n, C, h, w) -> model latents, float32: (mu - mean) / std."""
        return (mu.float() - self.mean.to(mu.device)) / self.std.to(mu.device)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Model latents (B, n, C, h, w) -> the VAE's latent space, float32: latents * std + mean."""
        return latents.float() * self.std.to(latents.device) + self.mean.to(latents.device)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Video (B, F, 3, H, W) in [-1, 1], H and W multiples of `scale` -> model latents
        (B, 1 + (F - 1) // 4, C, H / s, W / s), float32, the encoder's mean (no sampling).

        A clip whose length is not 1 + 4k is trimmed at its start: the oldest (F - 1) % 4 frames are
        dropped, so the clip's last frame is always encoded and a stream continues from it. (diffusers
        would drop the newest ones instead.) Raises VideoError for a clip it cannot encode."""
        if pixels.ndim != 5 or pixels.shape[2] != 3:
            raise VideoError(f"the clip to encode must be (B, F, 3, H, W) pixels, not {tuple(pixels.shape)}")
        frames, height, width = pixels.shape[1], pixels.shape[3], pixels.shape[4]
        if frames < 1:
            raise VideoError("the clip to encode has no frames: give at least one")
        if height % self.scale or width % self.scale or height < self.scale or width < self.scale:
            raise VideoError(f"the clip's frames are {height}x{width}: the Wan VAE needs sides that are multiples "
                             f"of {self.scale}; resize the clip first")
        keep = video_frames(latent_frames(frames))
        clip = pixels[:, frames - keep:].to(self.device, self.dtype).permute(0, 2, 1, 3, 4)  # (B, 3, F', H, W)
        with torch.no_grad():
            mu = self.autoencoder.encode(clip).latent_dist.mode()  # (B, C, n, h, w)
        return self.normalize(mu.permute(0, 2, 1, 3, 4))  # (B, n, C, h, w)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model latents (B, n, C, h, w), a whole video -> pixels (B, 1 + 4 (n - 1), 3, h s, w s),
        float32, in [-1, 1]: diffusers' own decode of the whole latent video in one call."""
        _check_latents(latents, self.channels)
        z = self.denormalize(latents).to(self.device, self.dtype).permute(0, 2, 1, 3, 4)  # (B, C, n, h, w)
        with torch.no_grad():
            pixels = self.autoencoder.decode(z).sample  # (B, 3, F, H, W)
        return pixels.float().permute(0, 2, 1, 3, 4).clamp(-1, 1)

    def stream_decoder(self) -> "WanStreamDecoder":
        """A decoder for one video, fed its latents chunk by chunk (see `WanStreamDecoder`)."""
        return WanStreamDecoder(self)


class WanStreamDecoder:
    """Decodes one latent video chunk by chunk, carrying the causal convolutions' feature cache from
    call to call: the frames of all calls together equal `WanVAE.decode` of the whole latent video.

        decoder = vae.stream_decoder()
        for chunk in chunks:                  # (B, n, C, h, w) model latents, n >= 1 (3 in Self-Forcing)
            frames = decoder.decode(chunk)    # (B, 4n, 3, H, W) in [-1, 1]; 4n - 3 for the first chunk

    The cache holds two frames of features per convolution, whatever the video's length. One
    decoder per video (and per batch: the batch size is fixed by the first chunk); `reset()` starts
    a new video."""

    def __init__(self, vae: WanVAE):
        self.vae = vae
        autoencoder = vae.autoencoder
        conv = type(autoencoder.post_quant_conv)  # WanCausalConv3d: each one owns a slot of the cache
        self._slots = sum(isinstance(m, conv) for m in autoencoder.decoder.modules())
        # diffusers >= 0.35 tells the decoder which call is a video's first (Wan2.2's residual upsampling)
        self._first_chunk_arg = "first_chunk" in inspect.signature(autoencoder.decoder.forward).parameters
        self.reset()

    def reset(self) -> None:
        """Forget the video decoded so far: the next chunk is a new video's first."""
        self._cache: list = [None] * self._slots
        self._batch: int | None = None
        self.latent_frames = 0  # latent frames decoded so far
        self.video_frames = 0  # video frames returned so far

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The next chunk of model latents (B, n, C, h, w), n >= 1 -> its video frames
        (B, 4n, 3, h s, w s) (4n - 3 for the video's first chunk), float32, in [-1, 1]."""
        _check_latents(latents, self.vae.channels)
        if self._batch is not None and latents.shape[0] != self._batch:
            raise ValueError(f"this stream decodes a batch of {self._batch}, not {latents.shape[0]}: "
                             "use one stream decoder per batch")
        self._batch = latents.shape[0]
        autoencoder = self.vae.autoencoder
        z = self.vae.denormalize(latents).to(self.vae.device, self.vae.dtype).permute(0, 2, 1, 3, 4)  # (B, C, n, h, w)
        out = []
        with torch.no_grad():
            x = autoencoder.post_quant_conv(z)  # a 1x1x1 convolution: nothing to carry across chunks
            for i in range(x.shape[2]):
                extra = {"first_chunk": self.latent_frames == 0} if self._first_chunk_arg else {}
                out.append(autoencoder.decoder(x[:, :, i:i + 1], feat_cache=self._cache, feat_idx=[0], **extra))
                self.latent_frames += 1
        pixels = torch.cat(out, dim=2).float().permute(0, 2, 1, 3, 4).clamp(-1, 1)  # (B, F, 3, H, W)
        self.video_frames += pixels.shape[1]
        return pixels


def _check_latents(latents: torch.Tensor, channels: int) -> None:
    if latents.ndim != 5 or latents.shape[2] != channels or latents.shape[1] < 1:
        raise ValueError(f"latents must be (B, n, {channels}, h, w) with n >= 1, not {tuple(latents.shape)}")
