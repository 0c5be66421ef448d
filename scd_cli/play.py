"""`scd play`: drive a world model live from the keyboard, in the browser."""

from __future__ import annotations

import os
import shlex
import sys
import webbrowser
from pathlib import Path
from typing import Optional

import typer

from scd.errors import ConfigError, SCDError
from scd_cli.common import (
    Device,
    console,
    err_console,
    fail,
    handles_errors,
    in_cli_words,
    state,
)


def _can_open_browser() -> bool:
    """A graphical browser is likely: never start a text browser inside this terminal."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def replay_command(parameters: dict) -> list[str]:
    """The `scd generate` command line of a recording's replay parameters."""
    flags = (("model", "--model"), ("prompt", "--prompt-frames"), ("seed", "--seed"), ("steps", "--steps"), ("samples", "--samples"),
             ("window", "--context-window"), ("actions", "--actions"), ("frames", "--frames"), ("upscale", "--upscale"),
             ("out", "--out"))
    args = ["scd", "generate"]
    for name, flag in flags:
        if parameters.get(name) is not None:
            args += [flag, str(parameters[name])]
    return args


@handles_errors
def play(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model folder or Hub repo id[@revision]. Default: the embedded SCD model."),
    port: int = typer.Option(8765, "--port", help="Port of the page (0: any free port)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Anything but a loopback address lets other machines watch and drive the model."),
    no_browser: bool = typer.Option(False, "--no-browser", help="Print the URL but do not open a browser."),
    compare: Optional[bool] = typer.Option(None, "--compare/--no-compare", help="Run the matched baseline beside the model, driven by the same keys (default: on when the model has one: the embedded pair)."),
    prompt_frames: Optional[Path] = typer.Option(None, "--prompt-frames", "-p", help="Prompt video or image folder. Default: a clip of the synthetic world chosen by --seed."),
    seed: int = typer.Option(0, "--seed", help="Seed of the noise (and of the world clip that is the default prompt)."),
    record: Optional[Path] = typer.Option(None, "--record", help="Record the first panel to this MP4, with PATH.actions.txt and PATH.json; `scd generate` replays it."),
    record_frames: Optional[Path] = typer.Option(None, "--record-frames", help="Also keep the recorded frames as PNGs in this folder (lossless: what `scd eval --recording` scores exactly)."),
    threads: int = typer.Option(1, "--threads", help="CPU threads per panel."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile each panel's frame loop (static shapes; the first frames wait for the compiler)."),
    samples: Optional[int] = typer.Option(None, "--samples", help="Samples drawn per frame, their per-pixel median shown and fed back, for both panels (default: the model's; as scd generate --samples)."),
    device: Device = "auto",
):
    """Play a world model live in the browser: arrows or WASD choose each next frame's action."""
    if record_frames is not None and record is None:
        raise ConfigError("--record-frames keeps the frames of a recording: give --record too", "record_frames")
    from scd.play_server import (
        open_play,  # aiohttp and the page load only for this command
    )

    server, warnings = open_play(model, host=host, port=port, compare=compare, prompt=prompt_frames, seed=seed,
                                 record=record, threads=threads, device=device, compiled=compile,
                                 format_replay=replay_command, record_frames=record_frames, samples=samples)
    for warning in warnings + server.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}")
    url = server.start()
    try:
        names = " vs ".join(p.loaded.source for p in server.session.panels)
        console.print(f"[bold]scd play[/] {names} at [link={url}]{url}[/link]  (it starts when the page opens; "
                      "Ctrl-C to stop)", soft_wrap=True)
        if not no_browser and _can_open_browser():
            webbrowser.open(url)
        if server.wait() and server.session.error is None:
            console.print("the page was closed: stopping")
    except KeyboardInterrupt:
        err_console.print("stopping")
    finally:
        recordings = server.stop()
    for rec in recordings:
        console.print(f"recorded {rec.frames} frames to {rec.video} (+ {rec.actions.name}, {rec.meta.name}); "
                      f"replay: {shlex.join(rec.replay)}", soft_wrap=True)
    err = server.session.error
    if err is not None:
        if state["debug"]:
            raise err
        message = in_cli_words(err) if isinstance(err, SCDError) else f"{type(err).__name__}: {err}"
        raise fail(f"play stopped: {message}", code=2 if isinstance(err, SCDError) else 1)
