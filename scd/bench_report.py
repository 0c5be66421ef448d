"""What `scd bench` makes of its measurements: per-model summaries, the speed-ups, the JSON report
and the latency plot. Arithmetic on recorded times only; the timing itself is `scd.bench`.

Report format 2 (`report_version`; format 1 before it): `context_pass_ms_p50` and
`denoising_ms_p50` are now `context_ms_p50` and `denoise_ms_p50` (the names `scd.sampling.Frame`
uses); new per model: `ops_per_frame`, `kernel_launches_per_frame`; with compiled runs,
`scd_compiled` / `baseline_compiled` summaries, `compiled_speedup` and `compile`. Added since,
without a new version: `ops_speedup` and `launch_bound` per row and in the headline; a model
benched alone (no counterpart: the Wan family) has `alone: true` and one summary, `model`, per
chunk (`summarise_chunks`) in place of `scd`, `baseline` and the speed-ups. A chunked pair (SCD
from Wan against its causal Wan) has `chunked: true` and `scd`, `baseline` summaries per chunk
(`summarise_chunks`) with the same speed-ups, read per chunk (`chunk_row_result`).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from scd import files
from scd.errors import ConfigError
from scd.metrics import percentile

REPORT_VERSION = 2
# a speed-up realising less than this share of its FLOP prediction, and within this of the ratio of
# ops per frame, is read as launch-bound
LAUNCH_BOUND_REALISED, LAUNCH_BOUND_MATCH = 0.9, 0.15


@dataclass
class RunTimes:
    """One streamed run: time to first frame and the later frames' (context, denoise) ms."""

    time_to_first_frame_ms: float
    steady: list[tuple[float, float]]
    peak_memory_bytes: int | None  # allocated during the run (CUDA only)

    @property
    def latencies(self) -> list[float]:
        return [e + d for e, d in self.steady]


def summarise_model(runs: list[RunTimes], batch: int, flops: dict, parameters: int, memory: tuple[int, str],
                    ops: dict, peak: float) -> dict:
    """One model's figures in one row: latency percentiles (steady frames pooled over reps), its
    context/denoise split, throughput, first frame, memory (bytes, method), FLOPs, achieved FLOP/s
    against the matmul `peak`, and ops per frame."""
    latencies = [x for r in runs for x in r.latencies]
    out = {
        "latency_ms_p50": percentile(latencies, 50),
        "latency_ms_p95": percentile(latencies, 95),
        "latency_ms_min": min(latencies),
        "context_ms_p50": percentile([e for r in runs for e, _ in r.steady], 50),
        "denoise_ms_p50": percentile([d for r in runs for _, d in r.steady], 50),
        "latency_ms_per_rep": [statistics.median(r.latencies) for r in runs],
        "frames_per_second": statistics.median(batch * len(r.steady) * 1000.0 / sum(r.latencies) for r in runs),
        "time_to_first_frame_ms": statistics.median(r.time_to_first_frame_ms for r in runs),
        "parameters": parameters,
        "peak_memory_bytes": memory[0],
        "peak_memory_method": memory[1],
        **flops,
        **ops,
    }
    out["achieved_flops_per_s"] = out["flops_per_frame"] * batch / (out["latency_ms_p50"] / 1000.0)
    out["fraction_of_matmul_peak"] = out["achieved_flops_per_s"] / peak
    return out


def summarise_chunks(runs: list[RunTimes], batch: int, chunk_frames: int, flops: dict, parameters: int,
                     parameter_bytes: int, cache_bytes: list[int], cache_flat: bool, memory: list[list], ops: dict,
                     peak: float) -> dict:
    """A chunked model benched alone, one row: latency per chunk (steady chunks pooled over reps)
    and per frame, its context/denoise split, throughput, time to first chunk, FLOPs per chunk
    (`flops`), achieved FLOP/s against the matmul `peak`, the analytic KV cache after every chunk
    of the last run (`cache_bytes`) beside the memory measured then (`memory`: [frames, bytes]),
    whether a longer stream's cache would be no larger (`cache_flat`: a rolling window), and ops per chunk."""
    latencies = [x for r in runs for x in r.latencies]
    out = {
        "chunk_frames": chunk_frames,
        "latency_ms_per_chunk_p50": percentile(latencies, 50),
        "latency_ms_per_chunk_p95": percentile(latencies, 95),
        "latency_ms_per_chunk_min": min(latencies),
        "latency_ms_per_frame_p50": percentile(latencies, 50) / chunk_frames,
        "context_ms_p50": percentile([e for r in runs for e, _ in r.steady], 50),
        "denoise_ms_p50": percentile([d for r in runs for _, d in r.steady], 50),
        "latency_ms_per_rep": [statistics.median(r.latencies) for r in runs],
        "frames_per_second": statistics.median(batch * chunk_frames * len(r.steady) * 1000.0 / sum(r.latencies)
                                               for r in runs),
        "time_to_first_chunk_ms": statistics.median(r.time_to_first_frame_ms for r in runs),
        "parameters": parameters,
        "parameter_bytes": parameter_bytes,
        "cache_bytes_by_chunk": cache_bytes,
        "cache_bytes_flat": cache_flat,
        "memory_by_chunk": memory,
        "peak_memory_bytes": parameter_bytes + max(cache_bytes),
        "peak_memory_method": "analytic: parameters + the KV cache at its largest (activations not counted)",
        **flops,
        "ops_per_chunk": ops["ops_per_frame"],
        "kernel_launches_per_chunk": ops["kernel_launches_per_frame"],
    }
    out["achieved_flops_per_s"] = out["flops_per_chunk"] * batch / (out["latency_ms_per_chunk_p50"] / 1000.0)
    out["fraction_of_matmul_peak"] = out["achieved_flops_per_s"] / peak
    return out


def make_alone_report(rows: list[dict], meta: dict, complete: bool) -> dict:
    """The JSON report of a model benched alone: the first row (first context and steps, smallest
    batch) as the headline `model`, with its throughput at every batch of that setting, every row
    under `rows`; each row's fraction of the matmul peak read against the run's median peak."""
    peak = meta["matmul_peak_flops_per_s"]
    for row in rows:
        row["model"]["fraction_of_matmul_peak"] = row["model"]["achieved_flops_per_s"] / peak
    head = min((r for r in rows if (r["context"], r["steps"]) == (rows[0]["context"], rows[0]["steps"])),
               key=lambda r: r["batch"])
    same = [r for r in rows if (r["context"], r["steps"]) == (head["context"], head["steps"])]
    model = dict(head["model"])
    model["throughput_fps_by_batch"] = {str(r["batch"]): r["model"]["frames_per_second"] for r in same}
    report = {"report_version": REPORT_VERSION, "alone": True, "model": model,
              "setting": {"context": head["context"], "steps": head["steps"], "batch": head["batch"]}}
    report.update(meta)
    report["rows"] = rows
    report["complete"] = complete
    return report


def paired_speedup(fast: list[RunTimes], slow: list[RunTimes]) -> dict:
    """slow / fast latency over the same frame of the same rep (measured back to back): the median,
    every pair, and per rep the ratio of medians."""
    pairs = [s_ms / f_ms for f, s in zip(fast, slow) for f_ms, s_ms in zip(f.latencies, s.latencies)]
    per_rep = [statistics.median(s.latencies) / statistics.median(f.latencies) for f, s in zip(fast, slow)]
    return {"speedup": statistics.median(pairs), "speedup_per_frame": pairs, "speedup_per_rep": per_rep}


def row_result(setting: dict, summaries: dict[str, dict], runs: dict[str, list[RunTimes]], extra: dict) -> dict:
    """One row: the setting, each model's summary, SCD's speed-up over the baseline (measured,
    FLOP-predicted, realised), the ratio of ops per frame (`ops_speedup`: the speed-up of a device
    where every op costs the same) and whether the measured one is that rather than the FLOPs'
    (`launch_bound`), and, for compiled runs, each model's compiled speed-up over eager."""
    result = dict(setting)
    result["settings"] = {**setting, **extra}
    result.update(summaries)
    result.update(paired_speedup(runs["scd"], runs["baseline"]))
    result["predicted_speedup"] = summaries["baseline"]["flops_per_frame"] / summaries["scd"]["flops_per_frame"]
    result["realised_fraction"] = result["speedup"] / result["predicted_speedup"]
    # what a launch-bound device realises: every op costs about the same, whatever its FLOPs
    result["ops_speedup"] = summaries["baseline"]["ops_per_frame"] / summaries["scd"]["ops_per_frame"]
    result["launch_bound"] = (result["realised_fraction"] < LAUNCH_BOUND_REALISED
                              and abs(result["speedup"] / result["ops_speedup"] - 1) < LAUNCH_BOUND_MATCH)
    result["time_to_first_frame_speedup"] = (summaries["baseline"]["time_to_first_frame_ms"]
                                             / summaries["scd"]["time_to_first_frame_ms"])
    if "scd_compiled" in runs:
        compiled = paired_speedup(runs["scd_compiled"], runs["baseline_compiled"])
        result["compiled_pair"] = {"speedup": compiled["speedup"],
                                   "realised_fraction": compiled["speedup"] / result["predicted_speedup"]}
        result["compiled_speedup"] = {name: paired_speedup(runs[f"{name}_compiled"], runs[name])["speedup"]
                                      for name in ("scd", "baseline")}
    return result


def make_report(rows: list[dict], meta: dict) -> dict:
    """The JSON report: the first row (first context and steps, smallest batch) as the headline,
    with each model's throughput at every batch of that setting, and every row under `rows`.
    `meta`: device, device_name, dtype, matmul_peak_flops_per_s, torch, scd_version, settings,
    models, warnings, and (compiled runs) compile."""
    head = min((r for r in rows if (r["context"], r["steps"]) == (rows[0]["context"], rows[0]["steps"])),
               key=lambda r: r["batch"])
    same = [r for r in rows if (r["context"], r["steps"]) == (head["context"], head["steps"])]
    models = {}
    names = [n for n in ("scd", "baseline", "scd_compiled", "baseline_compiled") if n in head]
    for name in names:
        models[name] = dict(head[name])
        models[name]["throughput_fps_by_batch"] = {str(r["batch"]): r[name]["frames_per_second"] for r in same}
    report = {"report_version": REPORT_VERSION, **models,
              "speedup": head["speedup"], "predicted_speedup": head["predicted_speedup"],
              "realised_fraction": head["realised_fraction"], "ops_speedup": head["ops_speedup"],
              "launch_bound": head["launch_bound"],
              "setting": {"context": head["context"], "steps": head["steps"], "batch": head["batch"]}}
    for key in ("compiled_pair", "compiled_speedup"):
        if key in head:
            report[key] = head[key]
    report.update(meta)
    report["rows"] = rows
    return report


def chunk_row_result(setting: dict, summaries: dict[str, dict], runs: dict[str, list[RunTimes]], extra: dict) -> dict:
    """One row of a chunked pair (SCD-Wan against its causal Wan, same chunk size): the setting,
    each model's `summarise_chunks`, the speed-up per chunk (paired chunks of the same rep), the
    FLOPs' prediction and the ops' (`ops_speedup`), the realised fraction, `launch_bound`, as
    `row_result` reads a frame-wise pair."""
    result = dict(setting)
    result["settings"] = {**setting, **extra}
    result.update(summaries)
    speedup = paired_speedup(runs["scd"], runs["baseline"])
    result.update({"speedup": speedup["speedup"], "speedup_per_chunk": speedup["speedup_per_frame"],
                   "speedup_per_rep": speedup["speedup_per_rep"]})
    scd, base = summaries["scd"], summaries["baseline"]
    result["predicted_speedup"] = base["flops_per_chunk"] / scd["flops_per_chunk"]
    result["realised_fraction"] = result["speedup"] / result["predicted_speedup"]
    result["ops_speedup"] = base["ops_per_chunk"] / scd["ops_per_chunk"]
    result["launch_bound"] = (result["realised_fraction"] < LAUNCH_BOUND_REALISED
                              and abs(result["speedup"] / result["ops_speedup"] - 1) < LAUNCH_BOUND_MATCH)
    result["time_to_first_chunk_speedup"] = base["time_to_first_chunk_ms"] / scd["time_to_first_chunk_ms"]
    return result


def make_chunk_pair_report(rows: list[dict], meta: dict, complete: bool) -> dict:
    """The JSON report of a chunked pair (`chunked: true`): `scd` and `baseline` summaries per chunk
    of the headline row (first context and steps, smallest batch) with their throughput at every
    batch of it, its speed-ups, every row under `rows`; fractions of the matmul peak read against
    the run's median peak."""
    peak = meta["matmul_peak_flops_per_s"]
    for row in rows:
        for name in ("scd", "baseline"):
            row[name]["fraction_of_matmul_peak"] = row[name]["achieved_flops_per_s"] / peak
    head = min((r for r in rows if (r["context"], r["steps"]) == (rows[0]["context"], rows[0]["steps"])),
               key=lambda r: r["batch"])
    same = [r for r in rows if (r["context"], r["steps"]) == (head["context"], head["steps"])]
    report = {"report_version": REPORT_VERSION, "chunked": True}
    for name in ("scd", "baseline"):
        report[name] = dict(head[name])
        report[name]["throughput_fps_by_batch"] = {str(r["batch"]): r[name]["frames_per_second"] for r in same}
    for key in ("speedup", "predicted_speedup", "realised_fraction", "ops_speedup", "launch_bound",
                "time_to_first_chunk_speedup"):
        report[key] = head[key]
    report["setting"] = {"context": head["context"], "steps": head["steps"], "batch": head["batch"]}
    report.update(meta)
    report["rows"] = rows
    report["complete"] = complete
    return report


def write_json(report: dict, path: Path) -> None:
    """Write the report atomically (a finished file or none), through the one safe writer."""
    files.write_text(path, json.dumps(report, indent=2) + "\n", ConfigError)


def require_matplotlib():
    """The pyplot module, or a ConfigError saying how to install the optional extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plot needs matplotlib (scd's optional extra 'plot'): pip install matplotlib",
                          parameter="plot") from None
    return plt


def plot(report: dict, path: Path) -> None:
    """Per-frame latency (p50, p95 as the bar) against context length and against steps, both
    models (or the one benched alone), at the smallest batch, into an image at `path` (format from
    its suffix)."""
    plt = require_matplotlib()
    rows = report["rows"]
    batch = min(r["batch"] for r in rows)
    rows = [r for r in rows if r["batch"] == batch]
    labels = {"scd": "SCD", "baseline": "baseline", "model": "this model"}
    models = (("model", "o"),) if report.get("alone") else (("scd", "o"), ("baseline", "s"))

    def latency(summary: dict) -> tuple[float, float]:  # per frame: a chunk's latency over its frames
        if "chunk_frames" in summary:
            n = summary["chunk_frames"]
            return summary["latency_ms_per_chunk_p50"] / n, summary["latency_ms_per_chunk_p95"] / n
        return summary["latency_ms_p50"], summary["latency_ms_p95"]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for ax, x_key, series_key, label in ((axes[0], "context", "steps", "context frames"),
                                         (axes[1], "steps", "context", "denoising steps")):
        for colour, series in enumerate(sorted({r[series_key] for r in rows})):
            for name, marker in models:  # one colour per series, SCD solid
                points = sorted((r[x_key], *latency(r[name])) for r in rows if r[series_key] == series)
                xs, p50, p95 = zip(*points)
                ax.errorbar(xs, p50, yerr=[[0] * len(xs), [b - a for a, b in zip(p50, p95)]], marker=marker,
                            capsize=3, color=f"C{colour % 10}", linestyle="-" if name == "scd" else "--",
                            label=f"{labels[name]}, {series} {series_key}")
        ax.set_xlabel(label)
        ax.set_ylabel("latency per frame, ms (p50, bar to p95)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"scd bench: {report['device_name']} ({report['dtype']}), batch {batch}")
    try:
        fig.savefig(path, dpi=120)
    except OSError as err:
        raise ConfigError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        plt.close(fig)
