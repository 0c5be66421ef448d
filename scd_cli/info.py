"""`scd info MODEL` and `scd download REF`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from scd.checkpoints import load_model
from scd.flops import chunk_flops, compare, matched_config, parameter_count, stream_flops
from scd_cli.common import console, handles_errors


def _gflops(x: float) -> str:
    return f"{x / 1e9:,.3f}"


@handles_errors
def info(
    model: Optional[str] = typer.Argument(None, help="Model folder, Hub repo id[@rev], checkpoint (with --options), or empty for the embedded SCD model."),
    options: Optional[Path] = typer.Option(None, help="Options file of a reference (official SCD / FAR) checkpoint."),
    context: Optional[int] = typer.Option(None, help="Context frames for the FLOP count (default: the model's)."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps for the FLOP count (default: the model's)."),
):
    """Architecture, parameter counts and analytic FLOPs per generated frame, next to the matched counterpart."""
    loaded = load_model(model, options)
    c = loaded.config
    context = c.context_frames if context is None else context
    steps = c.default_steps if steps is None else steps
    console.print(f"[bold]{loaded.source}[/]" + (f" @ {loaded.revision}" if loaded.revision else ""))
    if matched_config(c) is None:  # a causal Wan2.1: no SCD counterpart it knows of
        _alone(loaded, context, steps)
        return
    if c.family == "wan":  # SCD from Wan, next to the causal Wan it came from
        _alone(loaded, context, steps, matched_config(c))
        return
    arch = Table(show_header=False, box=None, pad_edge=False)
    rows = [("arch", c.arch), ("width", f"{c.width} ({c.num_heads} heads x {c.head_dim})"),
            ("layers", c.depth), ("decoder input", c.decoder_input or "-"),
            ("latents", f"{c.channels} x {c.latent_size[0]} x {c.latent_size[1]}, patch {c.patch_size}, {c.tokens_per_frame} tokens/frame"),
            ("rope axes", str(c.rope_axes)), ("condition", f"{c.condition} ({c.num_classes} + null)" if c.condition else "none"),
            ("frame", f"{c.frame_size[0]} x {c.frame_size[1]} @ {c.fps:g} fps, codec {c.codec.type}"),
            ("context", f"{c.context_frames} prompt frames; "
                        + (f"keeps the last {c.window} (its training window)" if c.window else "keeps every frame")
                        + (f" and the first {c.sink_frames} (attention sinks, seen {c.sink_distance} frames before "
                           "the window)" if c.sink_frames else "")),
            ("sampling", f"{c.default_steps} steps" + (f", the median of {c.default_samples} samples per frame"
                                                       if c.default_samples > 1 else ", one sample per frame"))]
    parts = loaded.model.parts()
    split = ", ".join(f"{name} {parameter_count(part):,}" for name, part in parts.items())
    rows += [("parameters", f"{parameter_count(loaded.model):,}" + (f" ({split})" if len(parts) > 1 else ""))]
    for k, v in rows:
        arch.add_row(f"[dim]{k}[/]", v)
    console.print(arch)
    flops = Table(title=f"GFLOPs per generated frame ({context} context frames, {steps} steps, batch 1)")
    for col in ("model", "context pass", "denoising", "total"):
        flops.add_column(col, justify="right" if col != "model" else "left")
    comparison = compare(c, context, steps)
    for label, f in ((f"{c.arch} (this)", comparison.this), (f"{c.matched().arch} (matched)", comparison.matched)):
        flops.add_row(label, _gflops(f.context), _gflops(f.denoise), _gflops(f.total))
    console.print(flops)
    console.print(f"predicted SCD speed-up: [bold]{comparison.predicted_speedup:.2f}x[/]")


def _alone(loaded, context: int, steps: int, matched=None) -> None:
    """A chunked, text-conditioned model: its sizes, chunks, window, and FLOPs per chunk of its own;
    with its `matched` config (SCD from Wan: the causal Wan it came from) that one's FLOPs too, and
    the predicted speed-up by FLOPs and by ops (counted on shrunk copies of both)."""
    c = loaded.config
    window = (f"a rolling window of {c.local_attn_size} frames, {c.sink_size} sink"
              if c.local_attn_size is not None else "global attention (keeps every frame)")
    rows = [("arch", c.architecture), ("width", f"{c.dim} ({c.num_heads} heads x {c.head_dim}), ffn {c.ffn_dim}"),
            ("layers", c.depth),
            ("text", f"{c.text_len} tokens x {c.text_dim}") if c.condition == "text" else
            ("condition", f"actions ({c.num_classes} + null), each frame's added to its time embedding"),
            ("latents", f"{c.channels} x {c.latent_size[0]} x {c.latent_size[1]}, patch {tuple(c.patch_size)}, "
                        f"{c.tokens_per_frame} tokens/frame"),
            ("chunk", f"{c.chunk_frames} latent frames, {c.default_steps} steps ({', '.join(map(str, c.denoising_steps))})"),
            ("window", window),
            ("frame", f"{c.frame_size[0]} x {c.frame_size[1]} @ {c.fps:g} fps, codec {c.codec.type}"),
            ("parameters", f"{parameter_count(loaded.model):,}")]
    arch = Table(show_header=False, box=None, pad_edge=False)
    for k, v in rows:
        arch.add_row(f"[dim]{k}[/]", v)
    console.print(arch)
    n = c.chunk_frames
    flops = Table(title=f"GFLOPs per chunk of {n} latent frames ({steps} steps, batch 1)")
    for col in ("cached frames",) + (("model",) if matched else ()) + ("context pass", "denoising", "total", "per frame"):
        flops.add_column(col, justify="right")
    cached = [context] + ([c.local_attn_size] if c.local_attn_size is not None and context < c.local_attn_size else [])
    models = [("this", c), ("matched", matched)] \
        if matched else [(None, c)]
    for frames in cached:
        label = f"{frames}" + (" (window full)" if c.local_attn_size is not None and frames >= c.local_attn_size else "")
        for name, config in models:
            f = chunk_flops(config, frames, steps)
            flops.add_row(label, *([name] if name else []), _gflops(f.context), _gflops(f.denoise), _gflops(f.total),
                          _gflops(f.total / f.frames))
    console.print(flops)
    text = c.condition == "text"
    if matched is None:
        console.print((f"once per stream (text keys and values): {_gflops(stream_flops(c))} GFLOPs; " if text else "")
                      + "no matched counterpart to compare with")
        return
    from scd.bench import chunk_ops  # deferred: builds and profiles two shrunk copies

    console.print(f"matched: the causal Wan it came from, {matched.num_layers} blocks (its source depth)")
    if text:
        console.print(f"once per stream (text keys and values): {_gflops(stream_flops(c))} GFLOPs (this), "
                      f"{_gflops(stream_flops(matched))} (matched)")
    by_flops = [chunk_flops(matched, f, steps).total / chunk_flops(c, f, steps).total for f in cached]
    ops = chunk_ops(c, steps, context), chunk_ops(matched, steps, context)
    console.print("predicted SCD speed-up per chunk: [bold]"
                  + " / ".join(f"{x:.2f}x" for x in by_flops) + "[/] by FLOPs"
                  + (" (at " + " / ".join(map(str, cached)) + " cached frames)" if len(cached) > 1 else "")
                  + f", [bold]{ops[1] / ops[0]:.2f}x[/] by ops ({ops[0]:,} vs {ops[1]:,} aten ops per chunk)")


@handles_errors
def download(ref: str = typer.Argument(..., help="Hub repo id[@revision], or repo_id:path/in/repo[@revision] for one file. A Wan generator (gdhe17/Self-Forcing) brings its base's text encoder and VAE too.")):
    """Prefetch a model (or one file) from the Hugging Face Hub into the local cache."""
    from scd.checkpoints import download as prefetch

    fetched = prefetch(ref)
    if not fetched:
        console.print(f"{ref} is a local path: nothing to download")
    for what, revision, path in fetched:
        console.print(f"{what} @ {revision} -> {path}", soft_wrap=True)
