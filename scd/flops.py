"""Analytic FLOPs per generated frame or chunk (multiply-add = 2 FLOPs), for `scd info` and `scd bench`.

The FAR-style family, per block of width D on S query tokens attending to S_kv keys: 24 S D^2 (q, k,
v, out and the 4x MLP) + 4 S S_kv D (scores and weighted values) + 12 D^2 per conditioning vector
(adaLN). The Wan2.1 family, per block on S = n T tokens of a chunk of n frames: 8 S D^2 (q, k, v, o)
+ 4 S S_kv D (self-attention) + 4 S D^2 + 4 S L D (cross-attention's q and o, then to L text
tokens) + 4 S D F (the FFN of width F); the text's own keys and values are made once per stream.
SCD from Wan: the encoder's passes per chunk (the clean previous chunk, the new chunk's noise) and
K decoder steps on each frame alone (2T tokens with token_concat); its matched counterpart is the
causal Wan it came from (`wan_matched`).

Each family registers its count in `FAMILY_FLOPS` (by `config.family`): `chunk_flops` and
`matched_config` read any config through it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from scd.errors import ConfigError
from scd.models import ModelConfig, WanConfig, table_fits


@dataclass(frozen=True)
class FrameFlops:
    """FLOPs to produce one frame at batch 1. For SCD `context` is the encoder pass and `denoise`
    the K decoder steps; for the baseline, the clean-context pass and the K full-depth steps."""

    context: float
    denoise: float

    @property
    def total(self) -> float:
        return self.context + self.denoise


def block_flops(width: int, queries: int, keys: int, conditionings: int = 1) -> float:
    return 24.0 * queries * width ** 2 + 4.0 * queries * keys * width + 12.0 * conditionings * width ** 2


def _embed_flops(c: ModelConfig, tokens: int, head: bool, conditioned: bool = True) -> float:
    """Patch embedding, the output head, and (`conditioned`) the timestep MLP and output norm's adaLN."""
    patch = c.channels * c.patch_size ** 2
    timestep_mlp = 2.0 * (256 * c.width + c.width ** 2) if conditioned else 0.0
    norm_out = 0.0 if (not head and c.encoder_norm_unconditional) or not conditioned else 4.0 * c.width ** 2
    out = 2.0 * tokens * c.width * patch + norm_out if head else norm_out
    return 2.0 * tokens * c.width * patch + timestep_mlp + out


def frame_flops(config: ModelConfig, context_frames: int, steps: int, guidance: float = 1.0,
                tabulated: bool = True) -> FrameFlops:
    """FLOPs of one generated frame with `context_frames` frames already in the KV cache.
    `tabulated`: conditioning comes from the stream's tables wherever they fit
    (`scd.models.ConditionTable`, an eager stream), so a frame makes none of it; else per frame."""
    c, t, d = config, config.tokens_per_frame, config.width
    clean_layers = c.encoder_layers if c.arch == "scd" else c.layers
    step_layers = c.decoder_layers if c.arch == "scd" else c.layers
    per_clean = not (tabulated and table_fits(c, clean_layers, 1))  # conditioning vectors made per frame
    per_step = not (tabulated and table_fits(c, step_layers, steps))
    per_frame = 0.0
    # Streaming, `context_frames` are cached when the previous frame's clean pass starts: that pass
    # appends the previous frame and attends to N + 1 frames; the baseline's noisy frame then sits
    # after them and attends to N + 2 (SCD's decoder attends only inside its 2T tokens). Attention
    # sinks are cached beside them: each pass attends to those too.
    keys = (context_frames + c.sink_frames + 1) * t
    if c.arch == "scd":
        context = c.encoder_layers * block_flops(d, t, keys, per_clean) + _embed_flops(c, t, False, per_clean)
        tokens = 2 * t if c.decoder_combine.startswith("token_concat") else t
        step = c.decoder_layers * block_flops(d, tokens, tokens, per_step) + _embed_flops(c, t, True, per_step)
        if c.decoder_combine == "concat":
            step += 2.0 * t * 2 * d * d
        elif c.decoder_combine == "token_concat_with_proj":
            per_frame = 2.0 * t * d * d  # the features' alignment: once per frame, read by every step
    else:
        context = c.layers * block_flops(d, t, keys, per_clean) + _embed_flops(c, t, False, per_clean)
        step = c.layers * block_flops(d, t, keys + t, per_step) + _embed_flops(c, t, True, per_step)
    scale = 2.0 if guidance != 1.0 else 1.0
    return FrameFlops(scale * context, scale * (steps * step + per_frame))


# ----------------------------------------------------------------------------- the Wan2.1 family

def _wan_tokens(c: WanConfig, latent_size: tuple[int, int] | None) -> int:
    h, w = latent_size or c.latent_size
    _, p, q = c.patch_size
    return (h // p) * (w // q)


def _wan_block_flops(c: WanConfig, queries: int, keys: int) -> float:
    """One Wan block on `queries` tokens attending to `keys` tokens (and to the text, when it has any:
    an action model has no cross-attention)."""
    d = c.dim
    block = 8.0 * queries * d * d + 4.0 * queries * keys * d  # self-attention: q, k, v, o; scores, values
    if c.condition == "text":
        block += 4.0 * queries * d * d + 4.0 * queries * c.text_len * d  # cross-attention: q, o; scores, values over the text
    return block + 4.0 * queries * d * c.ffn_dim


def _wan_time_flops(c: WanConfig, frames: int) -> float:
    d = c.dim
    return frames * (2.0 * c.freq_dim * d + 2.0 * d * d + 12.0 * d * d)  # time_embedding, time_projection


def wan_pass_flops(c: WanConfig, frames: int, key_frames: int, latent_size: tuple[int, int] | None = None,
                   layers: int | None = None, head: bool = True) -> float:
    """One call of the Wan transformer (`layers` blocks, all of the config's by default; without
    `head`, SCD-Wan's encoder) on `frames` latent frames attending to `key_frames` frames of keys
    (their own included): patch embedding, the time embedding and projection of each frame, the
    blocks, the head. The cross-attention keys and values are not in it (`wan_text_flops`)."""
    t = _wan_tokens(c, latent_size)
    s, d, patch = frames * t, c.dim, c.channels * c.patch_size[1] * c.patch_size[2]
    layers = c.num_layers if layers is None else layers
    out = 2.0 * s * d * patch if head else 0.0
    return layers * _wan_block_flops(c, s, key_frames * t) + _wan_time_flops(c, frames) + 2.0 * s * patch * d + out


def wan_decoder_step_flops(c: WanConfig, frames: int, latent_size: tuple[int, int] | None = None) -> float:
    """One step of SCD-Wan's decoder on `frames` noisy frames, each alone: its T tokens (with
    `token_concat`, after the encoder's T features of the frame: 2T tokens) attend only to the
    frame's own tokens and to the text; the head runs on every token (the features' outputs are
    dropped after it)."""
    t = _wan_tokens(c, latent_size)
    tokens = 2 * t if c.decoder_combine == "token_concat" else t
    d, patch = c.dim, c.channels * c.patch_size[1] * c.patch_size[2]
    blocks = c.decoder_layers * frames * _wan_block_flops(c, tokens, tokens)
    return blocks + _wan_time_flops(c, frames) + 2.0 * frames * t * patch * d + 2.0 * frames * tokens * d * patch


def wan_text_flops(c: WanConfig) -> float:
    """Once per stream: the text embedding of `text_len` tokens and every block's cross-attention
    keys and values (SCD-Wan: the encoder's and the decoder's, each with its own text embedding); none
    for an action model (its action embedding is a table lookup)."""
    if c.condition != "text":
        return 0.0
    n, d = c.text_len, c.dim
    embeddings = 2 if c.arch == "scd" else 1
    return embeddings * 2.0 * n * (c.text_dim * d + d * d) + c.num_layers * 4.0 * n * d * d


def wan_chunk_flops(c: WanConfig, context_frames: int, steps: int,
                    latent_size: tuple[int, int] | None = None) -> ChunkFlops:
    """FLOPs of one chunk of `c.chunk_frames` frames with `context_frames` frames in the cache when
    the previous chunk's clean pass starts: that pass (at the clean timestep) writes the previous
    chunk and attends to N + n frames, then each of the K steps attends to N + 2n; both at most the
    rolling window's `local_attn_size` frames.

    SCD from Wan: `context` is the encoder's clean pass of the previous chunk (N + n frames of keys)
    and, with encoder input "noise", its pass of the new chunk's pure noise at the first step (N + 2n);
    `denoise` is K decoder steps (`wan_decoder_step_flops`), attending within each frame only."""
    n = c.chunk_frames
    window = c.local_attn_size or math.inf
    if c.arch == "scd":
        context = wan_pass_flops(c, n, min(context_frames + n, window), latent_size, c.encoder_layers, head=False)
        if c.encoder_input == "noise":
            context += wan_pass_flops(c, n, min(context_frames + 2 * n, window), latent_size, c.encoder_layers,
                                      head=False)
        return ChunkFlops(n, context, steps * wan_decoder_step_flops(c, n, latent_size))
    context = wan_pass_flops(c, n, min(context_frames + n, window), latent_size)
    step = wan_pass_flops(c, n, min(context_frames + 2 * n, window), latent_size)
    return ChunkFlops(n, context, steps * step)


def wan_source_depth(c: WanConfig) -> int:
    """Blocks of the causal Wan an SCD-Wan came from: `max(source_blocks) + 1` when its conversion
    recorded them; else the depth the paper's proportions give (`scd.convert.wan_split`: the encoder
    all but the last k blocks, the decoder the first k and the last k), encoder_layers +
    decoder_layers // 2 (25 + 10 // 2 = 30), and never fewer blocks than either part has."""
    if c.source_blocks is not None:
        return max(max(blocks) for blocks in c.source_blocks if blocks) + 1
    return max(c.encoder_layers + c.decoder_layers // 2, c.encoder_layers, c.decoder_layers)


def wan_matched(c: WanConfig) -> WanConfig | None:
    """An SCD-Wan's matched counterpart: the causal Wan it came from (`wan_source_depth` blocks, the
    same sizes, chunk, window and steps). A causal Wan has none (it does not know how it would be split)."""
    if c.arch != "scd":
        return None
    return dataclasses.replace(c, arch="baseline", num_layers=wan_source_depth(c), encoder_layers=0, decoder_layers=0,
                               source_blocks=None)


# ----------------------------------------------------------------------------- any family

@dataclass(frozen=True)
class ChunkFlops:
    """FLOPs of one streamed chunk of `frames` frames at batch 1 (the FAR-style family: one frame):
    `context` the clean pass that takes in the previous chunk, `denoise` the K steps."""

    frames: int
    context: float
    denoise: float

    @property
    def total(self) -> float:
        return self.context + self.denoise

    @property
    def per_frame(self) -> FrameFlops:
        return FrameFlops(self.context / self.frames, self.denoise / self.frames)


@dataclass(frozen=True)
class Family:
    """A model family's FLOP count: `chunk(config, context_frames, steps)`; `once(config)`, what a
    stream computes once at its start (None: nothing counted); `matched(config)`, the config of its
    matched counterpart (SCD <-> baseline), or None for a family without one."""

    chunk: Callable[[object, int, int], ChunkFlops]
    once: Callable[[object], float] | None = None
    matched: Callable[[object], object] | None = None


def _far_chunk(config: ModelConfig, context_frames: int, steps: int) -> ChunkFlops:
    f = frame_flops(config, context_frames, steps)
    return ChunkFlops(1, f.context, f.denoise)


FAMILY_FLOPS: dict[str, Family] = {
    "far": Family(_far_chunk, matched=lambda config: config.matched()),
    "wan": Family(wan_chunk_flops, once=wan_text_flops, matched=wan_matched),
}


def _family(config) -> Family:
    family = FAMILY_FLOPS.get(getattr(config, "family", None))
    if family is None:
        raise ConfigError(f"no FLOP count for model family {getattr(config, 'family', None)!r}")
    return family


def chunk_flops(config, context_frames: int, steps: int) -> ChunkFlops:
    """FLOPs of one streamed chunk of any family's model, `context_frames` frames cached before the
    previous chunk's clean pass (see `frame_flops`, `wan_chunk_flops`)."""
    if context_frames < 0:
        raise ConfigError(f"context_frames must be >= 0, got {context_frames}", parameter="context")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}", parameter="steps")
    return _family(config).chunk(config, context_frames, steps)


def stream_flops(config) -> float:
    """FLOPs a stream of `config`'s model makes once, before its first chunk (Wan: the text's keys
    and values)."""
    once = _family(config).once
    return 0.0 if once is None else once(config)


def matched_config(config):
    """The config of `config`'s matched counterpart, or None when its family has none."""
    matched = _family(config).matched
    return None if matched is None else matched(config)


@dataclass(frozen=True)
class Comparison:
    """A model's FLOPs per frame next to its matched counterpart's (same width and total depth)."""

    this: FrameFlops
    matched: FrameFlops
    scd_is_this: bool

    @property
    def predicted_speedup(self) -> float:
        """Baseline FLOPs / SCD FLOPs per frame: the speed-up SCD should realise."""
        scd, base = (self.this, self.matched) if self.scd_is_this else (self.matched, self.this)
        return base.total / scd.total


def compare(config: ModelConfig, context_frames: int, steps: int, guidance: float = 1.0) -> Comparison:
    """FLOPs per frame of `config` and of `config.matched()` at the same context and steps."""
    if context_frames < 0:
        raise ConfigError(f"context_frames must be >= 0, got {context_frames}", parameter="context")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}", parameter="steps")
    return Comparison(frame_flops(config, context_frames, steps, guidance),
                      frame_flops(config.matched(), context_frames, steps, guidance), config.arch == "scd")


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())
