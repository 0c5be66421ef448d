"""The streaming protocol every model family speaks, and the state a stream keeps.

`scd.sampling` runs one frame loop over any `StreamingModel`; what differs between families (how
context enters the cache, which sampler denoises a frame, what conditions it) stays behind this
protocol, in the family's own file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from scd.compiler import compiled_call
from scd.errors import ConfigError

if TYPE_CHECKING:
    from scd.models.config import ModelConfig
    from scd.models.layers import Modulation

# ----------------------------------------------------------------------------- KV cache

class KVCache:
    """Preallocated keys and values of every layer for a rolling window of clean frames.

    Frames are written in order into slots 0..capacity-1 and then wrap around, overwriting the
    oldest: attention over cached frames is order-free (no mask between past frames, RoPE applied
    before caching), so a full ring needs no reordering. One spare frame slot past the ring holds
    the baseline's noisy frame, so its attention reads one contiguous span without a concat.

    With `sinks`, the first `sinks` frames written keep slots 0..sinks-1 for good and the ring is
    the slots after them. A sink attends to nothing before it, so its keys differ between
    positions only by their temporal rotation: `sink_keys` keeps them as written (at positions
    0..sinks-1), and the model re-rotates them in place (`Transformer.place_sinks`) so that every
    query sees them where training put them, a fixed distance before the window.
    """

    def __init__(self, layers: int, batch: int, heads: int, head_dim: int, tokens_per_frame: int,
                 capacity: int, device, dtype, sinks: int = 0):
        if not 0 <= sinks < capacity:
            raise ConfigError(f"a KV cache of {capacity} frames cannot keep {sinks} sink frames beside a window")
        # one buffer per layer, not views of one: compiled code writes a layer's buffer in place
        # only when no other input aliases it. Zeros, not empty: a masked attention weighs the
        # slots not yet written by 0, and 0 * NaN (old memory) would still be NaN.
        shape = (batch, heads, (capacity + 1) * tokens_per_frame, head_dim)
        self.keys = tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers))
        self.values = tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers))
        self.tokens_per_frame = tokens_per_frame
        self.capacity = capacity
        self.sinks = sinks
        self.sink_keys: tuple[torch.Tensor, ...] | None = None  # per layer (B, H, sinks T, hd), once written
        self.sink_shift: int | None = None  # the rotation the cached sink keys have now (0: as written)
        self.frames = 0  # frames written so far, including overwritten ones

    @property
    def cached_frames(self) -> int:
        return min(self.frames, self.capacity)

    @property
    def buffers(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """(keys, values): per layer, (B, H, (capacity + 1) T, hd)."""
        return self.keys, self.values

    def slot(self, frame: int) -> int:
        """The slot frame `frame` is written to: its own for a sink, else its place in the ring."""
        if frame < self.sinks:
            return frame
        return self.sinks + (frame - self.sinks) % (self.capacity - self.sinks)

    def oldest(self, writing: bool) -> int:
        """The oldest window frame (not a sink) the next query sees: one that writes the next
        frame (its write evicts the oldest of a full ring) or one that does not (the baseline's
        noisy frame, in the spare slot)."""
        ring = self.capacity - self.sinks
        return max(self.sinks, self.frames - ring + (1 if writing else 0))

    def keep_sinks(self) -> None:
        """Copy the sink frames' keys as written, once all are (`Transformer.place_sinks` rotates them)."""
        span = self.sinks * self.tokens_per_frame
        self.sink_keys = tuple(k[:, :, :span].clone() for k in self.keys)


# ----------------------------------------------------------------------------- the protocol

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
    # SCD: what the frame being denoised reads, per sample (`prepare(samples=K)`: K B rows, else those above)
    frame_features: torch.Tensor | None = None
    frame_input: torch.Tensor | None = None
    modulations: list | None = None  # per denoising step of this frame, when `prepare` was given its timesteps
    modulation_table: "Modulation | None" = None  # the same stacked (K, ...), as compiled code reads them
    tabulation: tuple | None = None  # (function, args) that make `modulation_table`, for compiled code
    owner: nn.Module | None = None
    compiler: Callable | None = None
    slots: torch.Tensor | None = None  # static: (capacity + 1,) bool, which cache slots hold a frame (the last: spare)
    step_mask: torch.Tensor | None = None  # static baseline: (1, S) the cache tokens a denoising step sees
    tables: dict = field(default_factory=dict)  # eager: each part's `ConditionTable`s, made on first use
    family: object | None = None  # what a family keeps beyond these (the Wan family: its cache and text)

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

    A model whose context pass is separate from its denoiser (SCD) sets `shares_context` and takes
    `prepare(..., samples=K)`: the context is run once and the frame's velocity then takes K samples
    of it at once (x of K B, sample-major), which is what makes a median of K samples cheap for it.
    """

    config: "ModelConfig"
    shares_context = False

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

    @staticmethod
    def spread(x: torch.Tensor, samples: int, halves: int = 1) -> torch.Tensor:
        """(H B, ...) -> (H K B, ...): each of the `halves` (guidance's [unconditional; conditional])
        repeated for K samples, sample-major within it, as the sampler lays out K samples of x."""
        if samples == 1:
            return x
        x = x.unflatten(0, (halves, 1, -1))
        return x.expand(-1, samples, *x.shape[2:]).flatten(0, 2)

    def _take_pending(self, state: StreamState) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        pending, state.pending = state.pending, []
        if not pending:
            return None, None
        if len(pending) == 1:
            return pending[0]
        frames = torch.cat([f for f, _ in pending], 1)
        conditions = None if pending[0][1] is None else torch.cat([c for _, c in pending], 1)
        return frames, conditions
