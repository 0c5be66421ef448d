"""What every generate job shares, whatever the model family: the job's parameters (`Job`), the
events it yields, its checks before any work (`settle`), and its delivery (`Delivery`): the videos,
frames folder and report opened together, written frame by frame, closed together however the run
ends. `scd.generate` runs video continuation on it, `scd.text_to_video` text to video.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import torch

import scd
from scd import checks, files, mp4, video
from scd.devices import resolve_device, resolve_dtype, use_threads
from scd.errors import SCDError
from scd.loaded import LoadedModel
from scd.metrics import percentile

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
    samples: int | None = None  # samples drawn per frame, their median kept (Rollout's `samples`; None: the model's)


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
