"""The FAR-style family: the SCD encoder and decoder, and the FAR-style causal baseline.

Reads top-down: the conditioning tables a stream makes once, the shared trunk, the encoder, the
decoder, the two streaming models (SCD and the baseline), initialisation and `build`. Parameter
names follow the reference implementations (the official SCD code and FAR), so their state dicts
load without renaming.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from scd.errors import ConfigError
from scd.flow import add_noise, logit_normal, noised_context, weighted_mse
from scd.models.config import ModelConfig
from scd.models.layers import (
    Block,
    LabelEmbedding,
    Modulation,
    OutputNorm,
    TimestepEmbedding,
    apply_rope,
    block_causal_mask,
    patchify,
    rope_tables,
    unpatchify,
)
from scd.models.streaming import KVCache, Objective, StreamingModel, StreamState

ROPE_BLOCK_BYTES = 4 << 20  # rotary tables made at once for a block of frame positions (`Transformer.rope`)
PREFILL_CHUNK = 16  # context frames per cached pass: bounds the mask and score memory of long prompts


# ----------------------------------------------------------------------------- conditioning, made once per stream

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


# ----------------------------------------------------------------------------- the trunk and its two parts

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
        rows, cols = self._grid()
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
                       capacity, device or weight.device, dtype or weight.dtype, min(c.sink_frames, capacity - 1))

    def sink_positions(self, oldest: int, device=None) -> torch.Tensor:
        """(sinks,) the temporal positions the sink frames are seen at by a query whose oldest
        window frame is at `oldest`: `sink_distance` frames before it, in order."""
        return torch.arange(self.config.sink_frames, device=device) + self._sink_shift(oldest)

    def _sink_shift(self, oldest: int) -> int:
        """The first sink's position for a query whose oldest window frame is `oldest`."""
        c = self.config
        return oldest - c.sink_distance - c.sink_frames + 1

    def place_sinks(self, cache: KVCache, oldest: int) -> None:
        """Rotate the cached sink frames' keys in place to where a query whose oldest window frame
        is `oldest` sees them (`sink_positions`): they were written at positions 0..sinks-1, and
        rotary angles add up, so one rotation by the difference moves them there."""
        if cache.sink_keys is None:  # no sinks, or not all written yet
            return
        shift = self._sink_shift(oldest)
        if cache.sink_shift == shift:
            return
        cos, sin = rope_tables(torch.tensor([shift], device=cache.keys[0].device), 1, 1, self.config.rope_axes)
        cos, sin = cos.to(cache.keys[0].dtype), sin.to(cache.keys[0].dtype)
        span = cache.sinks * cache.tokens_per_frame
        for keys, written in zip(cache.keys, cache.sink_keys):
            keys[:, :, :span] = apply_rope(written, cos, sin)
        cache.sink_shift = shift

    def _written(self, cache: KVCache, frames: int) -> None:
        """Count `frames` frames written to `cache`; keep the sinks' keys once the last is in."""
        before = cache.frames
        cache.frames += frames
        if before < cache.sinks <= cache.frames:
            cache.keep_sinks()
            cache.sink_shift = 0

    def encode_frames(self, latents: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None,
                      cache: KVCache | None = None, feature_noise: torch.Tensor | None = None,
                      modulation: Modulation | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Run frames causally. latents (B, F, C, H, W); timesteps, labels (B, F). Returns the
        normed hidden states (B, F, T, D). With a cache the frames are appended to it (F = 1 may
        wrap the ring; F > 1 must fit in the free slots, and be all sinks or none) and attend to
        everything cached before, the sinks placed for them (`place_sinks`). `modulation`: that of
        (timesteps, labels), where the caller has it already. `positions` (F,): the frames'
        temporal positions without a cache (default 0..F-1; training places sinks before a clip)."""
        b, f = latents.shape[:2]
        t = self.config.tokens_per_frame
        x = self.x_embedder(patchify(latents, self.config.patch_size))  # (B, F, T, D)
        if modulation is None:
            modulation = self.modulate(self.conditioning(timesteps, labels))
        past = 0 if cache is None else cache.frames
        if positions is not None:
            dtype = self.x_embedder.weight.dtype
            rope = tuple(r.to(dtype) for r in rope_tables(positions, *self._grid(), self.config.rope_axes))
        else:
            rope = self.rope(past, f, latents.device)
        if cache is None:
            mask = block_causal_mask(f, 0, t, latents.device) if f > 1 else None
            x = self.run_blocks(x, modulation, rope, mask)
            return self.norm_out(x, modulation, feature_noise)
        if past < cache.sinks < past + f:
            raise ConfigError(f"a chunk of {f} frames from frame {past} mixes sink and window frames")
        self.place_sinks(cache, cache.oldest(writing=True))
        if f == 1:
            slot = cache.slot(cache.frames)
            x = self.run_blocks(x, modulation, rope, None, cache.buffers, slot * t, min(cache.frames + 1, cache.capacity) * t)
        else:
            if cache.frames + f > cache.capacity:
                raise ConfigError(f"{f} frames do not fit a KV cache of {cache.capacity} holding {cache.frames}")
            mask = block_causal_mask(f, past, t, latents.device)
            x = self.run_blocks(x, modulation, rope, mask, cache.buffers, past * t, (past + f) * t)
        self._written(cache, f)
        return self.norm_out(x, modulation, feature_noise)

    def _grid(self) -> tuple[int, int]:
        c = self.config
        return c.latent_size[0] // c.patch_size, c.latent_size[1] // c.patch_size

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
        slot = cache.slot(cache.frames)
        self.place_sinks(cache, cache.oldest(writing=True))
        index = torch.arange(slot * t, (slot + 1) * t, device=latents.device)
        # prompt frames and their labels are strided views, not inference tensors: copies of one layout, one graph
        latents = latents.clone(memory_format=torch.contiguous_format)
        labels = None if labels is None else labels.clone(memory_format=torch.contiguous_format)
        rope = self.rope(cache.frames, 1, latents.device)
        state.slots[slot] = True
        out = state.run("append_frame", latents, timesteps, labels, rope, *cache.buffers, index,
                        state.mask(t, spare=False), feature_noise)
        self._written(cache, 1)
        return out


class Encoder(Transformer):
    """SCD encoder: clean frames at timestep -1, block-causal, once per frame. Frame j is conditioned
    on action j + 1, the action that leads to the frame the decoder renders from its features."""

    def __init__(self, config: ModelConfig):
        super().__init__(config, config.encoder_layers, head=False, norm_noise=config.encoder_noise,
                         norm_unconditional=config.encoder_norm_unconditional)

    def forward(self, latents, labels=None, cache=None, timesteps=None, feature_noise=None, positions=None) -> torch.Tensor:
        """latents (B, F, C, H, W), labels (B, F) -> features (B, F, T, D). timesteps (B, F): -1
        (clean, the default and what generation uses) or sigma * 1000 of noised context in training.
        feature_noise (B, F, T, D) is added to the normed features before their modulation;
        positions (F,) as `encode_frames`."""
        if timesteps is None:
            timesteps = torch.full(latents.shape[:2], -1.0, device=latents.device)
        return self.encode_frames(latents, timesteps, labels, cache, feature_noise, positions=positions)


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


# ----------------------------------------------------------------------------- the two streaming models

def _no_text(text) -> None:
    if text is not None:
        raise ConfigError("this model takes no text: it is conditioned on actions or labels, or on nothing",
                          parameter="text")


def _append(model: Transformer, state: StreamState, frames: torch.Tensor, conditions: torch.Tensor | None,
            feature_noise: torch.Tensor | None = None) -> torch.Tensor | None:
    """Run clean frames (B, F, C, H, W) into `state`'s cache in prefill chunks (one frame at a time,
    compiled, in a static stream); returns the hidden states of the last frame (B, T, D), with
    `feature_noise` (B, T, D) added to them as `OutputNorm` does (decoder guidance)."""
    out = None
    chunk_size = 1 if state.static else PREFILL_CHUNK
    cache = state.cache
    sinks_left = max(0, cache.sinks - cache.frames)  # the first frames still to come are sinks: a chunk of their own
    count = frames.shape[1]
    bounds = [*range(0, min(sinks_left, count), chunk_size), *range(min(sinks_left, count), count, chunk_size)]
    for start, end in zip(bounds, [*bounds[1:], count]):
        chunk = slice(start, end)
        latents = frames[:, chunk]
        labels = None if conditions is None else conditions[:, chunk]
        if labels is not None and start < sinks_left:  # a sink holds the scene, read without an action
            labels = labels.clone()
            labels[:, :sinks_left - start] = model.config.null_class
        timesteps = torch.full(latents.shape[:2], -1.0, device=latents.device)
        noise = None
        if feature_noise is not None and end >= count:
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

    shares_context = True  # the encoder runs once per frame, whatever number of samples the decoder draws

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

    def start(self, batch: int, capacity: int, compiler: Callable | None = None, text=None, latent_size=None) -> StreamState:
        _no_text(text)
        weight = self.decoder.x_embedder.weight
        return self._state(self.encoder.new_cache(batch, capacity), self, compiler,
                           rope=self.decoder.rope_tables(weight.device))

    def prepare(self, state: StreamState, condition: torch.Tensor | None, timesteps: torch.Tensor | None = None,
                samples: int = 1, halves: int = 1) -> None:
        """Encode the pending frames, each with the action that follows it (the last one with
        `condition`, the next frame's): the features of the last are what the decoder reads. With
        the frame's denoising timesteps (K,), the decoder's conditioning for each step is made now.
        samples K > 1: the decoder then denoises K samples of each stream at once (`spread`; halves
        2: the batch is guidance's [unconditional; conditional]), the encoder having run once."""
        frames, conditions = self._take_pending(state)
        if frames is not None:
            if conditions is not None:
                conditions = torch.cat([conditions[:, 1:], condition[:, None]], 1)
            state.features = _append(self.encoder, state, frames, conditions, state.feature_noise)
            state.feature_noise = None
            state.decoder_input = self.decoder.read(state.features)
        if state.features is None:
            raise ConfigError("an SCD model needs at least one context frame before it can denoise")
        features, decoder_input = state.features, state.decoder_input
        if samples > 1:
            features, decoder_input = self.spread(features, samples, halves), self.spread(decoder_input, samples, halves)
            condition = None if condition is None else self.spread(condition, samples, halves)
        state.frame_features, state.frame_input = features, decoder_input
        state.condition = condition
        _tabulate(state, self.decoder, timesteps, condition, features.shape[0])

    def velocity(self, state: StreamState, x: torch.Tensor, timesteps: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """The velocity (B, C, H, W) of x at `timesteps` (B,); `step` k reads the conditioning that
        `prepare` made for its k-th timestep (then `timesteps` is not read)."""
        if step is None or state.tabulation is None:
            return self.decoder(x, timesteps, state.frame_features, state.condition, state.rope)
        return self.decoder.step(x, state.frame_input, _step(state, step), state.rope)

    def step_function(self, state: StreamState) -> tuple[Callable, tuple]:
        """The velocity of a step as a function of tensors only, `fn(x, modulation, *inputs)`, for
        compiling a frame's whole denoising loop (`scd.sampling.denoise_steps`, which makes the
        modulations from `state.tabulation`); after `prepare` with timesteps."""
        return self.step_velocity, (state.frame_input, state.rope)

    def step_velocity(self, x, modulation, features, rope) -> torch.Tensor:
        return self.decoder.step(x, features, modulation, rope)

    def append_frame(self, *args) -> torch.Tensor:
        return self.encoder.append_frame(*args)

    def loss(self, video: torch.Tensor, conditions: torch.Tensor | None, objective: Objective = Objective(),
             context: torch.Tensor | None = None, weight: torch.Tensor | None = None,
             sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Flow-matching loss of every frame j >= 1 of `video` (B, N, C, H, W) clean latents: the
        encoder runs once over the (optionally noised) clip, block-causally; the decoder denoises
        frame j from the features of frame j - 1, `decoder_draws` noise draws each. `context` (like
        video): the frames the encoder reads instead of `video` (the model's own rollout, the
        targets staying the true frames); `weight` (B, N, 1 or C, H, W): per-pixel loss weights;
        `sinks` (B, S, C, H, W): the model's sink frames, clean, unconditioned, seen by every
        frame `sink_distance` before the clip (where a stream shows them)."""
        enc_conditions = None if conditions is None else torch.cat([conditions[:, 1:], conditions[:, -1:]], dim=1)
        context, timesteps = noised_context(video if context is None else context, objective.clean_context_ratio,
                                            objective.context_sigma_max)
        s, positions = 0, None
        if sinks is not None:
            s = sinks.shape[1]
            context, timesteps, enc_conditions, positions = _with_sinks(self.encoder, sinks, context, timesteps, enc_conditions)
        features = self.encoder(context, enc_conditions, timesteps=timesteps, positions=positions)[:, s:-1]  # (B, N-1, T, D)
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

    # the decoder under teacher forcing, step by step (few-step distillation, scd/distill.py)

    def generated_frames(self, frames: int) -> slice:
        """The frames of a clip of `frames` the decoder makes under teacher forcing: 1 .. N-1, frame
        j from the encoder's features of frame j - 1."""
        return slice(1, frames)

    def teacher_forced_features(self, video: torch.Tensor, conditions: torch.Tensor | None,
                                noise: torch.Tensor | None = None, timestep: float | None = None) -> torch.Tensor:
        """The encoder once over the clean clip `video` (B, N, C, H, W), block-causally, each frame
        with the action that follows it: the features (B, N-1, T, D) the decoder reads for frames
        1 .. N-1, what a stream gives it after the true frames before each. `noise` and `timestep`
        (the generated frames' initial noise, the first step's timestep) are not read: this
        encoder sees clean frames only."""
        enc_conditions = None if conditions is None else torch.cat([conditions[:, 1:], conditions[:, -1:]], dim=1)
        return self.encoder(video, enc_conditions)[:, :-1]

    def frame_velocity(self, features: torch.Tensor, conditions: torch.Tensor | None) -> Callable:
        """The decoder bound to `features` (B, G, T, D) (`teacher_forced_features`) and the clip's
        conditions (B, N): `velocity(x (B, G, C, H, W), timesteps (B,))` -> (B, G, C, H, W), every
        generated frame at once, frame j with its own action j."""
        b, g = features.shape[:2]
        labels = None if conditions is None else conditions[:, 1:].flatten()
        flat = features.flatten(0, 1)
        rope = self.decoder.rope_tables(features.device)

        def velocity(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            v = self.decoder(x.flatten(0, 1), timesteps.repeat_interleave(g), flat, labels, rope)
            return v.view_as(x)

        return velocity


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


def _with_sinks(model: Transformer, sinks: torch.Tensor, context: torch.Tensor, timesteps: torch.Tensor | None,
                conditions: torch.Tensor | None, positions: torch.Tensor | None = None) -> tuple:
    """A training pass's inputs with the sink frames (B, S, C, H, W) before the clip's context
    (B, N, ...): clean (timestep -1), unconditioned (the null index), at `sink_positions` before
    the clip's first frame (position 0; `positions`, default 0..N-1, those of the frames after them)."""
    b, s, n = sinks.shape[0], sinks.shape[1], context.shape[1]
    device = context.device
    if timesteps is not None:
        timesteps = torch.cat([torch.full((b, s), -1.0, device=device), timesteps], 1)
    if conditions is not None:
        conditions = torch.cat([torch.full((b, s), model.config.null_class, dtype=conditions.dtype, device=device),
                                conditions], 1)
    positions = torch.arange(n, device=device) if positions is None else positions
    positions = torch.cat([model.sink_positions(0, device), positions])
    return torch.cat([sinks.to(context), context], 1), timesteps, conditions, positions


def sink_mask(mask: torch.Tensor, sinks: int, tokens_per_frame: int) -> torch.Tensor:
    """`mask` (M, M) over a training pass's frames with `sinks` sink frames put before them: every
    token sees the sinks, a sink sees only itself and the sinks before it."""
    span = sinks * tokens_per_frame
    out = torch.ones(span + mask.shape[0], span + mask.shape[1], dtype=torch.bool, device=mask.device)
    out[span:, span:] = mask
    out[:span, :span] = block_causal_mask(sinks, 0, tokens_per_frame, mask.device)
    out[:span, span:] = False
    return out


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

    def start(self, batch: int, capacity: int, compiler: Callable | None = None, text=None, latent_size=None) -> StreamState:
        _no_text(text)
        return self._state(self.new_cache(batch, capacity), self, compiler)

    def prepare(self, state: StreamState, condition: torch.Tensor | None, timesteps: torch.Tensor | None = None) -> None:
        """Cache the pending frames as clean context (each with its own action); the next frame's
        rotary position follows them. With the frame's denoising timesteps (K,), the conditioning
        of each step is made now."""
        frames, conditions = self._take_pending(state)
        if frames is not None:
            _append(self, state, frames, conditions)
        self.place_sinks(state.cache, state.cache.oldest(writing=False))  # for the noisy frame's steps
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
             context: torch.Tensor | None = None, weight: torch.Tensor | None = None,
             sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Flow-matching loss of every frame j >= 1 of `video` (B, N, C, H, W), denoised against the
        context frames before it, all in one masked pass over [context; noisy] frames. The context
        frames are clean or, as SCD's encoder sees them, noised by `clean_context_ratio` (each with
        its timestep), so the model learns to read imperfect context such as its own frames.
        `context`, `weight` and `sinks`: as `SCDModel.loss`."""
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
        labels = None if conditions is None else torch.cat([conditions, conditions[:, 1:]], 1)
        positions = torch.cat([torch.arange(n), torch.arange(1, n)]).to(video.device)
        mask = teacher_forcing_mask(n, c.tokens_per_frame, video.device)
        s = 0
        if sinks is not None:
            s = sinks.shape[1]
            context, context_timesteps, labels, positions = _with_sinks(self, sinks, context, context_timesteps, labels,
                                                                        positions)
            mask = sink_mask(mask, s, c.tokens_per_frame)
        tokens = self.x_embedder(patchify(torch.cat([context, add_noise(x0, noise, sigma)], 1), c.patch_size))
        timesteps = torch.cat([context_timesteps, sigma * 1000.0], 1)
        modulation = self.modulate(self.conditioning(timesteps, labels))
        rope = rope_tables(positions, h // c.patch_size, w // c.patch_size, c.rope_axes)
        hidden = self.norm_out(self.run_blocks(tokens, modulation, rope, mask), modulation)[:, s + n:]
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


def deepen(model: SCDModel | Baseline, blocks: int) -> SCDModel | Baseline:
    """`model` with `blocks` more blocks after its own in the part that reasons over time (SCD's
    encoder, the baseline's one stack), each new one initialised as `build` does (its adaLN gates
    zeroed, so it starts as the identity): the deeper model generates exactly what `model` did
    until training moves it. The capacity of SCD's encoder is cheap (it runs once per frame, not
    at every denoising step), so that is where an SCD model grows."""
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ConfigError(f"blocks must be a whole number >= 1, got {blocks!r}", parameter="blocks")
    config = dataclasses.replace(model.config, layers=model.config.layers + blocks)
    deeper = build(config)
    state = model.state_dict()
    missing, unexpected = deeper.load_state_dict(state, strict=False)
    grown = ("encoder." if config.arch == "scd" else "") + "transformer_blocks."
    new = {f"{grown}{model.config.layers - model.config.decoder_layers + i}." for i in range(blocks)}
    if unexpected or any(not any(k.startswith(n) for n in new) for k in missing):
        raise ConfigError(f"cannot deepen this model: its weights do not match a {config.layers}-layer one "
                          f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})", parameter="blocks")
    weight = next(model.parameters())
    return deeper.to(weight.device, weight.dtype).train(model.training)


def build(config: ModelConfig, init: bool = True) -> SCDModel | Baseline:
    """A new model of `config`, initialised as the references do (or left as allocated)."""
    model = SCDModel(config) if config.arch == "scd" else Baseline(config)
    if init:
        for part in model.parts().values():
            init_weights(part)
    return model
