"""SCD encoder, SCD decoder and the FAR-style causal baseline, in plain PyTorch.

Reads top-down: configuration, embedders, the KV cache, the block shared by all three models,
the three models, size presets. Parameter names follow the reference implementations (the
official SCD code and FAR), so their state dicts load without renaming.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from scd.compiler import compiled_call
from scd.errors import ConfigError
from scd.flow import add_noise, logit_normal, noised_context, weighted_mse

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


CODEC_TYPES = ("pixel", "dcae")


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


@dataclass(frozen=True)
class ModelConfig:
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
    guidance_mode: str = "null"
    context_frames: int = 16  # prompt frames the model is given by default; 0: it generates from pure noise
    # the most frames of context it attends to (its training clips less one): a stream keeps that many
    # in its KV cache; None: everything it is given, as the references generate
    window: int | None = None
    demo: str | None = None  # "world": the model's demo prompt is a clip of scd.world
    format_version: int = FORMAT_VERSION

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
    def tokens_per_frame(self) -> int:
        return (self.latent_size[0] // self.patch_size) * (self.latent_size[1] // self.patch_size)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def validate(self) -> None:
        integers = ("num_heads", "head_dim", "channels", "patch_size", "layers", "decoder_layers", "num_classes",
                    "default_steps", "format_version")
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
        if not isinstance(self.fps, (int, float)) or isinstance(self.fps, bool) or not 0 < self.fps <= 1000:
            problems.append(f"fps must be a number in (0, 1000], not {self.fps!r}")
        if self.window is not None and (not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1):
            problems.append(f"window must be an integer >= 1 or null, not {self.window!r}")
        if self.context_frames is not None and (not isinstance(self.context_frames, int) or self.context_frames < 0):
            problems.append(f"context_frames must be an integer >= 0 or null, not {self.context_frames!r}")
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

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["codec"] = self.codec.to_dict()
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
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

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read {path}: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(data)


def default_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Rotary dims per (frame, row, col) axis for a head dim: FAR's proportions, (16, 24, 24) at 64
    (1/4 for time, 3/8 for each spatial axis), rounded to even numbers for other sizes."""
    if head_dim % 2 or head_dim < 6:
        raise ConfigError(f"head_dim must be an even number >= 6 to split among three rotary axes, got {head_dim}",
                          parameter="head_dim")
    side = (head_dim - head_dim // 4) // 4 * 2
    return head_dim - 2 * side, side, side


# ----------------------------------------------------------------------------- embedders

def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) timesteps -> (N, dim) float32, cosines first (diffusers' flip_sin_to_cos, shift 1)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1)
    angles = t.float()[:, None] * torch.exp(exponent)[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, width: int, channels: int = 256):
        super().__init__()
        self.linear_1 = nn.Linear(channels, width)
        self.linear_2 = nn.Linear(width, width)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        x = timestep_sinusoid(t).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(x)))


class LabelEmbedding(nn.Module):
    """Class or action table with one extra row, the null index used for guidance."""

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, width)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


def rope_tables(frames: torch.Tensor, rows: int, cols: int, axes: tuple[int, int, int],
                theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for tokens at (frame, row, col), frame-major: (cos, signed sin), each
    (len(frames)*rows*cols, sum(axes)) float32. The sine is negated on the even lanes of each pair,
    so that `apply_rope` rotates with one swap and two multiplies."""
    device = frames.device
    spatial = _spatial_angles(rows, cols, axes, theta, device)  # (T, axes[1] + axes[2])
    time = torch.outer(frames.double(), _frequencies(axes[0], theta, device)).repeat_interleave(2, dim=1)  # (F, axes[0])
    t = rows * cols
    angles = torch.cat([time[:, None].expand(-1, t, -1), spatial[None].expand(len(frames), -1, -1)], -1).flatten(0, 1)
    sign = torch.tensor([-1.0, 1.0], dtype=torch.float32, device=device).repeat(angles.shape[-1] // 2)
    return angles.cos().float(), angles.sin().float() * sign


def _frequencies(dim: int, theta: float, device) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)


def _spatial_angles(rows: int, cols: int, axes: tuple[int, int, int], theta: float, device) -> torch.Tensor:
    """(rows*cols, axes[1] + axes[2]) float64 angles of the row and column axes, pairs interleaved."""
    r = torch.arange(rows, dtype=torch.float64, device=device).repeat_interleave(cols)
    c = torch.arange(cols, dtype=torch.float64, device=device).repeat(rows)
    return torch.cat([torch.outer(r, _frequencies(axes[1], theta, device)).repeat_interleave(2, dim=1),
                      torch.outer(c, _frequencies(axes[2], theta, device)).repeat_interleave(2, dim=1)], 1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (..., hd) by the tables of `rope_tables` (cast to x's dtype
    once, by whoever made them), shaped to broadcast against x: (a, b) -> (a cos - b sin, b cos + a sin)."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (b, a) per pair
    return torch.addcmul(x * cos, swapped, sin)


# ----------------------------------------------------------------------------- KV cache

class KVCache:
    """Preallocated keys and values of every layer for a rolling window of clean frames.

    Frames are written in order into slots 0..capacity-1 and then wrap around, overwriting the
    oldest: attention over cached frames is order-free (no mask between past frames, RoPE applied
    before caching), so a full ring needs no reordering. One spare frame slot past the ring holds
    the baseline's noisy frame, so its attention reads one contiguous span without a concat.
    """

    def __init__(self, layers: int, batch: int, heads: int, head_dim: int, tokens_per_frame: int,
                 capacity: int, device, dtype):
        # one buffer per layer, not views of one: compiled code writes a layer's buffer in place
        # only when no other input aliases it. Zeros, not empty: a masked attention weighs the
        # slots not yet written by 0, and 0 * NaN (old memory) would still be NaN.
        shape = (batch, heads, (capacity + 1) * tokens_per_frame, head_dim)
        self.keys = tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers))
        self.values = tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers))
        self.tokens_per_frame = tokens_per_frame
        self.capacity = capacity
        self.frames = 0  # frames written so far, including overwritten ones

    @property
    def cached_frames(self) -> int:
        return min(self.frames, self.capacity)

    @property
    def buffers(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """(keys, values): per layer, (B, H, (capacity + 1) T, hd)."""
        return self.keys, self.values


# ----------------------------------------------------------------------------- the block

class AdaNormZero(nn.Module):
    """LayerNorm modulated by (shift, scale) and a residual gate from the conditioning embedding."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, 3 * width)

    def modulation(self, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """silu(emb) (..., F, D) -> (shift, 1 + scale, gate), each (..., F, 1, D): per frame,
        broadcast over its tokens."""
        shift, scale, gate = self.linear(act).unsqueeze(-2).chunk(3, dim=-1)
        return shift, 1 + scale, gate

    def forward(self, x: torch.Tensor, modulation) -> torch.Tensor:
        shift, scale, _ = modulation
        return torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=1e-6), scale)


class FusedLinear(nn.Linear):
    """`parts` linear layers of the same input stacked into one matmul. Initialised part by part
    as `parts` separate nn.Linear layers would be, in their order (same random draws)."""

    def __init__(self, width: int, out: int, parts: int):
        self.parts = parts
        super().__init__(width, parts * out)

    def reset_parameters(self) -> None:
        for weight, bias in zip(self.weight.chunk(self.parts), self.bias.chunk(self.parts)):
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(weight.shape[1])
            nn.init.uniform_(bias, -bound, bound)


class Attention(nn.Module):
    """Multi-head attention with qk RMSNorm and RoPE. q, k and v are one matmul (`to_qkv`); the
    state dict keeps the references' `to_q`, `to_k`, `to_v` entries, split on save, fused on load."""

    def __init__(self, width: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.to_qkv = FusedLinear(width, heads * head_dim, 3)
        self.norm_q = nn.RMSNorm(head_dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(head_dim, eps=1e-6)
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, width)])
        self.register_state_dict_post_hook(_split_qkv)
        self.register_load_state_dict_pre_hook(_fuse_qkv)

    def forward(self, x, rope, mask=None, cache: tuple[torch.Tensor, torch.Tensor] | None = None, layer: int = 0,
                write_at: int | torch.Tensor | None = None, attend: int | None = None) -> torch.Tensor:
        """x (B, S, D). Without a cache (keys, values of every layer): attend within x. With one: write this chunk's keys at token
        offset `write_at` (an int, or a (S,) index tensor: static shapes) and attend to the cache's
        first `attend` tokens (None: all of it, `mask` saying which to see)."""
        qkv = self.to_qkv(x).unflatten(-1, (3, self.heads, self.head_dim))  # (B, S, 3, H, hd)
        # q and k normed and rotated as one tensor: half the small ops of doing each apart
        weight = torch.stack([self.norm_q.weight, self.norm_k.weight])[:, None]  # (2, 1, hd)
        qk = F.rms_norm(qkv[:, :, :2], (self.head_dim,), eps=self.norm_q.eps) * weight
        cos, sin = rope
        q, k = apply_rope(qk, cos[:, None, None], sin[:, None, None]).permute(2, 0, 3, 1, 4)  # (B, H, S, hd) each
        v = qkv[:, :, 2].transpose(1, 2)
        if cache is not None:
            keys, values = cache[0][layer], cache[1][layer]
            if isinstance(write_at, torch.Tensor):
                keys.index_copy_(2, write_at, k)
                values.index_copy_(2, write_at, v)
            else:
                keys[:, :, write_at:write_at + k.shape[2]] = k
                values[:, :, write_at:write_at + k.shape[2]] = v
            k, v = (keys, values) if attend is None else (keys[:, :, :attend], values[:, :, :attend])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out[0](out.transpose(1, 2).flatten(2))


def _split_qkv(module: Attention, state: dict, prefix: str, local_metadata) -> None:
    for name in ("weight", "bias"):
        fused = state.pop(prefix + "to_qkv." + name)
        for part, tensor in zip(("to_q", "to_k", "to_v"), fused.chunk(3)):
            state[f"{prefix}{part}.{name}"] = tensor.clone()  # its own storage: safetensors refuses shared ones


def _fuse_qkv(module: Attention, state: dict, prefix: str, *args) -> None:
    for name in ("weight", "bias"):
        parts = [f"{prefix}{part}.{name}" for part in ("to_q", "to_k", "to_v")]
        if all(key in state for key in parts):
            state[prefix + "to_qkv." + name] = torch.cat([state.pop(key) for key in parts])


class FeedForward(nn.Module):
    def __init__(self, width: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([nn.Module(), nn.Identity(), nn.Linear(mult * width, width)])
        self.net[0].proj = nn.Linear(width, mult * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class Block(nn.Module):
    """adaLN-Zero transformer block: modulated norm -> attention (qk RMSNorm, RoPE) -> gated
    residual, then the same around a tanh-GELU MLP. Serves the encoder, decoder and baseline."""

    def __init__(self, width: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaNormZero(width)
        self.attn = Attention(width, heads, head_dim)
        self.norm2 = AdaNormZero(width)
        self.mlp = FeedForward(width)

    def modulation(self, act: torch.Tensor) -> tuple:
        """silu(emb) (..., F, D) -> the six (..., F, 1, D) modulation tensors of this block."""
        return self.norm1.modulation(act) + self.norm2.modulation(act)

    def forward(self, x, modulation, rope, mask=None, cache=None, layer=0, write_at=None, attend=None):
        # x (B, F, T, D); modulation: this block's six tensors (B, F, 1, D)
        h = self.attn(self.norm1(x, modulation[:3]).flatten(1, 2), rope, mask, cache, layer, write_at, attend)
        x = torch.addcmul(x, modulation[2], h.view_as(x))
        h = self.mlp(self.norm2(x, modulation[3:]))
        return torch.addcmul(x, modulation[5], h)


class OutputNorm(nn.Module):
    """Final LayerNorm modulated by (scale, shift), in that order, as in the references."""

    def __init__(self, width: int, unconditional: bool = False, noise: float = 0.0):
        super().__init__()
        self.linear = None if unconditional else nn.Linear(width, 2 * width)
        self.noise = noise  # training-time feature noise (SCD encoder)

    def modulation(self, act: torch.Tensor) -> tuple:
        """silu(emb) (..., F, D) -> (1 + scale, shift), each (..., F, 1, D); () when unconditional."""
        if self.linear is None:
            return ()
        scale, shift = self.linear(act).unsqueeze(-2).chunk(2, dim=-1)
        return 1 + scale, shift

    def forward(self, x: torch.Tensor, emb, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, F, T, D); emb: the conditioning (B, F, D) or its `Modulation`. `noise` (like x) is
        added after the norm, before the modulation: decoder guidance's unconditional features (the
        official `cfg_type: decoder`)."""
        modulation = emb.output if isinstance(emb, Modulation) else self.modulation(F.silu(emb))
        x = F.layer_norm(x, x.shape[-1:], eps=1e-6)
        if self.training and self.noise > 0:
            x = x + self.noise * torch.randn_like(x)
        if noise is not None:
            x = x + noise.to(x.dtype)
        if not modulation:
            return x
        scale, shift = modulation
        return torch.addcmul(shift, x, scale)


class Modulation(NamedTuple):
    """Every adaLN projection of a transformer for one conditioning: `blocks[i]` the six tensors of
    block i, `output` those of the output norm; each (..., F, 1, D). Computed once per frame for
    all its denoising steps, and per step only indexed. A tuple, so compiled code takes it as such."""

    blocks: tuple
    output: tuple

    def at(self, k: int) -> "Modulation":
        """Step k of one made with a leading steps dimension (what compiled code indexes)."""
        return Modulation(tuple(tuple(t[k] for t in block) for block in self.blocks), tuple(t[k] for t in self.output))

    def steps(self) -> list["Modulation"]:
        """One made with a leading steps dimension, split into one per step (views)."""
        blocks = [[t.unbind(0) for t in block] for block in self.blocks]
        output = [t.unbind(0) for t in self.output]
        count = len(blocks[0][0]) if blocks else len(output[0])
        return [Modulation(tuple(tuple(t[k] for t in block) for block in blocks), tuple(t[k] for t in output))
                for k in range(count)]

    def tensors(self) -> list[torch.Tensor]:
        return [t for block in self.blocks for t in block] + list(self.output)


class ConditionTable:
    """A transformer's modulation for every condition index (the null one included) at fixed
    timesteps (K,), made once per stream: a frame's conditioning is then one gather instead of the
    embedders and 2L + 1 projections. None from `make` where the table would exceed TABLE_BYTES
    (many classes and many steps: a class-conditioned model computes its conditioning per frame)."""

    def __init__(self, rows: torch.Tensor, outputs: int):
        self.rows = rows  # (A, K, N, D): N = every block's six tensors, then the output norm's
        self.outputs = outputs  # tensors of the output norm (0 when it is unconditional)

    @classmethod
    def make(cls, model: "Transformer", timesteps: torch.Tensor) -> "ConditionTable | None":
        c = model.config
        blocks, k = len(model.transformer_blocks), timesteps.shape[0]
        if not table_fits(c, blocks, k, model.x_embedder.weight.dtype.itemsize):
            return None
        count = c.null_class + 1 if c.condition else 1
        outputs = 0 if model.norm_out.linear is None else 2
        emb = model.timestep_embedder(timesteps)[:, None]  # (K, 1, D)
        labels = torch.arange(count, device=timesteps.device)[None].expand(k, -1) if c.condition else None
        emb = model._add_labels(emb, labels, (k, count)).expand(k, count, -1)
        tensors = model.modulate(emb).tensors()  # each (K, A, 1, D)
        rows = torch.stack([t.squeeze(-2) for t in tensors], 2).transpose(0, 1).contiguous()  # (A, K, N, D)
        return cls(rows, outputs)

    def select(self, conditions: torch.Tensor | None, shape: tuple[int, int]) -> Modulation:
        """The modulation of conditions (B, F) = `shape` (None: the null condition) at a table made
        for one timestep: tensors (B, F, 1, D), as `Transformer.modulate` gives them."""
        rows = self.rows[self._indices(conditions, shape).flatten(), 0].view(*shape, *self.rows.shape[2:])  # (B, F, N, D)
        return self._split(rows.unsqueeze(-2).movedim(-3, 0).unbind(0))

    def steps(self, conditions: torch.Tensor | None, batch: int) -> list[Modulation]:
        """The modulation of each of K steps for conditions (B,) (None: the null condition): one
        Modulation of (B, 1, 1, D) tensors per step, as `Modulation.steps` gives them."""
        rows = self.rows[self._indices(conditions, (batch,))]  # (B, K, N, D)
        return [self._split(step.unbind(0)) for step in rows[:, :, :, None, None].movedim(0, 2).unbind(0)]

    def _indices(self, conditions: torch.Tensor | None, shape: tuple) -> torch.Tensor:
        if conditions is not None:
            return conditions
        return torch.full(shape, self.rows.shape[0] - 1, dtype=torch.long, device=self.rows.device)  # null (or the only row)

    def _split(self, tensors: tuple) -> Modulation:
        blocks = len(tensors) - self.outputs
        return Modulation(tuple(tuple(tensors[i:i + 6]) for i in range(0, blocks, 6)), tuple(tensors[blocks:]))


TABLE_BYTES = 32 << 20  # the largest per-stream conditioning table; beyond it, conditioning is made per frame


def table_fits(config: ModelConfig, layers: int, steps: int, itemsize: int = 4) -> bool:
    """Whether a stream tabulates the conditioning of a part of `layers` blocks at `steps`
    timesteps (`ConditionTable`): every condition index's modulations within TABLE_BYTES."""
    count = config.null_class + 1 if config.condition else 1
    return count * steps * (6 * layers + 2) * config.width * itemsize <= TABLE_BYTES


# ----------------------------------------------------------------------------- the models

def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, F, C, H, W) -> (B, F, T, C*p*p), tokens in row-major order."""
    b, f, c, h, w = x.shape
    x = x.reshape(b, f, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4, 6)
    return x.reshape(b, f, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """(B, F, T, C*p*p) -> (B, F, C, H, W)."""
    b, f, _, cpp = tokens.shape
    c = cpp // (p * p)
    x = tokens.reshape(b, f, h // p, w // p, c, p, p).permute(0, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, f, c, h, w)


def block_causal_mask(frames: int, past_frames: int, tokens_per_frame: int, device) -> torch.Tensor:
    """Boolean (frames*T, (past+frames)*T): a token sees every token of its own and earlier frames."""
    q = torch.arange(frames, device=device).repeat_interleave(tokens_per_frame) + past_frames
    k = torch.arange(past_frames + frames, device=device).repeat_interleave(tokens_per_frame)
    return k[None, :] <= q[:, None]


class Transformer(nn.Module):
    """Shared trunk: token and conditioning embedders, a stack of blocks, the output norm."""

    def __init__(self, config: ModelConfig, layers: int, head: bool, norm_noise: float = 0.0,
                 norm_unconditional: bool = False):
        super().__init__()
        self.config = config
        c, d = config, config.width
        self.x_embedder = nn.Linear(c.channels * c.patch_size ** 2, d)
        self.timestep_embedder = TimestepEmbedding(d)
        if c.condition == "action":
            self.action_embedder = LabelEmbedding(c.num_classes, d)
        elif c.condition == "label":
            self.label_embedder = LabelEmbedding(c.num_classes, d)
        self.transformer_blocks = nn.ModuleList(Block(d, c.num_heads, c.head_dim) for _ in range(layers))
        self.norm_out = OutputNorm(d, norm_unconditional, norm_noise)
        self.proj_out = nn.Linear(d, c.patch_size ** 2 * c.channels) if head else None

    def conditioning(self, timesteps: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """timesteps (B, F) in the model's units (sigma * 1000, -1 for clean); labels (B, F) or None -> (B, F, D)."""
        emb = self.timestep_embedder(timesteps.flatten()).view(*timesteps.shape, -1)
        return self._add_labels(emb, labels, timesteps.shape)

    def _add_labels(self, emb: torch.Tensor, labels: torch.Tensor | None, shape) -> torch.Tensor:
        if self.config.condition and labels is None:  # no actions / labels given: the null index
            labels = torch.full(shape, self.config.null_class, dtype=torch.long, device=emb.device)
        if self.config.condition == "action":
            emb = emb + self.action_embedder(labels)
        elif self.config.condition == "label":
            emb = emb + self.label_embedder(labels)
        return emb

    def step_modulations(self, timesteps: torch.Tensor, labels: torch.Tensor | None, batch: int) -> Modulation:
        """The modulation of each of K denoising steps of one frame: timesteps (K,), labels (B,) or
        None -> a `Modulation` of (K, B, 1, 1, D) tensors, in one matmul per projection."""
        emb = self.timestep_embedder(timesteps)[:, None]  # (K, 1, D): the same for every sample
        shape = (timesteps.shape[0], batch)
        emb = self._add_labels(emb, None if labels is None else labels[None].expand(shape), shape)
        return self.modulate(emb.expand(*shape, -1)[:, :, None])  # (K, B, F = 1, D)

    def modulate(self, emb: torch.Tensor) -> Modulation:
        """The adaLN projections of every block and the output norm for conditioning emb (..., F, D)."""
        act = F.silu(emb)
        return Modulation(tuple(block.modulation(act) for block in self.transformer_blocks),
                          self.norm_out.modulation(act))

    def rope(self, first_frame: int, frames: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables of `frames` frames from `first_frame`, in the model's dtype. One frame's
        (what a stream asks for every frame) is a view into tables made for a block of positions
        at once, ROPE_BLOCK_BYTES at most: a frame makes none."""
        c = self.config
        dtype = self.x_embedder.weight.dtype
        rows, cols = c.latent_size[0] // c.patch_size, c.latent_size[1] // c.patch_size
        per_frame = 2 * c.tokens_per_frame * c.head_dim * dtype.itemsize
        span = max(1, ROPE_BLOCK_BYTES // per_frame)
        start = first_frame - first_frame % span
        if frames != 1 or span == 1:
            cos, sin = rope_tables(torch.arange(first_frame, first_frame + frames, device=device), rows, cols, c.rope_axes)
            return cos.to(dtype), sin.to(dtype)
        key = (torch.device(device), dtype, start)
        block = self.__dict__.get("_rope_block")
        if block is None or block[0] != key:
            with torch.inference_mode(False):  # plain tensors: training may read them too
                cos, sin = rope_tables(torch.arange(start, start + span, device=device), rows, cols, c.rope_axes)
            t = c.tokens_per_frame
            block = self.__dict__["_rope_block"] = (key, cos.to(dtype).view(span, t, -1), sin.to(dtype).view(span, t, -1))
        return block[1][first_frame - start], block[2][first_frame - start]

    def run_blocks(self, x, emb, rope, mask=None, cache=None, write_at=None, attend=None):
        """x (B, F, T, D) through every block; emb: the conditioning (B, F, D) or its `Modulation`."""
        modulation = emb if isinstance(emb, Modulation) else self.modulate(emb)
        for i, block in enumerate(self.transformer_blocks):
            x = block(x, modulation.blocks[i], rope, mask, cache, i, write_at, attend)
        return x

    def new_cache(self, batch: int, capacity: int, device=None, dtype=None) -> KVCache:
        weight = self.x_embedder.weight
        c = self.config
        return KVCache(len(self.transformer_blocks), batch, c.num_heads, c.head_dim, c.tokens_per_frame,
                       capacity, device or weight.device, dtype or weight.dtype)

    def encode_frames(self, latents: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None,
                      cache: KVCache | None = None, feature_noise: torch.Tensor | None = None,
                      modulation: Modulation | None = None) -> torch.Tensor:
        """Run frames causally. latents (B, F, C, H, W); timesteps, labels (B, F). Returns the
        normed hidden states (B, F, T, D). With a cache the frames are appended to it (F = 1 may
        wrap the ring; F > 1 must fit in the free slots) and attend to everything cached before.
        `modulation`: that of (timesteps, labels), where the caller has it already."""
        b, f = latents.shape[:2]
        t = self.config.tokens_per_frame
        x = self.x_embedder(patchify(latents, self.config.patch_size))  # (B, F, T, D)
        if modulation is None:
            modulation = self.modulate(self.conditioning(timesteps, labels))
        past = 0 if cache is None else cache.frames
        rope = self.rope(past, f, latents.device)
        if cache is None:
            mask = block_causal_mask(f, 0, t, latents.device) if f > 1 else None
            x = self.run_blocks(x, modulation, rope, mask)
        elif f == 1:
            slot = cache.frames % cache.capacity
            x = self.run_blocks(x, modulation, rope, None, cache.buffers, slot * t, min(cache.frames + 1, cache.capacity) * t)
            cache.frames += 1
        else:
            if cache.frames + f > cache.capacity:
                raise ConfigError(f"{f} frames do not fit a KV cache of {cache.capacity} holding {cache.frames}")
            mask = block_causal_mask(f, past, t, latents.device)
            x = self.run_blocks(x, modulation, rope, mask, cache.buffers, past * t, (past + f) * t)
            cache.frames += f
        return self.norm_out(x, modulation, feature_noise)

    def append_frame(self, latents, timesteps, labels, rope, keys, values, index, mask, noise=None) -> torch.Tensor:
        """Static shapes (what a compiled stream runs): one frame (B, 1, C, H, W) with its timesteps
        and labels (B, 1) written into the cache at token indices `index` (T,), attending to the
        cache tokens `mask` (1, S) allows. Returns the normed hidden states (B, 1, T, D), `noise`
        (B, 1, T, D) added as in `OutputNorm`."""
        modulation = self.modulate(self.conditioning(timesteps, labels))
        x = self.x_embedder(patchify(latents, self.config.patch_size))
        x = self.run_blocks(x, modulation, rope, mask, (keys, values), index, None)
        return self.norm_out(x, modulation, noise)

    def append_static(self, state: "StreamState", latents: torch.Tensor, timesteps: torch.Tensor,
                      labels: torch.Tensor | None, feature_noise: torch.Tensor | None = None) -> torch.Tensor:
        """`encode_frames` of one frame into `state`'s cache through `append_frame`."""
        cache, t = state.cache, self.config.tokens_per_frame
        slot = cache.frames % cache.capacity
        index = torch.arange(slot * t, (slot + 1) * t, device=latents.device)
        # prompt frames and their labels are strided views, not inference tensors: copies of one layout, one graph
        latents = latents.clone(memory_format=torch.contiguous_format)
        labels = None if labels is None else labels.clone(memory_format=torch.contiguous_format)
        rope = self.rope(cache.frames, 1, latents.device)
        state.slots[slot] = True
        out = state.run("append_frame", latents, timesteps, labels, rope, *cache.buffers, index,
                        state.mask(t, spare=False), feature_noise)
        cache.frames += 1
        return out


class Encoder(Transformer):
    """SCD encoder: clean frames at timestep -1, block-causal, once per frame. Frame j is conditioned
    on action j + 1, the action that leads to the frame the decoder renders from its features."""

    def __init__(self, config: ModelConfig):
        super().__init__(config, config.encoder_layers, head=False, norm_noise=config.encoder_noise,
                         norm_unconditional=config.encoder_norm_unconditional)

    def forward(self, latents, labels=None, cache=None, timesteps=None, feature_noise=None) -> torch.Tensor:
        """latents (B, F, C, H, W), labels (B, F) -> features (B, F, T, D). timesteps (B, F): -1
        (clean, the default and what generation uses) or sigma * 1000 of noised context in training.
        feature_noise (B, F, T, D) is added to the normed features before their modulation."""
        if timesteps is None:
            timesteps = torch.full(latents.shape[:2], -1.0, device=latents.device)
        return self.encode_frames(latents, timesteps, labels, cache, feature_noise)


class Decoder(Transformer):
    """SCD decoder: one noisy frame plus the encoder's features of the previous frame; attention
    stays inside that frame, so a step costs the same at any context length."""

    def __init__(self, config: ModelConfig):
        super().__init__(config, config.decoder_layers, head=True)
        d = config.width
        self.decoder_input_proj = nn.Linear(2 * d, d) if config.decoder_combine == "concat" else None
        self.decoder_alignment = (nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d))
                                  if config.decoder_combine == "token_concat_with_proj" else None)
        self.token_concat = config.decoder_combine.startswith("token_concat")

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, features: torch.Tensor,
                labels: torch.Tensor | None = None, rope=None) -> torch.Tensor:
        """noisy (B, C, H, W); timesteps (B,) = sigma * 1000; features (B, T, D); labels (B,).
        Returns the velocity (B, C, H, W). `rope` may be passed in to reuse precomputed tables."""
        rope = rope if rope is not None else self.rope_tables(noisy.device)
        modulation = self.modulate(self.conditioning(timesteps[:, None], None if labels is None else labels[:, None]))
        return self.step(noisy, self.read(features), modulation, rope)

    def read(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder features (B, T, D) -> what every step of a frame combines with its tokens (B, 1, T, D)."""
        features = features[:, None]
        return self.decoder_alignment(features) if self.decoder_alignment is not None else features

    def step(self, noisy: torch.Tensor, features: torch.Tensor, modulation: Modulation, rope) -> torch.Tensor:
        """One denoising step: noisy (B, C, H, W), `read` features (B, 1, T, D) -> velocity (B, C, H, W)."""
        c = self.config
        h, w = noisy.shape[-2:]
        x = self.x_embedder(patchify(noisy[:, None], c.patch_size))  # (B, 1, T, D)
        if c.decoder_combine == "add":
            x = x + features
        elif c.decoder_combine == "concat":
            x = self.decoder_input_proj(torch.cat([x, features], dim=-1))
        else:
            x = torch.cat([features, x], dim=2)  # (B, 1, 2T, D)
        x = self.norm_out(self.run_blocks(x, modulation, rope), modulation)
        x = x[:, :, -c.tokens_per_frame:]
        return unpatchify(self.proj_out(x), c.patch_size, h, w)[:, 0]

    def rope_tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rope(0, 1, device)
        if self.token_concat:
            cos, sin = cos.repeat(2, 1), sin.repeat(2, 1)
        return cos, sin


# ----------------------------------------------------------------------------- one streaming protocol

ROPE_BLOCK_BYTES = 4 << 20  # rotary tables made at once for a block of frame positions (`Transformer.rope`)
PREFILL_CHUNK = 16  # context frames per cached pass: bounds the mask and score memory of long prompts


@dataclass(frozen=True)
class Objective:
    """What a training step asks of a model: noise levels drawn from shift * logit-normal; SCD's
    decoder denoises `decoder_draws` noise draws per encoder pass; the model (SCD: its encoder)
    sees each context frame clean with probability `clean_context_ratio`, else noised at sigma <=
    `context_sigma_max`."""

    sigma_shift: float = 1.0
    decoder_draws: int = 2
    clean_context_ratio: float = 1.0
    context_sigma_max: float = 1.0


@dataclass
class StreamState:
    """What a model keeps between the frames of one stream: its KV cache, the finished frames it was
    given but has not run yet (SCD's encoder needs the action that follows a frame, so all context
    work waits for `prepare`), and what the velocity of the frame being denoised needs.

    With a `compiler` (a function that compiles a callable, such as torch.compile with its options)
    the stream has static shapes: every attention reads the whole preallocated cache, `slots`
    saying which frames it holds, and the per-frame and per-step calls run compiled."""

    cache: KVCache
    pending: list = field(default_factory=list)  # [(frames (B, F, C, H, W), conditions (B, F) | None)]
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    condition: torch.Tensor | None = None  # (B,) the denoised frame's action or label
    features: torch.Tensor | None = None  # SCD: encoder features of the previous frame (B, T, D)
    # SCD, decoder guidance: noise (B, T, D) the next `prepare` adds to the newest frame's normed features
    feature_noise: torch.Tensor | None = None
    decoder_input: torch.Tensor | None = None  # SCD: those features as every decoder step reads them
    modulations: list | None = None  # per denoising step of this frame, when `prepare` was given its timesteps
    modulation_table: "Modulation | None" = None  # the same stacked (K, ...), as compiled code reads them
    tabulation: tuple | None = None  # (function, args) that make `modulation_table`, for compiled code
    owner: nn.Module | None = None
    compiler: Callable | None = None
    slots: torch.Tensor | None = None  # static: (capacity + 1,) bool, which cache slots hold a frame (the last: spare)
    step_mask: torch.Tensor | None = None  # static baseline: (1, S) the cache tokens a denoising step sees
    tables: dict = field(default_factory=dict)  # eager: each part's `ConditionTable`s, made on first use

    @property
    def static(self) -> bool:
        return self.compiler is not None

    def mask(self, tokens_per_frame: int, spare: bool) -> torch.Tensor:
        """(1, (capacity + 1) T) bool: the cached frames' tokens, and the spare slot's if `spare`."""
        self.slots[-1] = spare
        return self.slots.repeat_interleave(tokens_per_frame)[None]

    def run(self, name: str, *args):
        """`owner.name(*args)` through the compiler, compiled once per (model part, compiler)."""
        return compiled_call(getattr(self.owner, name), self.compiler, self.owner)(*args)


class StreamingModel:
    """The protocol both models speak, so one frame loop (`scd.sampling`) runs either:

        state = model.start(batch, capacity)     # an empty KV cache for `capacity` frames
        model.observe(state, frames, conditions) # finished frames (B, F, C, H, W) and their own actions (B, F)
        model.prepare(state, condition)          # the context pass for the next frame, given its action (B,)
        v = model.velocity(state, x, timesteps)  # (B, C, H, W) velocity of the frame being denoised
        loss = model.loss(video, conditions, objective)

    Conditions are action or label indices, the null index included; a model without conditioning
    takes None. Action j is the one taken on the way into frame j; where each model reads it (SCD's
    encoder: frame j with action j + 1; the baseline: frame j with action j) is the model's business.

    Two additions make the frame loop cheap: `prepare(state, condition, timesteps)` with the frame's
    K denoising timesteps computes their conditioning once, and `velocity(..., step=k)` then reads
    step k's; `start(..., compiler=torch.compile)` gives a stream of static shapes whose per-frame
    and per-step calls run compiled.
    """

    config: ModelConfig

    def parts(self) -> dict[str, nn.Module]:
        """The separately initialised and counted parts of the model, by name."""
        raise NotImplementedError

    @property
    def cached_layers(self) -> int:
        """Layers whose keys and values the stream caches."""
        raise NotImplementedError

    def cache_bytes(self, batch: int, frames: int, dtype: torch.dtype) -> int:
        """Bytes of a KV cache for `frames` frames (and the spare slot) at `batch`."""
        c = self.config
        item = dtype.itemsize
        return 2 * self.cached_layers * batch * c.num_heads * c.head_dim * (frames + 1) * c.tokens_per_frame * item

    def start(self, batch: int, capacity: int, compiler: Callable | None = None) -> StreamState:
        raise NotImplementedError

    def _state(self, cache: KVCache, owner: nn.Module, compiler: Callable | None, **fields) -> StreamState:
        slots = None if compiler is None else torch.zeros(cache.capacity + 1, dtype=torch.bool, device=cache.keys[0].device)
        return StreamState(cache, owner=owner, compiler=compiler, slots=slots, **fields)

    def observe(self, state: StreamState, frames: torch.Tensor, conditions: torch.Tensor | None) -> None:
        """Take in finished frames (B, F, C, H, W) with their own conditions (B, F); they are run by
        the next `prepare`."""
        state.pending.append((frames, conditions))

    def _take_pending(self, state: StreamState) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        pending, state.pending = state.pending, []
        if not pending:
            return None, None
        if len(pending) == 1:
            return pending[0]
        frames = torch.cat([f for f, _ in pending], 1)
        conditions = None if pending[0][1] is None else torch.cat([c for _, c in pending], 1)
        return frames, conditions


def _append(model: Transformer, state: StreamState, frames: torch.Tensor, conditions: torch.Tensor | None,
            feature_noise: torch.Tensor | None = None) -> torch.Tensor | None:
    """Run clean frames (B, F, C, H, W) into `state`'s cache in prefill chunks (one frame at a time,
    compiled, in a static stream); returns the hidden states of the last frame (B, T, D), with
    `feature_noise` (B, T, D) added to them as `OutputNorm` does (decoder guidance)."""
    out = None
    chunk_size = 1 if state.static else PREFILL_CHUNK
    for start in range(0, frames.shape[1], chunk_size):
        chunk = slice(start, start + chunk_size)
        latents = frames[:, chunk]
        labels = None if conditions is None else conditions[:, chunk]
        timesteps = torch.full(latents.shape[:2], -1.0, device=latents.device)
        noise = None
        if feature_noise is not None and start + chunk_size >= frames.shape[1]:
            # the decoder reads the newest frame's features only: that frame gets the noise
            noise = feature_noise.new_zeros((frames.shape[0], latents.shape[1], *feature_noise.shape[1:]))
            noise[:, -1] = feature_noise
        if state.static:
            out = model.append_static(state, latents, timesteps, labels, noise)
        else:
            table = _table(state, model, None)
            modulation = None if table is None else table.select(labels, latents.shape[:2])
            out = model.encode_frames(latents, timesteps, labels, state.cache, noise, modulation)
    return None if out is None else out[:, -1]


def _step(state: StreamState, k: int) -> Modulation:
    if state.modulations is not None:
        return state.modulations[k]
    if state.modulation_table is None:  # a static stream tabulates in its compiled loop; made here on demand
        tabulate, args = state.tabulation
        state.modulation_table = tabulate(*args)
    return state.modulation_table.at(k)


def _tabulate(state: StreamState, model: Transformer, timesteps: torch.Tensor | None, condition: torch.Tensor | None,
              batch: int) -> None:
    """A frame's step modulations for `model` at timesteps (K,) and condition (B,): split per step
    (eager: from the stream's conditioning table, or made now where there is none), or left to the
    compiled denoising loop (static; `state.tabulation`). No timesteps given: none made."""
    state.modulations = state.modulation_table = None
    state.tabulation = None if timesteps is None else (model.step_modulations, (timesteps, condition, batch))
    if timesteps is None or state.static:
        return
    table = _table(state, model, timesteps)
    if table is not None:
        state.modulations = table.steps(condition, batch)
    else:
        state.modulation_table = model.step_modulations(timesteps, condition, batch)
        state.modulations = state.modulation_table.steps()


def _table(state: StreamState, model: Transformer, timesteps: torch.Tensor | None) -> ConditionTable | None:
    """The stream's conditioning table of `model` at timesteps (K,) (None: clean frames, -1), made
    the first time and again only if other timesteps come (a stream passes the same tensor)."""
    key = (id(model), timesteps is None)
    made = state.tables.get(key)
    if made is None or (timesteps is not None and made[0] is not timesteps):
        at = timesteps if timesteps is not None else torch.full((1,), -1.0, device=state.cache.keys[0].device)
        made = state.tables[key] = (timesteps, ConditionTable.make(model, at))
    return made[1]


class SCDModel(nn.Module, StreamingModel):
    """Encoder + decoder; state dict keys `encoder.*` and `decoder.*` as the official trainer's."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def parts(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "decoder": self.decoder}

    @property
    def cached_layers(self) -> int:
        return self.config.encoder_layers

    def start(self, batch: int, capacity: int, compiler: Callable | None = None) -> StreamState:
        weight = self.decoder.x_embedder.weight
        return self._state(self.encoder.new_cache(batch, capacity), self, compiler,
                           rope=self.decoder.rope_tables(weight.device))

    def prepare(self, state: StreamState, condition: torch.Tensor | None, timesteps: torch.Tensor | None = None) -> None:
        """Encode the pending frames, each with the action that follows it (the last one with
        `condition`, the next frame's): the features of the last are what the decoder reads. With
        the frame's denoising timesteps (K,), the decoder's conditioning for each step is made now."""
        frames, conditions = self._take_pending(state)
        if frames is not None:
            if conditions is not None:
                conditions = torch.cat([conditions[:, 1:], condition[:, None]], 1)
            state.features = _append(self.encoder, state, frames, conditions, state.feature_noise)
            state.feature_noise = None
            state.decoder_input = self.decoder.read(state.features)
        if state.features is None:
            raise ConfigError("an SCD model needs at least one context frame before it can denoise")
        state.condition = condition
        _tabulate(state, self.decoder, timesteps, condition, state.features.shape[0])

    def velocity(self, state: StreamState, x: torch.Tensor, timesteps: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """The velocity (B, C, H, W) of x at `timesteps` (B,); `step` k reads the conditioning that
        `prepare` made for its k-th timestep (then `timesteps` is not read)."""
        if step is None or state.tabulation is None:
            return self.decoder(x, timesteps, state.features, state.condition, state.rope)
        return self.decoder.step(x, state.decoder_input, _step(state, step), state.rope)

    def step_function(self, state: StreamState) -> tuple[Callable, tuple]:
        """The velocity of a step as a function of tensors only, `fn(x, modulation, *inputs)`, for
        compiling a frame's whole denoising loop (`scd.sampling.denoise_steps`, which makes the
        modulations from `state.tabulation`); after `prepare` with timesteps."""
        return self.step_velocity, (state.decoder_input, state.rope)

    def step_velocity(self, x, modulation, features, rope) -> torch.Tensor:
        return self.decoder.step(x, features, modulation, rope)

    def append_frame(self, *args) -> torch.Tensor:
        return self.encoder.append_frame(*args)

    def loss(self, video: torch.Tensor, conditions: torch.Tensor | None, objective: Objective = Objective(),
             context: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Flow-matching loss of every frame j >= 1 of `video` (B, N, C, H, W) clean latents: the
        encoder runs once over the (optionally noised) clip, block-causally; the decoder denoises
        frame j from the features of frame j - 1, `decoder_draws` noise draws each. `context` (like
        video): the frames the encoder reads instead of `video` (the model's own rollout, the
        targets staying the true frames); `weight` (B, N, 1 or C, H, W): per-pixel loss weights."""
        enc_conditions = None if conditions is None else torch.cat([conditions[:, 1:], conditions[:, -1:]], dim=1)
        context, timesteps = noised_context(video if context is None else context, objective.clean_context_ratio,
                                            objective.context_sigma_max)
        features = self.encoder(context, enc_conditions, timesteps=timesteps)[:, :-1]  # (B, N-1, T, D)
        draws = objective.decoder_draws
        x0 = video[:, 1:].flatten(0, 1).repeat(draws, 1, 1, 1)
        features = features.flatten(0, 1).repeat(draws, 1, 1)
        labels = None if conditions is None else conditions[:, 1:].flatten().repeat(draws)
        sigma = logit_normal(x0.shape[0], objective.sigma_shift).to(x0.device)
        noise = torch.randn_like(x0)
        velocity = self.decoder(add_noise(x0, noise, sigma), sigma * 1000.0, features, labels)
        if weight is not None:
            weight = weight[:, 1:].flatten(0, 1).repeat(draws, 1, 1, 1)
        return weighted_mse(velocity, noise - x0, weight)


def teacher_forcing_mask(frames: int, tokens_per_frame: int, device) -> torch.Tensor:
    """Boolean attention mask over [clean frames 0..N-1; noisy frames 1..N-1] ((2N-1) T square):
    clean queries see clean keys of their own and earlier frames; noisy frame j sees the clean
    frames before j and itself, exactly what it sees when generated."""
    n, t = frames, tokens_per_frame
    index = torch.cat([torch.arange(n), torch.arange(1, n)]).to(device)
    clean = torch.arange(2 * n - 1, device=device) < n
    q = k = index.repeat_interleave(t)
    qc = kc = clean.repeat_interleave(t)
    same = torch.arange(2 * n - 1, device=device).repeat_interleave(t)
    mask = (kc[None] & (k[None] <= q[:, None]) & qc[:, None]) | (kc[None] & (k[None] < q[:, None]) & ~qc[:, None])
    return mask | ((same[None] == same[:, None]) & ~qc[:, None])


class Baseline(Transformer, StreamingModel):
    """FAR-style causal diffusion transformer: every denoising step runs all layers on the noisy
    frame against the cached clean context. Frame j is conditioned on action j."""

    def __init__(self, config: ModelConfig):
        super().__init__(config, config.layers, head=True)

    def parts(self) -> dict[str, nn.Module]:
        return {"model": self}

    @property
    def cached_layers(self) -> int:
        return self.config.layers

    def start(self, batch: int, capacity: int, compiler: Callable | None = None) -> StreamState:
        return self._state(self.new_cache(batch, capacity), self, compiler)

    def prepare(self, state: StreamState, condition: torch.Tensor | None, timesteps: torch.Tensor | None = None) -> None:
        """Cache the pending frames as clean context (each with its own action); the next frame's
        rotary position follows them. With the frame's denoising timesteps (K,), the conditioning
        of each step is made now."""
        frames, conditions = self._take_pending(state)
        if frames is not None:
            _append(self, state, frames, conditions)
        state.rope = self.rope(state.cache.frames, 1, state.cache.keys[0].device)
        state.condition = condition
        batch = state.cache.keys[0].shape[0]
        _tabulate(state, self, timesteps, condition, batch)
        if state.static:
            state.step_mask = state.mask(self.config.tokens_per_frame, spare=True)  # what every step attends to

    def velocity(self, state: StreamState, x: torch.Tensor, timesteps: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """As `SCDModel.velocity`."""
        if step is None or state.tabulation is None:
            return self(x, timesteps, state.condition, state.cache, state.rope)
        cache = state.cache
        if state.static:
            return self.step_velocity(x, _step(state, step), state.rope, *cache.buffers, state.step_mask)
        cached = cache.cached_frames * self.config.tokens_per_frame
        return self.step(x, _step(state, step), state.rope, *cache.buffers, cached, None)

    def step_function(self, state: StreamState) -> tuple[Callable, tuple]:
        """As `SCDModel.step_function`; a static stream's only (the mask says what a step sees)."""
        return self.step_velocity, (state.rope, *state.cache.buffers, state.step_mask)

    def step_velocity(self, x, modulation, rope, keys, values, mask) -> torch.Tensor:
        """`step` with the noisy frame's keys in the spare slot, the last frame of the cache."""
        return self.step(x, modulation, rope, keys, values, keys[0].shape[2] - self.config.tokens_per_frame, mask)

    def append(self, latents: torch.Tensor, labels: torch.Tensor | None, cache: KVCache) -> None:
        """Add clean frames (B, F, C, H, W) to the context cache."""
        timesteps = torch.full(latents.shape[:2], -1.0, device=latents.device)
        self.encode_frames(latents, timesteps, labels, cache)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None,
                cache: KVCache, rope=None) -> torch.Tensor:
        """noisy (B, C, H, W) -> velocity (B, C, H, W), attending to the cache; the cache is unchanged."""
        modulation = self.modulate(self.conditioning(timesteps[:, None], None if labels is None else labels[:, None]))
        rope = rope if rope is not None else self.rope(cache.frames, 1, noisy.device)
        return self.step(noisy, modulation, rope, *cache.buffers, cache.cached_frames * self.config.tokens_per_frame, None)

    def step(self, noisy, modulation, rope, keys, values, write_at: int, mask) -> torch.Tensor:
        """One denoising step of noisy (B, C, H, W): its keys go to the cache from token `write_at`
        (just past the cached frames, or the spare slot); it attends to the tokens before them and
        itself, or (mask (1, S) given: static shapes) to what the mask allows."""
        c, t = self.config, self.config.tokens_per_frame
        h, w = noisy.shape[-2:]
        x = self.x_embedder(patchify(noisy[:, None], c.patch_size))
        attend = None if mask is not None else write_at + t
        x = self.norm_out(self.run_blocks(x, modulation, rope, mask, (keys, values), write_at, attend), modulation)
        return unpatchify(self.proj_out(x), c.patch_size, h, w)[:, 0]

    def loss(self, video: torch.Tensor, conditions: torch.Tensor | None, objective: Objective = Objective(),
             context: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Flow-matching loss of every frame j >= 1 of `video` (B, N, C, H, W), denoised against the
        context frames before it, all in one masked pass over [context; noisy] frames. The context
        frames are clean or, as SCD's encoder sees them, noised by `clean_context_ratio` (each with
        its timestep), so the model learns to read imperfect context such as its own frames.
        `context` and `weight`: as `SCDModel.loss`."""
        c = self.config
        b, n, _, h, w = video.shape
        x0 = video[:, 1:]
        sigma = logit_normal(b * (n - 1), objective.sigma_shift).to(video.device).view(b, n - 1)
        noise = torch.randn_like(x0)
        # drawn after the frames' noise, and only when asked for: clean-context runs draw as before
        context, context_timesteps = noised_context(video if context is None else context, objective.clean_context_ratio,
                                                    objective.context_sigma_max)
        if context_timesteps is None:
            context_timesteps = torch.full((b, n), -1.0, device=video.device)
        tokens = self.x_embedder(patchify(torch.cat([context, add_noise(x0, noise, sigma)], 1), c.patch_size))
        timesteps = torch.cat([context_timesteps, sigma * 1000.0], 1)
        labels = None if conditions is None else torch.cat([conditions, conditions[:, 1:]], 1)
        modulation = self.modulate(self.conditioning(timesteps, labels))
        positions = torch.cat([torch.arange(n), torch.arange(1, n)]).to(video.device)
        rope = rope_tables(positions, h // c.patch_size, w // c.patch_size, c.rope_axes)
        mask = teacher_forcing_mask(n, c.tokens_per_frame, video.device)
        hidden = self.norm_out(self.run_blocks(tokens, modulation, rope, mask), modulation)[:, n:]
        velocity = unpatchify(self.proj_out(hidden), c.patch_size, h, w)
        return weighted_mse(velocity, noise - x0, None if weight is None else weight[:, 1:])


def init_weights(model: Transformer) -> None:
    """The references' initialisation: xavier linears, N(0, 0.02) embeddings, zeroed adaLN and
    output layers (each block starts as the identity), `concat` input projection as [I | I]."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            for weight in module.weight.chunk(getattr(module, "parts", 1)):  # a fused layer as its parts
                nn.init.xavier_uniform_(weight)
            nn.init.zeros_(module.bias)
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            nn.init.normal_(module.embedding_table.weight, std=0.02)
    nn.init.normal_(model.timestep_embedder.linear_1.weight, std=0.02)
    nn.init.normal_(model.timestep_embedder.linear_2.weight, std=0.02)
    zeroed = [b.norm1.linear for b in model.transformer_blocks] + [b.norm2.linear for b in model.transformer_blocks]
    zeroed += [m for m in (model.norm_out.linear, model.proj_out) if m is not None]
    if getattr(model, "decoder_alignment", None) is not None:
        zeroed.append(model.decoder_alignment[1])
    for module in zeroed:
        nn.init.zeros_(module.weight)
        nn.init.zeros_(module.bias)
    if getattr(model, "decoder_input_proj", None) is not None:
        d = model.config.width
        with torch.no_grad():
            model.decoder_input_proj.weight.copy_(torch.cat([torch.eye(d), torch.eye(d)], dim=1))
            model.decoder_input_proj.bias.zero_()


def build_model(config: ModelConfig, init: bool = True) -> SCDModel | Baseline:
    """A new model of `config`, initialised as the references do (or left as allocated)."""
    model = SCDModel(config) if config.arch == "scd" else Baseline(config)
    if init:
        for part in model.parts().values():
            init_weights(part)
    return model


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
