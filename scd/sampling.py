"""Flow-matching schedule and the streaming frame loop for SCD and the causal baseline.

`stream` is an iterator: it yields each generated frame (in the model's latent space) the moment it
exists, with its timings, so the CLI, the bench and a user's own loop all stream the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from scd.errors import ActionError, ConfigError
from scd.model import Baseline, KVCache, SCDModel

PREFILL_CHUNK = 16  # context frames per prefill pass: bounds the mask and score memory of long prompts


def sigma_schedule(steps: int, device=None) -> torch.Tensor:
    """Euler noise levels: linspace(1, 0.001, steps) then a terminal 0, float32 (steps + 1,)."""
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    sigmas = torch.linspace(1.0, 0.001, steps, dtype=torch.float64)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float().to(device)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x0 + sigma noise; sigma broadcasts from the left."""
    sigma = sigma.view(*sigma.shape, *([1] * (x0.dim() - sigma.dim())))
    return (1 - sigma) * x0 + sigma * noise


@dataclass
class Frame:
    """One generated frame. `latents` (B, C, H, W) float32 in model space; times in ms.

    For SCD `encoder_ms` is the encoder pass (the context prefill on the first frame) and
    `decoder_ms` the K decoder steps; for the baseline they are the clean-context pass and the
    K full-depth denoising steps."""

    index: int
    latents: torch.Tensor
    encoder_ms: float
    decoder_ms: float

    @property
    def latency_ms(self) -> float:
        return self.encoder_ms + self.decoder_ms


def _timer(device: torch.device):
    """Milliseconds since the last call; synchronises CUDA/MPS only because timing needs it."""
    sync = {"cuda": torch.cuda.synchronize, "mps": getattr(torch, "mps", None) and torch.mps.synchronize}.get(device.type)
    last = [time.perf_counter()]

    def lap() -> float:
        if sync:
            sync()
        now = time.perf_counter()
        elapsed, last[0] = (now - last[0]) * 1000.0, now
        return elapsed

    return lap


def _conditions(model_config, conditions, batch: int, total: int, device) -> torch.Tensor | None:
    """Per-frame condition indices (B, total): actions per frame, or one label per sample broadcast."""
    if model_config.condition is None:
        if conditions is not None:
            raise ActionError("this model takes no actions or labels; drop them")
        return None
    if conditions is None:
        return torch.full((batch, total), model_config.null_class, dtype=torch.long, device=device)
    conditions = torch.as_tensor(conditions, dtype=torch.long, device=device)
    if conditions.dim() == 1 and model_config.condition == "label":
        conditions = conditions[:, None].expand(-1, total)
    if conditions.dim() == 1:
        conditions = conditions[None].expand(batch, -1)
    if conditions.shape != (batch, total):
        raise ActionError(f"expected {total} actions per sample (context + generated frames), got {tuple(conditions.shape)[-1]}")
    if conditions.min() < 0 or conditions.max() > model_config.null_class:
        raise ActionError(f"action indices must lie in 0..{model_config.null_class} ({model_config.null_class} = none)")
    return conditions


def stream(model: SCDModel | Baseline, context: torch.Tensor, frames: int, steps: int,
           guidance: float = 1.0, conditions: torch.Tensor | None = None, noise: torch.Tensor | None = None,
           seed: int = 0, window: int | None = None, clamp: float | None = None) -> Iterator[Frame]:
    """Continue `context` (B, F, C, H, W), in model space, by `frames` frames, one at a time.

    conditions: actions (B, F + frames) or (F + frames,) with `conditions[:, j]` belonging to frame j,
    or labels (B,) for a class-conditioned model; None means the null action. guidance > 1 batches
    the null-conditioned pass with the conditioned one. noise (B, frames, C, H, W) fixes the initial
    noise; otherwise it is drawn on the CPU from `seed`, so a seed gives the same video on any device.
    window keeps only the last `window` frames of context in the KV cache (flat memory).
    clamp bounds each generated frame to [-clamp, clamp] before it is yielded and fed back as context
    (pixel-space models: 1, the range they were trained on; latent models: None).
    """
    config = model.config
    if context.dim() != 5 or context.shape[2:] != (config.channels, *config.latent_size):
        raise ConfigError(f"context must be (B, F, {config.channels}, {config.latent_size[0]}, {config.latent_size[1]}), "
                          f"got {tuple(context.shape)}")
    batch, given = context.shape[:2]
    if given < 1:
        raise ConfigError("at least one context frame is needed")
    if frames < 0:
        raise ConfigError(f"frames must be >= 0, got {frames}")
    if window is not None and window < 1:
        raise ConfigError(f"the context window must be >= 1 frame, got {window}")
    if noise is not None and noise.shape != (batch, frames, *context.shape[2:]):
        raise ConfigError(f"noise must be {(batch, frames, *context.shape[2:])}, got {tuple(noise.shape)}")
    weight = next(model.parameters())
    device, dtype = weight.device, weight.dtype
    labels = _conditions(config, conditions, batch, given + frames, device)
    cfg = guidance != 1.0
    if cfg and labels is None:
        raise ConfigError("guidance needs an action- or class-conditioned model; use guidance 1")
    if cfg:  # batched guidance: [null; conditioned]
        labels = torch.cat([torch.full_like(labels, config.null_class), labels])
    keep = min(given, window) if window else given
    context = context[:, -keep:].to(device=device, dtype=dtype)
    if cfg:
        context = torch.cat([context, context])
    sigmas = sigma_schedule(steps, device)
    timesteps = (sigmas[:-1] * 1000.0).to(dtype)
    deltas = (sigmas[1:] - sigmas[:-1]).tolist()
    generator = torch.Generator().manual_seed(seed)
    capacity = window or (keep + frames)
    lap = _timer(device)

    def denoise(x: torch.Tensor, velocity) -> torch.Tensor:
        for k in range(steps):
            v = velocity(torch.cat([x, x]) if cfg else x, timesteps[k].expand(x.shape[0] * (2 if cfg else 1)))
            v = v.float()
            if cfg:
                uncond, cond = v.chunk(2)
                v = uncond + guidance * (cond - uncond)
            x = x + deltas[k] * v
        return x

    def initial_noise(u: int) -> torch.Tensor:
        if noise is not None:
            return noise[:, u].to(device=device, dtype=torch.float32)
        return torch.randn((batch, *context.shape[2:]), generator=generator).to(device)

    def lab(j: int, n: int = 1):  # condition indices of absolute frames j..j+n-1 -> (B', n)
        return None if labels is None else labels[:, j:j + n]

    first = given - keep  # absolute index of the first kept context frame
    # each model call runs in inference mode, never the generator as a whole: a mode entered around a
    # `yield` would stay on in the caller's code between frames
    no_grad = torch.inference_mode()
    denoise = no_grad(denoise)
    if isinstance(model, SCDModel):
        encoder = no_grad(model.encoder)
        cache = model.encoder.new_cache(context.shape[0], capacity)
        rope = model.decoder.rope_tables(device)
        state = {}
        for start in range(0, keep, PREFILL_CHUNK):  # the encoder sees action j + 1 for frame j
            chunk = context[:, start:start + PREFILL_CHUNK]
            state["features"] = encoder(chunk, lab(first + start + 1, chunk.shape[1]), cache)[:, -1]

        def velocity_for(index: int, latest: torch.Tensor | None, step_labels):
            """Take in the previous frame (the encoder, once); the decoder's velocity for frame `index`."""
            if latest is not None:
                state["features"] = encoder(latest[:, None], lab(index), cache)[:, 0]
            features = state["features"]
            return lambda x, t: model.decoder(x.to(dtype), t, features, step_labels, rope)
    else:
        append = no_grad(model.append)
        cache = model.new_cache(context.shape[0], capacity)
        for start in range(0, keep, PREFILL_CHUNK):  # the baseline sees action j for frame j
            chunk = context[:, start:start + PREFILL_CHUNK]
            append(chunk, lab(first + start, chunk.shape[1]), cache)

        def velocity_for(index: int, latest: torch.Tensor | None, step_labels):
            """Cache the previous frame as clean context; the full-depth velocity for frame `index`."""
            if latest is not None:
                append(latest[:, None], lab(index - 1), cache)
            rope = model.rope(cache.frames, 1, device)
            return lambda x, t: model(x.to(dtype), t, step_labels, cache, rope)

    latest = None
    for u in range(frames):
        index = given + u
        velocity = velocity_for(index, latest, None if labels is None else labels[:, index])
        encoder_ms = lap()
        x = denoise(initial_noise(u), velocity)
        if clamp is not None:
            x = x.clamp(-clamp, clamp)
        decoder_ms = lap()
        latest = torch.cat([x, x]).to(dtype) if cfg else x.to(dtype)
        yield Frame(u, x, encoder_ms, decoder_ms)
        lap()  # the caller's time between frames belongs to no frame


def generate(model, context, frames, steps, **kwargs) -> torch.Tensor:
    """All frames at once: (B, frames, C, H, W) float32. A convenience over `stream`."""
    out = [f.latents for f in stream(model, context, frames, steps, **kwargs)]
    if not out:
        return context.new_zeros((context.shape[0], 0, *context.shape[2:]), dtype=torch.float32)
    return torch.stack(out, dim=1)


def kv_cache_bytes(model, batch: int, frames: int, guidance: float = 1.0, dtype=None) -> int:
    """Bytes the KV cache will take for `frames` cached frames (for memory warnings)."""
    c = model.config
    layers = c.encoder_layers if isinstance(model, SCDModel) else c.layers
    b = batch * (2 if guidance != 1.0 else 1)
    item = torch.tensor([], dtype=dtype or next(model.parameters()).dtype).element_size()
    return 2 * layers * b * c.num_heads * c.head_dim * (frames + 1) * c.tokens_per_frame * item


__all__ = ["Frame", "KVCache", "add_noise", "generate", "kv_cache_bytes", "sigma_schedule", "stream"]
