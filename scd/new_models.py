"""Configs of models trained from scratch (training without an initial model): a FAR-style SCD or
baseline (`new_config`) or a Wan-architecture one (`new_wan_config`) for the synthetic world or a
dataset's latents, and the note on a small Wan's rotary split (`wan_rotary_note`)."""

from __future__ import annotations

from dataclasses import dataclass

from scd.errors import ConfigError
from scd.models import ARCHS, ModelConfig, default_rope_axes


def new_wan_config(arch: str = "baseline", heads: int = 4, head_dim: int = 16, layers: int = 6, decoder_layers: int = 2,
                   decoder_combine: str = "token_concat", patch_size: int = 4, frame_size: int = 32, default_steps: int = 4,
                   context_frames: int = 3, world_demo: bool = True, data_fields: dict | None = None):
    """The config of a new Wan-architecture world model (`scd.models.WanConfig`): Wan2.1's blocks at
    width heads x head_dim (FFN 4x), on pixels in patches of `patch_size`, frame by frame with the
    Euler sampler, each frame's action added to its time embedding (no text), a rolling window of
    `context_frames` frames plus the one being made. arch "baseline" is the causal Wan; "scd" an SCD
    from Wan of `layers` encoder and `decoder_layers` decoder blocks (the paper converts a trained
    causal one instead: `scd convert --to scd`)."""
    from scd import world
    from scd.models import WanConfig
    from scd.sampling import even_steps

    if data_fields is not None:
        raise ConfigError("a new Wan model trains on the synthetic world (data 'world'); post-train a converted Wan "
                          "model on a dataset from its folder (init)", parameter="family")
    if arch not in ARCHS:
        raise ConfigError(f"arch must be one of {', '.join(ARCHS)}, not {arch!r}", parameter="arch")
    dim = heads * head_dim
    split = dict(encoder_layers=layers, decoder_layers=decoder_layers, decoder_combine=decoder_combine,
                 num_layers=layers + decoder_layers) if arch == "scd" else dict(num_layers=layers)
    return WanConfig(arch=arch, dim=dim, ffn_dim=4 * dim, freq_dim=dim, num_heads=heads, channels=3,
                     patch_size=(1, patch_size, patch_size), chunk_frames=1, local_attn_size=context_frames + 1,
                     denoising_steps=even_steps(default_steps), latent_size=(frame_size,) * 2,
                     frame_size=(frame_size,) * 2, fps=8.0, codec={"type": "pixel"}, condition="action",
                     num_classes=len(world.ACTIONS), action_names=world.ACTIONS, sampler="euler",
                     context_frames=context_frames, demo="world" if world_demo else None, **split)


MIN_SPATIAL_ROTARY = 6  # rotary channels per spatial axis below which a world Wan learns positions slowly


@dataclass
class RotaryNote:
    """Why a small Wan may learn where things are slowly, and a head split of the same width that
    gives each spatial axis more rotary channels (heads and head_dim None: none divides it)."""
    message: str
    heads: int | None = None
    head_dim: int | None = None


def wan_rotary_note(config) -> RotaryNote | None:
    """A RotaryNote when Wan's rotary split (2 * (head_dim // 6) channels per spatial axis) leaves
    an axis under MIN_SPATIAL_ROTARY channels (docs/training.md measures 4 against 10), else None."""
    from scd.models.wan import wan_rope_axes

    frames, rows, _ = wan_rope_axes(config.head_dim)
    if rows >= MIN_SPATIAL_ROTARY:
        return None
    found = f"at head dim {config.head_dim} Wan's rotary split gives each spatial axis {rows} channels and time {frames}"
    better = next((d for d in (24, 32, 48, 64) if config.dim % d == 0), None)
    if better is None:
        return RotaryNote(f"{found}: such a model learns where objects are slowly; use a head dim of 24 or more")
    heads = config.dim // better
    return RotaryNote(f"{found}: such a model learns where objects are slowly; the same width as {heads} "
                      f"head{'s' * (heads > 1)} of {better} gives each axis {wan_rope_axes(better)[1]}", heads, better)


def new_config(arch: str = "scd", heads: int = 4, head_dim: int = 16, layers: int = 6, decoder_layers: int = 2,
               decoder_combine: str = "token_concat", patch_size: int = 4, frame_size: int = 32, default_steps: int = 8,
               context_frames: int = 7, world_demo: bool = True, data_fields: dict | None = None) -> ModelConfig:
    """The config of a new pixel-space model for the synthetic world's actions (or a video folder
    with the same action names): square frames of `frame_size`, RoPE split by
    `scd.models.default_rope_axes`; SCD's encoder adds the reference's feature noise (0.05).
    `data_fields` (scd.data.model_fields of a dataset) replace the world's latent shape, frame
    size, codec, frame rate and conditioning."""
    from scd import world

    if arch not in ARCHS:
        raise ConfigError(f"arch must be one of {', '.join(ARCHS)}, not {arch!r}", parameter="arch")
    fields = dict(channels=3, condition="action", num_classes=len(world.ACTIONS), latent_size=(frame_size,) * 2,
                  frame_size=(frame_size,) * 2, fps=8.0, action_names=world.ACTIONS)
    return ModelConfig(arch=arch, num_heads=heads, head_dim=head_dim, patch_size=patch_size,
                       rope_axes=default_rope_axes(head_dim), layers=layers,
                       decoder_layers=decoder_layers if arch == "scd" else 0, decoder_combine=decoder_combine,
                       encoder_noise=0.05 if arch == "scd" else 0.0, default_steps=default_steps,
                       context_frames=context_frames, window=context_frames or None, demo="world" if world_demo else None,
                       **{**fields, **(data_fields or {})})
