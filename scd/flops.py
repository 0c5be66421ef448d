"""Analytic FLOPs per generated frame (multiply-add = 2 FLOPs), for `scd info` and `scd bench`.

Per block of width D on S query tokens attending to S_kv keys: 24 S D^2 (q, k, v, out and the 4x
MLP) + 4 S S_kv D (scores and weighted values) + 12 D^2 per conditioning vector (adaLN).
"""

from __future__ import annotations

from dataclasses import dataclass

from scd.errors import ConfigError
from scd.models import ModelConfig, table_fits


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
    # after them and attends to N + 2 (SCD's decoder attends only inside its 2T tokens).
    keys = (context_frames + 1) * t
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
