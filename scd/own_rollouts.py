"""Training clips from the model's own rollouts (self forcing against the simulator's truth).

A model trained only on true context meets its own, slightly wrong, frames when it generates and
drifts. Here `streams` world clips run alongside training, one generated frame per training step:
each stream continues from the frames the model itself generated (its sampler, its window, under
no_grad), driven by the clip's actions, while the simulator renders the true frames of the same
actions. A training clip is then the stream's last `clip_frames` generated frames as context with
the true frames as targets: the loss teaches the model to predict the truth from its own context.
Streams start from true frames and run to a random horizon (up to `horizon` frames), or restart
as soon as a generated frame has lost an object (`off_track`): the clips cover every stage of a
rollout the model still holds, and grow longer as it holds longer. With `past_lost_balls` a stream
runs on past a lost ball and restarts only when it loses the agent or the scene (`scene_lost`:
below `scene_psnr` dB); the lost ball's pixels, where it truly is and where the model drew it, are
left out of the loss (`lost_ball_weights`), so the far horizon is learnt from the model's own
drifted frames without the model learning to ignore where its context puts a ball. The state is kept in the training
checkpoint: a resumed run continues the same streams.
"""

from __future__ import annotations

import numpy as np
import torch

from scd import world
from scd.errors import ConfigError
from scd.sampling import generate

TRACK_RADIUS = 1.0  # px: a stream whose frame has an object further than this from the truth starts afresh
SCENE_PSNR = 25.0  # dB over the pixels no object covers: below it a stream has lost the scene (the default)
BALLS = ("red_ball", "green_ball")
LOST_MARGIN = 2  # px around a lost ball's pixels also left out of the loss (a frame's motion and then some)


def lost_objects(frames: torch.Tensor, truth: torch.Tensor) -> dict[str, np.ndarray]:
    """Each object's (S,) bool: generated frames (S, 3, H, W) in [-1, 1] where the object, visible in
    the true frame, is missing or more than TRACK_RADIUS px from where it truly is (`scd.world.locate`)."""
    to_uint8 = lambda v: ((v.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    pred, true = to_uint8(frames), to_uint8(truth)
    lost = {}
    for name, color in world.OBJECT_COLORS.items():
        p_at, p_seen = world.locate(pred, color)
        t_at, t_seen = world.locate(true, color)
        lost[name] = t_seen & (~p_seen | (np.linalg.norm(p_at - t_at, axis=-1) > TRACK_RADIUS))
    return lost


def off_track(frames: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """(S,) bool: generated frames where any object is lost (`lost_objects`). Past that point the
    context no longer holds where the object is, and the true frame is no target to learn from it:
    the model would learn to ignore its context."""
    return np.logical_or.reduce(list(lost_objects(frames, truth).values()))


def scene_lost(frames: torch.Tensor, truth: torch.Tensor, threshold: float = SCENE_PSNR) -> np.ndarray:
    """(S,) bool: generated frames (S, 3, H, W) whose scene (the pixels no object covers in either
    frame) is below `threshold` dB PSNR against the truth's."""
    background = ~(world.object_mask(frames) | world.object_mask(truth))  # (S, 1, H, W)
    error = ((frames.clamp(-1, 1) - truth) ** 2 * background).sum((1, 2, 3)) / (3 * background.sum((1, 2, 3))).clamp(min=1)
    return (10 * torch.log10(4 / error.clamp(min=1e-10)) < threshold).numpy()


def lost_ball_weights(context: torch.Tensor, truth: torch.Tensor, lost: np.ndarray) -> torch.Tensor:
    """Loss weights (S, N, 1, H, W) for rollout clips, context (generated) and truth (S, N, 3, H, W):
    0 within LOST_MARGIN px of any pixel, in any frame of the clip, where a ball that stream has lost
    (lost (S, 2) bool, in BALLS order) is drawn in the context or is in the truth; 1 elsewhere."""
    s, n, _, h, w = truth.shape
    keep = torch.ones(s, n, 1, h, w)
    for k, name in enumerate(BALLS):
        rows = np.flatnonzero(lost[:, k])
        if len(rows):
            seen = (world.object_mask(context[rows], [name]) | world.object_mask(truth[rows], [name])).any(1)
            keep[rows] *= (~world.dilate(seen, LOST_MARGIN)).float()[:, None]
    return keep


class OwnRollouts:
    """`streams` world clips continued by the model being trained (see the module docstring)."""

    def __init__(self, config, streams: int, clip_frames: int, horizon: int, steps: int, seed: int,
                 past_lost_balls: bool = False, scene_psnr: float | None = None):
        if tuple(config.frame_size) != (world.FRAME_SIZE,) * 2 or not config.codec.is_pixel:
            raise ConfigError("rollout training renders the synthetic world: train a 32x32 pixel model on the world (data 'world')",
                              "rollout_clips")
        window = config.window or config.context_frames or clip_frames - 1
        if horizon < clip_frames + 1:
            raise ConfigError(f"the rollout horizon must be > clip_frames ({clip_frames}), got {horizon}", "rollout_horizon")
        self.streams, self.clip_frames, self.horizon = streams, clip_frames, horizon
        self.window, self.steps, self.seed = min(window, clip_frames - 1), steps, seed
        self.truth = torch.zeros(streams, 0)  # (S, L, 3, 32, 32) the true frames of each stream's clip
        self.actions = torch.zeros(streams, 0, dtype=torch.long)  # (S, L)
        self.generated = None  # (S, clip_frames, 3, 32, 32): the last frames of each stream as the model made them
        self.position = np.zeros(streams, np.int64)  # the next frame each stream generates
        self.length = np.zeros(streams, np.int64)
        self.clip_seeds = np.zeros(streams, np.int64)
        self.past_lost_balls = past_lost_balls
        self.scene_psnr = SCENE_PSNR if scene_psnr is None else scene_psnr
        self.lost_balls = np.zeros((streams, len(BALLS)), bool)  # with past_lost_balls: the balls each stream has lost

    def _restart(self, i: int, step: int) -> None:
        rng = np.random.default_rng([self.seed, step, i, 25])
        length = int(rng.integers(self.clip_frames + 1, self.horizon + 1))
        self._render(i, int(rng.integers(0, world.HELDOUT_SEED_START)))
        self.generated[i, 1:] = self.truth[i, :self.clip_frames - 1]  # true frames to start from; slot 0 is never read
        self.position[i], self.length[i] = self.clip_frames - 1, length
        self.lost_balls[i] = False

    def _render(self, i: int, clip_seed: int) -> None:
        """Stream i's true clip (training seeds only), rendered whole: the truth of its actions."""
        frames, actions = world.render_clip(clip_seed, self.horizon)
        video = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
        if self.truth.dim() != 5:
            self.truth = video.new_zeros((self.streams, *video.shape))
            self.actions = torch.zeros(self.streams, self.horizon, dtype=torch.long)
            self.generated = video.new_zeros((self.streams, self.clip_frames, *video.shape[1:]))
        self.truth[i], self.actions[i] = video, torch.from_numpy(actions)
        self.clip_seeds[i] = clip_seed

    @torch.no_grad()
    def next_clips(self, model, step: int):
        """Advance every stream by one generated frame (the model in eval mode, its default steps,
        its window, frames clamped to [-1, 1]); returns (context, truth (S, clip_frames, 3, 32, 32),
        actions (S, clip_frames), weight, sinks) for `model.loss(truth, actions, context=context,
        weight=weight, sinks=sinks)`: weight (S, clip_frames, 1, 32, 32) with past_lost_balls
        (`lost_ball_weights`), else None; sinks (S, sink_frames, 3, 32, 32), the streams' first
        true frames, for a model with attention sinks (they are its prompt's too), else None."""
        for i in range(self.streams):
            if self.length[i] == 0 or self.position[i] >= self.length[i]:
                self._restart(i, step)
        n, w = self.clip_frames, self.window
        index = torch.from_numpy(self.position)[:, None]  # (S, 1)
        conditions = self.actions.gather(1, index - w + torch.arange(w + 1))  # the window's actions and the new one's
        prompt, count = self.generated[:, -w:], getattr(model.config, "sink_frames", 0)
        sinks = self.truth[:, :count] if count else None
        if count:  # the stream's first frames stay its sinks, however far it ran
            prompt, conditions = torch.cat([sinks, prompt], 1), torch.cat([self.actions[:, :count], conditions], 1)
        training = model.training
        model.eval()
        try:
            frame = generate(model, prompt, 1, model.config.default_steps, conditions=conditions,
                             seed=self.seed * 1_000_003 + step, window=w, clamp=1.0)[:, 0].to("cpu", copy=True)
        finally:
            model.train(training)
        self.generated = torch.cat([self.generated[:, 1:], frame[:, None]], 1)
        frames = index - n + 1 + torch.arange(n)  # (S, n) the frames of the clip
        truth = self.truth[torch.arange(self.streams)[:, None], frames]
        actions = self.actions.gather(1, frames)
        context = self.generated.clone()
        weight = None
        if self.past_lost_balls:
            lost = lost_objects(frame, truth[:, -1])
            self.lost_balls |= np.stack([lost[name] for name in BALLS], 1)
            weight = lost_ball_weights(context, truth, self.lost_balls)
            lost = lost["agent"] | scene_lost(frame, truth[:, -1], self.scene_psnr)
        else:
            lost = off_track(frame, truth[:, -1])
        self.position += 1
        self.length[lost] = 0  # restarted before the next step
        return context, truth, actions, weight, None if sinks is None else sinks.clone()

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the generated frames and where each stream stands (the true
        clips are rendered again from their seeds)."""
        return {"generated": self.generated, "position": torch.from_numpy(self.position.copy()),
                "length": torch.from_numpy(self.length.copy()), "clip_seeds": torch.from_numpy(self.clip_seeds.copy()),
                "lost_balls": torch.from_numpy(self.lost_balls.copy())}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.length = state["position"].numpy().copy(), state["length"].numpy().copy()
        self.clip_seeds = state["clip_seeds"].numpy().copy()
        if "lost_balls" in state:  # checkpoints before past_lost_balls have none (no stream ran past a ball)
            self.lost_balls = state["lost_balls"].numpy().copy()
        for i in range(self.streams):
            if self.length[i]:
                self._render(i, int(self.clip_seeds[i]))
        if state["generated"] is not None:
            self.generated = state["generated"].clone()
