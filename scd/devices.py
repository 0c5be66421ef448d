"""Device, dtype and CPU thread choice. `auto` asks accelerate, the project's distributed engine, which device
this process owns (CUDA, MPS or CPU; under `accelerate launch`, this rank's GPU)."""

from __future__ import annotations

import os

import torch

from scd import checks
from scd.errors import DeviceError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        from accelerate import PartialState

        return PartialState().device
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("CUDA is not available on this machine: use device cpu (or auto)", parameter="device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"there is no {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("MPS is not available on this machine: use device cpu (or auto)", parameter="device")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unsupported device {name!r}: use auto, cpu, cuda or mps")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 where it is fast (CUDA with bf16 support), float32 elsewhere."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype {name!r}: use auto, float32, bfloat16 or float16")
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise DeviceError("float16 is not supported on the CPU: use float32 or bfloat16")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's or `taskset`'s share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    """CPU threads when none are asked for: the CPUs left idle by the rest of the machine (available
    CPUs minus the 1-minute load average), at least 1. torch's own default (one per core) spins every
    thread at each op; on a busy machine a thread that loses its core stalls them all (measured on 2
    busy cores: a 32x32 model ran up to 100x slower per frame at 2 threads than at 1). See
    docs/reliability.md."""
    cpus = available_cpus()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return max(1, cpus // 2)
    return max(1, min(cpus, int(cpus - load)))


def use_threads(threads: int | None) -> int:
    """Set torch's CPU thread count (`threads`, or default_threads() when None) and return it.
    Raises ConfigError for a count below 1."""
    if threads is None:
        threads = default_threads()
    checks.number("threads", threads, 1, 4096, integer=True)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: from /proc), or None where unknown."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
