"""Weight files as tensors: safetensors and `.pth` read safely (headers checked, never unpickling
code), and strict loading into a model, where a missing, unexpected or mis-shaped tensor is an
error that names it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from scd.errors import CheckpointError
from scd.models import ModelConfig, build_model

MAX_HEADER_BYTES = 100 * 1024 * 1024  # a safetensors header larger than this is not a model we wrote


def check_safetensors_header(path: Path) -> None:
    """Validate the 8-byte length and JSON header before the library maps the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path} is too short to be a safetensors file")
            header_len = int.from_bytes(prefix, "little")
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path} declares a {header_len}-byte header in a {size}-byte file: it is corrupt")
            header = json.loads(f.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not a valid safetensors file ({err}); re-download or re-export it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a malformed safetensors header")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has no valid data offsets") from None
        end = max(end, stop)
    if end > size - 8 - header_len:
        raise CheckpointError(f"{path} is truncated: tensors need {end} bytes, the file has {size - 8 - header_len}")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from `.safetensors` or `.pth` (read with weights_only, never unpickling code).

    Accelerate's `module.` prefixes are removed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        check_safetensors_header(path)
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"cannot read {path}: {err}") from None
    else:
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"cannot read {path} as a weights-only checkpoint ({first}); "
                                  "scd never unpickles code: convert it to safetensors where it was made") from None
        if isinstance(tensors, dict) and len(tensors) == 1 and isinstance(next(iter(tensors.values())), dict):
            tensors = next(iter(tensors.values()))  # {"state_dict": {...}} / {"ema": {...}} wrappers
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise CheckpointError(f"{path} does not hold a flat dict of tensors")
    return {k.removeprefix("module."): v for k, v in tensors.items()}


def tensor_mismatches(expected: dict[str, tuple], tensors: dict[str, torch.Tensor],
                      unexpected_label: str = "unexpected") -> list[str]:
    """What keeps `tensors` from filling `expected` ({name: shape}): missing, unexpected and
    mis-shaped names, five of each at most, one phrase per kind; empty when they fit."""
    shapes = sorted(f"{k} {tuple(tensors[k].shape)} != {tuple(v)}" for k, v in expected.items()
                    if k in tensors and tuple(tensors[k].shape) != tuple(v))
    problems = []
    for label, names in (("missing", sorted(set(expected) - set(tensors))),
                         (unexpected_label, sorted(set(tensors) - set(expected))), ("mis-shaped", shapes)):
        if names:
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            problems.append(f"{len(names)} {label}: {', '.join(names[:5])}{more}")
    return problems


def _refuse_mismatch(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: str) -> None:
    problems = tensor_mismatches({k: tuple(v.shape) for k, v in expected.items()}, tensors)
    if problems:
        raise CheckpointError(f"{source} does not match the model config ({'; '.join(problems)}); "
                              "check the options file or config.json that goes with it")


def load_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy tensors into the model, refusing any missing, unexpected or mis-shaped entry."""
    expected = model.state_dict()
    _refuse_mismatch(expected, tensors, source)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})


def model_from_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """The model of `config` holding `tensors`. The config is checked against the tensors on a
    storage-less (meta) copy first, so a config that declares a huge model is refused before
    anything of its size is allocated: what gets allocated is never larger than the file."""
    try:
        with torch.device("meta"):
            skeleton = build_model(config, init=False)
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot build the model that {source} is for: {err}") from None
    _refuse_mismatch(skeleton.state_dict(), tensors, source)  # before anything of the config's size exists
    model = build_model(config, init=False)
    load_state(model, tensors, source)
    return model
