"""`scd bench`: SCD against its matched causal baseline on this device, interleaved in one run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from scd import bench as bench_lib
from scd import bench_report, files
from scd.errors import ConfigError
from scd_cli.common import (
    console,
    err_console,
    handles_errors,
    is_interactive,
    say,
    state,
)

PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def _ints(text: str, option: str, single: bool = False, minimum: int = 1) -> tuple[int, ...]:
    """A comma list of integers >= minimum (one integer if `single`), or a one-line ConfigError."""
    items = [v.strip() for v in str(text).split(",")]
    what = "an integer" if single else "a comma list of integers"
    try:
        values = tuple(int(v) for v in items)
    except ValueError:
        raise ConfigError(f"{option} takes {what}, got {text!r}") from None
    if single and len(values) != 1:
        raise ConfigError(f"{option} takes one integer, got {text!r}")
    if min(values) < minimum:
        raise ConfigError(f"{option} must be >= {minimum}, got {text!r}")
    return values


def _gflops(x: float) -> str:
    return f"{x / 1e9:,.2f}"


def _pair_rows(table: Table, s: dict, b: dict):
    """add(label, key, fmt, ratio=True): a row of both models' `key`, and b / s when `ratio`."""
    def add(label, key, fmt, ratio=True):
        x, y = s[key], b[key]
        table.add_row(label, fmt(x), fmt(y), f"{y / x:.2f}x" if ratio and x else "")
    return add


def _throughput_rows(table: Table, s: dict, b: dict) -> None:
    for batch in s["throughput_fps_by_batch"]:
        x, y = s["throughput_fps_by_batch"][batch], b["throughput_fps_by_batch"][batch]
        table.add_row(f"throughput at batch {batch}, frames/s", f"{x:,.2f}", f"{y:,.2f}", f"{x / y:.2f}x" if y else "")


def _achieved_rows(table: Table, s: dict, b: dict, peak: float) -> None:
    table.add_row("achieved GFLOP/s", _gflops(s["achieved_flops_per_s"]), _gflops(b["achieved_flops_per_s"]), "")
    table.add_row(f"  of matmul peak ({peak / 1e9:,.1f})", f"{100 * s['fraction_of_matmul_peak']:.0f}%",
                  f"{100 * b['fraction_of_matmul_peak']:.0f}%", "")


def _headline(report: dict) -> Table:
    """Metrics down, models across, for the headline setting."""
    s, b = report["scd"], report["baseline"]
    setting = report["setting"]
    peak = report["matmul_peak_flops_per_s"]
    table = Table(title=f"{setting['context']} context frames, {setting['steps']} steps, batch {setting['batch']}",
                  box=box.SIMPLE_HEAD)
    for col in ("", "SCD", "baseline", "baseline / SCD"):
        table.add_column(col, justify="left" if not col else "right")

    add = _pair_rows(table, s, b)
    add("latency per frame, p50 ms", "latency_ms_p50", "{:,.1f}".format)
    add("latency per frame, p95 ms", "latency_ms_p95", "{:,.1f}".format)
    add("  context pass, p50 ms", "context_ms_p50", "{:,.1f}".format)
    add("  denoising steps, p50 ms", "denoise_ms_p50", "{:,.1f}".format)
    _throughput_rows(table, s, b)
    add("time to first frame, ms", "time_to_first_frame_ms", "{:,.0f}".format)
    add("peak memory, MiB", "peak_memory_bytes", lambda v: f"{v / 2 ** 20:,.1f}", ratio=False)
    add("GFLOP per frame", "flops_per_frame", _gflops)
    add("ops per frame (aten, top level)", "ops_per_frame", "{:,}".format)
    if s.get("kernel_launches_per_frame") is not None:
        add("kernel launches per frame", "kernel_launches_per_frame", "{:,}".format)
    _achieved_rows(table, s, b, peak)
    return table


def _sweep(report: dict) -> Table:
    """One line per setting: the latencies and the speed-up, measured and predicted."""
    table = Table(title="every setting (p50 ms per frame)", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("context", "steps", "batch", "SCD", "baseline", "speed-up", "predicted", "realised"):
        table.add_column(col, justify="right")
    for row in report["rows"]:
        table.add_row(str(row["context"]), str(row["steps"]), str(row["batch"]),
                      f"{row['scd']['latency_ms_p50']:,.1f}", f"{row['baseline']['latency_ms_p50']:,.1f}",
                      f"[bold]{row['speedup']:.2f}x[/]", f"{row['predicted_speedup']:.2f}x",
                      f"{100 * row['realised_fraction']:.0f}%")
    return table


def _compiled(report: dict) -> Table:
    """Compiled against eager, both models, at the headline setting."""
    s, b = report["scd_compiled"], report["baseline_compiled"]
    table = Table(title=f"compiled ({report['compile']['backend']}"
                        f"{', ' + report['compile']['mode'] if report['compile']['mode'] else ''}) against eager",
                  box=box.SIMPLE_HEAD)
    for col in ("", "SCD", "baseline", "baseline / SCD"):
        table.add_column(col, justify="left" if not col else "right")
    table.add_row("latency per frame, p50 ms", f"{s['latency_ms_p50']:,.1f}", f"{b['latency_ms_p50']:,.1f}",
                  f"{report['compiled_pair']['speedup']:.2f}x")
    table.add_row("compiled over eager", f"{report['compiled_speedup']['scd']:.2f}x",
                  f"{report['compiled_speedup']['baseline']:.2f}x", "")
    table.add_row("ops per frame (aten, top level)", f"{s['ops_per_frame']:,}", f"{b['ops_per_frame']:,}", "")
    first = {r["model"]: r for r in report["compile"]["runs"]}
    table.add_row("first run (compiling), s", f"{first['scd_compiled']['first_run_s']:,.1f}",
                  f"{first['baseline_compiled']['first_run_s']:,.1f}", "")
    recompiles = sum(r.get("recompiles_while_measuring", 0) for r in report["compile"]["runs"]) // 2
    table.add_row("graphs compiled while measuring", str(recompiles), "", "")
    return table


def _show_alone(report: dict) -> None:
    """A model benched alone (no counterpart: the Wan family): per chunk and per frame, one column."""
    m, setting = report["model"], report["setting"]
    peak = report["matmul_peak_flops_per_s"]
    n = m["chunk_frames"]
    console.print(f"[bold]scd bench[/] on {report['device_name']} ({report['device']}, {report['dtype']}), "
                  f"torch {report['torch']}", soft_wrap=True)
    table = Table(title=f"{report['models']['model']['architecture']}: {setting['context']} context frames, "
                        f"{setting['steps']} steps, batch {setting['batch']}", box=box.SIMPLE_HEAD)
    table.add_column("")
    table.add_column("this model", justify="right")
    rows = [(f"latency per chunk of {n}, p50 ms", f"{m['latency_ms_per_chunk_p50']:,.1f}"),
            ("latency per chunk, p95 ms", f"{m['latency_ms_per_chunk_p95']:,.1f}"),
            ("  context pass, p50 ms", f"{m['context_ms_p50']:,.1f}"),
            ("  denoising steps, p50 ms", f"{m['denoise_ms_p50']:,.1f}"),
            ("latency per frame, p50 ms", f"{m['latency_ms_per_frame_p50']:,.1f}")]
    rows += [(f"throughput at batch {b}, frames/s", f"{x:,.2f}") for b, x in m["throughput_fps_by_batch"].items()]
    rows += [("time to first chunk, ms", f"{m['time_to_first_chunk_ms']:,.0f}"),
             ("GFLOP per chunk", _gflops(m["flops_per_chunk"])),
             ("  context pass / denoising", f"{_gflops(m['flops_context_pass'])} / {_gflops(m['flops_denoising'])}"),
             ("GFLOP once per stream (text K/V)", _gflops(m["flops_once_per_stream"])),
             ("ops per chunk (aten, top level)", f"{m['ops_per_chunk']:,}"),
             ("achieved GFLOP/s", _gflops(m["achieved_flops_per_s"])),
             (f"  of matmul peak ({peak / 1e9:,.1f})", f"{100 * m['fraction_of_matmul_peak']:.0f}%"),
             ("KV cache, MiB, first / last chunk", f"{m['cache_bytes_by_chunk'][0] / 2 ** 20:,.2f} / "
                                                   f"{m['cache_bytes_by_chunk'][-1] / 2 ** 20:,.2f}"
                                                   + (" (flat)" if m["cache_bytes_flat"] else "")),
             ("parameters + cache, MiB", f"{m['peak_memory_bytes'] / 2 ** 20:,.1f}")]
    measured = [b for _, b in m["memory_by_chunk"] if b is not None]
    if measured:
        rows.append(("memory in use, MiB, first / last chunk", f"{measured[0] / 2 ** 20:,.1f} / {measured[-1] / 2 ** 20:,.1f}"))
    for label, value in rows:
        table.add_row(label, value)
    console.print(table)
    if len(report["rows"]) > 1:
        sweep = Table(title=f"every setting (p50 ms per chunk of {n})", box=box.SIMPLE_HEAD)
        for col in ("context", "steps", "batch", "chunk", "per frame", "GFLOP/s"):
            sweep.add_column(col, justify="right")
        for row in report["rows"]:
            r = row["model"]
            sweep.add_row(str(row["context"]), str(row["steps"]), str(row["batch"]), f"{r['latency_ms_per_chunk_p50']:,.1f}",
                          f"{r['latency_ms_per_frame_p50']:,.1f}", _gflops(r["achieved_flops_per_s"]))
        console.print(sweep)
    console.print(f"[dim]Latency: steady-state chunks (the first excluded), pooled over {report['settings']['reps']} "
                  f"reps, {report['settings']['frames']} frames a run; text: {report['settings']['text']}; memory: "
                  f"{m['peak_memory_method']}; matmul peak: {report['settings']['matmul_size']}-square {report['dtype']} "
                  "matmul, measured in this run. No matched counterpart: benched alone.[/]", soft_wrap=True)


def _show_chunk_pair(report: dict) -> None:
    """SCD-Wan against its causal Wan: per chunk, both models across, the speed-ups under."""
    s, b, setting = report["scd"], report["baseline"], report["setting"]
    peak = report["matmul_peak_flops_per_s"]
    n = s["chunk_frames"]
    console.print(f"[bold]scd bench[/] on {report['device_name']} ({report['device']}, {report['dtype']}), "
                  f"torch {report['torch']}", soft_wrap=True)
    table = Table(title=f"chunks of {n}: {setting['context']} context frames, {setting['steps']} steps, batch "
                        f"{setting['batch']}", box=box.SIMPLE_HEAD)
    for col in ("", "SCD-Wan", "causal Wan", "causal / SCD"):
        table.add_column(col, justify="left" if not col else "right")

    add = _pair_rows(table, s, b)
    add(f"latency per chunk of {n}, p50 ms", "latency_ms_per_chunk_p50", "{:,.1f}".format)
    add("latency per chunk, p95 ms", "latency_ms_per_chunk_p95", "{:,.1f}".format)
    add("  context pass, p50 ms", "context_ms_p50", "{:,.1f}".format)
    add("  denoising steps, p50 ms", "denoise_ms_p50", "{:,.1f}".format)
    add("latency per frame, p50 ms", "latency_ms_per_frame_p50", "{:,.1f}".format)
    _throughput_rows(table, s, b)
    add("time to first chunk, ms", "time_to_first_chunk_ms", "{:,.0f}".format)
    add("GFLOP per chunk", "flops_per_chunk", _gflops)
    add("ops per chunk (aten, top level)", "ops_per_chunk", "{:,}".format)
    if s.get("kernel_launches_per_chunk") is not None:
        add("kernel launches per chunk", "kernel_launches_per_chunk", "{:,}".format)
    add("parameters + cache, MiB", "peak_memory_bytes", lambda v: f"{v / 2 ** 20:,.1f}", ratio=False)
    _achieved_rows(table, s, b, peak)
    console.print(table)
    if len(report["rows"]) > 1:
        sweep = Table(title=f"every setting (p50 ms per chunk of {n})", box=box.SIMPLE_HEAD)
        for col in ("context", "steps", "batch", "SCD-Wan", "causal Wan", "speed-up", "predicted", "ops"):
            sweep.add_column(col, justify="right")
        for row in report["rows"]:
            sweep.add_row(str(row["context"]), str(row["steps"]), str(row["batch"]),
                          f"{row['scd']['latency_ms_per_chunk_p50']:,.1f}",
                          f"{row['baseline']['latency_ms_per_chunk_p50']:,.1f}", f"[bold]{row['speedup']:.2f}x[/]",
                          f"{row['predicted_speedup']:.2f}x", f"{row['ops_speedup']:.2f}x")
        console.print(sweep)
    bound = " (launch-bound: it follows the ops)" if report["launch_bound"] else ""
    console.print(f"SCD-Wan: [bold]{report['speedup']:.2f}x[/] faster per chunk than its causal Wan{bound}; its FLOPs "
                  f"predict {report['predicted_speedup']:.2f}x ({100 * report['realised_fraction']:.0f}% realised), its "
                  f"ops {report['ops_speedup']:.2f}x.")
    console.print(f"[dim]Latency: steady-state chunks (the first excluded), paired chunk by chunk, pooled over "
                  f"{report['settings']['reps']} reps, {report['settings']['frames']} frames a run; text: "
                  f"{report['settings']['text']}; matmul peak: {report['settings']['matmul_size']}-square "
                  f"{report['dtype']} matmul, measured in this run.[/]", soft_wrap=True)


def _show(report: dict) -> None:
    if report.get("alone"):
        _show_alone(report)
        return
    if report.get("chunked"):
        _show_chunk_pair(report)
        return
    console.print(f"[bold]scd bench[/] on {report['device_name']} ({report['device']}, {report['dtype']}, "
                  f"{report.get('threads')} CPU threads), torch {report['torch']}", soft_wrap=True)
    console.print(_headline(report))
    if "compiled_pair" in report:
        console.print(_compiled(report))
    if len(report["rows"]) > 1:
        console.print(_sweep(report))
    samples = report["settings"].get("samples", 1)
    each = f" (each frame the median of {samples} samples: SCD encodes once, the baseline runs {samples} streams)" if samples > 1 else ""
    console.print(
        f"SCD: [bold]{report['speedup']:.2f}x[/] faster per frame than its baseline{each}; its FLOPs predict "
        f"{report['predicted_speedup']:.2f}x, so {100 * report['realised_fraction']:.0f}% of the prediction is realised.",
        soft_wrap=True)
    if report.get("launch_bound"):
        console.print(f"The frames are launch-bound: the speed-up follows the ratio of ops per frame "
                      f"({report['ops_speedup']:.2f}x), "
                      "not of FLOPs; a larger batch, a wider model or compiled code lets FLOPs count.", soft_wrap=True)
    console.print(f"[dim]Latency: steady-state frames (the first excluded), pooled over {report['settings']['reps']} "
                  f"reps; first frame: context prefill + first frame; memory: {report['scd']['peak_memory_method']}; "
                  f"matmul peak: {report['settings']['matmul_size']}-square {report['dtype']} matmul, measured "
                  f"in this run.[/]", soft_wrap=True)


@handles_errors
def bench(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="An SCD (or baseline) model folder or Hub repo id[@rev]; an SCD-Wan is benched against its causal Wan (--baseline, else random weights of its source depth) with random text embeddings; a causal Wan2.1 alone. Default: random weights."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="The baseline model to compare against. Default: the matched config of --model, random weights."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Reference size B, M, L or XL with random weights: 64 tokens/frame, 144 context frames, 50 steps (for GPUs); or WAN-1.3B: Wan2.1-T2V-1.3B at 480x832 as Self-Forcing streams it (chunks of 3, 4 steps), random weights, benched alone; or SCD-WAN-1.3B: the paper's SCD split of it (encoder 0-24, decoder 0-4 + 25-29) against WAN-1.3B, interleaved."),
    context: Optional[str] = typer.Option(None, "--context", metavar="N[,N...]", help=f"Context frames; a comma list sweeps (default {bench_lib.DEFAULT_CONTEXT}; preset {bench_lib.PRESET_CONTEXT}; a model's own)."),
    steps: Optional[str] = typer.Option(None, "--steps", metavar="K[,K...]", help=f"Denoising steps; a comma list sweeps (default {bench_lib.DEFAULT_STEPS}; preset {bench_lib.PRESET_STEPS}; a model's own)."),
    batch: Optional[str] = typer.Option(None, "--batch", metavar="B[,B...]", help="Batch sizes; one row each (default 1,4 on CPU, 1,8 on GPUs)."),
    frames: str = typer.Option("4", "--frames", metavar="N", help="Frames per run: the first is the time to first frame, the rest steady state (>= 2); a chunked (Wan) model: latent frames, rounded up to whole chunks, at least 2."),
    reps: str = typer.Option("3", "--reps", metavar="N", help="Measured repetitions per row (medians over them)."),
    warmup: str = typer.Option("1", "--warmup", metavar="N", help="Unmeasured repetitions before each row."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bfloat16 on CUDA, float32 elsewhere), float32, bfloat16, float16."),
    threads: Optional[str] = typer.Option(None, "--threads", metavar="N", help="CPU threads for torch (default: the CPUs the rest of the machine leaves idle, at least 1, as every command; see docs/reliability.md)."),
    seed: str = typer.Option("0", "--seed", metavar="N", help="Seed of the random weights and context."),
    matmul_size: Optional[str] = typer.Option(None, "--matmul-size", metavar="N", help="Side of the square matmul that measures the device's peak (default 2048 on CPU, 4096 MPS, 8192 CUDA)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the full report as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Latency against context and steps, both models, as PNG/SVG/PDF (needs matplotlib)."),
    compile: bool = typer.Option(False, "--compile", help="Also stream each model through torch.compile (static shapes; CUDA graphs on CUDA), interleaved with eager: compiled vs eager in one run. The first compiled run (compiling) is timed apart."),
    chunk_frames: Optional[str] = typer.Option(None, "--chunk-frames", metavar="N", help="Wan models: stream chunks of N latent frames, overriding both models' own (1: frame-wise, the paper's comparison)."),
    samples: int = typer.Option(1, "--samples", help="Samples drawn per frame, their median kept (as scd generate --samples): SCD encodes once for all of them, the baseline runs K streams."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors (use with --json)."),
):
    """Measure SCD against its matched causal baseline: latency, throughput, first frame, memory, FLOPs, speed-up."""
    state["quiet"] = quiet
    spec = bench_lib.BenchSpec(
        model=model, baseline=baseline, preset=preset,
        contexts=_ints(context, "--context") if context is not None else None,
        steps=_ints(steps, "--steps") if steps is not None else None,
        batches=_ints(batch, "--batch") if batch is not None else None,
        frames=_ints(frames, "--frames", single=True, minimum=2)[0], reps=_ints(reps, "--reps", single=True)[0],
        warmup=_ints(warmup, "--warmup", single=True, minimum=0)[0], device=device, dtype=dtype,
        seed=_ints(seed, "--seed", single=True, minimum=0)[0],
        threads=_ints(threads, "--threads", single=True)[0] if threads is not None else None,
        matmul_size=_ints(matmul_size, "--matmul-size", single=True)[0] if matmul_size is not None else None,
        compiled=compile, chunk_frames=_ints(chunk_frames, "--chunk-frames", single=True)[0] if chunk_frames else None,
        samples=samples)
    spec.validate()
    # fail now, not after minutes of measuring
    if json_path is not None:
        files.check_output(json_path, "JSON report")
    if plot is not None:
        if plot.suffix.lower() not in PLOT_SUFFIXES:
            raise ConfigError(f"--plot writes {', '.join(PLOT_SUFFIXES)} files, not {plot.name!r}")
        files.check_output(plot, "plot")
        bench_report.require_matplotlib()

    progress = None
    report = None
    events = bench_lib.run(spec)
    try:
        for event in events:
            if isinstance(event, bench_lib.Started):
                for warning in event.warnings:
                    err_console.print(f"[yellow]warning:[/] {warning}")
                models = f"{event.scd}, alone" if event.alone else f"SCD {event.scd} vs baseline {event.baseline}"
                say(f"[bold]scd bench[/] on {event.device_name} ({event.device}, {event.dtype}, {event.threads} CPU threads): "
                    f"{models}; {len(event.rows)} setting(s)")
                if is_interactive() and not quiet:
                    total = len(event.rows) * (spec.warmup + spec.reps) * (1 if event.alone else 4 if compile else 2)
                    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                        TimeElapsedColumn(), console=console, transient=True)
                    progress.start()
                    task = progress.add_task("warming up", total=total)
            elif isinstance(event, bench_lib.Measured):
                s = event.setting
                line = (f"context {s['context']}, {s['steps']} steps, batch {s['batch']} "
                        f"({event.row + 1}/{event.rows}) {'warm-up' if event.warmup else 'rep'} "
                        f"{event.rep + 1 - (0 if event.warmup else spec.warmup)}: {event.model} "
                        f"{event.latency_ms:,.1f} ms/{event.per}, first {event.per} {event.time_to_first_frame_ms:,.0f} ms")
                if progress is not None:
                    progress.update(task, advance=1, description=line)
                else:
                    say(f"[dim]{line}[/]")
            elif isinstance(event, bench_lib.CompiledRun):
                line = f"{event.model}: first run (compiling) {event.seconds:,.1f} s"
                if progress is not None:
                    progress.update(task, description=line)
                else:
                    say(f"[dim]{line}[/]")
            elif isinstance(event, bench_lib.Finished):
                report = event.report
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep the settings measured so far
        if report is None:
            try:  # interrupted here, between events: the library answers with the rows it has
                event = events.throw(KeyboardInterrupt())
                report = event.report if isinstance(event, bench_lib.Finished) else None
            except KeyboardInterrupt:
                pass
        if progress is not None:
            progress.stop()
            progress = None
        if report is not None:
            _write(report, json_path, plot, quiet)
            err_console.print(f"interrupted after {len(report['rows'])} setting(s); the report holds those")
        raise
    finally:
        if progress is not None:
            progress.stop()
    _write(report, json_path, plot, quiet)


def _write(report: dict, json_path: Optional[Path], plot: Optional[Path], quiet: bool) -> None:
    if json_path is not None:
        bench_report.write_json(report, json_path)
    if plot is not None:
        bench_report.plot(report, plot)
    if not quiet:
        _show(report)
        for path in (json_path, plot):
            if path is not None:
                say(f"wrote {path}")
