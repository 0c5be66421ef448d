"""Model folders, reference checkpoint formats and model references.

A model folder is `config.json` + `model.safetensors` (+ optional `codec/`, `README.md`). Reference
checkpoints are the official SCD trainer's `ema.pth` / accelerate `model.safetensors` and FAR's
`.pth`, each with its options file. Every load is strict: a missing, unexpected or mis-shaped tensor
is an error that names it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

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


# ----------------------------------------------------------------------------- reference options

REFERENCE_PRESETS = {"B": (12, 12), "M": (16, 12), "L": (16, 24), "XL": (18, 28)}


def _transformer_options(options: dict) -> dict:
    node = options
    for key in ("models", "model_cfg", "transformer"):
        if isinstance(node, dict) and key in node:
            node = node[key]
    if not isinstance(node, dict) or "init_cfg" not in node:
        raise CheckpointError("the options file has no models.model_cfg.transformer.init_cfg section")
    return node


def _stack_options(cfg: dict) -> tuple[str, dict]:
    kind = str(cfg.get("type", ""))
    args = dict(cfg.get("config") or {})
    for name, (heads, layers) in REFERENCE_PRESETS.items():  # e.g. SCD_M_encoder, FAR_B, FAR_M_Long
        parts = kind.split("_")
        if len(parts) > 1 and parts[1] == name:
            args.setdefault("num_attention_heads", heads)
            args.setdefault("attention_head_dim", 64)
            args.setdefault("in_channels", 32)
            args.setdefault("out_channels", 32)
            args.setdefault("patch_size", 1)
            args.setdefault("axes_dims_rope", (16, 24, 24))
            if not parts[-1] in ("encoder", "decoder"):
                args.setdefault("num_layers", layers)
    return kind, args


def config_from_options(options: dict, latent_size: tuple[int, int] | None = None, **extra) -> ModelConfig:
    """A ModelConfig from an official SCD or FAR options file (parsed YAML).

    The latent size is not part of the transformer options: it comes from `latent_size`, or the
    options' `val.sample_cfg.sample_size`, or the reference default of 8."""
    node = _transformer_options(options)
    kind = "model"
    try:
        kind, enc = _stack_options(node["init_cfg"])
        if latent_size is None:
            size = (options.get("val") or {}).get("sample_cfg", {}).get("sample_size", 8)
            latent_size = (size, size)
        if enc.get("in_channels", 32) != enc.get("out_channels", 32):
            raise CheckpointError("in_channels != out_channels is not supported")
        cond = enc.get("condition_cfg")
        condition = None if not cond else cond.get("type")
        num_classes = 0 if not cond else cond.get("num_action_classes", cond.get("num_classes", 0))
        common = dict(num_heads=enc["num_attention_heads"], head_dim=enc["attention_head_dim"],
                      channels=enc["in_channels"], patch_size=enc.get("patch_size", 1),
                      rope_axes=tuple(enc.get("axes_dims_rope", (16, 24, 24))), condition=condition,
                      num_classes=num_classes, latent_size=tuple(latent_size))
        if kind.startswith("FAR"):
            return ModelConfig(arch="baseline", layers=enc["num_layers"], decoder_layers=0, **common, **extra)
        if "decoder_cfg" not in node:
            raise CheckpointError(f"options of type {kind!r} have no decoder_cfg: not an SCD model")
        _, dec = _stack_options(node["decoder_cfg"])
        return ModelConfig(arch="scd", layers=enc["num_layers"] + dec["num_layers"], decoder_layers=dec["num_layers"],
                           decoder_combine=dec.get("decoder_input_combine", "concat"),
                           encoder_noise=float(enc.get("noise_strength", 0.0)),
                           encoder_norm_unconditional=bool(enc.get("norm_out_unconditional", False)), **common, **extra)
    except KeyError as err:
        raise CheckpointError(f"the options file lacks {err} for a {kind or 'model'} transformer") from None
    except (TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"the options file has a value of the wrong kind for a {kind or 'model'} transformer: {err}") from None
    except ConfigError as err:
        raise CheckpointError(f"the options file describes an impossible model: {err}") from None


def read_options(path: Path) -> dict:
    try:
        options = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise CheckpointError(f"cannot read options file {path}: {err}") from None
    if not isinstance(options, dict):
        raise CheckpointError(f"options file {path} is not a YAML mapping")
    return options


def reference_kind(tensors: dict[str, torch.Tensor]) -> str:
    """'scd' (official trainer), 'far_long' (FAR_Long) or 'far' by the key layout."""
    if any(k.startswith("encoder.") for k in tensors):
        return "scd"
    if "context_embedder.weight" in tensors:
        return "far_long"
    return "far"


def load_reference(weights: Path, options: Path, latent_size=None, **extra) -> LoadedModel:
    """An official SCD or FAR checkpoint with its options file. FAR_Long checkpoints load as
    their FAR part only through `scd convert`, which reports what it drops."""
    tensors = read_tensors(weights)
    config = config_from_options(read_options(options), latent_size, **extra)
    if reference_kind(tensors) == "far_long":
        raise CheckpointError(f"{weights} is a FAR_Long checkpoint: its long-context tensors have no place in "
                              "this model; run `scd convert` to port it (the drop is reported)")
    model = model_from_tensors(config, tensors, str(weights))
    return LoadedModel(model.eval(), config, str(weights))


# ----------------------------------------------------------------------------- model folders

def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model_folder(model: torch.nn.Module, folder: Path, card: str | None = None,
                      dtype: torch.dtype | None = None) -> Path:
    """Write config.json, model.safetensors (and README.md) atomically into `folder`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).detach().contiguous().cpu()
                 for k, v in model.state_dict().items()}
        _atomic_write(folder / WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        _atomic_write(folder / CONFIG, lambda tmp: Path(tmp).write_text(model.config.to_json()))
        if card is not None:
            _atomic_write(folder / "README.md", lambda tmp: Path(tmp).write_text(card))
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
    reference checkpoint file with its options, or a Hub repo id with optional @revision."""
    if ref is None or str(ref) in EMBEDDED:
        name = arch if ref is None else str(ref)
        loaded = load_model_folder(EMBEDDED[name])
        loaded.source = f"embedded:{name}"
        return loaded
    path = Path(ref)
    if path.is_dir():
        return load_model_folder(path)
    if path.is_file():
        if options is None:
            raise CheckpointError(f"{path} is a bare checkpoint: pass its options file with --options")
        return load_reference(path, options, latent_size)
    from scd import hub  # deferred: huggingface_hub is only needed for Hub references

    hub_ref = hub.parse_hub_ref(str(ref))
    if hub_ref is None:
        raise CheckpointError(f"no model at {ref}: give a model folder, a checkpoint with --options, or a Hub repo id")
    folder, revision = hub.fetch_model_folder(hub_ref)
    loaded = load_model_folder(folder)
    loaded.source, loaded.revision = hub_ref.repo_id, revision
    return loaded
