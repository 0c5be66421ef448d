"""Model configurations, the contract of a model folder's config.json, and size presets.

`ModelConfig` describes the FAR-style family (SCD encoder + decoder, or the causal baseline);
each family's config carries the same data contract (channels, latent size, frame size, fps,
codec, default steps) so the frame loop, the codecs and the video files read any of them alike.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from scd.checks import MAX_SAMPLES
from scd.errors import ConfigError

ARCHS = ("scd", "baseline")
DECODER_COMBINES = ("token_concat", "add", "concat", "token_concat_with_proj")
CONDITIONS = (None, "action", "label")
# Classifier-free guidance: "null" compares with the null action / label; "decoder" (the official SCD
# evaluation's `cfg_type: decoder`) keeps the condition and noises the encoder features instead.
GUIDANCE_MODES = ("null", "decoder")
FORMAT_VERSION = 1
# Sizes a config may declare (far above any published model): a config beyond them is refused
# before anything is built, so a corrupt or hostile config.json cannot exhaust memory or time.
LIMITS = {"num_heads": 256, "head_dim": 1024, "layers": 1024, "channels": 4096, "patch_size": 64,
          "latent_size": 8192, "num_classes": 1_000_000, "default_steps": 10_000}


CODEC_TYPES = ("pixel", "dcae", "wan")


@dataclass(frozen=True)
class CodecConfig:
    """How a model's frames become latents: `pixel` (latents are the frames in [-1, 1]) or `dcae`
    (an autoencoder in the folder's `codec/`, latents times `scaling_factor`, `downsample` pixels
    per latent along each side). Round-trips through config.json's `codec` entry."""

    type: str = "pixel"
    scaling_factor: float | None = None
    downsample: int | None = None

    def __post_init__(self):
        if self.type not in CODEC_TYPES:
            raise ConfigError(f"unknown codec type {self.type!r}: this scd knows {', '.join(CODEC_TYPES)}")
        factor = self.scaling_factor
        if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float))
                                   or not math.isfinite(factor) or factor <= 0):
            raise ConfigError(f"codec scaling_factor must be a positive number, not {factor!r}")
        down = self.downsample
        if down is not None and (isinstance(down, bool) or not isinstance(down, int) or not 1 <= down <= 1024):
            raise ConfigError(f"codec downsample must be an integer in 1..1024, not {down!r}")

    @property
    def is_pixel(self) -> bool:
        return self.type == "pixel"

    @classmethod
    def from_dict(cls, data) -> "CodecConfig":
        if isinstance(data, CodecConfig):
            return data
        if not isinstance(data, dict):
            raise ConfigError(f"codec must be a mapping such as {{\"type\": \"pixel\"}}, not {data!r}")
        unknown = sorted(set(data) - {"type", "scaling_factor", "downsample"})
        if unknown:
            raise ConfigError(f"unknown codec fields {unknown}: this config was written by a newer scd, upgrade it")
        return cls(**data)

    def to_dict(self) -> dict:
        """The config.json entry: only the fields that are set."""
        return {k: v for k, v in (("type", self.type), ("scaling_factor", self.scaling_factor),
                                  ("downsample", self.downsample)) if v is not None}


class ConfigFile:
    """The config.json round trip every family's config shares (a frozen dataclass with a `codec`)."""

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["codec"] = self.codec.to_dict()
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}: this config was written by a newer scd, upgrade it")
        version = data.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or isinstance(version, bool):
            raise ConfigError(f"format_version must be an integer, not {version!r}")
        if version > FORMAT_VERSION:
            raise ConfigError(f"config format {data['format_version']} is newer than this scd ({FORMAT_VERSION}): upgrade scd")
        try:
            return cls(**data)
        except TypeError as err:
            raise ConfigError(f"invalid model config: {err}") from None


@dataclass(frozen=True)
class ModelConfig(ConfigFile):
    """Architecture and data contract of one model folder; round-trips through `config.json`.

    `layers` is the total depth: the baseline runs all of them at every denoising step; SCD splits
    them into `layers - decoder_layers` encoder blocks and `decoder_layers` decoder blocks.
    """

    arch: str = "scd"
    num_heads: int = 16
    head_dim: int = 64
    channels: int = 32
    patch_size: int = 1
    rope_axes: tuple[int, int, int] = (16, 24, 24)
    layers: int = 12
    decoder_layers: int = 4
    decoder_combine: str = "token_concat"
    condition: str | None = "action"
    num_classes: int = 4
    encoder_noise: float = 0.0
    encoder_norm_unconditional: bool = False
    latent_size: tuple[int, int] = (8, 8)
    frame_size: tuple[int, int] = (128, 128)
    fps: float = 8.0
    action_names: tuple[str, ...] = ()
    codec: CodecConfig = field(default_factory=CodecConfig)
    default_steps: int = 50
    default_guidance: float = 1.0
    # samples drawn per frame, their per-element median kept and fed back (scd.sampling.Rollout's `samples`)
    default_samples: int = 1
    guidance_mode: str = "null"
    context_frames: int = 16  # prompt frames the model is given by default; 0: it generates from pure noise
    # the most frames of context it attends to (its training clips less one): a stream keeps that many
    # in its KV cache; None: everything it is given, as the references generate
    window: int | None = None
    # attention sinks: a stream's first `sink_frames` frames stay in its KV cache beside the rolling
    # window, always seen `sink_distance` frames before the window's oldest frame (as in training),
    # however far back they really are. They hold what does not move (a world's scene); 0: none
    sink_frames: int = 0
    sink_distance: int = 32
    demo: str | None = None  # "world": the model's demo prompt is a clip of scd.world
    format_version: int = FORMAT_VERSION

    family = "far"
    sampler = "euler"  # flow-matching Euler steps along `scd.sampling.sigma_schedule`
    chunk_frames = 1  # frames generated per stream step

    def __post_init__(self):
        for name in ("rope_axes", "latent_size", "frame_size", "action_names"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "codec", CodecConfig.from_dict(self.codec))
        self.validate()

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def encoder_layers(self) -> int:
        return self.layers - self.decoder_layers

    @property
    def depth(self) -> str:
        """The layers in words: "4 encoder + 2 decoder" (SCD) or "6" (baseline)."""
        return f"{self.encoder_layers} encoder + {self.decoder_layers} decoder" if self.arch == "scd" else f"{self.layers}"

    @property
    def decoder_input(self) -> str | None:
        """How SCD's decoder takes the encoder's features (None for the baseline, which has no decoder)."""
        return self.decoder_combine if self.arch == "scd" else None

    @property
    def architecture(self) -> str:
        """One phrase for the model's structure, as every card and report says it."""
        if self.arch == "scd":
            return (f"SCD, {self.encoder_layers} encoder + {self.decoder_layers} decoder blocks, "
                    f"decoder input {self.decoder_combine}")
        return f"causal baseline, {self.layers} blocks"

    @property
    def tokens_per_frame(self) -> int:
        return (self.latent_size[0] // self.patch_size) * (self.latent_size[1] // self.patch_size)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def accepts_latent_size(self, size: tuple[int, int]) -> bool:
        return tuple(size) == self.latent_size

    def validate(self) -> None:
        integers = ("num_heads", "head_dim", "channels", "patch_size", "layers", "decoder_layers", "num_classes",
                    "default_steps", "default_samples", "format_version")
        wrong = [n for n in integers if not isinstance(getattr(self, n), int) or isinstance(getattr(self, n), bool)]
        wrong += [n for n in ("rope_axes", "latent_size", "frame_size")
                  if not all(isinstance(v, int) and not isinstance(v, bool) for v in getattr(self, n))]
        if wrong:
            raise ConfigError(f"invalid model config: {', '.join(wrong)} must be integers")
        problems = []
        for name, limit in LIMITS.items():
            value = getattr(self, name) if name != "latent_size" else max(self.latent_size, default=0)
            if value > limit:
                problems.append(f"{name} {value} is over the limit of {limit}")
        if self.arch not in ARCHS:
            problems.append(f"arch must be one of {ARCHS}, not {self.arch!r}")
        if self.decoder_combine not in DECODER_COMBINES:
            problems.append(f"decoder_combine must be one of {DECODER_COMBINES}, not {self.decoder_combine!r}")
        if self.condition not in CONDITIONS:
            problems.append(f"condition must be 'action', 'label' or null, not {self.condition!r}")
        if min(self.num_heads, self.head_dim, self.channels, self.patch_size, self.layers) < 1:
            problems.append("heads, head_dim, channels, patch_size and layers must be positive")
        if len(self.rope_axes) != 3 or sum(self.rope_axes) != self.head_dim or any(a % 2 for a in self.rope_axes):
            problems.append(f"rope_axes {self.rope_axes} must be three even numbers summing to head_dim {self.head_dim}")
        if self.arch == "scd" and not 1 <= self.decoder_layers < self.layers:
            problems.append(f"an SCD model needs 1 <= decoder_layers < layers, got {self.decoder_layers} of {self.layers}")
        if self.arch == "baseline" and self.decoder_layers != 0:
            problems.append("a baseline model has decoder_layers = 0")
        for name in ("latent_size", "frame_size"):
            if len(getattr(self, name)) != 2 or min(getattr(self, name)) < 1:
                problems.append(f"{name} must be two positive integers, not {getattr(self, name)}")
        if self.patch_size >= 1 and any(s % self.patch_size for s in self.latent_size):
            problems.append(f"latent size {self.latent_size} is not divisible by patch size {self.patch_size}")
        if self.default_steps < 1:
            problems.append("default_steps must be >= 1")
        if not 1 <= self.default_samples <= MAX_SAMPLES:
            problems.append(f"default_samples must be >= 1 and <= {MAX_SAMPLES}")
        if not isinstance(self.fps, (int, float)) or isinstance(self.fps, bool) or not 0 < self.fps <= 1000:
            problems.append(f"fps must be a number in (0, 1000], not {self.fps!r}")
        if self.window is not None and (not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1):
            problems.append(f"window must be an integer >= 1 or null, not {self.window!r}")
        if self.context_frames is not None and (not isinstance(self.context_frames, int) or self.context_frames < 0):
            problems.append(f"context_frames must be an integer >= 0 or null, not {self.context_frames!r}")
        for name, low in (("sink_frames", 0), ("sink_distance", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                problems.append(f"{name} must be an integer >= {low}, not {value!r}")
        if self.sink_frames and self.window is None:
            problems.append("sink_frames needs a window (sinks stay beside a rolling window of context)")
        if self.guidance_mode not in GUIDANCE_MODES:
            problems.append(f"guidance_mode must be one of {GUIDANCE_MODES}, not {self.guidance_mode!r}")
        elif self.guidance_mode == "decoder" and self.arch != "scd":
            problems.append("guidance_mode decoder noises SCD encoder features: a baseline guides by the null condition")
        if self.condition and self.num_classes < 1:
            problems.append("a conditioned model needs num_classes >= 1")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    def matched(self) -> "ModelConfig":
        """The counterpart of the same width and total depth: SCD <-> baseline."""
        if self.arch == "scd":
            return dataclasses.replace(self, arch="baseline", decoder_layers=0, guidance_mode="null")
        return dataclasses.replace(self, arch="scd", decoder_layers=max(1, self.layers // 3))



    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        """The config.json at `path`, of whichever family it names."""
        return load_config(path)


def default_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Rotary dims per (frame, row, col) axis for a head dim: FAR's proportions, (16, 24, 24) at 64
    (1/4 for time, 3/8 for each spatial axis), rounded to even numbers for other sizes."""
    if head_dim % 2 or head_dim < 6:
        raise ConfigError(f"head_dim must be an even number >= 6 to split among three rotary axes, got {head_dim}",
                          parameter="head_dim")
    side = (head_dim - head_dim // 4) // 4 * 2
    return head_dim - 2 * side, side, side


# ----------------------------------------------------------------------------- presets

# name: (attention heads, blocks); every reference size has head dim 64, 32 latent channels, patch 1
PRESETS = {"B": (12, 12), "M": (16, 12), "L": (16, 24), "XL": (18, 28)}
PRESET_HEAD_DIM, PRESET_CHANNELS, PRESET_PATCH, PRESET_ROPE = 64, 32, 1, (16, 24, 24)


def preset_sizes(name: str) -> dict:
    """The ModelConfig fields of a reference size: heads, head dim, channels, patch, RoPE, layers."""
    if str(name).upper() not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    heads, layers = PRESETS[str(name).upper()]
    return dict(num_heads=heads, head_dim=PRESET_HEAD_DIM, channels=PRESET_CHANNELS, patch_size=PRESET_PATCH,
                rope_axes=PRESET_ROPE, layers=layers)


def preset(name: str, **overrides) -> ModelConfig:
    """Reference sizes: B 12x64, M 16x64, L 16x64 x 24 layers, XL 18x64 x 28 layers; DC-AE latents
    (32 channels, patch 1). SCD splits the depth 2:1 between encoder and decoder, as the paper's 8+4."""
    base = preset_sizes(name)
    base["decoder_layers"] = base["layers"] // 3
    base.update(overrides)
    if base.get("arch") == "baseline":
        base["decoder_layers"] = 0
    return ModelConfig(**base)


# ----------------------------------------------------------------------------- the Wan2.1 family

WAN_ARCHS = ("baseline", "scd")  # a causal Wan (Self-Forcing, CausVid): every step runs every block; SCD from Wan
WAN_DECODER_COMBINES = ("token_concat", "add")
# what SCD-Wan's encoder sees of the frame being made: "noise" (the paper: a noised version of it in
# training, at the top of the noise levels; pure noise when generating) or "none" (only the clean past)
WAN_ENCODER_INPUTS = ("noise", "none")
WAN_CONDITIONS = ("text", "action")
WAN_SAMPLERS = ("renoise", "euler")


@dataclass(frozen=True)
class WanConfig(ConfigFile):
    """A causal Wan2.1 text-to-video transformer streamed in chunks (Self-Forcing's `CausalWanModel`
    with its inference pipeline's settings); round-trips through config.json (`family: "wan"`).

    Sizes are Wan's own (`dim`, `ffn_dim`, `num_heads`, `num_layers`, `text_dim`, `text_len`,
    `freq_dim`, `patch_size`); the stream generates `chunk_frames` latent frames at a time,
    denoised along `denoising_steps` (Self-Forcing's list, warped onto the shifted schedule when
    `warp_steps`), and keeps `local_attn_size` frames in its cache, the first `sink_size` of the
    video always among them (None: every frame). `latent_size` is the default size of a frame in
    latents (H/8, W/8); the model runs any multiple of the patch size.
    """

    family: str = "wan"
    arch: str = "baseline"
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    num_heads: int = 12
    num_layers: int = 30
    text_dim: int = 4096
    text_len: int = 512
    channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    chunk_frames: int = 3
    local_attn_size: int | None = None
    sink_size: int = 0
    denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)
    warp_steps: bool = True
    timestep_shift: float = 5.0
    context_noise: float = 0.0  # timestep of the clean pass that writes a finished chunk into the cache
    latent_size: tuple[int, int] = (60, 104)
    frame_size: tuple[int, int] = (480, 832)
    fps: float = 16.0
    codec: CodecConfig = field(default_factory=lambda: CodecConfig(type="wan", downsample=8))
    context_frames: int = 0  # latent frames of a prompt clip it is given by default (0: text alone)
    # where its text encoder and VAE come from: a Hub repo (owner/name@revision) or a folder in the
    # layout of Wan-AI/Wan2.1-T2V-1.3B-Diffusers (tokenizer/, text_encoder/, vae/, transformer/config.json)
    base: str | None = None
    # SCD from Wan (arch "scd"): `encoder_layers` blocks run once per chunk over the history, then
    # `decoder_layers` blocks run at every step on the noisy chunk, frame by frame, with the encoder's
    # features of that frame (`decoder_combine`); num_layers is their sum. `source_blocks`: the
    # baseline blocks each came from (encoder's, then decoder's), as converted.
    encoder_layers: int = 0
    decoder_layers: int = 0
    decoder_combine: str = "token_concat"
    encoder_input: str = "noise"
    encoder_noise_min: float = 0.8  # training: the current frame's noise level for the encoder, at least this sigma
    source_blocks: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    # what conditions it: "text" (umT5 embeddings through cross-attention, Wan2.1's own) or "action"
    # (a world model: each frame's action, one of `num_classes` plus the null action, embedded and added
    # to the frame's time embedding, so it modulates every block; no text, no cross-attention)
    condition: str = "text"
    num_classes: int = 0
    action_names: tuple[str, ...] = ()
    # how a stream denoises: "renoise" (Self-Forcing's sampler over `denoising_steps`, chunk by chunk)
    # or "euler" (flow-matching Euler steps, one frame at a time, as the FAR-style family; its number of
    # steps by default is the length of `denoising_steps`)
    sampler: str = "renoise"
    demo: str | None = None  # "world": its default prompt is a clip of the synthetic world
    format_version: int = FORMAT_VERSION

    guidance_mode = "null"
    default_guidance = 1.0
    default_samples = 1  # a chunked, re-noising stream draws one sample per frame
    encoder_noise = 0.0

    def __post_init__(self):
        object.__setattr__(self, "action_names", tuple(self.action_names))
        for name in ("patch_size", "latent_size", "frame_size", "denoising_steps"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.source_blocks is not None:
            object.__setattr__(self, "source_blocks", tuple(tuple(b) for b in self.source_blocks))
        object.__setattr__(self, "codec", CodecConfig.from_dict(self.codec))
        if self.local_attn_size == -1:  # Self-Forcing's spelling of "global attention"
            object.__setattr__(self, "local_attn_size", None)
        self.validate()

    # the data contract every family shares (scd.sampling, the codecs and the CLI read these)
    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def width(self) -> int:
        return self.dim

    @property
    def layers(self) -> int:
        return self.num_layers

    @property
    def depth(self) -> str:
        return (f"{self.encoder_layers} encoder + {self.decoder_layers} decoder" if self.arch == "scd"
                else f"{self.num_layers}")

    @property
    def decoder_input(self) -> str | None:
        return self.decoder_combine if self.arch == "scd" else None

    @property
    def architecture(self) -> str:
        """One phrase for the model's structure, as cards and reports say it."""
        window = "global attention" if self.local_attn_size is None else (
            f"a rolling window of {self.local_attn_size} frames, {self.sink_size} sink")
        if self.arch == "scd":
            return (f"SCD from Wan2.1, {self.encoder_layers} encoder + {self.decoder_layers} decoder blocks, decoder "
                    f"input {self.decoder_combine}, encoder input {self.encoder_input}, chunks of {self.chunk_frames} "
                    f"latent frames, {window}")
        return f"causal Wan2.1, {self.num_layers} blocks, chunks of {self.chunk_frames} latent frames, {window}"

    @property
    def cached_layers(self) -> int:
        """Blocks whose keys and values a stream caches: all of a causal Wan, the encoder's of SCD."""
        return self.encoder_layers if self.arch == "scd" else self.num_layers

    @property
    def tokens_per_frame(self) -> int:
        return (self.latent_size[0] // self.patch_size[1]) * (self.latent_size[1] // self.patch_size[2])

    @property
    def default_steps(self) -> int:
        return len(self.denoising_steps)

    @property
    def window(self) -> int | None:
        return self.local_attn_size

    @property
    def null_class(self) -> int:
        """The null action's index (after the real ones, as the FAR-style family); 0 for text."""
        return self.num_classes if self.condition == "action" else 0

    def accepts_latent_size(self, size: tuple[int, int]) -> bool:
        return all(s >= p and s % p == 0 for s, p in zip(size, self.patch_size[1:]))

    def validate(self) -> None:
        integers = ("dim", "ffn_dim", "freq_dim", "num_heads", "num_layers", "text_dim", "text_len", "channels",
                    "chunk_frames", "sink_size", "format_version")
        wrong = [n for n in integers if not isinstance(getattr(self, n), int) or isinstance(getattr(self, n), bool)]
        wrong += [n for n in ("patch_size", "latent_size", "frame_size", "denoising_steps")
                  if not all(isinstance(v, int) and not isinstance(v, bool) for v in getattr(self, n))]
        if self.local_attn_size is not None and (not isinstance(self.local_attn_size, int)
                                                 or isinstance(self.local_attn_size, bool)):
            wrong.append("local_attn_size")
        if wrong:
            raise ConfigError(f"invalid Wan config: {', '.join(wrong)} must be integers")
        problems = []
        limits = {"dim": 65536, "ffn_dim": 262144, "num_heads": 256, "num_layers": 1024, "text_dim": 65536,
                  "text_len": 65536, "channels": 4096, "freq_dim": 65536, "chunk_frames": 1024}
        problems += [f"{n} {getattr(self, n)} is over the limit of {v}" for n, v in limits.items() if getattr(self, n) > v]
        if self.family != "wan":
            problems.append(f"family must be 'wan', not {self.family!r}")
        if self.arch not in WAN_ARCHS:
            problems.append(f"arch must be one of {WAN_ARCHS}, not {self.arch!r}")
        if min(self.dim, self.ffn_dim, self.freq_dim, self.num_heads, self.num_layers, self.text_dim, self.text_len,
               self.channels, self.chunk_frames) < 1:
            problems.append("sizes must be positive")
        elif self.dim % self.num_heads or self.head_dim % 2 or self.head_dim < 6:
            problems.append(f"dim {self.dim} must split into {self.num_heads} heads of an even size >= 6")
        if self.freq_dim % 2:
            problems.append(f"freq_dim must be even, not {self.freq_dim}")
        if len(self.patch_size) != 3 or min(self.patch_size, default=0) < 1 or self.patch_size[0] != 1:
            problems.append(f"patch_size must be (1, p, q), not {self.patch_size}: a causal stream patches no time")
        for name in ("latent_size", "frame_size"):
            if len(getattr(self, name)) != 2 or min(getattr(self, name)) < 1:
                problems.append(f"{name} must be two positive integers, not {getattr(self, name)}")
        if len(self.patch_size) == 3 and len(self.latent_size) == 2 and not self.accepts_latent_size(self.latent_size):
            problems.append(f"latent size {self.latent_size} is not divisible by patch {self.patch_size[1:]}")
        if not self.denoising_steps or any(not 0 < s <= 1000 for s in self.denoising_steps):
            problems.append(f"denoising_steps must be timesteps in 1..1000, not {self.denoising_steps}")
        if self.local_attn_size is not None:
            if self.local_attn_size < self.chunk_frames + self.sink_size:
                problems.append(f"local_attn_size {self.local_attn_size} must hold a chunk of {self.chunk_frames} "
                                f"frames beside {self.sink_size} sink frames")
        elif self.sink_size:
            problems.append("sink_size needs a local_attn_size (a rolling window)")
        if self.sink_size < 0:
            problems.append("sink_size must be >= 0")
        if not isinstance(self.fps, (int, float)) or isinstance(self.fps, bool) or not 0 < self.fps <= 1000:
            problems.append(f"fps must be a number in (0, 1000], not {self.fps!r}")
        for name in ("timestep_shift", "eps", "context_noise"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                problems.append(f"{name} must be a number >= 0, not {value!r}")
        if not isinstance(self.context_frames, int) or self.context_frames < 0:
            problems.append(f"context_frames must be an integer >= 0, not {self.context_frames!r}")
        if self.base is not None and not isinstance(self.base, str):
            problems.append(f"base must be a Hub repo id or a folder, not {self.base!r}")
        if self.arch == "scd":
            if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                       for n in (self.encoder_layers, self.decoder_layers)):
                problems.append("an SCD model needs encoder_layers >= 1 and decoder_layers >= 1")
            elif self.num_layers != self.encoder_layers + self.decoder_layers:
                problems.append(f"num_layers {self.num_layers} must be encoder_layers + decoder_layers "
                                f"({self.encoder_layers} + {self.decoder_layers})")
            if self.decoder_combine not in WAN_DECODER_COMBINES:
                problems.append(f"decoder_combine must be one of {WAN_DECODER_COMBINES}, not {self.decoder_combine!r}")
            if self.encoder_input not in WAN_ENCODER_INPUTS:
                problems.append(f"encoder_input must be one of {WAN_ENCODER_INPUTS}, not {self.encoder_input!r}")
            if isinstance(self.encoder_noise_min, bool) or not isinstance(self.encoder_noise_min, (int, float)) \
                    or not 0 <= self.encoder_noise_min <= 1:
                problems.append(f"encoder_noise_min must be a sigma in [0, 1], not {self.encoder_noise_min!r}")
        elif self.encoder_layers or self.decoder_layers:
            problems.append("a causal Wan (arch baseline) has no encoder or decoder layers")
        if self.condition not in WAN_CONDITIONS:
            problems.append(f"condition must be one of {WAN_CONDITIONS}, not {self.condition!r}")
        elif self.condition == "action":
            if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
                problems.append(f"an action-conditioned model needs num_classes >= 1, not {self.num_classes!r}")
            elif self.action_names and len(self.action_names) != self.num_classes:
                problems.append(f"{len(self.action_names)} action names for {self.num_classes} actions")
        if self.sampler not in WAN_SAMPLERS:
            problems.append(f"sampler must be one of {WAN_SAMPLERS}, not {self.sampler!r}")
        elif self.sampler == "euler" and self.chunk_frames != 1:
            problems.append("the euler sampler makes one frame at a time: chunk_frames must be 1")
        if problems:
            raise ConfigError("invalid Wan config: " + "; ".join(problems))



# Wan2.1-T2V-1.3B, as Self-Forcing streams it (chunks of 3 latent frames, global attention, 4 steps)
WAN_PRESETS = {"1.3B": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_dim=4096, text_len=512,
                            channels=16, freq_dim=256)}


def config_from_dict(data: dict):
    """The config of any family from a config.json's object: `family` names it (absent: the FAR-style
    family, as every config before the Wan family)."""
    if not isinstance(data, dict):
        raise ConfigError("a model config must be a JSON object")
    family = data.get("family", "far")
    if family == "wan":
        return WanConfig.from_dict(data)
    if family != "far":
        raise ConfigError(f"unknown model family {family!r}: this scd runs 'far' and 'wan'; upgrade it for others")
    return ModelConfig.from_dict({k: v for k, v in data.items() if k != "family"})


def load_config(path: Path):
    """Read a config.json of any family (`config_from_dict`)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return config_from_dict(data)
