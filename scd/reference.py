"""The reference formats: FAR's and the official SCD trainer's checkpoints, options files and
published files.

- Size presets (B, M, L, XL), one table for FAR, SCD and scd's own `preset`.
- Options files (YAML): the transformer's constructor arguments, the `vae` section and the
  evaluation settings (`val.sample_cfg`) become a `ModelConfig` and a codec source.
- FAR's published files (`guyuchao/FAR_Models`): every file by name, with the architecture,
  resolution, conditioning and evaluation settings of the options that use it, and the DC-AE it
  needs, so that a file runs with no options file. FAR names files `NAME-<sha256[:8]>.pth`; the
  hash is checked on every read.
- Sizes read off a bare state dict (a FAR `.pth` without its options).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
import yaml

from scd import files
from scd.codecs import DCAECodec, build_dcae, dcae_downsample, read_dcae_config
from scd.errors import CheckpointError, ConfigError
from scd.loaded import LoadedModel
from scd.models import PRESET_ROPE, PRESETS, ModelConfig, preset_sizes  # noqa: F401 (the reference sizes, read here too)
from scd.models import default_rope_axes as model_rope_axes
from scd.weights import model_from_tensors, read_tensors

# ----------------------------------------------------------------------------- FAR's file names and hashes

FAR_REPO = "guyuchao/FAR_Models"
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
# FAR publishes files as NAME-<first 8 hex digits of the file's sha256>.pth
FAR_HASHED_NAME = re.compile(r"-([0-9a-f]{8})\.(?:pth|pt|bin|ckpt|safetensors)$")


def check_far_name(name: str, sha256: str) -> None:
    """FAR names its files `NAME-xxxxxxxx.pth`, xxxxxxxx the first 8 hex digits of their sha256:
    refuse a file whose name carries that pattern and whose content does not match it."""
    match = FAR_HASHED_NAME.search(name)
    if match and not sha256.startswith(match[1]):
        raise CheckpointError(f"{name} is named for sha256 {match[1]}... but its content hashes to {sha256[:8]}...: "
                              "the file is corrupt, truncated or altered; download it again (if it never came from "
                              "FAR, rename it so it does not end in -<8 hex digits>)")


def hashed(path: Path, name: str | None = None) -> str:
    """The sha256 of `path`, checked against the hash in its published `name` (default: its own)."""
    sha = files.file_sha256(path)
    check_far_name(name or Path(path).name, sha)
    return sha


# ----------------------------------------------------------------------------- FAR's published files

@dataclass(frozen=True)
class FarDCAE:
    """One of FAR's DC-AE autoencoders: `compression` pixels per latent, 32 latent channels."""

    path: str  # in FAR's Hub repo
    data: str
    resolution: int
    compression: int

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name


@dataclass(frozen=True)
class FarModel:
    """One of FAR's transformers, with the settings its evaluation options use."""

    path: str  # in FAR's Hub repo
    preset: str  # B, M, L, XL
    long: bool  # FAR_Long: a long-term-context branch scd drops (reported)
    data: str
    resolution: int
    context_frames: int  # prompt frames the evaluation gives it (0: generated from pure noise)
    unroll: int  # frames the evaluation generates
    condition: str | None  # None, "action" or "label"
    num_classes: int
    guidance: float
    dcae: str  # the stem of its autoencoder's file name (a key of FAR_DCAES)

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def latent_size(self) -> int:
        return self.resolution // FAR_DCAES[self.dcae].compression


def published_stem(name: str) -> str:
    """A FAR file's name without its hash and suffix: `FAR_B_BAIR_Uncond64-1983191b.pth` -> `FAR_B_BAIR_Uncond64`."""
    name = PurePosixPath(str(name)).name
    match = FAR_HASHED_NAME.search(name)
    return name[:match.start()] if match else PurePosixPath(name).stem


def _dcae(path: str, data: str, resolution: int, compression: int) -> tuple[str, FarDCAE]:
    entry = FarDCAE(path, data, resolution, compression)
    return published_stem(path), entry


# From FAR's README (model zoo) and its options/test files (showlab/FAR).
FAR_DCAES = dict([
    _dcae("dcae/DCAE_UCF101_Res64-9da18dcf.pth", "UCF-101", 64, 8),
    _dcae("dcae/DCAE_UCF101_Res128-bb9d1258.pth", "UCF-101", 128, 16),
    _dcae("dcae/DCAE_UCF101_Res256-9c4355c8.pth", "UCF-101", 256, 32),
    _dcae("dcae/DCAE_BAIR_Res64-1a8547fb.pth", "BAIR", 64, 8),
    _dcae("dcae/DCAE_DMLab_Res64-17035ae5.pth", "DMLab", 64, 8),
    _dcae("dcae/DCAE_Minecraft_Res128-a5677f66.pth", "Minecraft", 128, 16),
])


def _far(path, preset, data, resolution, context, unroll, condition, classes, guidance, dcae, long=False):
    entry = FarModel(path, preset, long, data, resolution, context, unroll, condition, classes, guidance,
                     published_stem(dcae))
    return published_stem(path), entry


FAR_MODELS = dict([
    _far("video_generation/FAR_L_UCF101_Uncond128-c19abd2c.pth", "L", "UCF-101", 128, 0, 16, None, 0, 1.0,
         "DCAE_UCF101_Res128-bb9d1258.pth"),
    _far("video_generation/FAR_L_UCF101_Cond128-c6f798bf.pth", "L", "UCF-101", 128, 0, 16, "label", 101, 2.0,
         "DCAE_UCF101_Res128-bb9d1258.pth"),
    _far("video_generation/FAR_L_UCF101_Uncond256-adea51e9.pth", "L", "UCF-101", 256, 0, 16, None, 0, 1.0,
         "DCAE_UCF101_Res256-9c4355c8.pth"),
    _far("video_generation/FAR_L_UCF101_Cond256-41c6033f.pth", "L", "UCF-101", 256, 0, 16, "label", 101, 2.0,
         "DCAE_UCF101_Res256-9c4355c8.pth"),
    _far("video_generation/FAR_XL_UCF101_Uncond256-3594ce6b.pth", "XL", "UCF-101", 256, 0, 16, None, 0, 1.0,
         "DCAE_UCF101_Res256-9c4355c8.pth"),
    _far("video_generation/FAR_XL_UCF101_Cond256-28a88f56.pth", "XL", "UCF-101", 256, 0, 16, "label", 101, 2.0,
         "DCAE_UCF101_Res256-9c4355c8.pth"),
    _far("short_video_prediction/FAR_B_UCF101_Uncond64-381d295f.pth", "B", "UCF-101", 64, 4, 12, None, 0, 1.0,
         "DCAE_UCF101_Res64-9da18dcf.pth"),
    _far("short_video_prediction/FAR_B_BAIR_Uncond64-1983191b.pth", "B", "BAIR", 64, 2, 28, None, 0, 1.0,
         "DCAE_BAIR_Res64-1a8547fb.pth"),
    _far("long_video_prediction/FAR_B_Long_DMLab_Action64-c09441dc.pth", "B", "DMLab", 64, 144, 156, "action", 4,
         1.5, "DCAE_DMLab_Res64-17035ae5.pth", long=True),
    _far("long_video_prediction/FAR_M_Long_Minecraft_Action128-4c041561.pth", "M", "Minecraft", 128, 144, 156,
         "action", 4, 1.5, "DCAE_Minecraft_Res128-a5677f66.pth", long=True),
])
FAR_LATENT_CHANNELS = 32
FAR_SCALING_FACTOR = 0.2889  # every DC-AE config of FAR's (options/model_cfg/dcae/*.json)


def dcae_config(compression: int) -> dict:
    """The diffusers AutoencoderDC config of FAR's DC-AE with `compression` (8, 16 or 32) pixels per
    latent: FAR's options/model_cfg/dcae/model_{8,16,32}x_c32_config.json, which its Hub repo lacks.
    Every stage after the first halves the size; the first three are ResBlock stages, the rest
    EfficientViT stages."""
    stages = {8: 4, 16: 5, 32: 6}.get(compression)
    if stages is None:
        raise ConfigError(f"FAR's DC-AEs compress 8, 16 or 32 times, not {compression}")
    cut = lambda values: list(values[:stages])
    kinds = ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3
    return {"_class_name": "AutoencoderDC", "attention_head_dim": 32, "in_channels": 3,
            "latent_channels": FAR_LATENT_CHANNELS, "scaling_factor": FAR_SCALING_FACTOR,
            "downsample_block_type": "pixel_unshuffle", "upsample_block_type": "pixel_shuffle",
            "encoder_block_out_channels": cut([128, 256, 512, 512, 1024, 1024]),
            "decoder_block_out_channels": cut([128, 256, 512, 512, 1024, 1024]),
            "encoder_block_types": cut(kinds), "decoder_block_types": cut(kinds),
            "encoder_layers_per_block": cut([0, 4, 8, 2, 2, 2]), "decoder_layers_per_block": cut([0, 5, 10, 2, 2, 2]),
            "encoder_qkv_multiscales": [[]] * stages, "decoder_qkv_multiscales": [[]] * stages,
            "decoder_act_fns": cut(["relu"] * 3 + ["silu"] * 3),
            "decoder_norm_types": cut(["batch_norm"] * 3 + ["rms_norm"] * 3)}


# FAR's options name its DC-AE configs by their path in the FAR repository
FAR_DCAE_CONFIG = re.compile(r"(?:^|/)model_(8|16|32)x_c32_config\.json$")


def far_model(name: str) -> FarModel | None:
    """The entry of one of FAR's published transformers by file name (any folder; the hash in the
    name is the file's own and is checked when it is read), or None."""
    return FAR_MODELS.get(published_stem(name))


def far_settings(entry: FarModel) -> dict:
    """The ModelConfig fields of a FAR file that its tensors do not say: frame and latent size,
    codec, and the evaluation's context length and guidance."""
    dcae = FAR_DCAES[entry.dcae]
    return dict(latent_size=(entry.latent_size,) * 2, frame_size=(entry.resolution,) * 2,
                codec={"type": "dcae", "scaling_factor": FAR_SCALING_FACTOR, "downsample": dcae.compression},
                context_frames=entry.context_frames, default_guidance=entry.guidance)


# ----------------------------------------------------------------------------- options files

def read_options(path: Path) -> dict:
    try:
        options = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise CheckpointError(f"cannot read options file {path}: {err}") from None
    if not isinstance(options, dict):
        raise CheckpointError(f"options file {path} is not a YAML mapping")
    return options


def _model_options(options: dict) -> dict:
    node = options
    for key in ("models", "model_cfg"):
        if isinstance(node, dict) and key in node:
            node = node[key]
    return node if isinstance(node, dict) else {}


def _transformer_options(options: dict) -> dict:
    node = _model_options(options).get("transformer", options)
    if not isinstance(node, dict) or "init_cfg" not in node:
        raise CheckpointError("the options file has no models.model_cfg.transformer.init_cfg section")
    return node


def sample_options(options: dict) -> dict:
    """`val.sample_cfg`: the settings the reference evaluates with (may be empty)."""
    node = (options.get("val") or {}).get("sample_cfg") or {}
    return node if isinstance(node, dict) else {}


def _stack_options(cfg: dict) -> tuple[str, dict]:
    kind = str(cfg.get("type", ""))
    args = dict(cfg.get("config") or {})
    parts = kind.split("_")  # e.g. SCD_M_encoder, FAR_B, FAR_M_Long
    if len(parts) > 1 and parts[1] in PRESETS:
        sizes = preset_sizes(parts[1])
        for name, value in (("num_attention_heads", sizes["num_heads"]), ("attention_head_dim", sizes["head_dim"]),
                            ("in_channels", sizes["channels"]), ("out_channels", sizes["channels"]),
                            ("patch_size", sizes["patch_size"]), ("axes_dims_rope", sizes["rope_axes"])):
            args.setdefault(name, value)
        if parts[-1] not in ("encoder", "decoder"):
            args.setdefault("num_layers", sizes["layers"])
    return kind, args


def _sampling_fields(options: dict) -> dict:
    """ModelConfig defaults from `val.sample_cfg`: context length, steps, guidance and its mode."""
    sample = sample_options(options)
    fields = {}
    if "context_length" in sample:
        fields["context_frames"] = int(sample["context_length"])
    if "num_inference_steps" in sample:
        fields["default_steps"] = int(sample["num_inference_steps"])
    if "guidance_scale" in sample:
        fields["default_guidance"] = float(sample["guidance_scale"])
    if sample.get("cfg_type") == "decoder":
        fields["guidance_mode"] = "decoder"
    return fields


def config_from_options(options: dict, latent_size: tuple[int, int] | None = None, **extra) -> ModelConfig:
    """A ModelConfig from an official SCD or FAR options file (parsed YAML).

    The latent size is not part of the transformer options: it comes from `latent_size`, or the
    options' `val.sample_cfg.sample_size`, or the reference default of 8. The evaluation settings
    (`val.sample_cfg`: context length, steps, guidance, `cfg_type`) become the model's defaults."""
    node = _transformer_options(options)
    kind = "model"
    try:
        kind, enc = _stack_options(node["init_cfg"])
        if latent_size is None:
            size = sample_options(options).get("sample_size", 8)
            latent_size = (size, size)
        if enc.get("in_channels", 32) != enc.get("out_channels", 32):
            raise CheckpointError("in_channels != out_channels is not supported")
        cond = enc.get("condition_cfg")
        condition = None if not cond else cond.get("type")
        num_classes = 0 if not cond else cond.get("num_action_classes", cond.get("num_classes", 0))
        common = dict(num_heads=enc["num_attention_heads"], head_dim=enc["attention_head_dim"],
                      channels=enc["in_channels"], patch_size=enc.get("patch_size", 1),
                      rope_axes=tuple(enc.get("axes_dims_rope", PRESET_ROPE)), condition=condition,
                      num_classes=num_classes, latent_size=tuple(latent_size), **_sampling_fields(options))
        common.update(extra)
        if kind.startswith("FAR"):
            return ModelConfig(arch="baseline", layers=enc["num_layers"], decoder_layers=0, **common)
        if "decoder_cfg" not in node:
            raise CheckpointError(f"options of type {kind!r} have no decoder_cfg: not an SCD model")
        _, dec = _stack_options(node["decoder_cfg"])
        return ModelConfig(arch="scd", layers=enc["num_layers"] + dec["num_layers"], decoder_layers=dec["num_layers"],
                           decoder_combine=dec.get("decoder_input_combine", "concat"),
                           encoder_noise=float(enc.get("noise_strength", 0.0)),
                           encoder_norm_unconditional=bool(enc.get("norm_out_unconditional", False)), **common)
    except KeyError as err:
        raise CheckpointError(f"the options file lacks {err} for a {kind or 'model'} transformer") from None
    except (TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"the options file has a value of the wrong kind for a {kind or 'model'} transformer: {err}") from None
    except ConfigError as err:
        raise CheckpointError(f"the options file describes an impossible model: {err}") from None


@dataclass(frozen=True)
class VaeOptions:
    """The options' `vae` section: where the DC-AE's config and weights are. `config` is a path (relative
    paths as written), or None with `compression` set when it names one of FAR's own configs."""

    config: str | None
    weights: str | None
    compression: int | None = None


def vae_options(options: dict) -> VaeOptions | None:
    """The `models.model_cfg.vae` section of an options file, or None when it has none."""
    vae = _model_options(options).get("vae")
    if not isinstance(vae, dict):
        return None
    kind = str(vae.get("type", "MyAutoencoderDC"))
    if "AutoencoderDC" not in kind:
        raise CheckpointError(f"the options' vae is a {kind}: scd runs DC-AE autoencoders (AutoencoderDC) only")
    config, weights = vae.get("from_config"), vae.get("from_config_pretrained")
    match = FAR_DCAE_CONFIG.search(str(config or ""))
    return VaeOptions(None if config is None else str(config), None if weights is None else str(weights),
                      int(match[1]) if match else None)


# ----------------------------------------------------------------------------- checkpoints by their keys

# FAR_Long's long-term-context branch: no counterpart in SCD or the FAR baseline
FAR_LONG_ONLY = re.compile(r"(?:context_embedder|context_proj_out)\.|transformer_blocks\.\d+\.attn\."
                           r"(?:add_q_proj|add_k_proj|add_v_proj|to_add_out|norm_added_q|norm_added_k)\.")
BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.+)")


def reference_kind(tensors: dict[str, torch.Tensor]) -> str:
    """'scd' (official trainer), 'far_long' (FAR_Long) or 'far' by the key layout."""
    if any(k.startswith("encoder.") for k in tensors):
        return "scd"
    if "context_embedder.weight" in tensors:
        return "far_long"
    return "far"


def split_far_long(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(the FAR part, the long-term-context branch) of a FAR_Long state dict."""
    long = {k: v for k, v in tensors.items() if FAR_LONG_ONLY.match(k)}
    return {k: v for k, v in tensors.items() if k not in long}, long


def default_rope_axes(head_dim: int) -> tuple[int, int, int] | None:
    """FAR's own split (`scd.models.default_rope_axes` where FAR's proportions are whole even
    numbers, head dims that are multiples of 16), or None: a bare FAR file of another head dim
    must be told its split, since a guess would silently change the numerics."""
    return model_rope_axes(head_dim) if head_dim % 16 == 0 else None


@dataclass(frozen=True)
class SizeHints:
    """What a bare FAR state dict does not say (or what to check it against): a preset, explicit
    sizes, and the latent size. None: read off the tensors, or FAR's default."""

    preset: str | None = None
    num_heads: int | None = None
    head_dim: int | None = None
    layers: int | None = None
    channels: int | None = None
    patch_size: int | None = None
    rope_axes: tuple[int, int, int] | None = None
    latent_size: tuple[int, int] | None = None

    def given(self) -> list[str]:
        """The names of the sizes set (the latent size aside)."""
        return [n for n in ("preset", "num_heads", "head_dim", "layers", "channels", "patch_size", "rope_axes")
                if getattr(self, n) is not None]


def infer_far_config(tensors: dict[str, torch.Tensor], source: str, hints: SizeHints = SizeHints()) -> ModelConfig:
    """The baseline config of a FAR state dict without its options file. Width, head dim, depth and
    the condition table are read off the tensors; a preset or explicit sizes are checked against
    them. Not stored in the file: the patch size (default 1, as every FAR preset), the RoPE axes
    (default FAR's proportions) and the latent size (default 8: FAR's 64 px at 8x and 128 px at 16x)."""
    needed = ("x_embedder.weight", "transformer_blocks.0.attn.norm_q.weight", "proj_out.weight")
    absent = [k for k in needed if k not in tensors]
    if absent:
        names = ", ".join(list(tensors)[:4]) + (", ..." if len(tensors) > 4 else "")
        raise CheckpointError(f"{source} is not a FAR, FAR_Long or SCD checkpoint: it lacks {', '.join(absent)} "
                              f"(its tensors are {names})")
    width, in_dim = tensors["x_embedder.weight"].shape
    found_head_dim = tensors["transformer_blocks.0.attn.norm_q.weight"].shape[0]
    depth = 1 + max(int(m[1]) for k in tensors if (m := BLOCK.match(k)))
    if width % found_head_dim:
        raise CheckpointError(f"{source}: width {width} is not a multiple of the head dim {found_head_dim}")
    found = {"num_heads": width // found_head_dim, "head_dim": found_head_dim, "layers": depth}

    given = {}
    channels, patch_size = hints.channels, hints.patch_size
    if hints.preset is not None:
        sizes = preset_sizes(hints.preset)
        given.update({n: (sizes[n], f"preset {hints.preset} says") for n in found})
        channels = sizes["channels"] if channels is None else channels
        patch_size = sizes["patch_size"] if patch_size is None else patch_size
    for name in found:
        if getattr(hints, name) is not None:
            given[name] = (getattr(hints, name), f"{name} is")
    spoken = {"num_heads": "heads", "head_dim": "head dim", "layers": "layers"}
    for name, (value, origin) in given.items():
        if value != found[name]:
            raise CheckpointError(f"{source} has {found[name]} {spoken[name]} ({found['num_heads']} heads x "
                                  f"{found['head_dim']}, {found['layers']} blocks) but {origin} {value}: "
                                  "fix the sizes given")

    patch_size = patch_size or 1
    if channels is None:
        if in_dim % (patch_size * patch_size):
            raise CheckpointError(f"{source}: the token input has {in_dim} features, not a multiple of "
                                  f"patch {patch_size}^2: fix patch_size")
        channels = in_dim // (patch_size * patch_size)
    elif channels * patch_size * patch_size != in_dim:
        raise CheckpointError(f"{source}: the token input has {in_dim} features, not {channels} channels x patch "
                              f"{patch_size}^2: fix channels / patch_size")
    rope_axes = tuple(hints.rope_axes) if hints.rope_axes else default_rope_axes(found_head_dim)
    if rope_axes is None:
        raise ConfigError(f"{source} has head dim {found_head_dim}, which has no FAR default RoPE split: give "
                          "rope_axes (three even numbers summing to the head dim), or the options file")
    condition, classes = None, 0
    for name in ("action", "label"):
        table = tensors.get(f"{name}_embedder.embedding_table.weight")
        if table is not None:
            condition, classes = name, table.shape[0] - 1  # the last row is the null index
    try:
        return ModelConfig(arch="baseline", num_heads=found["num_heads"], head_dim=found_head_dim, channels=channels,
                           patch_size=patch_size, rope_axes=rope_axes, layers=depth, decoder_layers=0,
                           condition=condition, num_classes=classes, latent_size=tuple(hints.latent_size or (8, 8)))
    except ConfigError as err:
        raise ConfigError(f"the sizes of {source} make no valid model: {err}") from None


# ----------------------------------------------------------------------------- loading a reference checkpoint

@dataclass(frozen=True)
class CodecFiles:
    """A DC-AE to attach: its diffusers config and its weights file (`name` as published, for the hash)."""

    config: dict
    weights: Path
    name: str


def _near(folder: Path, stem: str) -> Path | None:
    """FAR's layout keeps the autoencoders in `dcae/` beside the transformers' folders."""
    for where in (folder, folder / "dcae", folder.parent / "dcae"):
        found = sorted(p for p in where.glob(f"{stem}*") if p.suffix in WEIGHT_SUFFIXES and published_stem(p.name) == stem)
        if found:
            return found[0]
    return None


def _from_hub(repo_id: str, revision: str | None, stem: str, needed_by: str) -> Path:
    from scd import hub  # deferred: huggingface_hub is only needed for Hub references

    folder, commit = hub.fetch_model_folder(hub.HubRef(repo_id, revision), allow_patterns=(f"dcae/{stem}*",))
    found = sorted(p for p in (folder / "dcae").glob(f"{stem}*")
                   if p.suffix in WEIGHT_SUFFIXES and published_stem(p.name) == stem)
    if not found:
        raise CheckpointError(f"{repo_id}@{commit[:12]} has no dcae/{stem}-*.pth, the autoencoder {needed_by} "
                              "needs: put it in a dcae/ folder beside the model's folder, or give an options file "
                              "whose vae section names it")
    return found[0]


def _dcae_config_for(weights: Path, stem: str) -> dict:
    """A config.json beside the weights (`NAME.json`), else FAR's own config for that DC-AE."""
    for candidate in (weights.with_suffix(".json"), weights.parent / f"{stem}.json"):
        if candidate.is_file():
            return read_dcae_config(candidate)
    if stem not in FAR_DCAES:
        raise CheckpointError(f"{weights.name} is not one of FAR's DC-AEs and has no {weights.with_suffix('.json').name} "
                              "config beside it: add its diffusers config there")
    return dcae_config(FAR_DCAES[stem].compression)


class NoCodec:
    """The codec of a latent model whose autoencoder is unknown: any use says what to add."""

    def __init__(self, message: str):
        self.message = message

    def _refuse(self, *args, **kwargs):
        raise CheckpointError(self.message)

    encode = decode = to = _refuse


def far_codec_files(entry: FarModel, weights: Path, hub_ref=None) -> CodecFiles:
    """The DC-AE of a FAR transformer: beside the local file (FAR's layout), else from the Hub repo the
    transformer came from (at the same commit), else from FAR's repository."""
    found = _near(Path(weights).parent, entry.dcae) if hub_ref is None else None
    if found is None:
        repo, revision = (hub_ref.repo_id, hub_ref.revision) if hub_ref is not None else (FAR_REPO, None)
        found = _from_hub(repo, revision, entry.dcae, entry.name)
    return CodecFiles(_dcae_config_for(found, entry.dcae), found, found.name)


def options_codec_files(vae: VaeOptions, options_path: Path, weights: Path) -> CodecFiles:
    """The DC-AE an options file's vae section names. Paths are relative to the options file (or to
    the working directory); FAR's own configs and DC-AE files are found by name as well."""
    def local(text: str | None) -> Path | None:
        if text is None:
            return None
        for candidate in (Path(options_path).parent / text, Path(text)):
            if candidate.is_file():
                return candidate
        return None

    weights_path = local(vae.weights)
    if weights_path is None and vae.weights is not None and published_stem(vae.weights) in FAR_DCAES:
        stem = published_stem(vae.weights)
        weights_path = _near(Path(weights).parent, stem) or _from_hub(FAR_REPO, None, stem, str(options_path))
    if weights_path is None:
        raise CheckpointError(f"the vae of {options_path} names weights {vae.weights!r}, which do not exist: put the "
                              "DC-AE there (a path relative to the options file)")
    config_path = local(vae.config)
    if config_path is not None:
        config = read_dcae_config(config_path)
    elif vae.compression is not None:
        config = dcae_config(vae.compression)
    else:
        raise CheckpointError(f"the vae of {options_path} names config {vae.config!r}, which does not exist: put the "
                              "DC-AE's diffusers config.json there (a path relative to the options file)")
    return CodecFiles(config, weights_path, weights_path.name)


def build_codec(files: CodecFiles, config: ModelConfig, source: str):
    """The DCAECodec of `files` for the model of `config`, checked: its latent channels and its
    compression must fit the model's latents and frame size."""
    hashed(files.weights, files.name)
    compression = dcae_downsample(files.config)
    stem = published_stem(files.name)
    known = FAR_DCAES.get(stem)
    want = config.codec.downsample
    channels = files.config.get("latent_channels")
    if channels != config.channels:
        raise CheckpointError(f"the DC-AE {files.name} makes {channels}-channel latents but {source} works on "
                              f"{config.channels} channels: give the autoencoder the model was trained with")
    frame = config.frame_size[0]
    if want is not None and compression != want:
        raise CheckpointError(f"the DC-AE {files.name} compresses {compression}x but {source} works on {frame} px "
                              f"frames as {config.latent_size[0]} px latents ({want}x): give the autoencoder of that "
                              "resolution")
    if known is not None and known.resolution != frame:
        raise CheckpointError(f"the DC-AE {files.name} is FAR's for {known.resolution} px frames but {source} works on "
                              f"{frame} px frames: give the autoencoder of that resolution")
    autoencoder = build_dcae(files.config, read_tensors(files.weights), files.name)
    return DCAECodec(autoencoder, config.codec.scaling_factor or FAR_SCALING_FACTOR, compression)


def load_reference(weights: Path, options: Path | None = None, latent_size=None, name: str | None = None,
                   hub_ref=None):
    """An official SCD or FAR checkpoint, ready to run in pixels.

    With `options` (the checkpoint's options file) its transformer, vae and evaluation settings are
    read from there. Without, `weights` must be one of FAR's published files (by `name`, default its
    own file name): its sizes are read off the tensors, the rest comes from `FAR_MODELS`, and its DC-AE
    is found beside it (FAR's layout) or fetched from the Hub repository it came from (`hub_ref`).
    A FAR-hashed name is checked against the content. FAR_Long's long-term-context branch is dropped
    (the model sees its short-term window), which `LoadedModel.notes` says."""
    weights = Path(weights)
    name = name or weights.name
    source = str(hub_ref) if hub_ref is not None else str(weights)
    hashed(weights, name)
    tensors = read_tensors(weights)
    notes = []
    if reference_kind(tensors) == "far_long":
        tensors, long = split_far_long(tensors)
        notes.append(f"FAR_Long's long-term-context branch ({len(long)} tensors) has no counterpart here and is "
                     "left out: the model sees its short-term window only")
    entry = far_model(name) if options is None else None
    if options is not None:
        parsed = read_options(options)
        config = config_from_options(parsed, latent_size)
        vae = vae_options(parsed)
        if vae is not None:
            files = options_codec_files(vae, Path(options), weights)
            compression = dcae_downsample(files.config)
            codec = {"type": "dcae", "scaling_factor": float(files.config.get("scaling_factor", FAR_SCALING_FACTOR)),
                     "downsample": compression}
            config = dataclasses.replace(config, codec=codec,
                                         frame_size=tuple(s * compression for s in config.latent_size))
        elif config.channels == 3:
            files, config = None, dataclasses.replace(config, frame_size=config.latent_size)
        else:
            files = NoCodec(f"{options} has no vae section and the model works on {config.channels}-channel latents: "
                            "add the section (type MyAutoencoderDC, from_config, from_config_pretrained) so frames "
                            "can go through its DC-AE")
    elif entry is not None:
        config = infer_far_config(tensors, source, SizeHints(latent_size=latent_size or (entry.latent_size,) * 2))
        if (config.condition, config.num_classes) != (entry.condition, entry.num_classes):
            raise CheckpointError(f"{name} is named as FAR's {entry.data} model ({entry.condition or 'unconditional'}"
                                  f"{f', {entry.num_classes} classes' if entry.num_classes else ''}) but its tensors are "
                                  f"{config.condition or 'unconditional'}: it is not that file; give its options file")
        config = dataclasses.replace(config, **far_settings(entry))
        files = far_codec_files(entry, weights, hub_ref)
    else:
        raise CheckpointError(f"{name} is a bare checkpoint and not one of FAR's {len(FAR_MODELS)} published files "
                              "(known by name): give its options file")
    model = model_from_tensors(config, tensors, source)
    codec = build_codec(files, config, name) if isinstance(files, CodecFiles) else files
    return LoadedModel(model.eval(), config, source, _codec=codec, notes=notes)
