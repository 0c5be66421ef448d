"""The `scd` command: parses arguments and hands each command to one library call."""

from __future__ import annotations

from typing import Optional

import typer

import scd
from scd_cli import (
    bench,
    common,
    convert,
    encode,
    evaluate,
    generate,
    info,
    play,
    train,
)

# rich_markup_mode=None: help text is shown as written ("repo id[@revision]" is not markup) and
# flags are not given a "<bool>" value they do not take
app = typer.Typer(name="scd", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Streaming video generation with Separable Causal Diffusion.")


def _version(value: bool):
    if value:
        common.console.print(f"scd {scd.__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
):
    common.state["debug"] = debug


# the commands, in the order `scd --help` lists them
app.command()(generate.generate)
app.command()(play.play)
app.command()(bench.bench)
app.command()(info.info)
app.command()(convert.convert)
app.command()(encode.encode)
app.command()(train.train)
app.command("eval")(evaluate.eval_command)
app.command()(info.download)


def main() -> None:
    app()


if __name__ == "__main__":  # `accelerate launch -m scd_cli.app train ...`
    main()
