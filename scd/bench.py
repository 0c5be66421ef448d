"""SCD against its matched causal baseline, measured side by side in one process.

Both models stream the same kind of random context through `scd.sampling.stream` (the loop that
`scd generate` runs) in lockstep after warm-up: each one's prefill and first frame, then frame 1 of
each, frame 2 of each, ..., the order flipping every frame and every rep. On a shared or throttling
machine neighbouring frames of the two models see the same load, and the speed-up is the median of
those neighbours' ratios. Each rep also times a large square matmul in the same dtype: the
device's matmul peak measured in this run, against which achieved FLOP/s are read. With
`compiled`, a compiled stream of each model joins the lockstep, so compiled against eager is read
the same way; each compiled model's first run (which compiles it) is timed apart.

SCD from Wan against its causal Wan (preset `SCD-WAN-1.3B`, or an SCD-Wan folder with the causal
one as baseline, else random weights of its source depth) streams chunk by chunk in the same
lockstep (`run_chunks_interleaved`), both with the same random text; the speed-up is the median of
paired chunks, read against the FLOPs' and the ops' predictions; `chunk_frames` streams both in
chunks of that size (1: frame-wise, the paper's comparison).

A model without a matched counterpart (a causal Wan2.1, `scd.flops.matched_config` None) is
benched alone (`run_chunks`): it streams chunks with random text embeddings of its `text_len` x
`text_dim`, and its report gives the latency per chunk and per frame, the context/denoise split,
FLOPs per chunk, achieved FLOP/s against the matmul measured in the same run, and the memory after
every chunk (a rolling window keeps the cache, and so the memory, flat).

`run` yields progress events and finally the report (a JSON-ready dict, made by
`scd.bench_report`); it never prints.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

import scd
from scd import checks, reference
from scd.bench_report import (
    RunTimes,
    chunk_row_result,
    make_alone_report,
    make_chunk_pair_report,
    make_report,
    row_result,
    summarise_chunks,
    summarise_model,
)
from scd.compiler import BACKENDS, compile_counts, compiler
from scd.devices import dtype_name, resolve_device, resolve_dtype, use_threads
from scd.errors import ConfigError
from scd.flops import chunk_flops, matched_config, parameter_count, stream_flops
from scd.models import ModelConfig, WanConfig, build_model, preset
from scd.models import config as config_module
from scd.sampling import kv_cache_bytes, stream

# The default bench: the paper's structure (8 encoder + 4 decoder blocks against a 12-block
# baseline, 64 tokens per frame) at a width and step count that a 2-core CPU runs in a few minutes.
DEFAULT_CONTEXT = 64
DEFAULT_STEPS = 20
# `--preset`: the reference sizes, meant for GPUs.
PRESET_CONTEXT = 144
PRESET_STEPS = 50
PRESETS = tuple(reference.PRESETS)
# `--preset WAN-1.3B`: Wan2.1-T2V-1.3B as Self-Forcing streams it (480x832, chunks of 3 latent
# frames, global attention, 4 steps) with random weights, benched alone; meant for GPUs
WAN_PRESETS = {f"WAN-{name.upper()}": sizes for name, sizes in config_module.WAN_PRESETS.items()}
# `--preset SCD-WAN-1.3B`: SCD from that Wan as the paper splits it (encoder blocks 0-24, decoder
# 0-4 and 25-29, token_concat, encoder input noise), random weights, against WAN-1.3B in one run
SCD_WAN_PRESETS = {f"SCD-{name}": sizes for name, sizes in WAN_PRESETS.items()}
MATMUL_SIZE = {"cpu": 2048, "mps": 4096, "cuda": 8192}


def default_config() -> ModelConfig:
    """4 heads x 64 (width 256), 12 blocks split 8 + 4, 8x8 latents of 32 channels (64 tokens/frame)."""
    return ModelConfig(num_heads=4, head_dim=64, channels=32, patch_size=1, rope_axes=(16, 24, 24), layers=12,
                       decoder_layers=4, latent_size=(8, 8), default_steps=DEFAULT_STEPS,
                       context_frames=DEFAULT_CONTEXT)


def wan_preset_config(name: str) -> WanConfig:
    """WAN-1.3B (the causal Wan) or SCD-WAN-1.3B (the paper's split of its 30 blocks)."""
    name = name.upper()
    if name in SCD_WAN_PRESETS:
        sizes = SCD_WAN_PRESETS[name]
        depth = sizes["num_layers"]
        k = max(1, round(depth / 6))  # as scd.convert.wan_split: 0..L-k-1 / 0..k-1, L-k..L-1
        blocks = (tuple(range(depth - k)), tuple(range(k)) + tuple(range(depth - k, depth)))
        return WanConfig(**{**sizes, "num_layers": len(blocks[0]) + len(blocks[1])}, arch="scd",
                         encoder_layers=len(blocks[0]), decoder_layers=len(blocks[1]), source_blocks=blocks)
    return WanConfig(**WAN_PRESETS[name])


def preset_config(name: str) -> ModelConfig:
    """A reference size (B, M, L, XL): 64 tokens per frame, 144 context frames, 50 steps."""
    return preset(name, latent_size=(8, 8), default_steps=PRESET_STEPS, context_frames=PRESET_CONTEXT)


def random_model(config: ModelConfig, seed: int = 0) -> nn.Module:
    """A model of `config` with the references' initialisation, except that the layers it zeroes
    (adaLN modulation, output norm, head) are drawn from N(0, 0.02): zeroed, every block would
    start as the identity. Timing does not depend on the values; this keeps the activations those
    of a real forward pass. The global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(config)
        for part in model.parts().values():
            zeroed = [m for b in part.transformer_blocks for m in (b.norm1.linear, b.norm2.linear)]
            zeroed += [m for m in (part.norm_out.linear, part.proj_out) if m is not None]
            for module in zeroed:
                nn.init.normal_(module.weight, std=0.02)
    return model.eval()


# ----------------------------------------------------------------------------- what to run

@dataclass(frozen=True)
class BenchSpec:
    """What `scd bench` measures. None means the default for the models being benched.

    model: an SCD or baseline model reference (folder, Hub id); baseline: a baseline reference.
    A side that is not given is the matched config of the other with random weights; with neither,
    both are random: `config` (library use), else `preset`, else `default_config()`. A model (or
    `config`) of a family without a matched counterpart (Wan2.1) is benched alone; `frames` then
    counts latent frames, rounded up to whole chunks (at least 2: the first chunk is the time to
    first chunk).
    contexts, steps, batches: one result row per combination. frames: generated per run, the first
    is the time to first frame and the rest the steady-state latency (so at least 2)."""

    model: str | None = None
    baseline: str | None = None
    preset: str | None = None
    config: object | None = None  # a ModelConfig or WanConfig
    contexts: tuple[int, ...] | None = None
    steps: tuple[int, ...] | None = None
    batches: tuple[int, ...] | None = None
    frames: int = 4
    reps: int = 3
    warmup: int = 1
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    threads: int | None = None  # CPU threads for torch during the bench (None: scd.devices.default_threads())
    matmul_size: int | None = None  # side of the square matmul timing the device's peak (None: by device)
    compiled: bool | str = False  # also stream each model compiled (True: inductor; or a torch.compile backend)
    chunk_frames: int | None = None  # a chunked (Wan) model: stream chunks of this many frames (1: frame-wise)
    samples: int = 1  # samples drawn per frame, their median kept (scd.sampling.Rollout's `samples`)

    def validate(self) -> None:
        problems = []
        for name in ("contexts", "steps", "batches"):
            values = getattr(self, name)
            if values is not None and (not values or min(values) < 1):
                problems.append(f"{name} must be positive integers, got {list(values)}")
        if self.frames < 2:
            problems.append(f"frames must be >= 2 (the first is the time to first frame), got {self.frames}")
        if self.reps < 1:
            problems.append(f"reps must be >= 1, got {self.reps}")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads must be >= 1, got {self.threads}")
        if self.warmup < 0:
            problems.append(f"warmup must be >= 0, got {self.warmup}")
        if not 0 <= self.seed <= checks.MAX_SEED:
            problems.append(f"seed must be >= 0 and <= {checks.MAX_SEED}, got {self.seed}")
        if self.compiled not in (False, True) and self.compiled not in BACKENDS:
            problems.append(f"compiled must be a bool or one of {', '.join(BACKENDS)}, not {self.compiled!r}")
        if not 1 <= self.samples <= checks.MAX_SAMPLES:
            problems.append(f"samples must be >= 1 and <= {checks.MAX_SAMPLES}, got {self.samples}")
        if self.chunk_frames is not None and self.chunk_frames < 1:
            problems.append(f"chunk_frames must be >= 1, got {self.chunk_frames}")
        names = PRESETS + tuple(WAN_PRESETS) + tuple(SCD_WAN_PRESETS)
        if self.preset is not None and self.preset.upper() not in names:
            problems.append(f"unknown preset {self.preset!r}: choose {', '.join(names)}")
        if problems:
            raise ConfigError("; ".join(problems))
        if self.preset is not None and (self.model is not None or self.baseline is not None or self.config is not None):
            raise ConfigError("preset picks random-weight models: drop model/baseline, or drop preset", parameter="preset")


# ----------------------------------------------------------------------------- progress events

@dataclass
class Started:
    device: str
    device_name: str
    dtype: str
    scd: str
    baseline: str
    rows: list[dict]
    warnings: list[str] = field(default_factory=list)
    alone: bool = False  # one model, no counterpart: `scd` is its source, `baseline` empty
    threads: int | None = None  # CPU threads torch ran with


@dataclass
class Measured:
    """One model's run in one rep of one row."""

    row: int
    rows: int
    rep: int  # counting warm-up reps from 0
    reps: int  # warm-up + measured
    warmup: bool
    model: str  # "scd" or "baseline"; with compiled runs also "scd_compiled", "baseline_compiled"; alone "model"
    setting: dict
    latency_ms: float  # median steady-state latency of this run (per chunk when `per` is "chunk")
    time_to_first_frame_ms: float
    per: str = "frame"


@dataclass
class CompiledRun:
    """A compiled model's first run in a row, which compiles it: its wall time, apart from the
    measured frames."""

    row: int
    rows: int
    model: str  # "scd_compiled" or "baseline_compiled"
    seconds: float


@dataclass
class RowFinished:
    row: int
    rows: int
    result: dict


@dataclass
class Finished:
    report: dict


# ----------------------------------------------------------------------------- measuring

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple {platform.machine()} (MPS)"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{name}, {threads} thread{'s' if threads > 1 else ''}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int | None = None) -> float:
    """FLOP/s of the best of `repeats` square matmuls of `size` (by device) in `dtype`, after one untimed."""
    n = size or MATMUL_SIZE.get(device.type, 2048)
    repeats = repeats or (3 if device.type == "cpu" else 10)  # a GPU matmul takes milliseconds: more, for clocks to settle
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    best = math.inf
    with torch.inference_mode():
        torch.mm(a, b)
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best


def run_interleaved(models: dict[str, nn.Module], contexts: dict[str, torch.Tensor], frames: int, steps: int,
                    first: int = 0, compiled: dict[str, bool | str] | None = None, samples: int = 1) -> dict[str, RunTimes]:
    """Stream `frames` frames from every model in lockstep: each model's context prefill and first
    frame (timed on the wall clock), then frame 1 of each, frame 2 of each, ..., the order flipping
    every frame and starting with `models`' entry `first`. Neighbouring frames of the models are
    measured seconds apart, so a load that comes and goes on the machine hits them alike.
    `compiled[name]`: stream that entry compiled; `samples`, the median of that many per frame (see
    `scd.sampling.Rollout`)."""
    names = list(models)
    names = names[first:] + names[:first]
    compiled = compiled or {}
    generators, first_ms = {}, {}
    for name in names:
        device = contexts[name].device
        _sync(device)
        start = time.perf_counter()
        options = {"compiled": compiled[name]} if compiled.get(name) else {}
        generators[name] = stream(models[name], contexts[name], frames, steps, samples=samples, **options)
        next(generators[name])  # stream synchronises before it yields
        first_ms[name] = (time.perf_counter() - start) * 1000.0
    steady = {name: [] for name in names}
    for u in range(1, frames):
        for name in (names if u % 2 else names[::-1]):
            start = time.perf_counter()
            frame = next(generators[name])
            # the wall time of the frame, whatever the stream's own clock counts: its context pass is
            # what is not denoising
            wall_ms = (time.perf_counter() - start) * 1000.0
            steady[name].append((wall_ms - frame.denoise_ms, frame.denoise_ms))
    for generator in generators.values():
        next(generator, None)  # let each finish, leaving its inference mode
    return {name: RunTimes(first_ms[name], steady[name], None) for name in models}


def count_ops(model: nn.Module, context: torch.Tensor, steps: int, compiled: bool | str = False, frames: int = 2,
              text: torch.Tensor | None = None, samples: int = 1) -> dict:
    """Operators per steady frame (the last of a `frames`-frame stream, untimed; compiled, the same
    shapes as the measured runs, so nothing compiles in it), by torch.profiler:
    `ops_per_frame` counts the top-level aten operators the frame dispatches (in eager PyTorch,
    every kernel it runs; a compiled frame's fused kernels are not aten operators, so there it
    counts what it still dispatches: matmuls, attention, copies), and on CUDA
    `kernel_launches_per_frame` the kernel and CUDA-graph launches (else None). A chunked model
    (given its `text`) counts the frame that starts the chunk, so `frames - 1` is a whole number of
    chunks, and its counts are the chunk's."""
    from torch.profiler import ProfilerActivity, profile

    # kineto prints "USDT: ... profiler_start/stop" marks to stderr at its top log level (5) on every
    # profile; level 6 is silence, unless the user asked for its logs. Read when a profile starts.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if context.device.type == "cuda" else [])
    options = {} if text is None else {"text": text}
    generator = stream(model, context, frames, steps, compiled=compiled, samples=samples, **options)
    for _ in range(frames - 1):
        next(generator)
    with profile(activities=activities) as prof:
        next(generator)
        _sync(context.device)
    next(generator, None)
    events = prof.events()
    ops = 0
    for event in events:
        if event.name.startswith("aten::"):
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith("aten::"):
                parent = parent.cpu_parent
            ops += parent is None
    launches = None
    if context.device.type == "cuda":
        launches = sum(e.name in LAUNCHES for e in events)
    return {"ops_per_frame": ops, "kernel_launches_per_frame": launches}


LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")


def _memory_bytes(device: torch.device) -> int | None:
    """Memory in use now: on CUDA the tensors torch allocated, on Linux the process's resident set."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        resident = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident * os.sysconf("SC_PAGE_SIZE")


def run_chunks(model: nn.Module, context: torch.Tensor, text: torch.Tensor, chunks: int, steps: int,
               ) -> tuple[RunTimes, list[list]]:
    """Stream `chunks` chunks of `model.config.chunk_frames` frames after `context`, conditioned on
    `text`: the time to the first chunk (the stream's start, its text keys and values included),
    then each later chunk's (context, denoise) ms (its wall time less the stream's own denoise
    count is the context pass), and after every chunk [frames so far, memory in use (bytes)]."""
    n = model.config.chunk_frames
    device = context.device
    _sync(device)
    start = time.perf_counter()
    generator = stream(model, context, chunks * n, steps, text=text)
    for _ in range(n):
        next(generator)  # stream synchronises before it yields
    first_ms = (time.perf_counter() - start) * 1000.0
    memory = [[n, _memory_bytes(device)]]
    steady = []
    for j in range(1, chunks):
        start = time.perf_counter()
        denoise_ms = sum(next(generator).denoise_ms for _ in range(n))
        wall_ms = (time.perf_counter() - start) * 1000.0
        steady.append((wall_ms - denoise_ms, denoise_ms))
        memory.append([(j + 1) * n, _memory_bytes(device)])
    next(generator, None)  # let it finish, leaving its inference mode
    return RunTimes(first_ms, steady, None), memory


def chunk_ops(config: WanConfig, steps: int, context: int = 0) -> int:
    """Top-level aten ops of one steady chunk of a Wan model of `config`'s structure (its blocks,
    chunk, window, decoder input, encoder input) at `steps` steps: counted (`count_ops`) on a
    copy of it shrunk to the smallest sizes, as an eager op count does not depend on them; for
    `scd info`, which predicts the speed-up of a device where every op costs the same."""
    small = dataclasses.replace(config, dim=8, ffn_dim=8, freq_dim=8, num_heads=1, text_dim=8, text_len=2,
                                latent_size=tuple(config.patch_size[1:]), source_blocks=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(small).eval()
        text = torch.randn(1, small.text_len, small.text_dim) if small.condition == "text" else None
    frames = max(context, small.chunk_frames if small.arch == "scd" and small.encoder_input == "none" else 0)
    latents = torch.randn(1, frames, small.channels, *small.latent_size)
    return count_ops(model, latents, steps, frames=small.chunk_frames + 1, text=text)["ops_per_frame"]


def _cuda_peak_memory(model: nn.Module, context: torch.Tensor, steps: int, compiled: bool | str = False,
                      samples: int = 1) -> int:
    """Bytes allocated at the peak of a 2-frame run (prefill included) beyond what was allocated before."""
    device = context.device
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in stream(model, context, 2, steps, compiled=compiled, samples=samples):
        pass
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _random_context(config, batch: int, frames: int, seed: int, device, dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, frames, config.channels, *config.latent_size)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def steady_flops(config: ModelConfig, context: int, frames: int, steps: int, samples: int = 1) -> dict:
    """Analytic FLOPs per steady-state frame at batch 1, averaged over frames 1..frames-1 of a run
    (frame u starts with context + u - 1 frames cached). With `samples` K the denoising is done K
    times, and the context pass too unless the model shares it (SCD: `StreamingModel.shares_context`)."""
    counts = [chunk_flops(config, context + u - 1, steps) for u in range(1, frames)]  # one frame a chunk
    passes = 1 if config.arch == "scd" else samples
    context_pass = passes * statistics.fmean(c.context for c in counts)
    denoising = samples * statistics.fmean(c.denoise for c in counts)
    return {"flops_per_frame": context_pass + denoising, "flops_context_pass": context_pass, "flops_denoising": denoising}


def steady_chunk_flops(config, context: int, chunks: int, steps: int) -> dict:
    """Analytic FLOPs per steady-state chunk at batch 1, averaged over chunks 1..chunks-1 of a run
    after `context` prompt frames (chunk j starts with context + (j - 1) n frames cached)."""
    n = config.chunk_frames
    counts = [chunk_flops(config, context + (j - 1) * n, steps) for j in range(1, chunks)]
    return {"flops_per_chunk": statistics.fmean(c.total for c in counts),
            "flops_context_pass": statistics.fmean(c.context for c in counts),
            "flops_denoising": statistics.fmean(c.denoise for c in counts),
            "flops_per_frame": statistics.fmean(c.total for c in counts) / n,
            "flops_once_per_stream": stream_flops(config)}


# ----------------------------------------------------------------------------- the models

@dataclass
class _Side:
    model: nn.Module
    config: ModelConfig
    source: str


def _load_baseline(ref: str):
    from scd.checkpoints import load_model  # deferred: pulls in the Hub client only when a model is named

    return load_model(ref, arch="baseline")


def _load_pair(spec: BenchSpec, device, dtype, loaded=None, baseline=None) -> tuple[_Side, _Side, ModelConfig | None, list[str]]:
    """The two sides, the config of the model the user named (None: random weights) and warnings.
    `loaded`, `baseline`: `spec.model`, `spec.baseline` already loaded."""
    from scd.checkpoints import (
        load_model,  # deferred: pulls in the Hub client only when a model is named
    )

    scd_side = base_side = named = None
    if spec.model is not None:
        loaded = loaded or load_model(spec.model)
        side = _Side(loaded.model, loaded.config, loaded.source)
        named = loaded.config
        if loaded.config.arch == "scd":
            scd_side = side
        else:
            base_side = side
    if spec.baseline is not None:
        loaded = baseline or _load_baseline(spec.baseline)
        if loaded.config.arch != "baseline":
            raise ConfigError(f"baseline {spec.baseline} is an SCD model: give a baseline (FAR-style) model",
                              parameter="baseline")
        if base_side is not None:
            raise ConfigError(f"model {spec.model} is already a baseline: give an SCD model as model", parameter="model")
        base_side = _Side(loaded.model, loaded.config, loaded.source)
        named = named or loaded.config
    if scd_side is None and base_side is None:
        if spec.config is not None:
            config, label = spec.config, "random weights"
        elif spec.preset is not None:
            config, label = preset_config(spec.preset), f"preset {spec.preset.upper()}, random weights"
        else:
            config, label = default_config(), "default, random weights"
        config = config if config.arch == "scd" else config.matched()
        scd_side = _Side(random_model(config, spec.seed), config, label)
    if base_side is None:
        config = scd_side.config.matched()
        base_side = _Side(random_model(config, spec.seed + 1), config, "matched, random weights")
    if scd_side is None:
        config = base_side.config.matched()
        scd_side = _Side(random_model(config, spec.seed + 1), config, "matched, random weights")
    warnings = []
    a, b = scd_side.config, base_side.config
    for what, x, y in (("width", a.width, b.width), ("total depth", a.layers, b.layers),
                       ("tokens per frame", a.tokens_per_frame, b.tokens_per_frame)):
        if x != y:
            warnings.append(f"the models are not matched: {what} {x} (SCD) vs {y} (baseline)")
    for side in (scd_side, base_side):
        side.model.to(device=device, dtype=dtype).eval()
    return scd_side, base_side, named, warnings


def _run_meta(device: torch.device, dtype: torch.dtype, settings: dict, models: dict, warnings: list[str],
              **machine) -> dict:
    """What a bench JSON says of the run before its rows: the machine (and any `machine` fields), the
    versions, the settings and the models compared."""
    return {"device": str(device), "device_name": device_name(device), "dtype": dtype_name(dtype), **machine,
            "torch": torch.__version__, "scd_version": scd.__version__, "settings": settings,
            "models": models, "warnings": warnings}


def _describe(config: ModelConfig) -> dict:
    return {"arch": config.arch, "width": config.width, "heads": config.num_heads, "layers": config.depth,
            "tokens_per_frame": config.tokens_per_frame, "latents": [config.channels, *config.latent_size],
            "decoder_combine": config.decoder_input}


# ----------------------------------------------------------------------------- the bench

def run(spec: BenchSpec) -> Iterator[Started | Measured | RowFinished | Finished]:
    """Measure SCD and its baseline for every (context, steps, batch) of `spec`; yields `Started`,
    a `Measured` per model run, a `RowFinished` per combination and `Finished` with the report.
    Raises ConfigError for impossible settings, CheckpointError/HubError for models that do not load,
    DeviceError for an unavailable device or dtype."""
    spec.validate()
    threads = torch.get_num_threads()
    used = use_threads(spec.threads)  # the default every command uses: the CPUs the machine leaves idle
    try:
        yield from _run(dataclasses.replace(spec, threads=used))
    finally:
        torch.set_num_threads(threads)


def _chunked_model_info(config, source: str, chunk: int) -> dict:
    """A chunked (Wan) model as the bench report describes it."""
    return {"source": source, "family": config.family, "arch": config.arch, "architecture": config.architecture,
            "width": config.width, "heads": config.num_heads, "layers": config.depth,
            "tokens_per_frame": config.tokens_per_frame, "chunk_frames": chunk, "window": config.window,
            "sinks": config.sink_size, "decoder_combine": config.decoder_input,
            "encoder_input": config.encoder_input if config.arch == "scd" else None,
            "latents": [config.channels, *config.latent_size]}


def _streams_text(config) -> bool:
    """A model the bench streams chunk by chunk with random text embeddings (the Wan family)."""
    return config.condition == "text"


def _run(spec: BenchSpec):
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    loaded = None
    if spec.model is not None:
        from scd.checkpoints import load_model

        loaded = load_model(spec.model)
    wan_preset = spec.preset is not None and spec.preset.upper() in {**WAN_PRESETS, **SCD_WAN_PRESETS}
    alone = loaded.config if loaded is not None else spec.config
    if wan_preset:
        alone = wan_preset_config(spec.preset)
    baseline = None
    if alone is None and spec.baseline is not None:
        baseline = _load_baseline(spec.baseline)
        if _streams_text(baseline.config):
            raise ConfigError("a causal Wan is compared with an SCD-Wan made from it: give that as model "
                              "(converted from the causal Wan to scd)", parameter="model")
    if spec.samples > 1 and alone is not None and (_streams_text(alone) or matched_config(alone) is None):
        raise ConfigError("a chunked (Wan) model draws one sample per frame: use samples 1", parameter="samples")
    if alone is not None and _streams_text(alone) and matched_config(alone) is not None:  # SCD-Wan against causal Wan
        yield from _run_wan_pair(spec, alone, loaded, wan_preset, device, dtype)
        return
    if spec.chunk_frames is not None and (alone is None or not _streams_text(alone)):
        raise ConfigError("chunk_frames sets a chunked (Wan) model's chunk: a FAR-style model makes one frame at a time",
                          parameter="chunk_frames")
    if alone is not None and matched_config(alone) is None:  # no counterpart: this model alone
        if spec.baseline is not None:
            raise ConfigError(f"drop baseline: this model ({alone.architecture}) has no matched counterpart "
                              "and is benched alone", parameter="baseline")
        if loaded is not None:
            side = _Side(loaded.model, loaded.config, loaded.source)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.seed)
                label = f"preset {spec.preset.upper()}, random weights" if wan_preset else "random weights"
                side = _Side(build_model(alone), alone, label)
        side.model.to(device=device, dtype=dtype).eval()
        if spec.chunk_frames is not None:
            _set_chunk(side, spec.chunk_frames)
        yield from _run_alone(spec, side, device, dtype)
        return
    scd_side, base_side, named, warnings = _load_pair(spec, device, dtype, loaded, baseline)
    # unless swept, the context and steps of the named model, else of the random config (default, preset)
    own = named or scd_side.config
    # a model that generates from pure noise (context 0) is timed at the default context: SCD needs one frame
    contexts = tuple(spec.contexts or (own.context_frames or DEFAULT_CONTEXT,))
    steps_list = tuple(spec.steps or (own.default_steps,))
    batches = tuple(spec.batches or ((1, 4) if device.type == "cpu" else (1, 8)))
    combos = list(itertools.product(contexts, steps_list, batches))
    matmul_size = spec.matmul_size or MATMUL_SIZE.get(device.type, 2048)
    backend = ("inductor" if spec.compiled is True else spec.compiled) or None
    settings = {"contexts": list(contexts), "steps": list(steps_list), "batches": list(batches),
                "frames": spec.frames, "reps": spec.reps, "warmup": spec.warmup, "seed": spec.seed,
                "guidance": 1.0, "samples": spec.samples, "dtype": dtype_name(dtype), "preset": spec.preset and spec.preset.upper(),
                "matmul_size": matmul_size, "compiled": backend,
                "context_latents": "random normal", "weights": {"scd": scd_side.source, "baseline": base_side.source}}
    rows_meta = [{"context": n, "steps": k, "batch": b} for n, k, b in combos]
    yield Started(str(device), device_name(device), dtype_name(dtype), scd_side.source, base_side.source,
                  rows_meta, warnings, spec.threads)

    sides = {"scd": scd_side, "baseline": base_side}
    # each stream measured: a model, eager or compiled (then also a compiled copy of each model)
    streams = {name: (name, False) for name in sides}
    if backend:
        streams.update({f"{name}_compiled": (name, backend) for name in sides})
    peaks: list[float] = []
    rows: list[dict] = []
    compile_info: list[dict] = []
    meta = _run_meta(device, dtype, settings, {"scd": {"source": scd_side.source, **_describe(scd_side.config)},
                                               "baseline": {"source": base_side.source, **_describe(base_side.config)}},
                     warnings, threads=spec.threads)
    if backend:
        meta["compile"] = {"backend": backend, "mode": compiler(device.type, backend).mode, "runs": compile_info}
    try:
        yield from _measure(spec, combos, rows_meta, sides, streams, device, dtype, matmul_size, peaks, rows, compile_info)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: report the settings measured so far, then stop
        if not rows:
            raise
        yield Finished(_finish(rows, peaks, streams, meta, complete=False))
        raise
    yield Finished(_finish(rows, peaks, streams, meta, complete=True))


def _measure(spec, combos, rows_meta, sides, streams, device, dtype, matmul_size, peaks: list, rows: list,
             compile_info: list):
    """Measure every combination, appending to `peaks`, `rows` and `compile_info` (which outlive an
    interruption)."""
    models = {name: sides[side].model for name, (side, _) in streams.items()}
    compiled = {name: how for name, (_, how) in streams.items()}
    backend = any(compiled.values())
    total_reps = spec.warmup + spec.reps
    for i, (n, k, b) in enumerate(combos):
        setting = rows_meta[i]
        contexts_by_side = {name: _random_context(s.config, b, n, spec.seed, device, dtype) for name, s in sides.items()}
        contexts_by_stream = {name: contexts_by_side[side] for name, (side, _) in streams.items()}
        if backend:  # the first compiled run compiles: timed apart, then never counted
            for name in (x for x in streams if compiled[x]):
                graphs = compile_counts()["unique_graphs"]
                start = time.perf_counter()
                run_interleaved({name: models[name]}, {name: contexts_by_stream[name]}, spec.frames, k, compiled=compiled,
                                samples=spec.samples)
                seconds = time.perf_counter() - start
                compile_info.append({**setting, "model": name, "first_run_s": seconds,
                                     "graphs": compile_counts()["unique_graphs"] - graphs})
                yield CompiledRun(i, len(combos), name, seconds)
            graphs_after_compiling = compile_counts()["unique_graphs"]
        runs: dict[str, list[RunTimes]] = {name: [] for name in streams}
        for rep in range(total_reps):
            warm = rep < spec.warmup
            peak = matmul_peak(device, dtype, matmul_size)
            if not warm:
                peaks.append(peak)
            # warm-up needs the prefill and one steady frame, not the full run (compiled: the same
            # shapes as the measured runs, a cache of the same size)
            frames = min(spec.frames, 2) if warm and not backend else spec.frames
            times = run_interleaved(models, contexts_by_stream, frames, k, first=rep % len(streams), compiled=compiled,
                                    samples=spec.samples)
            for name in streams:
                if not warm:
                    runs[name].append(times[name])
                yield Measured(i, len(combos), rep, total_reps, warm, name, setting,
                               statistics.median(times[name].latencies), times[name].time_to_first_frame_ms)
        if backend:
            for info in compile_info:
                if info["context"] == n and info["steps"] == k and info["batch"] == b:
                    info["recompiles_while_measuring"] = compile_counts()["unique_graphs"] - graphs_after_compiling
        if device.type == "cuda":  # one model at a time, so that each peak is its own
            for name, (side, how) in streams.items():
                runs[name][0].peak_memory_bytes = _cuda_peak_memory(models[name], contexts_by_stream[name], k, how, spec.samples)
        peak = statistics.median(peaks)
        summaries = {}
        for name, (side, how) in streams.items():
            config, model = sides[side].config, sides[side].model
            ops = count_ops(model, contexts_by_stream[name], k, how, spec.frames, samples=spec.samples)
            if device.type == "cuda":
                memory = (parameter_bytes(model) + max(r.peak_memory_bytes for r in runs[name] if r.peak_memory_bytes is not None),
                          "parameters + torch.cuda.max_memory_allocated during the run")
            else:
                memory = (parameter_bytes(model) + kv_cache_bytes(model, b, n + spec.frames, dtype=dtype, samples=spec.samples),
                          "analytic: parameters + preallocated KV cache (activations not counted)")
            summaries[name] = summarise_model(runs[name], b, steady_flops(config, n, spec.frames, k, spec.samples),
                                              parameter_count(model), memory, ops, peak)
        del contexts_by_side, contexts_by_stream
        result = row_result(setting, summaries, runs, {"frames": spec.frames, "reps": spec.reps, "warmup": spec.warmup})
        rows.append(result)
        yield RowFinished(i, len(combos), result)


def _run_alone(spec: BenchSpec, side: _Side, device, dtype):
    """One model without a counterpart (the Wan family), chunk by chunk with random text embeddings."""
    if spec.compiled:
        raise ConfigError("drop compiled: compiled streams run the FAR-style family; bench this model eagerly",
                          parameter="compiled")
    config, model = side.config, side.model
    n = config.chunk_frames
    chunks = max(2, -(-spec.frames // n))  # the first chunk is the time to first chunk, the rest steady
    contexts = tuple(spec.contexts or (config.context_frames,))
    steps_list = tuple(spec.steps or (config.default_steps,))
    batches = tuple(spec.batches or ((1, 4) if device.type == "cpu" else (1, 8)))
    combos = list(itertools.product(contexts, steps_list, batches))
    matmul_size = spec.matmul_size or MATMUL_SIZE.get(device.type, 2048)
    settings = {"contexts": list(contexts), "steps": list(steps_list), "batches": list(batches),
                "frames": chunks * n, "chunks": chunks, "chunk_frames": n, "reps": spec.reps, "warmup": spec.warmup,
                "seed": spec.seed, "guidance": 1.0, "dtype": dtype_name(dtype), "preset": None,
                "matmul_size": matmul_size, "compiled": None, "context_latents": "random normal",
                "text": f"random normal, {config.text_len} x {config.text_dim}", "weights": {"model": side.source}}
    rows_meta = [{"context": c, "steps": k, "batch": b} for c, k, b in combos]
    yield Started(str(device), device_name(device), dtype_name(dtype), side.source, "", rows_meta, [], alone=True)
    meta = _run_meta(device, dtype, settings, {"model": _chunked_model_info(config, side.source, n)}, [])
    peaks, rows = [], []
    total_reps = spec.warmup + spec.reps
    generator = torch.Generator().manual_seed(spec.seed)
    try:
        for i, (c, k, b) in enumerate(combos):
            setting = rows_meta[i]
            context = _random_context(config, b, c, spec.seed, device, dtype)
            text = torch.randn(b, config.text_len, config.text_dim, generator=generator).to(device=device, dtype=dtype)
            runs, memory = [], None
            for rep in range(total_reps):
                warm = rep < spec.warmup
                peak = matmul_peak(device, dtype, matmul_size)
                times, memory = run_chunks(model, context, text, 2 if warm else chunks, k)
                if not warm:
                    peaks.append(peak)
                    runs.append(times)
                yield Measured(i, len(combos), rep, total_reps, warm, "model", setting,
                               statistics.median(times.latencies), times.time_to_first_frame_ms, per="chunk")
            ops = count_ops(model, context, k, frames=n + 1, text=text)
            cache = [kv_cache_bytes(model, b, c + frames) for frames, _ in memory]
            flat = cache[-1] == kv_cache_bytes(model, b, 10 * (c + chunks * n))  # a longer stream holds no more
            summary = summarise_chunks(runs, b, n, steady_chunk_flops(config, c, chunks, k), parameter_count(model),
                                       parameter_bytes(model), cache, flat, memory, ops, statistics.median(peaks))
            row = {**setting, "settings": {**setting, "frames": chunks * n, "reps": spec.reps, "warmup": spec.warmup},
                   "model": summary}
            rows.append(row)
            yield RowFinished(i, len(combos), row)
    except KeyboardInterrupt:
        if not rows:
            raise
        yield Finished(make_alone_report(rows, {**meta, "matmul_peak_flops_per_s": statistics.median(peaks)}, False))
        raise
    yield Finished(make_alone_report(rows, {**meta, "matmul_peak_flops_per_s": statistics.median(peaks)}, True))


def _set_chunk(side: _Side, frames: int) -> None:
    """Stream `side`'s Wan model in chunks of `frames` frames (the stream reads `model.config`)."""
    config = dataclasses.replace(side.config, chunk_frames=frames)  # validates: a window must hold the chunk
    side.config = config
    side.model.use_config(config)


def run_chunks_interleaved(models: dict[str, nn.Module], contexts: dict[str, torch.Tensor], text: torch.Tensor,
                           chunks: int, steps: int, first: int = 0) -> dict[str, RunTimes]:
    """`run_chunks` for several chunked models in lockstep: each one's first chunk (its stream's
    start included), then chunk 1 of each, chunk 2 of each, ..., the order flipping every chunk and
    starting with `models`' entry `first`; all conditioned on the same `text`. Each later chunk's
    (context, denoise) ms, as `run_chunks` splits them."""
    names = list(models)
    names = names[first:] + names[:first]
    generators, first_ms = {}, {}
    for name in names:
        n = models[name].config.chunk_frames
        device = contexts[name].device
        _sync(device)
        start = time.perf_counter()
        generators[name] = stream(models[name], contexts[name], chunks * n, steps, text=text)
        for _ in range(n):
            next(generators[name])  # stream synchronises before it yields
        first_ms[name] = (time.perf_counter() - start) * 1000.0
    steady = {name: [] for name in names}
    for j in range(1, chunks):
        for name in (names if j % 2 else names[::-1]):
            n = models[name].config.chunk_frames
            start = time.perf_counter()
            denoise_ms = sum(next(generators[name]).denoise_ms for _ in range(n))
            wall_ms = (time.perf_counter() - start) * 1000.0
            steady[name].append((wall_ms - denoise_ms, denoise_ms))
    for generator in generators.values():
        next(generator, None)  # let each finish, leaving its inference mode
    return {name: RunTimes(first_ms[name], steady[name], None) for name in models}


def _wan_pair_sides(spec: BenchSpec, config: WanConfig, loaded, wan_preset: bool) -> tuple[_Side, _Side]:
    """SCD-Wan (`loaded`, else random weights of `config`) and its causal Wan (`spec.baseline`, else
    random weights of the matched config)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        if loaded is not None:
            scd_side = _Side(loaded.model, loaded.config, loaded.source)
        else:
            label = f"preset {spec.preset.upper()}, random weights" if wan_preset else "random weights"
            scd_side = _Side(build_model(config), config, label)
        if spec.baseline is not None:
            base = _load_baseline(spec.baseline)
            if not _streams_text(base.config) or base.config.arch != "baseline":
                raise ConfigError(f"baseline {spec.baseline} is not a causal Wan: give the causal Wan this SCD-Wan "
                                  "was made from", parameter="baseline")
            base_side = _Side(base.model, base.config, base.source)
        else:
            matched = matched_config(config)
            label = "matched, random weights" + (f" (preset {spec.preset.upper()[4:]})" if wan_preset else "")
            torch.manual_seed(spec.seed + 1)
            base_side = _Side(build_model(matched), matched, label)
    return scd_side, base_side


def _wan_pair_warnings(a: WanConfig, b: WanConfig) -> list[str]:
    """What makes the two not each other's matched pair (a warning), or cannot run together (an error)."""
    for what, x, y in (("latents", (a.channels, *a.latent_size), (b.channels, *b.latent_size)),
                       ("text embeddings", (a.text_len, a.text_dim), (b.text_len, b.text_dim))):
        if x != y:
            raise ConfigError(f"the models take different {what}: {x} (SCD) vs {y} (baseline)", parameter="baseline")
    if a.chunk_frames != b.chunk_frames:
        raise ConfigError(f"the models stream chunks of {a.chunk_frames} (SCD) and {b.chunk_frames} (baseline) "
                          "frames: give chunk_frames for both", parameter="chunk_frames")
    warnings = []
    depth = matched_config(a).num_layers
    for what, x, y in (("width", a.dim, b.dim), ("ffn", a.ffn_dim, b.ffn_dim), ("source depth", depth, b.num_layers),
                       ("window", a.local_attn_size, b.local_attn_size), ("sinks", a.sink_size, b.sink_size)):
        if x != y:
            warnings.append(f"the models are not matched: {what} {x} (SCD) vs {y} (baseline)")
    return warnings


def _run_wan_pair(spec: BenchSpec, config: WanConfig, loaded, wan_preset: bool, device, dtype):
    """SCD-Wan against its causal Wan: both streamed chunk by chunk, interleaved, with the same
    random text and context; per-chunk latency of each, the paired speed-up against the FLOPs' and
    the ops' prediction."""
    if spec.compiled:
        raise ConfigError("drop compiled: compiled streams run the FAR-style family; bench these models eagerly",
                          parameter="compiled")
    sides = dict(zip(("scd", "baseline"), _wan_pair_sides(spec, config, loaded, wan_preset)))
    for side in sides.values():
        side.model.to(device=device, dtype=dtype).eval()
        if spec.chunk_frames is not None:
            _set_chunk(side, spec.chunk_frames)
    warnings = _wan_pair_warnings(sides["scd"].config, sides["baseline"].config)
    scd_config = sides["scd"].config
    n = scd_config.chunk_frames
    chunks = max(2, -(-spec.frames // n))
    contexts = tuple(spec.contexts or (scd_config.context_frames,))
    steps_list = tuple(spec.steps or (scd_config.default_steps,))
    batches = tuple(spec.batches or ((1, 4) if device.type == "cpu" else (1, 8)))
    combos = list(itertools.product(contexts, steps_list, batches))
    matmul_size = spec.matmul_size or MATMUL_SIZE.get(device.type, 2048)
    settings = {"contexts": list(contexts), "steps": list(steps_list), "batches": list(batches),
                "frames": chunks * n, "chunks": chunks, "chunk_frames": n,
                "chunk_frames_overridden": spec.chunk_frames is not None, "reps": spec.reps, "warmup": spec.warmup,
                "seed": spec.seed, "guidance": 1.0, "dtype": dtype_name(dtype),
                "preset": spec.preset and spec.preset.upper(), "matmul_size": matmul_size, "compiled": None,
                "context_latents": "random normal",
                "text": f"random normal, {scd_config.text_len} x {scd_config.text_dim}, the same for both",
                "weights": {name: side.source for name, side in sides.items()}}
    rows_meta = [{"context": c, "steps": k, "batch": b} for c, k, b in combos]
    yield Started(str(device), device_name(device), dtype_name(dtype), sides["scd"].source, sides["baseline"].source,
                  rows_meta, warnings)
    meta = _run_meta(device, dtype, settings,
                     {name: _chunked_model_info(side.config, side.source, n) for name, side in sides.items()}, warnings)
    models = {name: side.model for name, side in sides.items()}
    peaks, rows = [], []
    total_reps = spec.warmup + spec.reps
    generator = torch.Generator().manual_seed(spec.seed)
    try:
        for i, (c, k, b) in enumerate(combos):
            setting = rows_meta[i]
            context = _random_context(scd_config, b, c, spec.seed, device, dtype)
            text = torch.randn(b, scd_config.text_len, scd_config.text_dim, generator=generator).to(device=device,
                                                                                                    dtype=dtype)
            runs = {name: [] for name in sides}
            for rep in range(total_reps):
                warm = rep < spec.warmup
                peak = matmul_peak(device, dtype, matmul_size)
                times = run_chunks_interleaved(models, {name: context for name in sides}, text, 2 if warm else chunks,
                                               k, first=rep % 2)
                if not warm:
                    peaks.append(peak)
                for name in sides:
                    if not warm:
                        runs[name].append(times[name])
                    yield Measured(i, len(combos), rep, total_reps, warm, name, setting,
                                   statistics.median(times[name].latencies), times[name].time_to_first_frame_ms,
                                   per="chunk")
            summaries = {}
            for name, side in sides.items():
                ops = count_ops(side.model, context, k, frames=n + 1, text=text)
                cache = [kv_cache_bytes(side.model, b, c + j * n) for j in range(1, chunks + 1)]
                flat = cache[-1] == kv_cache_bytes(side.model, b, 10 * (c + chunks * n))
                memory = [[c + j * n, None] for j in range(1, chunks + 1)]  # one process holds both: not apart
                summaries[name] = summarise_chunks(runs[name], b, n, steady_chunk_flops(side.config, c, chunks, k),
                                                   parameter_count(side.model), parameter_bytes(side.model), cache,
                                                   flat, memory, ops, statistics.median(peaks))
            row = chunk_row_result(setting, summaries, runs,
                                   {"frames": chunks * n, "reps": spec.reps, "warmup": spec.warmup})
            rows.append(row)
            yield RowFinished(i, len(combos), row)
    except KeyboardInterrupt:
        if not rows:
            raise
        yield Finished(make_chunk_pair_report(rows, {**meta, "matmul_peak_flops_per_s": statistics.median(peaks)},
                                              False))
        raise
    yield Finished(make_chunk_pair_report(rows, {**meta, "matmul_peak_flops_per_s": statistics.median(peaks)}, True))


def _finish(rows, peaks, streams, meta: dict, complete: bool) -> dict:
    peak = statistics.median(peaks)
    for row in rows:  # rows finished earlier were read against the peak measured up to then
        for name in streams:
            row[name]["fraction_of_matmul_peak"] = row[name]["achieved_flops_per_s"] / peak
    report = make_report(rows, {**meta, "matmul_peak_flops_per_s": peak})
    report["complete"] = complete  # False: interrupted; `rows` holds the settings finished before
    return report


def bench(spec: BenchSpec, on_event=None) -> dict:
    """Run the bench to the end and return the report; `on_event(event)` sees every progress event."""
    report = None
    for event in run(spec):
        if on_event is not None:
            on_event(event)
        if isinstance(event, Finished):
            report = event.report
    return report


__all__ = ["BenchSpec", "CompiledRun", "Finished", "Measured", "RowFinished", "Started", "bench", "chunk_ops",
           "count_ops", "default_config", "matmul_peak", "preset_config", "random_model", "run", "run_chunks",
           "run_chunks_interleaved", "run_interleaved", "steady_chunk_flops", "steady_flops", "wan_preset_config"]
