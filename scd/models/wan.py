"""The Wan2.1 family: Wan's text-to-video transformer, causal and streamed chunk by chunk.

Reads top-down: the embedders, self- and cross-attention, the block, the head, the model (a
bidirectional forward, as Wan2.1 and diffusers' `WanTransformer3DModel` run it), then the stream:
a KV cache with a rolling window and attention-sink frames, and the protocol `scd.sampling` runs.
Parameter names are Wan2.1's own (`blocks.<i>.self_attn.q`, `head.modulation`, ...), the names of
Self-Forcing's `CausalWanModel`, so its weights load without renaming.

A chunk of n latent frames is denoised in a few steps, each seeing the clean cache of earlier
chunks plus its own tokens; then the clean chunk runs once at timestep `context_noise` (0) to write
its keys and values. Rotary positions are absolute latent-frame indices; keys are cached after
their norm and rotation, so attention over the cache needs no mask and no order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scd.errors import ConfigError
from scd.flow import add_noise, logit_normal
from scd.models.config import WanConfig
from scd.models.layers import apply_rope, rope_tables
from scd.models.streaming import StreamingModel, StreamState

# ----------------------------------------------------------------------------- embedders

def wan_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(N,) timesteps -> (N, dim) float32: [cos(t w), sin(t w)], w_i = 10000^(-i / (dim/2)), made in
    float64 as Wan's reference does."""
    half = dim // 2
    w = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.double(), w)
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


def wan_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Rotary channels per (frame, row, col): Wan gives each spatial axis head_dim // 6 pairs and
    time the rest (head_dim 128: 44 / 42 / 42 channels)."""
    side = 2 * (head_dim // 6)
    return head_dim - 2 * side, side, side


def wan_rope(first_frame: int, frames: int, rows: int, cols: int, head_dim: int, device, dtype):
    """Rotary tables (cos, signed sin), each (frames * rows * cols, head_dim), for frames from
    `first_frame` on: Wan's 3-axis rope on interleaved pairs, made in float64."""
    positions = torch.arange(first_frame, first_frame + frames, device=device)
    cos, sin = rope_tables(positions, rows, cols, wan_rope_axes(head_dim))
    return cos.to(dtype), sin.to(dtype)


# ----------------------------------------------------------------------------- attention and the block

class Projections(nn.Module):
    """Wan's attention weights: q, k, v, o projections and RMSNorm of q and k across all heads."""

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)


class SelfAttention(Projections):
    """Self-attention: q and k normed across all heads (before the split), then rope."""

    def project(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, S, D) -> rotated q, k and v, each (B, H, S, hd)."""
        b, s, _ = x.shape
        cos, sin = rope
        q = apply_rope(self.norm_q(self.q(x)).view(b, s, self.heads, self.head_dim), cos[:, None], sin[:, None])
        k = apply_rope(self.norm_k(self.k(x)).view(b, s, self.heads, self.head_dim), cos[:, None], sin[:, None])
        v = self.v(x).view(b, s, self.heads, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, rope, cache: "LayerCache | None" = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, S, D). Without a cache: attend within x (as `mask` (S, S) allows). With one: write this
        chunk's keys and values into the cache's slots for it, then attend to every cached token (the
        chunk's own included)."""
        q, k, v = self.project(x, rope)
        if cache is not None:
            k, v = cache.write(k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(out.transpose(1, 2).flatten(2))


class CrossAttention(Projections):
    """Attention from the video tokens to the text tokens (all `text_len` of them, padding included,
    as Wan does); its keys and values depend only on the text, so a stream makes them once."""

    def text_kv(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded text (B, L, D) -> keys and values, each (B, H, L, hd)."""
        b, n, _ = text.shape
        k = self.norm_k(self.k(text)).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(text).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, *kv)
        return self.o(out.transpose(1, 2).flatten(2))


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=eps)


class Block(nn.Module):
    """Wan2.1's block: modulated self-attention, cross-attention to the text (after `norm3`; none in
    an action model), a modulated tanh-GELU FFN; (shift, scale, gate) x 2 from `modulation` + the
    frame's time projection."""

    def __init__(self, c: WanConfig):
        super().__init__()
        self.eps = c.eps
        self.self_attn = SelfAttention(c.dim, c.num_heads, c.eps)
        if c.condition == "text":  # an action model has no text to attend to
            self.norm3 = nn.LayerNorm(c.dim, eps=c.eps, elementwise_affine=True)
            self.cross_attn = CrossAttention(c.dim, c.num_heads, c.eps)
        self.ffn = nn.Sequential(nn.Linear(c.dim, c.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(c.ffn_dim, c.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, c.dim) / c.dim ** 0.5)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, rope, text_kv, cache: "LayerCache | None" = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        # x (B, F, T, D); e0 (B, F, 6, D): the frames' time projections
        b, f, t, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation[:, None] + e0).chunk(6, dim=2)  # (B, F, 1, D)
        h = torch.addcmul(shift1, layer_norm(x, self.eps), 1 + scale1)
        x = torch.addcmul(x, self.self_attn(h.flatten(1, 2), rope, cache, mask).view(b, f, t, d), gate1)
        if text_kv is not None:
            x = x + self.cross_attn(self.norm3(x).flatten(1, 2), text_kv).view(b, f, t, d)
        h = torch.addcmul(shift2, layer_norm(x, self.eps), 1 + scale2)
        return torch.addcmul(x, self.ffn(h), gate2)


class Head(nn.Module):
    """The output layer: LayerNorm modulated by `modulation` + the frame's time embedding, a linear."""

    def __init__(self, c: WanConfig):
        super().__init__()
        self.eps = c.eps
        self.head = nn.Linear(c.dim, math.prod(c.patch_size) * c.channels)
        self.modulation = nn.Parameter(torch.randn(1, 2, c.dim) / c.dim ** 0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        # x (B, F, T, D); e (B, F, D)
        shift, scale = (self.modulation[:, None] + e[:, :, None]).chunk(2, dim=2)  # (B, F, 1, D)
        return self.head(torch.addcmul(shift, layer_norm(x, self.eps), 1 + scale))


# ----------------------------------------------------------------------------- the model

class WanModel(nn.Module):
    """Wan2.1's transformer (`layers` blocks; all of the config's by default). `forward` is the
    bidirectional call over a whole clip; the stream (below) runs the same layers chunk by chunk
    against a cache. Without a `head` (SCD-Wan's encoder) it returns the last block's hidden states."""

    def __init__(self, config: WanConfig, layers: int | None = None, head: bool = True):
        super().__init__()
        c = self.config = config
        self.patch_embedding = nn.Conv3d(c.channels, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        if c.condition == "text":
            self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"),
                                                nn.Linear(c.dim, c.dim))
        else:  # each frame's action (the null action last) joins its time embedding
            self.action_embedding = nn.Embedding(c.num_classes + 1, c.dim)
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 6 * c.dim))
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_layers if layers is None else layers))
        self.head = Head(c) if head else None

    # the pieces of a forward pass, in order

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """Text encoder output (B, L, text_dim), L <= text_len, padding rows zero -> (B, text_len, D):
        right-padded with zeros to `text_len` tokens first, as Wan does."""
        c = self.config
        if text.dim() != 3 or text.shape[-1] != c.text_dim or text.shape[1] > c.text_len:
            raise ConfigError(f"text embeddings must be (B, L <= {c.text_len}, {c.text_dim}), got {tuple(text.shape)}",
                              parameter="text")
        weight = self.text_embedding[0].weight
        text = F.pad(text.to(weight.device, weight.dtype), (0, 0, 0, c.text_len - text.shape[1]))
        return self.text_embedding(text)

    def text_kv(self, text: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Every block's cross-attention keys and values for text (B, L, text_dim): once per stream
        (None per block for an action model, which has no cross-attention)."""
        if self.config.condition != "text":
            return [None] * len(self.blocks)
        embedded = self.embed_text(text)
        return [block.cross_attn.text_kv(embedded) for block in self.blocks]

    def embed_time(self, timesteps: torch.Tensor, actions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """timesteps (B, F) in Wan's units (sigma * 1000) -> e (B, F, D) and e0 (B, F, 6, D); an action
        model adds each frame's action (B, F) (None: the null action) to its time embedding."""
        dtype = self.time_embedding[0].weight.dtype
        e = self.time_embedding(wan_sinusoid(timesteps.flatten(), self.config.freq_dim).to(dtype))
        if self.config.condition == "action":
            if actions is None:
                actions = torch.full(timesteps.shape, self.config.null_class, device=timesteps.device)
            e = e + self.action_embedding(actions.reshape(-1).to(e.device, torch.long))
        e0 = self.time_projection(e).unflatten(-1, (6, self.config.dim))
        return e.view(*timesteps.shape, -1), e0.view(*timesteps.shape, 6, -1)

    def embed_video(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, F, C, H, W) -> tokens (B, F, T, D), (frame, row, col) order."""
        x = self.patch_embedding(latents.transpose(1, 2).to(self.patch_embedding.weight.dtype))  # (B, D, F, h, w)
        return x.flatten(3).permute(0, 2, 3, 1)

    def unpatchify(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, F, T, p*q*C) -> (B, F, C, H, W); a token's outputs are ordered (row, col, channel)."""
        _, p, q = self.config.patch_size
        b, f = tokens.shape[:2]
        x = tokens.reshape(b, f, h // p, w // q, p, q, -1).permute(0, 1, 6, 2, 4, 3, 5)
        return x.reshape(b, f, -1, h, w)

    def run(self, latents: torch.Tensor, timesteps: torch.Tensor, text_kv, first_frame: int | torch.Tensor,
            caches: "list[LayerCache] | None" = None, mask: torch.Tensor | None = None,
            actions: torch.Tensor | None = None) -> torch.Tensor:
        """Flow prediction (B, F, C, H, W) of latents (B, F, C, H, W) at timesteps (B, F), rope frames
        from `first_frame` (or at the positions (F,) given); with `caches` (one per block) the frames
        attend to the cache too; `mask` (F T, F T) says which tokens see which without one; `actions`
        (B, F): an action model's action of each frame."""
        h, w = latents.shape[-2:]
        x = self.embed_video(latents)
        e, e0 = self.embed_time(timesteps, actions)
        return self.run_tokens(x, e, e0, self.rope_for(first_frame, latents.shape[1], h, w, x), text_kv, caches, mask,
                               (h, w))

    def rope_for(self, first_frame, frames: int, h: int, w: int, like: torch.Tensor):
        _, p, q = self.config.patch_size
        if isinstance(first_frame, torch.Tensor):
            cos, sin = rope_tables(first_frame, h // p, w // q, wan_rope_axes(self.config.head_dim))
            return cos.to(like.dtype), sin.to(like.dtype)
        key = (first_frame, frames, h, w, like.device, like.dtype)
        made = self.__dict__.get("_rope")
        if made is None or made[0] != key:  # a chunk's steps and its clean pass share their positions: made once
            with torch.inference_mode(False):  # plain tensors: training may read them too
                tables = wan_rope(first_frame, frames, h // p, w // q, self.config.head_dim, like.device, like.dtype)
            made = self.__dict__["_rope"] = (key, tables)
        return made[1]

    def run_tokens(self, x, e, e0, rope, text_kv, caches=None, mask=None, size=None) -> torch.Tensor:
        """The blocks (and the head, when the model has one, unpatchified to `size`) on tokens x
        (B, F, T, D) with their time embeddings e (B, F, D), e0 (B, F, 6, D)."""
        for i, block in enumerate(self.blocks):
            x = block(x, e0, rope, text_kv[i], None if caches is None else caches[i], mask)
        if self.head is None:
            return x
        out = self.head(x, e)
        return out if size is None else self.unpatchify(out, *size)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The bidirectional call (Wan2.1, diffusers' WanTransformer3DModel): latents (B, F, C, H, W),
        timesteps (B,) or (B, F), text (B, L, text_dim) -> flow prediction (B, F, C, H, W)."""
        if timesteps.dim() == 1:
            timesteps = timesteps[:, None].expand(-1, latents.shape[1])
        return self.run(latents, timesteps, self.text_kv(text), 0)


# ----------------------------------------------------------------------------- the stream

class LayerCache:
    """One block's keys and values for `capacity` frames: the first `sinks` slots hold the video's
    first frames for good, the rest is a ring of the newest. Attention over it is order-free, so a
    frame takes the slot of the frame it evicts and nothing moves."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, stream: "WanStream"):
        self.keys, self.values, self.stream = keys, values, stream  # (B, H, capacity * T, hd)

    def write(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Put the chunk's k, v (B, H, n T, hd) in its slots; the keys and values it attends to."""
        index = self.stream.write_index
        self.keys.index_copy_(2, index, k)
        self.values.index_copy_(2, index, v)
        held = self.stream.held_tokens
        return self.keys[:, :, :held], self.values[:, :, :held]


@dataclass
class WanStream:
    """Where a stream is: frames committed to the cache, its capacity and sinks, and the slots of
    the chunk being written (`write_index`, tokens) with what the cache then holds (`held_tokens`)."""

    capacity: int
    sinks: int
    tokens_per_frame: int
    rolling: bool  # a full cache evicts its oldest non-sink frames (else a full cache is an error)
    frames: int = 0
    write_index: torch.Tensor | None = None
    held_tokens: int = 0

    def slot(self, frame: int) -> int:
        if frame < self.capacity:
            return frame
        return self.sinks + (frame - self.sinks) % (self.capacity - self.sinks)

    def place(self, count: int, device) -> None:
        """Slots for frames `frames` .. `frames + count - 1` (evicting the oldest non-sink frames)."""
        first = self.frames
        if first + count > self.capacity and not self.rolling:
            raise ConfigError(f"{first + count} frames do not fit a cache sized for {self.capacity}: give a larger "
                              "frame count or a model with a rolling window")
        if count > self.capacity - (self.sinks if first + count > self.capacity else 0):
            raise ConfigError(f"a chunk of {count} frames does not fit a cache of {self.capacity} frames "
                              f"with {self.sinks} sinks")
        t = self.tokens_per_frame
        slots = torch.tensor([self.slot(first + i) for i in range(count)], device=device)
        self.write_index = (slots[:, None] * t + torch.arange(t, device=device)).flatten()
        self.held_tokens = min(first + count, self.capacity) * t


class WanStreaming(StreamingModel):
    """What both Wan streaming models share: the size of their cache, and a config swapped whole."""

    def use_config(self, config: WanConfig) -> None:
        """Stream with `config` from now on (another chunk size, say): every part reads it."""
        for module in self.modules():
            if isinstance(getattr(module, "config", None), WanConfig):
                module.config = config

    def cache_bytes(self, batch: int, frames: int, dtype: torch.dtype, latent_size=None) -> int:
        """Bytes of the KV cache of a stream of `frames` frames (the window caps it)."""
        c = self.config
        held = frames if c.local_attn_size is None else min(frames, c.local_attn_size)
        return 2 * self.cached_layers * batch * c.dim * held * _tokens(c, latent_size or c.latent_size) * dtype.itemsize


class WanCausal(WanModel, WanStreaming):
    """A causal Wan2.1 (Self-Forcing, CausVid) as a streaming model: `observe` queues finished frames,
    `prepare` writes them into the cache in chunks at the clean timestep, `velocity` is the flow
    prediction of the chunk being denoised."""

    def parts(self) -> dict[str, nn.Module]:
        return {"model": self}

    @property
    def cached_layers(self) -> int:
        return self.config.num_layers

    def start(self, batch: int, capacity: int, compiler=None, text: torch.Tensor | None = None,
              latent_size: tuple[int, int] | None = None) -> StreamState:
        """An empty stream for `batch` samples of `latent_size` latents (the config's by default),
        conditioned on `text` (B, L, text_dim), keeping `capacity` frames (the model's rolling window
        where it has one)."""
        c = self.config
        size = _check_stream(c, batch, compiler, text, latent_size)
        stream, caches = _new_cache(c, batch, capacity, size, len(self.blocks), self.patch_embedding.weight)
        state = StreamState(cache=None, owner=self)
        state.family = WanState(stream, caches, self.text_kv(text), size)
        return state

    def prepare(self, state: StreamState, condition=None, timesteps=None) -> None:
        """Write the pending frames into the cache, `chunk_frames` at a time, at the clean timestep."""
        state.condition = condition  # an action model: the action of the frame about to be made (B,)
        frames, actions = self._take_pending(state)
        if frames is None:
            return
        wan = state.family
        n = self.config.chunk_frames
        for start in range(0, frames.shape[1], n):
            chunk = frames[:, start:start + n]
            wan.stream.place(chunk.shape[1], chunk.device)
            clean = torch.full(chunk.shape[:2], float(self.config.context_noise), device=chunk.device)
            self.run(chunk, clean, wan.text_kv, wan.stream.frames, wan.caches,
                     actions=None if actions is None else actions[:, start:start + n])
            wan.stream.frames += chunk.shape[1]

    def velocity(self, state: StreamState, x: torch.Tensor, timesteps: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """Flow prediction of the chunk x (B, n, C, H, W) (or one frame (B, C, H, W)) at timesteps
        (B,), at the positions after the committed frames; its keys and values take its slots in the
        cache until the clean pass writes the finished chunk there."""
        single = x.dim() == 4
        chunk = x[:, None] if single else x
        wan = state.family
        wan.stream.place(chunk.shape[1], chunk.device)
        t = timesteps.float()[:, None].expand(-1, chunk.shape[1])
        out = self.run(chunk, t, wan.text_kv, wan.stream.frames, wan.caches, actions=_frame_actions(state, chunk))
        return out[:, 0] if single else out

    def loss(self, video: torch.Tensor, text: torch.Tensor, objective=None) -> torch.Tensor:
        """Teacher forcing (CausVid, Self-Forcing's `_forward_train`): clean latents video (B, N, C, H, W)
        and text (B, L, text_dim) (an action model: each frame's action (B, N)); every chunk is noised
        to its own level and denoised against the clean chunks before it, in one masked pass over
        [clean; noisy] frames; flow-matching loss."""
        sigma_shift = getattr(objective, "sigma_shift", 1.0)
        b, n = video.shape[:2]
        chunk = self.config.chunk_frames
        sigma = _chunk_sigmas(b, n, chunk, sigma_shift, video.device)  # (B, N)
        noise = torch.randn_like(video)
        noisy = add_noise(video.flatten(0, 1), noise.flatten(0, 1), sigma.flatten()).view_as(video)
        timesteps = torch.cat([torch.full((b, n), float(self.config.context_noise), device=video.device), sigma * 1000], 1)
        positions = torch.arange(n, device=video.device).repeat(2)
        mask = teacher_forcing_mask(n, chunk, _tokens(self.config, video.shape[-2:]), video.device)
        text_kv, actions = _condition(self, text, 2)
        flow = self.run(torch.cat([video, noisy], 1), timesteps, text_kv, positions, mask=mask, actions=actions)[:, n:]
        return F.mse_loss(flow.float(), (noise - video).float())


@dataclass
class WanState:
    stream: WanStream
    caches: list
    text_kv: list
    latent_size: tuple[int, int]
    decoder_text_kv: list | None = None  # SCD-Wan: the decoder's cross-attention keys and values
    features: torch.Tensor | None = None  # SCD-Wan: the encoder's features of the chunk being made (B, n, T, D)
    last_clean: torch.Tensor | None = None  # SCD-Wan: the encoder's outputs of the last clean chunk
    decoder_frame_kv: tuple | None = None  # SCD-Wan: (n, the decoder's text keys and values per frame of a chunk of n)


def _tokens(c: WanConfig, size) -> int:
    return (size[0] // c.patch_size[1]) * (size[1] // c.patch_size[2])


def _condition(model: WanModel, conditions: torch.Tensor | None, copies: int):
    """A teacher-forcing pass's conditioning: text keys and values (text models), or each frame's
    action repeated for the `copies` copies of the clip the pass runs (action models)."""
    if model.config.condition == "text":
        return model.text_kv(conditions), None
    return model.text_kv(None), None if conditions is None else conditions.repeat(1, copies)


def _frame_actions(state: StreamState, chunk: torch.Tensor) -> torch.Tensor | None:
    """(B, n) the action of the chunk being made, from `prepare` (None: the null action)."""
    condition = getattr(state, "condition", None)
    return None if condition is None else condition[:, None].expand(-1, chunk.shape[1])


def _check_stream(c: WanConfig, batch: int, compiler, text, latent_size) -> tuple[int, int]:
    if compiler is not None:
        raise ConfigError("compiled streams run the FAR-style family; stream a Wan model eagerly", parameter="compiled")
    if c.condition == "action":
        if text is not None:
            raise ConfigError("this Wan model is conditioned on actions, not text: drop text", parameter="text")
    elif text is None:
        raise ConfigError("a Wan model is conditioned on text: give its embeddings (B, L, text_dim)", parameter="text")
    elif text.shape[0] != batch:
        raise ConfigError(f"text embeddings for {text.shape[0]} prompts, a stream of {batch}", parameter="text")
    size = tuple(latent_size or c.latent_size)
    if not c.accepts_latent_size(size):
        raise ConfigError(f"latent size {size} is not a multiple of the patch {c.patch_size[1:]}")
    return size


def _new_cache(c: WanConfig, batch: int, capacity: int, size, layers: int, like: torch.Tensor):
    """A stream's position and one `LayerCache` per cached block: `capacity` frames, or the window."""
    t = _tokens(c, size)
    capacity = capacity if c.local_attn_size is None else c.local_attn_size
    stream = WanStream(capacity, c.sink_size, t, rolling=c.local_attn_size is not None)
    shape = (batch, c.num_heads, capacity * t, c.head_dim)
    return stream, [LayerCache(like.new_zeros(shape), like.new_zeros(shape), stream) for _ in range(layers)]


def _chunk_sigmas(batch: int, frames: int, chunk: int, shift: float, device) -> torch.Tensor:
    """(B, N) noise levels, one per chunk of `chunk` frames (shift * logit-normal, as training draws)."""
    chunks = -(-frames // chunk)
    sigma = logit_normal(batch * chunks, shift).view(batch, chunks)
    return sigma.repeat_interleave(chunk, dim=1)[:, :frames].to(device)


def teacher_forcing_mask(frames: int, chunk: int, tokens_per_frame: int, device) -> torch.Tensor:
    """Boolean ((2N) T)^2 over [clean frames 0..N-1; noisy frames 0..N-1] in chunks of `chunk`:
    a clean frame sees the clean frames of its own and earlier chunks; a noisy frame sees the clean
    frames of earlier chunks and the noisy frames of its own chunk: what it sees when streamed."""
    c = torch.arange(frames, device=device) // chunk
    clean_sees_clean = c[None] <= c[:, None]
    noisy_sees_clean = c[None] < c[:, None]
    noisy_sees_noisy = c[None] == c[:, None]
    none = torch.zeros_like(clean_sees_clean)
    frame_mask = torch.cat([torch.cat([clean_sees_clean, none], 1), torch.cat([noisy_sees_clean, noisy_sees_noisy], 1)])
    return frame_mask.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


# ----------------------------------------------------------------------------- SCD from Wan

class WanSCD(nn.Module, WanStreaming):
    """SCD from Wan2.1 (the paper's post-training): an encoder of Wan blocks runs once per chunk over
    the history (KV cache, rolling window as the causal model's), a decoder of Wan blocks runs at
    every denoising step on the noisy chunk, frame by frame, with the encoder's features of that
    frame; both keep their cross-attention to the text. The encoder sees the frame being made as
    pure noise (`encoder_input` "noise", as the pretrained model expects a noisy frame there) or
    not at all ("none": the decoder reads the features of the previous chunk's frames).
    State dict keys `encoder.*` and `decoder.*`, each a Wan2.1 transformer's names."""

    def __init__(self, config: WanConfig):
        super().__init__()
        self.config = config
        self.encoder = WanModel(config, config.encoder_layers, head=False)
        self.decoder = WanModel(config, config.decoder_layers, head=True)

    def parts(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "decoder": self.decoder}

    @property
    def cached_layers(self) -> int:
        return self.config.encoder_layers

    def start(self, batch: int, capacity: int, compiler=None, text: torch.Tensor | None = None,
              latent_size: tuple[int, int] | None = None) -> StreamState:
        c = self.config
        size = _check_stream(c, batch, compiler, text, latent_size)
        stream, caches = _new_cache(c, batch, capacity, size, c.encoder_layers, self.encoder.patch_embedding.weight)
        state = StreamState(cache=None, owner=self)
        state.family = WanState(stream, caches, self.encoder.text_kv(text), size)
        state.family.decoder_text_kv = self.decoder.text_kv(text)
        return state

    def prepare(self, state: StreamState, condition=None, timesteps=None) -> None:
        """Write the pending frames into the encoder's cache at the clean timestep, a chunk at a time;
        the features of a new chunk are made by its first denoising step."""
        state.condition = condition  # an action model: the action of the frame about to be made (B,)
        frames, actions = self._take_pending(state)
        wan = state.family
        wan.features = None
        if frames is None:
            return
        n = self.config.chunk_frames
        for start in range(0, frames.shape[1], n):
            chunk = frames[:, start:start + n]
            wan.stream.place(chunk.shape[1], chunk.device)
            clean = torch.full(chunk.shape[:2], float(self.config.context_noise), device=chunk.device)
            hidden = self.encoder.run(chunk, clean, wan.text_kv, wan.stream.frames, wan.caches,
                                      actions=None if actions is None else actions[:, start:start + n])
            wan.stream.frames += chunk.shape[1]
            wan.last_clean = hidden  # (B, n, T, D): what a decoder without the current frame reads

    def velocity(self, state: StreamState, x: torch.Tensor, timesteps: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """Flow prediction of the noisy chunk x (B, n, C, H, W) (or (B, C, H, W)) at timesteps (B,):
        the decoder on each frame with the encoder's features of it (made by the chunk's first call)."""
        single = x.dim() == 4
        chunk = x[:, None] if single else x
        wan = state.family
        if wan.features is None:
            wan.features = self.features(state, chunk, timesteps)
        t = timesteps.float()[:, None].expand(-1, chunk.shape[1])
        n = chunk.shape[1]
        if wan.decoder_frame_kv is None or wan.decoder_frame_kv[0] != n:  # per chunk size, not per step
            wan.decoder_frame_kv = (n, frame_text_kv(wan.decoder_text_kv, n))
        out = self.decode(chunk, t, wan.features, wan.decoder_frame_kv[1], per_frame=True,
                          actions=_frame_actions(state, chunk))
        return out[:, 0] if single else out

    def features(self, state: StreamState, chunk: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The encoder's features (B, n, T, D) of the chunk being made: its noise at the first step's
        timestep, against the clean cache (nothing of it stays in the cache); or, with encoder input
        "none", those of the last clean chunk."""
        wan = state.family
        if self.config.encoder_input == "none":
            last = getattr(wan, "last_clean", None)
            if last is None:
                raise ConfigError("this SCD model reads the previous frames' features: give it a prompt clip first")
            return last[:, -chunk.shape[1]:]
        wan.stream.place(chunk.shape[1], chunk.device)
        t = timesteps.float()[:, None].expand(-1, chunk.shape[1])
        return self.encoder.run(chunk, t, wan.text_kv, wan.stream.frames, wan.caches, actions=_frame_actions(state, chunk))

    def decode(self, noisy: torch.Tensor, timesteps: torch.Tensor, features: torch.Tensor, text_kv,
               per_frame: bool = False, actions: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder on noisy frames (B, n, C, H, W) at timesteps (B, n) with features (B, n, T, D):
        each frame alone (attention inside its tokens and its features) -> flow (B, n, C, H, W).
        `text_kv`: the decoder's text keys and values per sample, or per frame (`frame_text_kv`)."""
        b, n = noisy.shape[:2]
        h, w = noisy.shape[-2:]
        dec = self.decoder
        x = dec.embed_video(noisy).flatten(0, 1)[:, None]  # (B n, 1, T, D)
        feats = features.flatten(0, 1)[:, None].to(x.dtype)
        e, e0 = dec.embed_time(timesteps.flatten()[:, None], None if actions is None else actions.flatten()[:, None])
        rope = dec.rope_for(0, 1, h, w, x)
        if self.config.decoder_combine == "token_concat":
            x = torch.cat([feats, x], dim=2)  # (B n, 1, 2T, D)
            rope = tuple(r.repeat(2, 1) for r in rope)
        else:
            x = x + feats
        kv = text_kv if per_frame else frame_text_kv(text_kv, n)
        out = dec.run_tokens(x, e, e0, rope, kv)[:, :, -features.shape[2]:]  # (B n, 1, T, p q C)
        return dec.unpatchify(out, h, w).view(b, n, *noisy.shape[2:])

    def loss(self, video: torch.Tensor, text: torch.Tensor, objective=None) -> torch.Tensor:
        """Teacher forcing, as the paper trains SCD from Wan: clean latents video (B, N, C, H, W), text
        (B, L, text_dim). The encoder runs once over [clean frames; each chunk noised to a high level
        (sigma >= encoder_noise_min)] with the teacher-forcing mask; the decoder denoises every frame
        from its own noise level with the encoder's features of that frame ("none": of the frame a
        chunk before, every frame after the first chunk). Flow-matching loss."""
        c = self.config
        sigma_shift = getattr(objective, "sigma_shift", 1.0)
        b, n = video.shape[:2]
        chunk, t = c.chunk_frames, _tokens(c, video.shape[-2:])
        device = video.device
        clean_t = torch.full((b, n), float(c.context_noise), device=device)
        positions = torch.arange(n, device=device)
        if c.encoder_input == "noise":
            low = c.encoder_noise_min
            enc_sigma = (low + (1 - low) * torch.rand(b, -(-n // chunk))).repeat_interleave(chunk, 1)[:, :n].to(device)
            enc_noisy = add_noise(video.flatten(0, 1), torch.randn_like(video).flatten(0, 1), enc_sigma.flatten())
            mask = teacher_forcing_mask(n, chunk, t, device)
            text_kv, actions = _condition(self.encoder, text, 2)
            hidden = self.encoder.run(torch.cat([video, enc_noisy.view_as(video)], 1),
                                      torch.cat([clean_t, enc_sigma * 1000], 1), text_kv,
                                      positions.repeat(2), mask=mask, actions=actions)
            features, target, own = hidden[:, n:], video, text
        else:
            mask = block_causal_mask(n, chunk, t, device)
            text_kv, actions = _condition(self.encoder, text, 1)
            hidden = self.encoder.run(video, clean_t, text_kv, positions, mask=mask, actions=actions)
            if n <= chunk:
                raise ConfigError(f"training with encoder input none needs clips longer than a chunk ({chunk} frames)")
            features, target = hidden[:, :-chunk], video[:, chunk:]
            own = text if c.condition == "text" or text is None else text[:, chunk:]
        sigma = logit_normal(target.shape[0] * target.shape[1], sigma_shift).to(device).view(target.shape[:2])
        noise = torch.randn_like(target)
        noisy = add_noise(target.flatten(0, 1), noise.flatten(0, 1), sigma.flatten()).view_as(target)
        decoder_kv = self.decoder.text_kv(text if c.condition == "text" else None)
        flow = self.decode(noisy, sigma * 1000, features, decoder_kv, actions=None if c.condition == "text" else own)
        return F.mse_loss(flow.float(), (noise - target).float())

    # the decoder under teacher forcing, step by step (few-step distillation, scd/distill.py)

    def generated_frames(self, frames: int) -> slice:
        """The frames of a clip of `frames` the decoder makes under teacher forcing: all of them
        (encoder input "noise"), or those after the first chunk ("none")."""
        if self.config.encoder_input == "noise":
            return slice(0, frames)
        if frames <= self.config.chunk_frames:
            raise ConfigError(f"an SCD model with encoder input none needs clips longer than a chunk "
                              f"({self.config.chunk_frames} frames)", parameter="clip_frames")
        return slice(self.config.chunk_frames, frames)

    def teacher_forced_features(self, video: torch.Tensor, text: torch.Tensor, noise: torch.Tensor | None = None,
                                timestep: float = 1000.0) -> torch.Tensor:
        """The encoder once over the clean clip `video` (B, N, C, H, W) with text (B, L, text_dim):
        the features (B, G, T, D) the decoder reads for the `generated_frames`, what a stream gives
        it after the true chunks before each. Encoder input "noise": the generated frames' initial
        noise `noise` (B, N, C, H, W) at the first step's `timestep`, chunk by chunk against the
        clean chunks before (one masked pass, as `loss`); "none": the clean frames a chunk before."""
        c = self.config
        b, n = video.shape[:2]
        chunk, t = c.chunk_frames, _tokens(c, video.shape[-2:])
        device = video.device
        clean_t = torch.full((b, n), float(c.context_noise), device=device)
        positions = torch.arange(n, device=device)
        text_kv = self.encoder.text_kv(text)
        if c.encoder_input == "noise":
            if noise is None or noise.shape != video.shape:
                raise ConfigError(f"noise must be {tuple(video.shape)}, the generated frames' initial noise",
                                  parameter="noise")
            timesteps = torch.cat([clean_t, torch.full((b, n), float(timestep), device=device)], 1)
            hidden = self.encoder.run(torch.cat([video, noise.to(video.dtype)], 1), timesteps, text_kv,
                                      positions.repeat(2), mask=teacher_forcing_mask(n, chunk, t, device))
            return hidden[:, n:]
        self.generated_frames(n)  # refuses a clip of one chunk
        hidden = self.encoder.run(video, clean_t, text_kv, positions, mask=block_causal_mask(n, chunk, t, device))
        return hidden[:, :-chunk]

    def frame_velocity(self, features: torch.Tensor, text: torch.Tensor):
        """The decoder bound to `features` (B, G, T, D) (`teacher_forced_features`) and the text:
        `velocity(x (B, G, C, H, W), timesteps (B,))` -> flow (B, G, C, H, W), each frame alone
        (the decoder's text keys and values made once)."""
        kv = frame_text_kv(self.decoder.text_kv(text), features.shape[1])

        def velocity(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return self.decode(x, timesteps.float()[:, None].expand(-1, x.shape[1]), features, kv, per_frame=True)

        return velocity


def frame_text_kv(text_kv: list, frames: int) -> list:
    """Each block's text keys and values (B, H, L, hd) repeated for the B n frames a decoder runs alone."""
    return [None if kv is None else (kv[0].repeat_interleave(frames, 0), kv[1].repeat_interleave(frames, 0))
            for kv in text_kv]


def block_causal_mask(frames: int, chunk: int, tokens_per_frame: int, device) -> torch.Tensor:
    """Boolean (N T)^2: a frame sees the frames of its own and earlier chunks."""
    c = torch.arange(frames, device=device) // chunk
    return (c[None] <= c[:, None]).repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


def init_weights(model: WanModel) -> None:
    """Wan's initialisation: xavier linears, normal text and time embedders, a zero head."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.xavier_uniform_(model.patch_embedding.weight.flatten(1))
    for embedder in (getattr(model, "text_embedding", ()), model.time_embedding):
        for module in embedder:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
    if hasattr(model, "action_embedding"):
        nn.init.normal_(model.action_embedding.weight, std=0.02)
    if model.head is not None:
        nn.init.zeros_(model.head.head.weight)


def build(config: WanConfig, init: bool = True) -> WanCausal | WanSCD:
    """A causal Wan model (arch baseline) or SCD from Wan (arch scd) of `config`; `init` draws
    weights as Wan initialises them, else they are left as allocated for a load."""
    model = WanSCD(config) if config.arch == "scd" else WanCausal(config)
    if init:
        for part in model.parts().values():
            init_weights(part)
    return model
