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

import numpy as np
import torch

from scd import checks, text, video
from scd.codecs import stream_decoder
from scd.devices import dtype_name
from scd.errors import ConfigError
from scd.job import Delivery, FrameWritten, Job, Started, settle, summarise
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
    """The batch's prompts: one per sample (a prompt file's lines), or one prompt for every sample."""
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
    if job.actions is not None or job.prompt_actions is not None or job.label is not None:
        raise ConfigError("this model is conditioned on text: drop actions and labels", parameter="actions")
    prompts = prompts_for(job)
    job = dataclasses.replace(job, batch=len(prompts))
    began, steps, guidance, outputs, device, dtype, threads, times = settle(job)

    base = loaded.base()
    codec = loaded.codec
    size = frame_size(job, codec.scale * config.patch_size[1])
    latent_size = (size[0] // codec.scale, size[1] // codec.scale)
    t0 = time.perf_counter()
    # the text cache is keyed by the base's commit where it came from the Hub
    identity = None if loaded.base_revision is None else f"{config.base.split('@')[0]}@{loaded.base_revision}"
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

    decoder = stream_decoder(codec)
    started = Started(outputs, str(device), dtype_name(dtype), job.model.source, job.model.revision, video_frames,
                      steps, context.shape[1], f"{prompt_source}: {prompts[0]!r}" + (" ..." if len(set(prompts)) > 1 else ""),
                      warnings, threads)
    run = Delivery(job, outputs, job.fps or config.fps, began, times)

    def frames():
        if context.shape[1]:  # the prompt clip through the decoder first: its causal cache continues from it
            shown = decoder.decode(context.float())  # (B, m, 3, H, W)
            if job.include_prompt:
                run.write_all(np.stack([video.tensor_to_frames(sample) for sample in shown]))
        embeddings = embedded.embeddings.to(device, dtype)
        for frame in stream(model, context, latent_frames, steps, guidance, seed=job.seed, text=embeddings,
                            window=config.window):
            t0 = time.perf_counter()
            pixels = decoder.decode(frame.latents[:, None])  # (B, m, 3, H, W)
            codec_ms = (time.perf_counter() - t0) * 1000.0
            run.write(np.stack([video.tensor_to_frames(sample) for sample in pixels]), frame.index)
            latency = frame.latency_ms + codec_ms
            run.record({"index": frame.index, "video_frames": pixels.shape[1], "chunk_start": frame.chunk_start,
                        "latency_ms": latency, "context_ms": frame.context_ms, "denoise_ms": frame.denoise_ms,
                        "codec_ms": codec_ms})
            yield FrameWritten(run.written - 1, video_frames, latency, frame.context_ms, frame.denoise_ms, run.elapsed())

    def summary(complete: bool) -> dict:
        result = summarise(run.records, run.loop_s, run.first_ms, complete, job, str(device), dtype_name(dtype), steps,
                           guidance, outputs, run.times, threads, {"prompt": prompt_source, "text": prompts})
        chunks = []  # each chunk's latency: its denoising and the decoding of all its frames
        for r in run.records:
            if r["chunk_start"] or not chunks:
                chunks.append(0.0)
            chunks[-1] += r["latency_ms"]
        result.update(prompts=prompts, size=list(size), latent_frames_generated=len(run.records),
                      frames_generated=run.written, video_frames_generated=run.written,
                      frames_per_second=run.written * job.batch / run.loop_s if run.written and run.loop_s > 0 else 0.0,
                      chunk_frames=config.chunk_frames, chunk_latency_ms=chunks,
                      text_encoder_loaded=embedded.encoder_loaded)
        return result

    yield from run.deliver(started, frames(), summary)
