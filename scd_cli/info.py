"""`scd info MODEL` and `scd download REF`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from scd.checkpoints import load_model
from scd.flops import compare, parameter_count
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
    arch = Table(show_header=False, box=None, pad_edge=False)
    rows = [("arch", c.arch), ("width", f"{c.width} ({c.num_heads} heads x {c.head_dim})"),
            ("layers", c.depth), ("decoder input", c.decoder_input or "-"),
            ("latents", f"{c.channels} x {c.latent_size[0]} x {c.latent_size[1]}, patch {c.patch_size}, {c.tokens_per_frame} tokens/frame"),
            ("rope axes", str(c.rope_axes)), ("condition", f"{c.condition} ({c.num_classes} + null)" if c.condition else "none"),
            ("frame", f"{c.frame_size[0]} x {c.frame_size[1]} @ {c.fps:g} fps, codec {c.codec.type}"),
            ("context", f"{c.context_frames} prompt frames; "
                        + (f"keeps the last {c.window} (its training window)" if c.window else "keeps every frame"))]
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


@handles_errors
def download(ref: str = typer.Argument(..., help="Hub repo id[@revision], or repo_id:path/in/repo[@revision] for one file.")):
    """Prefetch a model (or one file) from the Hugging Face Hub into the local cache."""
    from scd import hub

    hub_ref = hub.parse_hub_ref(ref)
    if hub_ref is None:
        console.print(f"{ref} is a local path: nothing to download")
        return
    if hub_ref.path_in_repo:
        path, revision = hub.fetch_file(hub_ref, prefetch=True)
    else:
        path, revision = hub.fetch_model_folder(hub_ref, prefetch=True)
    console.print(f"{hub_ref.repo_id} @ {revision} -> {path}")
