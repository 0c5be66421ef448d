"""What every command shares: consoles, the error boundary, model loading with a spinner."""

from __future__ import annotations

import functools
import re
import signal
import sys
import threading
import time
from typing import Annotated, Optional

import click
import typer
from rich.console import Console
from rich.markup import escape

from scd.errors import ConfigError, SCDError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)
state = {"debug": False, "quiet": False, "started": time.perf_counter()}

class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, systemd, job schedulers): handled exactly as Ctrl-C, exit code 143."""


def _on_sigterm(signum, frame):
    raise Terminated()


# Options several commands share: one definition each.
ModelRef = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Model folder, Hub repo id[@revision], or a reference checkpoint with --options. "
                          "Default: the embedded SCD model.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
DType = Annotated[str, typer.Option("--dtype", help="auto (bfloat16 on CUDA, float32 elsewhere), float32, bfloat16, float16.")]
Threads = Annotated[Optional[int], typer.Option(
    "--threads", help="CPU threads for torch (default: the CPUs the rest of the machine leaves idle, at least 1; "
                      "see docs/reliability.md).")]


# library parameters whose flag is not simply --parameter-name
FLAGS = {"window": "--context-window", "prompt": "--prompt-frames", "clips": "--clips", "text": "--prompt"}


def flag_for(parameter: str) -> str:
    """The command-line flag of a library parameter in the running command (`steps` -> `--steps`,
    `window` -> `--context-window`)."""
    if parameter in FLAGS:
        return FLAGS[parameter]
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        for param in ctx.command.params:
            if param.name == parameter:
                flags = [o for o in param.opts if o.startswith("--")]
                if flags:
                    return flags[0]
    return "--" + parameter.replace("_", "-")


def in_cli_words(err) -> str:
    """The library's message (an SCDError, or a Notice among warnings) with the parameter it names
    spelled as its flag."""
    message = str(err)
    for parameter in (getattr(err, "parameter", None), *getattr(err, "others", ())):
        if parameter:
            message = re.sub(rf"(?<![\w/-]){re.escape(parameter)}(?![\w-])", flag_for(parameter), message, count=1)
    return message


def fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def handles_errors(command):
    """Turn the library's typed errors into one line and exit code 2; Ctrl-C into exit code 130 and
    SIGTERM, raised as Terminated (a KeyboardInterrupt) so it takes Ctrl-C's path, into 143.
    `scd --debug ...` lets the traceback through instead."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        state["started"] = time.perf_counter()
        for stream in (sys.stdout, sys.stderr):  # an ASCII-only terminal shows a path's "é" as \xe9, not a traceback
            try:
                stream.reconfigure(errors="backslashreplace")
            except (AttributeError, ValueError, OSError):
                pass
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _on_sigterm) if main else None
        try:
            return command(*args, **kwargs)
        except Terminated:
            if state["debug"]:
                raise
            err_console.print("terminated")
            raise typer.Exit(143) from None
        except SCDError as err:
            if state["debug"]:
                raise
            raise fail(in_cli_words(err)) from None
        except KeyboardInterrupt:
            if state["debug"]:
                raise
            err_console.print("interrupted")
            raise typer.Exit(130) from None
        except MemoryError:
            raise fail("out of memory: use fewer frames, a --context-window, a smaller --batch or another device") from None
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def say(message: str) -> None:
    """A status line, unless --quiet."""
    if not state["quiet"]:
        console.print(message, soft_wrap=True)


def is_interactive() -> bool:
    return console.is_terminal and sys.stdout.isatty()


def parse_size(text: str, flag: str = "--size", square: bool = False) -> tuple[int, int]:
    """'480x832' -> (480, 832); with `square`, '256' -> (256, 256) too."""
    if square and text.strip().isdigit():
        return int(text), int(text)
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"{flag} takes HxW, like 480x832{' (or one side)' if square else ''}, not {text!r}")
    return int(parts[0]), int(parts[1])
