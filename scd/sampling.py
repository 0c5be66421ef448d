"""The flow-matching schedule and the streaming frame loop, the same for SCD and the causal baseline.

`Rollout` generates one frame per `step(action)`, so the action of each frame can be chosen after
the previous frame was seen (a live player); `stream` is the all-actions-up-front iterator over it.
Both speak the models' streaming protocol (`scd.models.StreamingModel`) and never ask which model
they run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from scd import checks
from scd.compiler import compiled_call, compiler
from scd.errors import ActionError, ConfigError
from scd.flow import add_noise
from scd.models import KVCache, StreamingModel

UNCONDITIONAL = -1.0  # the references' guidance scale for unconditional generation
MIN_FEATURE_NOISE = 0.05  # decoder guidance noises features at least this much (the official pipeline)


def sigma_schedule(steps: int, device=None) -> torch.Tensor:
    """Euler noise levels: linspace(1, 0.001, steps) then a terminal 0, float32 (steps + 1,)."""
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    sigmas = torch.linspace(1.0, 0.001, steps, dtype=torch.float64)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float().to(device)


def shifted_schedule(shift: float, train_steps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """The table of a shifted flow-matching schedule (Self-Forcing's `FlowMatchScheduler` with
    `extra_one_step`, sigma_min 0): float32 sigmas (train_steps,) = shift s / (1 + (shift - 1) s)
    for s = linspace(1, 0, train_steps + 1)[:-1], and their timesteps, sigma * train_steps."""
    s = torch.linspace(1.0, 0.0, train_steps + 1, dtype=torch.float32)[:-1]
    sigmas = shift * s / (1 + (shift - 1) * s)
    return sigmas, sigmas * train_steps


def even_steps(steps: int) -> tuple[int, ...]:
    """`steps` listed timesteps spread evenly over 1000 from 1000 down (4: 1000, 750, 500, 250), what a
    re-noising sampler runs at a step count other than its model's list."""
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}", parameter="steps")
    return tuple(round(1000 - i * 1000 / steps) for i in range(steps))


def renoise_schedule(listed: tuple[int, ...], shift: float, warp: bool = True,
                     steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The timesteps (K,) a re-noising sampler runs and their sigmas (K,), float32. `listed` steps
    (Self-Forcing: 1000, 750, 500, 250) are warped onto the shifted table (step k becomes the
    table's timestep at index 1000 - k) when `warp`; `steps` other than len(listed) spreads that
    many steps evenly over 1000 first. A timestep's sigma is the table's at the nearest timestep."""
    listed = list(listed)
    if steps is not None and steps != len(listed):
        listed = list(even_steps(steps))
    sigmas, table = shifted_schedule(shift)
    index = torch.tensor(listed, dtype=torch.long)
    timesteps = torch.cat([table, torch.zeros(1)])[1000 - index] if warp else index.float()
    nearest = (table[None] - timesteps[:, None]).abs().argmin(dim=1)
    return timesteps, sigmas[nearest]


def renoise(flow: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], x: torch.Tensor,
            timesteps: torch.Tensor, sigmas: torch.Tensor, draw: Callable[[int], torch.Tensor],
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Self-Forcing's few-step sampler from noise x (float32, any shape): at each step the model's
    flow prediction `flow(x, t, k)` (x in the model's dtype, t (B,)) gives x0 = x - sigma_k flow
    (in float64, as the reference); before the next step x0 is re-noised to sigma_{k+1} with
    `draw(k)` (standard normal, like x). Returns the last x0 (float32)."""
    batch = x.shape[0]
    ts = timesteps.to(device=x.device, dtype=dtype)[:, None].expand(-1, batch).unbind(0)
    levels = sigmas.double().tolist()
    for k, sigma in enumerate(levels):
        v = flow(x.to(dtype), ts[k], k)
        x0 = (x.double() - sigma * v.double()).float()
        if k + 1 < len(levels):
            nxt = float(sigmas[k + 1])
            x = torch.lerp(x0, draw(k).to(x0.device, torch.float32), nxt)
    return x0


@dataclass
class Frame:
    """One generated frame: `latents` (B, C, H, W) float32 in model space; times in ms. `context_ms`
    is the context pass that took in the previous frame (SCD's encoder, the baseline's clean pass;
    the whole prompt on the first frame), `denoise_ms` the K denoising steps (SCD's decoder, the
    baseline's full depth). Times are 0 when the rollout is not timed. A model that generates
    chunks of several frames at once gives the chunk's times to its first frame and 0 to the rest
    (`chunk_start` False), which arrive with it."""

    index: int
    latents: torch.Tensor
    context_ms: float
    denoise_ms: float
    chunk_start: bool = True

    @property
    def latency_ms(self) -> float:
        return self.context_ms + self.denoise_ms


def _sync_for(device: torch.device) -> Callable[[], None] | None:
    """The device synchronisation timing needs (None on the CPU, where work is synchronous)."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    if device.type == "mps":
        return torch.mps.synchronize
    return None


def denoise(velocity: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
            guidance: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Euler steps from noise x (B, C, H, W) float32 along `sigmas` (K + 1,) (best on the CPU: the
    step sizes are read as numbers). `velocity(x, t, k)` takes x in the model's dtype, timesteps
    (B,) = sigma * 1000 and the step's index k; with guidance != 1 it is called on [x; x] and its
    output is read as [unconditional; conditional]. x itself is not modified."""
    cfg = guidance != 1.0
    batch = x.shape[0] * (2 if cfg else 1)
    timesteps = (sigmas[:-1] * 1000.0).to(device=x.device, dtype=dtype)[:, None].expand(-1, batch).unbind(0)
    deltas = (sigmas[1:] - sigmas[:-1]).tolist()
    for k, delta in enumerate(deltas):
        xin = torch.cat([x, x]) if cfg else x
        v = velocity(xin.to(dtype), timesteps[k], k).float()
        if cfg:
            uncond, cond = v.chunk(2)
            v = torch.lerp(uncond, cond, guidance)
        x = torch.add(x, v, alpha=delta) if k == 0 else x.add_(v, alpha=delta)  # the first step leaves the caller's x
    return x


def denoise_steps(step: Callable, tabulation: tuple, x: torch.Tensor, deltas: torch.Tensor, inputs: tuple,
                  guidance: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`denoise` over a velocity of tensors only, `step(x, table.at(k), *inputs)` (a model's
    `step_function`), with the frame's conditioning made first, `table = tabulate(*args)` from
    `tabulation` (the model's `state.tabulation`), and the step sizes as a tensor `deltas` (K,):
    what a compiled stream compiles whole, one graph per frame (on CUDA, one CUDA graph for the K
    steps)."""
    tabulate, args = tabulation
    table = tabulate(*args)
    cfg = guidance != 1.0
    for k in range(deltas.shape[0]):
        xin = torch.cat([x, x]) if cfg else x
        v = step(xin.to(dtype), table.at(k), *inputs).float()
        if cfg:
            uncond, cond = v.chunk(2)
            v = torch.lerp(uncond, cond, guidance)
        x = x + deltas[k] * v
    return x


class Rollout:
    """A stream driven one frame at a time: `step(action)` denoises the next frame and takes it in
    as context. Start from `context` (B, F, C, H, W) latents in model space.

    actions: the context frames' own actions, (B, F) or (F,) indices (None: the null action); the
    action of each new frame is given to `step`. label: a class-conditioned model's class, an index
    or (B,) indices, for every frame. guidance != 1 batches an unconditional pass with the
    conditioned one: by the null condition, or, for a model whose `guidance_mode` is "decoder"
    (the official SCD evaluation), by noising the unconditional half's encoder features (strength
    max(encoder_noise, 0.05)) with the condition kept. guidance -1 (as in the references) generates
    unconditionally: the null condition everywhere, no second pass. A model trained to start from
    pure noise (the baseline) takes a context of 0 frames. The initial noise of each frame is drawn
    on the CPU from `seed`, in frame order, so a seed gives the same frames on any device and a
    replay with the same actions is exact. window keeps the last `window` frames in the KV cache
    (flat memory); without one the cache is sized for `frames` generated frames. clamp bounds each
    generated frame to [-clamp, clamp] before it is returned and fed back (pixel models: 1).
    timed=False skips the device synchronisation that timing needs; the frame times are then 0.

    compiled: run the models' per-frame and per-step calls through torch.compile with static
    shapes (True: inductor, on CUDA with CUDA graphs; or a backend name, "eager" and "aot_eager"
    for tests). The first frames compile, later ones never recompile; results match the eager
    stream to float rounding. A call that fails to compile runs eagerly (`compile_fallbacks`).

    A text-conditioned model (the Wan family) takes `text` (B, L, text_dim), the text encoder's
    embeddings, for the whole stream; its frames come in chunks of `config.chunk_frames`, made
    by the step that starts a chunk (the others hand out the rest of it), and the latent size is
    the context's (B, 0, C, H, W) for a stream from text alone.

    samples K > 1 draws K samples of every frame (K initial noises, denoised in one batch) and keeps
    their per-element median, the lower of the middle two for even K: it is returned and fed back as
    the context of every sample. A sampling slip (a ball a pixel off, a texture that drifts) is
    rarely in most samples at once, so the median does not feed it back. An SCD model runs its
    encoder once per frame and only its decoder K times (`StreamingModel.shares_context`); any
    other model runs the whole stream K times over (K times the batch, the cache included).
    """

    def __init__(self, model: StreamingModel, context: torch.Tensor, steps: int, guidance: float = 1.0,
                 actions: torch.Tensor | None = None, label: int | torch.Tensor | None = None, seed: int = 0,
                 window: int | None = None, frames: int | None = None, clamp: float | None = None, timed: bool = True,
                 compiled: bool | str = False, text: torch.Tensor | None = None, samples: int = 1):
        config = model.config
        if (context.dim() != 5 or context.shape[2] != config.channels
                or not config.accepts_latent_size(tuple(context.shape[3:]))):
            raise ConfigError(f"context must be (B, F, {config.channels}, {config.latent_size[0]}, {config.latent_size[1]}), "
                              f"got {tuple(context.shape)}")
        batch, given = context.shape[:2]
        if window is not None and window < 1:
            raise ConfigError(f"the context window must be >= 1 frame, got {window}")
        if window is None and frames is None:
            raise ConfigError("give window (frames kept as context) or frames (the most this rollout generates)")
        if frames is not None and frames < 0:
            raise ConfigError(f"frames must be >= 0, got {frames}")
        checks.samples(samples)
        if samples > 1 and config.sampler == "renoise":
            raise ConfigError("a chunked, re-noising model draws one sample per frame: use samples 1", parameter="samples")
        weight = next(model.parameters())
        self.model, self.config = model, config
        self.device, self.dtype = weight.device, weight.dtype
        self.batch, self.given, self.index = batch, given, 0
        self.samples = samples
        self.shared = samples > 1 and model.shares_context  # the context pass run once for the K samples
        self.latent_size = tuple(context.shape[3:])
        self.chunk = config.chunk_frames
        self.pending: list[Frame] = []  # the rest of the chunk the last step made
        self.chunks = 0
        if config.sampler == "renoise":
            self.renoise_timesteps, self.renoise_sigmas = renoise_schedule(
                config.denoising_steps, config.timestep_shift, config.warp_steps, steps)
            self.timesteps = self.renoise_timesteps.to(device=self.device, dtype=self.dtype)
        else:
            self.sigmas = sigma_schedule(steps)  # on the CPU: denoise reads its step sizes as numbers
            self.timesteps = (self.sigmas[:-1] * 1000.0).to(device=self.device, dtype=self.dtype)
        self.unconditional = float(guidance) == UNCONDITIONAL
        self.guidance = 1.0 if self.unconditional else float(guidance)
        self.cfg = self.guidance != 1.0
        self.decoder_guidance = self.cfg and config.guidance_mode == "decoder"
        self.feature_noise = max(config.encoder_noise, MIN_FEATURE_NOISE)
        self.limit = None if window else frames
        self.clamp = clamp
        self.generator = torch.Generator().manual_seed(seed)
        self.sync = _sync_for(self.device) if timed else None
        self.timed = timed
        self.label = self._label(label)
        if self.cfg and config.condition is None and not self.decoder_guidance:
            raise ConfigError("guidance needs an action- or class-conditioned model; use guidance 1")
        if self.cfg and config.condition == "text":
            raise ConfigError("this text-to-video model is distilled to sample without guidance: use guidance 1",
                              parameter="guidance")
        if config.condition == "text" and (actions is not None or label is not None):
            raise ActionError("this model is conditioned on text: give text, not actions or labels")
        # a model with attention sinks keeps its first frames beside the window (the first generated, if fewer are given)
        sinks = min(getattr(config, "sink_frames", 0), given)
        kept = torch.arange(given)
        if window:
            kept = torch.cat([kept[:sinks], kept[sinks:][-window:]])
        keep = len(kept)
        own = self._context_conditions(actions, given)[:, kept] if config.condition in ("action", "label") else None
        context = self._spread(context[:, kept].to(device=self.device, dtype=self.dtype))
        own = None if own is None else self._spread(own)
        self.compiler, self.cuda_graphs = None, False
        if compiled:
            self.compiler = compiler(self.device.type, "inductor" if compiled is True else compiled)
            self._denoise_steps = compiled_call(denoise_steps, self.compiler, model)
            self.deltas = (self.sigmas[1:] - self.sigmas[:-1]).to(self.device)
            self.cuda_graphs = self.compiler.mode == "reduce-overhead"
        capacity = window + getattr(config, "sink_frames", 0) if window else keep + -(-frames // self.chunk) * self.chunk
        stream = {} if text is None else {"text": text, "latent_size": self.latent_size}
        with torch.inference_mode():
            streams = batch * (1 if self.shared else samples) * (2 if self.cfg else 1)
            self.state = model.start(streams, capacity, compiler=self.compiler, **stream)
            if keep:
                model.observe(self.state, self._doubled(context), self._guided(own))

    # ----------------------------------------------------------------------------- conditions

    def _label(self, label) -> torch.Tensor | None:
        if label is None:
            return None
        if self.config.condition != "label":
            raise ActionError("this model takes no class label; drop it")
        label = torch.as_tensor(label, dtype=torch.long).to(self.device).expand(self.batch).clone()
        self._check_range(label, "label")
        return label

    def _check_range(self, indices: torch.Tensor, what: str) -> None:
        null = self.config.null_class
        if indices.numel() and (indices.min() < 0 or indices.max() > null):
            raise ActionError(f"{what} indices must lie in 0..{null} ({null} = none)")

    def _context_conditions(self, actions, given: int) -> torch.Tensor:
        """(B, given) conditions of the context frames."""
        null = self.config.null_class
        if self.config.condition == "label":
            if actions is not None:
                raise ActionError("this model is class-conditioned: give a label, not actions")
            fill = self.label if self.label is not None else torch.full((self.batch,), null, device=self.device)
            return fill[:, None].expand(-1, given)
        if actions is None:
            return torch.full((self.batch, given), null, dtype=torch.long, device=self.device)
        actions = torch.as_tensor(actions, dtype=torch.long).to(self.device)
        if actions.dim() == 1:
            actions = actions[None].expand(self.batch, -1)
        if actions.shape != (self.batch, given):
            raise ActionError(f"expected {given} actions per sample for the context frames, got {tuple(actions.shape)[-1]}")
        self._check_range(actions, "action")
        return actions

    def _frame_condition(self, action) -> torch.Tensor | None:
        """(B,) condition of the frame about to be generated."""
        config = self.config
        if config.condition not in ("action", "label"):
            if action is not None:
                raise ActionError("this model takes no actions or labels; drop them")
            return None
        if config.condition == "label":
            if action is not None:
                raise ActionError("this model is class-conditioned: give a label, not actions")
            return self.label if self.label is not None else torch.full((self.batch,), config.null_class, device=self.device)
        if action is None:
            return torch.full((self.batch,), config.null_class, dtype=torch.long, device=self.device)
        action = torch.as_tensor(action, dtype=torch.long).to(self.device)
        if action.dim() > 1 or (action.dim() == 1 and action.shape[0] != self.batch):
            raise ActionError(f"give one action, or one per sample ({self.batch}), not {tuple(action.shape)}")
        self._check_range(action, "action")
        return action.expand(self.batch)

    def _guided(self, conditions: torch.Tensor | None) -> torch.Tensor | None:
        """[null; conditions] along the batch when guidance is on ([conditions; conditions] under
        decoder guidance); the null condition alone when generating unconditionally."""
        if conditions is None:
            return None
        null = torch.full_like(conditions, self.config.null_class)
        if self.unconditional:
            return null
        if not self.cfg:
            return conditions
        return torch.cat([conditions if self.decoder_guidance else null, conditions])

    def _doubled(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x]) if self.cfg else x

    def _spread(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (K B, ...), the same for each of the K samples, sample-major, as a stream that
        runs K times over takes its context; unchanged where the model shares its context pass."""
        return x.repeat(self.samples, *(1,) * (x.dim() - 1)) if self.samples > 1 and not self.shared else x

    def _consensus(self, x: torch.Tensor) -> torch.Tensor:
        """(K B, ...) samples -> (B, ...), their per-element median (the lower middle one for even K)."""
        if self.samples == 1:
            return x
        return x.view(self.samples, self.batch, *x.shape[1:]).median(dim=0).values

    # ----------------------------------------------------------------------------- frames

    def _lap(self) -> float:
        """Milliseconds since the last lap, synchronising the device only because timing needs it."""
        if not self.timed:
            return 0.0
        if self.sync is not None:
            self.sync()
        now = time.perf_counter()
        elapsed, self._last = (now - self._last) * 1000.0, now
        return elapsed

    def _feature_noise(self, given: torch.Tensor | None) -> torch.Tensor:
        """Decoder guidance: (2B, T, D) noise for the newest encoder features, the unconditional half's."""
        shape = (self.batch * (1 if self.shared else self.samples), self.config.tokens_per_frame, self.config.width)
        if given is None:
            given = torch.randn(shape, generator=self.generator)
        elif tuple(given.shape) != shape:
            raise ConfigError(f"feature_noise must be {shape}, got {tuple(given.shape)}")
        given = self.feature_noise * given.to(self.device, torch.float32)
        return torch.cat([given, torch.zeros_like(given)]).to(self.dtype)

    @property
    def compile_fallbacks(self) -> dict[str, str]:
        """Compiled calls that run eagerly instead, by name: why they failed to compile."""
        if self.compiler is None:
            return {}
        calls = {name: call for (name, _), call in getattr(self.model, "_compiled", {}).items()}
        return {name: call.fallback for name, call in calls.items() if call.fallback is not None}

    def step(self, action=None, noise: torch.Tensor | None = None, feature_noise: torch.Tensor | None = None,
             draws: torch.Tensor | None = None) -> Frame:
        """Generate the next frame, driven by `action` (an index or (B,) indices; None: the null
        action; ignored by models without actions only when None). noise (B, C, H, W) replaces the
        frame's initial noise; feature_noise (B, T, D), standard normal, the draw of decoder guidance;
        draws, a re-noising model's draws for the chunk this step starts (`_chunk_step`)."""
        if self.limit is not None and self.index >= self.limit:
            raise ConfigError(f"this rollout was sized for {self.limit} frames: give it a window to go on")
        if self.config.sampler == "renoise":
            return self._chunk_step(action, noise, draws)
        condition = self._frame_condition(action)
        condition = None if condition is None else self._spread(condition)
        shape = (self.batch * self.samples, self.config.channels, *self.config.latent_size)
        if noise is not None and tuple(noise.shape) != shape:
            raise ConfigError(f"noise must be {shape}, got {tuple(noise.shape)}"
                              + (f" ({self.samples} samples of each of {self.batch})" if self.samples > 1 else ""))
        self._last = time.perf_counter()
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new frame: the graphs may reuse their memory
        # inference mode per call, never around a caller's code between frames
        with torch.inference_mode():
            if noise is None:  # from the CPU generator: a seed gives the same frames on any device
                noise = torch.randn(shape, generator=self.generator)
            if self.decoder_guidance:  # drawn after the frame's noise, from the same generator
                self.state.feature_noise = self._feature_noise(feature_noise)
            # a contiguous inference tensor, whatever the caller's noise is: one compiled graph for every frame
            x = torch.empty(shape, device=self.device).copy_(noise, non_blocking=True)
            if self.shared:
                self.model.prepare(self.state, self._guided(condition), self.timesteps, self.samples, 2 if self.cfg else 1)
            else:
                self.model.prepare(self.state, self._guided(condition), self.timesteps)
            context_ms = self._lap()
            if self.compiler is not None:
                step, inputs = self.model.step_function(self.state)
                x = self._denoise_steps(step, self.state.tabulation, x, self.deltas, inputs, self.guidance, self.dtype)
                if self.cuda_graphs:  # a graph's output lives in its memory pool, which the next frame's replay reuses
                    x = x.clone()
            else:
                x = denoise(lambda x, t, k: self.model.velocity(self.state, x, t, step=k), x, self.sigmas,
                            self.guidance, self.dtype)
            if self.clamp is not None:
                x = x.clamp_(-self.clamp, self.clamp)
            x = self._consensus(x)
            denoise_ms = self._lap()
            self.model.observe(self.state, self._doubled(self._spread(x.to(self.dtype)))[:, None],
                               None if condition is None else self._guided(condition)[:, None])
        frame = Frame(self.index, x, context_ms, denoise_ms)
        self.index += 1
        return frame


    def _chunk_step(self, action, noise: torch.Tensor | None, draws: torch.Tensor | None) -> Frame:
        """The next frame of a chunked, re-noising stream: a new chunk of `chunk` frames is denoised
        when the last one is used up. noise (B, n, C, H, W) (or (B, C, H, W) when n = 1) fixes the
        chunk's initial noise, draws (K - 1, B, n, C, H, W) its re-noising draws; both are given on
        the step that starts a chunk, else drawn from the seed (noise first, then each draw)."""
        self._frame_condition(action)
        if self.pending:
            if noise is not None or draws is not None:
                raise ConfigError(f"noise is given per chunk of {self.chunk} frames: on the step that starts one")
            self.index += 1
            return self.pending.pop(0)
        n, shape = self.chunk, (self.batch, self.chunk, self.config.channels, *self.latent_size)
        if noise is not None:
            noise = noise[:, None] if noise.dim() == 4 and n == 1 else noise
            if tuple(noise.shape) != shape:
                raise ConfigError(f"noise must be {shape}, got {tuple(noise.shape)}")
        steps = self.renoise_timesteps.shape[0]
        if draws is not None and tuple(draws.shape) != (steps - 1, *shape):
            raise ConfigError(f"draws must be {(steps - 1, *shape)}, got {tuple(draws.shape)}")
        self._last = time.perf_counter()
        with torch.inference_mode():
            if noise is None:  # from the CPU generator: a seed gives the same frames on any device
                noise = torch.randn(shape, generator=self.generator)
            x = noise.to(self.device, torch.float32)

            def draw(k: int) -> torch.Tensor:
                return draws[k] if draws is not None else torch.randn(shape, generator=self.generator)

            self.model.prepare(self.state, None, self.timesteps)
            context_ms = self._lap()
            x = renoise(lambda x, t, k: self.model.velocity(self.state, x, t, step=k), x, self.renoise_timesteps,
                        self.renoise_sigmas, draw, self.dtype)
            denoise_ms = self._lap()
            self.model.observe(self.state, x.to(self.dtype), None)
        frames = [Frame(self.index + i, x[:, i], context_ms if i == 0 else 0.0, denoise_ms if i == 0 else 0.0, i == 0)
                  for i in range(n)]
        self.chunks += 1
        self.pending = frames[1:]
        self.index += 1
        return frames[0]


def stream(model: StreamingModel, context: torch.Tensor, frames: int, steps: int,
           guidance: float = 1.0, conditions: torch.Tensor | None = None, noise: torch.Tensor | None = None,
           seed: int = 0, window: int | None = None, clamp: float | None = None, timed: bool = True,
           feature_noise: torch.Tensor | None = None, compiled: bool | str = False, text: torch.Tensor | None = None,
           draws: torch.Tensor | None = None, samples: int = 1) -> Iterator[Frame]:
    """Continue `context` (B, F, C, H, W), in model space, by `frames` frames: a `Rollout` with every
    action known up front.

    conditions: actions (B, F + frames) or (F + frames,), `conditions[:, j]` belonging to frame j, or
    labels (B,) (or one int) for a class-conditioned model; None means the null action. noise
    (B, frames, C, H, W) fixes each frame's initial noise, feature_noise (B, frames, T, D) the draws
    of decoder guidance (K B of each with `samples` K); otherwise they are drawn from `seed`. text (B, L, text_dim): a
    text-conditioned model's embeddings; draws (chunks, K - 1, B, n, C, H, W) its re-noising
    draws, chunk by chunk. The rest as `Rollout`.
    """
    config = model.config
    if frames < 0:
        raise ConfigError(f"frames must be >= 0, got {frames}")
    shape = (context.shape[0] * samples, frames, *context.shape[2:]) if context.dim() == 5 else None
    if shape and noise is not None and noise.shape != shape:
        raise ConfigError(f"noise must be {shape}, got {tuple(noise.shape)}")
    given = context.shape[1] if context.dim() == 5 else 0
    actions = label = None
    if conditions is not None and config.condition == "label":
        label = conditions
    elif conditions is not None and config.condition == "action":
        actions = torch.as_tensor(conditions, dtype=torch.long)
        if actions.shape[-1] != given + frames:
            raise ActionError(f"expected {given + frames} actions per sample (context + generated frames), got {actions.shape[-1]}")
    elif conditions is not None:
        raise ActionError("this model takes no actions or labels; drop them")
    rollout = Rollout(model, context, steps, guidance, None if actions is None else actions[..., :given], label,
                      seed, window, frames, clamp, timed, compiled, text, samples)
    n = config.chunk_frames
    for u in range(frames):
        action = None if actions is None else actions[..., given + u]
        if config.sampler == "renoise":  # a chunked stream takes its noise and draws on a chunk's first step
            first = u % n == 0
            yield rollout.step(action, None if noise is None or not first else noise[:, u:u + n],
                               draws=None if draws is None or not first else draws[u // n])
            continue
        yield rollout.step(action, None if noise is None else noise[:, u],
                           None if feature_noise is None else feature_noise[:, u])


def generate(model, context, frames, steps, **kwargs) -> torch.Tensor:
    """All frames at once: (B, frames, C, H, W) float32. A convenience over `stream`."""
    out = [f.latents for f in stream(model, context, frames, steps, **kwargs)]
    if not out:
        return context.new_zeros((context.shape[0], 0, *context.shape[2:]), dtype=torch.float32)
    return torch.stack(out, dim=1)


def kv_cache_bytes(model: StreamingModel, batch: int, frames: int, guidance: float = 1.0, dtype=None,
                   samples: int = 1) -> int:
    """Bytes the KV cache will take for `frames` cached frames (for memory warnings); with `samples`
    K, a model that does not share its context pass caches K streams per sample."""
    b = batch * (2 if guidance not in (1.0, UNCONDITIONAL) else 1) * (1 if model.shares_context else samples)
    return model.cache_bytes(b, frames, dtype or next(model.parameters()).dtype)


__all__ = ["Frame", "KVCache", "Rollout", "add_noise", "denoise", "denoise_steps", "even_steps", "generate", "kv_cache_bytes",
           "renoise", "renoise_schedule", "shifted_schedule", "sigma_schedule", "stream"]
