"""A procedural, seeded world for training and scoring small video models on a CPU.

32x32 RGB. A static two-tone background, two bouncing balls (elastic off the walls), an agent
moved by four actions (plus the null action, a no-op), and a fixed vertical pillar in front of
everything that hides what passes behind it, so predicting what re-emerges needs memory. Positions
and velocities are integers: each frame follows exactly from the previous state and the action, so
a continuation can be scored against ground truth. `actions[j]` is the action taken on the way into
frame j (`actions[0]` has no effect), the convention of the reference models.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from scd.errors import ConfigError

FRAME_SIZE = 32
ACTIONS = ("up", "down", "left", "right")
NULL_ACTION = len(ACTIONS)
HELDOUT_SEED_START = 1_000_000_000  # evaluation seeds; training draws seeds below this
BALL, AGENT, STEP = 4, 4, 2
MOVES = {0: (-STEP, 0), 1: (STEP, 0), 2: (0, -STEP), 3: (0, STEP), NULL_ACTION: (0, 0)}
OCCLUSION_SPAN = 48  # frames an occlusion clip is cut from
SINK_SPAN = (8, 64)  # the first frame of a training clip's sink frames is drawn from these
PILLAR_COLOR = np.array([90, 90, 100], np.uint8)
AGENT_COLOR = np.array([250, 250, 250], np.uint8)


def random_actions(seed, n: int) -> np.ndarray:
    """A player's actions: each held for 2-8 frames, about one in six a pause (null)."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    out = np.empty(n, np.int64)
    i = 0
    while i < n:
        action = NULL_ACTION if rng.random() < 0.17 else int(rng.integers(0, len(ACTIONS)))
        hold = int(rng.integers(2, 9))
        out[i:i + hold] = action
        i += hold
    return out


def render_clip(seed: int, num_frames: int, actions: np.ndarray | None = None,
                objects: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Frames (N, 32, 32, 3) uint8 and actions (N,) int64 of the clip `seed`, driven by `actions`
    (random from the seed if None). The same seed and actions always give the same frames.
    objects=False leaves out every moving object (balls and agent): the static scene alone."""
    clip = simulate(seed, num_frames, actions, objects)
    return clip.frames, clip.actions


@dataclass
class Clip:
    """A simulated clip: its frames (N, 32, 32, 3) uint8 and actions (N,), and where everything
    was: the balls' top-left corners (N, 2, 2) as (row, col), the agent's (N, 2), the pillar's
    first column."""
    frames: np.ndarray
    actions: np.ndarray
    balls: np.ndarray
    agent: np.ndarray
    pillar: int

    def occluded(self, margin: int = 1) -> np.ndarray:
        """(N,) bool: a ball overlaps, or comes within `margin` px of, the other ball or the agent in
        that frame, where one hides the other. (The pillar hides part of a ball in about 40% of
        frames already; these meetings are rarer, and where balls get lost most.)"""
        reach = BALL + margin
        between = (np.abs(self.balls[:, 0] - self.balls[:, 1]) < reach).all(-1)  # (N,)
        agent = (np.abs(self.balls - self.agent[:, None]) < reach).all(-1)  # (N, 2)
        return between | agent.any(1)

    def behind_pillar(self) -> np.ndarray:
        """(N,) bool: a ball or the agent is deep behind the pillar, one of its columns showing (its
        left column one before the pillar's, or the pillar's own). Held-out rollouts lose the agent
        there and most of the balls they lose there or in the frames after it."""
        columns = np.concatenate([self.balls[:, :, 1], self.agent[:, None, 1]], 1) - self.pillar  # (N, 3)
        return ((columns == -1) | (columns == 0)).any(1)


def simulate(seed: int, num_frames: int, actions: np.ndarray | None = None, objects: bool = True,
             shifts: np.ndarray | None = None) -> Clip:
    """The clip `seed` (see `render_clip`) with the state of every frame. `shifts` (N, 3, 2) int:
    where each frame draws the red ball, the green ball and the agent displaced from where they
    are, (rows, cols), kept inside the frame; the state, and so `Clip`'s positions, stay true."""
    if num_frames < 1:
        raise ConfigError(f"num_frames must be >= 1, got {num_frames}")
    rng = np.random.default_rng(seed)
    if actions is None:
        actions = random_actions(np.random.default_rng([seed, 1]), num_frames)
    actions = np.asarray(actions, np.int64)
    if actions.shape != (num_frames,) or actions.min() < 0 or actions.max() > NULL_ACTION:
        raise ConfigError(f"actions must be {num_frames} indices in 0..{NULL_ACTION}")
    s = FRAME_SIZE
    top, bottom = rng.integers(20, 110, 3), rng.integers(20, 110, 3)
    split = int(rng.integers(10, 22))
    background = np.empty((s, s, 3), np.uint8)
    background[:split], background[split:] = top, bottom
    pillar = int(rng.integers(8, s - 12))
    colors = np.array([[230, 60, 50], [60, 200, 80]], np.uint8)[rng.permutation(2)]
    pos = rng.integers(0, s - BALL, (2, 2))
    vel = rng.choice([-2, -1, 1, 2], (2, 2))
    agent = rng.integers(0, s - AGENT, 2)
    order = np.argsort(colors[:, 1])  # the balls in colour order (red, green), as OBJECT_COLORS names them
    if shifts is not None:
        shifts = np.asarray(shifts, np.int64)
        if shifts.shape != (num_frames, 3, 2):
            raise ConfigError(f"shifts must be ({num_frames}, 3, 2), got {shifts.shape}")
    frames = np.empty((num_frames, s, s, 3), np.uint8)
    balls, agents = np.empty((num_frames, 2, 2), np.int64), np.empty((num_frames, 2), np.int64)
    for j in range(num_frames):
        if j > 0:
            pos = pos + vel
            for axis in range(2):  # elastic bounce: reflect the overshoot, flip the velocity
                low, high = pos[:, axis] < 0, pos[:, axis] > s - BALL
                pos[low, axis] = -pos[low, axis]
                pos[high, axis] = 2 * (s - BALL) - pos[high, axis]
                vel[low | high, axis] *= -1
            agent = np.clip(agent + MOVES[int(actions[j])], 0, s - AGENT)
        frame = background.copy()
        if objects:
            drawn, at = pos, agent
            if shifts is not None:
                drawn = np.clip(pos + shifts[j, :2][np.argsort(order)], 0, s - BALL)
                at = np.clip(agent + shifts[j, 2], 0, s - AGENT)
            for (y, x), color in zip(drawn, colors):
                frame[y:y + BALL, x:x + BALL] = color
            frame[at[0]:at[0] + AGENT, at[1]:at[1] + AGENT] = AGENT_COLOR
        frame[:, pillar:pillar + 3] = PILLAR_COLOR
        frames[j], balls[j], agents[j] = frame, pos, agent
    return Clip(frames, actions.copy(), balls[:, order], agents, pillar)


def occlusion_clip(seed: int, num_frames: int, span: int = OCCLUSION_SPAN,
                   pillar: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`num_frames` consecutive frames (and their actions) of the clip `seed` whose last frame has
    a ball at an occlusion (`Clip.occluded`; `pillar`: an object deep behind the pillar or just
    out from there, `Clip.behind_pillar`), one such window drawn from the seed among the first
    `span` frames (the last window when none is); what training samples more of where objects get lost."""
    clip = simulate(seed, max(span, num_frames))
    where = clip.behind_pillar() if pillar else clip.occluded()
    if pillar:
        where[1:] |= where[:-1].copy()  # and the frame after, where the object must come out whole
    ends = np.nonzero(where[num_frames - 1:])[0] + num_frames
    end = int(np.random.default_rng([seed, 2]).choice(ends)) if len(ends) else len(clip.frames)
    return clip.frames[end - num_frames:end], clip.actions[end - num_frames:end]


OFFSETS = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])  # one pixel, any direction


def shifted_clip(seed: int, num_frames: int, last: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The clip `seed` twice, (true frames, shifted frames, actions): in the shifted one each
    object (each at even odds, at least one) is drawn one pixel off in one frame before the last
    (`last`: in the frame just before it, for every moved object), the kind of misplacement that
    starts a rollout's drift; training reads the shifted frames as context and the true ones as
    targets, so a model learns to recover instead of extrapolating. With `last`, the clip's last
    target always reads the slip in its newest context frame, where a model given only the frames
    since cannot tell it from a change of velocity, and one given more can."""
    rng = np.random.default_rng([seed, 3])
    moved = rng.random(3) < 0.5
    if not moved.any():
        moved[rng.integers(3)] = True
    shifts = np.zeros((num_frames, 3, 2), np.int64)
    for k in np.nonzero(moved)[0]:
        frame = num_frames - 2 if last else rng.integers(0, num_frames - 1)
        shifts[frame, k] = OFFSETS[rng.integers(len(OFFSETS))]
    true = simulate(seed, num_frames)
    return true.frames, simulate(seed, num_frames, true.actions, shifts=shifts).frames, true.actions


# Each moving object by its colour: a pixel belongs to it when every channel lies within TOLERANCE
# of the object's colour (the background and pillar are far from all three).
OBJECT_COLORS = {"agent": (250, 250, 250), "red_ball": (230, 60, 50), "green_ball": (60, 200, 80)}
TOLERANCE = 60
MIN_PIXELS = 3  # fewer matching pixels than this: the object is not visible in the frame


def locate(frames: np.ndarray, color) -> tuple[np.ndarray, np.ndarray]:
    """Where an object of `color` is in frames (N, H, W, 3) uint8: the centroid (N, 2) as (row,
    col) of the pixels within TOLERANCE of it, and whether enough of them exist (N,) bool."""
    near = (np.abs(frames.astype(np.int16) - np.asarray(color, np.int16)) <= TOLERANCE).all(-1)  # (N, H, W)
    count = near.sum((1, 2))
    rows, cols = np.arange(frames.shape[1]), np.arange(frames.shape[2])
    safe = np.maximum(count, 1)
    centroid = np.stack([(near.sum(2) * rows).sum(1) / safe, (near.sum(1) * cols).sum(1) / safe], -1)
    return centroid, count >= MIN_PIXELS


def track_objects(pred: np.ndarray, truth: np.ndarray, radius: float = 2.0) -> dict:
    """Per-object tracking of predicted frames against the true ones, (C, U, H, W, 3) uint8 each:
    for every object and generated frame, the share of clips where the object is visible in both
    and its predicted centroid lies within `radius` px of the true one (`hit_rate`), and the mean
    centroid error in px over the clips where it is visible in both (`error_px`, None if none)."""
    c, u = truth.shape[:2]
    result = {}
    for name, color in OBJECT_COLORS.items():
        p_at, p_seen = locate(pred.reshape(-1, *pred.shape[2:]), color)
        t_at, t_seen = locate(truth.reshape(-1, *truth.shape[2:]), color)
        error = np.linalg.norm(p_at - t_at, axis=-1).reshape(c, u)
        both = (p_seen & t_seen).reshape(c, u)
        hits = both & (error <= radius)
        counted = np.where(both, error, 0).sum(0) / np.maximum(both.sum(0), 1)
        result[name] = {"hit_rate": hits.mean(0).round(4).tolist(),
                        "error_px": [round(float(e), 3) if n else None for e, n in zip(counted, both.sum(0))],
                        "visible_in_truth": t_seen.reshape(c, u).mean(0).round(4).tolist()}
    return result


def sink_frames(seed: int, count: int, rng: np.random.Generator, scatter: bool = False) -> np.ndarray:
    """`count` consecutive frames (count, 32, 32, 3) of the clip `seed` from a frame drawn in
    SINK_SPAN: what a model with attention sinks keeps of a stream's start, its scene the clip's
    and its objects anywhere (a sink is the stream's first frames, however far back). `scatter`:
    each frame draws every object at a place of its own drawn from `rng` (the state stays the
    clip's), so nothing of where the objects are now can be read from a sink, only the scene: at
    frame 1,000 of a stream its sink's objects are as unrelated to the present."""
    first = int(rng.integers(*SINK_SPAN))
    if not scatter:
        return render_clip(seed, first + count)[0][first:]
    true = simulate(seed, first + count)
    places = np.concatenate([rng.integers(0, FRAME_SIZE - BALL + 1, (first + count, 2, 2)),
                             rng.integers(0, FRAME_SIZE - AGENT + 1, (first + count, 1, 2))], 1)
    shifts = places - np.concatenate([true.balls, true.agent[:, None]], 1)  # shifts= takes (red, green, agent)
    return simulate(seed, first + count, true.actions, shifts=shifts).frames[first:]


def stream_batches(seed: int, batch_size: int, num_frames: int, start_step: int = 0, occlusion_share: float = 0.0,
                   shift_share: float = 0.0, shift_last: bool = False, sinks: int = 0, sink_scatter: bool = False,
                   pillar_share: float = 0.0):
    """Training batches forever: (video (B, N, 3, 32, 32) float in [-1, 1], actions (B, N) int64);
    the first round(occlusion_share * B) clips of each end at an occlusion (`occlusion_clip`), the
    next round(pillar_share * B) behind the pillar (`occlusion_clip`'s `pillar`). With
    shift_share, the last round(shift_share * B) clips are `shifted_clip`s and a third tensor, the
    context (like video: the shifted frames there, the true ones elsewhere), comes with each batch;
    shift_last puts every slip in the frame before the last (`shifted_clip`'s `last`). With
    `sinks`, a fourth: each clip's sink frames (B, sinks, 3, 32, 32) (`sink_frames`), the third
    then always there (the video itself where nothing slips); sink_scatter draws their objects
    anywhere (`sink_frames`' `scatter`).
    Batch k depends only on (seed, k), so a run resumed at step k sees what it would have seen."""
    hard = round(occlusion_share * batch_size)
    behind = hard + round(pillar_share * batch_size)
    shifted = batch_size - round(shift_share * batch_size) if shift_share else batch_size
    step = start_step
    while True:
        clips, seeds = [], training_seeds(seed, step, batch_size)
        for i, s in enumerate(seeds):
            if i >= shifted:
                clips.append(shifted_clip(int(s), num_frames, shift_last))
            else:
                frames, actions = (occlusion_clip(int(s), num_frames, pillar=i >= hard) if i < behind
                                   else render_clip(int(s), num_frames))
                clips.append((frames, frames, actions))
        video, context = (_tensor(np.stack([c[k] for c in clips])) for k in (0, 1))
        actions = torch.from_numpy(np.stack([c[2] for c in clips]))
        if sinks:
            rng = np.random.default_rng([seed, step, 27])
            held = _tensor(np.stack([sink_frames(int(s), sinks, rng, sink_scatter) for s in seeds]))
            yield video, actions, context, held
        else:
            yield (video, actions, context) if shift_share else (video, actions)
        step += 1


def _tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames (B, N, H, W, 3) -> float (B, N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(frames).permute(0, 1, 4, 2, 3).float() / 127.5 - 1


def training_seeds(seed: int, step: int, batch_size: int) -> np.ndarray:
    """The clip seeds of training batch `step`: below HELDOUT_SEED_START, never an evaluation clip."""
    return np.random.default_rng([seed, step]).integers(0, HELDOUT_SEED_START, batch_size)


def heldout_clips(num_clips: int, num_frames: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Evaluation clips from seeds training never draws."""
    return [render_clip(HELDOUT_SEED_START + i, num_frames) for i in range(num_clips)]


def object_mask(video: torch.Tensor, names=None) -> torch.Tensor:
    """Where the moving objects (those of `names`, default all of OBJECT_COLORS) are in `video`
    (..., 3, H, W) float in [-1, 1] (the training batches' form): (..., 1, H, W) bool, a pixel
    within TOLERANCE of an object's colour."""
    pixels = (video + 1) * 127.5
    mask = torch.zeros_like(pixels[..., :1, :, :], dtype=torch.bool)
    for color in (OBJECT_COLORS[name] for name in (OBJECT_COLORS if names is None else names)):
        target = torch.tensor(color, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
        mask |= ((pixels - target).abs() <= TOLERANCE).all(-3, keepdim=True)
    return mask


def object_weights(video: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weights for world clips (B, N, 3, H, W) in [-1, 1]: 1 + weight where an object
    is in frame j or was in frame j - 1 (where it must appear and where it must leave), 1
    elsewhere; (B, N, 1, H, W). The balls and agent are ~5% of the pixels: this is their share."""
    mask = object_mask(video)
    mask[:, 1:] |= mask[:, :-1].clone()
    return 1.0 + weight * mask.float()


def slip_weights(video: torch.Tensor, context: torch.Tensor, weight: float, reach: int = 2) -> torch.Tensor:
    """Per-pixel loss weights (B, N, 1, H, W) for clips whose context (B, N, 3, H, W) draws objects
    off from their true frames `video` (`shifted_clip`): 1 + weight on frame j's pixels within
    `reach` px of where context frame j - 1 differs from the truth, where a model that extrapolates
    the slip goes wrong and one that recovers does not; 1 elsewhere. A slipped ball is 16 of 1,024
    pixels of one target in a clip: without this its share of the loss is too thin to learn from."""
    near = dilate((video != context).any(-3, keepdim=True), reach).float()  # (B, N, 1, H, W)
    out = torch.ones_like(near)
    out[:, 1:] += weight * near[:, :-1]
    return out


def dilate(mask: torch.Tensor, px: int) -> torch.Tensor:
    """mask (..., H, W) bool grown by `px` pixels every way (a square neighbourhood), same shape."""
    flat = mask.float().reshape(-1, 1, *mask.shape[-2:])
    return (torch.nn.functional.max_pool2d(flat, 2 * px + 1, 1, px) > 0).view(mask.shape)


def loss_weights(video: torch.Tensor, object_weight: float = 0.0, first: torch.Tensor | None = None,
                 last: torch.Tensor | None = None) -> torch.Tensor | None:
    """Per-pixel loss weights (B, N, 1, H, W) of a world batch `video` (B, N, 3, H, W), None where
    every one would be 1: `object_weights` (object_weight > 0), times `first`, the weights of the
    batch's first len(first) clips (its true clips' `slip_weights`), times `last`, those of its last
    len(last) clips (the rollout clips' lost-ball weights)."""
    if not object_weight and first is None and last is None:
        return None
    weight = object_weights(video, object_weight) if object_weight else torch.ones_like(video[:, :, :1])
    if first is not None:
        weight[:len(first)] *= first.to(weight.device)
    if last is not None:
        weight[-len(last):] *= last.to(weight.device)
    return weight

