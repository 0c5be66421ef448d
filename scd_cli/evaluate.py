"""`scd eval`: PSNR / SSIM against ground truth, SCD vs its baseline vs copy-last-frame."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from scd import files
from scd.checkpoints import load_model
from scd.devices import use_threads
from scd.errors import ConfigError
from scd.evaluate import evaluate, score_recording
from scd_cli.common import Threads, console, handles_errors


PER_FRAME_SHOWN = 32  # frames up to which the table lists PSNR per frame


@handles_errors
def eval_command(
    model: Optional[str] = typer.Option(None, "--model", help="SCD model (default: the embedded one)."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Baseline model (default: the embedded one)."),
    clips: int = typer.Option(64, "--clips", help="Held-out clips."),
    context: int = typer.Option(8, "--context", help="Context frames given to the models."),
    frames: int = typer.Option(16, "--frames", help="Frames generated and scored (1000: the long horizon, tracked by horizon)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps (default: each model's)."),
    guidance: Optional[float] = typer.Option(None, "--guidance"),
    seed: int = typer.Option(0, "--seed"),
    samples: Optional[int] = typer.Option(None, "--samples", help="Samples drawn per frame; their per-pixel median is kept and fed back (default: each model's; docs/training.md, 'The median of samples')."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the scores as JSON."),
    recording: Optional[Path] = typer.Option(None, "--recording", help="Score a recorded play instead (scd play --record's MP4 or JSON; its PNG frames when --record-frames kept them) against the world it played."),
    threads: Threads = None,
):
    """Score models on held-out clips of the synthetic world, or a recorded play of one."""
    if json_path is not None:
        files.check_output(json_path, "JSON report")
    if recording is not None:
        if model is not None or baseline is not None:
            raise ConfigError("--recording scores the frames a play recorded: drop --model and --baseline", "recording")
        result = score_recording(recording)
        show_recording(result)
        if json_path is not None:
            files.write_text(json_path, json.dumps(result, indent=2) + "\n", what="JSON report")
        return
    use_threads(threads)
    models = {"scd": load_model(model, arch="scd"), "baseline": load_model(baseline if baseline else None, arch="baseline")}
    result = evaluate(models, clips, context, frames, steps, guidance, seed, samples)
    table = Table(title=f"{clips} held-out clips, {context} context frames, {frames} generated")
    per_frame = frames <= PER_FRAME_SHOWN  # longer rollouts: per frame in the JSON, by horizon below
    for col in ("predictor", "PSNR dB", "SSIM", "steps", "samples", f"agent within 2 px at frame {frames}") + (("PSNR per frame",) if per_frame else ()):
        table.add_column(col)
    for name in ("scd", "baseline", "copy_last_frame", "object_free"):
        r = result[name]
        table.add_row(name, f"{r['psnr']:.2f}", f"{r['ssim']:.4f}", str(r.get("steps", "-")), str(r.get("samples", "-")),
                      f"{100 * r['agent_hit_rate_last']:.0f}%",
                      *((" ".join(f"{v:.1f}" for v in r["psnr_per_frame"]),) if per_frame else ()))
    console.print(table)
    names = ("scd", "baseline", "copy_last_frame", "object_free")
    by = Table(title="by horizon: % of clips with the agent / red ball / green ball within 2 px at generated frame N; "
                     "PSNR over frames")
    by.add_column("")
    for name in names:
        by.add_column(name)
    for h in result["scd"]["horizons"]["hit_rate_at"]:
        by.add_row(f"frame {h}", *(" / ".join(f"{100 * v:.0f}" for v in result[n]["horizons"]["hit_rate_at"][h].values())
                                   for n in names))
    for span in result["scd"]["horizons"]["psnr_over"]:
        by.add_row(f"dB {span}", *(f"{result[n]['horizons']['psnr_over'][span]:.2f}" for n in names))
    margins = [result[n].get("margin_over_object_free") for n in names]
    by.add_row("worst 16 frames vs object-free", *(f"{m['worst_16_frames_db']:+.2f} dB (from {m['worst_block_starts_at']})"
                                                   if m else "-" for m in margins))
    console.print(by)
    console.print("copy_last_frame repeats the last context frame; object_free is the true static scene with every "
                  "moving object erased (what getting the background right is worth).", style="dim")
    if json_path is not None:
        files.write_text(json_path, json.dumps(result, indent=2) + "\n", what="JSON report")


def show_recording(result: dict) -> None:
    table = Table(title=f"{result['recording']}: {result['frames']} frames of {result['model']} (seed {result['seed']}) "
                        "against the world it played")
    for col in ("frames", "PSNR dB", "object-free dB", "agent kept", "red ball kept", "green ball kept"):
        table.add_column(col)
    for span, s in result["spans"].items():
        table.add_row(span, f"{s['psnr']:.2f}", f"{s['object_free_psnr']:.2f}",
                      *("-" if v is None else f"{100 * v:.0f}%" for v in s["kept"].values()))
    console.print(table)
    lost = ", ".join(f"{name} at frame {at}" if at else f"{name} never" for name, at in result["first_lost_at"].items())
    console.print(f"first lost: {lost}; worst 16 frames vs the object-free scene: "
                  f"{result['worst_16_frames_vs_object_free_db']:+.2f} dB (from frame {result['worst_block_starts_at']})")
    console.print("kept: the share of the frames showing the object that have it within 2 px of the truth.", style="dim")
    if result["lossy"]:
        console.print("read from the MP4 (4:2:0 colour): a perfect play read this way loses a ball behind the pillar "
                      "now and then; record with --record-frames for exact scores.", style="yellow")
