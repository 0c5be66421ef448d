"""`scd bench`: SCD vs its matched causal baseline on this device, interleaved in one run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from scd import bench as bench_lib
from scd.checkpoints import load_model
from scd.devices import resolve_device, resolve_dtype
from scd.errors import ConfigError
from scd.model import preset as model_preset
from scd_cli.common import console, handles_errors, say


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--{name} takes a comma list of integers, got {text!r}") from None
    if not values:
        raise ConfigError(f"--{name} is empty")
    return values


def _plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'scd[plot]'") from None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("context", "steps")):
        for name in ("scd", "baseline"):
            pts = sorted({(r["settings"][key], r[name]["latency_ms_p50"]) for r in result["rows"]})
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel(key)
        ax.set_ylabel("latency per frame, p50 (ms)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


@handles_errors
def bench(
    preset: Optional[str] = typer.Option(None, "--preset", help="Reference size B, M, L or XL (64 tokens/frame, 144 context frames, 50 steps): for GPUs."),
    model: Optional[str] = typer.Option(None, "--model", help="Bench this SCD model folder / repo instead of random weights."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Its baseline (default: the matched config, random weights)."),
    context: Optional[str] = typer.Option(None, "--context", help="Context frames, a comma list to sweep (default 32; preset 144)."),
    steps: Optional[str] = typer.Option(None, "--steps", help="Denoising steps, a comma list (default 16; preset 50)."),
    batch: str = typer.Option("1", "--batch", help="Batch sizes, a comma list."),
    frames: int = typer.Option(4, "--frames", help="Frames generated per repetition."),
    reps: int = typer.Option(3, "--reps"),
    warmup: int = typer.Option(1, "--warmup"),
    guidance: float = typer.Option(1.0, "--guidance"),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Latency vs context and steps, as PNG (needs matplotlib)."),
):
    """Per-frame latency, throughput, FLOPs and the speed-up of SCD over its matched baseline."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    config = model_preset(preset, latent_size=(8, 8), condition="action", num_classes=4) if preset else None
    contexts = _ints(context, "context") if context else ((144,) if preset else (32,))
    step_list = _ints(steps, "steps") if steps else ((50,) if preset else (16,))
    scd_model = load_model(model) if model else None
    base_model = load_model(baseline, arch="baseline") if baseline else None
    runner = bench_lib.bench(config, scd_model, base_model, contexts, step_list, _ints(batch, "batch"), frames, reps,
                             warmup, guidance, dev, dt)
    while True:
        try:
            say(f"[dim]{next(runner)}[/]")
        except StopIteration as done:
            result = done.value
            break
    table = Table(title=f"scd bench on {result['device']} ({result['dtype']}), "
                        f"width {result['settings']['width']}, {result['settings']['tokens_per_frame']} tokens/frame")
    # ctx: context frames, K: steps, B: batch, TTFF: time to first frame, peak: share of matmul peak
    for col in ("ctx", "K", "B", "model", "p50 ms", "p95 ms", "TTFF ms", "frames/s", "GFLOP", "peak",
                "speed-up (pred.)"):
        table.add_column(col, justify="right")
    for row in result["rows"]:
        s = row["settings"]
        for name in ("scd", "baseline"):
            r = row[name]
            table.add_row(str(s["context"]), str(s["steps"]), str(s["batch"]), name, f"{r['latency_ms_p50']:.1f}",
                          f"{r['latency_ms_p95']:.1f}", f"{r['time_to_first_frame_ms']:.1f}", f"{r['frames_per_second']:.2f}",
                          f"{r['flops_per_frame'] / 1e9:.2f}", f"{100 * r['fraction_of_matmul_peak']:.0f}%",
                          f"{row['speedup']:.2f}x ({row['predicted_speedup']:.2f}x, {100 * row['realised_fraction']:.0f}%)"
                          if name == "scd" else "")
    console.print(table)
    if json_path is not None:
        try:
            json_path.write_text(json.dumps(result, indent=2) + "\n")
        except OSError as err:
            raise ConfigError(f"cannot write {json_path}: {err.strerror or err}") from None
    if plot is not None:
        _plot(result, plot)


def register(app: typer.Typer) -> None:
    app.command()(bench)
