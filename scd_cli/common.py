"""What every command shares: consoles, the error boundary, model loading with a spinner."""

from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console
from rich.markup import escape

from scd.errors import SCDError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)
state = {"debug": False, "quiet": False}


def fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def handles_errors(command):
    """Turn the library's typed errors into one line and exit code 2; Ctrl-C into exit code 130.
    `scd --debug ...` lets the traceback through instead."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SCDError as err:
            if state["debug"]:
                raise
            raise fail(str(err)) from None
        except KeyboardInterrupt:
            if state["debug"]:
                raise
            err_console.print("interrupted")
            raise typer.Exit(130) from None
        except MemoryError:
            raise fail("out of memory: use fewer frames, a --context-window, a smaller --batch or another device") from None

    return wrapper


def say(message: str) -> None:
    """A status line, unless --quiet."""
    if not state["quiet"]:
        console.print(message, soft_wrap=True)


def is_interactive() -> bool:
    return console.is_terminal and sys.stdout.isatty()
