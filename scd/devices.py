"""Device and dtype choice. `auto` asks accelerate, the project's distributed engine, which device
this process owns (CUDA, MPS or CPU; under `accelerate launch`, this rank's GPU)."""

from __future__ import annotations

import torch

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
        raise DeviceError("CUDA is not available on this machine: use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"there is no {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("MPS is not available on this machine: use --device cpu (or auto)")
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
