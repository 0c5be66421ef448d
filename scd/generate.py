"""The generate job: a prompt video in, a streamed MP4 (and report) out.

`run` decodes and fits the prompt, encodes it with the model's codec, streams frames from
`scd.sampling.stream`, decodes each to pixels and writes it the moment it exists. It yields
progress events; whatever happens, every finished frame is on disk in a playable file and the
report says whether the run completed. What every job shares (its parameters, events, checks and
delivery) is `scd.job`; a text-conditioned model runs `scd.text_to_video` instead.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from scd import checks, text_to_video, video
from scd.actions import format_actions, parse_label, read_sidecar, sidecar_path
from scd.devices import dtype_name
from scd.errors import ActionError, ConfigError, Notice, VideoError
from scd.job import Delivery, Finished, FrameWritten, Job, Started, settle, summarise  # noqa: F401 (the job's API, here as before)
from scd.loaded import LoadedModel
from scd.sampling import kv_cache_bytes, stream


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
    samples = config.default_samples if job.samples is None else job.samples
    checks.samples(samples)
    if config.condition == "text":
        if samples != 1:
            raise ConfigError("a text-to-video model draws one sample per frame: use samples 1", parameter="samples")
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
    used = {"prompt": prompt_source, "prompt_frames": len(prompt), "prompt_actions": None, "actions": None,
            "samples": samples}
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
    need = kv_cache_bytes(model, job.batch, cached, guidance, dtype, samples)
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
                            clamp=codec.clamp, compiled=job.compiled, samples=samples):
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
