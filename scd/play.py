"""`scd play`: a world model driven live from the keyboard.

A `Session` runs one rollout per panel (the model, and its matched baseline beside it), each in its
own thread at its own speed. Every frame takes the action held (or tapped) when it starts, is paced
to the model's fps when the model is faster, and is handed to `on_frame` as a PNG: the loop never
waits on a viewer, so a slow viewer sees fewer frames, never older ones. A recording is the first
panel's frames as an MP4 beside its actions file and seed, which `scd generate` replays exactly.
"""

from __future__ import annotations

import io
import json
import os
import random
import shlex
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from scd import checks, files, mp4, video
from scd.actions import format_actions
from scd.devices import resolve_device
from scd.errors import ConfigError, SCDError
from scd.loaded import LoadedModel
from scd.sampling import Rollout

STATS_WINDOW = 64  # frames in the p50 latency
FPS_WINDOW_S = 2.0  # seconds over which frames/s is measured
BEHIND_RATIO = 0.9  # paced and below this share of the model's fps: the page says it is not keeping up
DEFAULT_WINDOW = 16  # context window of a model that declares no context length
MAX_SEED = 2**31 - 1
META_EVERY_S = 1.0  # a recording's JSON (its frame count) is rewritten this often, and at the end


@dataclass
class PanelFrame:
    """One frame of one panel, ready for a viewer: `png` is the frame, the rest is what the page shows."""

    panel: int
    episode: int
    index: int
    png: bytes
    action: int | None
    latency_ms: float
    p50_ms: float
    fps: float
    target_fps: float
    paced: bool

    @property
    def behind(self) -> bool:
        return self.paced and self.index >= 8 and self.fps < BEHIND_RATIO * self.target_fps


@dataclass
class Recording:
    """Where one episode was recorded, and the command that replays it."""

    video: Path
    actions: Path
    meta: Path
    frames: int
    replay: list[str]  # the command line that replays it, when the session was given a format_replay
    parameters: dict | None = None  # the generate parameters that replay it


# ----------------------------------------------------------------------------- the player's input

class Controls:
    """What the player asks for, shared by every panel's thread: held and tapped actions, pause,
    pacing, and the episode (a reset or a new seed starts the next one)."""

    def __init__(self, panels: int, seed: int, paced: bool = True):
        self.changed = threading.Condition()
        self._held: list[int] = []  # pressed and not yet released, most recent last
        self._tapped: list[int | None] = [None] * panels  # pressed since the panel's last frame
        self.paused = False
        self.paced = paced
        self.episode, self.seed = 1, seed
        self.stopped = False

    def press(self, action: int) -> None:
        with self.changed:
            if action in self._held:
                self._held.remove(action)
            self._held.append(action)
            self._tapped = [action] * len(self._tapped)

    def release(self, action: int | None = None) -> None:
        """Release one action, or all of them (the page lost focus)."""
        with self.changed:
            self._held = [] if action is None else [a for a in self._held if a != action]

    def take_action(self, panel: int) -> int | None:
        """The action of a panel's next frame: a tap since its last frame (so a press shorter than a
        frame still counts), else the most recently pressed of the held ones, else None."""
        with self.changed:
            tapped, self._tapped[panel] = self._tapped[panel], None
            return tapped if tapped is not None else (self._held[-1] if self._held else None)

    def set(self, paused: bool | None = None, paced: bool | None = None) -> None:
        with self.changed:
            if paused is not None:
                self.paused = paused
            if paced is not None:
                self.paced = paced
            self.changed.notify_all()

    def new_episode(self, seed: int | None = None) -> None:
        with self.changed:
            self.episode += 1
            self.seed = self.seed if seed is None else seed
            self._held, self._tapped = [], [None] * len(self._tapped)
            self.changed.notify_all()

    def stop(self) -> None:
        with self.changed:
            self.stopped = True
            self.changed.notify_all()


class PanelStats:
    """p50 latency over the last frames and frames/s over the last seconds."""

    def __init__(self):
        self.latencies: deque[float] = deque(maxlen=STATS_WINDOW)
        self.times: deque[float] = deque()

    def add(self, latency_ms: float, now: float) -> tuple[float, float]:
        self.latencies.append(latency_ms)
        self.times.append(now)
        while len(self.times) > 2 and now - self.times[0] > FPS_WINDOW_S:
            self.times.popleft()
        span = self.times[-1] - self.times[0]
        fps = (len(self.times) - 1) / span if span > 0 else 0.0
        return float(np.median(self.latencies)), fps

    def clear(self) -> None:
        self.latencies.clear()
        self.times.clear()


# ----------------------------------------------------------------------------- prompts and recordings

def prompt_frames(loaded: LoadedModel, prompt: Path | None, seed: int) -> tuple[np.ndarray, list[int] | None]:
    """The prompt `scd generate` would use for this model, prompt and seed: frames (F, H, W, 3)
    uint8 and their actions if known (so a recording replays from the same context)."""
    from scd.generate import (
        load_prompt,  # the generate job's prompt rules: play must not drift from them
    )

    frames, actions, _ = load_prompt(loaded, prompt, seed)
    return frames, actions


def replay_parameters(loaded: LoadedModel, prompt: Path | None, seed: int, steps: int, window: int | None,
                      actions: Path, frames: int, out: str, samples: int = 1) -> dict:
    """The generate parameters that regenerate a recording (`scd.generate.Job`'s names; None: unset)."""
    model = loaded.source.removeprefix("embedded:") + (f"@{loaded.revision}" if loaded.revision else "")
    # upscale 1: the recording is at the model's size, and so must its replay be to compare frame for frame
    return {"model": model, "prompt": None if prompt is None else str(prompt), "seed": seed, "steps": steps,
            "samples": samples, "window": window, "actions": str(actions), "frames": frames, "upscale": 1, "out": out}


class Recorder:
    """One episode of the first panel: `path` (MP4, written frame by frame), `path.actions.txt` (the
    action of each generated frame, appended as it is taken) and `path.json` (seed, prompt, steps,
    replay command). The video and the actions are complete after each frame and the JSON is brought up
    to date every second and at the end, so even a killed play keeps its record."""

    def __init__(self, path: Path, loaded: LoadedModel, prompt: Path | None, seed: int, steps: int,
                 window: int | None, frames_dir: Path | None = None,
                 format_replay: Callable[[dict], list[str]] | None = None,
                 context: tuple[int, list[int] | None] | None = None, samples: int = 1):
        self.loaded, self.prompt, self.seed, self.steps, self.window = loaded, prompt, seed, steps, window
        self.samples = samples
        self.format_replay = format_replay  # replay parameters -> a command line (the CLI's words)
        self.video_path = Path(path)
        self.actions_path = self.video_path.with_suffix(".actions.txt")
        self.meta_path = self.video_path.with_suffix(".json")
        self.frames_dir = frames_dir
        self.frames = 0
        if context is None:  # what the episode continues (for scoring): the panel passes what it read
            frames, actions = prompt_frames(loaded, prompt, seed)
            context = (len(frames), actions)
        self.prompt_frames, self.prompt_actions = context
        self._meta_at = 0.0  # when the JSON was last brought up to date
        self.writer = mp4.VideoWriter(self.video_path, loaded.config.fps)
        # the actions are written beside their place and take it with the first frame (as the video
        # does), so a play stopped before its first frame leaves an earlier recording's files as they were
        self._actions_tmp = self.actions_path.with_name(f".{self.actions_path.name}.{os.getpid()}.tmp")
        try:
            self.actions = open(self._actions_tmp, "w", buffering=1)
            self.actions.write(f"# scd play: the action of each generated frame of {self.video_path.name} (seed {seed})\n")
        except OSError as err:
            self.writer.close()
            raise video.VideoError(f"cannot write {self.actions_path}: {err.strerror or err}") from None

    def add(self, pixels: np.ndarray, action: int | None) -> None:
        self.writer.write(pixels)
        try:
            c = self.loaded.config
            self.actions.write(format_actions([c.null_class if action is None else action], c.action_names, c.num_classes))
        except OSError as err:
            raise video.VideoError(f"cannot write {self.actions_path}: {err.strerror or err}") from None
        if self.frames_dir is not None:
            video.write_png_frames(self.frames_dir, pixels[None], start_index=self.frames)
        self.frames += 1
        if self.frames == 1:  # the open file keeps writing under its new name
            os.replace(self._actions_tmp, self.actions_path)
        if self.frames == 1 or time.monotonic() - self._meta_at >= META_EVERY_S:
            self._write_meta()

    def recording(self) -> Recording:
        parameters = replay_parameters(self.loaded, self.prompt, self.seed, self.steps, self.window, self.actions_path,
                                       self.frames, str(self.video_path.with_name(self.video_path.stem + "-replay.mp4")),
                                       self.samples)
        replay = self.format_replay(parameters) if self.format_replay is not None else []
        return Recording(self.video_path, self.actions_path, self.meta_path, self.frames, replay, parameters)

    def _write_meta(self) -> None:
        self._meta_at = time.monotonic()
        r = self.recording()
        meta = {"video": str(r.video), "actions": str(r.actions), "frames": r.frames, "seed": self.seed,
                "prompt": None if self.prompt is None else str(self.prompt), "model": self.loaded.source,
                "revision": self.loaded.revision, "steps": self.steps, "samples": self.samples, "context_window": self.window,
                "fps": self.loaded.config.fps, "prompt_frames": self.prompt_frames,
                "prompt_actions": self.prompt_actions, "frames_dir": None if self.frames_dir is None else str(self.frames_dir),
                "demo": self.loaded.config.demo, "replay_parameters": r.parameters}
        if r.replay:
            meta["replay"] = shlex.join(r.replay)
        # replaced whole, so a killed play never leaves half a file
        files.write_text(self.meta_path, json.dumps(meta, indent=2) + "\n", video.VideoError)

    def close(self) -> Recording:
        self.actions.close()
        self.writer.close()
        if self.frames:
            self._write_meta()
        else:  # nothing recorded: leave whatever was at the recording's paths
            self._actions_tmp.unlink(missing_ok=True)
        return self.recording()


def episode_path(path: Path, episode: int) -> Path:
    """The first episode records to `path`, later ones (after a reset or a new seed) to `name-N.mp4`."""
    return path if episode == 1 else path.with_name(f"{path.stem}-{episode}{path.suffix}")


def encode_png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)  # lossless: the page shows the model's pixels
    return out.getvalue()


# ----------------------------------------------------------------------------- one panel's frame loop

class Panel:
    """One model's endless rollout, in its own thread."""

    def __init__(self, index: int, loaded: LoadedModel, session: Session):
        self.index, self.loaded, self.session = index, loaded, session
        self.config = loaded.config
        self.device = session.device
        self.codec = loaded.codec.to(self.device)
        self.model = loaded.model.to(self.device).eval()
        self.steps = session.steps or self.config.default_steps
        self.samples = session.samples or self.config.default_samples
        self.window = self.config.window or self.config.context_frames or DEFAULT_WINDOW
        self.frames = 0  # generated in this session, all episodes
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"scd-play-{index}", daemon=True)

    def _rollout(self, seed: int) -> Rollout:
        frames, actions = prompt_frames(self.loaded, self.session.prompt, seed)
        self.context = (len(frames), actions)  # what a recording of this episode continues
        pixels = video.frames_to_tensor(video.fit_frames(frames, self.config.frame_size))
        with torch.inference_mode():
            context = self.codec.encode(pixels.to(self.device))[None]  # (1, F, C, H, W)
        if self.config.condition != "action":
            actions = None
        return Rollout(self.model, context, self.steps, guidance=self.config.default_guidance, actions=actions,
                       seed=seed, window=self.window, clamp=self.codec.clamp, compiled=self.session.compiled,
                       samples=self.samples)

    def _wait(self, controls: Controls, until: float | None, episode: int) -> None:
        """Sleep while paused, or until `until` (pacing), waking at once for a stop or a new episode."""
        with controls.changed:
            while not controls.stopped and controls.episode == episode:
                if controls.paused:
                    controls.changed.wait(0.25)
                    continue
                left = None if until is None else until - time.perf_counter()
                if left is None or left <= 0 or not controls.paced:
                    return
                controls.changed.wait(left)

    def _run(self) -> None:
        torch.set_num_threads(self.session.threads)
        controls, session = self.session.controls, self.session
        stats = PanelStats()
        episode, rollout, recorder, due = None, None, None, None
        try:
            while not controls.stopped:
                self._wait(controls, None, episode if episode is not None else controls.episode)
                if controls.stopped:
                    break
                if controls.episode != episode:
                    if recorder is not None:
                        session._recorded(recorder.close())
                        recorder = None
                    with controls.changed:
                        episode, seed = controls.episode, controls.seed
                    rollout = self._rollout(seed)
                    if self.index == 0 and session.record is not None:
                        recorder = Recorder(episode_path(session.record, episode), self.loaded, session.prompt, seed,
                                            self.steps, self.window, session.frames_dir(episode),
                                            session.format_replay, self.context, self.samples)
                    stats.clear()
                    due = None
                if controls.paused:
                    due = None  # a pause is no debt to catch up on
                    continue
                action = controls.take_action(self.index) if self.config.condition == "action" else None
                start = time.perf_counter()
                frame = rollout.step(action)
                with torch.inference_mode():
                    pixels = video.tensor_to_frames(self.codec.decode(frame.latents))[0]  # (H, W, 3) uint8
                latency_ms = (time.perf_counter() - start) * 1000.0
                if recorder is not None:
                    recorder.add(pixels, action)
                now = time.perf_counter()
                p50, fps = stats.add(latency_ms, now)
                self.frames += 1
                session._publish(PanelFrame(self.index, episode, frame.index, encode_png(pixels), action,
                                            latency_ms, p50, fps, self.config.fps, controls.paced))
                period = 1.0 / self.config.fps
                due = now + period if due is None or now - due > period else due + period  # behind: no catching up
                self._wait(controls, due, episode)
        except BaseException as err:  # noqa: BLE001 - handed to the session, which ends the play
            self.error = err
            session._failed(self, err)
        finally:
            if recorder is not None:
                try:
                    session._recorded(recorder.close())
                except SCDError as err:
                    self.error = self.error or err


# ----------------------------------------------------------------------------- the session

class Session:
    """A live play: one panel per model (the first is recorded, drives the seed and the prompt),
    the player's controls, and callbacks for each frame (`on_frame(PanelFrame)`) and for a failure
    (`on_error(Exception)`); callbacks run on the panels' threads and must not block. `record`
    records the first panel (MP4, actions, JSON; `record_frames` also keeps its frames as PNGs);
    `paused` starts with the panels waiting for `pause(False)`. `steps` denoising steps per frame and
    `samples` samples per frame (their median kept, `scd.sampling.Rollout`) for every panel (None:
    each model's default).

    Raises ConfigError for a bad seed or thread count, CheckpointError/VideoError while building the
    panels (a prompt that cannot be read, a recording that cannot be written)."""

    def __init__(self, models: list[LoadedModel], prompt: Path | None = None, seed: int = 0, steps: int | None = None,
                 threads: int = 1,
                 device: str = "auto", record: Path | None = None, paced: bool = True,
                 on_frame: Callable[[PanelFrame], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None, record_frames: Path | None = None,
                 paused: bool = False, compiled: bool | str = False,
                 format_replay: Callable[[dict], list[str]] | None = None, samples: int | None = None):
        if not models:
            raise ConfigError("play needs at least one model")
        if not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"seed must be between 0 and {MAX_SEED}, got {seed}", parameter="seed")
        if steps is not None and not 1 <= steps <= 1000:
            raise ConfigError(f"steps must be between 1 and 1000, got {steps}", parameter="steps")
        if threads < 1 or threads > 256:
            raise ConfigError(f"threads must be between 1 and 256, got {threads}", parameter="threads")
        self.prompt = None if prompt is None else Path(prompt)
        if samples is not None:
            checks.samples(samples)
        self.steps, self.threads, self.record, self.record_frames = steps, threads, record, record_frames
        self.samples = samples
        self.compiled = compiled  # torch.compile each panel's stream (scd.sampling.Rollout's `compiled`)
        self.format_replay = format_replay  # a recording's replay parameters -> its command line
        self.device = resolve_device(device)
        self.controls = Controls(len(models), seed, paced)
        self.controls.paused = paused
        self.on_frame, self.on_error = on_frame, on_error
        self.recordings: list[Recording] = []
        self._lock = threading.Lock()
        self.panels = [Panel(i, m, self) for i, m in enumerate(models)]
        self.config = models[0].config
        prompt_frames(models[0], self.prompt, seed)  # an unreadable prompt fails here, not in a thread
        if record is not None:  # refused now, before any page is served, not when the first frame is recorded
            folder = Path(record).parent
            if not folder.is_dir():
                raise video.VideoError(f"record {record}: its folder {folder} does not exist; create it first",
                                       parameter="record")
            mp4.check_path(record)
            files.check_output(record, "recording", inputs=[self.prompt])
        held = record_frames is not None and Path(record_frames).exists()
        if held and (not Path(record_frames).is_dir() or any(Path(record_frames).iterdir())):
            # its episode folders would mix with (and overwrite) an earlier play's frames
            raise video.VideoError(f"record_frames {record_frames} already exists and is not an empty folder: give a "
                                   "new or empty folder", parameter="record_frames")

    # the player
    def press(self, action: int) -> None:
        """Hold an action (an index below the model's null action); others are ignored."""
        if self.config.condition == "action" and isinstance(action, int) and 0 <= action < self.config.num_classes:
            self.controls.press(action)

    def release(self, action: int | None = None) -> None:
        self.controls.release(action)

    def pause(self, paused: bool = True) -> None:
        self.controls.set(paused=paused)

    def pace(self, paced: bool = True) -> None:
        """Pace frames at the model's fps (True) or run each panel as fast as it can."""
        self.controls.set(paced=paced)

    def reset(self) -> None:
        """Start again from the prompt, with the same seed."""
        self.controls.new_episode()

    def new_seed(self, seed: int | None = None) -> int:
        """Start again with another seed (a random one if None): its world clip and its noise."""
        seed = random.randint(0, MAX_SEED) if seed is None else seed
        if not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"seed must be between 0 and {MAX_SEED}, got {seed}")
        self.controls.new_episode(seed)
        return seed

    def state(self) -> dict:
        """What the page shows besides frames: panels, actions, fps, seed, pause, pacing, recordings."""
        c = self.controls
        return {"panels": [{"name": p.loaded.source, "arch": p.config.arch, "steps": p.steps, "samples": p.samples}
                           for p in self.panels],
                "actions": list(self.config.action_names) if self.config.condition == "action" else [],
                "num_actions": self.config.num_classes if self.config.condition == "action" else 0,
                "fps": self.config.fps, "seed": c.seed, "episode": c.episode, "paused": c.paused, "paced": c.paced,
                "prompt": str(self.prompt) if self.prompt else None,
                "recording": str(episode_path(self.record, c.episode)) if self.record else None}

    # the frame loops
    def start(self) -> None:
        for panel in self.panels:
            panel.thread.start()

    def stop(self, timeout: float = 10.0) -> list[Recording]:
        """Stop every panel (each finishes its frame), close the recording; returns the recordings."""
        self.controls.stop()
        for panel in self.panels:
            if panel.thread.is_alive():
                panel.thread.join(timeout)
        return list(self.recordings)

    def frames_dir(self, episode: int) -> Path | None:
        """Where the recording's frames also go as PNGs, if asked for (`record_frames/episode-N`)."""
        return None if self.record_frames is None else Path(self.record_frames) / f"episode-{episode}"

    @property
    def error(self) -> BaseException | None:
        return next((p.error for p in self.panels if p.error is not None), None)

    def _publish(self, frame: PanelFrame) -> None:
        if self.on_frame is not None:
            self.on_frame(frame)

    def _recorded(self, recording: Recording) -> None:
        with self._lock:
            self.recordings.append(recording)

    def _failed(self, panel: Panel, err: BaseException) -> None:
        self.controls.stop()
        if self.on_error is not None:
            self.on_error(err)


def matched_baseline(loaded: LoadedModel) -> LoadedModel | None:
    """The model a play compares against: the embedded SCD model's matched baseline (and the other
    way round); None for other models."""
    from scd.checkpoints import load_model

    pairs = {"embedded:scd": "baseline", "embedded:baseline": "scd"}
    return load_model(pairs[loaded.source]) if loaded.source in pairs else None


__all__ = ["Controls", "PanelFrame", "Recorder", "Recording", "Session", "encode_png", "matched_baseline",
           "prompt_frames", "replay_parameters"]
