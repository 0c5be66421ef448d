"""The generate job of a text-conditioned model (the Wan family): a prompt in, a streamed MP4 out.

`run` encodes the prompts (umT5 through `scd.text`, loaded, used and freed before the transformer
streams; embeddings cached on disk), optionally encodes a prompt clip through the Wan VAE into the
stream's first latent frames, streams chunks from `scd.sampling.stream`, decodes each latent frame
through the VAE's stream decoder (its causal cache carried across chunks, memory flat) and writes
its video frames the moment they exist. Events and guarantees are those of `scd.generate.run`: every
finished frame is on disk in a playable file, and the report says whether the run completed.

Frames: the first latent frame of a video is one video frame, each later one four. `frames` counts
video frames; the stream makes whole chunks, so the count is rounded up, and the report says what
was made (`video_frames_generated`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from scd import checks, text, video
from scd.codecs import stream_decoder
from scd.devices import dtype_name, resolve_device, resolve_dtype, use_threads
from scd.errors import ConfigError
from scd.generate import Finished, FrameWritten, Job, Started, check_job, check_outputs, open_writers, summarise, write_report
from scd.sampling import stream

TEMPORAL = 4  # video frames per latent frame after a video's first (the Wan VAE)


def latent_plan(video_frames: int, chunk: int, continuing: bool) -> tuple[int, int]:
    """(latent frames to generate, video frames they make) for at least `video_frames` video frames
    in whole chunks of `chunk` latent frames; a stream `continuing` a prompt clip makes four video
    frames of every latent frame, a stream from text alone one of its first."""
    latents = math.ceil(video_frames / TEMPORAL) if continuing else 1 + math.ceil((video_frames - 1) / TEMPORAL)
    latents = math.ceil(latents / chunk) * chunk
    return latents, TEMPORAL * latents if continuing else 1 + TEMPORAL * (latents - 1)


def prompts_for(job: Job) -> list[str]:
    """The batch's prompts: one per sample (`--prompt-file` lines), or one prompt for every sample."""
    prompts = list(job.text or [])
    if not prompts:
        raise ConfigError("give text: this model generates video from a text prompt", parameter="text")
    if len(prompts) == 1:
        return prompts * job.batch
    if job.batch not in (1, len(prompts)):
        raise ConfigError(f"{len(prompts)} prompts for a batch of {job.batch}: give one prompt per sample, or one "
                          "for all", parameter="batch")
    return prompts


def frame_size(job: Job, multiple: int) -> tuple[int, int]:
    size = tuple(job.size or job.model.config.frame_size)
    if len(size) != 2 or any(not isinstance(s, int) or s < multiple or s % multiple for s in size):
        raise ConfigError(f"size {size[0]}x{size[1]} must be two multiples of {multiple} (the VAE's {multiple // 2}x "
                          "times the transformer's patch of 2), like 480x832", parameter="size")
    for side in size:
        checks.number("size", side, multiple, 4096, integer=True)
    return size


def run(job: Job):
    """Generate and write; yields Started, then FrameWritten per latent frame, then Finished."""
    loaded = job.model
    config = loaded.config
    began = time.perf_counter() if job.started is None else job.started
    steps = config.default_steps if job.steps is None else job.steps
    guidance = config.default_guidance if job.guidance is None else job.guidance
    check_job(job, steps, guidance)
    if job.actions is not None or job.prompt_actions is not None or job.label is not None:
        raise ConfigError("this model is conditioned on text: drop actions and labels", parameter="actions")
    prompts = prompts_for(job)
    job = dataclasses.replace(job, batch=len(prompts))
    outputs = check_outputs(job)
    device = resolve_device(job.device)
    dtype = resolve_dtype(job.dtype, device)
    threads = use_threads(job.threads)
    times = {"startup_s": job.startup_s, "model_load_s": job.model_load_s}

    base = loaded.base()
    codec = loaded.codec
    size = frame_size(job, codec.scale * config.patch_size[1])
    latent_size = (size[0] // codec.scale, size[1] // codec.scale)
    t0 = time.perf_counter()
    identity = None if loaded.base_revision is None else f"{config.base}@{loaded.base_revision}"
    embedded = text.encode_prompts(base, prompts, text_len=config.text_len, revision=identity, device=device)
    times["text_encode_s"] = time.perf_counter() - t0
    warnings = list(loaded.notes)

    t0 = time.perf_counter()
    clip = None if job.prompt is None else video.read_video(job.prompt, last=job.context)
    times["prompt_decode_s"] = time.perf_counter() - t0
    loaded = loaded.to(device, dtype)
    model = loaded.model
    t0 = time.perf_counter()
    if clip is not None:
        pixels = video.frames_to_tensor(video.fit_frames(clip.frames, size, job.fit))[None]  # (1, F, 3, H, W)
        with torch.inference_mode():
            context = codec.encode(pixels.to(device))[:, -(job.context or 10**9):]
        context = context.to(dtype).expand(job.batch, -1, -1, -1, -1)
        dropped = len(clip.frames) - (1 + TEMPORAL * (context.shape[1] - 1))
        if dropped:
            warnings.append(f"the prompt's first {dropped} frames are not encoded: the VAE takes 1 + 4k frames")
        prompt_source = f"{job.prompt} ({context.shape[1]} latent frames) + text"
    else:
        context = torch.zeros((job.batch, 0, config.channels, *latent_size), device=device, dtype=dtype)
        prompt_source = "text"
    times["prompt_encode_s"] = time.perf_counter() - t0
    latent_frames, video_frames = latent_plan(job.frames, config.chunk_frames, clip is not None)
    if video_frames != job.frames:
        warnings.append(f"{job.frames} frames asked, {video_frames} made: whole chunks of {config.chunk_frames} "
                        f"latent frames, {'four' if clip is not None else 'one, then four,'} video frames each")

    writers = open_writers(outputs, job.fps or config.fps, job)
    decoder = stream_decoder(codec)
    records: list[dict] = []
    started_at = time.perf_counter()
    complete = False
    first_ms = None
    written = 0
    write_s = 0.0
    try:
        yield Started(outputs, str(device), dtype_name(dtype), job.model.source, job.model.revision, video_frames,
                      steps, context.shape[1], f"{prompt_source}: {prompts[0]!r}" + (" ..." if len(set(prompts)) > 1 else ""),
                      warnings, threads)
        if context.shape[1]:  # the prompt clip through the decoder first: its causal cache continues from it
            shown = decoder.decode(context.float())  # (B, m, 3, H, W)
            if job.include_prompt:
                for writer, sample in zip(writers, shown):
                    for image in video.tensor_to_frames(sample):
                        writer.write(image)
        weight = embedded.embeddings.to(device, dtype)
        for frame in stream(model, context, latent_frames, steps, guidance, seed=job.seed, text=weight,
                            window=config.window):
            t0 = time.perf_counter()
            pixels = decoder.decode(frame.latents[:, None])  # (B, m, 3, H, W)
            codec_ms = (time.perf_counter() - t0) * 1000.0
            t1 = time.perf_counter()
            for writer, sample in zip(writers, pixels):
                for image in video.tensor_to_frames(sample):
                    writer.write(image)
            if job.frames_dir is not None:
                for b, sample in enumerate(pixels):
                    folder = Path(job.frames_dir) / (f"sample_{b}" if job.batch > 1 else "")
                    video.write_png_frames(folder, video.tensor_to_frames(sample), start_index=written)
            write_s += time.perf_counter() - t1
            written += pixels.shape[1]
            elapsed = time.perf_counter() - started_at
            if first_ms is None:
                first_ms = elapsed * 1000.0
                times["first_frame_from_start_ms"] = (time.perf_counter() - began) * 1000.0
            latency = frame.latency_ms + codec_ms
            records.append({"index": frame.index, "video_frames": pixels.shape[1], "chunk_start": frame.chunk_start,
                            "latency_ms": latency, "context_ms": frame.context_ms, "denoise_ms": frame.denoise_ms,
                            "codec_ms": codec_ms})
            yield FrameWritten(written - 1, video_frames, latency, frame.context_ms, frame.denoise_ms, elapsed)
        complete = True
    finally:
        loop_s = time.perf_counter() - started_at
        t1 = time.perf_counter()
        try:
            for writer in writers:
                writer.close()
        finally:
            times.update(frame_loop_s=loop_s, write_s=write_s + time.perf_counter() - t1,
                         total_s=time.perf_counter() - began)
            summary = summarise(records, loop_s, first_ms, complete, job, str(device), dtype_name(dtype), steps,
                                guidance, outputs, times, threads)
            chunks = []  # each chunk's latency: its denoising and the decoding of all its frames
            for r in records:
                if r["chunk_start"] or not chunks:
                    chunks.append(0.0)
                chunks[-1] += r["latency_ms"]
            summary.update(prompts=prompts, size=list(size), latent_frames_generated=len(records), frames_generated=written,
                           video_frames_generated=written, frames_per_second=written * job.batch / loop_s
                           if written and loop_s > 0 else 0.0,
                           chunk_frames=config.chunk_frames, chunk_latency_ms=chunks,
                           text_encoder_loaded=embedded.encoder_loaded)
            if job.report is not None:
                write_report(Path(job.report), summary)
    yield Finished(summary)
