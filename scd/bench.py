"""SCD against its matched causal baseline, measured side by side in one process.

Both models get the same width, total depth, tokens per frame, context, steps, device and dtype.
Repetitions alternate SCD and baseline after warm-up, so machine noise hits both alike; every figure
is a median over repetitions, and the speed-up is a ratio measured in the same run.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from scd.checkpoints import LoadedModel
from scd.devices import dtype_name
from scd.errors import ConfigError
from scd.flops import frame_flops, parameter_count
from scd.generate import percentile
from scd.model import ModelConfig, build_model
from scd.sampling import kv_cache_bytes, stream


def default_config() -> ModelConfig:
    """The paper's structure (8 encoder + 4 decoder layers vs a 12-layer baseline) at a size a
    2-core CPU benches in minutes: width 256 (4 x 64), 8x8 latents of 16 channels (64 tokens)."""
    return ModelConfig(arch="scd", num_heads=4, head_dim=64, channels=16, patch_size=1, rope_axes=(16, 24, 24),
                       layers=12, decoder_layers=4, condition="action", num_classes=4, latent_size=(8, 8))


@dataclass
class Settings:
    context: int = 32
    steps: int = 16
    batch: int = 1
    frames: int = 4
    reps: int = 3
    warmup: int = 1
    guidance: float = 1.0


@dataclass
class Row:
    settings: dict
    scd: dict = field(default_factory=dict)
    baseline: dict = field(default_factory=dict)
    speedup: float = 0.0
    predicted_speedup: float = 0.0
    realised_fraction: float = 0.0


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 1024, reps: int = 5) -> float:
    """FLOP/s of a large square matmul on this device and dtype, measured now."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - start)
    return 2.0 * size ** 3 / min(times)


def _run_once(model, context: torch.Tensor, s: Settings) -> tuple[list[float], float]:
    """Per-frame latencies (ms) of one streamed run, and its wall time (s)."""
    start = time.perf_counter()
    latencies = [f.latency_ms for f in stream(model, context, s.frames, s.steps, s.guidance, seed=0)]
    return latencies, time.perf_counter() - start


def measure(models: dict[str, torch.nn.Module], s: Settings, device, dtype):
    """Interleaved repetitions; yields progress strings, returns per-model medians in a Row."""
    stats = {name: {"p50": [], "p95": [], "ttff": [], "fps": []} for name in models}
    config = next(iter(models.values())).config
    context = torch.randn(s.batch, s.context, config.channels, *config.latent_size, device=device, dtype=dtype)
    for rep in range(s.warmup + s.reps):
        for name, model in models.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            latencies, wall = _run_once(model, context, s)
            if rep < s.warmup:
                continue
            steady = latencies[1:] or latencies
            stats[name]["p50"].append(percentile(steady, 50))
            stats[name]["p95"].append(percentile(steady, 95))
            stats[name]["ttff"].append(latencies[0])
            stats[name]["fps"].append(s.frames * s.batch / wall)
            yield f"{name} rep {rep - s.warmup + 1}/{s.reps}: p50 {stats[name]['p50'][-1]:.1f} ms"
    row = Row(settings=asdict(s))
    for name, model in models.items():
        flops = frame_flops(model.config, s.context, s.steps, s.guidance)
        p50 = statistics.median(stats[name]["p50"])
        memory = (parameter_count(model) * torch.tensor([], dtype=dtype).element_size()
                  + kv_cache_bytes(model, s.batch, s.context + s.frames, s.guidance, dtype))
        if device.type == "cuda":
            memory = torch.cuda.max_memory_allocated(device)
        setattr(row, name, {
            "latency_ms_p50": p50, "latency_ms_p95": statistics.median(stats[name]["p95"]),
            "time_to_first_frame_ms": statistics.median(stats[name]["ttff"]),
            "frames_per_second": statistics.median(stats[name]["fps"]),
            "flops_per_frame": flops.total * s.batch, "achieved_flops_per_s": flops.total * s.batch / (p50 / 1000.0),
            "peak_memory_bytes": memory, "memory_source": "cuda allocator" if device.type == "cuda" else "weights + KV cache (analytic)",
            "parameters": parameter_count(model)})
    row.speedup = row.baseline["latency_ms_p50"] / row.scd["latency_ms_p50"]
    row.predicted_speedup = row.baseline["flops_per_frame"] / row.scd["flops_per_frame"]
    row.realised_fraction = row.speedup / row.predicted_speedup
    return row


def bench(config: ModelConfig | None = None, scd: LoadedModel | None = None, baseline: LoadedModel | None = None,
          contexts=(32,), steps=(16,), batches=(1,), frames: int = 4, reps: int = 3, warmup: int = 1,
          guidance: float = 1.0, device=torch.device("cpu"), dtype=torch.float32):
    """Run every combination of the sweeps. Yields progress strings; returns the result dict."""
    if scd is not None:
        config = scd.config
    config = config or default_config()
    if config.arch != "scd":
        raise ConfigError("bench takes an SCD model (its baseline is built to match, or given with --baseline)")
    if min(frames, reps) < 1 or warmup < 0 or min(contexts) < 1 or min(steps) < 1 or min(batches) < 1:
        raise ConfigError("frames, reps, context, steps and batch must be >= 1 (warmup >= 0)")
    torch.manual_seed(0)
    models = {"scd": scd.model if scd else build_model(config),
              "baseline": baseline.model if baseline else build_model(config.matched())}
    if models["baseline"].config.matched().layers != config.layers or models["baseline"].config.width != config.width:
        raise ConfigError("the baseline must have the SCD model's width and total depth")
    models = {k: m.to(device=device, dtype=dtype).eval() for k, m in models.items()}
    peak = matmul_peak(device, dtype)
    rows = []
    for c, k, b in itertools.product(contexts, steps, batches):
        row = yield from measure(models, Settings(c, k, b, frames, reps, warmup, guidance), device, dtype)
        for name in ("scd", "baseline"):
            getattr(row, name)["fraction_of_matmul_peak"] = getattr(row, name)["achieved_flops_per_s"] / peak
        rows.append(asdict(row))
    first = rows[0]
    return {"scd": first["scd"], "baseline": first["baseline"], "speedup": first["speedup"],
            "predicted_speedup": first["predicted_speedup"], "realised_fraction": first["realised_fraction"],
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "dtype": dtype_name(dtype), "matmul_peak_flops_per_s": peak, "torch": torch.__version__,
            "settings": {**first["settings"], "width": config.width, "layers": config.layers,
                         "encoder_layers": config.encoder_layers, "decoder_layers": config.decoder_layers,
                         "tokens_per_frame": config.tokens_per_frame}, "rows": rows}
