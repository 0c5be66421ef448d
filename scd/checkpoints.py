"""Model folders and model references.

A model folder is `config.json` + `model.safetensors` (+ optional `codec/`, `README.md`). A model
reference is a folder, a Hub repo id, or a reference checkpoint (FAR's, the official SCD trainer's;
their formats are `scd.reference`). Every load is strict: a missing, unexpected or mis-shaped tensor
is an error that names it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scd import files
from scd.codecs import load_codec
from scd.errors import CheckpointError, ConfigError
from scd.model import ModelConfig, build_model

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = {"scd": ASSETS / "world-scd", "baseline": ASSETS / "world-baseline"}
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # a safetensors header larger than this is not a model we wrote


@dataclass
class LoadedModel:
    """A model ready to run, its codec, and where it came from (for reports and model cards)."""

    model: torch.nn.Module
    config: ModelConfig
    source: str
    folder: Path | None = None
    revision: str | None = None
    _codec: object = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)  # what a user should know about how it was loaded

    @property
    def codec(self):
        """Pixels (N, 3, H, W) in [-1, 1] <-> the model's latents (`scd.codecs`), loaded on first use
        (a DC-AE from the folder's `codec/`)."""
        if self._codec is None:
            self._codec = load_codec(self.config.codec, self.folder)
        return self._codec

    def to(self, device, dtype) -> "LoadedModel":
        """Move the model and its codec."""
        self.model.to(device=device, dtype=dtype)
        self.codec.to(device, dtype)
        return self

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frames (F, 3, H, W) in [-1, 1] at the model's frame size -> latents (F, C, h, w) in the
        model's device and dtype."""
        weight = next(self.model.parameters())
        with torch.inference_mode():
            return self.codec.encode(pixels.to(device=weight.device, dtype=weight.dtype)).to(weight.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (N, C, h, w) -> frames (N, 3, H, W) float32 in [-1, 1]."""
        weight = next(self.model.parameters())
        with torch.inference_mode():
            return self.codec.decode(latents.to(weight.dtype))


# ----------------------------------------------------------------------------- raw tensors

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


# ----------------------------------------------------------------------------- model folders

def save_model_folder(model: torch.nn.Module, folder: Path, card: str | None = None,
                      dtype: torch.dtype | None = None) -> Path:
    """Write config.json, model.safetensors (and README.md) atomically into `folder`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).detach().contiguous().cpu()
                 for k, v in model.state_dict().items()}
        files.atomic_write(folder / WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}), CheckpointError)
        files.write_text(folder / CONFIG, model.config.to_json(), CheckpointError)
        if card is not None:
            files.write_text(folder / "README.md", card, CheckpointError)
    except OSError as err:
        raise CheckpointError(f"cannot write model folder {folder}: {err.strerror or err}") from None
    return folder


def read_folder_config(folder: Path) -> ModelConfig:
    """The config of a model folder, after checking that its weights file is there too."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise CheckpointError(f"{folder} is not a model folder: it has no {CONFIG}")
    if not (folder / WEIGHTS).is_file():
        raise CheckpointError(f"the model folder {folder} has no {WEIGHTS}")
    try:
        return ModelConfig.load(folder / CONFIG)
    except ConfigError as err:
        raise CheckpointError(f"{folder / CONFIG}: {err}") from None


def load_model_folder(folder: Path) -> LoadedModel:
    folder = Path(folder)
    config = read_folder_config(folder)
    model = model_from_tensors(config, read_tensors(folder / WEIGHTS), str(folder / WEIGHTS))
    return LoadedModel(model.eval(), config, str(folder), folder)


def load_model(ref: str | Path | None = None, options: Path | None = None, arch: str = "scd",
               latent_size=None) -> LoadedModel:
    """Resolve a model reference: None (the embedded default of `arch`), a local model folder, a
    reference checkpoint file (with its options, or one of FAR's published files by name), or a Hub
    repo id with optional @revision (`owner/name:path/file.pth` for a checkpoint file in it). A local
    model folder named `scd` or `baseline` is that folder; `embedded:scd` always names the embedded model."""
    name = str(ref).removeprefix("embedded:") if ref is not None else arch
    local = ref is not None and (Path(ref) / CONFIG).is_file()
    if ref is None or (name in EMBEDDED and (str(ref).startswith("embedded:") or not local)):
        loaded = load_model_folder(EMBEDDED[name])
        loaded.source = f"embedded:{name}"
        return loaded
    from scd import reference  # deferred: the reference formats build on this module

    path = Path(ref)
    if path.is_dir():
        return load_model_folder(path)
    if path.is_file():
        return reference.load_reference(path, options, latent_size)
    from scd import hub  # deferred: huggingface_hub is only needed for Hub references

    hub_ref = hub.parse_hub_ref(str(ref))
    if hub_ref is None:
        raise CheckpointError(f"no model at {ref}: give a model folder, a checkpoint with its options file, or a Hub repo id")
    if hub_ref.path_in_repo and PurePosixPath(hub_ref.path_in_repo).suffix in reference.WEIGHT_SUFFIXES:
        path, commit = hub.fetch_file(hub_ref)
        pinned = hub.HubRef(hub_ref.repo_id, commit, hub_ref.path_in_repo)
        loaded = reference.load_reference(path, options, latent_size, PurePosixPath(hub_ref.path_in_repo).name, pinned)
        loaded.source, loaded.revision = f"{hub_ref.repo_id}:{hub_ref.path_in_repo}", commit
        return loaded
    folder, revision = hub.fetch_model_folder(hub_ref)
    loaded = load_model_folder(folder)
    loaded.source, loaded.revision = hub_ref.repo_id, revision
    return loaded
