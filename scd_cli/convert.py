"""`scd convert SRC --out DIR`: port a FAR / FAR_Long / official SCD checkpoint or an scd baseline
folder into an scd model folder, and show what happened to every tensor."""

from __future__ import annotations

import re
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from scd import convert as conversion
from scd.errors import ConfigError
from scd.reference import SizeHints
from scd_cli.common import console, err_console, handles_errors, say, state

ACTION_STYLES = {conversion.MAPPED: "green", conversion.CREATED: "yellow", conversion.DROPPED: "red"}


def _ints(text: str | None, count: tuple[int, ...], flag: str) -> tuple[int, ...] | None:
    """'8' -> (8, 8) for a size, '16,24,24' -> (16, 24, 24): comma, 'x' or space separated."""
    if text is None:
        return None
    parts = re.split(r"\s*[,x]\s*|\s+", text.strip())
    if not parts or not all(p.isdigit() for p in parts) or len(parts) not in count:
        need = " or ".join(str(n) for n in count)
        raise ConfigError(f"{flag} takes {need} positive integers (like {'8x8' if 2 in count else '16,24,24'}), not {text!r}")
    values = tuple(int(p) for p in parts)
    return values * 2 if len(values) == 1 else values


def _table(report: conversion.ConversionReport) -> tuple[Table, int]:
    """The table of every tensor, and the width it needs unwrapped."""
    table = Table(title=f"{report.source} -> {report.folder}", title_justify="left")
    rows = [(e.target or "-", e.source or "-", e.action, " x ".join(map(str, e.shape)) or "scalar", e.note)
            for e in report.entries]
    totals = [(action, "", f"{tensors} tensors", f"{params:,} parameters", "")
              for action, (tensors, params) in report.totals().items()]
    for column in ("target", "source", "action", "shape", "note"):
        table.add_column(column, justify="right" if column == "shape" else "left", no_wrap=column != "note")
    for target, source, action, shape, note in rows:
        style = ACTION_STYLES[action]
        table.add_row(target, source, f"[{style}]{action}[/]", shape, f"[dim]{note}[/]")
    table.add_section()
    for action, _, tensors, params, _ in totals:
        table.add_row(f"[bold]{action}[/]", "", f"[{ACTION_STYLES[action]}]{tensors}[/]", params, "")
    widths = [max(len(r[i]) for r in rows + totals + [("target", "source", "action", "shape", "note")]) for i in range(5)]
    return table, sum(widths) + 3 * len(widths) + 1


@handles_errors
def convert(
    source: str = typer.Argument(..., help="FAR / FAR_Long .pth, official SCD ema.pth or accelerate model.safetensors (or its folder), an scd model folder, a causal Wan2.1 checkpoint (Self-Forcing .pt, Wan2.1 or diffusers safetensors; with --base), or a Hub reference owner/name:path/in/repo@revision."),
    out: Path = typer.Option(..., "--out", "-o", help="Model folder to write."),
    options: Optional[str] = typer.Option(None, "--options", help="The checkpoint's options file (YAML; local or owner/name:path@rev). Needed for official SCD checkpoints; FAR sizes are otherwise read off the tensors."),
    to: str = typer.Option("scd", "--to", help="scd: split a baseline into encoder + decoder (SCD sources are re-saved); baseline: re-save a baseline as it is."),
    encoder_layers: Optional[int] = typer.Option(None, "--encoder-layers", help="Baseline blocks 0..K-1 that become the encoder (default: two thirds, 8 of 12)."),
    decoder_layers: Optional[int] = typer.Option(None, "--decoder-layers", help="Baseline blocks K..K+L-1 that become the decoder (default: one third, 4 of 12). K + L = the baseline's depth."),
    encoder_blocks: Optional[str] = typer.Option(None, "--encoder-blocks", help="Baseline blocks that become the encoder's, by index, like 0-24 (blocks may repeat or be skipped; default: the rest)."),
    decoder_blocks: Optional[str] = typer.Option(None, "--decoder-blocks", help="Baseline blocks that become the decoder's, like 0-4,25-29 (the paper's recipe for 30 blocks)."),
    decoder_combine: Optional[str] = typer.Option(None, "--decoder-combine", help="How the decoder takes the encoder's features: token_concat (default), add, concat, token_concat_with_proj."),
    encoder_input: Optional[str] = typer.Option(None, "--encoder-input", help="SCD from Wan: what the encoder sees of the frame being made: noise (default, the paper: a noised frame in training, pure noise when generating) or none."),
    encoder_norm: Optional[str] = typer.Option(None, "--encoder-norm", help="The encoder's output norm: identity (default; plain LayerNorm, the reference init) or copy (the baseline's output norm)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="FAR size preset B, M, L or XL, checked against the tensors (without --options)."),
    heads: Optional[int] = typer.Option(None, "--heads", help="Attention heads (without --options; read off the tensors when left out)."),
    head_dim: Optional[int] = typer.Option(None, "--head-dim", help="Head dim (without --options)."),
    layers: Optional[int] = typer.Option(None, "--layers", help="Baseline depth (without --options)."),
    channels: Optional[int] = typer.Option(None, "--channels", help="Latent channels (without --options)."),
    patch_size: Optional[int] = typer.Option(None, "--patch-size", help="Patch size (without --options; default 1, as every FAR preset)."),
    rope_axes: Optional[str] = typer.Option(None, "--rope-axes", help="RoPE dims per (frame, row, col), like 16,24,24 (without --options; default FAR's 1/4, 3/8, 3/8 of the head dim)."),
    latent_size: Optional[str] = typer.Option(None, "--latent-size", help="Latent frame size, like 8 or 8x8 (default: the options' sample_size, else 8)."),
    codec: Optional[str] = typer.Option(None, "--codec", help="Attach a DC-AE: a diffusers AutoencoderDC folder, or FAR's DC-AE .pth with --codec-config (local or Hub)."),
    codec_config: Optional[str] = typer.Option(None, "--codec-config", help="diffusers config.json of a DC-AE given as a .pth."),
    scaling_factor: Optional[float] = typer.Option(None, "--scaling-factor", help="Latent scaling factor (default: the codec's config, else FAR's 0.2889)."),
    downsample: Optional[int] = typer.Option(None, "--downsample", help="Pixels per latent when no codec is attached (default 8; FAR's Minecraft: 16)."),
    fps: Optional[float] = typer.Option(None, "--fps", help="Frame rate recorded in config.json."),
    action_names: Optional[str] = typer.Option(None, "--action-names", help="Names of the model's actions or classes, comma separated, one per class (for --actions / --label by name)."),
    base: Optional[str] = typer.Option(None, "--base", help="A causal Wan2.1 source's base: a folder in the layout of Wan-AI/Wan2.1-T2V-1.3B-Diffusers or that Hub repo (owner/name@revision); its transformer/config.json gives the sizes."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out folder."),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", help="Upload the folder to this Hub repo (owner/name); needs HF_TOKEN with write access."),
    private: bool = typer.Option(False, "--private", help="Create the Hub repo private."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print no table, only the result line."),
):
    """Port a causal-diffusion checkpoint (FAR, FAR_Long, official SCD, scd baseline) into an scd model folder."""
    state["quiet"] = quiet
    split = conversion.Split(encoder_layers, decoder_layers, encoder_blocks, decoder_blocks, decoder_combine, encoder_norm)
    sizes = SizeHints(preset, heads, head_dim, layers, channels, patch_size, _ints(rope_axes, (3,), "--rope-axes"),
                      _ints(latent_size, (1, 2), "--latent-size"))
    names = None if action_names is None else tuple(n.strip() for n in action_names.split(",") if n.strip())
    kwargs = dict(options=options, to=to, split=split, sizes=sizes,
                  codec=conversion.CodecSpec(codec, codec_config, scaling_factor, downsample), fps=fps,
                  action_names=names, overwrite=overwrite, push_to_hub=push_to_hub, private=private, base=base, encoder_input=encoder_input)
    with err_console.status(f"converting {source}", spinner="dots") if not quiet else nullcontext():
        report = conversion.convert(source, out, **kwargs)
    if not quiet:
        table, width = _table(report)
        # piped output keeps every tensor name on one line; a terminal folds to its width
        wide = console if console.is_terminal else Console(width=max(width, console.width), highlight=False)
        wide.print(table)
        for note in report.notes:
            say(f"[dim]note:[/] {note}")
    c = report.config
    arch = c.architecture
    mapped, created, dropped = (report.totals()[a][0] for a in (conversion.MAPPED, conversion.CREATED, conversion.DROPPED))
    console.print(f"wrote [bold]{report.folder}[/]: {arch}, codec {c.codec.type}, from a {report.description} "
                  f"(sha256 {report.sha256[:12]}); {mapped} mapped, {created} created, {dropped} dropped", soft_wrap=True)
    if report.pushed:
        console.print(f"pushed to [bold]{report.pushed}[/]", soft_wrap=True)
