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
import json
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch
from safetensors.torch import save_file

from scd import checks, files, reference, wan_reference
from scd.cards import conversion_card
from scd.checkpoints import CONFIG, WEIGHTS, read_folder_config, save_model_folder
from scd.codecs import (
    CODEC_DIR,
    DCAE_CONFIG,
    DCAE_SCALING_FACTOR,
    DCAE_WEIGHTS,
    build_dcae,
    dcae_downsample,
    read_dcae_config,
)
from scd.errors import CheckpointError, ConfigError
from scd.models import DECODER_COMBINES, ModelConfig, build_model
from scd.reference import BLOCK, WEIGHT_SUFFIXES, SizeHints
from scd.weights import load_state, model_from_tensors, read_tensors, tensor_mismatches

MAPPED, CREATED, DROPPED = "mapped", "created", "dropped"
ENCODER_NORMS = ("identity", "copy")
DEFAULT_ENCODER_NORM = "identity"  # why: docs/convert.md, "The encoder's output norm"
REFERENCE_ENCODER_NOISE = 0.05  # the official recipe's feature noise (noise_strength), used when fine-tuning
DEFAULT_DOWNSAMPLE = 8  # DC-AE of FAR's 64 px models; Minecraft (128 px) is 16
EMBEDDERS = ("x_embedder.", "timestep_embedder.", "action_embedder.", "label_embedder.")

KIND_NAMES = {"far": "FAR checkpoint", "far_long": "FAR_Long checkpoint", "scd": "official SCD trainer checkpoint",
              "wan": "causal Wan2.1 checkpoint (Self-Forcing, Wan2.1 or diffusers names)",
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
    pushed: str | None = None  # repo_id@commit after push_to_hub
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


def _hashed(source: Source, path: Path | None = None) -> str:
    path = path or source.path
    return reference.hashed(path, source.name if path == source.path else path.name)


# ----------------------------------------------------------------------------- mapping

@dataclass(frozen=True)
class Split:
    """How a baseline becomes SCD. Blocks by count (the first `encoder_layers` to the encoder, the
    next `decoder_layers` to the decoder; default 2:1) or by index (`encoder_blocks`, `decoder_blocks`:
    lists or text like "0-24" and "0-4,25-29"; a block may be used twice or not at all)."""

    encoder_layers: int | None = None
    decoder_layers: int | None = None
    encoder_blocks: tuple[int, ...] | str | None = None
    decoder_blocks: tuple[int, ...] | str | None = None
    decoder_combine: str | None = None
    encoder_norm: str | None = None

    def given(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


def split_layers(depth: int, encoder_layers: int | None, decoder_layers: int | None) -> tuple[int, int]:
    """(K, L) for a baseline of `depth` blocks. Default: the reference's 2:1 split (8 + 4 of 12)."""
    if encoder_layers is None and decoder_layers is None:
        decoder_layers = max(1, depth // 3)
    if encoder_layers is None:
        encoder_layers = depth - decoder_layers
    if decoder_layers is None:
        decoder_layers = depth - encoder_layers
    if encoder_layers < 1 or decoder_layers < 1 or encoder_layers + decoder_layers != depth:
        raise ConfigError(f"encoder_layers {encoder_layers} and decoder_layers {decoder_layers} must each be at least 1 "
                          f"and add up to the baseline's {depth} blocks (to use fewer, repeat or skip blocks, choose "
                          "them by index: encoder_blocks, decoder_blocks)", parameter="encoder_layers")
    return encoder_layers, decoder_layers


def parse_blocks(spec, depth: int, name: str) -> tuple[int, ...]:
    """Block indices from a list or a text of indices and ranges ("0-4,25-29"), each in 0..depth-1."""
    if isinstance(spec, str):
        blocks = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
            if match is None:
                raise ConfigError(f"{name} takes block indices and ranges like 0-4,25-29, not {spec!r}", parameter=name)
            first, last = int(match[1]), int(match[2] or match[1])
            if last < first:
                raise ConfigError(f"{name}: the range {part} runs backwards", parameter=name)
            blocks += range(first, last + 1)
    else:
        blocks = [int(b) for b in spec]
    if not blocks:
        raise ConfigError(f"{name} selects no block", parameter=name)
    wrong = [b for b in blocks if not 0 <= b < depth]
    if wrong:
        raise ConfigError(f"{name} names block {wrong[0]}, but the baseline has blocks 0-{depth - 1}", parameter=name)
    return tuple(blocks)


def block_plan(split: Split, depth: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(encoder's source blocks, decoder's source blocks) of a split of a `depth`-block baseline."""
    enc, dec = split.encoder_blocks, split.decoder_blocks
    if enc is None and dec is None:
        k, l = split_layers(depth, split.encoder_layers, split.decoder_layers)
        return tuple(range(k)), tuple(range(k, k + l))
    enc = parse_blocks(enc, depth, "encoder_blocks") if enc is not None else None
    dec = parse_blocks(dec, depth, "decoder_blocks") if dec is not None else None
    if enc is None:  # the rest, in order
        enc = tuple(b for b in range(depth) if b not in dec)
    if dec is None:
        dec = tuple(b for b in range(depth) if b not in enc)
    if not enc or not dec:
        raise ConfigError(f"the {'encoder' if not enc else 'decoder'} gets no block: select its blocks too")
    for name, blocks, count in (("encoder", enc, split.encoder_layers), ("decoder", dec, split.decoder_layers)):
        if count is not None and count != len(blocks):
            raise ConfigError(f"{name}_layers {count} contradicts {name}_blocks, which select {len(blocks)}")
    return enc, dec


def _spans(blocks: tuple[int, ...]) -> str:
    """(0, 1, 2, 3, 7, 7) -> '0-3, 7, 7'."""
    runs: list[list[int]] = []
    for b in blocks:
        if runs and b == runs[-1][1] + 1:
            runs[-1][1] = b
        else:
            runs.append([b, b])
    return ", ".join(f"{a}" if a == z else f"{a}-{z}" for a, z in runs)


def _block_sources(tensors: dict[str, torch.Tensor], enc: tuple[int, ...],
                   dec: tuple[int, ...]) -> dict[str, tuple[str, str]]:
    """{SCD tensor name: (baseline tensor name, note)} for the blocks, embedders and head."""
    by_block: dict[int, list[tuple[str, str]]] = {}
    sources = {}
    for key in tensors:
        match = BLOCK.fullmatch(key)
        if match:
            by_block.setdefault(int(match[1]), []).append((match[2], key))
        elif key.startswith(EMBEDDERS):
            for half in ("encoder", "decoder"):
                sources[f"{half}.{key}"] = (key, "embedder: copied to both halves")
        elif key.startswith(("proj_out.", "norm_out.")):
            sources[f"decoder.{key}"] = (key, "output head")
        else:
            raise CheckpointError(f"baseline tensor {key} has no place in an SCD model")
    for half, blocks in (("encoder", enc), ("decoder", dec)):
        for i, b in enumerate(blocks):
            for rest, key in by_block.get(b, []):
                sources[f"{half}.transformer_blocks.{i}.{rest}"] = (key, f"{half} block {i} <- block {b}")
    return sources


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


def split_baseline(tensors: dict[str, torch.Tensor], base: ModelConfig,
                   split: Split = Split()) -> tuple[torch.nn.Module, list[TensorEntry]]:
    """An SCD model from a baseline state dict (keys as in FAR, already checked against `base`).

    The encoder's blocks and the decoder's come from the baseline blocks `block_plan` selects (by
    default 0..K-1 and K..K+L-1); the embedders go to both halves; norm_out and proj_out to the
    decoder. The encoder's norm_out is the baseline's (`copy`) or the reference's zero init, a plain
    LayerNorm (`identity`). Tensors with no source (the encoder norm under identity, a `concat` input
    projection, a `token_concat_with_proj` alignment) start as `scd.models.init_weights` starts
    them; blocks selected for neither half are reported dropped."""
    combine, norm = split.decoder_combine or "token_concat", split.encoder_norm or DEFAULT_ENCODER_NORM
    if combine not in DECODER_COMBINES:
        raise ConfigError(f"decoder_combine must be one of {', '.join(DECODER_COMBINES)}, not {combine!r}",
                          parameter="decoder_combine")
    if norm not in ENCODER_NORMS:
        raise ConfigError(f"encoder_norm must be identity or copy, not {norm!r}", parameter="encoder_norm")
    enc, dec = block_plan(split, base.layers)
    config = dataclasses.replace(base, arch="scd", layers=len(enc) + len(dec), decoder_layers=len(dec),
                                 decoder_combine=combine, encoder_norm_unconditional=False,
                                 encoder_noise=REFERENCE_ENCODER_NOISE)
    model = _fresh(config)
    sources = _block_sources(tensors, enc, dec)
    if norm == "copy":
        for key in tensors:
            if key.startswith("norm_out."):
                sources[f"encoder.{key}"] = (key, "copied from the baseline's output norm (encoder_norm copy)")
    filled, entries = {}, []
    for target, initial in model.state_dict().items():
        if target in sources:
            key, note = sources[target]
            filled[target] = tensors[key]
            entries.append(TensorEntry(target, key, MAPPED, tuple(initial.shape), note))
        else:
            filled[target] = initial
            note = _describe_init(initial)
            if target.startswith("encoder.norm_out."):
                note += ": plain LayerNorm (encoder_norm identity)"
            entries.append(TensorEntry(target, None, CREATED, tuple(initial.shape), note))
    used = {key for key, _ in sources.values()}
    entries += [TensorEntry(None, k, DROPPED, tuple(v.shape), "block selected for neither half")
                for k, v in tensors.items() if k not in used]
    load_state(model, filled, "the split baseline")
    return model, entries


def _straight(tensors: dict[str, torch.Tensor], config: ModelConfig) -> tuple[torch.nn.Module, list[TensorEntry]]:
    """The model of `config` holding `tensors` as they are (keys already checked)."""
    model = model_from_tensors(config, tensors, "the checkpoint")
    return model, [TensorEntry(k, k, MAPPED, tuple(v.shape)) for k, v in model.state_dict().items()]


# ----------------------------------------------------------------------------- codec

@dataclass(frozen=True)
class CodecSpec:
    """The autoencoder to attach: `path` a diffusers AutoencoderDC folder or a DC-AE state dict
    (`.pth` / `.safetensors`; local or on the Hub) with its diffusers `config` json (not needed for
    FAR's published DC-AEs, whose configs scd knows). Without a path, `scaling_factor` and
    `downsample` describe the codec the model expects, to be attached later."""

    path: str | Path | None = None
    config: str | Path | None = None
    scaling_factor: float | None = None
    downsample: int | None = None


@dataclass
class _Codec:
    config: dict
    state: dict[str, torch.Tensor]
    origin: str
    sha256: str


def read_codec(spec: CodecSpec, channels: int | None) -> tuple[_Codec, dict]:
    """A DC-AE from a diffusers folder (config.json + diffusion_pytorch_model.safetensors) or from a
    state dict (FAR's DC-AE files) with a diffusers config; loaded into diffusers' AutoencoderDC to
    prove it is complete. Returns it and the config's `codec` entry."""
    source = resolve(spec.path, "codec")
    if source.path.is_dir():
        if spec.config is not None:
            raise ConfigError("a codec config is for a codec given as a single weights file; this codec is a folder")
        config = read_dcae_config(source.path / DCAE_CONFIG)
        weights = source.path / DCAE_WEIGHTS
        if not weights.is_file():
            raise CheckpointError(f"{source.path} has no {DCAE_WEIGHTS}: give a diffusers AutoencoderDC folder")
        factor = spec.scaling_factor if spec.scaling_factor is not None else config.get("scaling_factor", DCAE_SCALING_FACTOR)
        sha = _hashed(source, weights)
    else:
        stem = reference.published_stem(source.name)
        if spec.config is not None:
            config = read_dcae_config(resolve(spec.config, "codec config").path)
        elif stem in reference.FAR_DCAES:
            config = reference.dcae_config(reference.FAR_DCAES[stem].compression)
        else:
            raise ConfigError(f"{source.text} is a bare weights file that is not one of FAR's DC-AEs: give its "
                              "diffusers config (the codec's config)")
        weights = source.path
        # the config's own factor (FAR's DC-AE configs hold theirs; not every one is 0.2889), else FAR's
        factor = spec.scaling_factor if spec.scaling_factor is not None else config.get("scaling_factor", DCAE_SCALING_FACTOR)
        sha = _hashed(source)
    return _attach(config, weights, source.text, sha, factor, channels, spec.downsample)


def _attach(config: dict, weights: Path, origin: str, sha: str, factor: float, channels: int | None,
            downsample: int | None) -> tuple[_Codec, dict]:
    """A DC-AE of `config` holding `weights`, checked against the model; and the `codec` entry."""
    autoencoder = build_dcae(config, read_tensors(weights), origin)
    latent_channels = autoencoder.config.latent_channels
    if channels is not None and latent_channels != channels:  # None: any (encoding a dataset)
        raise CheckpointError(f"the DC-AE makes {latent_channels}-channel latents but the model works on {channels} "
                              "channels: attach the autoencoder the model was trained with")
    if downsample is not None and downsample != dcae_downsample(config):
        raise ConfigError(f"downsample {downsample} contradicts the DC-AE, which downsamples "
                          f"{dcae_downsample(config)}x", parameter="downsample")
    config = {**config, "_class_name": "AutoencoderDC", "scaling_factor": float(factor)}
    state = {k: v.detach().clone().contiguous() for k, v in autoencoder.state_dict().items()}
    return _Codec(config, state, origin, sha), {"type": "dcae", "scaling_factor": float(factor),
                                                "downsample": dcae_downsample(config)}


def _far_codec(read: _Read, entry: reference.FarModel, spec: CodecSpec, channels: int,
               notes: list[str]) -> tuple[_Codec, dict] | None:
    """The DC-AE of one of FAR's files, found as `scd generate` finds it (beside the file in FAR's
    layout, or in the Hub repository it came from); None, with a note, when there is none to find."""
    from scd import hub
    from scd.errors import HubError

    hub_ref = hub.parse_hub_ref(read.source.text) if read.source.revision else None
    if hub_ref is not None:
        hub_ref = hub.HubRef(hub_ref.repo_id, read.source.revision, hub_ref.path_in_repo)
    try:
        files = reference.far_codec_files(entry, read.source.path, hub_ref)
    except (CheckpointError, HubError) as err:
        notes.append(f"FAR's DC-AE {entry.dcae} was not attached ({err})")
        return None
    sha = reference.hashed(files.weights, files.name)
    factor = spec.scaling_factor or files.config.get("scaling_factor", reference.FAR_SCALING_FACTOR)
    return _attach(files.config, files.weights, str(files.weights), sha, factor, channels, spec.downsample)


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
    return reference.reference_kind(tensors), tensors, sha, None, None


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


@dataclass
class _Read:
    """What the source is: its kind, tensors and hash; an scd folder's own config and codec folder."""

    source: Source
    kind: str
    tensors: dict[str, torch.Tensor]
    sha256: str
    folder_config: ModelConfig | None
    folder_codec: Path | None


def convert(source: str | Path, out: str | Path, *, options: str | Path | None = None, to: str = "scd",
            split: Split = Split(), sizes: SizeHints = SizeHints(), codec: CodecSpec = CodecSpec(),
            fps: float | None = None, action_names: tuple[str, ...] | None = None, overwrite: bool = False,
            push_to_hub: str | None = None, private: bool = False, base: str | Path | None = None,
            encoder_input: str | None = None) -> ConversionReport:
    """Convert `source` (a path or Hub reference) into the model folder `out`.

    `to="scd"` splits a baseline into encoder + decoder as `split` says, or re-saves an SCD source;
    `to="baseline"` re-saves a baseline (FAR_Long loses its long-context branch). The sizes of a
    bare FAR file come from `options` (its options file), or from the tensors checked against
    `sizes`. `codec` attaches a DC-AE. `action_names` name the model's actions or classes. Returns
    the report; raises CheckpointError / ConfigError / HubError before writing anything when the
    input is not understood.

    A causal Wan2.1 source (a Self-Forcing `.pt`, Wan2.1 or diffusers safetensors) converts with
    `base`, the Wan base folder or Hub repo that gives its sizes (or a config.json beside it): to a
    causal Wan folder, or to SCD from Wan (`wan_split`: the paper's blocks 0-24 / 0-4,25-29 for 30
    blocks), `encoder_input` saying what the encoder sees of the frame being made ("noise", "none").
    """
    if to not in ("scd", "baseline"):
        raise ConfigError(f"to must be scd or baseline, not {to!r}", parameter="to")
    src = resolve(source)
    if base is not None or wan_reference.is_wan_source(src.path):
        return _convert_wan(src, Path(out).expanduser(), base, to, split, encoder_input, overwrite, push_to_hub, private)
    for name, value, low, above, integer in (("scaling_factor", codec.scaling_factor, 0, True, False),
                                             ("downsample", codec.downsample, 1, False, True), ("fps", fps, 0, True, False)):
        if value is not None:
            checks.number(name, value, low, 1000 if name == "fps" else None, above=above, integer=integer)
    out = Path(out).expanduser()
    read = _read(src)
    notes: list[str] = []
    base, origin = _base_config(read, options, sizes, notes)
    dropped = _drop_far_long(read, notes)
    check_tensors(read.tensors, base, read.source.text)
    model, entries, config = _target(read, base, to, split, notes)
    new_codec, codec_entry = _codec_entry(read, config, codec, notes)
    config = _finish_config(read, config, codec_entry, fps, action_names)
    model.config = config
    for part in model.parts().values():
        part.config = config

    report = ConversionReport(str(source), read.kind, read.sha256, read.source.revision, origin, config,
                              entries + dropped, notes=notes)
    if new_codec is not None:
        report.codec, report.codec_sha256 = new_codec.origin, new_codec.sha256
    elif read.folder_codec is not None:
        report.codec = f"{read.source.text}/{CODEC_DIR}"
    _write(report, model, out, read, new_codec, overwrite)
    if push_to_hub:
        from scd import hub

        commit = hub.push_folder(out, push_to_hub, private=private,
                                 commit_message=f"scd convert {source} ({KIND_NAMES[read.kind]})")
        report.pushed = f"{push_to_hub}@{commit}"
    return report


def _read(src: Source) -> _Read:
    kind, tensors, sha, folder_config, folder_codec = _read_source(src)
    return _Read(src, kind, tensors, sha, folder_config, folder_codec)


def _base_config(read: _Read, options, sizes: SizeHints, notes: list[str]) -> tuple[ModelConfig, str]:
    """The source's own config (before any split) and where it came from."""
    text = read.source.text
    if read.folder_config is not None:
        if options is not None or sizes.given() or sizes.latent_size is not None:
            raise ConfigError(f"{text} is an scd model folder with its own config.json: give no options file and no sizes")
        return read.folder_config, "config.json of the source folder"
    if options is not None:
        if sizes.given():
            raise ConfigError(f"the sizes given ({', '.join(sizes.given())}) are for a checkpoint without an options file")
        opt = resolve(options, "options file")
        base = reference.config_from_options(reference.read_options(opt.path), sizes.latent_size)
        if (read.kind == "scd") != (base.arch == "scd"):
            raise CheckpointError(f"{text} is a {KIND_NAMES[read.kind]} but {opt.text} describes a "
                                  f"{'SCD' if base.arch == 'scd' else 'FAR'} model: give the options file that goes with it")
        return base, f"options file {opt.text}"
    if read.kind == "scd":
        raise CheckpointError(f"{text} is an official SCD trainer checkpoint: give its options file (the "
                              "encoder/decoder split and the decoder input mode are not stored in the weights)")
    tensors = reference.split_far_long(read.tensors)[0]
    entry = reference.far_model(read.source.name)
    if entry is not None and not sizes.given() and sizes.latent_size is None:  # one of FAR's files: its settings
        base = reference.infer_far_config(tensors, text, SizeHints(latent_size=(entry.latent_size,) * 2))
        settings = {k: v for k, v in reference.far_settings(entry).items() if k != "codec"}
        notes.append(f"FAR's published {entry.data} model: {entry.resolution} px, context {entry.context_frames} "
                     f"frames, guidance {entry.guidance:g}; its DC-AE is {entry.dcae}")
        return dataclasses.replace(base, **settings), f"the tensor shapes and FAR's published {entry.name}"
    base = reference.infer_far_config(tensors, text, sizes)
    guessed = [name for name, value in (("patch size 1", sizes.patch_size or sizes.preset),
                                        (f"RoPE axes {base.rope_axes}", sizes.rope_axes or sizes.preset),
                                        ("latent size 8 x 8", sizes.latent_size)) if value is None]
    if guessed:
        notes.append(f"not stored in the checkpoint, taken as FAR's defaults: {', '.join(guessed)}")
    return base, "the tensor shapes" + (f" and preset {sizes.preset}" if sizes.preset else "")


def _drop_far_long(read: _Read, notes: list[str]) -> list[TensorEntry]:
    if read.kind != "far_long":
        return []
    read.tensors, long = reference.split_far_long(read.tensors)
    notes.append(f"FAR_Long's long-term-context branch ({len(long)} tensors) has no counterpart and was dropped: "
                 "the model sees its short-term window only")
    return [TensorEntry(None, k, DROPPED, tuple(v.shape), "FAR_Long long-term context") for k, v in long.items()]


def _target(read: _Read, base: ModelConfig, to: str, split: Split, notes: list[str]):
    """(model, tensor entries, config): the source re-saved, or a baseline split into SCD."""
    if base.arch == "scd" or to == "baseline":
        if base.arch == "scd" and to == "baseline":
            raise ConfigError(f"{read.source.text} is already an SCD model: it cannot be turned back into a baseline")
        if split.given():
            raise ConfigError(f"{', '.join(split.given())} split a baseline into SCD; {read.source.text} is re-saved as it is")
        model = model_from_tensors(base, read.tensors, "the checkpoint")
        return model, [TensorEntry(k, k, MAPPED, tuple(v.shape)) for k, v in model.state_dict().items()], base
    model, entries = split_baseline(read.tensors, base, split)
    enc, dec = block_plan(split, base.layers)
    notes.append(f"split from a {base.layers}-block baseline: encoder blocks 0-{len(enc) - 1} <- baseline blocks "
                 f"{_spans(enc)}; decoder blocks 0-{len(dec) - 1} <- baseline blocks {_spans(dec)}; encoder norm "
                 f"{split.encoder_norm or DEFAULT_ENCODER_NORM}. Not yet trained as SCD: fine-tune it "
                 "from this folder (`scd train`) before judging its frames")
    return model, entries, model.config


def _codec_entry(read: _Read, config: ModelConfig, spec: CodecSpec, notes: list[str]) -> tuple[_Codec | None, dict]:
    """The autoencoder to write (if one is attached) and the config's `codec` entry."""
    if spec.path is not None:
        return read_codec(spec, config.channels)
    if spec.config is not None:
        raise ConfigError("a codec config goes with a codec")
    if read.folder_config is not None:
        if spec.scaling_factor is not None or spec.downsample is not None:
            raise ConfigError("scaling_factor and downsample go with a codec for a model folder, which has its own")
        return None, read.folder_config.codec.to_dict()
    if config.channels == 3:
        return None, {"type": "pixel"}
    entry = reference.far_model(read.source.name)
    if entry is not None:
        attached = _far_codec(read, entry, spec, config.channels, notes)
        if attached is not None:
            return attached
    default_downsample = reference.FAR_DCAES[entry.dcae].compression if entry else DEFAULT_DOWNSAMPLE
    notes.append(f"the model works on {config.channels}-channel DC-AE latents but no autoencoder is attached: "
                 "convert this folder again with a codec before generating from pixels")
    return None, {"type": "dcae", "scaling_factor": float(spec.scaling_factor or DCAE_SCALING_FACTOR),
                  "downsample": int(spec.downsample or default_downsample)}


def _finish_config(read: _Read, config: ModelConfig, codec_entry: dict, fps, action_names) -> ModelConfig:
    """The codec, frame size, playback settings and action names of the new folder."""
    if codec_entry.get("type") == "pixel":
        frame_size = config.frame_size if read.folder_config is not None else config.latent_size
    else:
        frame_size = tuple(s * codec_entry["downsample"] for s in config.latent_size)
    names = config.action_names if action_names is None else tuple(str(n) for n in action_names)
    if action_names is not None and len(names) != config.num_classes:
        raise ConfigError(f"action_names: {len(names)} given for a model of {config.num_classes} "
                          f"{config.condition or 'condition'} classes: give one name per class", parameter="action_names")
    return dataclasses.replace(config, codec=codec_entry, frame_size=frame_size, action_names=names,
                               fps=config.fps if fps is None else fps)


def _write(report: ConversionReport, model, out: Path, read: _Read, new_codec: _Codec | None, overwrite: bool) -> None:
    """The folder: weights in the source's dtype, config, card, and the codec (new, or the source folder's)."""
    _prepare_out(out, read.source.path, overwrite)
    save_model_folder(model, out, conversion_card(report, out), dtype=_floating_dtype(read.tensors))
    if new_codec is not None:
        _write_codec(out / CODEC_DIR, new_codec)
    elif read.folder_codec is not None:
        shutil.copytree(read.folder_codec, out / CODEC_DIR)
    report.folder = out


def _prepare_out(out: Path, source: Path, overwrite: bool) -> None:
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise ConfigError(f"the output folder {out} is inside the source: choose another folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"the output {out} is a file: give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} exists and is not empty: choose another output folder, or allow overwriting it")
        if (out / CODEC_DIR).is_dir():  # a stale autoencoder must not outlive the model it came with
            shutil.rmtree(out / CODEC_DIR)


def _write_codec(folder: Path, codec: _Codec) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        files.atomic_write(folder / DCAE_WEIGHTS, lambda tmp: save_file(codec.state, str(tmp), metadata={"format": "pt"}),
                           CheckpointError)
        files.write_text(folder / DCAE_CONFIG, json.dumps(codec.config, indent=2) + "\n", CheckpointError)
    except OSError as err:
        raise CheckpointError(f"cannot write the codec into {folder}: {err.strerror or err}") from None


# ----------------------------------------------------------------------------- the Wan family

WAN_SHARED = ("patch_embedding.", "text_embedding.", "action_embedding.", "time_embedding.", "time_projection.")


def wan_split(split: Split, depth: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """SCD-from-Wan's blocks: as `split` names them, else the paper's proportions, blocks
    0..L-k-1 for the encoder and 0..k-1 plus L-k..L-1 for the decoder, k = L/6 (0-24 and 0-4,25-29
    for Wan2.1's 30 blocks)."""
    if split.encoder_layers is not None or split.decoder_layers is not None:
        return block_plan(split, depth)
    k = max(1, round(depth / 6))
    enc = parse_blocks(split.encoder_blocks, depth, "encoder_blocks") if split.encoder_blocks is not None \
        else tuple(range(depth - k)) or (0,)
    dec = parse_blocks(split.decoder_blocks, depth, "decoder_blocks") if split.decoder_blocks is not None \
        else tuple(range(k)) + tuple(range(depth - k, depth))
    return enc, dec


def _wan_scd(tensors: dict[str, torch.Tensor], enc: tuple[int, ...], dec: tuple[int, ...]):
    """The SCD-Wan state dict of a causal Wan's tensors and an entry per tensor."""
    out, entries = {}, []
    blocks = {}
    for key, value in tensors.items():
        m = re.match(r"^blocks\.(\d+)\.(.+)$", key)
        if m:
            blocks.setdefault(int(m[1]), {})[m[2]] = (key, value)
    for part, chosen in (("encoder", enc), ("decoder", dec)):
        for key, value in tensors.items():
            if key.startswith(WAN_SHARED) or (part == "decoder" and key.startswith("head.")):
                out[f"{part}.{key}"] = value.clone()
                entries.append(TensorEntry(f"{part}.{key}", key, MAPPED, tuple(value.shape)))
        for i, source in enumerate(chosen):
            for name, (key, value) in blocks[source].items():
                out[f"{part}.blocks.{i}.{name}"] = value.clone()
                entries.append(TensorEntry(f"{part}.blocks.{i}.{name}", key, MAPPED, tuple(value.shape),
                                           f"block {source} -> {part} block {i}"))
    return out, entries


def _convert_wan(src: Source, out: Path, base, to: str, split: Split, encoder_input: str | None, overwrite: bool,
                 push_to_hub: str | None, private: bool) -> ConversionReport:
    """A causal Wan2.1 checkpoint -> an scd model folder (config.json naming the family and its
    base, model.safetensors under Wan2.1's names; SCD's as `encoder.*` and `decoder.*`)."""
    if to == "baseline" and (split.given() or encoder_input is not None):
        given = split.given()[0] if split.given() else "encoder_input"
        raise ConfigError(f"{given} goes with to scd: a causal Wan kept as a baseline keeps its blocks",
                          parameter=given, others=("to",))
    if split.encoder_norm is not None:
        raise ConfigError("encoder_norm is for the FAR-style family: Wan's blocks end in no output norm",
                          parameter="encoder_norm")
    base_folder, base_revision = (None, None) if base is None else wan_reference.resolve_base(base)
    base_ref = None if base is None else (str(base) if base_revision is None or "@" in str(base)
                                          else f"{base}@{base_revision}")
    if base_folder is not None and Path(str(base)).expanduser().is_dir():
        base_ref = str(Path(str(base)).expanduser().resolve())
    config = wan_reference.wan_config(src.path, base_folder, **({} if base_ref is None else {"base": base_ref}))  # a folder keeps its own base
    if src.path.is_file():
        _check_container(src.path, src.text)
    sha = files.file_sha256(src.path) if src.path.is_file() else "-"
    tensors, names = wan_reference.read_weights(src.path)
    model = model_from_tensors(config, tensors, src.text)
    entries = [TensorEntry(k, names[k], MAPPED, tuple(v.shape), "renamed from diffusers" if names[k] != k else "")
               for k, v in tensors.items()]
    if to == "scd":
        enc, dec = wan_split(split, config.num_layers)
        combine = split.decoder_combine or "token_concat"
        try:
            config = dataclasses.replace(config, arch="scd", encoder_layers=len(enc), decoder_layers=len(dec),
                                         num_layers=len(enc) + len(dec), decoder_combine=combine,
                                         encoder_input=encoder_input or "noise", source_blocks=(enc, dec))
        except ConfigError as err:
            raise ConfigError(str(err), parameter=err.parameter) from None
        scd_tensors, mapped = _wan_scd(model.state_dict(), enc, dec)
        model = model_from_tensors(config, scd_tensors, src.text)
        entries = [dataclasses.replace(e, source=names.get(e.source, e.source)) for e in mapped]
    notes = [f"sizes from {'the base ' + str(base) if base is not None else 'the config.json beside it'}"]
    if to == "scd":
        notes.append(f"encoder blocks {_spans(config.source_blocks[0])}, decoder blocks {_spans(config.source_blocks[1])} "
                     f"({config.decoder_combine}), encoder input {config.encoder_input}; fine-tune it before use "
                     "(docs/convert.md)")
    report = ConversionReport(src.text, "wan", sha, src.revision, notes[0], config, entries, notes=notes)
    _prepare_out(out, src.path, overwrite)
    save_model_folder(model, out, conversion_card(report, out), dtype=_floating_dtype(tensors))
    report.folder = out
    if push_to_hub:
        from scd import hub

        commit = hub.push_folder(out, push_to_hub, private=private, commit_message=f"scd convert {src.text} (causal Wan2.1)")
        report.pushed = f"{push_to_hub}@{commit}"
    return report
