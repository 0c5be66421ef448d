"""The generate job: a prompt video in, a streamed MP4 (and report) out.

`run` decodes and fits the prompt, encodes it with the model's codec, streams frames from
`scd.sampling.stream`, decodes each to pixels and writes it the moment it exists. It yields
progress events; whatever happens, every finished frame is on disk in a playable file and the
report says whether the run completed.
"""

from __future__ import annotations

import json
import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import torch

import scd
from scd import checks, files, mp4, video
from scd.actions import format_actions, parse_label, read_sidecar, sidecar_path
from scd.devices import dtype_name, resolve_device, resolve_dtype, use_threads
from scd.errors import ActionError, ConfigError, Notice, SCDError, VideoError
from scd.loaded import LoadedModel
from scd.metrics import percentile
from scd.sampling import kv_cache_bytes, stream

MAX_FRAMES = 100_000


@dataclass
class Job:
    """Everything `scd generate` needs; paths and numbers only, validated by `run`."""

    model: LoadedModel
    out: Path
    prompt: Path | None = None
    frames: int = 16
    steps: int | None = None
    guidance: float | None = None
    actions: list[int] | None = None
    prompt_actions: list[int] | None = None
    label: int | None = None  # a class-conditioned model's class
    seed: int = 0
    batch: int = 1
    window: int | None = None
    context: int | None = None
    fit: str = "crop"
    fps: float | None = None
    include_prompt: bool = False
    upscale: int | None = None  # None: default_upscale(config)
    upscale_mode: str = "nearest"
    frames_dir: Path | None = None
    report: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None  # CPU threads for torch; None: scd.devices.use_threads chooses
    started: float | None = None  # time.perf_counter() when the command started (default: when run starts)
    startup_s: float | None = None  # process start to command start, for the report
    model_load_s: float | None = None
    compiled: bool = False  # torch.compile the frame loop (scd.sampling.Rollout's `compiled`)
    text: list[str] | None = None  # a text-conditioned model's prompts (one, or one per sample)
    size: tuple[int, int] | None = None  # a text-to-video model's frame size (H, W) (default: its own)


@dataclass
class Started:
    outputs: list[Path]
    device: str
    dtype: str
    model: str
    revision: str | None
    frames: int
    steps: int
    context_frames: int
    prompt_source: str
    warnings: list[str] = field(default_factory=list)
    threads: int | None = None


@dataclass
class FrameWritten:
    index: int
    frames: int
    latency_ms: float
    context_ms: float  # the context pass (SCD's encoder)
    denoise_ms: float  # the denoising steps (SCD's decoder)
    elapsed_s: float


@dataclass
class Finished:
    summary: dict


def output_paths(out: Path, batch: int) -> list[Path]:
    if batch == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(batch)]


@dataclass
class Prompt:
    """What a model continues: frames (F, H, W, 3) uint8, their actions if known (one per frame,
    the null action where the sidecar or list has none), where they came from, and what the user
    should know about them (a truncated file, a sidecar that does not fit its frames, no actions)."""
    frames: np.ndarray
    actions: list[int] | None
    source: str
    warnings: list[str] = field(default_factory=list)
    truncated: str | None = None


def read_prompt(loaded: LoadedModel, prompt: Path | None = None, seed: int = 0, context: int | None = None,
                prompt_actions: list[int] | None = None) -> Prompt:
    """The prompt a model continues. `prompt` is a video or image folder (its last `context` frames,
    the model's context length by default); without one, a world model's demo clip for `seed`; a
    model trained from pure noise takes none. Actions (`prompt_actions`, else the sidecar
    `<prompt>.actions.txt`) follow one rule, the one `scd encode` uses: action j belongs to frame j
    of the file as decoded, so the frames kept from a long or truncated file get their own actions;
    a list whose length differs from the decoded frames is reported with both counts (frames it
    does not reach take the null action, actions past the last frame are not used)."""
    config = loaded.config
    want = config.context_frames if context is None else context
    if config.context_frames == 0:  # trained to start from pure noise, as FAR's UCF-101 generators
        if prompt is not None:
            raise ConfigError("this model generates from pure noise (it was trained with 0 context frames): "
                              "drop prompt", parameter="prompt")
        return Prompt(np.zeros((0, *config.frame_size, 3), np.uint8), None, "none (generated from pure noise)")
    if prompt is None:
        if config.demo != "world" and not loaded.source.startswith("embedded:"):
            raise VideoError("this model has no demo clip: give prompt, a video to continue", parameter="prompt")
        from scd import world

        frames, actions = world.render_clip(world.HELDOUT_SEED_START + seed, want)
        return Prompt(frames, actions.tolist(), f"synthetic world clip (seed {world.HELDOUT_SEED_START + seed})")
    clip = video.read_video(prompt, last=want)
    warnings = []
    if clip.truncated:
        warnings.append(f"the prompt {prompt} is truncated ({clip.truncated}): continuing from its "
                        f"{clip.decoded} decodable frames")
    actions = None
    if config.condition == "action":
        listed, where = prompt_actions, "prompt_actions"
        if listed is None:
            listed = read_sidecar(prompt, config.action_names, config.num_classes)
            where = sidecar_path(prompt).name
        if listed is None:
            warnings.append(Notice(f"the prompt has no actions (no {sidecar_path(prompt).name} beside it, no "
                                   "prompt_actions): its frames take the null action, which this model also learned as "
                                   "'unknown', so it guesses the motion and 'none' afterwards need not stand still; give "
                                   "the prompt's actions to steer from it", "prompt_actions"))
        else:
            if len(listed) != clip.decoded:
                rest = (f"frames {len(listed)}-{clip.decoded - 1} take the null action" if len(listed) < clip.decoded
                        else f"the last {len(listed) - clip.decoded} actions are not used")
                warnings.append(Notice(f"{where} lists {len(listed)} actions but {prompt.name} decodes to "
                                       f"{clip.decoded} frames: action j goes with frame j, so {rest}",
                                       "prompt_actions" if where == "prompt_actions" else None))
            null = config.null_class
            actions = [listed[j] if j < len(listed) else null for j in range(clip.first_index, clip.decoded)]
    return Prompt(clip.frames, actions, str(prompt), warnings, clip.truncated)


def load_prompt(loaded: LoadedModel, prompt: Path | None = None, seed: int = 0, context: int | None = None,
                prompt_actions: list[int] | None = None) -> tuple[np.ndarray, list[int] | None, str]:
    """`read_prompt`'s frames, actions and description."""
    read = read_prompt(loaded, prompt, seed, context, prompt_actions)
    return read.frames, read.actions, read.source


def run(job: Job):
    """Generate and write; yields Started, then FrameWritten per frame, then Finished. A
    text-conditioned model runs `scd.text_to_video.run` (a prompt, the Wan VAE)."""
    config = job.model.config
    if config.condition == "text":
        from scd import text_to_video  # deferred: it builds on this module

        yield from text_to_video.run(job)
        return
    if job.text is not None or job.size is not None:
        what = "text" if job.text is not None else "size"
        raise ConfigError(f"drop {what}: this model continues video, only text-to-video models take a prompt or a size",
                          parameter=what)
    began, steps, guidance, outputs, device, dtype, threads, times = settle(job)

    t0 = time.perf_counter()
    read = read_prompt(job.model, job.prompt, job.seed, job.context, job.prompt_actions)
    prompt, prompt_actions, prompt_source = read.frames, read.actions, read.source
    times["prompt_decode_s"] = time.perf_counter() - t0
    if job.actions is not None and len(job.actions) != job.frames:
        raise ActionError(f"{len(job.actions)} actions given for {job.frames} frames: give one per generated frame")
    conditions = None
    warnings = list(read.warnings)
    used = {"prompt": prompt_source, "prompt_frames": len(prompt), "prompt_actions": None, "actions": None}
    if config.condition == "action":
        null = config.null_class
        before = list(prompt_actions) if prompt_actions is not None else [null] * len(prompt)
        after = list(job.actions) if job.actions is not None else [null] * job.frames
        conditions = torch.tensor(before + after)
        names = lambda ids: format_actions(ids, config.action_names, config.num_classes).split()
        used.update(prompt_actions=names(before), actions=names(after))
    elif job.actions is not None:
        raise ActionError("this model takes no actions: drop actions", parameter="actions")
    warnings.extend(job.model.notes)
    if job.label is not None:
        parse_label(job.label, config.action_names, config.num_classes, config.condition)  # checks it
    if config.condition == "label":
        conditions = None if job.label is None else torch.tensor([job.label] * job.batch)
    unsteered = conditions is None or not bool((conditions != config.null_class).any())
    if config.condition and config.guidance_mode == "null" and unsteered and guidance not in (1.0, -1.0):
        # guidance would compare the null condition with itself: generate unconditionally, as -1 does
        what = "label" if config.condition == "label" else "actions"
        warnings.append(f"no {what} given: generating unconditionally (guidance -1 instead of {guidance:g}); "
                        f"give {what} to steer the model")
        guidance = -1.0

    loaded = job.model.to(device, dtype)
    model, codec = loaded.model, loaded.codec
    t0 = time.perf_counter()
    if len(prompt):
        pixels = video.frames_to_tensor(video.fit_frames(prompt, config.frame_size, job.fit))
        context = loaded.encode(pixels)[None].expand(job.batch, -1, -1, -1, -1)
    else:
        weight = next(model.parameters())
        context = weight.new_zeros((job.batch, 0, config.channels, *config.latent_size))
    times["prompt_encode_s"] = time.perf_counter() - t0
    fps = job.fps or config.fps
    # no window given: the model's own (it never saw more frames than that); the report says which
    job = dataclasses.replace(job, window=job.window or config.window)
    cached = min(job.window or (len(prompt) + job.frames), len(prompt) + job.frames)
    need = kv_cache_bytes(model, job.batch, cached, guidance, dtype)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if need > 0.8 * free:
            warnings.append(f"the KV cache needs {need / 2**30:.1f} GiB of {free / 2**30:.1f} GiB free: "
                            "a context window of W frames keeps memory flat")
    elif job.window is None and need > 8 * 2**30:
        warnings.append(f"the KV cache will grow to {need / 2**30:.1f} GiB: a context window of W frames keeps memory flat")

    started = Started(outputs, str(device), dtype_name(dtype), job.model.source, job.model.revision, job.frames,
                      steps, len(prompt), prompt_source, warnings, threads)
    run = Delivery(job, outputs, fps, began, times)

    def frames():
        if job.include_prompt and len(prompt):
            run.write_all(video.fit_frames(prompt, config.frame_size, job.fit)[None].repeat(job.batch, 0))
        for frame in stream(model, context, job.frames, steps, guidance, conditions, seed=job.seed, window=job.window,
                            clamp=codec.clamp, compiled=job.compiled):
            t0 = time.perf_counter()
            images = video.tensor_to_frames(loaded.decode(frame.latents))  # (B, H, W, 3)
            codec_ms = (time.perf_counter() - t0) * 1000.0
            run.write(images[:, None], frame.index)
            latency = frame.latency_ms + codec_ms
            run.record({"index": frame.index, "latency_ms": latency, "context_ms": frame.context_ms,
                        "denoise_ms": frame.denoise_ms, "codec_ms": codec_ms})
            yield FrameWritten(frame.index, job.frames, latency, frame.context_ms, frame.denoise_ms, run.elapsed())

    yield from run.deliver(started, frames(), lambda complete: summarise(
        run.records, run.loop_s, run.first_ms, complete, job, str(device), dtype_name(dtype), steps, guidance, outputs,
        run.times, threads, used))


def settle(job: Job) -> tuple:
    """What every generate job settles before any work: (start time, steps, guidance, output paths,
    device, dtype, threads, the time split so far); its numbers and outputs checked."""
    config = job.model.config
    began = time.perf_counter() if job.started is None else job.started
    steps = config.default_steps if job.steps is None else job.steps
    guidance = config.default_guidance if job.guidance is None else job.guidance
    check_job(job, steps, guidance)
    outputs = check_outputs(job)
    device = resolve_device(job.device)
    times = {"startup_s": job.startup_s, "model_load_s": job.model_load_s}
    return began, steps, guidance, outputs, device, resolve_dtype(job.dtype, device), use_threads(job.threads), times


class Delivery:
    """Where a generate job's frames go, the same for every family: the videos (one per sample),
    the frames folder and the report, opened together before the first frame (an existing output
    is said; a report another run holds is refused), written frame by frame, and closed together
    however the run ends: every finished frame is in a playable file, the report says whether the
    run completed, and on a failure (a full disk) what failed first is named first."""

    def __init__(self, job: Job, outputs: list[Path], fps: float, began: float, times: dict):
        self.job, self.outputs, self.fps, self.began, self.times = job, outputs, fps, began, times
        self.records: list[dict] = []
        self.first_ms = None
        self.write_s = 0.0
        self.loop_s = 0.0
        self.written = 0  # frames written per sample
        self.writers: list = []

    def warnings(self) -> list[str]:
        job = self.job
        said = []
        for path in self.outputs + ([Path(job.report)] if job.report is not None else []):
            if path.is_file():
                said.append(f"{path} exists: it is replaced" + (" once the first frame is in" if path.suffix in mp4.SUFFIXES
                                                                else " when the run ends"))
        return said

    def elapsed(self) -> float:
        return time.perf_counter() - self.started_at

    def write_all(self, images: np.ndarray) -> None:
        """Frames shown before the generated ones (the prompt): (B, F, H, W, 3) uint8."""
        for writer, sample in zip(self.writers, images):
            for image in sample:
                writer.write(image)

    def write(self, images: np.ndarray, index: int) -> None:
        """The next generated frames (B, F, H, W, 3) uint8, the stream's frame `index` made them."""
        t1 = time.perf_counter()
        self.write_all(images)
        if self.job.frames_dir is not None:
            for b, sample in enumerate(images):
                folder = Path(self.job.frames_dir) / (f"sample_{b}" if self.job.batch > 1 else "")
                video.write_png_frames(folder, sample, start_index=self.written)
        self.written += images.shape[1]
        self.write_s += time.perf_counter() - t1
        if self.first_ms is None:
            self.first_ms = self.elapsed() * 1000.0
            # from the process's start when known (interpreter start-up and imports are part of the wait)
            self.times["first_frame_from_start_ms"] = ((time.perf_counter() - self.began) + (self.job.startup_s or 0.0)) * 1000.0

    def record(self, entry: dict) -> None:
        self.records.append(entry)

    def deliver(self, started: Started, frames, summary):
        """Yield `started`, then the events of `frames` (a generator that writes through `write`),
        then Finished with `summary(complete)`; the outputs close and the report is written whatever
        happens."""
        job = self.job
        started.warnings.extend(self.warnings())
        # a second run given the same report is refused, as one given the same video is (by its writer)
        report_lock = None if job.report is None else files.OutputLock(job.report, "report").acquire()
        try:
            self.writers = open_writers(self.outputs, self.fps, job)
        except BaseException:
            if report_lock is not None:
                report_lock.release()
            raise
        self.started_at = time.perf_counter()
        complete = False
        failure = None  # what stopped the run, named first if the report cannot be written either
        try:
            yield started
            yield from frames
            complete = True
        except BaseException as err:
            failure = err
            raise
        finally:
            self.loop_s = time.perf_counter() - self.started_at
            t1 = time.perf_counter()
            try:
                for writer in self.writers:
                    writer.close()
            except SCDError as err:
                failure = failure or err
                raise
            finally:
                self.times.update(frame_loop_s=self.loop_s, write_s=self.write_s + time.perf_counter() - t1,
                                  total_s=time.perf_counter() - self.began)
                result = summary(complete)
                if job.report is not None:
                    try:
                        write_report(Path(job.report), result)
                    except SCDError as err:
                        if not isinstance(failure, SCDError):
                            raise
                        # what failed first (the video, on a full disk) is the news; the report only followed it
                        raise type(failure)(f"{failure} (the report {job.report} could not be written either: {err})",
                                            failure.parameter) from None
                    finally:
                        report_lock.release()
        yield Finished(result)


VIEWING_SIZE = 256  # pixels: the smallest video side a player shows without squinting


def default_upscale(config) -> int:
    """The world models' frames (32x32) are enlarged to about VIEWING_SIZE pixels for viewing
    (nearest: each pixel a block, nothing invented); other models keep their size."""
    if config.demo != "world":
        return 1
    return max(1, VIEWING_SIZE // max(config.frame_size))


def open_writers(outputs: list[Path], fps: float, job: Job) -> list:
    """One locked MP4 writer per output (each file replaces what is there only once a frame is in);
    if one cannot be opened, those already opened are closed, leaving nothing behind."""
    writers = []
    try:
        for path in outputs:
            upscale = default_upscale(job.model.config) if job.upscale is None else job.upscale
            writers.append(mp4.VideoWriter(path, fps, upscale=upscale, upscale_mode=job.upscale_mode,
                                           inputs=[job.prompt]))
    except BaseException:
        for writer in writers:
            writer.close()
        raise
    return writers


def check_job(job: Job, steps: int, guidance: float) -> None:
    """Every number of the job in range, finite and whole where it must be (ConfigError otherwise)."""
    checks.number("frames", job.frames, 1, MAX_FRAMES, integer=True)
    checks.number("batch", job.batch, 1, 64, integer=True)
    if job.upscale is not None:
        checks.number("upscale", job.upscale, 1, 32, integer=True)
    checks.number("steps", steps, 1, 1000, integer=True)
    checks.number("guidance", guidance, -1, 100)  # -1: unconditional (scd.sampling.UNCONDITIONAL)
    checks.seed(job.seed)
    if job.fps is not None:
        checks.number("fps", job.fps, 0, 240, above=True)
    if job.window is not None:
        checks.number("window", job.window, 1, MAX_FRAMES, integer=True)
    if job.context is not None:
        checks.number("context", job.context, 1, MAX_FRAMES, integer=True)
    if job.threads is not None:
        checks.number("threads", job.threads, 1, 1024, integer=True)


def check_outputs(job: Job) -> list[Path]:
    """Refuse, before any work, outputs that cannot or must not be written (scd.files): the video
    paths, the report, the frames folder; none may be the prompt or another output."""
    outputs = output_paths(Path(job.out), job.batch)
    for path in outputs:
        files.check_output(path, "video", inputs=[job.prompt])
        mp4.check_path(path)
    if job.report is not None:
        files.check_output(job.report, "report", inputs=[job.prompt])
    if job.frames_dir is not None:
        files.check_output_folder(job.frames_dir, "frames folder")
    named = {f"video {p.name}": p for p in outputs}
    files.check_distinct(prompt=job.prompt, **named, report=job.report, frames_folder=job.frames_dir)
    return outputs


# 2: per-frame encoder_ms, decoder_ms renamed context_ms, denoise_ms; format_version, times, threads,
# versions and time_to_first_frame_from_start_ms added (docs/reliability.md); 3: prompt, prompt_frames,
# prompt_actions and actions added, time_to_first_frame_from_start_ms counts from the process's start
REPORT_FORMAT = 3


def summarise(records, wall_s, first_ms, complete, job, device, dtype, steps, guidance, outputs, times=None,
              threads=None, used=None) -> dict:
    latencies = [r["latency_ms"] for r in records]
    steady = latencies[1:] or latencies
    times = dict(times or {})
    times["context_s"] = sum(r["context_ms"] for r in records) / 1000.0
    times["denoise_s"] = sum(r["denoise_ms"] for r in records) / 1000.0
    times["frame_decode_s"] = sum(r["codec_ms"] for r in records) / 1000.0
    return {
        "format_version": REPORT_FORMAT,
        "complete": complete,
        "frames": records,
        "frames_generated": len(records),
        "time_to_first_frame_ms": first_ms,
        "latency_ms_p50": percentile(steady, 50),
        "latency_ms_p95": percentile(steady, 95),
        "latency_ms_max": max(latencies) if latencies else float("nan"),
        "frames_per_second": len(records) * job.batch / wall_s if records and wall_s > 0 else 0.0,
        "wall_s": wall_s,
        "device": device,
        "dtype": dtype,
        "model": job.model.source,
        "revision": job.model.revision,
        "steps": steps,
        "guidance": guidance,
        "batch": job.batch,
        "seed": job.seed,
        "context_window": job.window,
        "outputs": [str(p) for p in outputs],
        **(used or {}),  # the prompt (path, frames kept) and the actions of its frames and of the generated ones
        "threads": threads,
        "times": times,
        "time_to_first_frame_from_start_ms": times.get("first_frame_from_start_ms"),
        "versions": {"scd": scd.__version__, "torch": torch.__version__, "av": av.__version__},
    }


def write_report(path: Path, summary: dict) -> None:
    clean = json.loads(json.dumps(summary, default=str).replace("NaN", "null"))
    files.write_text(path, json.dumps(clean, indent=2) + "\n", what="report")
