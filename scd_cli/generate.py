"""`scd generate`: continue a clip, streaming frames to an MP4 with a live latency view."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from scd import generate as job_lib
from scd.actions import parse_actions, parse_label
from scd.checkpoints import load_model
from scd.devices import process_age_s
from scd.errors import ConfigError
from scd_cli.common import (
    Threads,
    console,
    err_console,
    handles_errors,
    in_cli_words,
    is_interactive,
    parse_size,
    say,
    state,
)


def _live_line(event: job_lib.FrameWritten, first_ms: float) -> Text:
    done = event.index + 1
    fps = done / event.elapsed_s if event.elapsed_s > 0 else 0.0
    eta = (event.frames - done) / fps if fps > 0 else 0.0
    bar_width = 24
    filled = int(bar_width * done / event.frames)
    return Text.from_markup(
        f"[cyan]{'━' * filled}[/][dim]{'━' * (bar_width - filled)}[/] frame {done}/{event.frames}  "
        f"[bold]{event.latency_ms:7.1f} ms[/] (context {event.context_ms:6.1f} + denoise {event.denoise_ms:7.1f})  "
        f"{fps:5.2f} frames/s  first frame {first_ms:7.1f} ms  ETA {eta:5.1f} s")


def _where_the_time_went(times: dict) -> str:
    """startup, model load, prompt, frame loop (context / denoise / frame decode) and writing, in s."""
    def s(key):
        value = times.get(key)
        return "-" if value is None else f"{value:.2f}"
    text = f"text encode {s('text_encode_s')}, " if "text_encode_s" in times else ""
    return (f"startup {s('startup_s')}, model load {s('model_load_s')}, {text}prompt {s('prompt_decode_s')} + "
            f"{s('prompt_encode_s')}, frames {s('frame_loop_s')} (context {s('context_s')}, denoise {s('denoise_s')}, "
            f"decode {s('frame_decode_s')}), video write {s('write_s')}")


def _summary_table(summary: dict, steps: int) -> Table:
    table = Table(title="scd generate", show_header=False)
    first_from_start = summary.get("time_to_first_frame_from_start_ms")
    rows = [("model", summary["model"] + (f" @ {summary['revision']}" if summary.get("revision") else "")),
            ("device / dtype / threads", f"{summary['device']} / {summary['dtype']} / {summary.get('threads')}"),
            ("steps", str(steps) + (f", each frame the median of {summary['samples']} samples"
                                    if summary.get("samples", 1) > 1 else "")),
            ("frames", f"{summary['frames_generated']} x {summary['batch']}"),
            ("time to first frame", f"{summary['time_to_first_frame_ms'] or 0:.1f} ms from the loop's start, "
                                    f"{first_from_start or 0:.0f} ms from the process's start"),
            ("where the time went (s)", _where_the_time_went(summary.get("times", {}))),
            ("latency p50 / p95 / max", f"{summary['latency_ms_p50']:.1f} / {summary['latency_ms_p95']:.1f} / "
                                        f"{summary['latency_ms_max']:.1f} ms"),
            ("throughput", f"{summary['frames_per_second']:.2f} frames/s"),
            ("output", ", ".join(summary["outputs"]))]
    for k, v in rows:
        table.add_row(f"[dim]{k}[/]", escape(v))
    return table


def read_prompts(prompt: str | None, prompt_file: Path | None, batch: int) -> list[str] | None:
    """--prompt, or --prompt-file's non-empty lines (the first `batch` of them when there are more)."""
    if prompt is not None and prompt_file is not None:
        raise ConfigError("give --prompt or --prompt-file, not both")
    if prompt_file is None:
        return None if prompt is None else [prompt]
    try:
        lines = [line.strip() for line in prompt_file.read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise ConfigError(f"--prompt-file {prompt_file} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read --prompt-file {prompt_file}: {err}") from None
    prompts = [line for line in lines if line]
    if not prompts:
        raise ConfigError(f"--prompt-file {prompt_file} holds no prompt: one per line")
    return prompts[:batch] if len(prompts) > batch else prompts


@handles_errors
def generate(
    out: Path = typer.Option(Path("out.mp4"), "--out", "-o", help="Output MP4 (with --batch N: OUT_0.mp4 ... OUT_{N-1}.mp4). An existing file is replaced (with a warning) once the first frame is written."),
    prompt_frames: Optional[Path] = typer.Option(None, "--prompt-frames", "-p", help="Prompt video (MP4, WebM, MKV, MOV, GIF) or a folder of images. Default: the model's demo prompt."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model folder, Hub repo id[@revision] (gdhe17/Self-Forcing: Self-Forcing's text-to-video generator), or a reference checkpoint with --options (a Wan checkpoint with --base). Default: the embedded SCD model."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Text prompt of a text-to-video model (Wan2.1, Self-Forcing)."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Text prompts, one per line (with --batch N: the first N, one per video)."),
    base: Optional[str] = typer.Option(None, "--base", help="A Wan model's base: a folder in the layout of Wan-AI/Wan2.1-T2V-1.3B-Diffusers (tokenizer/, text_encoder/, vae/, transformer/config.json) or a Hub repo (default: the model's own)."),
    size: Optional[str] = typer.Option(None, "--size", help="Frame size HxW of a text-to-video model, multiples of 16 (default: the model's, 480x832 for Wan2.1-T2V-1.3B)."),
    options: Optional[Path] = typer.Option(None, "--options", help="Options file of an official SCD / FAR checkpoint."),
    frames: int = typer.Option(16, "--frames", "-n", help="Frames to generate."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps per frame (default: the model's)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale (1 = off, -1 = unconditional; default: the model's)."),
    label: Optional[str] = typer.Option(None, "--label", help="Class of a class-conditioned model (FAR's UCF-101 Cond models): an index or one of the model's class names."),
    actions: Optional[str] = typer.Option(None, "--actions", help="One action per generated frame, exactly --frames of them: a comma list (names or indices) or a file."),
    prompt_actions: Optional[str] = typer.Option(None, "--prompt-actions", help="Actions of the prompt video, one per frame of the file as decoded (default: PROMPT.actions.txt beside the prompt, else none)."),
    context: Optional[int] = typer.Option(None, "--context", help="Keep the last N prompt frames (default: the model's context length)."),
    context_window: Optional[int] = typer.Option(None, "--context-window", help="Keep only the last W frames in the KV cache: flat memory for endless generation (default: the model's own window, the frames its training clips showed; none for the references' models)."),
    fit: str = typer.Option("crop", "--fit", help="Fit prompt frames to the model's size: crop (resize + center crop), pad or stretch."),
    fps: Optional[float] = typer.Option(None, "--fps", help="Output frame rate (default: the model's)."),
    include_prompt: bool = typer.Option(False, "--include-prompt", help="Put the prompt frames first in the video."),
    upscale: Optional[int] = typer.Option(None, "--upscale", help="Enlarge frames N times for viewing (default: 8 for the 32x32 world models, giving 256x256 video; 1, the model's size, for others)."),
    upscale_mode: str = typer.Option("nearest", "--upscale-mode", help="nearest or bicubic."),
    frames_dir: Optional[Path] = typer.Option(None, "--frames-dir", help="Also write each frame as a PNG here."),
    seed: int = typer.Option(0, "--seed", help="Noise seed: the same seed gives the same video."),
    batch: int = typer.Option(1, "--batch", help="Continuations generated at once, written as separate files."),
    samples: Optional[int] = typer.Option(None, "--samples", help="Samples drawn per frame; their per-pixel median is written and fed back, which keeps a world model's agent and scene longer (default: the model's, 1 unless its card says otherwise; docs/training.md, 'The median of samples')."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    threads: Threads = None,
    dtype: str = typer.Option("auto", "--dtype", help="auto (bfloat16 on CUDA, float32 elsewhere), float32, bfloat16, float16."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write per-frame latencies and a summary as JSON (an existing file is replaced, with a warning)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the frame loop (static shapes; CUDA graphs on CUDA): the first frames compile (seconds to minutes), later ones run faster."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors."),
):
    """Continue a video frame by frame, writing each frame to OUT the moment it exists."""
    state["quiet"] = quiet
    age = process_age_s()
    startup_s = None if age is None else age - (time.perf_counter() - state["started"])
    texts = read_prompts(prompt, prompt_file, batch)
    frame_size = None if size is None else parse_size(size)
    loaded = load_model(model, options, base=base)
    model_load_s = time.perf_counter() - state["started"]
    config = loaded.config
    job = job_lib.Job(
        model=loaded, out=out, prompt=prompt_frames, frames=frames, steps=steps, guidance=guidance,
        actions=parse_actions(actions, config.action_names, config.num_classes),
        prompt_actions=parse_actions(prompt_actions, config.action_names, config.num_classes),
        label=parse_label(label, config.action_names, config.num_classes, config.condition),
        seed=seed, batch=batch, window=context_window, context=context, fit=fit, fps=fps,
        include_prompt=include_prompt, upscale=upscale, upscale_mode=upscale_mode, frames_dir=frames_dir,
        report=report, device=device, dtype=dtype, threads=threads, started=state["started"], startup_s=startup_s,
        model_load_s=model_load_s, compiled=compile, text=texts, size=frame_size, samples=samples)
    live = None
    first_ms = 0.0
    events = job_lib.run(job)
    try:
        for event in events:
            if isinstance(event, job_lib.Started):
                for warning in event.warnings:
                    err_console.print(f"[yellow]warning:[/] {escape(in_cli_words(warning))}", soft_wrap=True)
                say(f"[bold]{event.model}[/]" + (f" @ {event.revision}" if event.revision else "")
                    + f" on {event.device} ({event.dtype}, {event.threads} threads), {event.steps} steps; prompt: {event.prompt_source}, "
                      f"{event.context_frames} frames -> {', '.join(map(str, event.outputs))}")
                if is_interactive() and not quiet:
                    live = Live(Text("starting..."), console=console, refresh_per_second=8, transient=False)
                    live.start()
            elif isinstance(event, job_lib.FrameWritten):
                if event.index == 0:
                    first_ms = event.elapsed_s * 1000.0
                if live is not None:
                    live.update(_live_line(event, first_ms))
                else:
                    say(f"frame {event.index + 1}/{event.frames} {event.latency_ms:.1f} ms "
                        f"(context {event.context_ms:.1f}, denoise {event.denoise_ms:.1f})")
            elif isinstance(event, job_lib.Finished):
                if live is not None:
                    live.stop()
                    live = None
                if not quiet:
                    console.print(_summary_table(event.summary, event.summary["steps"]))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM
        events.close()  # closes the writers and writes the report marked incomplete
        raise
    finally:
        if live is not None:
            live.stop()
