"""The Wan family's checkpoint formats: Self-Forcing's generator files, Wan2.1's own safetensors and
diffusers' `WanTransformer3DModel`, and the base folder that gives their sizes.

- A Self-Forcing `.pt` (gdhe17/Self-Forcing `checkpoints/self_forcing_dmd.pt`): `{"generator",
  "generator_ema"}`, each the state dict of its `WanDiffusionWrapper`, every key prefixed `model.`;
  read with `torch.load(weights_only=True)`, `generator_ema` by default.
- Wan2.1's `diffusion_pytorch_model.safetensors`: the names `scd.models.wan` uses.
- diffusers' names (the `transformer/` folder of Wan-AI/Wan2.1-T2V-1.3B-Diffusers): renamed here.

Sizes cannot all be read off the tensors (the number of heads), so they come from a config: a
base folder's `transformer/config.json` (diffusers' layout), or a Self-Forcing style config.json
beside the weights (`model`: `CausalWanModel`'s arguments; `pipeline`: its inference settings).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from scd.errors import CheckpointError, ConfigError
from scd.models import WanConfig
from scd.weights import model_from_tensors, read_tensors

TRANSFORMER_CONFIG = "transformer/config.json"
DEFAULT_BASE = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
# Self-Forcing's inference defaults (configs/self_forcing_dmd.yaml): what its generator was distilled for
SELF_FORCING_PIPELINE = {"chunk_frames": 3, "denoising_steps": (1000, 750, 500, 250), "warp_steps": True,
                         "timestep_shift": 5.0, "local_attn_size": None, "sink_size": 0, "context_noise": 0.0}

# diffusers' names -> Wan2.1's, applied in order to every key
_FROM_DIFFUSERS = [
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^(blocks\.\d+)\.attn1\.to_out\.0\.", r"\1.self_attn.o."),
    (r"^(blocks\.\d+)\.attn2\.to_out\.0\.", r"\1.cross_attn.o."),
    (r"^(blocks\.\d+)\.attn1\.to_([qkv])\.", r"\1.self_attn.\2."),
    (r"^(blocks\.\d+)\.attn2\.to_([qkv])\.", r"\1.cross_attn.\2."),
    (r"^(blocks\.\d+)\.attn1\.(norm_[qk])\.", r"\1.self_attn.\2."),
    (r"^(blocks\.\d+)\.attn2\.(norm_[qk])\.", r"\1.cross_attn.\2."),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),
    (r"^(blocks\.\d+)\.ffn\.net\.0\.proj\.", r"\1.ffn.0."),
    (r"^(blocks\.\d+)\.ffn\.net\.2\.", r"\1.ffn.2."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
]


def from_diffusers_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `WanTransformer3DModel` state dict under Wan2.1's names."""
    out = {}
    for key, value in tensors.items():
        for pattern, repl in _FROM_DIFFUSERS:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def is_diffusers_naming(tensors: dict) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1." in k for k in tensors)


def read_generator(path: Path, ema: bool = True) -> dict[str, torch.Tensor]:
    """The transformer's tensors under Wan2.1's names from a Self-Forcing `.pt` (`generator_ema`, or
    `generator` with ema=False; the wrapper's `model.` prefix dropped), a Wan2.1 or diffusers
    safetensors file, or a diffusers `transformer/` folder."""
    return read_weights(path, ema)[0]


def read_weights(path: Path, ema: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`read_generator`, and each tensor's name in the file (Wan2.1's name -> the file's)."""
    tensors = _read_any(Path(path), ema)
    if not is_diffusers_naming(tensors):
        return tensors, {k: k for k in tensors}
    renamed = from_diffusers_names(tensors)
    return renamed, dict(zip(renamed, tensors))


def _read_any(path: Path, ema: bool) -> dict[str, torch.Tensor]:
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path} holds no .safetensors weights")
        tensors = {}
        for file in files:
            tensors.update(read_tensors(file))
    elif path.suffix in (".pt", ".pth"):
        tensors = _self_forcing_tensors(path, ema)
    else:
        tensors = read_tensors(path)
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors: it is not a checkpoint")
    return tensors


def is_wan_source(path: Path) -> bool:
    """Whether `path` holds a causal Wan2.1 checkpoint: a Self-Forcing style or diffusers config.json
    beside it (or in it), a Self-Forcing `.pt`, or safetensors under Wan2.1's or diffusers' names."""
    path = Path(path)
    config = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            data = None
        if isinstance(data, dict) and ("model" in data and isinstance(data["model"], dict) and "dim" in data["model"]
                                       or data.get("family") == "wan" or "num_attention_heads" in data):
            return True
    if not path.is_file():
        return False
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                keys = list(f.keys())
        elif path.suffix in (".pt", ".pth"):
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            keys = list(data.get("generator_ema", data.get("generator", data))) if isinstance(data, dict) else []
        else:
            return False
    except Exception:  # noqa: BLE001 - not readable here: the format's own reader says why
        return False
    return any(re.match(r"^(model\.)?blocks\.\d+\.(self_attn|attn1)\.", k) for k in keys)


def _self_forcing_tensors(path: Path, ema: bool) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad or hostile file
        raise CheckpointError(f"cannot read {path} as a weights-only torch file: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a checkpoint: it holds a {type(data).__name__}")
    if "generator" in data or "generator_ema" in data:
        key = "generator_ema" if ema and "generator_ema" in data else "generator"
        if key not in data:
            raise CheckpointError(f"{path} has no {key!r} weights (it has {sorted(data)})")
        data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("model."): v for k, v in data.items()}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def config_from_diffusers(data: dict, **settings) -> WanConfig:
    """A WanConfig from a `WanTransformer3DModel` config (a base folder's transformer/config.json),
    streamed with Self-Forcing's settings unless `settings` says otherwise."""
    try:
        heads, head_dim = int(data["num_attention_heads"]), int(data["attention_head_dim"])
        sizes = dict(dim=heads * head_dim, num_heads=heads, ffn_dim=int(data["ffn_dim"]),
                     freq_dim=int(data.get("freq_dim", 256)), num_layers=int(data["num_layers"]),
                     text_dim=int(data.get("text_dim", 4096)), channels=int(data.get("in_channels", 16)),
                     patch_size=tuple(data.get("patch_size", (1, 2, 2))), eps=float(data.get("eps", 1e-6)))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"not a WanTransformer3DModel config: {err!r} is missing or wrong") from None
    if int(data.get("out_channels", sizes["channels"])) != sizes["channels"]:
        raise CheckpointError("a Wan transformer whose output channels differ from its input is not a video model")
    try:
        return WanConfig(**{**sizes, **SELF_FORCING_PIPELINE, **settings})
    except ConfigError as err:
        raise CheckpointError(f"the transformer config does not describe a model scd can stream: {err}") from None


def config_from_self_forcing(data: dict, **settings) -> WanConfig:
    """A WanConfig from a Self-Forcing style config.json: `model` (CausalWanModel's arguments) and
    optionally `pipeline` (denoising_step_list, warp_denoising_step, timestep_shift,
    num_frame_per_block, local_attn_size, sink_size, context_noise)."""
    model, pipeline = data.get("model"), data.get("pipeline", {})
    if not isinstance(model, dict) or not isinstance(pipeline, dict):
        raise CheckpointError("a Self-Forcing config needs a 'model' object (and optionally 'pipeline')")
    try:
        if model.get("in_dim", 16) != model.get("out_dim", 16):
            raise CheckpointError("a Wan transformer whose output channels differ from its input is not a video model")
        fields = dict(dim=model["dim"], ffn_dim=model["ffn_dim"], freq_dim=model.get("freq_dim", 256),
                      num_heads=model["num_heads"], num_layers=model["num_layers"],
                      text_dim=model.get("text_dim", 4096), text_len=model.get("text_len", 512),
                      channels=model.get("in_dim", 16), patch_size=tuple(model.get("patch_size", (1, 2, 2))),
                      eps=model.get("eps", 1e-6))
        local = pipeline.get("local_attn_size", model.get("local_attn_size", -1))
        stream = dict(chunk_frames=pipeline.get("num_frame_per_block", 3),
                      denoising_steps=tuple(pipeline.get("denoising_step_list", (1000, 750, 500, 250))),
                      warp_steps=pipeline.get("warp_denoising_step", True),
                      timestep_shift=pipeline.get("timestep_shift", 5.0),
                      local_attn_size=None if local == -1 else local,
                      sink_size=pipeline.get("sink_size", model.get("sink_size", 0)),
                      context_noise=pipeline.get("context_noise", 0))
        return WanConfig(**{**fields, **stream, **settings})
    except KeyError as err:
        raise CheckpointError(f"the Self-Forcing config lacks {err}") from None
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"the Self-Forcing config does not describe a model scd can stream: {err}") from None


def wan_config(weights: Path, base_folder: Path | None = None, **settings) -> WanConfig:
    """The config of Wan weights: a config.json beside them (Self-Forcing style, or scd's own with
    `family: wan`), else the base folder's transformer/config.json."""
    weights = Path(weights)
    beside = weights / "config.json" if weights.is_dir() else weights.parent / "config.json"
    if beside.is_file():
        data = _read_json(beside)
        if "model" in data:
            return config_from_self_forcing(data, **settings)
        if data.get("family") == "wan":
            return WanConfig.from_dict({**data, **settings})
        if "num_attention_heads" in data:
            return config_from_diffusers(data, **settings)
    if base_folder is None:
        raise CheckpointError(f"the sizes of {weights} are not in its file: give the base model folder "
                              f"(with {TRANSFORMER_CONFIG})", parameter="base")
    path = Path(base_folder) / TRANSFORMER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{base_folder} is not a Wan base folder: it has no {TRANSFORMER_CONFIG}",
                              parameter="base")
    return config_from_diffusers(_read_json(path), **settings)


def load_wan(weights: Path, base_folder: Path | None = None, ema: bool = True, **settings):
    """A causal Wan model holding the weights of `weights` (any format above), sized by its config;
    strict: a missing, unexpected or mis-shaped tensor is a CheckpointError naming it."""
    config = wan_config(weights, base_folder, **settings)
    tensors = read_generator(weights, ema)
    return model_from_tensors(config, tensors, str(weights))


# ----------------------------------------------------------------------------- the base

BASE_CONFIG_FILES = ("model_index.json", TRANSFORMER_CONFIG)  # what sizing a generator needs of its base
# what streaming text to video needs of it: all but the base transformer's weights (5.7 GB at 1.3B)
BASE_FILES = BASE_CONFIG_FILES + ("tokenizer/*", "text_encoder/*", "vae/*", "scheduler/*")
# generators known by their Hub repo alone: the file in it, and the base it replaces the transformer of
KNOWN_GENERATORS = {"gdhe17/Self-Forcing": ("checkpoints/self_forcing_dmd.pt", DEFAULT_BASE)}


def resolve_base(base: str | Path, files: tuple[str, ...] = BASE_CONFIG_FILES) -> tuple[Path, str | None]:
    """A base folder in the layout of Wan-AI/Wan2.1-T2V-1.3B-Diffusers: a local folder, or a Hub
    repo (owner/name@revision) of which only `files` (patterns) are fetched into the Hub cache, never
    the transformer's weights. Returns (folder, the Hub commit or None)."""
    local = Path(str(base)).expanduser()
    if local.is_dir():
        return local, None
    from scd import hub  # deferred: huggingface_hub is only needed for Hub references

    ref = hub.parse_hub_ref(str(base))
    if ref is None or ref.path_in_repo:
        raise CheckpointError(f"base {base} is neither a folder nor a Hub repo id (owner/name[@revision])",
                              parameter="base")
    return hub.fetch_model_folder(ref, allow_patterns=files)
