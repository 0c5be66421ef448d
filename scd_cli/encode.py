"""`scd encode VIDEOS --out DATASET`: encode a folder of videos into a latent dataset for `scd train`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from scd import dataset
from scd_cli.common import (
    Device,
    console,
    err_console,
    handles_errors,
    is_interactive,
    parse_size,
    say,
    state,
)


@handles_errors
def encode(
    videos: Path = typer.Argument(..., help="Folder of videos (or of class folders of videos), each with an optional NAME.actions.txt."),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset folder to write; encoding into it again continues or extends it."),
    model: Optional[str] = typer.Option(None, "--model", help="Encode through this model's codec, at its frame size, with its action names."),
    codec: Optional[str] = typer.Option(None, "--codec", help="A DC-AE instead of a model: a diffusers AutoencoderDC folder or a FAR .pth (with --codec-config)."),
    codec_config: Optional[str] = typer.Option(None, "--codec-config", help="The diffusers config json of a --codec .pth."),
    scaling_factor: Optional[float] = typer.Option(None, "--scaling-factor", help="Latent scaling of --codec (default: its config's, or FAR's 0.2889)."),
    frame_size: Optional[str] = typer.Option(None, "--frame-size", help="Size the videos are fitted to: N (square) or HxW (default: the model's)."),
    action_names: Optional[str] = typer.Option(None, "--action-names", help="Comma list of the actions NAME.actions.txt files use (default: the model's)."),
    num_actions: Optional[int] = typer.Option(None, "--num-actions", help="Actions without names: NAME.actions.txt files hold indices 0..N-1 (default: the model's)."),
    fit: str = typer.Option("crop", "--fit", help="crop, pad or stretch to the frame size."),
    dtype: str = typer.Option("float32", "--dtype", help="Storage of DC-AE latents: float32, bfloat16 or float16 (pixels: uint8)."),
    shard_mb: float = typer.Option(256.0, "--shard-mb", help="Shard size; memory holds about one shard."),
    min_frames: int = typer.Option(2, "--min-frames", help="Skip videos with fewer frames."),
    captions: Optional[Path] = typer.Option(None, "--captions", help="Text-conditioned models: a JSON object of video path (relative to VIDEOS) -> caption (default: the NAME.txt beside each video)."),
    clip_frames: int = typer.Option(81, "--clip-frames", help="Text-conditioned (Wan) models: video frames per clip, 1 + 4k (81: 21 latent frames); each clip goes through the VAE alone."),
    device: Device = "auto",
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the result line."),
):
    """Encode a folder of videos into a latent dataset (sharded safetensors + index)."""
    state["quiet"] = quiet
    names = tuple(n.strip() for n in action_names.split(",") if n.strip()) if action_names else None
    size = parse_size(frame_size, "--frame-size", square=True) if frame_size else None
    listed = dataset.read_captions(captions) if captions is not None else None
    encoding = dataset.encoding_for(model, codec, codec_config, scaling_factor, size, names, fit, dtype, device, num_actions,
                                    listed, clip_frames)
    try:
        report = draw(dataset.encode_folder(videos, out, encoding, shard_mb=shard_mb, min_frames=min_frames),
                      f"encode {videos.name}")
    except KeyboardInterrupt:  # every listed shard is whole: the same command continues
        err_console.print(f"the shards written so far are kept in {out}: run the same command to continue", soft_wrap=True)
        raise
    summarize(report)


def draw(events, title: str) -> dataset.EncodeReport:
    """A bar over the videos (or a line per shard when not a terminal); returns the report."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    live = is_interactive() and not state["quiet"]
    bar = Progress(TextColumn(title), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
                   TimeElapsedColumn(), console=console, disable=not live)
    task, skipped, truncated = None, 0, 0
    with bar:
        for event in events:
            if isinstance(event, dataset.EncodeStarted):
                if event.already:
                    say(f"continuing: {event.already} of {event.files} videos were encoded before")
                task = bar.add_task(title, total=event.files, completed=event.already, note="")
            elif isinstance(event, dataset.FileEncoded):
                skipped += event.skipped is not None
                truncated += event.truncated
                bar.update(task, advance=1, note=f"{skipped} skipped, {truncated} truncated")
            elif isinstance(event, dataset.ShardWritten) and not live:
                say(f"wrote {event.file}: {event.clips} clips, {event.bytes / 2 ** 20:.1f} MiB")
            elif isinstance(event, dataset.EncodeReport):
                return event
    raise AssertionError("encode_folder ends with its report")


def summarize(report: dataset.EncodeReport) -> None:
    for reason, files in report.skipped.items():
        names = ", ".join(source for source, _ in files[:3]) + (", ..." if len(files) > 3 else "")
        say(f"skipped {len(files)} ({reason}): {names}" + (f" - {files[0][1]}" if len(files) == 1 else ""))
    for source, detail in report.truncated[:5]:
        say(f"truncated (frames before the cut kept): {source}: {detail}")
    for source, detail in report.actions[:5]:
        say(f"actions: {source}: {detail}")
    if len(report.actions) > 5:
        say(f"actions: {len(report.actions) - 5} more videos whose action file does not list one action per frame")
    console.print(f"wrote {report.out}: {report.clips} clips, {report.frames} frames in {report.shards} shards "
                  f"({report.bytes / 2 ** 20:.1f} MiB); {sum(len(v) for v in report.skipped.values())} skipped, "
                  f"{len(report.truncated)} truncated", soft_wrap=True)
