"""Port causal-diffusion checkpoints into scd model folders.

Sources: FAR and FAR_Long `.pth` (with their options file, or sizes read off the tensors), the
official SCD trainer's outputs (`ema.pth`, accelerate's `model.safetensors`), and scd's own model
folders; each a local path or a Hub reference `owner/name:path/in/repo@revision`. A baseline
(FAR or an scd baseline folder) is split into an SCD encoder (its first K blocks) and decoder (its
last L blocks); an SCD source is re-saved as it is. A DC-AE autoencoder can be attached as `codec/`.

`convert` returns a `ConversionReport` naming every tensor mapped, created or dropped. It reads
and checks everything before it writes anything: a key it does not know, a shape that does not
fit, a file that is not a checkpoint or a FAR file whose name does not match its hash stops it
with a `CheckpointError` (or `ConfigError` for impossible options), and no folder is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch
from safetensors.torch import save_file

import scd
from scd.checkpoints import (CONFIG, REFERENCE_PRESETS, WEIGHTS, config_from_options, load_state, model_from_tensors,
                             read_folder_config, tensor_mismatches, read_options, read_tensors, reference_kind, save_model_folder)
from scd.codecs import (CODEC_DIR, DCAE_CONFIG, DCAE_SCALING_FACTOR, DCAE_WEIGHTS, build_dcae, dcae_downsample,
                        read_dcae_config)
from scd.errors import CheckpointError, ConfigError
from scd.model import default_rope_axes as model_rope_axes
from scd.model import DECODER_COMBINES, ModelConfig, build_model

MAPPED, CREATED, DROPPED = "mapped", "created", "dropped"
ENCODER_NORMS = ("identity", "copy")
DEFAULT_ENCODER_NORM = "identity"  # why: docs/convert.md, "The encoder's output norm"
REFERENCE_ENCODER_NOISE = 0.05  # the official recipe's feature noise (noise_strength), used when fine-tuning
DEFAULT_DOWNSAMPLE = 8  # DC-AE of FAR's 64 px models; Minecraft (128 px) is 16
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")

# FAR publishes files as NAME-<first 8 hex digits of the file's sha256>.pth
FAR_HASHED_NAME = re.compile(r"-([0-9a-f]{8})\.(?:pth|pt|bin|ckpt|safetensors)$")
# FAR_Long's long-term-context branch: no counterpart in SCD or the FAR baseline
FAR_LONG_ONLY = re.compile(r"(?:context_embedder|context_proj_out)\.|transformer_blocks\.\d+\.attn\."
                           r"(?:add_q_proj|add_k_proj|add_v_proj|to_add_out|norm_added_q|norm_added_k)\.")
BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.+)")
EMBEDDERS = ("x_embedder.", "timestep_embedder.", "action_embedder.", "label_embedder.")

KIND_NAMES = {"far": "FAR checkpoint", "far_long": "FAR_Long checkpoint", "scd": "official SCD trainer checkpoint",
              "baseline-folder": "scd baseline model folder", "scd-folder": "scd SCD model folder"}


# ----------------------------------------------------------------------------- the report

@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the conversion: `target` in the new folder (None when dropped), `source` in the
    checkpoint (None when created), `action` one of mapped / created / dropped."""

    target: str | None
    source: str | None
    action: str
    shape: tuple[int, ...]
    note: str = ""

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class ConversionReport:
    """What `convert` read, wrote and did to every tensor."""

    source: str  # as given: a path or a Hub reference
    kind: str  # a key of KIND_NAMES
    sha256: str  # of the weights file read
    revision: str | None  # the Hub commit the source was fetched at
    options: str | None  # the options file, or how the sizes were found
    config: ModelConfig
    entries: list[TensorEntry]
    folder: Path | None = None
    codec: str | None = None  # where the attached autoencoder came from
    codec_sha256: str | None = None
    pushed: str | None = None  # repo_id@commit after --push-to-hub
    notes: list[str] = field(default_factory=list)

    def totals(self) -> dict[str, tuple[int, int]]:
        """{action: (tensors, parameters)} for mapped, created and dropped."""
        out = {}
        for action in (MAPPED, CREATED, DROPPED):
            chosen = [e for e in self.entries if e.action == action]
            out[action] = (len(chosen), sum(e.numel for e in chosen))
        return out

    @property
    def description(self) -> str:
        return KIND_NAMES[self.kind]


# ----------------------------------------------------------------------------- sources

@dataclass(frozen=True)
class Source:
    text: str  # as given
    path: Path  # the local file or folder
    name: str  # the file name as published (for FAR's hash check)
    revision: str | None = None  # Hub commit


def resolve(text: str | Path, what: str = "source") -> Source:
    """A local path, or a Hub reference fetched into the Hub cache (a file when it names one with a
    weights, YAML or JSON suffix, else a model folder)."""
    text = str(text)
    local = Path(text).expanduser()
    if local.exists():
        return Source(text, local, local.name)
    from scd import hub  # deferred: huggingface_hub is only needed for Hub references

    looks_like_file = local.suffix in WEIGHT_SUFFIXES + (".yml", ".yaml", ".json")
    if ":" not in text and looks_like_file:
        raise CheckpointError(f"{what} {text} does not exist (a file on the Hub is written owner/name:path/in/repo)")
    ref = hub.parse_hub_ref(text)
    if ref is None:
        raise CheckpointError(f"{what} {text} does not exist")
    if ref.path_in_repo and PurePosixPath(ref.path_in_repo).suffix in WEIGHT_SUFFIXES + (".yml", ".yaml", ".json"):
        path, commit = hub.fetch_file(ref)
        return Source(text, path, PurePosixPath(ref.path_in_repo).name, commit)
    path, commit = hub.fetch_model_folder(ref)
    return Source(text, path, PurePosixPath(ref.path_in_repo or ref.repo_id).name, commit)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_far_name(name: str, sha256: str) -> None:
    """FAR names its files `NAME-xxxxxxxx.pth`, xxxxxxxx the first 8 hex digits of their sha256:
    refuse a file whose name carries that pattern and whose content does not match it."""
    match = FAR_HASHED_NAME.search(name)
    if match and not sha256.startswith(match[1]):
        raise CheckpointError(f"{name} is named for sha256 {match[1]}... but its content hashes to {sha256[:8]}...: "
                              "the file is corrupt, truncated or altered; download it again (if it never came from "
                              "FAR, rename it so it does not end in -<8 hex digits>)")


def _hashed(source: Source, path: Path | None = None) -> str:
    path = path or source.path
    sha = file_sha256(path)
    check_far_name(source.name if path == source.path else path.name, sha)
    return sha


# ----------------------------------------------------------------------------- sizes of a bare FAR file

def default_rope_axes(head_dim: int) -> tuple[int, int, int] | None:
    """FAR's own split (`scd.model.default_rope_axes` where FAR's proportions are whole even
    numbers, head dims that are multiples of 16), or None: a bare FAR file of another head dim
    must be told its split, since a guess would silently change the numerics."""
    return model_rope_axes(head_dim) if head_dim % 16 == 0 else None


def infer_far_config(tensors: dict[str, torch.Tensor], source: str, preset: str | None = None,
                     num_heads: int | None = None, head_dim: int | None = None, layers: int | None = None,
                     channels: int | None = None, patch_size: int | None = None,
                     rope_axes: tuple[int, int, int] | None = None,
                     latent_size: tuple[int, int] | None = None) -> ModelConfig:
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
    found = {"heads": width // found_head_dim, "head dim": found_head_dim, "layers": depth}

    given = {}
    if preset is not None:
        if preset.upper() not in REFERENCE_PRESETS:
            raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(REFERENCE_PRESETS)}")
        p_heads, p_layers = REFERENCE_PRESETS[preset.upper()]
        given.update({"heads": (p_heads, f"preset {preset}"), "head dim": (64, f"preset {preset}"),
                      "layers": (p_layers, f"preset {preset}")})
        channels = 32 if channels is None else channels
        patch_size = 1 if patch_size is None else patch_size
    for name, value, flag in (("heads", num_heads, "--heads"), ("head dim", head_dim, "--head-dim"),
                              ("layers", layers, "--layers")):
        if value is not None:
            given[name] = (value, flag)
    for name, (value, origin) in given.items():
        if value != found[name]:
            raise CheckpointError(f"{source} has {found[name]} {name} ({found['heads']} heads x {found['head dim']}, "
                                  f"{found['layers']} blocks) but {origin} says {value}: fix the size flags")

    patch_size = patch_size or 1
    if channels is None:
        if in_dim % (patch_size * patch_size):
            raise CheckpointError(f"{source}: the token input has {in_dim} features, not a multiple of "
                                  f"patch {patch_size}^2: fix --patch-size")
        channels = in_dim // (patch_size * patch_size)
    elif channels * patch_size * patch_size != in_dim:
        raise CheckpointError(f"{source}: the token input has {in_dim} features, not {channels} channels x patch "
                              f"{patch_size}^2: fix --channels / --patch-size")
    rope_axes = tuple(rope_axes) if rope_axes else default_rope_axes(found_head_dim)
    if rope_axes is None:
        raise ConfigError(f"{source} has head dim {found_head_dim}, which has no FAR default RoPE split: pass "
                          "--rope-axes T,H,W (three even numbers summing to the head dim), or --options")
    condition, classes = None, 0
    for name in ("action", "label"):
        table = tensors.get(f"{name}_embedder.embedding_table.weight")
        if table is not None:
            condition, classes = name, table.shape[0] - 1  # the last row is the null index
    try:
        return ModelConfig(arch="baseline", num_heads=found["heads"], head_dim=found_head_dim, channels=channels,
                           patch_size=patch_size, rope_axes=rope_axes, layers=depth, decoder_layers=0,
                           condition=condition, num_classes=classes, latent_size=tuple(latent_size or (8, 8)))
    except ConfigError as err:
        raise ConfigError(f"the sizes of {source} make no valid model: {err}") from None


# ----------------------------------------------------------------------------- mapping

def split_layers(depth: int, encoder_layers: int | None, decoder_layers: int | None) -> tuple[int, int]:
    """(K, L) for a baseline of `depth` blocks. Default: the reference's 2:1 split (8 + 4 of 12)."""
    if encoder_layers is None and decoder_layers is None:
        decoder_layers = max(1, depth // 3)
    if encoder_layers is None:
        encoder_layers = depth - decoder_layers
    if decoder_layers is None:
        decoder_layers = depth - encoder_layers
    if encoder_layers < 1 or decoder_layers < 1 or encoder_layers + decoder_layers != depth:
        raise ConfigError(f"--encoder-layers {encoder_layers} and --decoder-layers {decoder_layers} must each be "
                          f"at least 1 and add up to the baseline's {depth} blocks")
    return encoder_layers, decoder_layers


def _split_target(key: str, k: int) -> list[tuple[str, str]]:
    """Where a baseline tensor goes in SCD (target, note). Empty when it has no place."""
    match = BLOCK.fullmatch(key)
    if match:
        i, rest = int(match[1]), match[2]
        if i < k:
            return [(f"encoder.transformer_blocks.{i}.{rest}", "")]
        return [(f"decoder.transformer_blocks.{i - k}.{rest}", "")]
    if key.startswith(EMBEDDERS):
        return [(f"encoder.{key}", "embedder: copied to both halves"), (f"decoder.{key}", "embedder: copied to both halves")]
    if key.startswith(("proj_out.", "norm_out.")):
        return [(f"decoder.{key}", "output head")]
    return []


def _describe_init(tensor: torch.Tensor) -> str:
    if not tensor.is_floating_point():
        return "reference init"
    if not tensor.any():
        return "zeros (reference init)"
    if torch.equal(tensor, torch.ones_like(tensor)):
        return "ones (reference init)"
    if tensor.dim() == 2 and tensor.shape[1] == 2 * tensor.shape[0]:
        eye = torch.eye(tensor.shape[0], dtype=tensor.dtype)
        if torch.equal(tensor, torch.cat([eye, eye], dim=1)):
            return "[I | I] (reference init)"
    return "reference init"


def _fresh(config: ModelConfig) -> torch.nn.Module:
    """A model of `config` initialised as the references do, without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_model(config, init=True)


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = build_model(config, init=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_tensors(tensors: dict[str, torch.Tensor], config: ModelConfig, source: str) -> None:
    """Every tensor the config needs, of its shape, and nothing else; else one CheckpointError naming them."""
    problems = tensor_mismatches(_expected_shapes(config), tensors, unexpected_label="unknown")
    if problems:
        raise CheckpointError(f"{source} does not fit a {config.arch} model of these sizes ({'; '.join(problems)}): "
                              "check the options file or the size flags")


def _floating_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The source's floating dtype when it has one other than float32 (kept in the output)."""
    dtypes = {v.dtype for v in tensors.values() if v.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 and torch.float32 not in dtypes else None


def split_baseline(tensors: dict[str, torch.Tensor], base: ModelConfig, encoder_layers: int | None = None,
                   decoder_layers: int | None = None, decoder_combine: str = "token_concat",
                   encoder_norm: str = DEFAULT_ENCODER_NORM) -> tuple[torch.nn.Module, list[TensorEntry]]:
    """An SCD model from a baseline state dict (keys as in FAR, already checked against `base`).

    Blocks 0..K-1 become the encoder's, K..K+L-1 the decoder's 0..L-1; the embedders go to both
    halves; norm_out and proj_out to the decoder. The encoder's norm_out is the baseline's
    (`copy`) or the reference's zero init, a plain LayerNorm (`identity`). Tensors with no source
    (the encoder norm under identity, a `concat` input projection, a `token_concat_with_proj`
    alignment) start as `scd.model.init_weights` starts them."""
    if decoder_combine not in DECODER_COMBINES:
        raise ConfigError(f"--decoder-combine must be one of {', '.join(DECODER_COMBINES)}, not {decoder_combine!r}")
    if encoder_norm not in ENCODER_NORMS:
        raise ConfigError(f"--encoder-norm must be identity or copy, not {encoder_norm!r}")
    k, l = split_layers(base.layers, encoder_layers, decoder_layers)
    config = dataclasses.replace(base, arch="scd", decoder_layers=l, decoder_combine=decoder_combine,
                                 encoder_norm_unconditional=False, encoder_noise=REFERENCE_ENCODER_NOISE)
    model = _fresh(config)
    state = model.state_dict()
    sources: dict[str, tuple[str, str]] = {}
    for key in tensors:
        targets = _split_target(key, k)
        if not targets:
            raise CheckpointError(f"baseline tensor {key} has no place in an SCD model")
        for target, note in targets:
            sources[target] = (key, note)
    if encoder_norm == "copy":
        for key in tensors:
            if key.startswith("norm_out."):
                sources[f"encoder.{key}"] = (key, "copied from the baseline's output norm (--encoder-norm copy)")
    filled, entries = {}, []
    for target, initial in state.items():
        if target in sources:
            key, note = sources[target]
            filled[target] = tensors[key]
            entries.append(TensorEntry(target, key, MAPPED, tuple(initial.shape), note))
        else:
            filled[target] = initial
            note = _describe_init(initial)
            if target.startswith("encoder.norm_out."):
                note += ": plain LayerNorm (--encoder-norm identity)"
            entries.append(TensorEntry(target, None, CREATED, tuple(initial.shape), note))
    load_state(model, filled, "the split baseline")
    return model, entries


def _straight(tensors: dict[str, torch.Tensor], config: ModelConfig) -> tuple[torch.nn.Module, list[TensorEntry]]:
    """The model of `config` holding `tensors` as they are (keys already checked)."""
    model = model_from_tensors(config, tensors, "the checkpoint")
    return model, [TensorEntry(k, k, MAPPED, tuple(v.shape)) for k, v in model.state_dict().items()]


# ----------------------------------------------------------------------------- codec

@dataclass
class _Codec:
    config: dict
    state: dict[str, torch.Tensor]
    origin: str
    sha256: str


def read_codec(codec: str | Path, codec_config: str | Path | None, scaling_factor: float | None,
               channels: int) -> tuple[_Codec, dict]:
    """A DC-AE from a diffusers folder (config.json + diffusion_pytorch_model.safetensors) or from a
    `.pth`/`.safetensors` state dict (FAR's DC-AE files) with a diffusers config json; loaded into
    diffusers' AutoencoderDC to prove it is complete. Returns it and the config's `codec` entry."""
    source = resolve(codec, "codec")
    if source.path.is_dir():
        if codec_config is not None:
            raise ConfigError("--codec-config is for a codec given as a single weights file; this codec is a folder")
        config = read_dcae_config(source.path / DCAE_CONFIG)
        weights = source.path / DCAE_WEIGHTS
        if not weights.is_file():
            raise CheckpointError(f"{source.path} has no {DCAE_WEIGHTS}: give a diffusers AutoencoderDC folder")
        factor = scaling_factor if scaling_factor is not None else config.get("scaling_factor", DCAE_SCALING_FACTOR)
        sha = _hashed(source, weights)
    else:
        if codec_config is None:
            raise ConfigError(f"{source.text} is a bare weights file: pass its diffusers config with --codec-config "
                              "(for FAR's DC-AE: options/model_cfg/dcae/model_*_config.json in the FAR repository)")
        config = read_dcae_config(resolve(codec_config, "codec config").path)
        weights = source.path
        factor = scaling_factor if scaling_factor is not None else DCAE_SCALING_FACTOR  # FAR's latents
        sha = _hashed(source)
    autoencoder = build_dcae(config, read_tensors(weights), str(source.text))
    latent_channels = autoencoder.config.latent_channels
    if latent_channels != channels:
        raise CheckpointError(f"the DC-AE makes {latent_channels}-channel latents but the model works on {channels} "
                              "channels: attach the autoencoder the model was trained with")
    config = {**config, "_class_name": "AutoencoderDC", "scaling_factor": float(factor)}
    state = {k: v.detach().clone().contiguous() for k, v in autoencoder.state_dict().items()}
    return _Codec(config, state, source.text, sha), {"type": "dcae", "scaling_factor": float(factor),
                                                     "downsample": dcae_downsample(config)}


# ----------------------------------------------------------------------------- the model card

def _group(key: str | None) -> str:
    """A tensor's module, with a block's index kept: `decoder.transformer_blocks.2`, `x_embedder`."""
    if key is None:
        return "-"
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part == "transformer_blocks" and i + 1 < len(parts):
            return ".".join(parts[:i + 2])
    return ".".join(parts[:-1]) or key


def model_card(report: ConversionReport, out: Path) -> str:
    c = report.config
    arch = (f"SCD, {c.encoder_layers} encoder + {c.decoder_layers} decoder blocks, decoder input {c.decoder_combine}"
            if c.arch == "scd" else f"causal baseline, {c.layers} blocks")
    rows = [("source", f"`{report.source}`" + (f" at commit `{report.revision}`" if report.revision else "")),
            ("kind", report.description), ("source sha256", f"`{report.sha256}`"),
            ("sizes from", report.options or "-"),
            ("architecture", f"{arch}; width {c.width} ({c.num_heads} heads x {c.head_dim}), patch {c.patch_size}, "
                             f"{c.channels} x {c.latent_size[0]} x {c.latent_size[1]} latents"),
            ("codec", f"{c.codec.type}" + (f" from `{report.codec}` (sha256 `{report.codec_sha256}`)"
                                                  if report.codec else ""))]
    lines = ["---", "library_name: scd", "tags: [scd, video-generation, causal-diffusion]", "---", "",
             f"# {out.name}", "", f"Converted by `scd convert` (scd {scd.__version__}) from a {report.description}.", "",
             "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    if report.notes:
        lines += [f"- {note}" for note in report.notes] + [""]
    totals = report.totals()
    lines += ["## Totals", "", "| action | tensors | parameters |", "|---|---:|---:|"]
    lines += [f"| {a} | {n} | {p:,} |" for a, (n, p) in totals.items()] + [""]
    groups: dict[tuple[str, str, str], list] = {}
    for e in report.entries:
        groups.setdefault((_group(e.source), _group(e.target), e.action), []).append(e)
    lines += ["## Mapping", "", "| source | target | action | tensors | note |", "|---|---|---|---:|---|"]
    for (src, tgt, action), items in groups.items():
        notes = sorted({e.note for e in items if e.note})
        lines.append(f"| `{src}` | `{tgt}` | {action} | {len(items)} | {'; '.join(notes)} |")
    dropped = [e for e in report.entries if e.action == DROPPED]
    if dropped:
        lines += ["", "## Dropped", "", "These tensors of the source have no counterpart here:", ""]
        lines += [f"- `{e.source}` {list(e.shape)}" for e in dropped]
    lines += ["", "<details><summary>Every tensor</summary>", "", "| target | source | action | shape |",
              "|---|---|---|---|"]
    lines += [f"| {e.target or '-'} | {e.source or '-'} | {e.action} | {list(e.shape)} |" for e in report.entries]
    lines += ["", "</details>", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- convert

def _read_source(source: Source) -> tuple[str, dict[str, torch.Tensor], str, ModelConfig | None, Path | None]:
    """(kind, tensors, sha256, config of an scd folder, its codec folder)."""
    path = source.path
    if path.is_dir():
        if (path / CONFIG).is_file():
            config = read_folder_config(path)
            kind = "scd-folder" if config.arch == "scd" else "baseline-folder"
            codec = path / CODEC_DIR if (path / CODEC_DIR).is_dir() else None
            return kind, read_tensors(path / WEIGHTS), _hashed(source, path / WEIGHTS), config, codec
        if (path / WEIGHTS).is_file():  # accelerate's save_state folder of the official trainer
            path = path / WEIGHTS
            source = Source(source.text, path, WEIGHTS, source.revision)
        else:
            raise CheckpointError(f"{path} is neither a model folder (config.json + {WEIGHTS}) nor a trainer "
                                  f"checkpoint folder ({WEIGHTS}): give a folder or a checkpoint file")
    sha = _hashed(source, path)
    _check_container(path, source.text)
    tensors = read_tensors(path)
    if not tensors:
        raise CheckpointError(f"{source.text} holds no tensors: it is not a checkpoint")
    return reference_kind(tensors), tensors, sha, None, None


def _check_container(path: Path, text: str) -> None:
    """Name a file that is no PyTorch checkpoint before torch.load guesses at it. PyTorch writes a
    zip archive (legacy files: a pickle, first byte 0x80); safetensors files are checked on reading."""
    if path.suffix == ".safetensors":
        return
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{text} is truncated or corrupt (its zip archive has no end): download or copy it again")
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        raise CheckpointError(f"{text} is not a checkpoint: neither a PyTorch file (.pth, a zip archive) nor "
                              "safetensors; give the weights file itself")


def convert(source: str | Path, out: str | Path, *, options: str | Path | None = None, to: str = "scd",
            encoder_layers: int | None = None, decoder_layers: int | None = None,
            decoder_combine: str | None = None, encoder_norm: str | None = None,
            preset: str | None = None, num_heads: int | None = None, head_dim: int | None = None,
            layers: int | None = None, channels: int | None = None, patch_size: int | None = None,
            rope_axes: tuple[int, int, int] | None = None, latent_size: tuple[int, int] | None = None,
            codec: str | Path | None = None, codec_config: str | Path | None = None,
            scaling_factor: float | None = None, downsample: int | None = None,
            fps: float | None = None, overwrite: bool = False, push_to_hub: str | None = None,
            private: bool = False) -> ConversionReport:
    """Convert `source` (a path or Hub reference) into the model folder `out`.

    `to="scd"` splits a baseline into encoder + decoder (`encoder_layers` + `decoder_layers` =
    its depth; default 2:1), or re-saves an SCD source; `to="baseline"` re-saves a baseline
    (FAR_Long loses its long-context branch). Sizes of a bare FAR file come from `options` or from
    the tensors and the size arguments. `codec` attaches a DC-AE. Returns the report; raises
    CheckpointError / ConfigError / HubError before writing anything when the input is not understood.
    """
    if to not in ("scd", "baseline"):
        raise ConfigError(f"--to must be scd or baseline, not {to!r}")
    out = Path(out).expanduser()
    src = resolve(source)
    kind, tensors, sha, folder_config, folder_codec = _read_source(src)
    size_flags = {"--preset": preset, "--heads": num_heads, "--head-dim": head_dim, "--layers": layers,
                  "--channels": channels, "--patch-size": patch_size, "--rope-axes": rope_axes}
    given_sizes = [flag for flag, value in size_flags.items() if value is not None]
    notes: list[str] = []

    # ---- the source's own config, and its tensors checked against it
    if folder_config is not None:
        if options is not None or given_sizes or latent_size is not None:
            raise ConfigError(f"{src.text} is an scd model folder with its own config.json: drop --options and the size flags")
        base, origin = folder_config, "config.json of the source folder"
    elif options is not None:
        if given_sizes:
            raise ConfigError(f"the size flags ({', '.join(given_sizes)}) are for a checkpoint without --options")
        opt = resolve(options, "options file")
        base = config_from_options(read_options(opt.path), latent_size)
        origin = f"options file {opt.text}"
        if (kind == "scd") != (base.arch == "scd"):
            raise CheckpointError(f"{src.text} is a {KIND_NAMES[kind]} but {opt.text} describes a "
                                  f"{'SCD' if base.arch == 'scd' else 'FAR'} model: give the options file that goes with it")
    elif kind == "scd":
        raise CheckpointError(f"{src.text} is an official SCD trainer checkpoint: pass its options file with --options "
                              "(the encoder/decoder split and the decoder input mode are not stored in the weights)")
    else:
        base = infer_far_config({k: v for k, v in tensors.items() if not FAR_LONG_ONLY.match(k)}, src.text, preset,
                                num_heads, head_dim, layers, channels, patch_size, rope_axes, latent_size)
        origin = "the tensor shapes" + (f" and preset {preset}" if preset else "")
        guessed = [name for name, value in (("patch size 1", patch_size or preset),
                                            (f"RoPE axes {base.rope_axes}", rope_axes or preset),
                                            ("latent size 8 x 8", latent_size)) if value is None]
        if guessed:
            notes.append(f"not stored in the checkpoint, taken as FAR's defaults: {', '.join(guessed)}")

    dropped: list[TensorEntry] = []
    if kind == "far_long":
        for key in [k for k in tensors if FAR_LONG_ONLY.match(k)]:
            dropped.append(TensorEntry(None, key, DROPPED, tuple(tensors.pop(key).shape), "FAR_Long long-term context"))
        notes.append(f"FAR_Long's long-term-context branch ({len(dropped)} tensors) has no counterpart and was dropped: "
                     "the model sees its short-term window only")
    check_tensors(tensors, base, src.text)
    dtype = _floating_dtype(tensors)

    # ---- the target model
    split_args = {"--encoder-layers": encoder_layers, "--decoder-layers": decoder_layers,
                  "--decoder-combine": decoder_combine, "--encoder-norm": encoder_norm}
    if base.arch == "scd" or to == "baseline":
        if base.arch == "scd" and to == "baseline":
            raise ConfigError(f"{src.text} is already an SCD model: it cannot be turned back into a baseline")
        extra = [flag for flag, value in split_args.items() if value is not None]
        if extra:
            raise ConfigError(f"{', '.join(extra)} split a baseline into SCD; {src.text} is re-saved as it is")
        model, entries = _straight(tensors, base)
        config = base
    else:
        model, entries = split_baseline(tensors, base, encoder_layers, decoder_layers,
                                        decoder_combine or "token_concat", encoder_norm or DEFAULT_ENCODER_NORM)
        config = model.config
        span = lambda a, b: f"block {a}" if a == b else f"blocks {a}-{b}"
        notes.append(f"split from a {base.layers}-block baseline: {span(0, config.encoder_layers - 1)} -> encoder, "
                     f"{span(config.encoder_layers, base.layers - 1)} -> decoder; encoder norm "
                     f"{encoder_norm or DEFAULT_ENCODER_NORM}. Not yet trained as SCD: fine-tune it "
                     "(`scd train --init FOLDER`) before judging its frames")

    # ---- the codec, frame size and playback settings
    new_codec = None
    if codec is not None:
        new_codec, codec_entry = read_codec(codec, codec_config, scaling_factor, config.channels)
        if downsample is not None and downsample != codec_entry["downsample"]:
            raise ConfigError(f"--downsample {downsample} contradicts the DC-AE, which downsamples "
                              f"{codec_entry['downsample']}x")
    elif folder_config is not None:
        codec_entry = folder_config.codec.to_dict()
        if scaling_factor is not None or downsample is not None or codec_config is not None:
            raise ConfigError("--scaling-factor, --downsample and --codec-config go with --codec")
    elif config.channels == 3:
        codec_entry = {"type": "pixel"}
    else:
        codec_entry = {"type": "dcae", "scaling_factor": float(scaling_factor or DCAE_SCALING_FACTOR),
                       "downsample": int(downsample or DEFAULT_DOWNSAMPLE)}
        notes.append(f"the model works on {config.channels}-channel DC-AE latents but no autoencoder is attached: "
                     "attach it (`scd convert FOLDER --codec PATH --out NEW`) before generating from pixels")
    if codec_entry.get("type") == "pixel":
        frame_size = config.frame_size if folder_config is not None else config.latent_size
    else:
        frame_size = tuple(s * codec_entry["downsample"] for s in config.latent_size)
    config = dataclasses.replace(config, codec=codec_entry, frame_size=frame_size,
                                 fps=config.fps if fps is None else fps)
    model.config = config
    for part in model.parts().values():
        part.config = config

    report = ConversionReport(str(source), kind, sha, src.revision, origin, config, entries + dropped,
                              notes=notes)
    if new_codec is not None:
        report.codec, report.codec_sha256 = new_codec.origin, new_codec.sha256
    elif folder_codec is not None:
        report.codec = f"{src.text}/{CODEC_DIR}"

    # ---- write
    _prepare_out(out, src.path, overwrite)
    save_model_folder(model, out, model_card(report, out), dtype=dtype)
    if new_codec is not None:
        _write_codec(out / CODEC_DIR, new_codec)
    elif folder_codec is not None:
        shutil.copytree(folder_codec, out / CODEC_DIR)
    report.folder = out
    if push_to_hub:
        from scd import hub

        commit = hub.push_folder(out, push_to_hub, private=private,
                                 commit_message=f"scd convert {source} ({KIND_NAMES[kind]})")
        report.pushed = f"{push_to_hub}@{commit}"
    return report


def _prepare_out(out: Path, source: Path, overwrite: bool) -> None:
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise ConfigError(f"--out {out} is inside the source: choose another folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} exists and is not empty: choose another --out, or pass --overwrite")
        if (out / CODEC_DIR).is_dir():  # a stale autoencoder must not outlive the model it came with
            shutil.rmtree(out / CODEC_DIR)


def _write_codec(folder: Path, codec: _Codec) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(codec.state, str(folder / DCAE_WEIGHTS), metadata={"format": "pt"})
        (folder / DCAE_CONFIG).write_text(json.dumps(codec.config, indent=2) + "\n")
    except OSError as err:
        raise CheckpointError(f"cannot write the codec into {folder}: {err.strerror or err}") from None
