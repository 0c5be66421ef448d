"""Scoring against ground truth on held-out clips of the synthetic world.

Each model continues the first `context` frames of a clip, driven by the clip's own actions, and
every generated frame is compared with the true one (PSNR, SSIM on [0, 1] RGB) and its moving
objects are tracked (`scd.world.track_objects`: is the agent, is each ball, within 2 px of where it
truly is). Two reference predictors are scored in the same run: copy-last-frame (repeat the last
context frame: the floor to beat) and object-free (the true static scene with every moving object
erased: what a model earns by getting the background right and giving up on the objects).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from scd import checks, world
from scd.errors import ConfigError
from scd.loaded import LoadedModel
from scd.metrics import PSNR_CAP, psnr, ssim, uint8_to_unit
from scd.sampling import generate
from scd.video import frames_to_tensor, tensor_to_frames


def _scores(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (C, U, H, W, 3) each -> per-frame PSNR and SSIM averaged over clips, (U,) each."""
    c, u = truth.shape[:2]
    p, t = uint8_to_unit(pred.reshape(-1, *pred.shape[2:])), uint8_to_unit(truth.reshape(-1, *truth.shape[2:]))
    return (psnr(p, t).clamp(max=PSNR_CAP).view(c, u).mean(0).numpy(), ssim(p, t).view(c, u).mean(0).numpy())


HORIZONS = (1, 8, 16, 64, 128, 1000)  # generated frames at which each object's tracking is reported
SPANS = ((1, 16), (17, 64), (65, 128), (129, 256), (257, 512), (513, 1000))  # PSNR over these frames (1-based)


def horizons(psnr_per_frame, objects: dict) -> dict:
    """By horizon: each object's hit rate at the HORIZONS generated frames there are, and the mean
    PSNR over the SPANS of frames there are (a span the rollout ends inside is cut to its end)."""
    frames = len(psnr_per_frame)
    hits = {str(h): {name: o["hit_rate"][h - 1] for name, o in objects.items()} for h in HORIZONS if h <= frames}
    spans = {f"{a}-{min(b, frames)}": round(float(np.mean(psnr_per_frame[a - 1:b])), 3) for a, b in SPANS if a <= frames}
    return {"hit_rate_at": hits, "psnr_over": spans}


def _summary(pred, truth, **extra) -> dict:
    p, s = _scores(pred, truth)
    objects = world.track_objects(pred, truth)
    return {"psnr": float(p.mean()), "ssim": float(s.mean()), "psnr_per_frame": p.round(3).tolist(),
            "ssim_per_frame": s.round(4).tolist(), "agent_hit_rate_last": objects["agent"]["hit_rate"][-1],
            "objects": objects, "horizons": horizons(p.tolist(), objects), **extra}


def rollout(loaded: LoadedModel, clips, context: int, frames: int, steps: int, guidance: float, seed: int,
            samples: int = 1) -> np.ndarray:
    """Continue each clip (the median of `samples` samples per frame: `scd.sampling.Rollout`);
    returns uint8 (C, U, H, W, 3)."""
    config = loaded.config
    if tuple(config.frame_size) != (world.FRAME_SIZE,) * 2:
        raise ConfigError(f"{loaded.source} makes {config.frame_size} frames; the world is {world.FRAME_SIZE}x{world.FRAME_SIZE}")
    video = torch.stack([frames_to_tensor(f[:context]) for f, _ in clips])  # (C, F, 3, H, W)
    actions = torch.stack([torch.from_numpy(a[:context + frames]) for _, a in clips])
    latents = torch.stack([loaded.encode(v) for v in video])
    out = generate(loaded.model, latents, frames, steps, guidance=guidance,
                   conditions=actions if config.condition == "action" else None, seed=seed,
                   window=config.window or config.context_frames, clamp=loaded.codec.clamp, samples=samples)  # relative frame offsets stay within what training saw
    pixels = loaded.decode(out.flatten(0, 1))
    return tensor_to_frames(pixels).reshape(len(clips), frames, *pixels.shape[-2:], 3)


def evaluate(models: dict[str, LoadedModel], clips: int = 64, context: int = 8, frames: int = 16,
             steps: int | None = None, guidance: float | None = None, seed: int = 0, samples: int | None = None) -> dict:
    """Scores of each named model (each frame the median of `samples` samples, None: each model's
    default_samples), of copy-last-frame and of the object-free scene on `clips`
    held-out clips (PSNR, SSIM and object tracking per generated frame, and by horizon: `horizons`);
    each model's `margin_over_object_free` is its worst 16-frame block against the object-free scene."""
    for name, value in (("clips", clips), ("context", context), ("frames", frames)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}", parameter=name)
    if steps is not None:
        checks.number("steps", steps, 1, 1000, integer=True)
    if guidance is not None:
        checks.number("guidance", guidance, -1, 100)  # -1: unconditional (scd.sampling.UNCONDITIONAL)
    checks.seed(seed)
    if samples is not None:
        checks.samples(samples)
    data = world.heldout_clips(clips, context + frames)
    truth = np.stack([f[context:] for f, _ in data])
    result = {"clips": clips, "frames": frames, "context": context, "seed": seed}
    for name, loaded in models.items():
        k = steps or loaded.config.default_steps
        result.setdefault("steps", k)  # the first model's (SCD's); each model's own is under its name
        g = loaded.config.default_guidance if guidance is None else guidance
        n = loaded.config.default_samples if samples is None else samples
        result.setdefault("samples", n)
        start = time.perf_counter()
        pred = rollout(loaded, data, context, frames, k, g, seed, n)
        per_frame_ms = (time.perf_counter() - start) * 1000.0 / frames
        result[name] = _summary(pred, truth, model=loaded.source, steps=k, guidance=g, samples=n, ms_per_frame_batch=per_frame_ms)
    last = np.stack([np.repeat(f[context - 1:context], frames, 0) for f, _ in data])
    result["copy_last_frame"] = _summary(last, truth)
    scene = np.stack([world.render_clip(world.HELDOUT_SEED_START + i, context + frames, a, objects=False)[0][context:]
                      for i, (_, a) in enumerate(data)])
    result["object_free"] = _summary(scene, truth)
    floor = np.array(result["object_free"]["psnr_per_frame"])
    for name in models:  # the worst stretch against the object-free scene: a model must never fall below it
        result[name]["margin_over_object_free"] = worst_block(np.array(result[name]["psnr_per_frame"]), floor)
    return result


def worst_block(psnr_per_frame: np.ndarray, floor: np.ndarray, size: int = 16) -> dict:
    """The worst block of `size` frames against the object-free scene's PSNR `floor` (dB), and the
    (1-based) frame it starts at."""
    blocks = [(psnr_per_frame[i:i + size] - floor[i:i + size]).mean() for i in range(0, len(floor), size)]
    return {"worst_16_frames_db": round(float(min(blocks)), 3), "worst_block_starts_at": size * int(np.argmin(blocks)) + 1}


# ----------------------------------------------------------------------------- a recorded play

PLAY_SPANS = ((1, 16), (17, 128), (129, 1000), (1001, 10_000), (10_001, 100_000))  # frames of a play, 1-based


def score_recording(path) -> dict:
    """Score a recorded `scd play` episode of a world model against the simulator: the truth is the
    episode's world clip run with the actions the player took (`path` is the recording's MP4 or its
    JSON; its PNG frames are read instead of the MP4 when the play kept them, `record_frames`).
    Per span of frames (PLAY_SPANS): PSNR, the object-free scene's, and the share of the frames
    showing each object that have it within 2 px; per object, the first frame it was lost; the
    worst 16 frames against the object-free scene. An MP4 is lossy (4:2:0 colour): a perfect play
    read from it loses a ball behind the pillar now and then (`lossy` says which was read). Raises
    DataError for what is not a scoreable recording."""
    meta, pred, actions, source = _read_recording(Path(path))
    n, context = len(pred), int(meta["prompt_frames"])
    seed = world.HELDOUT_SEED_START + int(meta["seed"])  # the play's clip: scd.generate's world prompt
    truth = world.render_clip(seed, context + n, actions)[0][context:]
    scene = world.render_clip(seed, context + n, actions, objects=False)[0][context:]
    p, floor = _scores(pred[None], truth[None])[0], _scores(scene[None], truth[None])[0]
    objects = world.track_objects(pred[None], truth[None])
    spans = {}
    for a, b in PLAY_SPANS:
        if a > n:
            break
        cut = slice(a - 1, min(b, n))
        spans[f"{a}-{min(b, n)}"] = {"psnr": round(float(p[cut].mean()), 3), "object_free_psnr": round(float(floor[cut].mean()), 3),
                                     "kept": {name: _kept(o, cut) for name, o in objects.items()}}
    lost = {}
    for name, o in objects.items():
        missed = [i for i, (hit, seen) in enumerate(zip(o["hit_rate"], o["visible_in_truth"])) if seen and not hit]
        lost[name] = missed[0] + 1 if missed else None
    worst = worst_block(p, floor)
    return {"recording": str(meta["path"]), "model": meta.get("model"), "seed": int(meta["seed"]), "frames": n,
            "frames_from": str(source), "spans": spans, "first_lost_at": lost,
            "worst_16_frames_vs_object_free_db": worst["worst_16_frames_db"],
            "worst_block_starts_at": worst["worst_block_starts_at"],
            "psnr_per_frame": p.round(3).tolist(), "lossy": source.is_file()}


def _read_recording(path: Path):
    """A recording's JSON (with its own path under "path"), its frames (N, 32, 32, 3), the actions
    of its prompt and its N frames, and where the frames were read from."""
    from scd.actions import parse_actions
    from scd.errors import DataError, SCDError
    from scd.video import read_video

    meta_path = path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise DataError(f"{meta_path} does not exist: give the MP4 or JSON a recorded play wrote") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{meta_path} is not a recording's JSON ({err})") from None
    if not isinstance(meta, dict) or "seed" not in meta or "actions" not in meta:
        raise DataError(f"{meta_path} is not a recording's JSON (a recorded play writes seed, actions, frames)")
    if meta.get("prompt") is not None or meta.get("demo", "world") != "world":
        raise DataError(f"{meta_path}: the play continued {meta.get('prompt') or 'a model without a world demo'}; "
                        "only a play of a synthetic-world clip has a known truth to score against")
    if "prompt_frames" not in meta or meta.get("prompt_actions") is None:
        raise DataError(f"{meta_path} was recorded by an earlier scd without its prompt's length: record the play again")

    def beside(recorded: str) -> Path:  # paths are as the play was given them: else look beside the JSON
        given = Path(recorded)
        if given.exists() or given.is_absolute():
            return given
        moved = meta_path.parent / given.name
        return moved if moved.exists() else given

    try:
        taken = parse_actions(beside(meta["actions"]), world.ACTIONS, len(world.ACTIONS)) or []
        frames_dir = meta.get("frames_dir") and beside(meta["frames_dir"])
        source = frames_dir if frames_dir and frames_dir.is_dir() else beside(meta["video"])
        pred = read_video(source).frames
    except SCDError as err:
        raise DataError(f"{meta_path}: {err}") from None
    n = min(len(pred), len(taken))
    if n < 1:
        raise DataError(f"{meta_path}: the recording holds no frame")
    if pred.shape[1:3] != (world.FRAME_SIZE, world.FRAME_SIZE):
        raise DataError(f"{source} is {pred.shape[2]}x{pred.shape[1]}: a world play is recorded at 32x32")
    actions = np.asarray([int(a) for a in meta["prompt_actions"]] + list(taken[:n]), np.int64)
    return {**meta, "path": meta_path}, pred[:n], actions, source


def _kept(tracked: dict, cut: slice) -> float | None:
    """The share of the frames in `cut` where the object is visible in the truth that have it within
    2 px (None: hidden in all of them)."""
    hit, seen = np.asarray(tracked["hit_rate"][cut]), np.asarray(tracked["visible_in_truth"][cut]) > 0
    return round(float(hit[seen].mean()), 4) if seen.any() else None
